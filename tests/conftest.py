"""Shared fixtures: the seeded full-size checkpoint (made once per machine), tiny weights, phantoms."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SEGVOL_SHARED", ROOT.parent / "shared"))
# the one place the tests extend sys.path: the app's lib package (for its unit tests), the scripts
# (Orthanc, replicas, DICOM series) and the shared tools (phantoms, seeded checkpoints)
sys.path[:0] = [str(ROOT / "apps" / "segvol"), str(ROOT / "scripts"), str(SHARED / "tools")]
GOLDEN = SHARED / "reference" / "golden"
CACHE = Path(os.environ.get("SEGVOL_TEST_CACHE", ROOT / "build" / "test-cache"))
SEEDED_SHA256 = "d2ade175e15cb73b3be8366bfb5104e6f9e068dc052d5270cd6c75e82e541502"


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """``python -m segvol ...`` as a user runs it."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "segvol", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"segvol {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def run_app(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """``python apps/segvol ...`` (the app's own commands: round, preannotate) as a user runs it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(ROOT / "apps" / "segvol"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"apps/segvol {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def seeded_dir() -> Path:
    """Seed-0 checkpoint in both official formats (generated once, about 40 s and 1.4 GB)."""
    out = CACHE / "seeded-0"
    cfg = out / "config.json"
    ok = cfg.is_file() and json.loads(cfg.read_text())["seeded_checkpoint"]["sha256_tensors"] == SEEDED_SHA256
    if not ok or not (out / "SegVol_v1.pth").is_file() or not (out / "pytorch_model.bin").is_file():
        tool = SHARED / "tools" / "seeded_checkpoint.py"
        subprocess.run(
            [sys.executable, str(tool), "--out", str(out), "--seed", "0", "--format", "both"],
            check=True,
            capture_output=True,
        )
    assert json.loads(cfg.read_text())["seeded_checkpoint"]["sha256_tensors"] == SEEDED_SHA256
    return out


@pytest.fixture(scope="session")
def tiny_model():
    from segvol.model import CONFIGS, SegVol

    torch.manual_seed(0)
    return SegVol(CONFIGS["segvol-tiny"]).eval()


@pytest.fixture(scope="session")
def tiny_weights(tiny_model, tmp_path_factory) -> Path:
    """The tiny model saved in the official HF layout with its config beside it."""
    from segvol.weights import save_official

    out = tmp_path_factory.mktemp("tiny-weights")
    save_official(tiny_model, out, "hf")
    return out


def phantom(shape=(48, 40, 12), seed=0) -> np.ndarray:
    """A small synthetic CT in HU: air around a soft-tissue body with a bright 'organ'."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    ct = np.full(shape, -1000.0)
    body = (i / 0.8) ** 2 + (j / 0.7) ** 2 < 1
    ct[body] = 40
    organ = ((i - 0.2) / 0.3) ** 2 + ((j + 0.1) / 0.25) ** 2 + (k / 0.8) ** 2 < 1
    ct[organ] = 120
    return (ct + rng.normal(0, 10, shape)).astype(np.int16)


@pytest.fixture
def phantom_file(tmp_path) -> Path:
    import nibabel as nib

    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(phantom(), np.diag([1.5, 1.5, 5.0, 1.0])), str(path))
    return path


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the session (tests/database.py), started when first asked for."""
    from database import Postgres

    with Postgres() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def team_db(request, tmp_path) -> str:
    """Where a team store lives, once per engine: an SQLite file, or the session's PostgreSQL with
    an empty schema (every table of the previous test dropped)."""
    if request.param == "sqlite":
        return str(tmp_path / "team.sqlite")
    import psycopg

    url = request.getfixturevalue("postgres_server").url
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("DROP SCHEMA public CASCADE")
        db.execute("CREATE SCHEMA public")
    return url
