"""Two annotators in OHIF's SegVol mode at once, in a real headless Chromium, on a real Orthanc
with three CT series and a real MONAI Label server.

Each asks for the next image (they get different series), runs a class prompt, draws a brush
stroke and an eraser stroke with the mouse on the axial viewport, and saves. The SEG in the
archive must equal the page's labelmap voxel for voxel (read here with pydicom, frame by frame,
not with the app's reader), be SEMIAUTOMATIC and name its annotator. The saved SEG then reopens
in the SegVol mode (history -> Open) and in OHIF's basic viewer at the same voxels, and a
fine-tune round started from the page shows its real progress and result. Screenshots go to
build/test-artifacts/ohif-team/ (the README's annotator guide uses them).
"""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest
import requests

from archive import Archive, dciodvfy_errors, dicomweb_server
from conftest import ROOT
from ohif import (
    ANNOTATORS,
    CHROMIUM_ARGS,
    COUNT,
    chromium,
    class_prompt,
    drag,
    index_instances,
    named,
    next_image,
    open_mode,
    page_labelmap,
    params,
    phantom_studies,
    seg_labelmap,
    seg_of,
    series_in_view,
    server_result,
    set_annotator,
    shape_of,
    until_changed,
    viewport_box,
)

pytestmark = pytest.mark.e2e
ARTIFACTS = ROOT / "build" / "test-artifacts" / "ohif-team"
LIVER = 1  # its /info label index

# OHIF's basic viewer holds a SEG as one label image per CT slice; k = the CT slice's InstanceNumber - 1
STACK_LABELMAP = """() => {
    const core = window.segvolOhif.cornerstoneCore();  // the bundle's @cornerstonejs/core (ohif-shim.js)
    const seg = window.services.segmentationService.getSegmentations()[0];
    const lm = seg.representationData.Labelmap;
    const slices = [];
    lm.imageIds.forEach((id, n) => {
        const image = core.cache.getImage(id);
        const ref = lm.referencedImageIds[n];
        const k = core.metaData.get('generalImageModule', ref).instanceNumber - 1;
        const px = image.getPixelData();
        let text = '';
        for (let i = 0; i < px.length; i += 0x8000) text += String.fromCharCode.apply(null, px.subarray(i, i + 0x8000));
        slices.push({k: k, rows: image.rows, columns: image.columns, b64: btoa(text)});
    });
    const names = {};
    for (const s of Object.values(seg.segments)) if (s) names[s.segmentIndex] = s.label;
    return {slices: slices, names: names};
}"""


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    work = tmp_path_factory.mktemp("ohif-team")
    with (
        Archive(work / "orthanc", studies=phantom_studies(work / "studies")) as archive,
        dicomweb_server(archive.url, work, zoom_in="false", train_steps="30", train_lr="3e-3") as srv,
    ):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            pages = []
            for name in ANNOTATORS:
                context = browser.new_context(viewport={"width": 1600, "height": 1000})  # own localStorage
                page = context.new_page()
                page.errors = []
                page.on("pageerror", lambda e, page=page: page.errors.append(str(e)))
                page.annotator = name
                pages.append(page)
            yield archive, srv, pages, browser
            browser.close()


@pytest.fixture(scope="module")
def session(team):
    """The two annotators' session, once for the module: next image, class prompt, brush and eraser
    strokes, save. Returns what each page held and sent, the SEG each save stored, the timings."""
    archive, srv, pages, _ = team
    landing = archive.study_of(archive.series["abdomen1"])
    out = {"figures": {}, "images": {}, "sent": {}, "labelmaps": {}, "segs": {}}
    for page in pages:
        open_mode(page, srv, landing)
        set_annotator(page)
        out["images"][page.annotator] = next_image(page)
        assert series_in_view(page) == out["images"][page.annotator]
        page.locator("#segvol-lease").filter(has_text="held by you").wait_for(timeout=15_000)

    figures = out["figures"]
    for n, page in enumerate(pages):
        tag = page.annotator.split()[0].lower()
        t0 = time.perf_counter()
        response = class_prompt(page, "liver")
        out["sent"][page.annotator] = params(response.request)
        figures[f"{tag} class prompt"] = time.perf_counter() - t0
        page.wait_for_function(
            "() => window.services.segmentationService.getActiveSegment('mpr-axial')?.label === 'liver'", timeout=10_000
        )
        page.screenshot(path=str(ARTIFACTS / f"{n + 1}a-{tag}-class-prompt.png"))

        # brush stroke, then eraser stroke, with the mouse on the axial viewport
        page.locator("[data-cy=panelSegmentationWithTools-btn]").click()
        page.locator("[data-cy=Brush]").click()
        box = viewport_box(page, "mpr-axial")
        before = page.evaluate(COUNT)
        t0 = time.perf_counter()
        drag(page, box, (0.3, 0.42), (0.62, 0.5))
        painted, _ = until_changed(page, before)
        figures[f"{tag} brush stroke"] = time.perf_counter() - t0
        assert painted > before
        page.locator("[data-cy=Eraser]").click()
        t0 = time.perf_counter()
        drag(page, box, (0.45, 0.3), (0.5, 0.62))
        erased, _ = until_changed(page, painted)
        figures[f"{tag} eraser stroke"] = time.perf_counter() - t0
        assert erased < painted
        page.screenshot(path=str(ARTIFACTS / f"{n + 1}b-{tag}-brush-and-eraser.png"))

        # save
        t0 = time.perf_counter()
        with page.expect_response(lambda r: "/datastore/label" in r.url, timeout=120_000) as resp:
            page.locator("#segvol-save").click()
        assert resp.value.status == 200, resp.value.text()
        page.locator("#segvol-message").filter(has_text="Saved to the archive").wait_for(timeout=30_000)
        figures[f"{tag} save"] = time.perf_counter() - t0
        out["segs"][page.annotator] = resp.value.json()["SeriesInstanceUID"]
        out["message"] = page.inner_text("#segvol-message")
        shape = shape_of(archive, out["images"][page.annotator])
        out["labelmaps"][page.annotator] = page_labelmap(page, shape)
        page.locator("#segvol-history li").first.wait_for(timeout=15_000)
        page.screenshot(path=str(ARTIFACTS / f"{n + 1}c-{tag}-saved.png"))

    print("\nseconds until the page showed the answer (a stroke: from the mouse going down):")
    for what, seconds in figures.items():
        print(f"  {what:28s} {seconds:5.2f}")
    return out


def test_two_annotators_get_different_images_edit_and_save(team, session, tmp_path):
    archive, srv, pages, _ = team
    images = session["images"]
    assert images[ANNOTATORS[0]] != images[ANNOTATORS[1]], "two annotators were handed the same image"
    assert all(session["sent"][a]["client_id"] == a for a in ANNOTATORS)  # the page tags its requests
    assert "liver: SEMIAUTOMATIC" in session["message"]
    for annotator in ANNOTATORS:
        series = images[annotator]
        shape = shape_of(archive, series)
        index_instances(archive, series)
        seg = seg_of(archive, series, session["segs"][annotator])
        in_page = session["labelmaps"][annotator]
        in_archive = seg_labelmap(seg, shape)
        assert (in_page == "liver").sum() > 0
        np.testing.assert_array_equal(in_archive, in_page)  # every voxel, by segment name
        (segment,) = seg.SegmentSequence
        assert (segment.SegmentLabel, segment.SegmentAlgorithmType) == ("liver", "SEMIAUTOMATIC")
        given, family = annotator.split()
        assert str(seg.ContentCreatorName) == f"{family}^{given}"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "SegVol" and algorithm.AlgorithmVersion == srv.info["model_version"][:64]
        assert dciodvfy_errors(seg) == []
        # the voxels added and removed, against what SegVol served for the page's very request
        served = server_result(srv, series, dict(session["sent"][annotator], client_id="test-check"), tmp_path)
        served = served == LIVER
        saved = in_page == "liver"
        history = requests.get(f"{srv.url}/segvol/labels", params={"image": series}, timeout=30).json()
        (mine,) = [h for h in history if h["seg_series"] == session["segs"][annotator]]
        (entry,) = mine["segments"]
        assert mine["client"] == annotator and entry["type"] == "SEMIAUTOMATIC"
        assert (entry["added"], entry["removed"]) == (int((saved & ~served).sum()), int((served & ~saved).sum()))
        assert entry["added"] > 0
    assert not [e for p in pages for e in p.errors], [e for p in pages for e in p.errors]


def test_a_saved_seg_reopens_in_the_segvol_mode_and_the_basic_viewer(team, session):
    archive, srv, pages, browser = team
    page = pages[1]  # Grace reopens Ada's work
    series = session["images"][ANNOTATORS[0]]
    shape = shape_of(archive, series)
    index_instances(archive, series)
    seg = seg_of(archive, series, session["segs"][ANNOTATORS[0]])
    expected = seg_labelmap(seg, shape)
    study = archive.study_of(series)

    open_mode(page, srv, study, series)
    page.locator("#segvol-history li").first.wait_for(timeout=30_000)
    assert ANNOTATORS[0] in page.inner_text("#segvol-history")
    page.locator("#segvol-open-0").click()
    page.locator("#segvol-message").filter(has_text="Opened the label").wait_for(timeout=60_000)
    np.testing.assert_array_equal(page_labelmap(page, shape), expected)
    page.screenshot(path=str(ARTIFACTS / "4-reopened-in-segvol-mode.png"))

    # an edit and a save make a new version; the archive keeps both
    page.locator("[data-cy=panelSegmentationWithTools-btn]").click()
    page.locator("[data-cy=Eraser]").click()
    box = viewport_box(page, "mpr-axial")
    before = page.evaluate(COUNT)
    drag(page, box, (0.35, 0.35), (0.55, 0.55))
    until_changed(page, before)
    with page.expect_response(lambda r: "/datastore/label" in r.url, timeout=120_000) as resp:
        page.locator("#segvol-save").click()
    assert resp.value.status == 200, resp.value.text()
    second = seg_of(archive, series, resp.value.json()["SeriesInstanceUID"])
    assert str(second.ContentCreatorName) == "Hopper^Grace" and str(seg.ContentCreatorName) == "Lovelace^Ada"
    assert len(archive.segs(series)) == 2  # the archive keeps both versions
    np.testing.assert_array_equal(seg_labelmap(second, shape), page_labelmap(page, shape))
    page.locator("#segvol-history li").nth(1).wait_for(timeout=15_000)

    # OHIF's basic viewer reads the newest SEG onto the CT: the same voxels
    viewer = browser.new_page(viewport={"width": 1600, "height": 1000})
    viewer.goto(f"{srv.url}/ohif/viewer?StudyInstanceUIDs={study}", wait_until="domcontentloaded")
    hide = viewer.get_by_text("Confirm and Hide")
    hide.wait_for(timeout=120_000)
    hide.click()
    description = str(second.SeriesDescription)
    assert description.startswith("Grace Hopper 20") and description != str(seg.SeriesDescription)  # versions apart
    viewer.get_by_text(description).first.dblclick()
    viewer.get_by_text("Yes", exact=True).click()
    viewer.wait_for_function("() => window.services.segmentationService.getSegmentations().length > 0", timeout=60_000)
    viewer.wait_for_timeout(2000)
    got = viewer.evaluate(STACK_LABELMAP)
    values = np.zeros(shape, np.uint8)
    for s in got["slices"]:
        px = np.frombuffer(base64.b64decode(s["b64"]), np.uint8).reshape(s["rows"], s["columns"])
        values[:, :, s["k"]] = px.T
    in_viewer = named(values, {int(k): v for k, v in got["names"].items()})
    expected_second = seg_labelmap(second, shape)
    painted = np.argwhere(expected_second == "liver")[0]
    assert in_viewer[tuple(painted)] == "liver"  # a known voxel first, then all of them
    np.testing.assert_array_equal(in_viewer, expected_second)
    viewer.screenshot(path=str(ARTIFACTS / "5-basic-viewer.png"))
    viewer.close()


def test_a_round_started_from_the_page_shows_its_progress_and_result(team, session):
    archive, srv, pages, _ = team
    page = pages[0]
    page.locator("#segvol-train").click()
    page.locator("#segvol-round").filter(has_text="Running").wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "6-round-running.png"))
    page.locator("#segvol-last-round").filter(has_text="v0001").wait_for(timeout=300_000)
    text = page.inner_text("#segvol-last-round")
    status = requests.get(f"{srv.url}/segvol/status", timeout=30).json()
    meta = status["last_round"]
    assert meta["version"] == "v0001" and meta["steps"] == 30
    assert f"held-out Dice {meta['val_dice_before']:.3f}" in text and f"{meta['val_dice_after']:.3f}" in text
    assert ("promoted" in text) == (
        meta["status"] == "promoted"
    ) and "Trained on 1 image(s), measured on 1 held-out" in text
    page.wait_for_function(
        "(v) => document.getElementById('segvol-model').innerText === v", arg=status["model_version"], timeout=30_000
    )
    page.screenshot(path=str(ARTIFACTS / "7-round-result.png"))
