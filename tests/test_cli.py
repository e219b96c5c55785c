"""The CLI as a user runs it: outputs on the input grid, clear errors and never a traceback."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import phantom, run_cli


def test_several_texts_give_a_label_map_and_a_sidecar(tiny_weights, phantom_file, tmp_path):
    out = tmp_path / "labels.nii.gz"
    proc = run_cli(
        "segment",
        "--weights",
        str(tiny_weights),
        "--image",
        str(phantom_file),
        "--output",
        str(out),
        "--text",
        "liver",
        "hepar",
        "spleen",
        "--report",
        str(tmp_path / "r.json"),
        check=True,
    )
    assert "Traceback" not in proc.stderr
    img, ref = nib.load(str(out)), nib.load(str(phantom_file))
    assert img.shape == ref.shape and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, ref.affine)
    assert set(np.unique(np.asanyarray(img.dataobj))) <= {0, 1, 2, 3}
    assert json.loads((tmp_path / "labels.labels.json").read_text()) == {"liver": 1, "hepar": 2, "spleen": 3}
    report = json.loads((tmp_path / "r.json").read_text())
    assert [t["sent"] for t in report["texts"]] == ["liver", "liver", "spleen"]  # synonym -> trained name
    assert report["stats"]["encoder_windows"] >= 1


def test_exact_text_sends_the_text_as_typed(tiny_weights, phantom_file, tmp_path):
    args = ["segment", "--weights", str(tiny_weights), "--image", str(phantom_file), "--no-zoom-in"]
    args += ["--text", "hepar", "--report", str(tmp_path / "r.json")]
    run_cli(*args, "--output", str(tmp_path / "mapped.nii.gz"), check=True)
    run_cli(*args, "--output", str(tmp_path / "typed.nii.gz"), "--exact-text", check=True)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["texts"][0]["sent"] == "hepar" and report["texts"][0]["via"] == "as typed"
    assert report["targets"][0]["model_space"]["text"] == "hepar"  # what the model received
    mapped = np.asanyarray(nib.load(str(tmp_path / "mapped.nii.gz")).dataobj)
    typed = np.asanyarray(nib.load(str(tmp_path / "typed.nii.gz")).dataobj)
    assert not np.array_equal(mapped, typed)  # another text, another answer


def test_unknown_text_is_used_with_a_warning_naming_close_categories(tiny_weights, phantom_file, tmp_path):
    proc = run_cli(
        "segment",
        "--weights",
        str(tiny_weights),
        "--image",
        str(phantom_file),
        "--output",
        str(tmp_path / "m.nii.gz"),
        "--text",
        "livr",
        "--no-zoom-in",
        check=True,
    )
    assert "'livr' is not a SegVol training category" in proc.stderr and "liver" in proc.stderr


def test_nrrd_in_nrrd_out_keeps_the_grid(tiny_weights, tmp_path):
    import nrrd

    ct = phantom()
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([0.8, 0.8, 2.5]),
        "space origin": np.array([-10.0, 5.0, 30.0]),
    }
    nrrd.write(str(tmp_path / "ct.nrrd"), ct, header)
    run_cli(
        "segment",
        "--weights",
        str(tiny_weights),
        "--image",
        str(tmp_path / "ct.nrrd"),
        "--output",
        str(tmp_path / "m.nrrd"),
        "--box",
        "10",
        "10",
        "2",
        "30",
        "30",
        "9",
        "--logits",
        str(tmp_path / "l.nrrd"),
        check=True,
    )
    mask, h = nrrd.read(str(tmp_path / "m.nrrd"))
    assert mask.shape == ct.shape and mask.dtype == np.uint8
    np.testing.assert_allclose(h["space directions"], header["space directions"])
    np.testing.assert_allclose(h["space origin"], header["space origin"])
    logits, _ = nrrd.read(str(tmp_path / "l.nrrd"))
    assert logits.dtype == np.float32 and ((logits > 0) == (mask > 0)).mean() > 0.999


def _save(tmp_path, name, array):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


@pytest.mark.parametrize(
    "case,message",
    [
        ("no_prompt", "no prompt"),
        ("box_outside", "box corner \\[60, 45, 14\\] lies outside the volume of shape \\(48, 40, 12\\)"),
        ("point_outside", "point \\[48, 0, 0\\] lies outside"),
        ("image_2d", "expected a 3D volume, got an array of shape \\(48, 40\\)"),
        ("image_4d", "expected a 3D volume, got an array of shape \\(48, 40, 12, 2\\)"),
        ("image_nan", "the image has 1 NaN or infinite voxels"),
        ("empty_text", "empty text prompt"),
        ("constant", "constant"),
        ("missing_image", "no such file"),
        ("not_an_image", "unsupported file type"),
        ("bad_weights", "no such weights file"),
    ],
)
def test_bad_input_gets_a_clear_error_and_no_traceback(case, message, tiny_weights, phantom_file, tmp_path):
    image = phantom_file
    prompt = ["--text", "liver"]
    weights = str(tiny_weights)
    ct = phantom().astype(np.float32)
    if case == "no_prompt":
        prompt = []
    elif case == "box_outside":
        prompt = ["--box", "0", "0", "0", "60", "45", "14"]
    elif case == "point_outside":
        prompt = ["--point", "48", "0", "0"]
    elif case == "image_2d":
        image = _save(tmp_path, "2d.nii.gz", ct[:, :, 0])
    elif case == "image_4d":
        image = _save(tmp_path, "4d.nii.gz", np.stack([ct, ct], -1))
    elif case == "image_nan":
        ct[3, 3, 3] = np.nan
        image = _save(tmp_path, "nan.nii.gz", ct)
    elif case == "empty_text":
        prompt = ["--text", ""]
    elif case == "constant":
        image = _save(tmp_path, "flat.nii.gz", np.zeros((20, 20, 5), np.float32))
    elif case == "missing_image":
        image = tmp_path / "nope.nii.gz"
    elif case == "not_an_image":
        image = tmp_path / "notes.txt"
        image.write_text("hello")
    elif case == "bad_weights":
        weights = str(tmp_path / "missing.pth")
    out = tmp_path / "out.nii.gz"
    proc = run_cli("segment", "--weights", weights, "--image", str(image), "--output", str(out), *prompt)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    import re

    assert re.search(message, proc.stderr), proc.stderr
    assert not out.exists()


def test_categories_lists_and_searches():
    proc = run_cli("categories", "--search", "kidney", "--json", check=True)
    names = [c["name"] for c in json.loads(proc.stdout)]
    assert "right kidney" in names and "liver" not in names
    assert run_cli("categories", check=True).stdout.count("\n") == 223


def test_help_explains_prompts_and_weights():
    out = run_cli("segment", "--help", check=True).stdout
    assert "voxel indices (i, j, k)" in out and "SegVol_v1.pth" in out and "--no-zoom-in" in out


def test_bench_prints_its_table_and_the_paths_agree():
    out = run_cli(
        "bench", "--config", "segvol-tiny", "--shape", "96", "80", "24", "--categories", "3", "--faithful", check=True
    ).stdout
    for row in ("first text prompt", "further text prompt", "further click", "further box", "3 categories"):
        assert row in out
    diff = float(out.split("max |logit diff| ")[1].split(",")[0])
    dice = float(out.split("mask Dice ")[1].split()[0])
    assert diff <= 1e-3 and dice >= 0.999
