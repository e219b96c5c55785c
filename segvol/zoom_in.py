"""The zoom-in stage's plan, as the official code places it: the ROI around the coarse mask, its
zero padding up to the window size, the sliding windows over it, and the prompts each window gets.
Pure tensor arithmetic on the crop grid; the predictor encodes and decodes the windows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from segvol.preprocess import Crop
from segvol.prompts import Prompt, mask_box, model_box_on_crop, points_to_crop

WindowKey = tuple[tuple[int, int, int], ...]  # per axis (crop from, crop to, offset in window)


@dataclass
class Window:
    """One sliding-window position: where it sits in the padded ROI and what it contains."""

    start: tuple[int, int, int]  # in the padded ROI
    key: WindowKey  # identifies the window's content within its image
    box: tuple[int, ...] | None = None
    points: list[tuple[int, int, int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


@dataclass
class Plan:
    """Zoom-in plan of one target."""

    roi: tuple[tuple[int, int], ...]  # slices of the crop grid
    pad: tuple[int, int, int]  # zero padding before, per axis (after = the rest)
    padded: tuple[int, int, int]
    windows: list[Window]


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window starts along one (padded) axis, as MONAI's dense patch slicing places them."""
    interval = window if window == size else max(int(window * (1 - overlap)), 1)
    starts = []
    for idx in range(math.ceil(size / interval)):
        s = idx * interval
        starts.append(s - max(s + window - size, 0))
        if s + window >= size:
            break
    return starts


def roi_from_mask(mask: torch.Tensor, window: tuple[int, int, int]) -> tuple[tuple[int, int], ...] | None:
    """ROI slices around the coarse mask, widened towards the window size as the official code does
    (including its upper clamp to the size, so an odd shortfall leaves the ROI one voxel short)."""
    nz = torch.nonzero(mask)
    if nz.shape[0] == 0:
        return None
    roi = []
    for ax in range(3):
        lo, hi = int(nz[:, ax].min()), int(nz[:, ax].max())
        half = max(0, window[ax] - (hi - lo + 1)) // 2
        lo, hi = max(0, lo - half), min(mask.shape[ax], hi + half)
        roi.append((lo, min(hi + 1, mask.shape[ax])))
    return tuple(roi)


def window_grid(mask: torch.Tensor, size: tuple[int, int, int], overlap: float) -> Plan | None:
    """Zoom-in windows around a crop-grid mask: the official ROI, padding and window placement."""
    roi = roi_from_mask(mask, size)
    if roi is None:
        return None
    lengths = [b - a for a, b in roi]
    padded = tuple(max(n, w) for n, w in zip(lengths, size))
    pad = tuple((p - n) // 2 for p, n in zip(padded, lengths))
    per_axis = [window_starts(padded[ax], size[ax], overlap) for ax in range(3)]
    windows = []
    for start in ((a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]):
        key = []
        for ax in range(3):
            p0, p1 = start[ax] - pad[ax], start[ax] + size[ax] - pad[ax]
            a, b = max(p0, 0), min(p1, lengths[ax])
            key.append((roi[ax][0] + a, roi[ax][0] + b, max(-p0, 0)))
        windows.append(Window(start, tuple(key)))
    return Plan(roi, pad, padded, windows)


def pad_roi(values: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Crop-grid values inside the plan's ROI, zero-padded as the window image is."""
    inner = values[tuple(slice(a, b) for a, b in plan.roi)]
    lengths = [b - a for a, b in plan.roi]
    return F.pad(inner, [p for ax in (2, 1, 0) for p in (plan.pad[ax], plan.padded[ax] - lengths[ax] - plan.pad[ax])])


def plan_prompt(
    prompt: Prompt,
    coarse_mask: torch.Tensor,
    crop: Crop,
    size: tuple[int, int, int],
    overlap: float,
    model_box: tuple | None,
) -> Plan | None:
    """The windows around a target's coarse mask, each with the prompts it is decoded with: with
    clicks, the clicks inside it and the box of the coarse mask in it; with a box, the user's box
    (one window) or the box of the coarse mask in it; with text alone, nothing more."""
    plan = window_grid(coarse_mask, size, overlap)
    if plan is None:
        return None
    padded_mask: np.ndarray = pad_roi(coarse_mask, plan).cpu().numpy()
    clicks = points_to_crop(prompt.points, crop) if prompt.points else []
    roi, pad = plan.roi, plan.pad
    for win in plan.windows:
        s = win.start
        in_window = padded_mask[tuple(slice(s[ax], s[ax] + size[ax]) for ax in range(3))]
        if prompt.points:
            win.box = mask_box(in_window)
            for c, lab in zip(clicks, prompt.point_labels):
                w = tuple(c[ax] - roi[ax][0] + pad[ax] - s[ax] for ax in range(3))
                if all(0 <= w[ax] < size[ax] for ax in range(3)):
                    win.points.append(w)
                    win.labels.append(lab)
        elif prompt.box is not None:
            if len(plan.windows) == 1:
                win.box = model_box_on_crop(model_box, crop.shape, size, roi)
            else:
                win.box = mask_box(in_window)
    return plan


def window_volume(zoom_in: torch.Tensor, key: WindowKey, size: tuple[int, int, int]) -> torch.Tensor:
    """A window's image: the crop's voxels it covers, zeros where it hangs over the ROI's padding."""
    vol = torch.zeros(size, dtype=torch.float32, device=zoom_in.device)
    src = tuple(slice(a, b) for a, b, _ in key)
    dst = tuple(slice(o, o + b - a) for a, b, o in key)
    vol[dst] = zoom_in[src]
    return vol


def paste(coarse: torch.Tensor, plan: Plan, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The overlap-averaged window logits pasted into the coarse logits over the ROI (in place)."""
    inner = tuple(slice(p, p + b - a) for p, (a, b) in zip(plan.pad, plan.roi))
    coarse[tuple(slice(a, b) for a, b in plan.roi)] = (total / count)[inner]
    return coarse
