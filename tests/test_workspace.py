"""The annotator's work over REST, on a real server with a folder datastore: a save that names the
version it started from is refused with 409 when a colleague's newer label exists (and nothing is
lost: both labels stay in the history), and unsaved work is autosaved per annotator, handed only
to that annotator, never listed as a label, and dropped by their final save."""

from __future__ import annotations

import gzip
import json
import threading

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import phantom
from lib.team.autosaves import Autosaves
from lib.team.conflicts import ConflictError, FinalSaves
from lib.team.provenance import Provenance
from lib.team.store import TeamStore, open_store
from server import Server

pytestmark = pytest.mark.server
SHAPE = (64, 48, 16)
LIVER, SPLEEN = 1, 32


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    studies = tmp_path_factory.mktemp("studies")
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(phantom(SHAPE), np.diag([2.0, 2.0, 5.0, 1.0])), str(studies / f"{name}.nii.gz"))
    with Server(studies, {"weights": "seeded", "model_config": "segvol-tiny"}, studies.parent / "server.log") as srv:
        yield srv


def _label(value: int, corner: int) -> bytes:
    label = np.zeros(SHAPE, np.uint8)
    label[corner : corner + 10, 5:15, 2:8] = value
    return label.tobytes(order="F")


def _save(srv, image: str, client: str, value: int, name: str, **params) -> requests.Response:
    body = {"client_id": client, "label_info": [{"name": name}], **params}
    return requests.put(
        f"{srv.url}/datastore/label",
        params={"image": image, "tag": "final"},
        files={"params": (None, json.dumps(body)), "label": ("label.bin", _label(value, 5 + value % 20))},
        timeout=120,
    )


def _history(srv, image: str) -> list[dict]:
    return requests.get(f"{srv.url}/segvol/labels", params={"image": image}, timeout=30).json()


def test_a_colleagues_newer_label_is_told_not_overwritten(server):
    first = _save(server, "a", "Ada Lovelace", LIVER, "liver", based_on=0)
    assert first.status_code == 200, first.text
    v1 = first.json()["version"]

    # Grace started from nothing too, but Ada saved meanwhile: 409 with who and when
    late = _save(server, "a", "Grace Hopper", SPLEEN, "spleen", based_on=0)
    assert late.status_code == 409, late.text
    detail = late.json()["detail"]
    assert detail["newest"]["client"] == "Ada Lovelace" and detail["newest"]["version"] == v1
    assert "Ada Lovelace saved a newer label" in detail["message"]
    assert [h["version"] for h in _history(server, "a")] == [v1]  # nothing stored

    # having opened Ada's version, Grace's save goes through
    second = _save(server, "a", "Grace Hopper", SPLEEN, "spleen", based_on=v1)
    assert second.status_code == 200, second.text
    v2 = second.json()["version"]

    # Ada, still on her own version, is told of Grace's; saving anyway keeps both
    assert _save(server, "a", "Ada Lovelace", LIVER, "liver", based_on=v1).status_code == 409
    forced = _save(server, "a", "Ada Lovelace", LIVER, "liver", based_on=v1, force=True)
    assert forced.status_code == 200, forced.text
    history = _history(server, "a")
    assert [h["version"] for h in history] == [forced.json()["version"], v2, v1]
    assert [h["client"] for h in history] == ["Ada Lovelace", "Grace Hopper", "Ada Lovelace"]
    status = requests.get(f"{server.url}/segvol/status", params={"image": "a", "client_id": "Grace Hopper"}, timeout=30)
    assert status.json()["newest_label"]["version"] == forced.json()["version"]  # what the page polls

    # a client that names no version (Slicer, scripts) is not checked, as before
    assert _save(server, "a", "slicer", SPLEEN, "spleen").status_code == 200


@pytest.mark.parametrize(
    ("params", "said"),
    [({"based_on": "v1"}, "based_on must be"), ({"based_on": -1}, "based_on must be"), ({"force": 1}, "force must be")],
)
def test_malformed_versions_are_refused_before_anything_is_stored(server, params, said):
    before = _history(server, "b")
    r = _save(server, "b", "Ada Lovelace", LIVER, "liver", **params)
    assert r.status_code == 400 and said in r.json()["detail"], r.text
    assert _history(server, "b") == before


def _autosave(srv, image: str, client: str, data: bytes, label_info: list, **params) -> requests.Response:
    body = {"client_id": client, "label_info": label_info, "shape": list(SHAPE), **params}
    return requests.put(
        f"{srv.url}/segvol/autosave",
        params={"image": image},
        files={"params": (None, json.dumps(body)), "label": ("label.bin", data)},
        timeout=60,
    )


def test_autosaved_work_is_the_annotators_own_and_ends_with_their_save(server):
    work = _label(7, 20)
    r = _autosave(server, "b", "Ada Lovelace", work, [{"value": 7, "name": "liver"}], based_on=0)
    assert r.status_code == 200, r.text
    got = requests.get(f"{server.url}/segvol/autosave", params={"image": "b", "client_id": "Ada Lovelace"}, timeout=30)
    assert got.status_code == 200 and got.content == work
    assert json.loads(got.headers["X-SegVol-Labels"]) == {"7": "liver"}
    assert json.loads(got.headers["X-SegVol-Autosave"])["based_on"] == 0

    # another annotator is never handed it; it is no label of the datastore
    other = requests.get(f"{server.url}/segvol/autosave", params={"image": "b", "client_id": "Grace"}, timeout=30)
    assert other.status_code == 404
    listed = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert not listed["objects"]["b"]["labels"]

    # Ada's final save replaces it
    assert _save(server, "b", "Ada Lovelace", LIVER, "liver", based_on=0).status_code == 200
    gone = requests.get(f"{server.url}/segvol/autosave", params={"image": "b", "client_id": "Ada Lovelace"}, timeout=30)
    assert gone.status_code == 404


@pytest.mark.parametrize(
    ("data", "label_info", "extra", "said"),
    [
        (b"\x00" * 100, [], {}, "the work has 100 voxels; its shape 64x48x16 holds 49152"),
        (b"\x00" * 100, [], {"shape": [100, "1", 1]}, "shape must be the labelmap's [nx, ny, nz]"),
        (b"\x00" * 100, [], {"shape": [4096, 4096, 4096]}, "is over"),
        (_label(7, 20), [], {}, "values [7] are in the voxels but not in label_info"),
        (_label(7, 20), [{"value": 300, "name": "liver"}], {}, "is not a label value"),
        (_label(7, 20), "liver", {}, "label_info must be a list"),
        (gzip.compress(b"\x00" * 10**7), [], {"encoding": "gzip"}, "the work has 49153 voxels"),  # inflates no further
        (b"not gzip", [], {"encoding": "gzip"}, "the gzip body cannot be read"),
        (b"\x00" * 100, [], {"encoding": "zip"}, "encoding must be"),
    ],
    ids=["size", "shape", "huge-shape", "unnamed", "value", "label-info", "gzip-bomb", "not-gzip", "encoding"],
)
def test_bad_autosaves_are_refused_with_the_reason(server, data, label_info, extra, said):
    r = _autosave(server, "a", "Grace Hopper", data, label_info, **extra)
    assert r.status_code == 400 and said in r.json()["detail"], r.text
    got = requests.get(f"{server.url}/segvol/autosave", params={"image": "a", "client_id": "Grace Hopper"}, timeout=30)
    assert got.status_code == 404


def test_a_gzipped_autosave_comes_back_as_the_voxels(server):
    work = _label(9, 12)
    label_info = [{"value": 9, "name": "spleen"}]
    assert _autosave(server, "a", "Linus", gzip.compress(work), label_info, encoding="gzip").status_code == 200
    got = requests.get(f"{server.url}/segvol/autosave", params={"image": "a", "client_id": "Linus"}, timeout=30)
    assert got.content == work
    dropped = requests.delete(f"{server.url}/segvol/autosave", params={"image": "a", "client_id": "Linus"}, timeout=30)
    assert dropped.json() == {"dropped": True}


def test_an_autosave_names_a_known_image(server):
    r = _autosave(server, "../a", "Ada", _label(7, 20), [{"value": 7, "name": "liver"}])
    assert r.status_code == 404 and "no image" in r.json()["detail"]


def test_ohifs_round_check_is_answered(server):
    r = requests.get(f"{server.url}/train/", params={"check_if_running": "true"}, timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "NOT RUNNING"}


def test_a_save_waits_for_another_save_of_the_image_and_is_checked_against_it(team_db):
    """Two processes saving one image at once cannot both pass the check: the second waits for
    the first's claim, then sees its label (the team store, as every process does)."""
    store = open_store(team_db)
    first, second = FinalSaves(store), FinalSaves(open_store(team_db))
    inside, outcome = threading.Event(), {}

    def grace() -> None:
        inside.wait()
        try:
            with second.guard("img", "Grace", 0, False):
                outcome["grace"] = "saved"
        except ConflictError as e:
            outcome["grace"] = e.newest

    thread = threading.Thread(target=grace)
    thread.start()
    with first.guard("img", "Ada", 0, False):
        inside.set()
        thread.join(0.5)
        assert thread.is_alive()  # Grace waits while Ada's save is stored
        version = Provenance(store).record_save("img", "Ada", "final", "v", [], None)
    thread.join(10)
    assert outcome["grace"]["version"] == version and outcome["grace"]["client"] == "Ada"
    with second.guard("img", "Grace", version, False):  # having seen it, Grace may save
        pass


def test_the_team_store_keeps_a_bounded_number_of_autosaves(team_db):
    """Without sign-in a client id is a name: many names cannot fill the disk with autosaves."""
    clock = iter(range(100))
    autosaves = Autosaves(open_store(team_db), clock=lambda: next(clock), keep=3)
    for n in range(5):
        autosaves.put("img", f"client{n}", b"\x00" * 8, (2, 2, 2), [], None)
    assert [autosaves.get("img", f"client{n}") is not None for n in range(5)] == [False, False, True, True, True]


def test_a_claim_left_by_a_killed_process_is_taken_over_at_once(tmp_path):
    """A process killed mid-save leaves its claim on the image: the next save of the image does not
    wait the minutes a claim may last, since the claim names a process that is gone."""
    import subprocess
    import sys
    import time

    store = TeamStore(tmp_path / "team.sqlite")
    saves = FinalSaves(store)
    code = (
        "import sys; sys.path.insert(0, 'apps/segvol');"
        "from lib.team.store import TeamStore, open_store; from lib.team.conflicts import FinalSaves;"
        f"g = FinalSaves(TeamStore({str(tmp_path / 'team.sqlite')!r})).guard('img', 'ada', None, False);"
        "g.__enter__(); print('claimed', flush=True); import time; time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "claimed"
    holder.kill()  # killed mid-save; not reaped yet: a zombie
    t0 = time.perf_counter()
    with saves.guard("img", "grace", None, False):
        waited = time.perf_counter() - t0
    holder.wait()
    assert waited < 5, waited
