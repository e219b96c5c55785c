"""Uncertainty scores off the request path, on real server processes with a folder datastore: the
background scorer scores every unlabelled image, Next image answers from the stored scores (no
encoder pass while it answers), a series added to the folder is scored and offered without a
restart, a promotion is re-scored in the background while Next image keeps answering, and a
second process shares the scores without scoring again."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import phantom
from server import Server

pytestmark = pytest.mark.server
SHAPE = (48, 40, 12)
CONF = {"weights": "seeded", "model_config": "segvol-tiny"}


def _write(folder, name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    volume = (phantom(SHAPE, seed) + rng.normal(0, 30 + 20 * seed, SHAPE)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 5.0, 1.0])), str(folder / f"{name}.nii.gz"))


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("studies")
    for n in range(4):
        _write(folder, f"ct{n}", n)
    return folder


@pytest.fixture(scope="module")
def server(studies):
    with Server(studies, CONF, studies.parent / "server.log") as srv:
        yield srv


def _scoring(srv) -> dict:
    return requests.get(f"{srv.url}/segvol/status", params={"client_id": "watch"}, timeout=30).json()["scoring"]


def _until(srv, done, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        scoring = _scoring(srv)
        if done(scoring):
            return scoring
        time.sleep(0.3)
    raise TimeoutError(f"{scoring}\n{srv.log.read_text()[-2000:]}")


def _next(srv, client: str) -> dict:
    r = requests.post(f"{srv.url}/activelearning/uncertainty", json={"client_id": client}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_every_unlabelled_image_is_scored_in_the_background_and_next_image_reads_the_scores(server):
    scoring = _until(server, lambda s: s["scored"] == s["unlabelled"] >= 4 and s["state"] == "idle")
    passes = scoring["passes"]
    assert passes >= 4
    pick = _next(server, "ada")
    assert pick["scored_by"]["model_version"] == scoring["model_version"]
    assert pick["scored_by"]["scored"] == pick["scored_by"]["unlabelled"] == len(pick["uncertainty"])
    assert pick["id"] == max(pick["uncertainty"], key=pick["uncertainty"].get)
    assert _scoring(server)["passes"] == passes  # nothing scored again, nothing on the request path


def test_a_series_added_is_scored_and_offered_without_a_restart(server, studies):
    before = _until(server, lambda s: s["scored"] == s["unlabelled"])
    _write(studies, "ct9", 9)
    scoring = _until(server, lambda s: s["unlabelled"] == before["unlabelled"] + 1 and s["scored"] == s["unlabelled"])
    assert scoring["state"] == "idle"
    assert "ct9" in _next(server, "reader")["uncertainty"]  # scored, and offered


def test_a_second_process_shares_the_scores_and_does_not_score_again(server, studies, tmp_path):
    first = _until(server, lambda s: s["scored"] == s["unlabelled"])
    shared = dict(CONF, versions_dir=str(server.log.parent / "versions"))  # the same served model
    with Server(studies, shared, tmp_path / "second.log") as second:
        scoring = _scoring(second)
        assert scoring["state"] == "another process scores"
        assert scoring["scored"] == first["scored"] and scoring["passes"] == 0
        pick = _next(second, "grace")  # among the images nobody holds, every one scored by the first
        assert pick["scored_by"]["scored"] == pick["scored_by"]["unlabelled"] > 0
        assert pick["scored_by"]["model_version"] == first["model_version"]


def test_a_promotion_is_rescored_in_the_background_while_next_image_answers(server, studies, tmp_path):
    from lib.serving.host import ModelHost
    from lib.settings import AppSettings
    from segvol.training.finetune import trainable_state

    old = _until(server, lambda s: s["scored"] == s["unlabelled"])["model_version"]
    settings = AppSettings.from_conf(dict(CONF, versions_dir=str(server.log.parent / "versions")), tmp_path)
    host = ModelHost(settings)
    host.load()
    predictor = host.wait()
    name = host.versions.write(trainable_state(predictor.model), {"status": "promoted", "note": "a test's copy"})
    host.versions.activate(name, "a test promotes a copy of the served decoder")
    scoring = _until(server, lambda s: s["model_version"] != old)  # the status sees the promotion
    pick = _next(server, "hedy")  # answered at once: from the earlier model's scores while the new ones come in
    assert pick["id"] and "scored_by" in pick
    if scoring["scored"] < scoring["unlabelled"]:
        assert pick["scored_by"].get("earlier_models") or pick["scored_by"].get("model_version") == old
    rescored = _until(server, lambda s: s["model_version"] != old and s["scored"] == s["unlabelled"])
    assert _next(server, "hedy")["scored_by"]["model_version"] == rescored["model_version"]
