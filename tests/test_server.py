"""A real MONAI Label server with the segvol app, driven as Slicer and OHIF drive it.

The server runs the seeded tiny config (``--conf weights seeded --conf model_config
segvol-tiny``): the numbers are noise, but every request takes the whole real path
(client parameters -> prompts -> engine -> label map on the image grid -> response).
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from conftest import ROOT, phantom
from lib.settings import DEFAULT_AUTO_LABELS, DEFAULT_CATEGORIES
from segvol.io import LPS_RAS
from segvol.vocabulary import default_vocabulary
from server import Server

pytestmark = pytest.mark.server

OHIF_KEYS = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False}
LIVER, SPLEEN, RIGHT_KIDNEY = 1, 32, 33


def _oblique_affine() -> np.ndarray:
    a = np.deg2rad(10)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 0.8, 2.5])
    aff[:3, 3] = [-40.0, 12.5, -300.0]
    return aff


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    studies = tmp_path_factory.mktemp("studies")
    nib.save(nib.Nifti1Image(phantom((96, 80, 24)), _oblique_affine()), str(studies / "abdo.nii.gz"))
    shutil.copy(ROOT / "sample-datastore" / "lung1.nii.gz", studies / "lung1.nii.gz")
    with Server(studies, {"weights": "seeded", "model_config": "segvol-tiny"}, studies.parent / "server.log") as srv:
        srv.studies = studies
        yield srv


def _check_grid(path, image_path, allowed_values):
    """The result is uint8 on exactly the image's grid, with only the expected values."""
    ref = nib.load(str(image_path))
    data, header = nrrd.read(str(path))
    assert data.shape == ref.shape and data.dtype == np.uint8
    lps = LPS_RAS @ ref.affine
    np.testing.assert_allclose(header["space directions"], lps[:3, :3].T, atol=1e-6)
    np.testing.assert_allclose(header["space origin"], lps[:3, 3], atol=1e-6)
    assert header["space"] == "left-posterior-superior"
    assert set(np.unique(data)) <= {0, *allowed_values}
    return data


def _ohif(server, model, image, body, output="image"):
    """POST exactly as OHIF's monai-label panel does: multipart field 'params'."""
    return requests.post(
        f"{server.url}/infer/{model}",
        params={"image": image, "output": output},
        files={"params": (None, json.dumps(body))},
        timeout=300,
    )


def test_info_lists_the_tasks_and_the_configured_categories(server):
    info = server.info
    assert {k: m["type"] for k, m in info["models"].items()} == {
        "segvol": "vista3d",
        "segvol_segmentation": "segmentation",
        "segvol_deepgrow": "deepgrow",
    }
    vocabulary = default_vocabulary()
    for model in info["models"].values():  # the team's categories (--conf categories), not all 223, in order
        labels = model["labels"]
        assert list(labels) == list(DEFAULT_CATEGORIES)
        assert all(vocabulary.categories[v - 1].name == k for k, v in labels.items())  # vocabulary indices
    assert labels["liver"] == LIVER and labels["spleen"] == SPLEEN and "brain" not in labels
    assert info["labels"] == sorted(labels, key=labels.get)  # the app-level list, in index order
    assert info["models"]["segvol_segmentation"]["config"] == {"texts": "liver, spleen, right kidney, left kidney"}
    assert "UNTRAINED" in info["warning"] and "seeded" in info["model_version"]
    assert info["datastore"]["total"] == 2


def test_slicer_segmentation_with_the_text_option(server, tmp_path):
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    info = client.info()
    params = dict(info["models"]["segvol_segmentation"]["config"])  # Slicer sends every config key ...
    params.update(texts="liver, spleen", result_extension=".nrrd", result_dtype="uint8")  # ... as edited
    result_file, result = client.infer("segvol_segmentation", "abdo", params)
    data = _check_grid(result_file, server.studies / "abdo.nii.gz", {LIVER, SPLEEN})
    assert result["label_names"] == {"liver": LIVER, "spleen": SPLEEN}
    assert [p["text"] for p in result["prompts"]] == ["liver", "spleen"]
    assert result["model_version"] == info["model_version"] and "UNTRAINED" in result["warning"]
    assert set(result["timings"]) >= {"total", "decode"}
    for p in result["prompts"]:  # overlaps go to one label, so a label shows at most its own voxels
        assert 0 < int((data == p["value"]).sum()) <= p["voxels"]


def test_slicer_deepgrow_with_label_clicks_and_roi(server, tmp_path):
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    params = {
        "label": "right kidney",
        "foreground": [[60, 40, 12], [62, 44, 13]],
        "background": [[20, 30, 10]],
        "roi": [80, 30, 20, 60, 16, 5],
        "result_extension": ".nrrd",
        "result_dtype": "uint8",
    }
    result_file, result = client.infer("segvol_deepgrow", "abdo", params)
    _check_grid(result_file, server.studies / "abdo.nii.gz", {RIGHT_KIDNEY})
    assert result["label_names"] == {"right kidney": RIGHT_KIDNEY}
    (p,) = result["prompts"]
    assert p["text"] == "right kidney" and p["box"] == [30, 20, 5, 80, 60, 16]  # pairs sorted
    assert p["points"] == [[60, 40, 12], [62, 44, 13], [20, 30, 10]] and p["point_labels"] == [1, 1, 0]


def test_slicer_deepgrow_with_a_segment_name_outside_the_vocabulary(server, tmp_path):
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    result_file, result = client.infer("segvol_deepgrow", "abdo", {"label": "Segment_1", "foreground": [[60, 40, 12]]})
    # a free value, never a category's (1 is liver's)
    assert result["label_names"] == {"Segment_1": 224} and result["prompts"][0]["text"] is None
    _, clicks = client.infer("segvol_deepgrow", "abdo", {"foreground": [[60, 40, 12]]})
    assert list(clicks["label_names"].values()) == [224]


def test_ohif_class_prompts(server, tmp_path):
    r = _ohif(server, "segvol", "abdo", {"label_prompt": [SPLEEN, LIVER], **OHIF_KEYS})
    assert r.status_code == 200, r.text
    (tmp_path / "r.nrrd").write_bytes(r.content)
    data = _check_grid(tmp_path / "r.nrrd", server.studies / "abdo.nii.gz", {LIVER, SPLEEN})
    assert (data > 0).any()
    meta = _ohif(server, "segvol", "abdo", {"label_prompt": [SPLEEN, LIVER], **OHIF_KEYS}, output="json").json()
    assert meta["label_names"] == {"spleen": SPLEEN, "liver": LIVER}


def test_ohif_point_prompt(server):
    body = {
        "points": [[60, 40, 12], [62, 44, 13], [20, 30, 10]],
        "point_labels": [1, 1, 0],
        "label_prompt": [LIVER],
        **OHIF_KEYS,
    }
    meta = _ohif(server, "segvol", "abdo", body, output="json").json()
    (p,) = meta["prompts"]
    assert (p["text"], p["value"], p["point_labels"]) == ("liver", LIVER, [1, 1, 0])
    assert p["model_space"]["points_dhw"] is not None


def test_ohif_auto_segmentation_runs_the_configured_set(server):
    excluded = {"kidney", "lung", "bone", "lung tumor", "uterus", "postcava"}
    labels = server.info["models"]["segvol"]["labels"]
    every = sorted((v for k, v in labels.items() if k not in excluded), key=str)
    meta = _ohif(server, "segvol", "abdo", {"label_prompt": every, **OHIF_KEYS}, output="json").json()
    names = [p["name"] for p in meta["prompts"]]
    assert names == list(DEFAULT_AUTO_LABELS)
    assert all(meta["label_names"][n] == labels[n] for n in names)


def test_rest_text_box_and_points_together(server):
    body = {
        "texts": ["hepar", "spleen"],
        "box": [30, 20, 4, 70, 60, 18],
        "points": [[50, 40, 12]],
        "point_labels": [1],
        "zoom_in": False,
    }
    meta = _ohif(server, "segvol_segmentation", "abdo", body, output="json").json()
    assert meta["label_names"] == {"hepar": LIVER, "spleen": SPLEEN}
    for p in meta["prompts"]:
        assert p["box"] == [30, 20, 4, 70, 60, 18] and p["points"] == [[50, 40, 12]]
        assert p["model_space"]["box_dhw"] is not None and p["zoom_in_windows"] == 0
    assert meta["prompts"][0]["text"] == "liver"  # the synonym went to the model as the trained name
    typed = _ohif(server, "segvol_segmentation", "abdo", dict(body, exact_text=True), output="json").json()
    assert typed["prompts"][0]["text"] == "hepar" and typed["label_names"] == meta["label_names"]
    assert _ohif(server, "segvol_segmentation", "abdo", dict(body, exact_text="yes")).status_code == 400


def test_the_sample_ct_segments_on_its_own_grid(server, tmp_path):
    r = _ohif(
        server,
        "segvol",
        "lung1",
        {"label_prompt": [223], "zoom_in": False, **OHIF_KEYS},  # not in /info's labels: still served
    )
    assert r.status_code == 200, r.text
    (tmp_path / "r.nrrd").write_bytes(r.content)
    _check_grid(tmp_path / "r.nrrd", server.studies / "lung1.nii.gz", {223})


BAD = [
    ("nomodel", "abdo", {"texts": "liver"}, 404, "no model 'nomodel'"),
    ("segvol", "nothere", {"label_prompt": [1]}, 404, "no image 'nothere'"),
    ("segvol", "../../etc/passwd", {"label_prompt": [1]}, 404, "no image"),
    ("segvol", "/etc/passwd", {"label_prompt": [1]}, 404, "no image"),
    ("segvol", "abdo", {"label_prompt": [999]}, 400, "label_prompt index 999 is not a SegVol label"),
    ("segvol", "abdo", {"label_prompt": ["liver"]}, 400, "label_prompt index 'liver'"),
    ("segvol", "abdo", {"points": [[1, 2, 999]], "point_labels": [1], "label_prompt": [1]}, 400, "outside the volume"),
    ("segvol", "abdo", {"points": [[-5, 2, 3]], "label_prompt": [1]}, 400, "outside the volume"),
    ("segvol", "abdo", {"points": [[1, 2, 3]], "point_labels": [1], "label_prompt": [1, 2]}, 400, "one class"),
    ("segvol_segmentation", "abdo", {"box": [50, 5, 5, 10, 8, 8]}, 400, "minimum above its maximum"),
    ("segvol_segmentation", "abdo", {"texts": ""}, 400, "no prompt"),
    ("segvol_segmentation", "abdo", {"texts": ["liver", "  "]}, 400, "empty name"),
    ("segvol", "abdo", {}, 400, "no prompt"),
    ("segvol", "abdo", {"label_prompt": 5}, 400, "label_prompt must be a list"),
    ("segvol", "abdo", {"label_prompt": [1], "result_extension": ".exe"}, 400, "result_extension"),
    ("segvol", "abdo", {"label_prompt": [1], "result_dtype": "float64"}, 400, "result_dtype"),
    ("segvol_deepgrow", "abdo", {"foreground": [[1, 2]]}, 400, "needs 3 voxel indices"),
    ("segvol_deepgrow", "abdo", {"foreground": [[1, 2, 3]], "roi": [500, 600, 0, 10, 0, 5]}, 400, "roi"),
]


@pytest.mark.parametrize("model,image,body,status,message", BAD)
def test_bad_requests_get_4xx_with_a_message(server, model, image, body, status, message):
    r = _ohif(server, model, image, body, output="json")
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_malformed_json_is_a_400_and_the_server_keeps_serving(server):
    r = requests.post(
        f"{server.url}/infer/segvol",
        params={"image": "abdo", "output": "json"},
        files={"params": (None, "{not json")},
        timeout=60,
    )
    assert r.status_code == 400 and "params is not valid JSON" in r.json()["detail"]
    ok = _ohif(server, "segvol", "abdo", {"label_prompt": [LIVER], "zoom_in": False}, output="json")
    assert ok.status_code == 200 and ok.json()["label_names"] == {"liver": LIVER}


def test_a_second_prompt_on_the_same_image_reuses_the_encodings(server):
    body = {"label_prompt": [LIVER], "zoom_in": False}
    _ohif(server, "segvol", "abdo", body, output="json")
    again = _ohif(server, "segvol", "abdo", {"label_prompt": [SPLEEN], "zoom_in": False}, output="json").json()
    assert "encode" not in again["timings"] and "preprocess" not in again["timings"]


def test_without_weights_offline_the_server_says_what_to_put_where(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    nib.save(nib.Nifti1Image(phantom(), np.eye(4)), str(studies / "ct.nii.gz"))
    with Server(studies, {}, tmp_path / "server.log") as srv:
        assert "put these files" in srv.info["error"] and "pytorch_model.bin" in srv.info["error"]
        assert "BAAI-SegVol" in srv.info["error"] and len(srv.info["models"]) == 3
        assert "SegVol is NOT available" in srv.log.read_text()
        r = _ohif(srv, "segvol", "ct", {"label_prompt": [LIVER]}, output="json")
        assert r.status_code == 503 and "put these files" in r.json()["detail"]


def test_a_checkpoint_path_is_served(tiny_weights, tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    nib.save(nib.Nifti1Image(phantom(), np.eye(4)), str(studies / "ct.nii.gz"))
    with Server(studies, {"weights": str(tiny_weights / "pytorch_model.bin")}, tmp_path / "server.log") as srv:
        assert srv.info["model_version"].endswith("pytorch_model.bin") and "warning" not in srv.info
        r = _ohif(srv, "segvol", "ct", {"label_prompt": [LIVER], "zoom_in": False}, output="json")
        assert r.status_code == 200 and "warning" not in r.json()


def test_an_image_with_nans_is_a_400(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    ct = phantom().astype(np.float32)
    ct[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(studies / "nan.nii.gz"))
    with Server(studies, {"weights": "seeded", "model_config": "segvol-tiny"}, tmp_path / "server.log") as srv:
        r = _ohif(srv, "segvol", "nan", {"label_prompt": [LIVER]}, output="json")
        assert r.status_code == 400 and "NaN" in r.json()["detail"]
