"""An annotator's unsaved work on an image, kept by the server so a reload loses nothing.

One autosave per (image, annotator), replaced by each newer one and dropped when that annotator
saves a final label of the image. It is not a label: no datastore, archive or round sees it, and
only its annotator is handed it. The voxels are the page's labelmap (uint8, index i + nx*j +
nx*ny*k) with the name of each value, and the version of the final label the work started from.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass

import numpy as np

from lib.team.store import TeamStore, upsert


class AutosaveError(ValueError):
    """Voxels or names that do not fit the image (HTTP 400)."""


@dataclass(frozen=True)
class Autosave:
    image: str
    client: str
    time: float
    based_on: int | None
    shape: tuple[int, int, int]
    names: dict[int, str]
    voxels: bytes

    def header(self) -> dict:
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.time)),
            "based_on": self.based_on,
            "shape": list(self.shape),
        }


def checked_names(label_info: object, values: set[int]) -> dict[int, str]:
    """``label_info`` ([{"value": v, "name": n}, ...]) as value -> name; every value in the voxels
    must be named."""
    if not isinstance(label_info, list):
        raise AutosaveError("label_info must be a list of {value, name}")
    names: dict[int, str] = {}
    for item in label_info:
        value, name = (item.get("value"), item.get("name")) if isinstance(item, dict) else (None, None)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
            raise AutosaveError(f"label_info value {value!r} is not a label value 1..255")
        if not isinstance(name, str) or not name.strip():
            raise AutosaveError(f"label_info names no segment for value {value}")
        names[value] = name.strip()
    unnamed = sorted(values - set(names))
    if unnamed:
        raise AutosaveError(f"values {unnamed} are in the voxels but not in label_info")
    return {v: n for v, n in names.items() if v in values}


KEEP = 1000  # autosaves kept in all, the oldest dropped first: names are not proofs without sign-in


class Autosaves:
    def __init__(self, store: TeamStore, clock=time.time, keep: int = KEEP) -> None:
        self.store = store
        self.clock = clock
        self.keep = keep

    def put(
        self,
        image: str,
        client: str,
        voxels: bytes,
        shape: tuple[int, int, int],
        label_info: object,
        based_on: int | None,
    ) -> Autosave:
        """Keep ``voxels`` (the page's labelmap of an image of ``shape``) as the client's work."""
        expected = int(np.prod(shape))
        if len(voxels) != expected:
            raise AutosaveError(
                f"the work has {len(voxels)} voxels; its shape {'x'.join(map(str, shape))} holds {expected}"
            )
        values = {int(v) for v in np.unique(np.frombuffer(voxels, np.uint8)) if v}
        names = checked_names(label_info, values)
        saved = Autosave(image, client, self.clock(), based_on, tuple(shape), names, voxels)
        with self.store.connect(write=True) as db:
            db.execute(
                upsert(
                    "autosaves",
                    ("image", "client", "time", "based_on", "shape", "names", "voxels"),
                    ("image", "client"),
                ),
                (
                    image,
                    client,
                    saved.time,
                    based_on,
                    json.dumps(list(shape)),
                    json.dumps({str(v): n for v, n in names.items()}),
                    zlib.compress(voxels, 1),
                ),
            )
            db.execute(
                "DELETE FROM autosaves WHERE (image, client) NOT IN "
                "(SELECT image, client FROM autosaves ORDER BY time DESC LIMIT ?)",
                (self.keep,),
            )
        return saved

    def get(self, image: str, client: str) -> Autosave | None:
        with self.store.connect() as db:
            row = db.execute("SELECT * FROM autosaves WHERE image = ? AND client = ?", (image, client)).fetchone()
        if row is None:
            return None
        return Autosave(
            row["image"],
            row["client"],
            row["time"],
            row["based_on"],
            tuple(json.loads(row["shape"])),
            {int(v): n for v, n in json.loads(row["names"]).items()},
            zlib.decompress(row["voxels"]),
        )

    def drop(self, image: str, client: str) -> bool:
        with self.store.connect(write=True) as db:
            return db.execute("DELETE FROM autosaves WHERE image = ? AND client = ?", (image, client)).rowcount > 0
