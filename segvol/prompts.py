"""Prompts, and the one place where image voxels (i, j, k) map to model space (d, h, w).

User prompts are voxel indices of the array as stored (what OHIF and Slicer send):
points [[i, j, k], ...] with labels 1 (positive) / 0 (negative), and an inclusive box
[i0, j0, k0, i1, j1, k1]. Model-space boxes are inclusive [d0, h0, w0, d1, h1, w1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from segvol.preprocess import Crop, nearest_exact_source, nearest_source

NO_BOX = (-1, -1, -1, -1, -1, -1)


class PromptError(ValueError):
    """A prompt that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class Prompt:
    """One target: optional text, clicks and box, all in image voxel indices."""

    text: str | None = None
    points: tuple[tuple[int, int, int], ...] = ()
    point_labels: tuple[int, ...] = ()
    box: tuple[int, int, int, int, int, int] | None = None

    @classmethod
    def make(cls, shape_ijk, text=None, points=None, point_labels=None, box=None) -> Prompt:
        """Validate raw values against the image shape and build a prompt."""
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise PromptError("empty text prompt")
            text = text.strip()
        pts = _int_rows(points, 3, "point") if points is not None and len(points) else []
        if point_labels is None or len(point_labels) == 0:
            labels = [1] * len(pts)
        else:
            labels = [_as_int(v, "point label") for v in point_labels]
        if len(labels) != len(pts):
            raise PromptError(f"{len(pts)} points but {len(labels)} point labels")
        if any(v not in (0, 1) for v in labels):
            raise PromptError(f"point labels must be 1 (positive) or 0 (negative), got {labels}")
        for p in pts:
            _check_inside(p, shape_ijk, f"point {p}")
        bx = None
        if box is not None:
            (bx,) = _int_rows([box], 6, "box")
            lo, hi = bx[:3], bx[3:]
            if any(a > b for a, b in zip(lo, hi)):
                raise PromptError(f"box {bx} has a minimum above its maximum; expected [i0, j0, k0, i1, j1, k1]")
            _check_inside(lo, shape_ijk, f"box corner {lo}")
            _check_inside(hi, shape_ijk, f"box corner {hi}")
            bx = tuple(bx)
        if text is None and not pts and bx is None:
            raise PromptError("no prompt: give a text, a point or a box")
        return cls(text, tuple(tuple(p) for p in pts), tuple(labels), bx)


def _as_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise PromptError(f"{what} must be a number, got {v!r}")
    if not math.isfinite(v) or v != int(v):
        raise PromptError(f"{what} must be a whole voxel index, got {v!r}")
    return int(v)


def _int_rows(rows, n: int, what: str) -> list[list[int]]:
    out = []
    for r in rows:
        if not isinstance(r, (list, tuple, np.ndarray)) or len(r) != n:
            raise PromptError(f"each {what} needs {n} voxel indices, got {r!r}")
        out.append([_as_int(v, f"{what} coordinate") for v in r])
    return out


def _check_inside(p, shape, what: str) -> None:
    if any(not 0 <= v < s for v, s in zip(p, shape)):
        raise PromptError(f"{what} lies outside the volume of shape {tuple(shape)} (valid i, j, k: 0..size-1)")


# ----------------------------------------------------------------------------- model space
def _span_to_output(c0: int, c1: int, n_in: int, n_out: int) -> tuple[int, int] | None:
    """First and last output index of a nearest-exact resize whose source lies in [c0, c1]."""
    src = nearest_exact_source(n_in, n_out)
    hit = np.flatnonzero((src >= c0) & (src <= c1))
    return (int(hit[0]), int(hit[-1])) if hit.size else None


def box_to_model(box_ijk, crop: Crop, size: tuple[int, int, int]) -> tuple[int, ...]:
    """User box -> the tight model-space box of its cuboid after crop and resize (-1s if empty)."""
    lo = (box_ijk[2], box_ijk[1], box_ijk[0])
    hi = (box_ijk[5], box_ijk[4], box_ijk[3])
    spans = []
    for ax in range(3):
        c0 = max(lo[ax] - crop.start[ax], 0)
        c1 = min(hi[ax] - crop.start[ax], crop.shape[ax] - 1)
        span = _span_to_output(c0, c1, crop.shape[ax], size[ax]) if c0 <= c1 else None
        if span is None:
            return NO_BOX
        spans.append(span)
    return tuple(s[0] for s in spans) + tuple(s[1] for s in spans)


def points_to_model(points_ijk, crop: Crop, size: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Clicks -> model-space voxels: o = floor((c + 0.5) * out / in), clipped to the volume."""
    out = []
    for p in points_ijk:
        dhw = (p[2], p[1], p[0])
        o = []
        for ax in range(3):
            c = dhw[ax] - crop.start[ax]
            v = math.floor((c + 0.5) * size[ax] / crop.shape[ax])
            o.append(min(max(v, 0), size[ax] - 1))
        out.append(tuple(o))
    return out


def points_to_crop(points_ijk, crop: Crop) -> list[tuple[int, int, int]]:
    """Clicks -> crop-grid voxels (d, h, w) at the original resolution."""
    return [tuple(p[2 - ax] - crop.start[ax] for ax in range(3)) for p in points_ijk]


def model_box_on_crop(box_dhw, crop_shape, size, roi: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    """The model-space box cube resized back to the crop grid (legacy nearest), cut to the ROI,
    as a tight box in unpadded ROI coordinates (-1s if empty). Used for a single zoom-in window."""
    if tuple(box_dhw) == NO_BOX:
        return NO_BOX
    lo, hi = [], []
    for ax in range(3):
        src = nearest_source(size[ax], crop_shape[ax])
        r0, r1 = roi[ax]
        inside = np.flatnonzero((src[r0:r1] >= box_dhw[ax]) & (src[r0:r1] <= box_dhw[ax + 3]))
        if inside.size == 0:
            return NO_BOX
        lo.append(int(inside[0]))
        hi.append(int(inside[-1]))
    return tuple(lo + hi)


def mask_box(mask: np.ndarray) -> tuple[int, ...]:
    """Tight inclusive box of a 3D boolean mask, -1s if it is empty."""
    nz = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    if any(n.size == 0 for n in nz):
        return NO_BOX
    return tuple(int(n[0]) for n in nz) + tuple(int(n[-1]) for n in nz)
