"""Review and double reading in OHIF's SegVol mode, in a real headless Chromium, on a real Orthanc
and a real MONAI Label server (--conf reviewers, double_read_fraction 0.5, train_on approved).

The story of issue #22: Ada saves a label; Rita (a reviewer) finds it in her To review list,
opens it and returns it with a comment; Ada sees the comment, Next image hands her that image
first, she fixes it and saves (resubmitted); Rita and Rosalind (reviewers both) act on it at once:
Rita's approval wins and Rosalind is told; Rita corrects Grace's label of another image (approved,
its changes measured); the double-read image goes to Ada and Grace, blind, both save, Rita sees
the agreement (checked here against MONAI's metrics on the SEGs fetched from Orthanc), switches
between the readings and adopts one, which becomes the final label; the team's figures show in
the page; a round learns from the approved labels only. Every SEG passes dciodvfy.
The reviewer's and the annotators' actions go through the page; Grace's saves through REST.
Screenshots go to build/test-artifacts/ohif-review/ (docs/review.md uses them)."""

from __future__ import annotations

import base64
import json
import time

import nibabel as nib
import numpy as np
import pytest
import requests
from phantom import make_phantom  # noqa: E402

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
    message,
    open_mode,
    page_labelmap,
    seg_labelmap,
    seg_of,
    set_annotator,
    shape_of,
    viewport_box,
    wait_ready,
)
from server import run_round

pytestmark = pytest.mark.e2e
ARTIFACTS = ROOT / "build" / "test-artifacts" / "ohif-review"
ADA, GRACE = ANNOTATORS
RITA, ROSALIND = "Rita Reviewer", "Rosalind Franklin"
# four phantom CTs; with double_read_fraction 0.5 the server reads review2 twice (its series UID's
# SHA-256 is below half), the others once: the test asks the server which, and uses the answer
NAMES = ("review1", "review2", "review3", "review7")
SHAPE, SPACING = (128, 112, 20), (2.0, 2.0, 5.0)
CONF = {
    "zoom_in": "false",
    "reviewers": f"{RITA},{ROSALIND}",
    "double_read_fraction": "0.5",
    "train_on": "approved",
    "train_steps": "10",
    "train_lr": "3e-3",
    "promote_min_gain": "-1",
    "promote_replay_margin": "1",
    "archive_refresh_seconds": "2",
}
# a label written into the page's labelmap as segment "liver" (what a brush would leave, made exact)
PAINT = """(b64) => {
    const raw = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const { segments } = window.segvolSegments;
    const index = segments.choose('liver');
    const data = window.segvolOhif.labelmapData();
    for (let i = 0; i < data.length; i++) data[i] = raw[i] ? index : 0;
    window.segvolOhif.setLabelmap(data);
    window.segvolWorkspace.set({ active: segments.active() });
    return index;
}"""
ARRIVED = "(image) => window.segvolWorkspace.image === image && !window.segvolWorkspace.arriving"


def _studies(folder):
    folder.mkdir(parents=True)
    livers = {}
    for seed, name in enumerate(NAMES, start=1):
        image, label, affine = make_phantom(SHAPE, SPACING, seed=seed)
        nib.save(nib.Nifti1Image(image, affine), str(folder / f"{name}.nii.gz"))
        livers[name] = (label == 1).astype(np.uint8)
    return livers


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    work = tmp_path_factory.mktemp("ohif-review")
    livers = _studies(work / "studies")
    with (
        Archive(work / "orthanc", studies=work / "studies") as archive,
        dicomweb_server(archive.url, work, **CONF) as srv,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        pages = {}
        for name in (ADA, RITA, ROSALIND):
            page = browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
            page.errors, page.dialogs = [], []
            page.on("pageerror", lambda e, page=page: page.errors.append(str(e)))
            page.on("dialog", lambda d, page=page: (page.dialogs.append(d.type), d.accept()))
            page.annotator = name
            pages[name] = page
        yield archive, srv, pages, livers, work
        browser.close()


# ---------------------------------------------------------------- the page, as people use it


def _save(page, button: str = "#segvol-save"):
    from playwright.sync_api import TimeoutError as Timeout

    try:
        with page.expect_response(lambda r: "/datastore/label" in r.url, timeout=120_000) as resp:
            page.locator(button).click()
    except Timeout as e:
        raise AssertionError(f"{button} sent nothing; the page says: {page.inner_text('#segvol-message')}") from e
    assert resp.value.status == 200, resp.value.text()
    return resp.value.json()


def _brush(page, start, end) -> None:
    page.locator("[data-cy=panelSegmentationWithTools-btn]").click()
    page.locator("[data-cy=Brush]").click()
    before = page.evaluate(COUNT)
    drag(page, viewport_box(page, "mpr-axial"), start, end)
    page.wait_for_timeout(800)  # the page settles a stroke 250 ms after it ends
    assert page.evaluate(COUNT) != before, "the stroke painted nothing"


def _next_image(page) -> dict:
    """Next image: the server's answer (read on its way: the page then loads another URL, or the same
    one again), once the page it opens is ready."""
    answers = []

    def keep(route):
        answer = route.fetch(timeout=300_000)
        answers.append(answer.json())
        route.fulfill(response=answer)

    page.route("**/activelearning/**", keep)
    try:
        with page.expect_navigation(wait_until="domcontentloaded", timeout=300_000):
            page.locator("#segvol-next").click()
    finally:
        page.unroute("**/activelearning/**", keep)
    wait_ready(page)
    return answers[-1]


def _arrived(page, image: str) -> None:
    page.wait_for_function(ARRIVED, arg=image, timeout=60_000)


def _item(page, version: int, timeout: float = 60_000):
    row = page.locator(f"#segvol-review-item-{version}")
    row.wait_for(timeout=timeout)
    return row


def _pick(page, version: int, navigates: bool) -> None:
    """A row of the To review list clicked: its image opened (a page load unless it is in view)."""
    row = _item(page, version)
    if navigates:
        with page.expect_navigation(wait_until="domcontentloaded", timeout=120_000):
            row.click()
        wait_ready(page)
    else:
        row.click()


def _list(page) -> list[int]:
    return page.evaluate(
        "() => [...document.querySelectorAll('#segvol-review-list > li[id]')].map(e => Number(e.id.split('-').pop()))"
    )


def _labels(page, shape) -> np.ndarray:
    return page_labelmap(page, shape) == "liver"


def _shot(page, name: str, element: str | None = None) -> None:
    if element:
        page.locator(element).scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / name))


# ---------------------------------------------------------------- REST, where the browser adds nothing


def _get(srv, path: str, **params):
    return requests.get(f"{srv.url}{path}", params=params, timeout=60)


def _grace_saves(srv, image: str, label: np.ndarray) -> dict:
    r = requests.put(
        f"{srv.url}/datastore/label",
        params={"image": image, "tag": "final"},
        files={
            "params": (None, json.dumps({"client_id": GRACE, "label_info": [{"name": "liver"}]})),
            "label": ("label.bin", label.astype(np.uint8).tobytes(order="F")),
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _states(srv, image: str) -> dict[int, dict]:
    body = _get(srv, "/segvol/review/image", image=image, client_id=RITA).json()
    return {x["version"]: x for x in body["labels"]}


@pytest.fixture(scope="module")
def story(stack):
    """The whole story, step by step; what each step left behind, for the tests below."""
    archive, srv, pages, livers, work = stack
    ada, rita, rosalind = pages[ADA], pages[RITA], pages[ROSALIND]
    t0 = time.perf_counter()
    out = {"errors": []}
    series = {n: archive.series[n] for n in NAMES}
    for image in series.values():
        index_instances(archive, image)
    double = {
        n: _get(srv, "/segvol/review/image", image=s, client_id=RITA).json()["double_read"] for n, s in series.items()
    }
    out["double"] = double
    (d_name,) = [n for n in NAMES if double[n]]
    s_name, t_name, u_name = [n for n in NAMES if not double[n]]
    S, T, U, D = series[s_name], series[t_name], series[u_name], series[d_name]
    out.update(S=S, T=T, U=U, D=D, livers={series[n]: livers[n] for n in NAMES})
    shape = shape_of(archive, S)
    assert shape == SHAPE, shape
    out["shape"] = shape
    out["whoami"] = {n: _get(srv, "/segvol/whoami", client_id=n).json() for n in (ADA, GRACE, RITA, ROSALIND)}

    # Grace (REST): T once, U twice (the first superseded by the second before review)
    out["T by Grace"] = _grace_saves(srv, T, livers[t_name])
    out["U by Grace, first"] = _grace_saves(srv, U, livers[u_name])
    out["U by Grace"] = _grace_saves(srv, U, np.roll(livers[u_name], 1, axis=1))

    # Ada labels S in the page: a class prompt, saved untouched
    open_mode(ada, srv, archive.study_of(S), S)
    set_annotator(ada)
    _arrived(ada, S)
    class_prompt(ada, "liver")
    out["S v1"] = _save(ada)
    out["S v1 page"] = _labels(ada, shape)

    # Rita, on T: her To review list, oldest first; filters; Ada's label opened (the viewer goes to S)
    open_mode(rita, srv, archive.study_of(T), T)
    set_annotator(rita)
    v1 = out["S v1"]["version"]
    _item(rita, v1)
    out["queue order"] = _list(rita)
    out["queue text"] = rita.inner_text("#segvol-review-list")
    rita.select_option("#segvol-review-annotator", ADA)
    rita.wait_for_function("() => document.querySelectorAll('#segvol-review-list > li[id]').length === 1")
    out["filtered by Ada"] = _list(rita)
    rita.select_option("#segvol-review-category", "spleen")
    rita.locator("#segvol-review-list").filter(has_text="Nothing waits for review").wait_for(timeout=30_000)
    out["filtered by spleen"] = _list(rita)
    rita.select_option("#segvol-review-category", "")
    rita.select_option("#segvol-review-annotator", "")
    rita.wait_for_function(
        f"() => document.querySelectorAll('#segvol-review-list > li[id]').length === {len(out['queue order'])}"
    )
    _shot(rita, "1-to-review.png")
    _pick(rita, v1, navigates=True)
    out["opened message"] = message(rita, f"Reviewing {ADA}'s label (version {v1}")
    _arrived(rita, S)
    out["S v1 in Rita's page"] = _labels(rita, shape)
    rita.fill("#segvol-return-comment", "The liver is noise: redraw it.")
    rita.fill("#segvol-return-segments", "liver: misses the right lobe")
    _shot(rita, "2-return-with-comment.png")
    with rita.expect_response(lambda r: r.url.endswith("/segvol/review"), timeout=60_000) as resp:
        rita.locator("#segvol-return").click()
    out["returned"] = (resp.value.status, resp.value.json())
    out["returned message"] = message(rita, "Returned")

    # Ada: the label is listed as returned, with the comment; Next image gives her S first
    ada.locator(f"#segvol-returned-item-{v1}").wait_for(timeout=60_000)
    out["returned list"] = ada.inner_text("#segvol-returned")
    out["next after return"] = _next_image(ada)
    _arrived(ada, S)
    message(ada, "Showing the image's final label")
    ada.locator("#segvol-review-comment").wait_for(timeout=30_000)
    out["comment box"] = ada.inner_text("#segvol-review-comment")
    _shot(ada, "3-returned-to-annotator.png")
    _brush(ada, (0.3, 0.35), (0.45, 0.45))
    out["S v2"] = _save(ada)
    out["S states after resubmit"] = _states(srv, S)
    v2 = out["S v2"]["version"]

    # Rita and Rosalind open the resubmitted label at once; Rita approves first, Rosalind is told
    open_mode(rosalind, srv, archive.study_of(S), S)
    set_annotator(rosalind)
    _arrived(rosalind, S)
    _pick(rosalind, v2, navigates=False)
    message(rosalind, f"Reviewing {ADA}'s label (version {v2}")
    out["resubmitted row"] = rosalind.inner_text(f"#segvol-review-item-{v2}")
    _pick(rita, v2, navigates=False)
    message(rita, f"Reviewing {ADA}'s label (version {v2}")
    with rita.expect_response(lambda r: r.url.endswith("/segvol/review"), timeout=60_000) as resp:
        rita.locator("#segvol-approve").click()
    out["approved"] = (resp.value.status, resp.value.json())
    out["approved message"] = message(rita, "Approved")
    with rosalind.expect_response(lambda r: r.url.endswith("/segvol/review"), timeout=60_000) as resp:
        rosalind.locator("#segvol-approve").click()
    out["second approval"] = (resp.value.status, resp.value.json())
    out["second approval message"] = message(rosalind, "Not approved (409)")
    _shot(rosalind, "4-approved-first.png")
    out["S states"] = _states(srv, S)

    # Rita corrects Grace's label of T: opened from the list, a brush stroke, Correct
    vt = out["T by Grace"]["version"]
    _pick(rita, vt, navigates=True)
    message(rita, f"Reviewing {GRACE}'s label (version {vt}")
    _arrived(rita, T)
    out["T before correction"] = _labels(rita, shape)
    _brush(rita, (0.25, 0.3), (0.4, 0.4))
    out["T corrected page"] = _labels(rita, shape)
    out["T corrected"] = _save(rita, "#segvol-correct")
    out["corrected message"] = message(rita, "Corrected")
    out["T states"] = _states(srv, T)

    # Double reading: Next image hands D to Ada and to Grace; Grace saves first; Ada sees nothing of it
    out["Ada next D"] = _next_image(ada)
    out["Grace next D"] = requests.post(
        f"{srv.url}/activelearning/first", json={"client_id": GRACE}, timeout=300
    ).json()
    out["D by Grace"] = _grace_saves(srv, D, livers[d_name])
    ada.reload(wait_until="domcontentloaded")
    wait_ready(ada)
    _arrived(ada, D)
    ada.wait_for_timeout(4000)  # the workspace asks /segvol/status every 3 s: nothing of Grace's shows
    out["Ada blind"] = {
        "count": ada.evaluate(COUNT),
        "history": ada.inner_text("#segvol-workspace"),
        "message": ada.inner_text("#segvol-message"),
        "labels": _get(srv, "/segvol/labels", image=D, client_id=ADA).json(),
        "voxels": _get(srv, "/segvol/labels/voxels", image=D, client_id=ADA),
        "reading": _get(srv, "/segvol/reading", version=out["D by Grace"]["version"], client_id=ADA).status_code,
        "status": _get(srv, "/segvol/status", image=D, client_id=ADA).json()["newest_label"],
    }
    ada_reading = np.roll(livers[d_name], 2, axis=0)  # Ada draws the liver two voxels to the left
    ada.evaluate(PAINT, base64.b64encode(ada_reading.tobytes(order="F")).decode())
    ada.wait_for_timeout(600)
    out["D by Ada"] = _save(ada)
    out["D by Ada page"] = _labels(ada, shape)
    out["Grace sees after both"] = _get(srv, "/segvol/labels", image=D, client_id=GRACE).json()

    # Rita: the pair in her list; both readings, switchable; the agreement; she adopts Ada's
    vg = out["D by Grace"]["version"]
    _item(rita, vg)
    out["pair row"] = rita.inner_text(f"#segvol-review-item-{vg}")
    _pick(rita, vg, navigates=True)
    message(rita, "Showing reading A")
    _arrived(rita, D)
    out["reading A page"] = _labels(rita, shape)
    out["agreement"] = rita.evaluate(
        """() => [...document.querySelectorAll('#segvol-agreement tbody tr')].map(r =>
            [...r.querySelectorAll('td')].map(c => c.innerText))"""
    )
    rita.locator("#segvol-reading-b").click()
    message(rita, "Showing reading B")
    out["reading B page"] = _labels(rita, shape)
    _shot(rita, "5-double-read.png", "#segvol-agreement")
    with rita.expect_response(lambda r: r.url.endswith("/segvol/review"), timeout=120_000) as resp:
        rita.locator("#segvol-approve").click()
    out["adopted"] = (resp.value.status, resp.value.json())
    out["adopted message"] = message(rita, "Adopted")
    out["D states"] = _states(srv, D)
    out["D final"] = _get(srv, "/segvol/labels/voxels", image=D, client_id=RITA)
    out["D history"] = _get(srv, "/segvol/labels", image=D, client_id=RITA).json()

    # the team's figures: in Rita's workspace, over REST and as CSV; none for Ada
    rita.locator("#segvol-team-annotators").filter(has_text=ADA).wait_for(timeout=60_000)
    rita.wait_for_timeout(11_000)  # the lists are asked again every 10 s: the adoption counted
    out["team page"] = rita.inner_text("#segvol-team")
    out["team chart"] = rita.evaluate(
        """() => [...document.querySelectorAll('#segvol-team-chart g')].map(g => ({client: g.dataset.client,
            bars: Object.fromEntries([...g.querySelectorAll('rect')].map(
                r => [r.dataset.kind, Number(r.getAttribute('width'))]))}))"""
    )
    _shot(rita, "6-team.png", "#segvol-team")
    out["team"] = _get(srv, "/segvol/team", client_id=RITA).json()
    out["team csv"] = _get(srv, "/segvol/team", client_id=RITA, format="csv")
    out["team for Ada"] = _get(srv, "/segvol/team", client_id=ADA).status_code
    out["Ada sections"] = ada.evaluate(
        "() => ['segvol-review-list', 'segvol-team'].map(id => !!document.getElementById(id))"
    )

    # a round: it learns from the approved labels only
    out["round"] = run_round(srv, 900)
    meta = work / "versions" / "v0001" / "meta.json"
    out["round meta"] = json.loads(meta.read_text()) if meta.is_file() else None
    out["errors"] = [e for p in pages.values() for e in p.errors]
    out["seconds"] = time.perf_counter() - t0
    print(f"\nthe review story took {out['seconds']:.0f} s")
    return out


# ---------------------------------------------------------------- what it showed


def test_roles_without_sign_in_are_the_configured_names(story):
    who = story["whoami"]
    assert (
        who[RITA]["reviewer"] and who[ROSALIND]["reviewer"] and not who[ADA]["reviewer"] and not who[GRACE]["reviewer"]
    )
    assert who[RITA]["train_on"] == "approved" and who[RITA]["double_read_fraction"] == 0.5
    assert sum(story["double"].values()) == 1, story["double"]


def test_the_reviewer_finds_the_label_in_an_oldest_first_list_and_opens_it(story):
    t, u, v1 = story["T by Grace"]["version"], story["U by Grace"]["version"], story["S v1"]["version"]
    assert story["queue order"] == [t, u, v1]  # the superseded first save of U is not listed
    assert story["U by Grace, first"]["version"] not in story["queue order"]
    assert ADA in story["queue text"] and "liver AUTOMATIC" in story["queue text"] and "MANUAL" in story["queue text"]
    assert story["filtered by Ada"] == [v1] and story["filtered by spleen"] == []
    # the label under review is the page's labelmap: Ada's saved voxels
    np.testing.assert_array_equal(story["S v1 in Rita's page"], story["S v1 page"])
    assert story["S v1 in Rita's page"].any()


def test_a_returned_label_comes_back_first_with_its_comment_and_is_resubmitted(story):
    status, body = story["returned"]
    assert status == 200 and body["state"] == "returned" and body["reviewer"] == RITA, body
    assert "The liver is noise" in story["returned list"]
    answer = story["next after return"]
    assert answer["id"] == story["S"] and answer["returned"]["comment"] == "The liver is noise: redraw it."
    assert answer["returned"]["segments"] == {"liver": "misses the right lobe"}
    box = story["comment box"]
    assert RITA in box and "The liver is noise: redraw it." in box and "misses the right lobe" in box
    v1, v2 = story["S v1"]["version"], story["S v2"]["version"]
    states = story["S states after resubmit"]
    assert states[v1]["state"] == "resubmitted" and states[v2]["state"] == "submitted", states
    assert {s["type"] for s in story["S v2"]["segments"]} == {"SEMIAUTOMATIC"}
    assert "resubmitted" in story["resubmitted row"]


def test_two_reviewers_at_once_one_wins_and_the_other_is_told(story):
    v2 = story["S v2"]["version"]
    status, body = story["approved"]
    assert status == 200 and body["state"] == "approved" and body["reviewer"] == RITA, body
    status, body = story["second approval"]
    assert status == 409 and body["detail"]["by"] == RITA and body["detail"]["state"] == "approved", body
    assert RITA in story["second approval message"]
    assert story["S states"][v2]["state"] == "approved" and story["S states"][v2]["reviewer"] == RITA


def test_a_correction_is_the_approved_final_label_with_its_changes_measured(story, stack):
    archive, srv, *_ = stack
    vt = story["T by Grace"]["version"]
    np.testing.assert_array_equal(story["T before correction"], story["livers"][story["T"]] == 1)
    saved = story["T corrected"]
    assert saved["review"]["state"] == "approved", saved  # the save's answer says so
    states = story["T states"]
    assert states[vt]["state"] == "corrected" and states[saved["version"]]["state"] == "approved", states
    (liver,) = saved["segments"]
    before, after = story["T before correction"], story["T corrected page"]
    assert liver["changes"] == {"added": int((after & ~before).sum()), "removed": int((before & ~after).sum())}
    seg = seg_of(archive, story["T"], saved["SeriesInstanceUID"])
    assert str(seg.ContentCreatorName) == "Reviewer^Rita"
    np.testing.assert_array_equal(seg_labelmap(seg, story["shape"]) == "liver", after)
    assert "approved" in story["corrected message"]


def test_double_reading_is_blind_until_both_are_in(story):
    d = story["D"]
    assert story["Ada next D"]["id"] == d and story["Ada next D"].get("double_read") is True
    assert story["Grace next D"]["id"] == d and story["Grace next D"].get("double_read") is True
    blind = story["Ada blind"]
    assert blind["count"] == 0  # the page arrived on D and showed nothing of Grace's
    assert GRACE not in blind["message"] and GRACE not in blind["history"]
    assert [x for x in blind["labels"] if x.get("client") == GRACE] == []
    assert blind["voxels"].status_code == 404 or not np.frombuffer(blind["voxels"].content, np.uint8).any()
    assert blind["reading"] == 403 and blind["status"] is None
    assert story["D by Ada"]["version"] in [x.get("version") for x in story["Grace sees after both"]]


def test_the_agreement_the_reviewer_sees_is_measured_right(story, stack):
    """The page's figures against MONAI's metrics on the two SEGs read back from Orthanc."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    archive, *_ = stack
    shape = story["shape"]
    grace = seg_labelmap(seg_of(archive, story["D"], story["D by Grace"]["SeriesInstanceUID"]), shape) == "liver"
    ada = seg_labelmap(seg_of(archive, story["D"], story["D by Ada"]["SeriesInstanceUID"]), shape) == "liver"
    np.testing.assert_array_equal(grace, story["livers"][story["D"]] == 1)
    np.testing.assert_array_equal(ada, story["D by Ada page"])
    np.testing.assert_array_equal(story["reading A page"], grace)  # reading A: Grace's (the earlier)
    np.testing.assert_array_equal(story["reading B page"], ada)
    a, b = (torch.from_numpy(m)[None, None].float() for m in (grace, ada))
    dice = float(compute_dice(a, b, include_background=True))
    mean = float(compute_average_surface_distance(a, b, include_background=True, symmetric=True, spacing=SPACING))
    p95 = float(compute_hausdorff_distance(a, b, include_background=True, percentile=95, spacing=SPACING))
    ml = np.prod(SPACING) / 1000
    (row,) = story["agreement"]
    name, *figures = row
    assert name == "liver"
    page = [float(x) for x in figures]
    assert page[0] == pytest.approx(dice, abs=1e-3)
    assert page[1] == pytest.approx(mean, abs=0.02) and page[2] == pytest.approx(p95, abs=0.02)
    assert page[3] == pytest.approx(grace.sum() * ml, abs=0.1) and page[4] == pytest.approx(ada.sum() * ml, abs=0.1)
    print(f"\nagreement: Dice {dice:.3f}, mean {mean:.2f} mm, 95% {p95:.2f} mm (page: {figures})")


def test_adjudication_makes_the_adopted_reading_the_final_label(story, stack):
    archive, *_ = stack
    vg, va = story["D by Grace"]["version"], story["D by Ada"]["version"]
    status, body = story["adopted"]
    assert status == 200 and body.get("new_version"), body
    states = story["D states"]
    assert states[vg]["state"] == states[va]["state"] == "adjudicated", states
    assert states[body["new_version"]]["state"] == "approved"
    final = np.frombuffer(story["D final"].content, np.uint8).reshape(story["shape"], order="F") != 0
    np.testing.assert_array_equal(final, story["D by Ada page"])  # the final label is Ada's reading
    newest = story["D history"][0]
    assert newest["version"] == body["new_version"] and newest["client"] == RITA, newest
    seg = seg_of(archive, story["D"], newest["seg_series"])
    np.testing.assert_array_equal(seg_labelmap(seg, story["shape"]) == "liver", story["D by Ada page"])
    assert str(seg.ContentCreatorName) == "Reviewer^Rita"


def test_team_figures_for_reviewers_in_the_page_and_as_csv(story):
    team = story["team"]
    people = {a["client"]: a for a in team["annotators"]}
    assert people[ADA]["approved"] >= 1 and people[ADA]["returned"] == 1 and people[GRACE]["saved"] >= 3
    assert ADA in story["team page"] and GRACE in story["team page"] and "liver" in story["team page"]
    bars = {g["client"]: g["bars"] for g in story["team chart"]}
    assert bars[ADA]["returned"] > 0 and bars[ADA]["approved"] > 0
    csv = story["team csv"]
    assert csv.status_code == 200 and "text/csv" in csv.headers["content-type"] and ADA in csv.text
    assert story["team for Ada"] == 403
    assert story["Ada sections"] == [False, False]  # no To review list, no figures for an annotator


def test_bad_review_requests_are_refused_naming_the_problem(story, stack):
    _, srv, *_ = stack
    post = lambda body: requests.post(f"{srv.url}/segvol/review", json=body, timeout=60)  # noqa: E731
    u, first = story["U by Grace"]["version"], story["U by Grace, first"]["version"]
    r = post({"client_id": ADA, "version": u, "action": "approve"})
    assert r.status_code == 403 and ADA in r.json()["detail"]
    r = post({"client_id": RITA, "version": 987654, "action": "approve"})
    assert r.status_code == 404 and "987654" in json.dumps(r.json())
    r = post({"client_id": RITA, "version": first, "action": "approve"})
    assert 400 <= r.status_code < 500 and "superseded" in json.dumps(r.json()), r.text
    r = post({"client_id": RITA, "version": u, "action": "return"})
    assert r.status_code == 400 and "comment" in json.dumps(r.json())
    assert _states(srv, story["U"])[u]["state"] == "submitted"  # nothing changed


def test_a_round_learns_from_approved_labels_only(story):
    status, meta = story["round"], story["round meta"]
    assert status["round"]["state"] == "done" and meta is not None, status
    labels = {x["image"]: x for x in meta["labels"]}
    assert set(labels) == {story["S"], story["T"], story["D"]}  # U's label was never approved
    assert labels[story["S"]]["label"] == story["S v2"]["SeriesInstanceUID"]
    assert labels[story["T"]]["label"] == story["T corrected"]["SeriesInstanceUID"]
    assert labels[story["D"]]["label"] == story["D history"][0]["seg_series"]
    assert {x.get("state") for x in meta["labels"]} == {"approved"}


def test_every_seg_passes_dciodvfy_and_the_pages_had_no_errors(story, stack):
    archive, *_ = stack
    segs = archive.segs()
    assert len(segs) >= 9
    assert {str(s.SeriesInstanceUID): dciodvfy_errors(s) for s in segs} == {str(s.SeriesInstanceUID): [] for s in segs}
    assert not story["errors"], story["errors"]
