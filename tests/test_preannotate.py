"""Pre-annotation of an archive with Ray (real Orthanc, a real local Ray with 2 workers, the command
as a user runs it): a draft SEG per CT series, a corrupt series reported while the others are
done, a second run with nothing left to do, and drafts that are never final labels for rounds."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from phantom import make_phantom  # noqa: E402

from archive import PASSWORD, USER, Archive, dciodvfy_errors, foreign_seg, orthanc
from conftest import run_app

pytestmark = pytest.mark.dicomweb
SHAPE = (64, 48, 12)
CATEGORIES = "liver,spleen"
LIVER_CODE = {"CodingSchemeDesignator": "SCT", "CodeValue": "10200004", "CodeMeaning": "Liver"}


def _ray_processes(root: str) -> list[str]:
    """Processes of the Ray instance whose files live under ``root`` (its session path in their command lines)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and root in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def _corrupt_series(archive: Archive, work: Path) -> str:
    """A CT series whose middle slice is a quarter of the others: Orthanc stores it, nobody reads it."""
    from dicom_series import write_series

    image, _, affine = make_phantom(SHAPE, (4.0, 4.0, 8.0), seed=9)
    nib.save(nib.Nifti1Image(image, affine), str(work / "corrupt.nii.gz"))
    files = write_series(work / "corrupt.nii.gz", work / "corrupt", "corrupt")
    broken = pydicom.dcmread(files[len(files) // 2])
    quarter = broken.pixel_array[: SHAPE[1] // 2, : SHAPE[0] // 2].copy()
    broken.Rows, broken.Columns = quarter.shape
    broken.PixelData = quarter.tobytes()
    broken.save_as(files[len(files) // 2])
    return orthanc.upload_series(work / "corrupt", archive.port, USER, PASSWORD)


def _preannotate(archive: Archive, work: Path) -> tuple[object, list[str]]:
    """The command on the archive, 2 workers on a local Ray; its result and the Ray processes left after it."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MONAI_LABEL_DICOMWEB_USERNAME", USER)
        env.setenv("MONAI_LABEL_DICOMWEB_PASSWORD", PASSWORD)
        env.setenv("RAY_TMPDIR", ray_tmp)
        proc = run_app(
            "preannotate",
            "--studies",
            f"{archive.url}/dicom-web",
            "--categories",
            CATEGORIES,
            "--workers",
            "2",
            "--cpus",
            "2",
            "--weights",
            "seeded",
            "--model-config",
            "segvol-tiny",
            "--no-zoom-in",
            "--versions-dir",
            str(work / "versions"),
            "--cache",
            str(work / "cache"),
            "--team-db",
            str(work / "team.sqlite"),
            "--report",
            str(work / "rows.jsonl"),
        )
    left = _ray_processes(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return proc, left


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four phantom CT series and a corrupt one, pre-annotated twice; what the archive held after each run."""
    work = tmp_path_factory.mktemp("preannotate")
    studies = work / "studies"
    studies.mkdir()
    for seed in range(1, 5):
        image, _, affine = make_phantom(SHAPE, (4.0, 4.0, 8.0), seed=seed)
        nib.save(nib.Nifti1Image(image, affine), str(studies / f"phantom{seed}.nii.gz"))
    with Archive(work / "orthanc", studies=studies) as archive:
        corrupt = _corrupt_series(archive, work)
        t0 = time.time()
        first, left_first = _preannotate(archive, work)
        print(f"\nfirst run {time.time() - t0:.1f} s:\n{first.stdout}{first.stderr[-2000:]}")
        after_first = archive.segs()
        first_rows = (work / "rows.jsonl").read_text()
        t0 = time.time()
        second, left_second = _preannotate(archive, work)
        print(f"second run {time.time() - t0:.1f} s:\n{second.stdout}")
        yield {
            "archive": archive,
            "work": work,
            "corrupt": corrupt,
            "first": (first, left_first, after_first),
            "first_rows": first_rows,
            "second": (second, left_second, archive.segs()),
        }


def test_a_draft_seg_per_series_the_corrupt_one_reported_and_a_second_run_has_nothing_to_do(runs):
    archive, corrupt = runs["archive"], runs["corrupt"]
    first, left, segs = runs["first"]
    assert first.returncode == 1, first.stderr  # a series failed
    assert "5 series, 0 skipped" in first.stdout and "done       4" in first.stdout, first.stdout
    assert "failed     1" in first.stdout and f"{corrupt}: " in first.stdout, first.stdout
    assert "series/min" in first.stdout
    rows = {r["series"]: r for r in map(json.loads, runs["first_rows"].splitlines())}
    assert {s: r["status"] for s, r in rows.items()} == {
        **dict.fromkeys(archive.series.values(), "ok"),
        corrupt: "failed",
    }
    assert all(set(r["voxels"]) == {"liver", "spleen"} for s, r in rows.items() if s != corrupt)
    assert left == [], left  # Ray shut down with the command

    assert sorted(d.ReferencedSeriesSequence[0].SeriesInstanceUID for d in segs) == sorted(archive.series.values())
    for seg in segs:
        assert seg.ContentLabel == "DRAFT" and seg.SeriesDescription.startswith("DRAFT 20")  # DRAFT <time> ...
        assert seg.SeriesDescription.endswith(" SegVol seeded-untrained")
        assert {s.SegmentLabel for s in seg.SegmentSequence} <= {"liver", "spleen"}
        for segment in seg.SegmentSequence:
            assert segment.SegmentAlgorithmType == "AUTOMATIC" and segment.SegmentAlgorithmName == "SegVol"
        assert dciodvfy_errors(seg) == []
    # recorded as served results in the team state: a draft saved unedited is AUTOMATIC
    with sqlite3.connect(runs["work"] / "team.sqlite") as db:
        (n,) = db.execute("SELECT COUNT(*) FROM results WHERE task = 'preannotate'").fetchone()
    assert n == 4

    second, left, segs_after = runs["second"]
    assert second.returncode == 1 and "5 series, 4 skipped" in second.stdout, second.stdout
    assert "done       0" in second.stdout and f"{corrupt}: " in second.stdout, second.stdout
    assert len(segs_after) == len(segs) and left == []


def test_a_draft_is_not_a_final_label_for_rounds_nor_for_the_next_image(runs, tmp_path):
    """The app's datastore on the archive: images with drafts only are unlabelled; a final label
    stored later is the image's label, and a draft stored after it does not replace it."""
    from dicomweb_client.session_utils import create_session_from_user_pass
    from monailabel.datastore.dicom import DICOMwebClientX

    from lib.archive.seg import Segment, write_seg
    from lib.datastores import SegVolDICOMWebDatastore, wiring
    from lib.serving.host import ModelHost
    from lib.settings import AppSettings
    from lib.team.team import Team
    from segvol.vocabulary import default_vocabulary

    archive = runs["archive"]
    images = {*archive.series.values(), runs["corrupt"]}
    client = DICOMwebClientX(url=f"{archive.url}/dicom-web", session=create_session_from_user_pass(USER, PASSWORD))
    service = ModelHost(AppSettings.from_conf({"weights": "seeded"}, tmp_path / "model"))
    store = SegVolDICOMWebDatastore(
        **wiring(service, Team(0)), client=client, search_filter={"Modality": "CT"}, cache_path=str(tmp_path)
    )
    assert store.get_labeled_images() == [] and set(store.get_unlabeled_images()) == images
    assert store.datalist() == [] and store.label_keys() == set()
    image = archive.series["phantom1"]
    (listed,) = store.history(image)
    assert listed["draft"] and listed["description"].startswith("DRAFT ")

    label = np.zeros(SHAPE, np.uint8)
    label[20:40, 10:30, 3:9] = 1
    final = foreign_seg(archive.series_files("phantom1"), label, [("liver", LIVER_CODE)])
    archive.store(final)
    time.sleep(1.1)  # SeriesTime has whole seconds
    liver = default_vocabulary().resolve("liver").category
    newer_draft = write_seg(
        label, archive.folder / "dicom" / "phantom1", [Segment(1, "liver", liver, "AUTOMATIC")], "v", draft=True
    )
    archive.store(pydicom.dcmread(newer_draft))
    store.seg_index.refresh()
    assert store.get_labeled_images() == [image]
    assert store.label_keys() == {str(final.SeriesInstanceUID)}
    assert [(d["image_id"], d["label_key"]) for d in store.datalist()] == [(image, str(final.SeriesInstanceUID))]
    assert image not in store.get_unlabeled_images()


def test_a_draft_in_a_folder_is_the_original_label_never_the_final_one(tmp_path):
    from lib.datastores import SegVolLocalDatastore, wiring
    from lib.labels.checks import LabelPart
    from lib.serving.host import ModelHost
    from lib.settings import AppSettings
    from lib.team.team import Team
    from segvol.vocabulary import default_vocabulary

    image, _, affine = make_phantom(SHAPE, (4.0, 4.0, 8.0), seed=1)
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "ct1.nii.gz"))
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "ct2.nii.gz"))
    service = ModelHost(AppSettings.from_conf({"weights": "seeded"}, tmp_path / "model"))
    store = SegVolLocalDatastore(str(tmp_path), **wiring(service, Team(0)), extensions=("*.nii.gz",))
    label = np.zeros(SHAPE, np.uint8)
    label[20:40, 10:30, 3:9] = 1
    liver = default_vocabulary().resolve("liver").category
    path = store.store_draft("ct1", label, [LabelPart(1, "liver", liver)], "SegVol pre-annotation", "v")
    assert Path(path) == tmp_path / "labels" / "original" / "ct1.nii.gz"
    np.testing.assert_array_equal(nib.load(path).get_fdata(), label)
    assert store.annotated_images() == {"ct1"}
    assert store.get_labeled_images() == [] and sorted(store.get_unlabeled_images()) == ["ct1", "ct2"]
    assert store.datalist() == [] and store.label_keys() == set()
    # a second process's datastore, opened before the draft of ct2, keeps it when it saves its own
    other = SegVolLocalDatastore(str(tmp_path), **wiring(service, Team(0)), extensions=("*.nii.gz",))
    store.store_draft("ct2", label, [LabelPart(1, "liver", liver)], "SegVol pre-annotation", "v")
    other.store_draft("ct1", label, [LabelPart(1, "liver", liver)], "SegVol pre-annotation", "v")
    assert SegVolLocalDatastore(
        str(tmp_path), **wiring(service, Team(0)), extensions=("*.nii.gz",)
    ).annotated_images() == {"ct1", "ct2"}


def test_the_run_stores_each_series_uncertainty_for_next_image(runs):
    from lib.team.scores import Scores
    from lib.team.store import TeamStore

    store = TeamStore(runs["work"] / "team.sqlite")
    with store.connect() as db:
        rows = db.execute("SELECT image, categories, model_version, score FROM scores").fetchall()
    assert {r["image"] for r in rows} == set(runs["archive"].series.values())  # the corrupt series has none
    [categories] = {r["categories"] for r in rows}
    [version] = {r["model_version"] for r in rows}
    newest = Scores(store).newest(categories.split("\n"), version)
    assert all(0 <= s.value <= 1 for s in newest.values()) and len({s.value for s in newest.values()}) == 4
