"""Saved labels: read what a client uploads, check it, and bring its values to the app's
convention (voxel value = the /info label index of the category)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib import paths
from lib.labels.uploads import read_label
from segvol.io import ImageReadError, Volume
from segvol.vocabulary import Category, Vocabulary

WHOLE = re.compile(r"^[0-9]{1,5}$")  # ASCII digits only: "²" and "١" pass str.isdigit, not int()
FIRST_FREE_VALUE = 224  # values for names outside the vocabulary (after its 223 categories; uint8: up to 255)
FREE_VALUES = range(FIRST_FREE_VALUE, 256)


class LabelError(ValueError):
    """An uploaded label that cannot be stored; the message says why."""


@dataclass(frozen=True)
class LabelPart:
    value: int  # value in the stored label map
    name: str
    category: Category | None


def check_tag(tag: str) -> str:
    try:
        return paths.tag(tag)
    except paths.PathError as e:
        raise LabelError(str(e)) from e


GRID_TOLERANCE_MM = 1e-3  # per affine entry, plus a relative 1e-5 of its size (float32 files)


def check_grid(label_affine: np.ndarray, image_affine: np.ndarray) -> None:
    """The label's voxels must be the image's: the same voxel -> millimetre map, to a
    thousandth of a millimetre (a flipped, shifted or resampled label is refused, not moved)."""
    diff = np.abs(label_affine - image_affine)
    if np.all(diff[:3] <= GRID_TOLERANCE_MM + 1e-5 * np.abs(image_affine[:3])):
        return
    spacing = [np.linalg.norm(a[:3, :3], axis=0).round(4).tolist() for a in (label_affine, image_affine)]
    origin = [a[:3, 3].round(3).tolist() for a in (label_affine, image_affine)]
    direction = [
        (a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)).round(3).tolist() for a in (label_affine, image_affine)
    ]
    parts = [
        f"{what} {mine} vs the image's {theirs}"
        for what, (mine, theirs) in (("spacing", spacing), ("origin (RAS mm)", origin), ("direction", direction))
        if mine != theirs
    ]
    raise LabelError(
        "the label's grid differs from the image's: " + ("; ".join(parts) or f"affine off by {diff.max():.2g} mm")
    )


def read_upload(path: str | Path, image: Volume, max_bytes: int = 1024 * 1024 * 1024) -> np.ndarray:
    """A label file as an (i, j, k) integer array on the image's grid, read by its content
    (lib.labels.uploads: NIfTI, attached-data NRRD, or OHIF's raw uint8 labelmap in Fortran order with one
    byte per image voxel), never by its name. Raises lib.labels.uploads.UploadError (UploadTooLarge past
    ``max_bytes``, for a 413) for a file that is not read, and LabelError for a label that is read
    but does not fit the image (grid, values); UploadError is deliberately not a LabelError."""
    volume = read_label(path, image, max_bytes, raw_ok=True)
    arr = np.asarray(volume.array)
    if arr.shape != image.array.shape:  # read_label gives the image's shape; kept as a guard
        raise LabelError(f"label shape {arr.shape} differs from the image shape {image.array.shape}")
    try:
        label_affine = volume.affine
    except ImageReadError as e:
        raise LabelError(f"the label is not a readable volume: {e}") from e
    check_grid(label_affine, image.affine)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise LabelError("label values must be whole numbers")
    if arr.min() < 0 or arr.max() > 65535:
        raise LabelError(f"label values must lie in 0..65535, got {arr.min()}..{arr.max()}")
    return arr.astype(np.int64)


def names_of(present: list[int], label_info) -> dict[int, str]:
    """Value -> name from ``label_info``: [{"name", "idx"}] gives each value's name by its idx;
    [{"name"}] (OHIF) one name per value present, ascending. Every value present must be named."""
    if not label_info:
        return {}
    if not isinstance(label_info, list) or not all(
        isinstance(d, dict) and isinstance(d.get("name"), str) and d["name"].strip() for d in label_info
    ):
        raise LabelError('label_info must be a list of {"name": "...", "idx": n} objects with non-empty names')
    with_idx = [d for d in label_info if "idx" in d]
    if with_idx and len(with_idx) != len(label_info):
        raise LabelError("label_info: give idx for every entry or for none")
    if with_idx:
        names = {}
        for d in label_info:
            idx = d["idx"]
            text = str(idx).strip() if isinstance(idx, int | str) and not isinstance(idx, bool) else ""
            if not WHOLE.match(text) or int(text) > 65535:
                raise LabelError(f"label_info idx {idx!r} (for {d['name']!r}) is not a whole number from 0 to 65535")
            names[int(text)] = d["name"].strip()
        missing = [v for v in present if v not in names]
        if missing:
            raise LabelError(f"label values {missing} are in the label but label_info names only {sorted(names)}")
        return names
    if len(label_info) != len(present):
        raise LabelError(
            f"label_info has {len(label_info)} names for the {len(present)} values in the label {present}: "
            "one name per value, in ascending value order (or give idx)"
        )
    return {v: d["name"].strip() for v, d in zip(present, label_info)}


def normalise(arr: np.ndarray, label_info: list | None, vocabulary: Vocabulary) -> tuple[np.ndarray, list[LabelPart]]:
    """Map the client's values to the app's: names from ``label_info`` (names_of), else the value
    itself as a label index. Names outside the vocabulary get free values, never a category's."""
    present = [int(v) for v in np.unique(arr) if v != 0]
    names = names_of(present, label_info)
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
