"""A team on one server (local folder datastore, real MONAI Label processes): leases for the next
image under every strategy, what saving records (who, from which result, AUTOMATIC /
SEMIAUTOMATIC / MANUAL) across a restart and a second server process, concurrent saves, and
requests that must change nothing."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests

from server import Server
from team import CONF, IMAGES, LEASE_MINUTES, studies

pytestmark = pytest.mark.server


@pytest.fixture
def server(tmp_path):
    with Server(studies(tmp_path / "studies"), CONF, tmp_path / "server.log") as srv:
        srv.studies = tmp_path / "studies"
        yield srv


def _next(srv, client: str | None, strategy: str = "uncertainty") -> dict:
    body = {} if client is None else {"client_id": client}
    r = requests.post(f"{srv.url}/activelearning/{strategy}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _status(srv, client: str) -> dict:
    r = requests.get(f"{srv.url}/segvol/status", params={"client_id": client}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _infer(srv, image: str, body: dict) -> tuple[np.ndarray, dict]:
    r = requests.post(
        f"{srv.url}/infer/segvol",
        params={"image": image, "output": "all"},
        files={"params": (None, json.dumps(body))},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    from requests_toolbelt import MultipartDecoder

    parts = MultipartDecoder(r.content, r.headers["content-type"]).parts
    meta = json.loads(parts[0].content)
    path = Path(srv.studies.parent / "result.nrrd")
    path.write_bytes(parts[1].content)
    return nrrd.read(str(path))[0], meta


def _save(srv, image: str, label: np.ndarray, client: str | None, names: list[str] | None = None) -> requests.Response:
    params: dict = {}
    if client is not None:
        params["client_id"] = client
    if names is not None:
        params["label_info"] = [{"name": n} for n in names]
    return requests.put(
        f"{srv.url}/datastore/label",
        params={"image": image, "tag": "final"},
        files={"params": (None, json.dumps(params)), "label": ("label.bin", label.tobytes(order="F"))},
        timeout=120,
    )


@pytest.mark.parametrize("strategy", ["uncertainty", "random", "first"])
def test_three_clients_get_three_images_and_a_fourth_shares_one_with_a_note(server, strategy):
    picks = [_next(server, f"client-{n}", strategy) for n in range(3)]
    assert sorted(p["id"] for p in picks) == sorted(IMAGES)
    assert all(p["lease"]["client"] == f"client-{n}" and "note" not in p for n, p in enumerate(picks))
    fourth = _next(server, "client-3", strategy)
    assert fourth["id"] in IMAGES
    holder = next(n for n, p in enumerate(picks) if p["id"] == fourth["id"])
    assert "leased to another annotator" in fourth["note"] and f"client-{holder}" in fourth["note"]
    # the first three still hold theirs
    assert [_status(server, f"client-{n}")["lease"]["image"] for n in range(3)] == [p["id"] for p in picks]


def test_asking_again_gives_the_next_image_and_a_lease_runs_out(server):
    a1 = _next(server, "a")["id"]
    a2 = _next(server, "a")["id"]
    assert a2 != a1  # "next" means the next one, and a's first image is free again
    b = _next(server, "b")["id"]
    assert b not in (a2,)
    time.sleep(LEASE_MINUTES * 60 + 1)
    assert _status(server, "a")["lease"] is None and _status(server, "b")["lease"] is None


def test_a_final_label_ends_the_lease_and_nothing_left_says_so(server):
    label = np.zeros((48, 40, 12), np.uint8)
    label[10:20, 10:20, 3:6] = 1
    for _ in range(3):
        image = _next(server, "solo", "first")["id"]
        assert _status(server, "solo")["lease"]["image"] == image
        r = _save(server, image, label, "solo", ["liver"])
        assert r.status_code == 200, r.text
        assert _status(server, "solo")["lease"] is None
    r = requests.post(f"{server.url}/activelearning/first", json={"client_id": "solo"}, timeout=60)
    assert r.status_code == 200 and r.json() == {
        "message": "Nothing left to annotate: every image in the datastore has a final label."
    }


def test_what_a_save_records_automatic_semiautomatic_manual_across_restart_and_processes(server, tmp_path):
    image = IMAGES[0]
    served, meta = _infer(server, image, {"label_prompt": [1], "client_id": "ada"})  # liver
    assert meta["client_id"] == "ada" and meta["model_version"] == server.info["model_version"]
    assert (served == 1).any()

    # unedited, after a restart of the server: AUTOMATIC, with the result's model version and prompt
    server.stop()
    with Server(server.studies, CONF, tmp_path / "restarted.log") as restarted:
        r = _save(restarted, image, served, "ada", ["liver"])
        assert r.status_code == 200, r.text
        (segment,) = r.json()["segments"]
        assert (segment["name"], segment["type"]) == ("liver", "AUTOMATIC")
        assert segment["model_version"] == meta["model_version"] and segment["prompts"][0]["text"] == "liver"

        # 10 voxels painted and 4 erased, saved through a second server process on the same datastore
        with Server(server.studies, CONF, tmp_path / "second.log") as second:
            edited = served.copy()
            free = np.argwhere(edited == 0)[:10]
            edited[tuple(free.T)] = 1
            taken = np.argwhere(served == 1)[:4]
            edited[tuple(taken.T)] = 0
            r = _save(second, image, edited, "grace", ["liver"])
            assert r.status_code == 200, r.text
            (segment,) = r.json()["segments"]
            assert (segment["type"], segment["added"], segment["removed"]) == ("SEMIAUTOMATIC", 10, 4)
            # a value SegVol never served on this image: MANUAL
            manual = edited.copy()
            manual[:5, :5, :2] = 2
            r = _save(second, image, manual, "grace", ["liver", "spleen"])
            types = {s["name"]: s["type"] for s in r.json()["segments"]}
            assert types == {"liver": "SEMIAUTOMATIC", "spleen": "MANUAL"}
        history = requests.get(f"{restarted.url}/segvol/labels", params={"image": image}, timeout=30).json()
        assert [h["client"] for h in history] == ["grace", "grace", "ada"]  # newest first, every process's saves


def test_two_saves_of_one_image_at_once_both_answer_and_the_final_is_whole(server):
    image = IMAGES[1]
    labels = []
    for n in range(2):
        label = np.zeros((48, 40, 12), np.uint8)
        label[5 + n * 20 : 20 + n * 20, 5:30, 2:10] = 1
        labels.append(label)
    answers: list = [None, None]

    def save(n: int) -> None:
        answers[n] = _save(server, image, labels[n], f"annotator-{n}", ["liver"])

    threads = [threading.Thread(target=save, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    final = server.studies / "labels" / "final" / f"{image}.nii.gz"
    stored = np.asarray(nib.load(str(final)).dataobj)
    assert any(np.array_equal(stored, label) for label in labels)
    assert not list(final.parent.glob(".*partial*"))
    history = requests.get(f"{server.url}/segvol/labels", params={"image": image}, timeout=30).json()
    assert sorted(h["client"] for h in history) == ["annotator-0", "annotator-1"]


def test_a_label_must_lie_on_the_image_grid_and_name_every_value(server, tmp_path):
    image = IMAGES[2]
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    label = np.zeros((48, 40, 12), np.uint8)
    label[5:15, 5:15, 2:5] = 1
    label[20:25, 20:25, 6:8] = 2

    def upload(array, aff, info):
        path = tmp_path / "label.nii.gz"
        nib.save(nib.Nifti1Image(array, aff), str(path))
        return requests.put(
            f"{server.url}/datastore/label",
            params={"image": image, "tag": "final"},
            files={"params": (None, json.dumps(info)), "label": ("label.nii.gz", path.read_bytes())},
            timeout=60,
        )

    names = {"label_info": [{"name": "liver", "idx": 1}, {"name": "spleen", "idx": 2}]}
    flipped = affine.copy()
    flipped[0, 0] = -2.0
    for aff, wanted in ((flipped, "direction"), (affine + np.diag([0, 0, 0.5, 0]), "spacing")):
        r = upload(label, aff, names)
        assert r.status_code == 400 and "grid differs" in r.text and wanted in r.text, r.text
    shifted = affine.copy()
    shifted[:3, 3] = [4.0, 0, 0]
    r = upload(label, shifted, names)
    assert r.status_code == 400 and "origin" in r.text, r.text
    for info, message in (
        ({"label_info": [{"name": "liver", "idx": 1}]}, "label values [2] are in the label"),
        ({"label_info": [{"name": "liver"}]}, "1 names for the 2 values"),
        ({"label_info": [{"name": "liver", "idx": "one"}, {"name": "spleen", "idx": 2}]}, "not a whole number"),
        ({"label_info": [{"name": "liver", "idx": 1}, {"name": "spleen"}]}, "for every entry or for none"),
        ({"label_info": [{"name": "", "idx": 1}]}, "non-empty names"),
    ):
        r = upload(label, affine, info)
        assert r.status_code == 400 and message in r.text, (info, r.text)
    assert not (server.studies / "labels" / "final" / f"{image}.nii.gz").exists()  # nothing stored
    r = upload(label, affine, {"label_info": [{"name": "liver", "idx": "1"}, {"name": "my blob", "idx": 2}]})
    assert r.status_code == 200, r.text
    assert {s["name"]: s["value"] for s in r.json()["segments"]} == {"liver": 1, "my blob": 224}


def test_bad_team_requests_change_nothing(server):
    held = _next(server, "keeper")["id"]
    bad_clients = ["a\\b", "x" * 200, "tab\there", 5, ["list"], ""]
    for client in bad_clients:
        r = requests.post(f"{server.url}/activelearning/random", json={"client_id": client}, timeout=30)
        assert r.status_code == 400 and "client_id" in r.json()["detail"], (client, r.text)
        r = requests.get(f"{server.url}/segvol/status", params={"client_id": client}, timeout=30)
        if isinstance(client, str):
            assert r.status_code == 400, (client, r.text)
    label = np.zeros((48, 40, 12), np.uint8)
    label[1:4, 1:4, 1:3] = 1
    r = _save(server, held, label, "a\\b", ["liver"])
    assert r.status_code == 400 and "client_id" in r.json()["detail"]
    # a labelmap of the wrong length names both sizes; an image that is not there is a 404
    r = _save(server, held, label[:-1], "keeper", ["liver"])
    assert r.status_code == 400 and f"{label[:-1].size} bytes" in r.text and f"{label.size} voxels" in r.text
    r = _save(server, "no-such-image", label, "keeper", ["liver"])
    assert r.status_code == 404
    r = requests.get(f"{server.url}/segvol/labels", params={"image": "no-such-image"}, timeout=30)
    assert r.status_code == 404
    r = requests.post(f"{server.url}/activelearning/nosuch", json={"client_id": "keeper"}, timeout=30)
    assert r.status_code == 404 and "uncertainty" in r.json()["detail"]
    # an unknown client saving another image leaves the keeper's lease alone
    other = next(i for i in IMAGES if i != held)
    assert _save(server, other, label, "stranger", ["liver"]).status_code == 200
    assert _status(server, "keeper")["lease"]["image"] == held
    assert _status(server, "stranger")["lease"] is None
    assert not (server.studies / "labels" / "final" / f"{held}.nii.gz").exists()
