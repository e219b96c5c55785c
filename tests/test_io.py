"""Reading a DICOM series folder: the same voxels and grid as the NIfTI it was made from."""

from __future__ import annotations

import importlib.util
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT, SHARED, phantom, run_cli
from segvol.io import ImageReadError, read_volume


def _write_series():
    spec = importlib.util.spec_from_file_location("dicom_series", ROOT / "scripts" / "dicom_series.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_series


@pytest.fixture
def oblique_series(tmp_path):
    """A phantom on an oblique, anisotropic grid, as a NIfTI and as the DICOM series made from it."""
    a = np.deg2rad(12)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag(
        [0.7, 0.9, 2.5]
    )
    affine[:3, 3] = [-30.0, 12.0, -200.0]
    nifti = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(phantom(), affine), str(nifti))
    _write_series()(nifti, tmp_path / "series", "phantom")
    return nifti, tmp_path / "series"


@pytest.mark.parametrize("name", ["lung1", "cranium"])
def test_shared_dicom_series_read_as_their_nifti(name):
    series, nifti = read_volume(SHARED / "data" / "dicom" / name), read_volume(SHARED / "data" / f"{name}_ct.nii.gz")
    assert series.kind == "dicom" and series.array.dtype == np.int16
    np.testing.assert_array_equal(series.array, np.asarray(nifti.array))
    np.testing.assert_allclose(series.affine, nifti.affine, atol=1e-4)


def test_slice_order_comes_from_positions_not_file_names(oblique_series, tmp_path):
    nifti, folder = oblique_series
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    files = sorted(folder.iterdir())
    for n, f in enumerate(reversed(files)):
        shutil.copy(f, shuffled / f"{n:03d}.dcm")
    (shuffled / "notes.txt").write_text("not DICOM")
    got, ref = read_volume(shuffled), read_volume(nifti)
    np.testing.assert_array_equal(got.array, np.asarray(ref.array))
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-4)


def test_cli_segments_a_series_folder_onto_its_grid(oblique_series, tiny_weights, tmp_path):
    nifti, folder = oblique_series
    run_cli(
        "segment", "--weights", str(tiny_weights), "--image", str(folder), "--output", str(tmp_path / "m.nii.gz"),
        "--text", "liver", check=True,
    )  # fmt: skip
    out = nib.load(tmp_path / "m.nii.gz")
    assert out.shape == phantom().shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, nib.load(nifti).affine, atol=1e-4)


def test_bad_series_folders_are_named_errors(oblique_series, tmp_path):
    _, folder = oblique_series
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ImageReadError, match="no DICOM image slices"):
        read_volume(empty)
    gap = tmp_path / "gap"
    shutil.copytree(folder, gap)
    sorted(gap.iterdir())[3].unlink()
    with pytest.raises(ImageReadError, match="not evenly spaced"):
        read_volume(gap)
    proc = run_cli("segment", "--image", str(gap), "--output", str(tmp_path / "m.nii.gz"), "--text", "liver")
    assert proc.returncode != 0 and "not evenly spaced" in proc.stderr and "Traceback" not in proc.stderr
