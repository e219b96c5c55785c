"""Parity with the official SegVol pipeline (shared/reference/golden), run through the CLI.

Tolerances are those the golden README justifies: masks may differ only where the
golden logit is within float noise of zero (Dice >= 0.999); final logits within max abs
1e-3 where the golden is not NaN; crop, ROI, windows and model-space prompts exactly.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import GOLDEN, run_cli

CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "meta.json").is_file()) if GOLDEN.is_dir() else []
pytestmark = pytest.mark.golden


def _cli_args(case_dir, out_dir, zoom_in: bool) -> list[str]:
    user = json.loads((case_dir / "prompts.json").read_text())["user"]
    args = [
        "segment",
        "--image",
        str(case_dir / "image.nii.gz"),
        "--output",
        str(out_dir / "mask.nii.gz"),
        "--logits",
        str(out_dir / "logits.nii.gz"),
        "--report",
        str(out_dir / "report.json"),
        "--device",
        os.environ.get("SEGVOL_TEST_DEVICE", "cpu"),  # scripts/gpu_check.sh runs the cases on CUDA
    ]
    if user["text"]:
        args += ["--text", user["text"]]
    if user["box_ijk"]:
        args += ["--box", *map(str, user["box_ijk"])]
    for p, lab in zip(user["points_ijk"] or [], user["point_labels"] or []):
        args += ["--point" if lab == 1 else "--negative-point", *map(str, p)]
    if not zoom_in:
        args.append("--no-zoom-in")
    return args


@pytest.mark.parametrize("case", CASES)
def test_golden_case_through_cli(case, seeded_dir, tmp_path):
    d = GOLDEN / case
    meta = json.loads((d / "meta.json").read_text())
    prompts = json.loads((d / "prompts.json").read_text())
    zoom_in = meta["zoom_in"]["enabled"] if "zoom_in" in meta else False
    run_cli("--verbose", *_cli_args(d, tmp_path, zoom_in), "--weights", str(seeded_dir), check=True)

    report = json.loads((tmp_path / "report.json").read_text())
    (target,) = report["targets"]
    assert target["crop"]["start_dhw"] == meta["crop"]["start_dhw"]
    assert target["crop"]["stop_dhw"] == meta["crop"]["stop_dhw"]
    assert target["crop"]["start_ijk"] == meta["crop"]["start_ijk"]
    ms, ref_ms = target["model_space"], prompts["model_space"]
    assert ms.get("box_dhw") == ref_ms.get("box_dhw")
    assert ms.get("points_dhw") == ref_ms.get("points_dhw")
    if ref_ms.get("text_input"):
        assert ref_ms["text_template"].format(ms["text"]) == ref_ms["text_input"]
    calls = meta["model_calls"]
    if zoom_in:
        zi, ref = target["zoom_in"], meta["zoom_in"]
        assert zi["roi_slice_dhw_in_crop"] == ref["roi"]["slice_dhw_in_crop"]
        assert [w["slice_dhw_in_padded_roi"] for w in zi["windows"]] == [
            w["slice_dhw_in_padded_roi"] for w in ref["windows"]
        ]
        fed = [[int(v) for v in c["boxes"][0]] if c["boxes"] else None for c in calls[1:]]
        assert [w["box_fed_dhw"] for w in zi["windows"]] == fed
    else:
        assert target["zoom_in"] is None and len(calls) == 1

    img = nib.load(str(d / "image.nii.gz"))
    mask_img = nib.load(str(tmp_path / "mask.nii.gz"))
    assert mask_img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask_img.affine, img.affine)
    mask = np.asanyarray(mask_img.dataobj)
    ref_mask = np.asanyarray(nib.load(str(d / "final_mask.nii.gz")).dataobj)
    dice = 2 * np.logical_and(mask, ref_mask).sum() / (mask.sum() + ref_mask.sum())
    assert dice >= 0.999, dice
    ref_logits = np.load(d / "final_logits.npz")["logits"]
    logits = np.asanyarray(nib.load(str(tmp_path / "logits.nii.gz")).dataobj)
    seen = ~np.isnan(ref_logits)
    assert np.all(logits[~seen] == -1000)
    assert np.abs(logits[seen] - ref_logits[seen]).max() <= 1e-3
    # mask voxels may differ only where the golden logit is within float noise of zero
    differ = mask != ref_mask
    assert np.all(np.abs(np.nan_to_num(ref_logits[differ], nan=0.0)) < 1e-3)


@pytest.fixture(scope="module")
def seeded_predictor(seeded_dir):
    from segvol.engine import SegVolPredictor
    from segvol.weights import load_segvol

    return SegVolPredictor(load_segvol(seeded_dir), "cpu")


@pytest.mark.parametrize("case", [c for c in CASES if c in ("p1_text", "p4_points_zoomout")])
def test_golden_intermediates(case, seeded_predictor):
    """Low-resolution zoom-out logits, token ids and the text embedding, compared tightly."""
    from segvol.prompts import Prompt, box_to_model, points_to_model

    d = GOLDEN / case
    user = json.loads((d / "prompts.json").read_text())["user"]
    inter = np.load(d / "intermediates.npz")
    arr = np.asanyarray(nib.load(str(d / "image.nii.gz")).dataobj)
    p = seeded_predictor
    p.set_image(arr)
    prompt = Prompt.make(arr.shape, user["text"], user["points_ijk"], user["point_labels"], user["box_ijk"])
    text_emb = None
    if prompt.text:
        text_emb, ids = p.text_embedding(prompt.text)
        assert ids == inter["token_ids"][0].tolist()
        assert np.abs(text_emb[0].numpy() - inter["text_embedding"]).max() <= 1e-4
    crop = p.image.crop
    box = torch.tensor([box_to_model(prompt.box, crop, p.size)], dtype=torch.float32) if prompt.box else None
    pts = None
    if prompt.points:
        pts = (
            torch.tensor([points_to_model(prompt.points, crop, p.size)], dtype=torch.float32),
            torch.tensor([prompt.point_labels], dtype=torch.float32),
        )
    with torch.no_grad():
        low = p.model.decode(p.zoom_out_embedding(), text_emb, box, pts, upsample=False)[0, 0].numpy()
    assert np.abs(low - inter["zoomout_low_res_logits"]).max() <= 1e-3
