"""An annotator's day in OHIF's SegVol mode, in a real headless Chromium, on a real Orthanc and a
real MONAI Label server: the 3D box prompt drawn with the mouse, unsaved work restored after a
reload, strokes refused until a segment is chosen, a deleted segment's voxels gone from the SEG,
a colleague's newer save told (409) and merged with nothing lost, the label's own segment active
after arriving, and a multi-prompt result saved untouched as AUTOMATIC for every segment.
Screenshots go to build/test-artifacts/ohif-annotator/ (the annotator's guide uses them)."""

from __future__ import annotations

import base64
import re
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
    PAGE_LABELMAP,
    chromium,
    drag,
    index_instances,
    message,
    open_mode,
    page_labelmap,
    phantom_studies,
    point_prompt,
    seg_labelmap,
    seg_of,
    server_result,
    set_annotator,
    shape_of,
    until_changed,
    viewport_box,
)

pytestmark = pytest.mark.e2e
ARTIFACTS = ROOT / "build" / "test-artifacts" / "ohif-annotator"
ACTIVE = "() => document.getElementById('segvol-active-name').innerText"


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    work = tmp_path_factory.mktemp("ohif-annotator")
    with (
        Archive(work / "orthanc", studies=phantom_studies(work / "studies")) as archive,
        dicomweb_server(archive.url, work, zoom_in="false") as srv,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        pages = []
        for name in ANNOTATORS:
            page = browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
            page.errors, page.dialogs = [], []
            page.on("pageerror", lambda e, page=page: page.errors.append(str(e)))
            page.on("dialog", lambda d, page=page: (page.dialogs.append(d.type), d.accept()))
            page.annotator = name
            pages.append(page)
        yield archive, srv, pages
        browser.close()


def _find(page, name: str) -> None:
    """Find a structure in the workspace and make it the active segment."""
    page.fill("#segvol-find", name)
    page.locator("#segvol-find-hits li").filter(has_text=name).first.click()
    page.wait_for_function(f"() => ({ACTIVE})() === {name!r}", timeout=10_000)


def _brush(page, start, end, tool: str = "Brush") -> int:
    page.locator("[data-cy=panelSegmentationWithTools-btn]").click()
    page.locator(f"[data-cy={tool}]").click()
    before = page.evaluate(COUNT)
    drag(page, viewport_box(page, "mpr-axial"), start, end)
    page.wait_for_timeout(800)  # the page settles a stroke 250 ms after it ends
    return before


def _until_autosaved(srv, page, image: str, timeout: float = 30) -> None:
    """Until the server's autosave of ``page``'s annotator holds the page's labelmap, byte for byte."""
    raw = base64.b64decode(page.evaluate(PAGE_LABELMAP, "1")["b64"])
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = requests.get(
            f"{srv.url}/segvol/autosave", params={"image": image, "client_id": page.annotator}, timeout=30
        )
        if got.status_code == 200 and got.content == raw:
            return
        time.sleep(0.3)
    raise AssertionError("the page's work did not reach the server's autosave")


def _save(page):
    from playwright.sync_api import TimeoutError as Timeout

    try:
        with page.expect_response(lambda r: "/datastore/label" in r.url, timeout=60_000) as resp:
            page.locator("#segvol-save").click()
    except Timeout as e:
        raise AssertionError(f"Save label sent nothing; the page says: {page.inner_text('#segvol-message')}") from e
    return resp.value


@pytest.fixture(scope="module")
def day(team, tmp_path_factory):
    """Ada and Grace on the first CT, then Ada on the second: what each step left behind."""
    archive, srv, (ada, grace) = team
    tmp = tmp_path_factory.mktemp("results")
    image = archive.series["abdomen1"]
    study = archive.study_of(image)
    shape = shape_of(archive, image)
    index_instances(archive, image)
    out = {"image": image, "shape": shape}

    # Ada arrives: no segment is chosen, so a stroke paints nothing
    for page in (ada, grace):
        open_mode(page, srv, study, image)
        set_annotator(page)
    assert ada.evaluate(ACTIVE) == "no segment chosen"
    _brush(ada, (0.4, 0.4), (0.55, 0.5))
    out["refused stroke"] = (message(ada, "Nothing painted"), ada.evaluate(COUNT))

    # the box prompt: liver found by name, a rectangle dragged on the axial view, slices set, Run
    _find(ada, "liver")
    ada.locator("#segvol-box-draw").click()
    drag(ada, viewport_box(ada, "mpr-axial"), (0.3, 0.35), (0.62, 0.62))
    ada.fill("#segvol-box-k0", "4")
    ada.fill("#segvol-box-k1", "17")
    ada.locator("#segvol-box-run").click()
    message(ada, "Box prompt for liver")
    out["box sent"] = ada.evaluate("() => window.segvolLastBox")
    out["box overlays"] = ada.evaluate(
        """() => [...document.querySelectorAll('svg.segvol-box')].map(s =>
            [...s.querySelectorAll('polygon')].map(p => p.dataset.segvol))"""
    )
    out["box page"] = page_labelmap(ada, shape)
    out["box rest"] = server_result(srv, image, dict(out["box sent"], client_id="test-check"), tmp)
    ada.screenshot(path=str(ARTIFACTS / "1-box-prompt.png"))

    # a second segment painted, the page reloaded: the autosaved work comes back
    _find(ada, "spleen")
    _brush(ada, (0.6, 0.3), (0.7, 0.4))
    out["before reload"] = page_labelmap(ada, shape)
    _until_autosaved(srv, ada, image)
    ada.reload(wait_until="domcontentloaded")
    ada.locator("#segvol-workspace").wait_for(timeout=120_000)
    out["restored message"] = message(ada, "Restored your unsaved work", 120_000)
    out["after reload"] = page_labelmap(ada, shape)
    out["dialogs"] = list(ada.dialogs)
    ada.screenshot(path=str(ARTIFACTS / "2-work-restored.png"))

    # spleen deleted in OHIF's list (the service call its delete button makes): its voxels go,
    # undo brings both back, and a second delete sticks; then Ada saves
    index = ada.evaluate("() => window.segvolOhif.segmentsByName()['spleen']")
    ada.evaluate(f"() => window.services.segmentationService.removeSegment('1', {index})")
    message(ada, "Deleted spleen")
    out["after delete"] = page_labelmap(ada, shape)
    ada.locator("#segvol-undo").click()
    ada.wait_for_function("() => window.segvolOhif.segmentsByName()['spleen']", timeout=10_000)
    out["after undo"] = page_labelmap(ada, shape)
    index = ada.evaluate("() => window.segvolOhif.segmentsByName()['spleen']")
    ada.evaluate(f"() => window.services.segmentationService.removeSegment('1', {index})")
    message(ada, "Deleted spleen")
    first = _save(ada)
    out["first save"] = first.json()
    out["first page"] = page_labelmap(ada, shape)

    # Grace arrives after Ada's save: the final label is shown, its own segment active
    grace.reload(wait_until="domcontentloaded")
    grace.locator("#segvol-workspace").wait_for(timeout=120_000)
    message(grace, "Showing the image's final label", 120_000)
    grace.wait_for_function(f"() => ({ACTIVE})() !== 'no segment chosen'", timeout=10_000)
    out["grace active"] = grace.evaluate(ACTIVE)

    # Ada adds a left kidney and saves again; Grace, still on Ada's first version, adds spleen
    _find(ada, "left kidney")
    _brush(ada, (0.62, 0.55), (0.7, 0.62))
    out["second save"] = _save(ada).json()
    _find(grace, "spleen")
    _brush(grace, (0.6, 0.3), (0.7, 0.4))
    conflict = _save(grace)
    out["conflict"] = (conflict.status, conflict.json())
    grace.locator("#segvol-conflict").wait_for(timeout=30_000)
    grace.screenshot(path=str(ARTIFACTS / "3-conflict.png"))
    grace.locator("#segvol-conflict-merge").click()
    out["merge message"] = message(grace, "Took left kidney")
    merged = _save(grace)
    out["merged save"] = merged.json()
    out["merged page"] = page_labelmap(grace, shape)
    # Ada, on the same image, is told without asking, and her history lists Grace's version
    out["told"] = message(ada, "Grace Hopper saved a label of this image", 30_000)
    ada.locator("#segvol-history li").first.filter(has_text="Grace Hopper").wait_for(timeout=30_000)
    out["errors"] = [e for p in (ada, grace) for e in p.errors]
    return out


def test_a_box_drawn_in_the_page_equals_the_same_box_over_rest(day):
    sent = day["box sent"]
    i0, j0, k0, i1, j1, k1 = sent["box"]
    assert (k0, k1) == (4, 17) and i1 - i0 > 10 and j1 - j0 > 10, sent  # the drag, the slices as set
    assert sent["texts"] == ["liver"]
    in_page = day["box page"] == "liver"
    assert in_page.sum() > 0
    np.testing.assert_array_equal(in_page, day["box rest"] != 0)  # voxel for voxel
    # shown in all three views: a section where the slice cuts the box, else a dashed outline
    assert len(day["box overlays"]) >= 3 and all(len(v) == 1 for v in day["box overlays"])
    assert any(v == ["box-section"] for v in day["box overlays"])


def test_a_stroke_before_any_segment_is_chosen_paints_nothing(day):
    said, count = day["refused stroke"]
    assert "choose the segment to paint first" in said and count == 0


def test_a_reload_restores_the_autosaved_work_and_asks_first(day):
    assert "beforeunload" in day["dialogs"]
    assert (day["before reload"] == "spleen").sum() > 0
    np.testing.assert_array_equal(day["after reload"], day["before reload"])


def test_deleting_a_segment_removes_its_voxels_from_the_saved_seg(team, day):
    archive, _, _ = team
    assert (day["after delete"] == "spleen").sum() == 0 and (day["after delete"] == "").sum() > 0
    np.testing.assert_array_equal(day["after undo"], day["before reload"])  # undo: voxels and row back
    seg = seg_of(archive, day["image"], day["first save"]["SeriesInstanceUID"])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver"]
    np.testing.assert_array_equal(seg_labelmap(seg, day["shape"]), day["first page"])
    assert dciodvfy_errors(seg) == []


def test_arriving_shows_the_final_label_with_its_own_segment_active(day):
    assert day["grace active"] == "liver"


def test_a_colleagues_newer_save_is_told_and_both_labels_survive(team, day):
    archive, srv, _ = team
    status, body = day["conflict"]
    assert status == 409 and body["detail"]["newest"]["client"] == ANNOTATORS[0]
    assert body["detail"]["newest"]["version"] == day["second save"]["version"]
    merged = seg_of(archive, day["image"], day["merged save"]["SeriesInstanceUID"])
    labels = {s.SegmentLabel for s in merged.SegmentSequence}
    assert labels == {"liver", "spleen", "left kidney"}, labels
    np.testing.assert_array_equal(seg_labelmap(merged, day["shape"]), day["merged page"])
    history = requests.get(f"{srv.url}/segvol/labels", params={"image": day["image"]}, timeout=30).json()
    versions = [h.get("version") for h in history if not h["draft"]]
    expected = [day["merged save"]["version"], day["second save"]["version"], day["first save"]["version"]]
    assert versions == expected  # Ada's two labels and Grace's merge, all kept
    assert str(merged.ContentCreatorName) == "Hopper^Grace"
    assert f"(version {day['merged save']['version']})" in day["told"]  # the other page heard of it by itself
    assert dciodvfy_errors(merged) == []
    assert not day["errors"], day["errors"]


def test_a_multi_prompt_result_saved_untouched_is_automatic_for_every_segment(team):
    """Class prompt liver + right lung, point prompt left lung (which the page writes only where no
    other segment is), save without an edit: every segment AUTOMATIC (issue: left lung was
    SEMIAUTOMATIC with every suppressed voxel counted as removed)."""
    archive, srv, (ada, _) = team
    page = ada.context.browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
    page.annotator = "Ada Lovelace"
    image = archive.series["abdomen2"]
    open_mode(page, srv, archive.study_of(image), image)
    set_annotator(page)
    tab = page.locator("div.tab", has=page.locator("label.tab-label", has_text="Class Prompts"))
    tab.locator("label.tab-label").click()
    for name in ("liver", "right lung"):
        tab.locator("table.optionsTable tr").filter(has_text=name).first.locator("input[type=checkbox]").check()
    before = page.evaluate(COUNT)
    with page.expect_response(lambda r: "/infer/segvol?" in r.url, timeout=120_000) as resp:
        tab.locator("button.actionButton", has_text="Run").click()
    assert resp.value.status == 200
    counted, _ = until_changed(page, before)

    point_prompt(page, "left lung", ((0.62, 0.5), (0.66, 0.55)))
    until_changed(page, counted)
    saved = _save(page)
    assert saved.status == 200, saved.text()
    segments = {s["name"]: s for s in saved.json()["segments"]}
    assert {"liver", "right lung", "left lung"} <= set(segments), segments
    assert {n: s["type"] for n, s in segments.items()} == dict.fromkeys(segments, "AUTOMATIC"), segments
    page.context.close()


def test_from_the_study_list_the_mode_talks_to_its_own_server_and_lists_no_seg(team, day):
    """README's path: the study list, then SegVol annotation (a route change in the page, not a
    load): MONAI Label's panel asks the page's own server from its first call (it asked port 8000
    and showed "Failed to Connect" for 12-16 s), and the series list holds the CT, not its SEGs."""
    archive, srv, (ada, _) = team
    context = ada.context.browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    asked = []
    page.on("request", lambda r: asked.append(r.url))
    page.goto(f"{srv.url}/ohif/", wait_until="domcontentloaded")
    page.get_by_text("abdomen1").first.click()
    page.get_by_text("SegVol annotation").first.click()
    page.wait_for_url("**/ohif/segvol?*", timeout=60_000)
    page.locator(".monaiLabelPanel .subtitle").wait_for(timeout=60_000)
    local = re.compile(r"^https?://(127\.0\.0\.1|localhost)(:\d+)?/")
    elsewhere = sorted({u for u in asked if local.match(u) and not u.startswith(srv.url + "/")})
    assert elsewhere == [], elsewhere  # OHIF's fonts come from the web; no other server of ours is asked
    assert "Failed to Connect" not in page.inner_text("body")
    modalities = page.evaluate("() => window.services.displaySetService.getActiveDisplaySets().map(d => d.Modality)")
    assert "SEG" not in modalities and "CT" in modalities, modalities
    context.close()
