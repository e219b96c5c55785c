"""Double-reading agreement (lib/team/agreement.py) against an independent computation: MONAI's
Dice, HD95 and average symmetric surface distance on ellipsoid phantoms with anisotropic spacing.

MONAI (no subvoxels, as here) takes a mask's surface as the mask XOR its SciPy binary erosion with
the default 6-connected element, crops to the union's bounding box with a 1-voxel margin, and
measures exact Euclidean distances (a KD-tree) in mm; torch.quantile and np.percentile both
interpolate linearly. So the unrounded figures agree to MONAI's float32 precision (seen: 3e-7,
asserted: 1e-5; 26-connected surfaces would be off by 0.2-0.6 mm), the rounded ones to half their
last digit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

from lib.team.agreement import _figures, agreement

# MONAI 1.6 warns about its own use of a deprecated argument of get_mask_edges
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
SPACING = (0.8, 0.8, 2.5)
SHAPE = (64, 56, 24)


def ellipsoid(centre_mm, radii_mm, shape=SHAPE, spacing=SPACING) -> np.ndarray:
    grid = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre_mm, radii_mm)) <= 1.0


def phantoms(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A: an ellipsoid; B: a shifted, larger one, with a random blob cut out or added."""
    rng = np.random.default_rng(seed)
    extent = np.array(SHAPE) * SPACING
    centre = extent * rng.uniform(0.35, 0.65, 3)
    radii = rng.uniform(6.0, 14.0, 3)
    a = ellipsoid(centre, radii)
    b = ellipsoid(centre + rng.uniform(-3.0, 3.0, 3), radii * rng.uniform(1.0, 1.3, 3))
    blob = ellipsoid(centre + rng.uniform(-8.0, 8.0, 3), rng.uniform(3.0, 6.0, 3))
    b = b & ~blob if seed % 2 else b | blob
    return a, b


def monai_figures(a: np.ndarray, b: np.ndarray, spacing=SPACING) -> tuple[float, float, float]:
    pa, pb = (torch.from_numpy(m[None, None].astype(np.float32)) for m in (a, b))
    dice = compute_dice(pa, pb, include_background=True).item()
    hd95 = compute_hausdorff_distance(pa, pb, include_background=True, percentile=95, spacing=spacing).item()
    assd = compute_average_surface_distance(pa, pb, include_background=True, symmetric=True, spacing=spacing).item()
    return dice, assd, hd95


@pytest.mark.parametrize("seed", range(6))
def test_matches_monai_on_phantoms(seed):
    a, b = phantoms(seed)
    assert a.any() and b.any() and (a != b).any()
    dice, assd, hd95 = monai_figures(a, b)
    assert _figures(a, b, SPACING) == pytest.approx((dice, assd, hd95), abs=1e-5)
    (row,) = agreement(a.astype(np.uint8), b.astype(np.uint8) * 3, {1: "liver"}, {3: "liver"}, SPACING)
    assert row["dice"] == pytest.approx(dice, abs=5e-5 + 1e-6)
    assert row["mean_mm"] == pytest.approx(assd, abs=5e-3 + 1e-4)
    assert row["p95_mm"] == pytest.approx(hd95, abs=5e-3 + 1e-4)
    assert row["voxels"] == [int(a.sum()), int(b.sum())]


def test_matches_monai_where_segments_touch_the_grid_edge():
    """The crop is clipped to the grid; outside the grid counts as background for the surface."""
    a = ellipsoid((2.0, 20.0, 10.0), (12.0, 10.0, 12.0))  # cut by the i=0 and k=0 faces
    b = ellipsoid((0.0, 22.0, 5.0), (13.0, 9.0, 14.0))
    assert a[0].any() and b[:, :, 0].any()
    dice, assd, hd95 = monai_figures(a, b)
    assert _figures(a, b, SPACING) == pytest.approx((dice, assd, hd95), abs=1e-5)


def test_matches_by_name_across_label_values():
    a, b = phantoms(7)
    spleen = ellipsoid((40.0, 8.0, 10.0), (4.0, 4.0, 6.0))
    label_a = np.where(a, 1, 0).astype(np.uint8)
    label_a[spleen] = 2
    label_b = np.where(b, 5, 0).astype(np.uint8)
    label_b[spleen] = 9
    rows = agreement(label_a, label_b, {1: "liver", 2: "spleen"}, {9: "spleen", 5: "liver", 4: "kidney"}, SPACING)
    assert [r["name"] for r in rows] == ["kidney", "liver", "spleen"]
    kidney, liver, spleen_row = rows
    assert kidney == {
        "name": "kidney",
        "dice": None,
        "mean_mm": None,
        "p95_mm": None,
        "ml": [0.0, 0.0],
        "voxels": [0, 0],
    }
    assert spleen_row["dice"] == 1.0 and spleen_row["mean_mm"] == 0.0 and spleen_row["p95_mm"] == 0.0
    dice, assd, hd95 = monai_figures(a & ~spleen, b & ~spleen)
    assert liver["dice"] == pytest.approx(dice, abs=6e-5)
    assert liver["mean_mm"] == pytest.approx(assd, abs=6e-3)
    assert liver["p95_mm"] == pytest.approx(hd95, abs=6e-3)


def test_one_side_empty():
    a, _ = phantoms(0)
    rows = agreement(a.astype(np.uint8), np.zeros(SHAPE, np.uint8), {1: "liver"}, {1: "liver"}, SPACING)
    n = int(a.sum())
    assert rows == [
        {
            "name": "liver",
            "dice": 0.0,
            "mean_mm": None,
            "p95_mm": None,
            "ml": [round(n * 0.8 * 0.8 * 2.5 / 1000, 1), 0.0],
            "voxels": [n, 0],
        }
    ]


def test_both_empty():
    empty = np.zeros(SHAPE, np.uint8)
    assert agreement(empty, empty, {1: "liver"}, {2: "liver"}, SPACING) == [
        {"name": "liver", "dice": None, "mean_mm": None, "p95_mm": None, "ml": [0.0, 0.0], "voxels": [0, 0]}
    ]


def test_ml_against_a_hand_count():
    a = np.zeros((10, 10, 10), np.uint8)
    a[2:7, 3:7, 1:4] = 1  # 5 * 4 * 3 = 60 voxels
    b = np.zeros_like(a)
    b[0:10, 0:10, 0:2] = 2  # 200 voxels
    (row,) = agreement(a, b, {1: "aorta"}, {2: "aorta"}, (1.5, 1.5, 2.0))  # 4.5 mm3 a voxel
    assert row["voxels"] == [60, 200]
    assert row["ml"] == [0.3, 0.9]  # 270 mm3 and 900 mm3
    assert row["dice"] == round(2 * (5 * 4 * 1) / 260, 4)


def test_bad_inputs():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="shapes"):
        agreement(a, np.zeros((4, 4, 5), np.uint8), {1: "x"}, {1: "x"}, (1.0, 1.0, 1.0))
    for spacing in [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (1.0, float("nan"), 1.0), 1.0, ("a", 1, 1)]:
        with pytest.raises(ValueError, match="spacing"):
            agreement(a, a, {1: "x"}, {1: "x"}, spacing)
