"""Two replicas behind a real HAProxy on one Orthanc (scripts/replicas.py, as `serve.sh --replicas`):
an image's requests always land on one replica, leases and results are shared, a replica killed
with SIGKILL mid-run loses no request and no label (its images move to the other), one round at a
time across replicas, and a promotion is served by both at their next request."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections import defaultdict

import nibabel as nib
import numpy as np
import pytest
import requests
from phantom import make_phantom  # noqa: E402

from archive import Archive, save_liver
from cluster import replica_cluster

pytestmark = pytest.mark.dicomweb
LIVER = 1  # /info label index
SHAPE = (64, 56, 12)
IMAGES = 6
CLIENTS = 4


def _studies(folder):
    folder.mkdir(parents=True)
    for seed in range(IMAGES):
        image, _, affine = make_phantom(SHAPE, (4.0, 4.0, 8.0), seed=seed + 1)
        nib.save(nib.Nifti1Image(image, affine), str(folder / f"ct{seed}.nii.gz"))
    return folder


def _infer(url: str, image: str, client: str) -> requests.Response:
    return requests.post(
        f"{url}/infer/segvol",
        params={"image": image, "output": "json"},
        files={"params": (None, json.dumps({"label_prompt": [LIVER], "client_id": client}))},
        timeout=120,
    )


def _label(seed: int) -> np.ndarray:
    return (make_phantom(SHAPE, (4.0, 4.0, 8.0), seed=seed + 1)[1] == 1).astype(np.uint8)


@pytest.fixture
def stack(tmp_path):
    with Archive(tmp_path / "orthanc", studies=_studies(tmp_path / "studies")) as archive:
        yield archive, tmp_path


def test_an_image_stays_on_one_replica_and_a_killed_replica_loses_nothing(stack):
    archive, work = stack
    series = [archive.series[f"ct{n}"] for n in range(IMAGES)]
    with replica_cluster(work, archive) as cluster:
        # next image: four annotators, asked round-robin across the replicas, get four images
        got = {}
        for n in range(CLIENTS):
            r = requests.post(f"{cluster.url}/activelearning/random", json={"client_id": f"ann{n}"}, timeout=60)
            assert r.status_code == 200, r.text
            got[f"ann{n}"] = (r.json()["id"], r.headers["X-SegVol-Replica"])
        assert len({image for image, _ in got.values()}) == CLIENTS, got  # leases seen by both replicas
        assert {replica for _, replica in got.values()} == {"r0", "r1"}, got

        # every request naming an image lands on one replica
        where: dict[str, set[str]] = defaultdict(set)
        for round_ in range(2):
            for n, image in enumerate(series):
                r = _infer(cluster.url, image, f"ann{(n + round_) % CLIENTS}")
                assert r.status_code == 200, r.text
                where[image].add(r.headers["X-SegVol-Replica"])
        assert all(len(w) == 1 for w in where.values()), where
        owner = {image: w.pop() for image, w in where.items()}
        victim = max(("r0", "r1"), key=lambda r: sum(o == r for o in owner.values()))
        survivor = "r1" if victim == "r0" else "r0"

        # four annotators keep prompting and saving while the busier replica is killed
        answers: list[tuple[str, int, str]] = []
        saved: dict[str, int] = defaultdict(int)
        stop = threading.Event()
        lock = threading.Lock()

        def annotate(client: str, mine: str, k: int) -> None:
            n = k
            while not stop.is_set():
                image = series[n % IMAGES]
                r = _infer(cluster.url, image, client)
                with lock:
                    answers.append((image, r.status_code, r.text[:200]))
                n += 1
                if n % 3 == 0:
                    for _ in range(5):  # a save answered 503 is sent again, as the panel does
                        s = save_liver(cluster.url, mine, _label(series.index(mine)), client)
                        with lock:
                            answers.append((mine, s.status_code, s.text[:200]))
                        if s.status_code == 200:
                            with lock:
                                saved[mine] += 1
                            break
                        time.sleep(1)

        threads = [
            threading.Thread(target=annotate, args=(client, image, k))
            for k, (client, (image, _)) in enumerate(got.items())
        ]
        for t in threads:
            t.start()
        time.sleep(6)
        cluster.replica(victim).kill(signal.SIGKILL)
        killed_at = len(answers)
        time.sleep(8)
        stop.set()
        for t in threads:
            t.join(120)

        codes = [code for _, code, _ in answers]
        assert set(codes) <= {200, 503}, [a for a in answers if a[1] not in (200, 503)]
        for _, code, text in answers:
            if code == 503:
                assert "replica" in json.loads(text)["detail"], text  # a message, not HAProxy's page
        assert killed_at < len(answers) and codes[-1] == 200, answers[-5:]

        # the killed replica's images are served by the other one
        for image, replica in owner.items():
            r = _infer(cluster.url, image, "after")
            assert r.status_code == 200 and r.headers["X-SegVol-Replica"] == survivor, (image, replica, r.text)

        # started again, it takes its images back (consistent hashing) once HAProxy sees it healthy
        assert cluster.revive() == [victim]
        cluster.replica(victim).wait_healthy(120)
        mine = [image for image, replica in owner.items() if replica == victim]
        deadline = time.time() + 30
        while _infer(cluster.url, mine[0], "back").headers.get("X-SegVol-Replica") != victim:
            assert time.time() < deadline, "the restarted replica did not get its images back"
            time.sleep(0.5)
        for image in mine:
            assert _infer(cluster.url, image, "back").headers["X-SegVol-Replica"] == victim

        # labels lost: 0 (every save answered 200 is an SEG in the archive, each leased image has one)
        segs = archive.segs()
        per_image = defaultdict(int)
        for seg in segs:
            per_image[str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)] += 1
        assert saved and all(per_image[image] >= count for image, count in saved.items()), (saved, per_image)
        log = (work / "replicas" / "haproxy.log").read_text()
        assert f"replicas/{victim} is DOWN" in log, log[-2000:]
        # requests that met the dead replica were sent again to the other (HAProxy logs retries as +N)
        assert re.search(r" \d+/\d+/\d+/\d+/\+\d+ ", log), log[-2000:]


def _status(replica) -> dict:
    r = requests.get(f"{replica.url}/segvol/status", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_one_round_at_a_time_across_replicas_and_its_promotion_served_by_both(stack):
    archive, work = stack
    conf = {"train_steps": "40", "promote_min_gain": "-1", "promote_replay_margin": "1"}
    with replica_cluster(work, archive, **conf) as cluster:
        for n in (0, 1, 2):
            image = archive.series[f"ct{n}"]
            r = save_liver(cluster.url, image, _label(n), f"ann{n}")
            assert r.status_code == 200, r.text
        r0, r1 = cluster.replicas
        before = {r.name: _status(r)["model_version"] for r in (r0, r1)}
        assert before["r0"] == before["r1"] and "+" not in before["r0"]

        assert requests.post(f"{r1.url}/train/segvol", json={}, timeout=30).status_code == 200
        deadline = time.time() + 120
        while (_status(r0).get("round") or {}).get("state") != "running":
            assert time.time() < deadline, "the round never showed as running"
            time.sleep(0.5)
        # the other replica's round waits its turn: it is refused while one runs
        second = requests.post(f"{r0.url}/train/segvol", params={"run_sync": "true"}, json={}, timeout=300)
        assert second.status_code == 200, second.text
        assert "another round is running" in second.text, second.text

        deadline = time.time() + 300
        while (_status(r0).get("round") or {}).get("state") != "done":
            assert time.time() < deadline, (work / "replicas" / "r1.log").read_text()[-3000:]
            time.sleep(1)
        after = {r.name: _status(r) for r in (r0, r1)}
        for name, status in after.items():
            assert status["active"] == "v0001" and status["model_version"].endswith("+v0001"), (name, status)
        # and the next result of each replica is made by the promoted version
        for image in (archive.series[f"ct{n}"] for n in range(IMAGES)):
            r = _infer(cluster.url, image, "after")
            assert r.status_code == 200 and r.json()["model_version"].endswith("+v0001"), r.text
