"""Versions of the fine-tuned decoder: written whole or not at all, activated atomically.

Layout under the versions folder:
  v0001/decoder.safetensors   the decoder + prompt-encoder tensors (safetensors: no pickle)
  v0001/meta.json             time, labels used, steps, loss, Dice before/after, base weights, sha256
  ACTIVE                      the served version's name, or "base"; replaced with os.replace
  history.jsonl               every activation and rollback, one JSON line each
A version folder appears by renaming a complete temporary folder, so a reader never sees half a
version; a version whose file does not match its recorded sha256 is refused. The server checks
ACTIVE before every request; ``python -m segvol versions`` lists, shows, activates and rolls back.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BASE = "base"


class VersionError(RuntimeError):
    """A version that is missing or damaged; the message names it."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class VersionStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.glob("v[0-9][0-9][0-9][0-9]") if (p / "meta.json").is_file())

    def meta(self, name: str) -> dict:
        path = self.root / name / "meta.json"
        if not path.is_file():
            raise VersionError(f"no version {name!r} in {self.root}")
        return json.loads(path.read_text())

    def write(self, state: dict[str, torch.Tensor], meta: dict) -> str:
        """Store a new version (not active yet) and return its name."""
        n = int(self.names()[-1][1:]) + 1 if self.names() else 1
        name = f"v{n:04d}"
        tmp = self.root / f".{name}.{os.getpid()}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            weights = tmp / "decoder.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
            meta = dict(meta, name=name, sha256=_sha256(weights), written=time.strftime("%Y-%m-%dT%H:%M:%S"))
            _atomic_write(tmp / "meta.json", json.dumps(meta, indent=1))
            os.rename(tmp, self.root / name)
        except BaseException as e:  # a full disk, a kill: leave no half-written version behind
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Exception):
                raise VersionError(f"could not write version {name} in {self.root}: {e}") from e
            raise
        return name

    def load(self, name: str) -> dict[str, torch.Tensor]:
        meta = self.meta(name)
        weights = self.root / name / "decoder.safetensors"
        if not weights.is_file() or _sha256(weights) != meta.get("sha256"):
            raise VersionError(f"version {name}: {weights} is missing or does not match its recorded sha256")
        return load_file(str(weights))

    def active(self) -> str:
        path = self.root / "ACTIVE"
        return path.read_text().strip() if path.is_file() else BASE

    def activate(self, name: str, reason: str) -> None:
        """Serve ``name`` (or "base") from the next request on; ``reason`` goes to the history."""
        if name != BASE:
            self.load(name)  # refuse a damaged version before anyone is pointed at it
        previous = self.active()
        _atomic_write(self.root / "ACTIVE", name + "\n")
        with open(self.root / "history.jsonl", "a") as f:
            f.write(
                json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "from": previous, "to": name, "reason": reason})
                + "\n"
            )

    def history(self) -> list[dict]:
        """Every activation and rollback, oldest first."""
        path = self.root / "history.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def rollback(self, reason: str = "rollback") -> str:
        """Serve again what was served before the current version; returns its name."""
        current = self.active()
        for event in reversed(self.history()):
            if event["to"] == current and event["from"] != current:
                self.activate(event["from"], reason)
                return event["from"]
        raise VersionError(f"nothing to roll back to: {current!r} was never activated over another version")

    def round_lock(self) -> RoundLock:
        """One round at a time on this versions folder (train.lock)."""
        return RoundLock(self.root / "train.lock")

    def cleanup_partial(self) -> None:
        """Remove folders left by a round that was killed while writing."""
        for p in self.root.glob(".v*.partial"):
            shutil.rmtree(p, ignore_errors=True)


class RoundLock:
    """flock on a file: ``acquire(0)`` tries once; the kernel drops it with the process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None

    def acquire(self, timeout: float | None = 0) -> bool:
        self._file = open(self.path, "w")  # noqa: SIM115 - closed in release()
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | (fcntl.LOCK_NB if timeout == 0 else 0))
        except BlockingIOError:
            self.release()
            return False
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the lock
            self._file = None
