"""What SegVol served, what a saved label owes to it, and who saved what.

Every result served is recorded in the team store: image id, client, time, model version, task,
the prompts as sent, and for each label value the mask (digest, voxel count, packed bits). When a
label is saved, each value's mask is compared with what was served for that value on that image:
AUTOMATIC when it equals a served mask, SEMIAUTOMATIC when it differs from one (the voxels added
and removed are counted against the newest), MANUAL when SegVol never served that value there.
The store is shared by every process and survives restarts; it keeps the newest ``per_image``
results of each image and ``total`` in all. Saved labels are kept as history with their makers.

Overlap: the page merges a result into its label map by one rule, the app's own: a result
replaces its own classes (every voxel free or holding one of them takes the result's value, 0
where it has none) and voxels held by any other class keep it. So a served mask M of value v
is compared as the page showed it, M minus the voxels other segments hold in the saved label:
those are neither expected of v nor counted as removed from it. What the server cannot see: if
another segment later gives up voxels that had hidden v there (erased by the annotator, or
replaced by a newer result of its class), those voxels count as removed from v.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from lib.team.store import TeamStore
from segvol.postgres import DatabaseUnavailable

log = logging.getLogger(__name__)
HELD_RESULTS = 200  # results held in memory while the team database is down
DOWN_RETRY = 10.0  # seconds a result is held without asking the database that was just found down

AUTOMATIC, SEMIAUTOMATIC, MANUAL = "AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"


def _bits(mask: np.ndarray) -> bytes:
    return np.packbits(mask.astype(bool, copy=False).ravel(order="F")).tobytes()


def _digest(bits: bytes, shape: tuple[int, ...]) -> str:
    return hashlib.blake2b(bits + repr(tuple(shape)).encode(), digest_size=16).hexdigest()


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _ones(packed: np.ndarray) -> int:
    """The voxels set in packed bits (numpy 1.x has no bitwise_count)."""
    return int(_POPCOUNT[packed].sum(dtype=np.int64))


def _same_grid(row: sqlite3.Row, label: np.ndarray) -> bool:
    """Whether a served result was on ``label``'s grid (its shape is recorded with its prompts)."""
    return tuple(json.loads(row["prompts"]).get("shape", ())) == tuple(np.shape(label))


@dataclass(frozen=True)
class Origin:
    """Where one saved label value came from."""

    type: str
    model_version: str | None = None
    prompts: list = field(default_factory=list)
    result: int | None = None  # the served result it matches or was edited from
    added: int = 0  # voxels the annotator added to / removed from that result
    removed: int = 0

    def as_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Served:
    """A served label map, as recorded (``names``: value -> label name; ``time``: when it was served)."""

    image: str
    client: str
    model_version: str
    task: str
    prompts: list[dict]
    labelmap: np.ndarray
    names: dict[int, str]
    seconds: float
    time: float


class Provenance:
    def __init__(self, store: TeamStore, per_image: int = 16, total: int = 2000) -> None:
        self.store = store
        self.per_image = per_image
        self.total = total
        # results served while the team database did not answer, recorded when it answers (newest kept)
        self._held: deque[Served] = deque(maxlen=HELD_RESULTS)
        self._held_lock = threading.Lock()
        self._down_until = 0.0  # monotonic time before which the database is not asked again

    # ------------------------------------------------------------------ served results
    def record(
        self,
        image: str,
        client: str,
        model_version: str,
        task: str,
        prompts: list[dict],
        labelmap: np.ndarray,
        names: dict[int, str],
        seconds: float,
    ) -> int | None:
        """Record a served label map (``names``: value -> label name); returns the result id, or None
        while the team database does not answer (the result is held in memory and recorded when it
        answers, so a label saved from it is still AUTOMATIC)."""
        served = Served(image, client, model_version, task, prompts, labelmap, names, seconds, time.time())
        if time.monotonic() < self._down_until:  # found down a moment ago: no connect timeout per result
            self._held.append(served)
            return None
        try:
            self.flush_held()
            return self._record(served)
        except DatabaseUnavailable as e:
            self._held.append(served)
            self._down_until = time.monotonic() + DOWN_RETRY
            log.warning("result for %s on %s held in memory (%d held): %s", client, image, len(self._held), e)
            return None

    def flush_held(self) -> None:
        """Record the results held while the database was down, oldest first (DatabaseUnavailable if still)."""
        with self._held_lock:
            while self._held:
                self._record(self._held[0])
                self._held.popleft()

    def _record(self, served: Served) -> int:
        image, labelmap, names = served.image, served.labelmap, served.names
        masks = []
        for value, name in names.items():
            mask = labelmap == value
            bits = _bits(mask)
            masks.append((value, name, _digest(bits, labelmap.shape), int(mask.sum()), zlib.compress(bits, 1)))
        meta = json.dumps({"shape": list(labelmap.shape), "prompts": served.prompts})
        with self.store.connect(write=True) as db:
            rid = db.execute(
                "INSERT INTO results (image, client, time, model_version, task, prompts, seconds) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (image, served.client, served.time, served.model_version, served.task, meta, served.seconds),
            ).fetchone()[0]
            db.executemany("INSERT INTO masks VALUES (?, ?, ?, ?, ?, ?)", [(rid, *m) for m in masks])
            db.execute(
                "DELETE FROM results WHERE image = ? AND id NOT IN "
                "(SELECT id FROM results WHERE image = ? ORDER BY id DESC LIMIT ?)",
                (image, image, self.per_image),
            )
            db.execute("DELETE FROM results WHERE id <= (SELECT MAX(id) FROM results) - ?", (self.total,))
        return rid

    def origin(self, image: str, value: int, label: np.ndarray) -> Origin:
        """AUTOMATIC, SEMIAUTOMATIC or MANUAL for ``value`` in the saved ``label`` (uint8 values on the
        image's grid).

        The other segments of ``label`` are needed because the page hides a served mask where they are
        (see the module's overlap rule): AUTOMATIC when ``value``'s voxels equal a served mask less
        those, for any result on ``image`` (the newest such is named); else SEMIAUTOMATIC, counted
        against the newest. Works on packed bits, 8 voxels a byte, as the masks are stored."""
        flat = np.asarray(label).ravel(order="F")  # the order the served masks were packed in
        mine = flat == value
        saved = np.packbits(mine)
        digest = _digest(saved.tobytes(), np.shape(label))
        keep = None  # the voxels no other segment holds, packed; None when there is no other segment
        others = (flat != 0) ^ mine  # ``mine`` lies within the non-zero voxels
        if others.any():
            keep = ~np.packbits(others)
        del flat, mine, others
        ones = _ones(saved)
        with self.store.connect() as db:
            rows = db.execute(
                "SELECT r.id, r.model_version, r.prompts, m.digest, m.voxels FROM masks m "
                "JOIN results r ON r.id = m.result WHERE r.image = ? AND m.value = ? ORDER BY r.id DESC",
                (image, value),
            ).fetchall()
            if not rows:
                return Origin(MANUAL)
            newest, counts = rows[0], None
            for row in rows:
                # equal to the served mask: AUTOMATIC whatever else the label holds (it is disjoint from it)
                if row["digest"] == digest:
                    return self._from(AUTOMATIC, row, value)
                # otherwise only other segments hiding part of it can make it equal; the page shows at most
                # the mask's own voxels, so a mask with fewer voxels than saved cannot be it
                if keep is None or row["voxels"] < ones or not _same_grid(row, label):
                    continue
                diff = self._diff(db, row, value, saved, keep)
                if diff is None:
                    continue
                if row is newest:
                    counts = diff
                if diff == (0, 0):
                    return self._from(AUTOMATIC, row, value)
            if not _same_grid(newest, label):  # served on another grid: no voxel-wise comparison
                return self._from(SEMIAUTOMATIC, newest, value)
            if counts is None:
                counts = self._diff(db, newest, value, saved, keep)
        if counts is None:
            return self._from(SEMIAUTOMATIC, newest, value)
        return self._from(SEMIAUTOMATIC, newest, value, *counts)

    def _from(self, kind: str, row: sqlite3.Row, value: int, added: int = 0, removed: int = 0) -> Origin:
        """The origin naming a served result, with its model version and the prompts that made ``value``."""
        return Origin(kind, row["model_version"], self._prompts(row, value), row["id"], added, removed)

    @staticmethod
    def _diff(
        db: sqlite3.Connection, row: sqlite3.Row, value: int, saved: np.ndarray, keep: np.ndarray | None
    ) -> tuple[int, int] | None:
        """(added, removed): saved voxels of ``value`` the page did not show of this served mask, and
        shown ones not saved; ``keep`` (the voxels no other segment holds) cuts out what the page hid.
        None when the mask has another size (another grid)."""
        bits = db.execute("SELECT bits FROM masks WHERE result = ? AND value = ?", (row["id"], value)).fetchone()
        shown = np.frombuffer(zlib.decompress(bits["bits"]), np.uint8)
        if shown.size != saved.size:
            return None
        if keep is not None:
            shown = shown & keep  # the padding bits of ``keep`` are set, the mask's are not: they stay 0
        diff = shown ^ saved
        return _ones(diff & saved), _ones(diff & shown)

    @staticmethod
    def _prompts(row, value: int) -> list:
        """The prompts of a result that produced ``value``."""
        return [p for p in json.loads(row["prompts"])["prompts"] if p.get("value") == value]

    def last_result(self, client: str | None = None, image: str | None = None) -> dict | None:
        where, args = [], []
        for column, v in (("client", client), ("image", image)):
            if v is not None:
                where.append(f"{column} = ?")
                args.append(v)
        sql = "SELECT * FROM results" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT 1"
        with self.store.connect() as db:
            row = db.execute(sql, args).fetchone()
            if row is None:
                return None
            names = db.execute("SELECT name, voxels FROM masks WHERE result = ?", (row["id"],)).fetchall()
        return {
            "result": row["id"],
            "image": row["image"],
            "client": row["client"],
            "time": _iso(row["time"]),
            "model_version": row["model_version"],
            "task": row["task"],
            "labels": {n["name"]: n["voxels"] for n in names},
            "seconds": row["seconds"],
        }

    # ------------------------------------------------------------------ saved labels
    def record_save(
        self, image: str, client: str, tag: str, model_version: str, segments: list[dict], seg_series: str | None
    ) -> int:
        with self.store.connect(write=True) as db:
            return db.execute(
                "INSERT INTO saves (image, client, time, tag, model_version, segments, seg_series) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (image, client, time.time(), tag, model_version, json.dumps(segments), seg_series),
            ).fetchone()[0]

    def saves(self, image: str) -> list[dict]:
        """Every label saved for ``image`` through this server, newest first."""
        with self.store.connect() as db:
            rows = db.execute("SELECT * FROM saves WHERE image = ? ORDER BY id DESC", (image,)).fetchall()
        return [
            {
                "version": r["id"],
                "client": r["client"],
                "time": _iso(r["time"]),
                "tag": r["tag"],
                "model_version": r["model_version"],
                "segments": json.loads(r["segments"]),
                "seg_series": r["seg_series"],
            }
            for r in rows
        ]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))
