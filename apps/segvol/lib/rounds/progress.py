"""A round's progress and result, where the server and the annotators' pages can read it.

The round runs in MONAI Label's training subprocess; it writes ``round.json`` in the versions
folder (atomically, at most twice a second): the stage (encoding views, fine-tuning, measuring),
steps done of the total, and at the end the result (version, held-out Dice before and after,
promoted or rejected and why). A round whose process died mid-way reads as ``interrupted``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RUNNING, DONE, FAILED, INTERRUPTED = "running", "done", "failed", "interrupted"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RoundProgress:
    def __init__(self, versions_dir: Path, min_interval: float = 0.5, writes: bool = True) -> None:
        """``writes`` False: keeps the state, writes nothing (the other processes of a torchrun
        round: rank 0 speaks for all)."""
        self.path = Path(versions_dir) / "round.json"
        self.min_interval = min_interval
        self.writes = writes
        self._state: dict = {}
        self._written = 0.0

    def start(self, images: int, steps: int) -> None:
        self._state = {
            "state": RUNNING,
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stage": "encoding views",
            "done": 0,
            "total": images,
            "steps": steps,
        }
        self._write()

    def update(self, stage: str, done: int, total: int) -> None:
        changed = stage != self._state.get("stage")
        self._state.update(stage=stage, done=done, total=total)
        if changed or done == total or time.monotonic() - self._written >= self.min_interval:
            self._write()

    def finish(self, result: dict) -> None:
        self._state.update(state=DONE, stage="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), result=result)
        self._write()

    def fail(self, reason: str) -> None:
        self._state.update(state=FAILED, stage="failed", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), error=reason)
        self._write()

    def read(self) -> dict | None:
        try:
            state = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if state.get("state") == RUNNING and not _alive(int(state.get("pid", 0))):
            state["state"] = INTERRUPTED
        return state

    def _write(self) -> None:
        if not self.writes:
            return
        tmp = self.path.with_name(f".round.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._state, indent=1))
        os.replace(tmp, self.path)
        self._written = time.monotonic()
