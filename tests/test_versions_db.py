"""Decoder versions in the team's PostgreSQL (segvol/training/versions_db.py), on a real server:
two hosts' stores see one active version, each keeps a checked copy, a host restarted while the
database is down serves its copy, the round lock excludes across hosts and ends with its holder."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from database import Postgres
from segvol.postgres import DatabaseUnavailable
from segvol.training.versions import VersionError
from segvol.training.versions_db import DatabaseVersions


@pytest.fixture
def pg():
    with Postgres() as server:  # its own: these tests stop it
        yield server


def test_a_version_written_on_one_host_is_served_by_the_other_and_survives_an_outage(pg, tmp_path):
    a, b = DatabaseVersions(pg.url, tmp_path / "a"), DatabaseVersions(pg.url, tmp_path / "b")
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    name = a.write(state, {"status": "promoted"})
    assert (name, a.names(), b.active()) == ("v0001", ["v0001"], "base")
    a.activate(name, "a round on host A")
    b._active = None  # what a second later looks like
    assert b.active() == name
    assert torch.equal(b.load(name)["w"], state["w"])
    assert (tmp_path / "b" / name / "decoder.safetensors").is_file()  # host B's checked copy
    (tmp_path / "b" / name / "decoder.safetensors").write_bytes(b"damaged")
    assert torch.equal(b.load(name)["w"], state["w"])  # a copy that fails its sha256 is fetched again
    assert [e["to"] for e in b.history()] == [name]

    pg.stop()
    restarted = DatabaseVersions(pg.url, tmp_path / "b")  # host B started while the database is down
    assert restarted.active() == name
    assert torch.equal(restarted.load(name)["w"], state["w"])
    with pytest.raises(DatabaseUnavailable, match="does not answer"):
        restarted.names()
    with pytest.raises(DatabaseUnavailable):
        DatabaseVersions(pg.url, tmp_path / "c").load(name)  # no copy and no database: said, not a crash
    cli = [sys.executable, "-m", "segvol", "versions", "list", "--team-db", pg.url]
    r = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "does not answer" in r.stderr, r.stderr

    pg.start()
    assert restarted.names() == [name]
    assert restarted.rollback() == "base"
    with pytest.raises(VersionError, match="no version 'v0009'"):
        restarted.activate("v0009", "typo")


def test_one_round_across_hosts_and_a_killed_holder_holds_nothing(pg, tmp_path):
    a, b = DatabaseVersions(pg.url, tmp_path / "a"), DatabaseVersions(pg.url, tmp_path / "b")
    mine, theirs = a.round_lock(), b.round_lock()
    assert mine.acquire(0)
    assert not theirs.acquire(0)
    mine._db.close()  # the holder's session ends (a host killed mid-round)
    assert theirs.acquire(0)
    theirs.release()
