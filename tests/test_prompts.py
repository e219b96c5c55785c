"""Voxel <-> model-space mapping against brute force, and prompt validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segvol.model.image_encoder import Patchify
from segvol.preprocess import (
    Crop,
    foreground_normalise,
    foreground_normalise_torch,
    nearest_exact_source,
    percentile,
    prepare,
    zoom_out_volume,
)
from segvol.prompts import NO_BOX, Prompt, PromptError, box_to_model, mask_box, model_box_on_crop, points_to_model

SIZE = (32, 256, 256)


@pytest.mark.parametrize("n_in,n_out", [(40, 32), (124, 256), (148, 256), (300, 256), (7, 32), (512, 256)])
def test_index_tables_equal_torch_3d_resize(n_in, n_out):
    vol = torch.arange(n_in, dtype=torch.float32).reshape(1, 1, n_in, 1, 1).expand(1, 1, n_in, 2, 2)
    ref = F.interpolate(vol, size=(n_out, 2, 2), mode="nearest-exact")[0, 0, :, 0, 0].long().numpy()
    np.testing.assert_array_equal(nearest_exact_source(n_in, n_out), ref)


def _brute_force_box(box_ijk, shape_ijk, crop: Crop):
    """The official route: cuboid on the original grid -> transpose -> crop -> nearest-exact -> bbox."""
    cube = np.zeros(shape_ijk, np.float32)
    i0, j0, k0, i1, j1, k1 = box_ijk
    cube[i0 : i1 + 1, j0 : j1 + 1, k0 : k1 + 1] = 1
    cube = np.swapaxes(cube, 0, 2)[tuple(slice(a, b) for a, b in zip(crop.start, crop.stop))]
    small = F.interpolate(torch.from_numpy(np.ascontiguousarray(cube))[None, None], size=SIZE, mode="nearest-exact")
    return mask_box(small[0, 0].numpy() > 0)


@pytest.mark.parametrize(
    "box", [(29, 53, 21, 53, 87, 32), (0, 0, 0, 159, 159, 39), (5, 5, 0, 6, 6, 0), (150, 150, 38, 159, 159, 39)]
)
def test_box_closed_form_equals_brute_force(box):
    shape = (160, 160, 40)
    crop = Crop((0, 18, 6), (40, 142, 154))
    assert box_to_model(box, crop, SIZE) == _brute_force_box(box, shape, crop)


def test_box_outside_the_foreground_crop_becomes_the_empty_box():
    crop = Crop((0, 18, 6), (40, 142, 154))
    assert box_to_model((0, 0, 0, 3, 3, 3), crop, SIZE) == NO_BOX


def test_points_map_to_model_space():
    crop = Crop((0, 18, 6), (40, 142, 154))
    got = points_to_model([(110, 86, 25), (124, 69, 21), (41, 70, 26)], crop, SIZE)
    assert got == [(20, 141, 180), (17, 106, 204), (21, 108, 61)]  # golden p4


def test_single_window_box_comes_from_the_nearest_round_trip():
    # golden p6: crop 20x140x184, model box [16,71,39,26,143,82] -> window box [10,39,29,16,78,59]
    roi = ((0, 20), (0, 140), (0, 184))
    assert model_box_on_crop((16, 71, 39, 26, 143, 82), (20, 140, 184), SIZE, roi) == (10, 39, 29, 16, 78, 59)
    assert model_box_on_crop(NO_BOX, (20, 140, 184), SIZE, roi) == NO_BOX


def test_patchify_orders_patches_dhw_and_elements_pd_ph_pw():
    x = torch.arange(8 * 32 * 32, dtype=torch.float32).reshape(1, 1, 8, 32, 32)
    out = Patchify((4, 16, 16))(x)
    assert out.shape == (1, 2 * 2 * 2, 4 * 16 * 16)
    # patch n = (pd_idx, ph_idx, pw_idx) with w fastest; element e = (a, b, c) with c fastest
    n, (a, b, c) = 5, (1, 2, 3)
    pd, ph, pw = 1, 0, 1
    assert out[0, n, a * 256 + b * 16 + c] == x[0, 0, pd * 4 + a, ph * 16 + b, pw * 16 + c]


def test_foreground_normalisation_formula():
    rng = np.random.default_rng(0)
    ct = rng.normal(0, 300, (20, 20, 10)).astype(np.float32)
    out = foreground_normalise(ct)
    above = ct[ct > ct.mean()]
    lo, hi = np.percentile(above, 0.05), np.percentile(above, 99.95)
    np.testing.assert_allclose(out, (np.clip(ct, lo, hi) - above.mean()) / above.std(), rtol=1e-5, atol=1e-5)


def test_prepare_crops_to_the_foreground_and_transposes():
    ct = np.full((30, 20, 10), -1000, np.int16)
    ct[5:25, 4:16, 2:9] = 50
    ct[10, 10, 5] = 400
    ct[12, 8, 5] = 45  # the lowest foreground value sets the lower clip, so the rest of the body stays above it
    p = prepare(ct, (8, 32, 32))
    assert p.crop.start_ijk == (5, 4, 2) and p.crop.stop_ijk == (25, 16, 9)
    assert tuple(p.zoom_in.shape) == (7, 12, 20) and tuple(p.zoom_out.shape) == (8, 32, 32)
    assert float(p.zoom_in.max()) == 1.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(), "no prompt"),
        (dict(text="   "), "empty text"),
        (dict(points=[[1, 2, 3]], point_labels=[2]), "1 \\(positive\\) or 0"),
        (dict(points=[[1, 2]]), "needs 3 voxel indices"),
        (dict(points=[[1, 2, 99]]), "outside the volume"),
        (dict(points=[[-1, 2, 3]]), "outside the volume"),
        (dict(points=[[1.5, 2, 3]]), "whole voxel index"),
        (dict(points=[[float("nan"), 2, 3]]), "whole voxel index"),
        (dict(points=[["a", 2, 3]]), "must be a number"),
        (dict(points=[[1, 2, 3]], point_labels=[1, 0]), "1 points but 2 point labels"),
        (dict(box=[5, 5, 5, 1, 8, 8]), "minimum above its maximum"),
        (dict(box=[0, 0, 0, 10, 10, 10]), "outside the volume"),
        (dict(box=[0, 0, 0]), "needs 6 voxel indices"),
    ],
)
def test_bad_prompts_are_named(kwargs, message):
    with pytest.raises(PromptError, match=message):
        Prompt.make((10, 10, 10), **kwargs)


def test_labels_default_to_positive():
    assert Prompt.make((10, 10, 10), points=[[1, 2, 3]]).point_labels == (1,)


@pytest.mark.parametrize("n", [1, 2, 7, 2001])
def test_torch_percentile_is_numpys_linear_percentile(n):
    values = np.random.default_rng(n).normal(0, 100, n).astype(np.float32)
    for q in (0.05, 50.0, 99.95):
        assert float(percentile(torch.from_numpy(values), q)) == pytest.approx(np.percentile(values, q), rel=1e-6)


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<u2", "<f8"])
def test_device_preprocessing_equals_the_numpy_path(dtype):
    """The GPU path (torch statistics, the volume moved in its own dtype), run here on the CPU:
    the same crop, values equal to float noise."""
    rng = np.random.default_rng(1)
    ct = np.full((60, 50, 40), -1000, np.float64)
    ct[8:52, 6:44, 4:36] = rng.normal(40, 200, (44, 38, 32)).round()
    if dtype == "<u2":
        ct += 1024
    ct = ct.astype(dtype)
    ref, out = prepare(ct, (8, 32, 32)), prepare(ct, (8, 32, 32), device="cpu")
    assert out.crop == ref.crop and out.key == ref.key
    for a, b in ((out.zoom_in, ref.zoom_in), (out.zoom_out, ref.zoom_out)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    stats = foreground_normalise_torch(torch.from_numpy(ct.astype(np.float32)))
    np.testing.assert_allclose(stats.numpy(), foreground_normalise(ct), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(7, 12, 20), (40, 300, 301), (32, 256, 256)])
def test_zoom_out_gather_equals_nearest_exact_interpolation(shape):
    x = torch.rand(shape)
    ref = F.interpolate(x[None, None], size=(8, 32, 32), mode="nearest-exact")[0, 0]
    assert torch.equal(zoom_out_volume(x, (8, 32, 32)), ref)
