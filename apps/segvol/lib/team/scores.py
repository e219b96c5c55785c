"""Each image's uncertainty score, per model version and category set, in the team store.

The background scorer (lib/activelearning/scorer.py) and ``python apps/segvol preannotate`` write
them; Next image (lib/activelearning/uncertainty.py) only reads them, so it never runs the model.
Every process and replica on the store shares them, and they survive restarts; a promotion does
not erase them: the earlier model's scores serve until the new model's are in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lib.team.store import BUMP, TeamStore, upsert

KEY = ("image", "categories", "model_version")


@dataclass(frozen=True)
class Score:
    value: float
    model_version: str
    time: float


def key(categories: list[str] | tuple[str, ...]) -> str:
    """The stored form of a category set: sorted, one name a line."""
    return "\n".join(sorted(set(categories)))


class Scores:
    def __init__(self, store: TeamStore) -> None:
        self.store = store

    def put(self, image: str, categories: list[str], model_version: str, value: float, seconds: float) -> None:
        with self.store.connect(write=True) as db:
            db.execute(
                upsert("scores", ("image", "categories", "model_version", "score", "time", "seconds"), KEY),
                (image, key(categories), model_version, value, time.time(), seconds),
            )
            db.execute(BUMP, ("scores",))

    def newest(self, categories: list[str], model_version: str) -> dict[str, Score]:
        """Image -> its score by ``model_version`` where there is one, else by the model that scored it last."""
        with self.store.connect() as db:
            rows = db.execute(
                "SELECT image, score, model_version, time, model_version = ? AS current FROM scores "
                "WHERE categories = ? ORDER BY current, time",
                (model_version, key(categories)),
            ).fetchall()
        return {r["image"]: Score(r["score"], r["model_version"], r["time"]) for r in rows}  # the last row wins

    def generation(self) -> int:
        """Grows with every score stored: whether to read again."""
        with self.store.connect() as db:
            row = db.execute("SELECT n FROM generations WHERE name = 'scores'").fetchone()
        return row[0] if row else 0

    def scored(self, categories: list[str], model_version: str) -> set[str]:
        """The images ``model_version`` has scored for ``categories``."""
        with self.store.connect() as db:
            rows = db.execute(
                "SELECT image FROM scores WHERE categories = ? AND model_version = ?", (key(categories), model_version)
            ).fetchall()
        return {r["image"] for r in rows}
