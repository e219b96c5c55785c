"""OHIF in a real headless Chromium (Debian's) for the browser tests: launching it, the requests the
page sends, and the SegVol mode's page as an annotator drives it (open, next image, class prompt,
mouse strokes), with the page's labelmap and a SEG read back voxel by voxel on the (i, j, k) grid."""

from __future__ import annotations

import base64
import json
import shutil
import time

import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests
from phantom import make_phantom  # noqa: E402

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ANNOTATORS = ("Ada Lovelace", "Grace Hopper")

# The page's labelmap: raw bytes (index i + nx*j + nx*ny*k) and the labels of the segments in it.
PAGE_LABELMAP = """(segmentationId) => {
    const s = window.services.segmentationService;
    const data = s.getLabelmapVolume(segmentationId).voxelManager.getCompleteScalarDataArray();
    const segments = s.getSegmentation(segmentationId).segments;
    const names = {};
    let text = '';
    for (let i = 0; i < data.length; i += 0x8000) text += String.fromCharCode.apply(null, data.subarray(i, i + 0x8000));
    for (const v of new Set(data)) if (v) names[v] = segments[v].label;
    return {b64: btoa(text), names: names};
}"""
# The number of labelled voxels of the page's labelmap (-1 while there is none).
COUNT = """() => {
    const v = window.services.segmentationService.getLabelmapVolume('1');
    if (!v) return -1;
    const d = v.voxelManager.getCompleteScalarDataArray();
    let n = 0;
    for (let i = 0; i < d.length; i++) if (d[i]) n++;
    return n;
}"""
VIEWPORT_BOX = """(id) => {
    const el = [...document.querySelectorAll('[data-viewport-uid], [data-viewportid]')].find(
        e => (e.getAttribute('data-viewport-uid') || e.getAttribute('data-viewportid')) === id);
    const r = el.getBoundingClientRect();
    return {x: r.x, y: r.y, width: r.width, height: r.height};
}"""


def chromium() -> str:
    """Debian's Chromium (never Playwright's download)."""
    path = shutil.which("chromium")
    if not path:
        pytest.fail("Debian's chromium is not installed (SEGVOL_BROWSER=1 bash scripts/setup.sh installs it)")
    return path


def params(request) -> dict:
    """The JSON parameters of a request the page sent (a form field or the body)."""
    body = request.post_data
    start = body.index("{")
    return json.loads(body[start : body.rindex("}") + 1])


def server_result(srv, image: str, body: dict, tmp_path) -> np.ndarray:
    """What the server answers to ``body`` for ``image``, as a label volume."""
    r = requests.post(
        f"{srv.url}/infer/segvol",
        params={"image": image, "output": "image"},
        files={"params": (None, json.dumps(body))},
        timeout=300,
    )
    r.raise_for_status()
    (tmp_path / "result.nrrd").write_bytes(r.content)
    return nrrd.read(str(tmp_path / "result.nrrd"))[0]


def phantom_studies(folder):
    """Three CTs: two synthetic abdomens of different sizes and a third with another seed."""
    folder.mkdir(parents=True)
    for name, shape, seed in (
        ("abdomen1", (160, 128, 24), 1),
        ("abdomen2", (144, 128, 20), 2),
        ("abdomen3", (128, 112, 20), 3),
    ):
        image, _, affine = make_phantom(shape, (2.0, 2.0, 5.0), seed=seed)
        nib.save(nib.Nifti1Image(image, affine), str(folder / f"{name}.nii.gz"))
    return folder


# ---------------------------------------------------------------- the SegVol mode's page


def open_mode(page, srv, study: str, series: str | None = None):
    url = f"{srv.url}/ohif/segvol?StudyInstanceUIDs={study}"
    if series:
        url += f"&initialSeriesInstanceUID={series}"
    page.goto(url, wait_until="domcontentloaded")
    wait_ready(page)


def wait_ready(page):
    page.locator("#segvol-workspace").wait_for(timeout=120_000)
    page.locator(".monaiLabelPanel .subtitle").wait_for(timeout=60_000)  # the panel connected by itself
    page.wait_for_function("() => window.services.segmentationService.getLabelmapVolume('1')", timeout=30_000)
    hide = page.get_by_text("Confirm and Hide")
    if hide.count():
        hide.click()
    problems = page.evaluate("() => window.segvolOhif.problems()")  # ohif-shim.js: this OHIF is its own
    assert problems == [], problems


def set_annotator(page):
    field = page.locator("#segvol-annotator")
    field.fill(page.annotator)
    field.blur()


def series_in_view(page) -> str:
    return page.evaluate(
        """() => { const s = window.services; const vp = s.viewportGridService.getState();
        const uid = vp.viewports.get(vp.activeViewportId).displaySetInstanceUIDs[0];
        return s.displaySetService.getDisplaySetByUID(uid).SeriesInstanceUID; }"""
    )


def next_image(page) -> str:
    page.locator("#segvol-next").click()
    page.wait_for_url("**/ohif/segvol?*initialSeriesInstanceUID=*", timeout=60_000)
    wait_ready(page)
    return page.evaluate("() => new URL(location.href).searchParams.get('initialSeriesInstanceUID')")


def class_prompt(page, name: str, changes: bool = True):
    """Tick ``name`` in the MONAI Label panel's class prompts and Run; returns the infer response
    (with ``changes``, once the page's labelmap has changed)."""
    tab = page.locator("div.tab", has=page.locator("label.tab-label", has_text="Class Prompts"))
    tab.locator("label.tab-label").click()
    box = tab.locator("table.optionsTable tr").filter(has_text=name).first.locator("input[type=checkbox]")
    box.check()
    before = page.evaluate(COUNT)
    with page.expect_response(lambda r: "/infer/segvol?" in r.url, timeout=120_000) as resp:
        tab.locator("button.actionButton", has_text="Run").click()
    assert resp.value.status == 200, resp.value.text()
    if changes:
        until_changed(page, before)
    return resp.value


def point_prompt(page, name: str, clicks):
    """Pick ``name`` in the MONAI Label panel's point prompts, click at ``clicks`` (fractions of the
    axial viewport) and Run; returns the infer response."""
    tab = page.locator("div.tab", has=page.locator("label.tab-label", has_text="Point Prompts"))
    tab.locator("label.tab-label").click()
    tab.locator("select.selectBox").select_option("segvol")
    tab.locator("tr.clickable-row", has_text=name).first.click()
    box = viewport_box(page, "mpr-axial")
    for fx, fy in clicks:
        page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
        page.wait_for_timeout(500)
    with page.expect_response(lambda r: "/infer/segvol?" in r.url, timeout=120_000) as resp:
        tab.locator("button.actionButton", has_text="Run").click()
    assert resp.value.status == 200, resp.value.text()
    return resp.value


def viewport_box(page, viewport: str) -> dict:
    """The page rectangle of a viewport (``mpr-axial``...): x, y, width, height."""
    return page.evaluate(VIEWPORT_BOX, viewport)


def drag(page, box, start, end, steps=10):
    """A mouse stroke from ``start`` to ``end`` (fractions of ``box``)."""
    page.mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
    page.mouse.down()
    for n in range(1, steps + 1):
        f = n / steps
        x = start[0] + (end[0] - start[0]) * f
        y = start[1] + (end[1] - start[1]) * f
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
    page.mouse.up()


def until_changed(page, before: int, timeout: float = 30) -> tuple[int, float]:
    """The labelmap's voxel count once it differs from ``before``, and how long that took."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        n = page.evaluate(COUNT)
        if n != before:
            return n, time.perf_counter() - t0
        page.wait_for_timeout(50)
    raise AssertionError(f"the labelmap did not change within {timeout} s")


def page_labelmap(page, shape, segmentation="1") -> np.ndarray:
    """The page's labelmap as label names per voxel: an object array on the (i, j, k) grid."""
    got = page.evaluate(PAGE_LABELMAP, segmentation)
    raw = np.frombuffer(base64.b64decode(got["b64"]), np.uint8).reshape(shape, order="F")
    return named(raw, {int(k): v for k, v in got["names"].items()})


def named(values: np.ndarray, names: dict[int, str]) -> np.ndarray:
    """Label values -> label names (an object array, "" where unlabelled)."""
    out = np.full(values.shape, "", dtype=object)
    for v, name in names.items():
        out[values == v] = name
    return out


# ---------------------------------------------------------------- the archive's side


def seg_labelmap(seg, shape) -> np.ndarray:
    """A SEG read frame by frame with pydicom: segment label per voxel on the (i, j, k) grid. Each
    frame's slice k comes from the CT instance it is derived from (InstanceNumber - 1 in our series,
    known after ``index_instances``)."""
    out = np.full(shape, "", dtype=object)
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    sop_to_k = {}
    for f, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        sop = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = sop_to_k.setdefault(sop, slice_of(sop))
        out[:, :, k][frames[f].T.astype(bool)] = labels[number]
    return out


_INSTANCE_K: dict[str, int] = {}


def slice_of(sop: str) -> int:
    return _INSTANCE_K[sop]


def index_instances(archive, series: str) -> None:
    """SOPInstanceUID -> slice k (InstanceNumber - 1, as scripts/dicom_series.py writes them)."""
    for inst in archive.get("/dicom-web/instances", params={"SeriesInstanceUID": series}).json():
        _INSTANCE_K[inst["00080018"]["Value"][0]] = int(inst["00200013"]["Value"][0]) - 1


def shape_of(archive, series: str) -> tuple[int, int, int]:
    inst = archive.get("/dicom-web/instances", params={"SeriesInstanceUID": series}).json()
    return int(inst[0]["00280011"]["Value"][0]), int(inst[0]["00280010"]["Value"][0]), len(inst)


def seg_of(archive, series: str, seg_series: str):
    """The SEG of ``series`` in the archive whose SeriesInstanceUID is ``seg_series``."""
    (found,) = [d for d in archive.segs(series) if d.SeriesInstanceUID == seg_series]
    return found


def message(page, text: str, timeout: float = 60_000) -> str:
    """The workspace's message line once it says ``text``; what it says instead when it never does."""
    from playwright.sync_api import TimeoutError as Timeout

    try:
        page.locator("#segvol-message").filter(has_text=text).wait_for(timeout=timeout)
    except Timeout as e:
        raise AssertionError(f"waited for {text!r}; the page says: {page.inner_text('#segvol-message')}") from e
    return page.inner_text("#segvol-message")
