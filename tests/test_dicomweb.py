"""Orthanc as the DICOMweb archive: a Slicer session against it, SEG back to the archive,
basic auth, and the archive going away mid-session. Real Orthanc (Debian package), real
MONAI Label server process, MONAILabelClient as 3D Slicer uses it."""

from __future__ import annotations

import json
import threading
import time

import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from synthetic_series import ct_series

from archive import PASSWORD, USER, Archive, dciodvfy_errors, dicomweb_server, foreign_seg, save_liver
from conftest import ROOT
from lib.archive.seg import short_version

pytestmark = pytest.mark.dicomweb
RIGHT_LUNG = 84
LIVER = 1
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LUNG1_AFFINE = nib.load(str(ROOT / "sample-datastore" / "lung1.nii.gz")).affine  # labels go on the image's grid


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    with Archive(tmp_path_factory.mktemp("orthanc")) as a:
        yield a


@pytest.fixture(scope="module")
def server(archive, tmp_path_factory):
    # the archive listed again every 2 s: a test can outlast the list while the archive is down
    with dicomweb_server(
        archive.url, tmp_path_factory.mktemp("monailabel"), zoom_in="false", archive_refresh_seconds="2"
    ) as srv:
        yield srv


def test_orthanc_holds_the_sample_series_behind_basic_auth(archive):
    assert requests.get(f"{archive.url}/dicom-web/studies", timeout=10).status_code == 401
    uid = archive.series["lung1"]
    series = archive.get("/dicom-web/series", params={"Modality": "CT"}).json()
    assert uid in [s["0020000E"]["Value"][0] for s in series]  # (another test stores a series of its own)


def test_a_slicer_session_ends_with_a_seg_in_the_archive(tmp_path):
    """On an archive of its own: the next sample must be the unlabelled sample CT."""
    with (
        Archive(tmp_path / "orthanc") as archive,
        dicomweb_server(archive.url, tmp_path, zoom_in="false") as server,
    ):
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
        info = client.info()
        assert info["datastore"]["total"] == 1 and set(info["models"]) >= {"segvol_deepgrow", "segvol_segmentation"}
        sample = client.next_sample("random", {})
        image_id = sample["id"]
        assert image_id == archive.series["lung1"]

        result_file, result = client.infer(
            "segvol_deepgrow",
            image_id,
            {
                "label": "right lung",
                "foreground": [[180, 260, 24]],
                "background": [[380, 260, 24]],
                "roi": [250, 100, 150, 350, 40, 10],
                "result_extension": ".nrrd",
                "result_dtype": "uint8",
            },
        )
        assert result["label_names"] == {"right lung": RIGHT_LUNG}
        assert result["prompts"][0]["box"] == [100, 150, 10, 250, 350, 40]
        seg_file, seg_result = client.infer("segvol_segmentation", image_id, {"texts": "left lung"})
        assert seg_result["label_names"] == {"left lung": 62}

        label, _ = nrrd.read(result_file)
        assert label.shape == (512, 512, 48)
        edited = (label == RIGHT_LUNG).astype(np.uint8)  # Slicer exports segment 1 ...
        edited[:, :, 40:] = 0  # ... after the annotator erased the top slices
        nib.save(nib.Nifti1Image(edited, LUNG1_AFFINE), str(tmp_path / "label.nii.gz"))
        saved = client.save_label(
            image_id,
            str(tmp_path / "label.nii.gz"),
            tag="final",
            params={"label_info": [{"name": "right lung", "idx": 1}]},
        )
        assert saved["label"] == image_id

        (seg,) = archive.segs()
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == image_id
        (segment,) = seg.SegmentSequence
        assert segment.SegmentLabel == "right lung" and segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
        assert segment.SegmentAlgorithmName == "SegVol"
        assert seg.ContentDescription == f"SegVol {server.info['model_version']}"
        # the series list tells versions apart: annotator, time, short model version
        assert seg.SeriesDescription.startswith("anonymous 20")
        assert seg.SeriesDescription.endswith(f" SegVol {short_version(server.info['model_version'])}")
        code = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("39607008", "SCT", "Lung")
        # the laterality modifier inside the type code item, where the standard puts it
        assert code.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Right"
        assert "SegmentedPropertyTypeModifierCodeSequence" not in segment
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("SegVol", server.info["model_version"][:64])
        assert str(seg.ContentCreatorName) == "anonymous^"  # MONAILabelClient sent no client_id
        assert int(seg.NumberOfFrames) == 48  # every slice, empty ones included
        assert dciodvfy_errors(seg) == []  # the standard's validator accepts it

        # read back onto the image grid: the same voxels, in the app's values
        from lib.archive.seg import read_seg
        from segvol.vocabulary import default_vocabulary

        seg.save_as(str(tmp_path / "seg.dcm"))
        reference = sitk.ReadImage(str(ROOT / "sample-datastore" / "lung1.nii.gz"))
        back, names = read_seg(tmp_path / "seg.dcm", reference, default_vocabulary())
        assert names == {RIGHT_LUNG: "right lung"}
        np.testing.assert_array_equal(back, edited * RIGHT_LUNG)

        stats = requests.get(f"{server.url}/datastore/?output=stats", timeout=30).json()
        assert stats["completed"] == 1  # the datastore counts the image as labeled
        assert client.info()["datastore"]["completed"] == 1


def test_an_unedited_result_is_stored_as_automatic(server, archive, tmp_path):
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    image_id = archive.series["lung1"]
    result_file, _ = client.infer("segvol", image_id, {"label_prompt": [62]})
    label, _ = nrrd.read(result_file)
    nib.save(nib.Nifti1Image(label, LUNG1_AFFINE), str(tmp_path / "label.nii.gz"))
    client.save_label(image_id, str(tmp_path / "label.nii.gz"), tag="final")
    (segment,) = archive.segs()[-1].SegmentSequence
    assert (segment.SegmentLabel, segment.SegmentAlgorithmType) == ("left lung", "AUTOMATIC")


def test_what_a_save_records_holds_across_a_restart_and_a_second_process(archive, tmp_path):
    """Fresh servers on one datastore cache: the served result is recorded beside the datastore,
    so a restarted server and a second process both type the saves by it."""
    image = archive.series["lung1"]
    with dicomweb_server(archive.url, tmp_path, zoom_in="false") as first:
        client = MONAILabelClient(first.url, tmpdir=str(tmp_path), client_id="ada")
        result_file, result = client.infer("segvol", image, {"label_prompt": [62]})  # left lung
    served, _ = nrrd.read(result_file)
    assert result["client_id"] == "ada" and (served == 62).any()

    def save(srv, label, names, who):
        nib.save(nib.Nifti1Image(label, LUNG1_AFFINE), str(tmp_path / "label.nii.gz"))
        info = {"label_info": [{"name": n} for n in names]}  # the client adds its client_id
        r = MONAILabelClient(srv.url, tmpdir=str(tmp_path), client_id=who).save_label(
            image, str(tmp_path / "label.nii.gz"), tag="final", params=info
        )
        return {s["name"]: s for s in r["segments"]}, r["SeriesInstanceUID"]

    with (
        dicomweb_server(archive.url, tmp_path, "restarted.log", zoom_in="false") as restarted,
        dicomweb_server(archive.url, tmp_path, "second.log", zoom_in="false") as second,
    ):
        segments, uid = save(restarted, served, ["left lung"], "ada")
        assert segments["left lung"]["type"] == "AUTOMATIC"
        assert segments["left lung"]["model_version"] == result["model_version"]
        edited = served.copy()
        background = np.argwhere(served == 0)
        edited[tuple(background[:10].T)] = 62
        edited[tuple(np.argwhere(served == 62)[:4].T)] = 0
        edited[tuple(background[10:19].T)] = 84  # right lung: never served on this image
        segments, uid = save(second, edited, ["left lung", "right lung"], "grace")
        left = segments["left lung"]
        assert (left["type"], left["added"], left["removed"]) == ("SEMIAUTOMATIC", 10, 4)
        assert segments["right lung"]["type"] == "MANUAL"
        (seg,) = [d for d in archive.segs(image) if d.SeriesInstanceUID == uid]
        kinds = {s.SegmentLabel: s.SegmentAlgorithmType for s in seg.SegmentSequence}
        assert kinds == {"left lung": "SEMIAUTOMATIC", "right lung": "MANUAL"}
        assert str(seg.ContentCreatorName) == "grace^" and dciodvfy_errors(seg) == []


def test_bad_uploads_are_refused_and_nothing_is_stored(server, archive, tmp_path):
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    image_id = archive.series["lung1"]
    before = len(archive.segs())
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), str(tmp_path / "small.nii.gz"))
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    cases = [
        (image_id, "small.nii.gz", "final", "differs from the image shape"),
        (image_id, "junk.nii.gz", "final", "not a readable volume"),
        (image_id, "small.nii.gz", "../../x", "not allowed"),
        ("1.2.3.4", "small.nii.gz", "final", "no image"),
    ]
    for image, name, tag, message in cases:
        with pytest.raises(MONAILabelClientException) as e:
            client.save_label(image, str(tmp_path / name), tag=tag)
        assert message in str(e.value)
    assert len(archive.segs()) == before


def test_a_seg_from_another_tool_is_listed_and_opens_on_the_image_grid(server, archive, tmp_path):
    """A SEG written by another tool (here pydicom-seg with in-plane cropping and empty slices
    dropped, as dcmqi writes them), stored with STOW-RS: the history lists it and its voxels come
    back on the CT's grid, a segment naming no SegVol category under a free value."""
    image_id = archive.series["lung1"]
    label = np.zeros((512, 512, 48), np.uint8)  # (i, j, k)
    label[300:340, 200:260, 10:14] = 1  # spleen
    label[100:120, 100:110, 30:31] = 2  # something SegVol has no name for
    spleen_code = {"CodingSchemeDesignator": "SCT", "CodeValue": "78961009", "CodeMeaning": "Spleen"}
    other = {"CodingSchemeDesignator": "99TEST", "CodeValue": "X1", "CodeMeaning": "Mystery"}
    dcm = foreign_seg(archive.series_files("lung1"), label, [("spleen", spleen_code), ("mystery blob", other)])
    assert int(dcm.NumberOfFrames) == 5 and int(dcm.Rows) < 512  # cropped, empty slices dropped
    archive.store(dcm)

    def listed() -> list[dict]:  # the server lists the archive's SEGs again in the background
        history = requests.get(f"{server.url}/segvol/labels", params={"image": image_id}, timeout=60).json()
        return [h for h in history if h["seg_series"] == str(dcm.SeriesInstanceUID)]

    deadline = time.time() + 30
    while not listed() and time.time() < deadline:
        time.sleep(0.3)
    (theirs,) = listed()
    assert theirs["creator"] == "Other^Tool" and "client" not in theirs  # not saved through this server
    assert theirs["segments"] == [{"name": "spleen", "type": "MANUAL"}, {"name": "mystery blob", "type": "MANUAL"}]
    r = requests.get(
        f"{server.url}/segvol/labels/voxels", params={"image": image_id, "seg": str(dcm.SeriesInstanceUID)}, timeout=60
    )
    assert r.status_code == 200, r.text
    from segvol.vocabulary import default_vocabulary

    spleen = default_vocabulary().resolve("spleen").category.index
    assert json.loads(r.headers["X-SegVol-Labels"]) == {str(spleen): "spleen", "224": "mystery blob"}
    got = np.frombuffer(r.content, np.uint8).reshape((512, 512, 48), order="F")
    expected = np.where(label == 1, spleen, np.where(label == 2, 224, 0))
    np.testing.assert_array_equal(got, expected)
    r = requests.get(f"{server.url}/segvol/labels/voxels", params={"image": image_id, "seg": "../x"}, timeout=60)
    assert r.status_code == 400


def test_the_archive_going_away_loses_no_label(server, archive, tmp_path):
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    image_id = archive.series["lung1"]
    before = len(archive.segs())
    label = np.zeros((512, 512, 48), np.uint8)
    label[200:260, 200:260, 20:25] = 1
    nib.save(nib.Nifti1Image(label, LUNG1_AFFINE), str(tmp_path / "a.nii.gz"))
    client.infer("segvol", image_id, {"label_prompt": [62]})  # the annotator has the image open
    archive.stop()
    try:
        time.sleep(2.5)  # down for longer than the server's list of series lasts (archive_refresh_seconds 2)
        health: list[float] = []
        saving = threading.Event()
        poller = threading.Thread(target=_poll_health, args=(server.url, saving, health))
        saving.set()
        poller.start()
        try:
            with pytest.raises(MONAILabelClientException) as e:
                client.save_label(
                    image_id,
                    str(tmp_path / "a.nii.gz"),
                    tag="final",
                    params={"label_info": [{"name": "trachea", "idx": 1}]},
                )
        finally:
            saving.clear()
            poller.join(30)
        assert "Status: 503" in str(e.value) and "kept in" in str(e.value)
        # the save ran off the event loop: a load balancer's health check is answered throughout
        assert len(health) >= 3 and max(health) < 0.2, health
        # annotation goes on meanwhile: the image is in the server's cache
        _, result = client.infer("segvol", image_id, {"label_prompt": [62]})
        assert result["label_names"] == {"left lung": 62}
    finally:
        archive.start()
    label[300:320, 300:320, 10:12] = 2
    nib.save(nib.Nifti1Image(label, LUNG1_AFFINE), str(tmp_path / "b.nii.gz"))
    client.save_label(
        image_id,
        str(tmp_path / "b.nii.gz"),
        tag="final",
        params={"label_info": [{"name": "trachea", "idx": 1}, {"name": "esophagus", "idx": 2}]},
    )
    segs = archive.segs()
    assert len(segs) == before + 2  # the kept SEG went first, then the new one
    assert [dciodvfy_errors(d) for d in segs[-2:]] == [[], []]
    labels = [sorted(s.SegmentLabel for s in d.SegmentSequence) for d in segs[-2:]]
    assert sorted(labels) == [["esophagus", "trachea"], ["trachea"]]


def _poll_health(url: str, running: threading.Event, seconds: list[float]) -> None:
    while running.is_set():
        t0 = time.perf_counter()
        assert requests.get(f"{url}/segvol/health", timeout=10).status_code == 200
        seconds.append(time.perf_counter() - t0)
        time.sleep(0.05)


def test_ohif_reads_the_archive_through_the_proxy_and_only_reads(server, archive):
    series = archive.series["lung1"]
    study = archive.study_of(series)
    r = requests.get(f"{server.url}/proxy/dicom/qido/studies", timeout=60)
    assert r.status_code == 200 and study in r.text, r.text[:300]
    r = requests.get(f"{server.url}/proxy/dicom/wado/studies/{study}/series/{series}/metadata", timeout=60)
    assert r.status_code == 200 and len(r.json()) == 48 and "json" in r.headers["content-type"]
    for method, path in [("post", "stow/studies"), ("get", "studies/../../tools/find"), ("get", "system")]:
        r = requests.request(method, f"{server.url}/proxy/dicom/{path}", timeout=60)
        assert r.status_code in (400, 404) and "detail" in r.json(), (path, r.text)


def test_the_final_label_reads_back_and_an_unknown_seg_is_404(server, archive):
    image = archive.series["lung1"]
    label = np.zeros((512, 512, 48), np.uint8)
    label[100:140, 120:170, 5:9] = 1
    r = save_liver(server.url, image, label, "ada")
    assert r.status_code == 200, r.text
    r = requests.get(f"{server.url}/segvol/labels/voxels", params={"image": image}, timeout=60)
    assert r.status_code == 200, r.text
    got = np.frombuffer(r.content, np.uint8).reshape(label.shape, order="F")
    np.testing.assert_array_equal(got, label * LIVER)
    for seg in ("1.2.3.4.5", "9" * 64):
        r = requests.get(f"{server.url}/segvol/labels/voxels", params={"image": image, "seg": seg}, timeout=60)
        assert r.status_code == 404 and "no SEG" in r.json()["detail"], r.text
    r = requests.get(f"{server.url}/datastore/label", params={"label": image, "tag": "final"}, timeout=60)
    assert r.status_code == 200 and len(r.content) > 0, r.text


def test_a_seg_the_archive_refuses_is_set_aside_and_the_others_are_sent(server, archive):
    """A queued SEG the archive answers 400 to (no SOP or series UID) must not block the ones
    behind it: it is moved aside with the archive's reason, listed in status, and retried on
    demand; the good one is stored."""
    image = archive.series["lung1"]
    pending = next(server.log.parent.rglob("pending-seg"))
    bad = Dataset()
    bad.file_meta = FileMetaDataset()
    bad.file_meta.MediaStorageSOPClassUID = SEG_CLASS
    bad.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    bad.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    bad.SOPClassUID, bad.Modality, bad.PatientID, bad.StudyInstanceUID = SEG_CLASS, "SEG", "x", generate_uid()
    bad.is_little_endian, bad.is_implicit_VR = True, False
    bad.save_as(str(pending / "0000-refused.dcm"), write_like_original=False)
    label = np.zeros((512, 512, 48), np.uint8)
    label[200:220, 200:230, 30:33] = 1
    spleen = {"CodingSchemeDesignator": "SCT", "CodeValue": "78961009", "CodeMeaning": "Spleen"}
    good = foreign_seg(archive.series_files("lung1"), label, [("spleen", spleen)])
    good.save_as(str(pending / "0001-kept.dcm"))

    label[:] = 0
    label[10:20, 10:20, 1:3] = 1
    assert save_liver(server.url, image, label, "ada").status_code == 200  # a save flushes the queue first
    assert str(good.SeriesInstanceUID) in archive.segs_series()
    state = requests.get(f"{server.url}/segvol/status", timeout=30).json()["pending_segs"]
    assert state["waiting"] == 0 and [x["file"] for x in state["refused"]] == ["0000-refused.dcm"]
    assert "HTTP 400" in state["refused"][0]["reason"], state
    r = requests.post(f"{server.url}/segvol/pending/retry", timeout=60)
    assert r.status_code == 200 and r.json()["sent"] == [] and len(r.json()["refused"]) == 1, r.text
    assert "refused" in server.log.read_text()
    for leftover in (pending / "refused").iterdir():
        leftover.unlink()


def test_names_in_any_script_give_valid_segs_and_are_kept_as_typed(server, archive):
    image = archive.series["lung1"]
    label = np.zeros((512, 512, 48), np.uint8)
    label[50:60, 50:60, 1:3] = 1
    label[70:80, 70:80, 1:3] = 2
    for client, name in [("Zoë Ōtsuka 李雷", "liver"), ("A^B^C^D^E^F^G", "lesion\\1 \x1b[31m")]:
        r = requests.put(
            f"{server.url}/datastore/label",
            params={"image": image, "tag": "final"},
            files={
                "params": (
                    None,
                    json.dumps({"client_id": client, "label_info": [{"name": "liver"}, {"name": name}]}),
                ),
                "label": ("label.bin", label.tobytes(order="F")),
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text
        seg = [d for d in archive.segs(image) if str(d.SeriesInstanceUID) == r.json()["SeriesInstanceUID"]][0]
        assert dciodvfy_errors(seg) == []
        history = requests.get(f"{server.url}/segvol/labels", params={"image": image}, timeout=60).json()
        assert history[0]["client"] == client  # the team store keeps the name as typed
    assert str(seg.ContentCreatorName) == "A^B^C^D^E F G"
    assert {s.SegmentLabel for s in seg.SegmentSequence} == {"liver", "lesion/1 [31m"}


def test_the_archive_down_at_start_is_reported_and_picked_up_when_it_comes(tmp_path):
    from server import free_port

    port = free_port()
    with dicomweb_server(f"http://127.0.0.1:{port}", tmp_path) as srv:
        assert srv.info["datastore"]["total"] == 0 and "does not answer" in srv.info["datastore"]["error"]
        r = requests.post(f"{srv.url}/activelearning/random", json={}, timeout=30)
        assert r.status_code == 503 and "does not answer" in r.json()["detail"]
        with Archive(tmp_path / "orthanc", port=port):  # the archive comes up: no restart needed
            info = requests.get(f"{srv.url}/info/", timeout=30).json()
            assert info["datastore"]["total"] == 1 and "error" not in info["datastore"]


def test_the_background_scorer_scores_a_new_series_and_leaves_the_cache_as_it_was(server, archive):
    before = requests.get(f"{server.url}/segvol/status", params={"client_id": "watch"}, timeout=30).json()["scoring"]
    _, series, files = ct_series(11)  # stored by another tool while the server runs
    for f in files:
        requests.post(f"{archive.url}/instances", data=f, auth=(USER, PASSWORD), timeout=30).raise_for_status()
    deadline = time.time() + 120
    while time.time() < deadline:
        scoring = requests.get(f"{server.url}/segvol/status", params={"client_id": "watch"}, timeout=30).json()
        scoring = scoring["scoring"]
        if scoring["unlabelled"] > before["unlabelled"] and scoring["scored"] == scoring["unlabelled"]:
            break
        time.sleep(0.3)
    assert scoring["scored"] == scoring["unlabelled"] > before["unlabelled"], scoring
    assert not list((server.log.parent / "cache").rglob(f"*{series}*"))  # read once, not kept in the cache
    pick = requests.post(f"{server.url}/activelearning/uncertainty", json={"client_id": "scores"}, timeout=30).json()
    assert series in pick["uncertainty"] and pick["scored_by"]["model_version"] == scoring["model_version"]
    assert pick["StudyInstanceUID"] == archive.study_of(pick["id"])  # the page opens it, fetched or not
