"""A pre-annotated archive as an annotator meets it (real Orthanc, `python apps/segvol preannotate` on a
local Ray, a real MONAI Label server, OHIF's SegVol mode in Chromium): the draft is listed as a
draft, opens on the CT at the draft's voxels, and saved unedited becomes the image's final label,
AUTOMATIC (the draft was recorded as a served result) and signed by the annotator."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest
import requests

from archive import PASSWORD, USER, Archive, dciodvfy_errors, dicomweb_server
from conftest import run_app
from ohif import (
    CHROMIUM_ARGS,
    chromium,
    index_instances,
    open_mode,
    page_labelmap,
    phantom_studies,
    seg_labelmap,
    seg_of,
    set_annotator,
    shape_of,
)

pytestmark = pytest.mark.e2e


def _preannotate(archive: Archive, work) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("MONAI_LABEL_DICOMWEB_USERNAME", USER)
            env.setenv("MONAI_LABEL_DICOMWEB_PASSWORD", PASSWORD)
            env.setenv("RAY_TMPDIR", ray_tmp)
            proc = run_app(
                *("preannotate", "--studies", f"{archive.url}/dicom-web", "--categories", "liver"),
                *("--workers", "1", "--cpus", "2", "--weights", "seeded", "--model-config", "segvol-tiny"),
                *("--no-zoom-in", "--versions-dir", str(work / "versions"), "--cache", str(work / "ray-cache")),
                *("--team-db", str(work / "team.sqlite")),
            )
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_draft_opens_in_ohif_and_saved_unedited_is_the_final_label(tmp_path):
    from playwright.sync_api import sync_playwright

    with Archive(tmp_path / "orthanc", studies=phantom_studies(tmp_path / "studies")) as archive:
        _preannotate(archive, tmp_path)
        image = archive.series["abdomen1"]
        (draft,) = archive.segs(image)
        assert draft.ContentLabel == "DRAFT"
        conf = {"zoom_in": "false", "team_db": str(tmp_path / "team.sqlite")}
        with dicomweb_server(archive.url, tmp_path, **conf) as srv, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.annotator = "Ada Lovelace"
            open_mode(page, srv, archive.study_of(image), image)
            set_annotator(page)
            entry = page.locator("#segvol-history li").first
            entry.filter(has_text="DRAFT").wait_for(timeout=30_000)
            entry.locator("button").click()
            page.locator("#segvol-message").filter(has_text="Opened the draft").wait_for(timeout=60_000)

            shape = shape_of(archive, image)
            index_instances(archive, image)
            in_page = page_labelmap(page, shape)
            assert (in_page == "liver").sum() > 0
            np.testing.assert_array_equal(seg_labelmap(draft, shape), in_page)

            with page.expect_response(lambda r: "/datastore/label" in r.url, timeout=120_000) as resp:
                page.locator("#segvol-save").click()
            assert resp.value.status == 200, resp.value.text()
            page.locator("#segvol-message").filter(has_text="Saved to the archive").wait_for(timeout=30_000)
            final = seg_of(archive, image, resp.value.json()["SeriesInstanceUID"])
            np.testing.assert_array_equal(seg_labelmap(final, shape), in_page)
            (segment,) = final.SegmentSequence
            assert (segment.SegmentLabel, segment.SegmentAlgorithmType) == ("liver", "AUTOMATIC")
            assert str(final.ContentCreatorName) == "Lovelace^Ada" and final.get("ContentLabel") != "DRAFT"
            assert dciodvfy_errors(final) == []
            history = requests.get(f"{srv.url}/segvol/labels", params={"image": image}, timeout=30).json()
            assert [h["draft"] for h in history][:2] == [False, True], history
            assert not errors, errors
            browser.close()
