"""Saved labels: read what a client uploads, check it, and bring its values to the app's
convention (voxel value = the /info label index of the category)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.params import FIRST_FREE_VALUE
from segvol.io import ImageReadError, Volume, read_volume
from segvol.vocabulary import Category, Vocabulary

TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
FREE_VALUES = range(FIRST_FREE_VALUE, 256)


class LabelError(ValueError):
    """An uploaded label that cannot be stored; the message says why."""


@dataclass(frozen=True)
class LabelPart:
    value: int  # value in the stored label map
    name: str
    category: Category | None


def check_tag(tag: str) -> str:
    if not TAG.match(tag or ""):
        raise LabelError(f"label tag {tag!r} is not allowed (letters, digits, '_' and '-', up to 64)")
    return tag


def read_upload(path: str | Path, image: Volume) -> np.ndarray:
    """A label file as an (i, j, k) integer array on the image's grid. ``.bin`` is OHIF's raw
    uint8 labelmap in Fortran order."""
    p = Path(path)
    if p.name.endswith(".bin"):
        raw = np.fromfile(p, dtype=np.uint8)
        if raw.size != image.array.size:
            raise LabelError(f"raw label has {raw.size} bytes; the image has {image.array.size} voxels")
        return raw.reshape(image.array.shape, order="F")
    try:
        arr = np.asarray(read_volume(p).array)
    except ImageReadError as e:
        raise LabelError(f"the label is not a readable volume: {e}") from e
    if arr.shape != image.array.shape:
        raise LabelError(f"label shape {arr.shape} differs from the image shape {image.array.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise LabelError("label values must be whole numbers")
    if arr.min() < 0 or arr.max() > 65535:
        raise LabelError(f"label values must lie in 0..65535, got {arr.min()}..{arr.max()}")
    return arr.astype(np.int64)


def normalise(arr: np.ndarray, label_info: list | None, vocabulary: Vocabulary) -> tuple[np.ndarray, list[LabelPart]]:
    """Map the client's values to the app's: names from ``label_info`` ([{"name", "idx"?}], idx
    absent: one entry per value present, ascending), else the value itself as a label index."""
    present = [int(v) for v in np.unique(arr) if v != 0]
    names: dict[int, str] = {}
    if label_info:
        if not isinstance(label_info, list) or not all(isinstance(d, dict) and "name" in d for d in label_info):
            raise LabelError('label_info must be a list of {"name": ..., "idx": ...} objects')
        if all("idx" in d for d in label_info):
            names = {int(d["idx"]): str(d["name"]) for d in label_info}
        else:
            names = {v: str(d["name"]) for v, d in zip(present, label_info)}
    out = np.zeros(arr.shape, np.uint8)
    parts: list[LabelPart] = []
    free = iter(FREE_VALUES)
    for v in present:
        name = names.get(v)
        cat = (
            vocabulary.resolve(name).category
            if name
            else (vocabulary.categories[v - 1] if 1 <= v <= len(vocabulary) else None)
        )
        if cat is not None:
            new, name = cat.index, name or cat.name
        else:
            new = next(free, None)
            if new is None:
                raise LabelError("too many labels outside the vocabulary in one label map")
            name = name or f"label {v}"
        out[arr == v] = new
        parts.append(LabelPart(new, name, cat))
    return out, parts
