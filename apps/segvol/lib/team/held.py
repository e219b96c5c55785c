"""Saves held on this host while the team database does not answer, stored when it answers again.

A label save needs the team store: the claim that keeps two saves of an image apart, the served
results that make a segment AUTOMATIC, the history and review entries. With PostgreSQL down, a
save is not refused and not half done; it is held whole in ``held-saves/`` beside the datastore
(the upload, the request, who sent it) and answered 202, then saved through the same pipeline
once the database answers, oldest first. A save whose label was already stored when the database
went away (between the SEG and its history entry) holds only the team's record of it, replayed
the same way. A held save that its replay refuses (a colleague's newer label came first, an
image gone) is set aside in ``held-saves/refused/`` with the reason, listed by /segvol/status.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from fastapi import HTTPException
from filelock import FileLock, Timeout

from segvol.postgres import DatabaseUnavailable

log = logging.getLogger(__name__)

POLL = 2.0  # seconds between tries while saves are held
MAX_HELD = 500  # saves held at once (and set aside): past it, or past MAX_HELD_BYTES, a save is refused (503),
MAX_HELD_BYTES = 16 * 2**30  # so a long outage cannot fill the disk


class HeldFull(RuntimeError):
    """MAX_HELD saves are held already; the message says so."""


def _since(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


class HeldSaves:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.replay_save: Callable[[dict, Path], None] | None = None  # set by the app: the save route's pipeline
        self.replay_record: Callable[[dict, np.ndarray | None], None] | None = None  # Team.saved again
        self.before: Callable[[], None] = lambda: None  # results held meanwhile, recorded first
        self._lock = FileLock(str(folder / ".flush.lock"))  # one flush at a time: the host's replicas share the folder
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def refused(self) -> Path:
        return self.folder / "refused"

    def _entries(self, folder: Path | None = None) -> list[Path]:
        return sorted(p for p in (folder or self.folder).iterdir() if p.is_dir() and p.name[0].isdigit())

    def _put(self, request: dict, files: dict[str, Callable[[Path], None]]) -> Path:
        """A complete entry folder, renamed into place (a kill leaves no half entry)."""
        request = dict(request, since=time.time(), pid=os.getpid())  # the replica whose held results it needs
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        tmp = self.folder / f".{name}.partial"
        tmp.mkdir()
        for file, write in files.items():
            write(tmp / file)
        (tmp / "request.json").write_text(json.dumps(request))
        tmp.rename(self.folder / name)
        self._start()
        return self.folder / name

    def hold_save(
        self, image: str, tag: str, params: dict, upload: Path, sender: tuple[str | None, tuple], why: Exception
    ) -> dict:
        """Keep the whole save (``upload`` is moved) with ``sender`` (the signed-in user and roles, when
        authentication is on); what the client is told (HTTP 202)."""
        entries = self._entries() + (self._entries(self.refused) if self.refused.is_dir() else [])
        size = sum(f.stat().st_size for e in entries for f in e.iterdir() if f.is_file())
        if len(entries) >= MAX_HELD or size + upload.stat().st_size > MAX_HELD_BYTES:
            raise HeldFull(
                f"{why}, and this server holds {len(entries)} saves ({size / 2**30:.1f} GiB) already: keep the "
                "label in the viewer and save it again once the team database answers"
            )
        user, roles = sender
        request = {"kind": "save", "image": image, "tag": tag, "params": params, "user": user, "roles": list(roles)}
        self._put(request, {"label.upload": lambda to: shutil.move(str(upload), to)})
        log.warning("save of %s (%s) held on this host: %s", image, tag, why)
        return {
            "held": True,
            "image": image,
            "message": f"{why}. The label is kept on this server and saved as soon as the team database answers "
            "again; nothing needs to be done.",
        }

    def hold_record(self, image: str, tag: str, info: dict, label: np.ndarray | None, spacing, why: Exception) -> None:
        """Keep the team's record of a label that is stored already (Team.saved, replayed later)."""
        files = {"label.npy": lambda to: np.save(to, label)} if label is not None else {}
        request = {"kind": "record", "image": image, "tag": tag, "info": info}
        self._put(dict(request, spacing=list(spacing) if spacing is not None else None), files)
        log.warning("the record of a save of %s is held on this host: %s", image, why)

    def pending(self) -> list[dict]:
        """Held saves, oldest first, and those set aside (``refused``: the reason), for /segvol/status."""
        out = []
        for folder, refused in ((self.folder, False), (self.refused, True)):
            if not folder.is_dir():
                continue
            for entry in sorted(p for p in folder.iterdir() if p.is_dir() and p.name[0].isdigit()):
                try:
                    request = json.loads((entry / "request.json").read_text())
                except (OSError, ValueError):
                    continue
                row = {"image": request["image"], "kind": request["kind"], "since": _since(request["since"])}
                if refused:
                    row["refused"] = (entry / "reason.txt").read_text() if (entry / "reason.txt").is_file() else ""
                out.append(row)
        return out

    def flush(self) -> int:
        """Replay held saves, oldest first, until one finds the database still down. Returns how many were saved."""
        done = 0
        try:
            self._lock.acquire(timeout=0)
        except Timeout:  # another replica of this host is storing them
            return 0
        try:
            try:
                self.before()
            except DatabaseUnavailable:
                return 0
            for entry in self._entries():
                request = json.loads((entry / "request.json").read_text())
                if not self._mine(request):
                    continue  # the replica that held it records its results first, then replays it
                try:
                    if request["kind"] == "save":
                        self.replay_save(request, entry / "label.upload")
                    else:
                        npy = entry / "label.npy"
                        self.replay_record(request, np.load(npy) if npy.is_file() else None)
                except DatabaseUnavailable:
                    break
                except HTTPException as e:
                    if e.status_code >= 500:  # the archive or the app is not ready: try again later
                        break
                    self._set_aside(entry, request, e.detail)
                    continue
                except Exception as e:  # the save itself is refused now: kept aside with the reason
                    self._set_aside(entry, request, f"{type(e).__name__}: {e}")
                    continue
                shutil.rmtree(entry, ignore_errors=True)
                done += 1
                log.info("held save of %s stored (held since %s)", request.get("image"), _since(request["since"]))
        finally:
            self._lock.release()
        return done

    @staticmethod
    def _mine(request: dict) -> bool:
        """Whether this process replays the entry: it held it, or the process that did is gone."""
        pid = request.get("pid")
        if pid is None or pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _set_aside(self, entry: Path, request: dict, reason: object) -> None:
        text = reason if isinstance(reason, str) else json.dumps(reason)
        self.refused.mkdir(exist_ok=True)
        (entry / "reason.txt").write_text(text)
        entry.rename(self.refused / entry.name)
        log.error("held save of %s refused on replay: %s", request.get("image"), text)

    def _start(self) -> None:
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="held-saves", daemon=True)
            self._thread.start()

    def start(self) -> None:
        """Replay what an earlier run of this server held (at start-up)."""
        if self._entries():
            self._start()

    def _run(self) -> None:
        time.sleep(POLL)  # at start-up: the app finishes building before anything is replayed
        while self._entries():
            self._wake.wait(POLL)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # a file gone under us, a replay hook not set yet: try again later
                log.exception("held saves: flush failed; trying again in %.0f s", POLL)
