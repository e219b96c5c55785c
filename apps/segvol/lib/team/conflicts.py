"""A colleague's final label is never silently overwritten.

A save may name the version it started from (``based_on``: the id of the final label the client
opened, 0 for none). When the image's newest final label is another version, saved by someone
else, the save is refused with who saved it and when (HTTP 409), unless the client asks to save
anyway (``force``): the annotator decides, having been told. A client that names no version
(Slicer, scripts) is not checked, as before.

From the check to the record of a save, the image is claimed in the team store: a second save
of the image, in any process, waits until the first is recorded and is then checked against it.
A claim whose process is gone (killed mid-save: the claim names its host and process id) or
older than ``CLAIM_SECONDS`` (a process on another host) is taken over.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lib.team.store import TeamStore, upsert
from segvol.postgres import DatabaseUnavailable

CLAIM_SECONDS = 300.0  # longer than any save (a SEG written and handed to the outbox)
WAIT_SECONDS = 60.0  # how long a save waits for another save of the same image


class ConflictError(ValueError):
    """The save would overwrite a newer final label this client has not seen (HTTP 409)."""

    status = 409

    def __init__(self, message: str, newest: dict | None = None) -> None:
        super().__init__(message)
        self.newest = newest

    def as_detail(self) -> dict:
        return {"message": str(self), "newest": self.newest}


def based_on(params: dict) -> tuple[int | None, bool]:
    """The version a save started from (None: not said) and whether to save anyway; ValueError
    naming the parameter when either is malformed."""
    base = params.get("based_on")
    if base is not None and (isinstance(base, bool) or not isinstance(base, int) or base < 0):
        raise ValueError(f"based_on must be the id of the final label the edit started from (0: none), got {base!r}")
    force = params.get("force", False)
    if not isinstance(force, bool):
        raise ValueError(f"force must be true or false, got {force!r}")
    return base, force


class FinalSaves:
    def __init__(self, store: TeamStore, clock=time.time) -> None:
        self.store = store
        self.clock = clock
        self._abandoned: set[str] = set()  # claims of saves done while the database went away

    def newest(self, image: str, ignore: set[int] = frozenset()) -> dict | None:
        """The image's newest final label but those in ``ignore``: its version (the save's id), who
        saved it and when."""
        with self.store.connect() as db:
            return _newest(db, image, ignore)

    @contextmanager
    def guard(
        self, image: str, client: str, base: int | None, force: bool, ignore: set[int] = frozenset()
    ) -> Iterator[None]:
        """Claims the image for this save (waiting while another save of it is being stored), then
        checks ``base`` against the newest final label but those in ``ignore`` (another annotator's
        double reading): ConflictError when another client's newer label exists."""
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        deadline = self.clock() + WAIT_SECONDS
        while not self._claim(image, client, token, base, force, ignore):
            if self.clock() > deadline:
                raise ConflictError("another save of this image has taken over a minute: try again in a moment")
            time.sleep(0.1)
        try:
            yield
        finally:
            try:
                with self.store.connect(write=True) as db:
                    db.execute("DELETE FROM save_claims WHERE token = ?", (token,))
            except DatabaseUnavailable:  # the label is stored: its claim is removed at the next claim
                self._abandoned.add(token)

    def _claim(self, image: str, client: str, token: str, base: int | None, force: bool, ignore: set[int]) -> bool:
        """True once the image is claimed for this save; False while another save holds it."""
        if self._abandoned:
            abandoned = set(self._abandoned)
            with self.store.connect(write=True) as db:
                db.executemany("DELETE FROM save_claims WHERE token = ?", [(t,) for t in abandoned])
            self._abandoned -= abandoned
        with self.store.connect(write=True) as db:
            now = self.clock()
            claim = db.execute("SELECT token, since FROM save_claims WHERE image = ?", (image,)).fetchone()
            if claim is not None and now - claim["since"] < CLAIM_SECONDS and _alive(claim["token"]):
                return False
            if base is not None and not force:
                newest = _newest(db, image, ignore)
                if newest is not None and newest["version"] != base and newest["client"] != client:
                    raise ConflictError(
                        f"{newest['client']} saved a newer label of this image at {newest['time']} (version "
                        f"{newest['version']}) that this edit did not start from: open it, take segments from both, "
                        "or save anyway as a new version",
                        newest,
                    )
            db.execute(upsert("save_claims", ("image", "token", "since"), ("image",)), (image, token, now))
        return True


def _alive(token: str) -> bool:
    """Whether the process that made a claim may still be saving: always, unless it ran on this
    host and is gone."""
    host, _, rest = token.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:  # killed but not yet reaped by its parent (a zombie) is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _newest(db, image: str, ignore: set[int] = frozenset()) -> dict | None:
    rows = db.execute(
        "SELECT id, client, time, seg_series FROM saves WHERE image = ? AND tag = 'final' ORDER BY id DESC", (image,)
    )
    row = next((r for r in rows if r["id"] not in ignore), None)
    return (
        None
        if row is None
        else {
            "version": row["id"],
            "client": row["client"],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(row["time"])),
            "seg_series": row["seg_series"],
        }
    )
