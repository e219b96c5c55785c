"""What SegVol served, what a saved label owes to it, and who saved what.

Every result served is recorded in the team store: image id, client, time, model version, task,
the prompts as sent, and for each label value the mask (digest, voxel count, packed bits). When a
label is saved, each value's mask is compared with what was served for that value on that image:
AUTOMATIC when it equals a served mask, SEMIAUTOMATIC when it differs from one (the voxels added
and removed are counted against the newest), MANUAL when SegVol never served that value there.
The store is shared by every process and survives restarts; it keeps the newest ``per_image``
results of each image and ``total`` in all. Saved labels are kept as history with their makers.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from lib.team.store import TeamStore

AUTOMATIC, SEMIAUTOMATIC, MANUAL = "AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"


def _bits(mask: np.ndarray) -> bytes:
    return np.packbits(mask.astype(bool, copy=False).ravel(order="F")).tobytes()


def _digest(bits: bytes, shape: tuple[int, ...]) -> str:
    return hashlib.blake2b(bits + repr(tuple(shape)).encode(), digest_size=16).hexdigest()


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


class Provenance:
    def __init__(self, store: TeamStore, per_image: int = 16, total: int = 2000) -> None:
        self.store = store
        self.per_image = per_image
        self.total = total

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
    ) -> int:
        """Record a served label map (``names``: value -> label name); returns the result id."""
        masks = []
        for value, name in names.items():
            mask = labelmap == value
            bits = _bits(mask)
            masks.append((value, name, _digest(bits, labelmap.shape), int(mask.sum()), zlib.compress(bits, 1)))
        meta = json.dumps({"shape": list(labelmap.shape), "prompts": prompts})
        with self.store.connect(write=True) as db:
            rid = db.execute(
                "INSERT INTO results (image, client, time, model_version, task, prompts, seconds) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (image, client, time.time(), model_version, task, meta, seconds),
            ).lastrowid
            db.executemany("INSERT INTO masks VALUES (?, ?, ?, ?, ?, ?)", [(rid, *m) for m in masks])
            db.execute(
                "DELETE FROM results WHERE image = ? AND id NOT IN "
                "(SELECT id FROM results WHERE image = ? ORDER BY id DESC LIMIT ?)",
                (image, image, self.per_image),
            )
            db.execute("DELETE FROM results WHERE id <= (SELECT MAX(id) FROM results) - ?", (self.total,))
        return rid

    def origin(self, image: str, value: int, mask: np.ndarray) -> Origin:
        """AUTOMATIC, SEMIAUTOMATIC or MANUAL for the saved ``mask`` of ``value`` on ``image``."""
        bits = _bits(mask)
        digest = _digest(bits, mask.shape)
        with self.store.connect() as db:
            rows = db.execute(
                "SELECT r.id, r.model_version, r.prompts, m.digest FROM masks m JOIN results r ON r.id = m.result "
                "WHERE r.image = ? AND m.value = ? ORDER BY r.id DESC",
                (image, value),
            ).fetchall()
            if not rows:
                return Origin(MANUAL)
            exact = next((r for r in rows if r["digest"] == digest), None)
            if exact is not None:
                return Origin(AUTOMATIC, exact["model_version"], self._prompts(exact, value), exact["id"])
            newest = rows[0]
            served_bits = db.execute(
                "SELECT bits FROM masks WHERE result = ? AND value = ?", (newest["id"], value)
            ).fetchone()["bits"]
        served = np.unpackbits(np.frombuffer(zlib.decompress(served_bits), np.uint8))[: mask.size].astype(bool)
        saved = mask.ravel(order="F").astype(bool, copy=False)
        if served.size != saved.size:  # served on another grid: no voxel-wise comparison
            return Origin(SEMIAUTOMATIC, newest["model_version"], self._prompts(newest, value), newest["id"])
        return Origin(
            SEMIAUTOMATIC,
            newest["model_version"],
            self._prompts(newest, value),
            newest["id"],
            added=int(np.count_nonzero(saved & ~served)),
            removed=int(np.count_nonzero(served & ~saved)),
        )

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
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (image, client, time.time(), tag, model_version, json.dumps(segments), seg_series),
            ).lastrowid

    def saves(self, image: str) -> list[dict]:
        """Every label saved for ``image`` through this server, newest first."""
        with self.store.connect() as db:
            rows = db.execute("SELECT * FROM saves WHERE image = ? ORDER BY id DESC", (image,)).fetchall()
        return [
            {
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
