"""Fine-tune rounds that learn from the archive (real Orthanc with five CT series, real MONAI Label
server and training subprocess): labels saved through the server and a SEG another tool stored
straight into Orthanc are the round's data under their series UIDs, held-out and training images
never overlap, a SEG off its CT's grid and a segment SegVol has no name for are skipped with a log
line, the promoted version serves the next result and a rollback from the command line takes it
back; a study stored while the server runs is listed within a minute; new labels are counted with
QIDO alone."""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest
import requests
from phantom import make_phantom  # noqa: E402

from archive import PASSWORD, USER, Archive, dicomweb_server, foreign_seg, orthanc, save_liver
from conftest import ROOT, run_cli
from server import run_round

pytestmark = pytest.mark.dicomweb
LIVER = 1  # /info label index
LIVER_CODE = {"CodingSchemeDesignator": "SCT", "CodeValue": "10200004", "CodeMeaning": "Liver"}
MYSTERY = {"CodingSchemeDesignator": "99TEST", "CodeValue": "X1", "CodeMeaning": "Mystery"}
SHAPE = (96, 80, 20)


def _phantom(seed: int):
    image, label, affine = make_phantom(SHAPE, (3.0, 3.0, 6.0), seed=seed)
    return image, (label == 1).astype(np.uint8), affine


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("archive-rounds")
    studies = work / "studies"
    studies.mkdir()
    (studies / "lung1.nii.gz").write_bytes((ROOT / "sample-datastore" / "lung1.nii.gz").read_bytes())
    for seed in range(1, 5):
        image, _, affine = _phantom(seed)
        nib.save(nib.Nifti1Image(image, affine), str(studies / f"phantom{seed}.nii.gz"))
    conf = {
        "zoom_in": "false",
        "train_steps": "20",
        "train_lr": "3e-3",
        "promote_min_gain": "-1",  # every round is promoted: this test is about data and serving
        "promote_replay_margin": "1",
        "archive_refresh_seconds": "2",
    }
    with Archive(work / "orthanc", studies=studies) as archive, dicomweb_server(archive.url, work, **conf) as srv:
        yield archive, srv, work


def _save(srv, image: str, label: np.ndarray, client: str) -> dict:
    r = save_liver(srv.url, image, label, client)
    assert r.status_code == 200, r.text
    return r.json()


def _infer_version(srv, image: str) -> str:
    r = requests.post(
        f"{srv.url}/infer/segvol",
        params={"image": image, "output": "json"},
        files={"params": (None, json.dumps({"label_prompt": [LIVER]}))},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()["model_version"]


def test_a_round_learns_from_labels_in_the_archive_whoever_wrote_them(stack):
    archive, srv, work = stack
    series = archive.series
    saved = {}
    for seed in (1, 2, 3):  # annotators save through the server
        _, label, _ = _phantom(seed)
        saved[series[f"phantom{seed}"]] = _save(srv, series[f"phantom{seed}"], label, f"annotator-{seed}")
    # another tool stores its SEG straight into Orthanc: liver coded by SNOMED under another label
    _, label, _ = _phantom(4)
    two = label.copy()
    two[:4, :4, :2] = 2
    theirs = foreign_seg(archive.series_files("phantom4"), two, [("organ of interest", LIVER_CODE), ("blob", MYSTERY)])
    archive.store(theirs)
    # and a SEG of lung1 whose frames sit between the CT's slices
    off = np.zeros((512, 512, 48), np.uint8)
    off[200:260, 200:260, 20:24] = 1
    bad = foreign_seg(archive.series_files("lung1"), off, [("liver", LIVER_CODE)], shift_mm=2.5)
    archive.store(bad)

    status = run_round(srv)
    result = status["last_round"]
    assert status["round"]["state"] == "done" and result["version"] == "v0001", status
    meta = json.loads((work / "versions" / "v0001" / "meta.json").read_text())
    images = {x["image"] for x in meta["labels"]}
    assert images == {series[f"phantom{s}"] for s in (1, 2, 3, 4)}  # series UIDs; lung1's bad SEG left out
    train = {x["image"] for x in meta["labels"] if not x["held_out"]}
    held = {x["image"] for x in meta["labels"] if x["held_out"]}
    assert train and held and not train & held and meta["split"].startswith("held out")
    labels = {x["image"]: x["label"] for x in meta["labels"]}
    assert labels[series["phantom4"]] == str(theirs.SeriesInstanceUID)
    assert labels[series["phantom1"]] == saved[series["phantom1"]]["SeriesInstanceUID"]
    assert meta["categories"] == ["liver"] and meta["status"] == "promoted"
    log = srv.log.read_text()
    assert "(blob, code 99TEST X1 'Mystery') names no SegVol category" in log
    assert f"SEG {bad.SeriesInstanceUID} of image {series['lung1']} skipped" in log and "between the CT's voxels" in log

    # the promoted version serves the next result; a rollback from the command line takes it back
    assert _infer_version(srv, series["phantom1"]).endswith("+v0001")
    out = run_cli("versions", "rollback", "--dir", str(work / "versions"), check=True).stdout
    assert "base is active again (was v0001)" in out
    assert _infer_version(srv, series["phantom1"]) == srv.info["model_version"]


def test_a_study_stored_while_the_server_runs_is_listed_within_a_minute(stack, tmp_path):
    archive, srv, _ = stack
    before = requests.get(f"{srv.url}/datastore/?output=stats", timeout=30).json()["total"]
    image, _, affine = _phantom(9)
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "late.nii.gz"))
    t0 = time.time()
    orthanc.load_samples(archive.port, tmp_path / "work", USER, PASSWORD, studies=tmp_path)
    while time.time() - t0 < 60:
        if requests.get(f"{srv.url}/datastore/?output=stats", timeout=30).json()["total"] == before + 1:
            break
        time.sleep(0.5)
    seconds = time.time() - t0
    print(f"\na study stored while the server runs was listed after {seconds:.1f} s")
    assert seconds < 60


def test_new_labels_are_counted_with_qido_alone(stack, tmp_path):
    """The datastore, built here on the same archive, is asked through a client that records
    every call it makes to Orthanc."""
    from dicomweb_client.session_utils import create_session_from_user_pass
    from monailabel.datastore.dicom import DICOMwebClientX

    from lib.datastores import SegVolDICOMWebDatastore, wiring
    from lib.serving.host import ModelHost
    from lib.settings import AppSettings
    from lib.team.team import Team

    archive, _, _ = stack
    calls = []

    class Recording(DICOMwebClientX):
        def _http_get(self, url, *args, **kwargs):
            calls.append(url)
            return super()._http_get(url, *args, **kwargs)

    client = Recording(url=f"{archive.url}/dicom-web", session=create_session_from_user_pass(USER, PASSWORD))
    service = ModelHost(AppSettings.from_conf({"weights": "seeded"}, tmp_path / "model"))
    store = SegVolDICOMWebDatastore(
        **wiring(service, Team(0)), client=client, search_filter={"Modality": "CT"}, cache_path=str(tmp_path)
    )
    calls.clear()
    keys = store.label_keys()
    assert len(keys) == len(archive.segs_series())
    assert calls and all(url.rstrip("/").endswith("/series") for url in calls), calls  # QIDO only
