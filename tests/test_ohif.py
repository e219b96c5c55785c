"""OHIF (bundled with MONAI Label) in a real headless Chromium (Debian's), on Orthanc via
MONAI Label's DICOMweb proxy: study list, the stock monai-label mode, class prompt and point
prompt. The SegVol mode (editing, saving, next image, two annotators): test_ohif_team.py.

Assertions are on the segmentation the page holds (OHIF's labelmap volume), compared with what
the server returns for the very request the page sent. Screenshots go to
build/test-artifacts/ohif/.
"""

from __future__ import annotations

import pytest

from archive import Archive, dicomweb_server
from conftest import ROOT
from ohif import CHROMIUM_ARGS, chromium, params, point_prompt, server_result

pytestmark = pytest.mark.e2e
ARTIFACTS = ROOT / "build" / "test-artifacts" / "ohif"
RIGHT_LUNG = 84
LABELMAP_COUNTS = """() => {
    const data = window.services.segmentationService.getLabelmapVolume('1').voxelManager.getCompleteScalarDataArray();
    const counts = {};
    for (let i = 0; i < data.length; i++) { if (data[i]) counts[data[i]] = (counts[data[i]] || 0) + 1; }
    return {n: data.length, counts: counts};
}"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    work = tmp_path_factory.mktemp("ohif")
    with Archive(work / "orthanc") as archive, dicomweb_server(archive.url, work, zoom_in="false") as srv:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.sent = []
            page.on("request", lambda r: page.sent.append(r) if "/infer/" in r.url else None)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            yield archive, srv, page
            browser.close()


def _segment_index(info: dict, name: str) -> int:
    """OHIF numbers its segments by the alphabetical rank of the label names."""
    return sorted(set(info["labels"])).index(name) + 1


def test_ohif_lists_opens_and_segments_the_sample_study(stack, tmp_path):
    archive, srv, page = stack
    study = archive.get("/dicom-web/studies").json()[0]["0020000D"]["Value"][0]
    series = archive.series["lung1"]

    page.goto(f"{srv.url}/ohif/", wait_until="domcontentloaded")
    page.get_by_text("SAMPLE-LUNG1").first.wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "1-study-list.png"))
    assert "SAMPLE, LUNG1" in page.inner_text("body")

    page.goto(f"{srv.url}/ohif/monai-label?StudyInstanceUIDs={study}", wait_until="domcontentloaded")
    page.locator("#monailabelServerURL").wait_for(timeout=90_000)
    page.get_by_text("Confirm and Hide").click()
    page.fill("#monailabelServerURL", srv.url + "/")
    page.locator("table.settingsTable button.actionButton").first.click()
    page.get_by_text("Class Prompts").first.wait_for(timeout=30_000)
    page.wait_for_timeout(2000)  # the panel creates its labelmap a second after connecting
    page.screenshot(path=str(ARTIFACTS / "2-monai-label-mode.png"))

    # class prompt: tick "right lung", Run
    tab = page.locator("div.tab", has=page.locator("label.tab-label", has_text="Class Prompts"))
    tab.locator("label.tab-label").click()
    tab.locator("table.optionsTable tr").filter(has_text="right lung").first.locator("input[type=checkbox]").check()
    with page.expect_response(lambda r: "/infer/segvol?" in r.url, timeout=120_000) as resp:
        tab.locator("button.actionButton", has_text="Run").click()
    assert resp.value.status == 200
    sent = params(page.sent[-1])
    assert sent["label_prompt"] == [RIGHT_LUNG] and sent["result_dtype"] == "uint8"
    page.wait_for_timeout(3000)
    page.screenshot(path=str(ARTIFACTS / "3-class-prompt.png"))
    counts = page.evaluate(LABELMAP_COUNTS)
    expected = int((server_result(srv, series, sent, tmp_path) == RIGHT_LUNG).sum())
    segment = str(_segment_index(srv.info, "right lung"))
    assert counts["n"] == 512 * 512 * 48 and expected > 0
    assert counts["counts"] == {segment: expected}

    # point prompt: pick the class, click twice in the axial viewport, Run
    point_prompt(page, "right lung", ((0.27, 0.53), (0.33, 0.58)))
    sent = params(page.sent[-1])
    assert sent["label_prompt"] == [RIGHT_LUNG] and sent["point_labels"] == [1, 1] and len(sent["points"]) == 2
    assert all(0 <= i < 512 and 0 <= j < 512 and 0 <= k < 48 for i, j, k in sent["points"])
    page.wait_for_timeout(3000)
    page.screenshot(path=str(ARTIFACTS / "4-point-prompt.png"))
    counts = page.evaluate(LABELMAP_COUNTS)
    expected = int((server_result(srv, series, sent, tmp_path) == RIGHT_LUNG).sum())
    assert counts["counts"] == {segment: expected}


@pytest.mark.parametrize(
    ("old", "new", "said"),
    [
        # another build of OHIF than the shim's (here: the shim expects another app bundle)
        (
            "APP_BUNDLE = 'app.bundle.af87d1dd396d277eac89.js'",
            "APP_BUNDLE = 'app.bundle.0123456789abcdef0123.js'",
            "this page runs OHIF from app.bundle.af87d1dd396d277eac89.js, another build.",
        ),
        # a webpack module id the build does not have
        ("id: 86326", "id: 99999999", "webpack module 99999999 (react) is not in this OHIF build."),
    ],
    ids=["another-build", "missing-module"],
)
def test_the_segvol_mode_fails_loudly_on_an_ohif_it_was_not_written_for(stack, old, new, said):
    """ohif-shim.js refuses an OHIF build that is not its own: a console error, the reason in the
    SegVol panel (in place of the workspace) and a red bar on the page."""
    archive, srv, page = stack
    study = archive.get("/dicom-web/studies").json()[0]["0020000D"]["Value"][0]
    context = page.context.browser.new_context(viewport={"width": 1600, "height": 1000}, service_workers="block")
    other = context.new_page()
    errors = []
    other.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    def altered(route):
        response = route.fetch()
        body = response.text()
        assert old in body
        route.fulfill(response=response, body=body.replace(old, new))

    other.route("**/ohif/app-config.js", altered)
    try:
        other.goto(f"{srv.url}/ohif/segvol?StudyInstanceUIDs={study}", wait_until="domcontentloaded")
        other.locator("#segvol-ohif-error").filter(has_text=said).wait_for(timeout=120_000)
        headline = "SegVol mode: written for OHIF 3.10.0-beta.5 (app.bundle.af87d1dd396d277eac89.js)"
        if "APP_BUNDLE" in old:
            headline = headline.replace("af87d1dd396d277eac89", "0123456789abcdef0123")
        assert headline in other.inner_text("#segvol-ohif-error")
        # the panel says it too, in place of the workspace, white on red
        panel = other.locator("#segvol-ohif-problem").filter(has_text=said)
        panel.wait_for(timeout=30_000)
        assert panel.evaluate("e => getComputedStyle(e).color") == "rgb(255, 255, 255)"
        assert headline in panel.inner_text() and other.locator("#segvol-workspace").count() == 0
        other.screenshot(path=str(ARTIFACTS / f"5-wrong-ohif-{'build' if 'APP_BUNDLE' in old else 'module'}.png"))
        assert any("[segvol-label]" in e and said in e for e in errors), errors
    finally:
        context.close()
