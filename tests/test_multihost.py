"""One team on two hosts: two groups of replicas (each with HAProxy, its own data folder: DICOMweb
cache, versions copies, held saves) that share only a real PostgreSQL (the team store, the decoder
versions, the round lock) and a real Orthanc, as docs/scaling.md deploys them. Annotators split
across the hosts are never handed one image twice, a result served on one host is AUTOMATIC when
saved unedited on the other, a round promoted on one is served by the other, and PostgreSQL going
away or restarting mid-save loses no label."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests
from phantom import make_phantom  # noqa: E402
from requests_toolbelt import MultipartDecoder

from archive import Archive, save_liver
from cluster import replica_cluster
from database import Postgres
from server import until

pytestmark = pytest.mark.dicomweb
LIVER = 1
SHAPE = (64, 56, 12)
SPACING = (4.0, 4.0, 8.0)
IMAGES = 18
ROUND = {"train_steps": "40", "promote_min_gain": "-1", "promote_replay_margin": "1"}
# which images each test labels, so that any order of the tests leaves 8 unlabelled for the next-image test
ROUND_IMAGES, AUTOMATIC_IMAGE, RESTART_IMAGES, DOWN_IMAGE = (0, 1, 2), 3, (4, 5, 6, 7), 8
assert IMAGES - len(ROUND_IMAGES) - len(RESTART_IMAGES) - 2 >= 8


def _label(seed: int) -> np.ndarray:
    return (make_phantom(SHAPE, SPACING, seed=seed + 1)[1] == 1).astype(np.uint8)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """PostgreSQL and Orthanc, then host A and host B (two replicas each) on them."""
    work = tmp_path_factory.mktemp("multihost")
    studies = work / "studies"
    studies.mkdir()
    for seed in range(IMAGES):
        image, _, affine = make_phantom(SHAPE, SPACING, seed=seed + 1)
        nib.save(nib.Nifti1Image(image, affine), str(studies / f"ct{seed}.nii.gz"))
    with Postgres() as pg, Archive(work / "orthanc", studies=studies) as archive:
        a = replica_cluster(work / "hostA", archive, team_db=pg.url, **ROUND)
        b = replica_cluster(work / "hostB", archive, team_db=pg.url, **ROUND)
        with a, b:
            yield {"pg": pg, "archive": archive, "A": a, "B": b, "work": work}


def _series(hosts, n: int) -> str:
    return hosts["archive"].series[f"ct{n}"]


def _infer(url: str, image: str, client: str, output: str = "json") -> requests.Response:
    return requests.post(
        f"{url}/infer/segvol",
        params={"image": image, "output": output},
        files={"params": (None, json.dumps({"label_prompt": [LIVER], "client_id": client}))},
        timeout=120,
    )


def _labels(url: str, image: str) -> list[dict]:
    r = requests.get(f"{url}/segvol/labels", params={"image": image}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_eight_annotators_on_two_hosts_get_eight_images(hosts):
    clients = [(hosts["A" if n % 2 else "B"].url, f"reader{n}") for n in range(8)]

    def next_image(where):
        url, client = where
        r = requests.post(f"{url}/activelearning/random", json={"client_id": client}, timeout=120)
        assert r.status_code == 200, r.text
        return client, r.json()["id"]

    with ThreadPoolExecutor(8) as pool:  # all at the same moment, half on each host
        got = dict(pool.map(next_image, clients))
    assert len(set(got.values())) == 8, got
    # both hosts see every lease: each host's status names the holder of an image leased on the other
    image = got["reader1"]  # leased through host A
    r = requests.get(f"{hosts['B'].url}/segvol/status", params={"client_id": "reader0", "image": image}, timeout=60)
    assert r.status_code == 200, r.text
    assert [held["client"] for held in r.json()["image_held_by"]] == ["reader1"], r.json()


def test_a_result_served_on_one_host_saved_unedited_on_the_other_is_automatic(hosts):
    image = _series(hosts, AUTOMATIC_IMAGE)
    r = _infer(hosts["A"].url, image, "ada", output="all")
    assert r.status_code == 200, r.text
    parts = MultipartDecoder(r.content, r.headers["content-type"]).parts
    served_by = r.headers["X-SegVol-Replica"]
    path = hosts["work"] / "served.nrrd"
    path.write_bytes(parts[1].content)
    served = nrrd.read(str(path))[0]
    assert (served == LIVER).any()

    r = save_liver(hosts["B"].url, image, served.astype(np.uint8), "ada")
    assert r.status_code == 200, r.text
    (segment,) = r.json()["segments"]
    assert (segment["name"], segment["type"]) == ("liver", "AUTOMATIC"), (served_by, segment)
    # and host A's history of the image shows the save made on B
    assert _labels(hosts["A"].url, image)[0]["version"] == r.json()["version"]


def _status(url: str) -> dict:
    r = requests.get(f"{url}/segvol/status", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_round_on_one_host_is_promoted_and_served_by_the_other(hosts):
    a, b = hosts["A"], hosts["B"]
    for n in ROUND_IMAGES:
        r = save_liver(b.url, _series(hosts, n), _label(n), f"ann{n}")
        assert r.status_code == 200, r.text
    assert "+v" not in _status(b.url)["model_version"]
    a0 = a.replicas[0]
    assert requests.post(f"{a0.url}/train/segvol", json={}, timeout=30).status_code == 200
    deadline = time.time() + 120
    while (_status(a0.url).get("round") or {}).get("stage") in (None, "starting"):  # its lock taken
        assert time.time() < deadline, "the round never showed as running"
        time.sleep(0.2)
    # host B's replicas may not start a round meanwhile: the round lock is PostgreSQL's, not a file
    second = requests.post(f"{b.replicas[1].url}/train/segvol", params={"run_sync": "true"}, json={}, timeout=300)
    assert second.status_code == 200, second.text
    assert "another round is running" in second.text, second.text

    deadline = time.time() + 300
    while (_status(a0.url).get("round") or {}).get("state") != "done":
        assert time.time() < deadline, (a.work / "r0.log").read_text()[-3000:]
        time.sleep(1)
    version = _status(a0.url)["active"]
    assert version.startswith("v"), _status(a0.url)
    # every replica of host B serves it within seconds (no shared folder: B copies it from PostgreSQL)
    for replica in b.replicas:
        until(lambda r=replica: _status(r.url)["model_version"].endswith(f"+{version}"), timeout=10)
    r = _infer(b.url, _series(hosts, 9), "after")
    assert r.status_code == 200 and r.json()["model_version"].endswith(f"+{version}"), r.text
    copies = b.work.parent / "versions" / version
    assert (copies / "decoder.safetensors").is_file(), list(copies.parent.iterdir())


def test_postgresql_restarted_mid_save_loses_no_label(hosts):
    pg, archive = hosts["pg"], hosts["archive"]
    images = [_series(hosts, n) for n in RESTART_IMAGES]
    answers: dict[str, requests.Response] = {}

    def save(n: int, image: str) -> None:
        host = hosts["A" if n % 2 else "B"]
        answers[image] = save_liver(host.url, image, _label(RESTART_IMAGES[n]), f"restart{n}")

    threads = [threading.Thread(target=save, args=(n, image)) for n, image in enumerate(images)]
    for t in threads:
        t.start()
    pg.restart()  # fast mode: every connection is cut while the saves run
    for t in threads:
        t.join()
    for image, r in answers.items():
        assert r.status_code in (200, 202), (image, r.status_code, r.text)
    # each label is in the team's history (a held one once the database answers again) and in the archive
    for image in images:
        try:
            until(lambda i=image: len(_labels(hosts["A"].url, i)) == 1, timeout=30)
        except AssertionError:
            held = [p.read_text() for p in hosts["work"].rglob("held-saves/**/*.txt")]
            raise AssertionError((image, _labels(hosts["A"].url, image), held)) from None
        assert len(archive.segs(image)) == 1, image


def test_postgresql_down_inference_goes_on_saves_are_held_and_stored_when_it_returns(hosts):
    pg, archive = hosts["pg"], hosts["archive"]
    image = _series(hosts, DOWN_IMAGE)
    a = hosts["A"]
    pg.stop()
    try:
        r = _infer(a.url, image, "down")
        assert r.status_code == 200, r.text
        r = requests.get(f"{a.url}/segvol/labels", params={"image": image}, timeout=60)
        assert r.status_code == 503 and "team database" in r.json()["detail"], r.text
        r = requests.post(f"{a.url}/activelearning/random", json={"client_id": "down"}, timeout=60)
        assert r.status_code == 503 and "does not answer" in r.text, r.text
        r = save_liver(a.url, image, _label(DOWN_IMAGE), "down")
        assert r.status_code == 202 and r.json()["held"], r.text
        assert archive.segs(image) == []  # nothing half written: no SEG without its record
        held = list(Path(a.work.parent / "cache").rglob("held-saves/*/request.json"))
        assert len(held) == 1, held
    finally:
        pg.start()
    until(lambda: len(_labels(a.url, image)) == 1, timeout=30)
    assert len(archive.segs(image)) == 1
    status = _status(a.url)
    assert status["held_saves"] == [], status["held_saves"]
