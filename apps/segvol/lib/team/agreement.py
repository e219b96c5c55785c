"""Agreement between two readings of one CT label (double reading).

When two annotators label the same image, the reviewer adjudicates on a few figures per category:
Dice overlap, the average symmetric surface distance, the 95th percentile Hausdorff distance
(HD95), both in mm, and each reading's volume. Segments are matched BY NAME, since the two
readings may store one category under different label values.

Surface convention (the one MONAI's ``get_mask_edges`` uses without subvoxels): a mask's surface
is the mask minus its ``scipy.ndimage.binary_erosion`` with SciPy's default structuring element,
6-connectivity (face neighbours), and voxels outside the grid count as background. Distances are
Euclidean between voxel centres, in mm (``distance_transform_edt`` with ``sampling=spacing``).

Each segment is measured on the bounding box of A ∪ B padded by 1 voxel (clipped to the grid;
bounding boxes come from one ``find_objects`` pass per reading), so a 512x512x300 label with
small organs costs little more than the organs themselves.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

Box = tuple[slice, ...]


def _figures(
    mask_a: np.ndarray, mask_b: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[float | None, float | None, float | None]:
    """Unrounded (dice, mean_mm, p95_mm) of two boolean masks on one grid."""
    na, nb = int(mask_a.sum()), int(mask_b.sum())
    if na + nb == 0:
        return None, None, None
    dice = 2.0 * int(np.logical_and(mask_a, mask_b).sum()) / (na + nb)
    if na == 0 or nb == 0:
        return dice, None, None
    surf_a = mask_a & ~ndimage.binary_erosion(mask_a)
    surf_b = mask_b & ~ndimage.binary_erosion(mask_b)
    a_to_b = ndimage.distance_transform_edt(~surf_b, sampling=spacing)[surf_a]
    b_to_a = ndimage.distance_transform_edt(~surf_a, sampling=spacing)[surf_b]
    mean = float(np.concatenate([a_to_b, b_to_a]).mean())
    p95 = float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))
    return dice, mean, p95


def _boxes(labels: np.ndarray, names: dict[int, str]) -> dict[str, list[Box]]:
    """Name -> bounding boxes of its values present in ``labels`` (value 0 is unlabelled)."""
    found = ndimage.find_objects(labels)
    boxes: dict[str, list[Box]] = {}
    for value, name in names.items():
        if value == 0:
            continue
        box = found[value - 1] if value <= len(found) else None
        boxes.setdefault(name, []).extend([box] if box is not None else [])
    return boxes


def _padded_union(boxes: list[Box], shape: tuple[int, ...]) -> Box:
    return tuple(
        slice(max(min(b[d].start for b in boxes) - 1, 0), min(max(b[d].stop for b in boxes) + 1, n))
        for d, n in enumerate(shape)
    )


def agreement(
    a: np.ndarray,
    b: np.ndarray,
    names_a: dict[int, str],
    names_b: dict[int, str],
    spacing: tuple[float, float, float],
) -> list[dict]:
    """Per category name (sorted; the union of both readings' names, value 0 ignored):
    ``{"name", "dice", "mean_mm", "p95_mm", "ml": [ml_a, ml_b], "voxels": [na, nb]}``.

    dice = 2|A∩B|/(|A|+|B|) (4 decimals); mean_mm = mean of both directed surface distance sets
    pooled; p95_mm = max of the two directed 95th percentiles (mm to 0.01); ml to 0.1 mL. One side
    empty: dice 0.0, distances None. Both empty: all None but ml [0.0, 0.0], voxels [0, 0].
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"the two readings must share one 3-D grid, got shapes {a.shape} and {b.shape}")
    try:
        mm = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        mm = ()
    if len(mm) != 3 or not all(math.isfinite(s) and s > 0 for s in mm):
        raise ValueError(f"spacing must be 3 positive numbers (mm along i, j, k), got {spacing!r}")
    ml_per_voxel = math.prod(mm) / 1000.0
    boxes_a, boxes_b = _boxes(a, names_a), _boxes(b, names_b)
    rows = []
    for name in sorted(set(boxes_a) | set(boxes_b)):
        values_a = [v for v, n in names_a.items() if n == name and v != 0]
        values_b = [v for v, n in names_b.items() if n == name and v != 0]
        boxes = boxes_a.get(name, []) + boxes_b.get(name, [])
        if boxes:
            box = _padded_union(boxes, a.shape)
            mask_a, mask_b = np.isin(a[box], values_a), np.isin(b[box], values_b)
        else:
            mask_a = mask_b = np.zeros((0, 0, 0), dtype=bool)
        na, nb = int(mask_a.sum()), int(mask_b.sum())
        dice, mean, p95 = _figures(mask_a, mask_b, mm)
        rows.append(
            {
                "name": name,
                "dice": None if dice is None else round(dice, 4),
                "mean_mm": None if mean is None else round(mean, 2),
                "p95_mm": None if p95 is None else round(p95, 2),
                "ml": [round(na * ml_per_voxel, 1), round(nb * ml_per_voxel, 1)],
                "voxels": [na, nb],
            }
        )
    return rows
