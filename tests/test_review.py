"""Review and double reading over REST, on real server processes with a folder datastore: roles
(``--conf reviewers``), return -> resubmit -> approve, a reviewer's correction measured against the
annotator's label, two reviewers at once, a double reading blind until both are in with its
agreement checked against an independent count, adjudication, the team figures, and all of it
the same in a second server process started on the same datastore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import phantom
from lib.team.double_reading import chosen
from server import ROOT, Server

pytestmark = pytest.mark.server
SHAPE = (64, 48, 16)
SPACING = (2.0, 2.0, 5.0)
FRACTION = 0.5
CONF = {
    "weights": "seeded",
    "model_config": "segvol-tiny",
    "reviewers": "Rita,Rex",
    "double_read_fraction": str(FRACTION),
}
NAMES = [f"ct{n}" for n in range(40)]
SINGLE = [n for n in NAMES if not chosen(n, FRACTION)]
DOUBLE = [n for n in NAMES if chosen(n, FRACTION)]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    studies = tmp_path_factory.mktemp("studies")
    for name in SINGLE[:10] + DOUBLE[:2]:
        nib.save(nib.Nifti1Image(phantom(SHAPE), np.diag([*SPACING, 1.0])), str(studies / f"{name}.nii.gz"))
    return studies


@pytest.fixture(scope="module")
def server(studies):
    with Server(studies, CONF, studies.parent / "server.log") as srv:
        yield srv


def _box(value: int, i0: int, size: int = 10) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[i0 : i0 + size, 5:15, 2:8] = value
    return label


def _save(srv, image: str, client: str, label: np.ndarray, names: list[str], **params) -> requests.Response:
    body = {"client_id": client, "label_info": [{"name": n} for n in names], **params}
    return requests.put(
        f"{srv.url}/datastore/label",
        params={"image": image, "tag": "final"},
        files={"params": (None, json.dumps(body)), "label": ("label.bin", label.tobytes(order="F"))},
        timeout=120,
    )


def _review(srv, client: str, version: int, action: str, **body) -> requests.Response:
    return requests.post(
        f"{srv.url}/segvol/review", json={"client_id": client, "version": version, "action": action, **body}, timeout=60
    )


def _get(srv, path: str, **params) -> requests.Response:
    return requests.get(f"{srv.url}{path}", params=params, timeout=60)


def _voxels(response: requests.Response) -> np.ndarray:
    return np.frombuffer(response.content, np.uint8).reshape(SHAPE, order="F")


def test_roles_and_who_may_review(server):
    assert _get(server, "/segvol/whoami", client_id="Rita").json()["roles"] == ["annotator", "reviewer"]
    ada = _get(server, "/segvol/whoami", client_id="Ada").json()
    assert ada["roles"] == ["annotator"] and ada["train_on"] == "approved"  # reviewers named: approved by default
    saved = _save(server, SINGLE[0], "Ada", _box(1, 5), ["liver"])
    assert saved.status_code == 200, saved.text
    version = saved.json()["version"]
    assert saved.json()["review"] == {"state": "submitted"}
    refused = _review(server, "Ada", version, "approve")
    assert refused.status_code == 403 and "Ada is not a reviewer" in refused.json()["detail"]
    assert _get(server, "/segvol/review/queue", client_id="Ada").status_code == 403
    assert _get(server, "/segvol/team", client_id="Ada").status_code == 403
    assert _review(server, "Rita", 10**9, "approve").status_code == 404
    bad = _review(server, "Rita", version, "delete")
    assert bad.status_code == 422 and "action" in bad.text
    # a reviewer's own label goes to another reviewer (--conf self_review false)
    own = _save(server, SINGLE[1], "Rex", _box(1, 5), ["liver"]).json()["version"]
    assert _review(server, "Rex", own, "approve").status_code == 403
    assert own not in [i["version"] for i in _get(server, "/segvol/review/queue", client_id="Rex").json()["items"]]
    assert _review(server, "Rita", own, "approve").json()["state"] == "approved"


def test_returned_then_given_back_first_resubmitted_and_approved(server):
    image = SINGLE[2]
    v1 = _save(server, image, "Abel", _box(1, 5), ["liver"]).json()["version"]
    queue = _get(server, "/segvol/review/queue", client_id="Rita", annotator="Abel", category="liver").json()["items"]
    item = next(i for i in queue if i["version"] == v1)
    assert item["segments"][0]["name"] == "liver" and item["segments"][0]["type"] == "MANUAL"
    assert item["model_version"] and item["minutes_waiting"] >= 0
    assert _get(server, "/segvol/review/queue", client_id="Rita", category="spleen").json()["items"] == []
    no_comment = _review(server, "Rita", v1, "return", comment=" ")
    assert no_comment.status_code == 400 and "needs a comment" in no_comment.json()["detail"]
    back = _review(server, "Rita", v1, "return", comment="too small", segments={"liver": "misses the dome"})
    assert back.status_code == 200 and back.json()["state"] == "returned"

    returned = _get(server, "/segvol/review/returned", client_id="Abel").json()["items"]
    assert [r["version"] for r in returned] == [v1] and returned[0]["comment"] == "too small"
    nxt = requests.post(f"{server.url}/activelearning/random", json={"client_id": "Abel"}, timeout=60).json()
    assert nxt["id"] == image and nxt["returned"]["segments"] == {"liver": "misses the dome"}

    v2 = _save(server, image, "Abel", _box(1, 5, 14), ["liver"]).json()["version"]
    item = next(i for i in _get(server, "/segvol/review/queue", client_id="Rita").json()["items"] if i["version"] == v2)
    assert item["resubmits"]["version"] == v1 and item["resubmits"]["comment"] == "too small"
    assert _get(server, "/segvol/review/returned", client_id="Abel").json()["items"] == []
    assert _review(server, "Rita", v1, "approve").status_code == 409  # the returned one was resubmitted
    assert _review(server, "Rita", v2, "approve").json()["state"] == "approved"
    late = _review(server, "Rex", v2, "return", comment="no")
    assert late.status_code == 409 and late.json()["detail"]["by"] == "Rita"
    events = [e["action"] for e in _get(server, "/segvol/review/image", image=image, client_id="Abel").json()["events"]]
    assert events == ["submitted", "returned", "resubmitted", "submitted", "approved"]


def test_two_reviewers_at_once_one_wins_and_the_other_is_told(server):
    version = _save(server, SINGLE[3], "Ada", _box(1, 5), ["liver"]).json()["version"]
    answers: list[requests.Response] = []
    barrier = threading.Barrier(2)

    def act(who: str, action: str) -> None:
        barrier.wait()
        answers.append(_review(server, who, version, action, comment="redo"))

    threads = [threading.Thread(target=act, args=a) for a in (("Rita", "approve"), ("Rex", "return"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.status_code for a in answers) == [200, 409]
    lost = next(a for a in answers if a.status_code == 409).json()["detail"]
    won = next(a for a in answers if a.status_code == 200).json()
    assert lost["by"] == won["reviewer"] and won["state"] in lost["message"]


def test_a_correction_is_the_reviewers_version_measured_against_the_annotators(server):
    image = SINGLE[4]
    v1 = _save(server, image, "Ada", _box(1, 5), ["liver"]).json()["version"]
    # not a reviewer: refused before anything is stored
    assert _save(server, image, "Ada", _box(1, 5), ["liver"], review_of=v1).status_code == 403
    corrected = _box(1, 8)  # shifted by 3 voxels along i: 3 slabs of 10x6 added, 3 removed
    r = _save(server, image, "Rita", corrected, ["liver"], review_of=v1)
    assert r.status_code == 200, r.text
    v2 = r.json()["version"]
    assert r.json()["review"] == {"state": "approved", "review_of": v1, "ended": "corrected"}
    history = _get(server, "/segvol/labels", image=image).json()
    assert history[0]["version"] == v2 and history[0]["client"] == "Rita"
    labels = {
        x["version"]: x for x in _get(server, "/segvol/review/image", image=image, client_id="Rita").json()["labels"]
    }
    assert labels[v1]["state"] == "corrected" and labels[v1]["by_save"] == v2
    assert labels[v2]["changes"] == {"liver": {"added": 3 * 10 * 6, "removed": 3 * 10 * 6}}
    assert _save(server, image, "Rex", corrected, ["liver"], review_of=v1).status_code == 409  # done already


def test_double_reading_blind_measured_and_adjudicated(server):
    image = DOUBLE[0]
    a, b = _box(1, 5), _box(1, 9)
    va = _save(server, image, "Ada", a, ["liver"], based_on=0).json()
    assert va["review"] == {"state": "waiting"}
    # Bob sees nothing of Ada's reading: no label, no history, no newest label, no reading
    assert _get(server, "/segvol/labels/voxels", image=image, client_id="Bob").status_code == 404
    assert _get(server, "/datastore/label", label=image, tag="final", client_id="Bob").status_code == 404
    assert _get(server, "/segvol/labels", image=image, client_id="Bob").json() == []
    status = _get(server, "/segvol/status", image=image, client_id="Bob").json()
    assert status["newest_label"] is None
    assert _get(server, "/segvol/reading", version=va["version"], client_id="Bob").status_code == 403
    assert _get(server, "/segvol/labels/voxels", image=image, client_id="Ada").status_code == 200
    assert _review(server, "Rita", va["version"], "approve").status_code == 409  # not both in yet
    # Bob's save started from nothing is no conflict with Ada's hidden reading
    vb = _save(server, image, "Bob", b, ["liver"], based_on=0)
    assert vb.status_code == 200, vb.text
    vb = vb.json()
    assert vb["review"] == {"state": "submitted", "pair": va["version"]}
    assert len(_get(server, "/segvol/labels", image=image, client_id="Bob").json()) == 2  # both in: shown

    item = next(
        i for i in _get(server, "/segvol/review/queue", client_id="Rita").json()["items"] if i["image"] == image
    )
    assert item["double_read"]["annotators"] == ["Ada", "Bob"]
    (figures,) = item["double_read"]["agreement"]
    overlap = int(((a > 0) & (b > 0)).sum())
    assert figures["dice"] == pytest.approx(2 * overlap / ((a > 0).sum() + (b > 0).sum()), abs=1e-4)
    assert figures["ml"] == [pytest.approx((a > 0).sum() * np.prod(SPACING) / 1000, abs=0.05)] * 2
    both = [_get(server, "/segvol/reading", version=v, client_id="Rita") for v in item["double_read"]["versions"]]
    assert np.array_equal(_voxels(both[0]) > 0, a > 0) and np.array_equal(_voxels(both[1]) > 0, b > 0)

    adopted = _review(server, "Rita", va["version"], "adopt")
    assert adopted.status_code == 200, adopted.text
    final = _get(server, "/segvol/labels/voxels", image=image, client_id="Bob")
    assert np.array_equal(_voxels(final) > 0, a > 0)  # Ada's reading is the image's final label
    labels = {
        x["version"]: x for x in _get(server, "/segvol/review/image", image=image, client_id="Rita").json()["labels"]
    }
    assert labels[va["version"]]["state"] == labels[vb["version"]]["state"] == "adjudicated"
    assert labels[adopted.json()["new_version"]]["state"] == "approved"
    assert _review(server, "Rex", vb["version"], "adopt").status_code == 409


def test_team_figures_and_csv(server):
    image = SINGLE[6]
    v1 = _save(server, image, "Cleo", _box(1, 5), ["liver"]).json()["version"]
    assert _review(server, "Rita", v1, "return", comment="redo").status_code == 200
    v2 = _save(server, image, "Cleo", _box(1, 6), ["liver"]).json()["version"]
    assert _review(server, "Rita", v2, "approve").status_code == 200
    figures = _get(server, "/segvol/team", client_id="Rita").json()
    people = {p["client"]: p for p in figures["annotators"]}
    assert (people["Cleo"]["saved"], people["Cleo"]["approved"], people["Cleo"]["returned"]) == (2, 1, 1)
    liver = next(c for c in figures["categories"] if c["name"] == "liver")
    assert liver["reviewed"] >= liver["returned"] >= 1 and 0 < liver["return_rate"] <= 1
    csv = _get(server, "/segvol/team", client_id="Rita", format="csv")
    assert csv.headers["content-type"].startswith("text/csv") and csv.text.splitlines()[0] == "annotators"


def _queue(srv) -> list[dict]:
    """The queue less the minutes each label has waited (which grow while the test runs)."""
    items = _get(srv, "/segvol/review/queue", client_id="Rita").json()["items"]
    return [{k: v for k, v in i.items() if k != "minutes_waiting"} for i in items]


def test_review_state_and_figures_hold_in_a_second_process(server, studies, tmp_path_factory):
    """A second server process on the same datastore (a restart or a replica) sees the same."""
    queue = _queue(server)
    figures = _get(server, "/segvol/team", client_id="Rita").json()
    log = tmp_path_factory.mktemp("second") / "server.log"
    with Server(studies, CONF, log) as second:
        assert _queue(second) == queue
        assert _get(second, "/segvol/team", client_id="Rita").json() == figures
        image = DOUBLE[1]
        va = _save(second, image, "Ada", _box(1, 5), ["liver"]).json()["version"]
    assert _get(server, "/segvol/labels/voxels", image=image, client_id="Bob").status_code == 404  # blind here too
    vb = _save(server, image, "Bob", _box(1, 6), ["liver"]).json()
    assert vb["review"]["pair"] == va


def test_the_slicer_reviewer_modules_conventions(server):
    """3D Slicer's reviewer module (MONAILabelReviewer) reads ``segmentationMeta`` from a final label's
    info in the datastore listing and sends it back through PUT /datastore/updatelabelinfo."""
    image = SINGLE[5]
    version = _save(server, image, "Ada", _box(1, 5), ["liver"]).json()["version"]

    def send(meta: dict) -> requests.Response:
        body = {"params": json.dumps({"segmentationMeta": meta})}
        return requests.put(
            f"{server.url}/datastore/updatelabelinfo", params={"label": image, "tag": "final"}, data=body, timeout=60
        )

    meta = {"status": "flagged", "approvedBy": "Rita", "level": "hard", "comment": "the dome", "editTime": 1}
    assert send(dict(meta, approvedBy="Ada")).status_code == 403  # not a reviewer
    assert send(dict(meta, status="maybe")).status_code == 400
    flagged = send(meta)
    assert flagged.status_code == 200, flagged.text
    assert flagged.json()["segmentationMeta"]["status"] == "flagged"
    listed = _get(server, "/datastore/", output="all").json()["objects"][image]["labels"]["final"]["info"]
    assert listed["segmentationMeta"]["status"] == "flagged" and listed["segmentationMeta"]["comment"] == "the dome"
    returned = _get(server, "/segvol/review/returned", client_id="Ada").json()["items"]
    assert version in [r["version"] for r in returned]
    # any other rewrite of a label's info stays off without sign-in (--conf datastore_changes)
    other = requests.put(
        f"{server.url}/datastore/updatelabelinfo",
        params={"label": image, "tag": "final"},
        data={"params": json.dumps({"client": "Eve"})},
        timeout=60,
    )
    assert other.status_code == 403


def test_a_round_from_the_command_line_learns_from_approved_labels_only(server, studies, tmp_path):
    """``python apps/segvol round`` reads the same team store: only approved labels, each listed with
    its state in the version's metadata."""
    for image, approve in ((SINGLE[7], True), (SINGLE[8], True), (SINGLE[9], False)):
        version = _save(server, image, "Dora", _box(1, 5), ["liver"]).json()["version"]
        if approve:
            assert _review(server, "Rita", version, "approve").status_code == 200
    states = {
        x["image"]: x["state"]
        for image in SINGLE[:10] + DOUBLE[:2]
        for x in _get(server, "/segvol/review/image", image=image, client_id="Rita").json()["labels"][:1]
    }
    approved = sorted(image for image, state in states.items() if state == "approved")
    assert len(approved) >= 2 and len(approved) < len(states)  # some are not: submitted, returned, a pair
    conf = dict(CONF, versions_dir=str(tmp_path / "versions"), train_windows="1")
    args = [x for k, v in conf.items() for x in ("--conf", k, v)]
    out = tmp_path / "round.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "apps" / "segvol"), "round", "--studies", str(studies), *args, "--steps", "2"]
        + ["--output", str(out)],
        env=dict(os.environ, PYTHONPATH=f"{ROOT / 'apps' / 'segvol'}{os.pathsep}{ROOT}", HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["train_on"] == "approved", result
    assert sorted(x["image"] for x in result["labels"]) == approved
    assert {x["state"] for x in result["labels"]} == {"approved"}
