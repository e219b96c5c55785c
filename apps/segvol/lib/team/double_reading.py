"""Double reading: a share of the images is read by two annotators, blind, and adjudicated.

Which images is stable: the image id's SHA-256 read as a fraction of 2**256, below
``--conf double_read_fraction``; every process and every restart agrees without storing a thing.
Such an image is leased to two different annotators (``seats``) and stays offered to annotators
who have not read it until two readings are in. Each reading's voxels are kept in the team store
(a folder datastore keeps one label file per image, and the reviewer switches between the two);
neither reader is shown the other's label until both are in (``hidden_from``). The agreement of a
pair (lib/team/agreement.py) is measured once, when the second reading arrives, and kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib

import numpy as np

from lib.team.agreement import agreement
from lib.team.reviews import OPEN, WAITING, Reviews
from lib.team.store import TeamStore, upsert

log = logging.getLogger(__name__)


def chosen(image: str, fraction: float) -> bool:
    """Whether ``image`` is double read: stable per image id, about ``fraction`` of them."""
    if fraction <= 0:
        return False
    return int(hashlib.sha256(image.encode()).hexdigest(), 16) / 2**256 < fraction


class DoubleReading:
    def __init__(self, store: TeamStore, reviews: Reviews, fraction: float) -> None:
        self.store = store
        self.reviews = reviews
        self.fraction = fraction

    def chosen(self, image: str) -> bool:
        return chosen(image, self.fraction)

    def readers(self, image: str) -> dict[str, int]:
        """Annotator -> save of their reading of ``image`` still in play (waiting, submitted, returned)."""
        with self.store.connect() as db:
            rows = db.execute(
                f"SELECT annotator, save FROM reviews WHERE image = ? AND reading = 1 AND state IN {OPEN!r} "
                "ORDER BY save",
                (image,),
            ).fetchall()
        return {r["annotator"]: r["save"] for r in rows}

    def is_reading(self, image: str, client: str) -> bool:
        """Whether a final save of ``image`` by ``client`` now is one of its two readings: the image is
        chosen, not yet adjudicated, and fewer than two other annotators have read it."""
        if not self.chosen(image):
            return False
        with self.store.connect() as db:
            decided = db.execute(
                "SELECT 1 FROM reviews WHERE image = ? AND reading = 0 AND state != 'superseded' LIMIT 1", (image,)
            ).fetchone()
        return decided is None and len(set(self.readers(image)) - {client}) < 2

    def seats(self, image: str, client: str) -> int:
        """How many other annotators may hold a lease on ``image`` before it is taken for ``client``:
        one for a single read; for a double read, two less the other readers already in."""
        if not self.is_reading(image, client):
            return 1
        return 2 - len(set(self.readers(image)) - {client})

    def awaiting_second(self, client: str) -> set[str]:
        """Images whose one reading is in, by someone other than ``client``: still to offer ``client``."""
        return {r["image"] for r in self.reviews.waiting_readings() if r["annotator"] != client}

    def hidden_from(self, image: str, client: str, reviewer: bool) -> set[int]:
        """The saves of ``image`` that ``client`` may not see yet: another annotator's reading while the
        pair is incomplete (a reviewer sees everything)."""
        if reviewer or not self.chosen(image):
            return set()
        with self.store.connect() as db:
            rows = db.execute(
                "SELECT save FROM reviews WHERE image = ? AND state = ? AND annotator != ?", (image, WAITING, client)
            ).fetchall()
        return {r["save"] for r in rows}

    # ------------------------------------------------------------------ the readings' voxels
    def keep(self, save: int, image: str, client: str, label: np.ndarray, names: dict[int, str], spacing) -> None:
        """A reading's voxels (uint8 on the image grid) and their names, with the image spacing in mm."""
        with self.store.connect(write=True) as db:
            db.execute(
                upsert("readings", ("save", "image", "client", "shape", "spacing", "names", "voxels"), ("save",)),
                (
                    save,
                    image,
                    client,
                    json.dumps(list(label.shape)),
                    json.dumps([float(s) for s in spacing]),
                    json.dumps({str(k): v for k, v in names.items()}),
                    zlib.compress(np.ascontiguousarray(label, np.uint8).tobytes(order="F"), 1),
                ),
            )

    def reading(self, save: int) -> tuple[np.ndarray, dict[int, str], dict] | None:
        """A kept reading: voxels on the image grid, value -> name, and who / image / spacing."""
        with self.store.connect() as db:
            row = db.execute("SELECT * FROM readings WHERE save = ?", (save,)).fetchone()
        if row is None:
            return None
        shape = tuple(json.loads(row["shape"]))
        voxels = np.frombuffer(zlib.decompress(row["voxels"]), np.uint8).reshape(shape, order="F")
        names = {int(k): v for k, v in json.loads(row["names"]).items()}
        about = {"version": save, "client": row["client"], "image": row["image"], "shape": list(shape)}
        return voxels, names, dict(about, spacing=json.loads(row["spacing"]))

    # ------------------------------------------------------------------ agreement
    def measure(self, a: int, b: int) -> list[dict] | None:
        """The pair's agreement per segment (kept; measured once). None when a reading's voxels are missing."""
        a, b = sorted((a, b))
        with self.store.connect() as db:
            row = db.execute("SELECT figures FROM agreements WHERE a = ? AND b = ?", (a, b)).fetchone()
        if row is not None:
            return json.loads(row["figures"])
        first, second = self.reading(a), self.reading(b)
        if first is None or second is None:
            return None
        t0 = time.time()
        figures = agreement(first[0], second[0], first[1], second[1], tuple(first[2]["spacing"]))
        with self.store.connect(write=True) as db:
            db.execute(
                upsert("agreements", ("a", "b", "image", "time", "figures"), ("a", "b")),
                (a, b, first[2]["image"], time.time(), json.dumps(figures)),
            )
        log.info("agreement of readings %d and %d of %s measured in %.1f s", a, b, first[2]["image"], time.time() - t0)
        return figures

    def all_agreements(self) -> list[dict]:
        """Every measured pair: its saves, image and figures."""
        with self.store.connect() as db:
            rows = db.execute("SELECT * FROM agreements ORDER BY time").fetchall()
        return [{"a": r["a"], "b": r["b"], "image": r["image"], "figures": json.loads(r["figures"])} for r in rows]
