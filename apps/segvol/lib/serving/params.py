"""Client parameters -> engine prompts, in each client's own conventions.

* OHIF v3 (vista3d task): ``label_prompt`` (label indices), ``points`` + ``point_labels``.
* 3D Slicer: ``texts`` (the segmentation task's option), ``foreground`` / ``background``
  clicks, ``label`` (segment name), ``roi`` = [i0, i1, j0, j1, k0, k1] (pairs may be swapped).
* Any client over plain HTTP: ``texts``, ``points``, ``point_labels``, ``box``.
Every coordinate is a voxel index (i, j, k) of the image array.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lib.labels.checks import FIRST_FREE_VALUE
from segvol.prompts import Prompt, PromptError
from segvol.vocabulary import Vocabulary

log = logging.getLogger(__name__)

EXTENSIONS = (".nrrd", ".nii.gz", ".nii")


class ParamError(PromptError):
    """A request parameter that cannot be used; the message names it."""


@dataclass(frozen=True)
class Target:
    value: int  # voxel value written for this target
    name: str  # label name reported in label_names
    prompt: Prompt
    sent: str | None  # the text the model received


@dataclass(frozen=True)
class Output:
    extension: str
    zoom_in: bool | None
    compress: bool


def flag(params: dict, key: str, default: bool = False) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ParamError(f"{key} must be true or false, got {value!r}")
    return value


def output_options(params: dict) -> Output:
    ext = params.get("result_extension") or ".nrrd"
    if ext not in EXTENSIONS:
        raise ParamError(f"result_extension {ext!r} is not supported (use one of {', '.join(EXTENSIONS)})")
    dtype = params.get("result_dtype") or "uint8"
    if dtype != "uint8":
        raise ParamError(f"result_dtype {dtype!r} is not supported: label maps are uint8")
    zoom_in = params.get("zoom_in")
    if zoom_in is not None and not isinstance(zoom_in, bool):
        raise ParamError(f"zoom_in must be true or false, got {zoom_in!r}")
    compress = params.get("result_compress", True)
    if not isinstance(compress, bool):
        raise ParamError(f"result_compress must be true or false, got {compress!r}")
    return Output(ext, zoom_in, compress)


def _list(params: dict, key: str) -> list:
    v = params.get(key)
    if v is None or v == "":
        return []
    if not isinstance(v, list):
        raise ParamError(f"{key} must be a list, got {type(v).__name__}: {v!r}")
    return v


def texts_param(params: dict, key: str = "texts") -> list[str]:
    """A list of names, or one string with names separated by commas."""
    v = params.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        return [t.strip() for t in v.split(",") if t.strip()]
    if isinstance(v, list) and all(isinstance(t, str) for t in v):
        if any(not t.strip() for t in v):
            raise ParamError(f"{key} contains an empty name")
        return [t.strip() for t in v]
    raise ParamError(f"{key} must be a string or a list of strings, got {v!r}")


def box_param(params: dict) -> list | None:
    box = params.get("box")
    if box in (None, []):
        return None
    if not isinstance(box, list) or len(box) != 6:
        raise ParamError(f"box must be [i0, j0, k0, i1, j1, k1], got {box!r}")
    return box


def slicer_roi(params: dict, shape) -> list | None:
    """Slicer's ROI [i0, i1, j0, j1, k0, k1] -> an inclusive box, pairs sorted and clipped to the
    volume (an ROI may hang over the volume's edge)."""
    roi = params.get("roi")
    if roi in (None, []):
        return None
    if not isinstance(roi, list) or len(roi) != 6 or not all(isinstance(v, (int, float)) for v in roi):
        raise ParamError(f"roi must be [i0, i1, j0, j1, k0, k1], got {roi!r}")
    lo, hi = [], []
    for ax in range(3):
        a, b = sorted((round(roi[2 * ax]), round(roi[2 * ax + 1])))
        if b < 0 or a > shape[ax] - 1:
            raise ParamError(f"roi {roi} lies outside the volume of shape {tuple(shape)}")
        lo.append(max(a, 0))
        hi.append(min(b, shape[ax] - 1))
    return lo + hi


class PromptBuilder:
    """Turns names and clicks into targets with stable voxel values."""

    def __init__(self, vocabulary: Vocabulary, shape, exact_text: bool = False) -> None:
        self.vocabulary = vocabulary
        self.shape = shape
        self.exact_text = exact_text  # send texts as typed (no synonym mapping)
        self._next_free = FIRST_FREE_VALUE

    def by_index(self, index) -> str:
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= len(self.vocabulary):
            n = len(self.vocabulary)
            raise ParamError(f"label_prompt index {index!r} is not a SegVol label (valid: 1..{n}, see /info labels)")
        return self.vocabulary.categories[index - 1].name

    def target(self, text: str | None, points=None, labels=None, box=None, name: str | None = None) -> Target:
        """A target's value: its category's /info index, else (a name outside the vocabulary, or
        clicks and a box without a name) a free value from 224 up, never a category's."""
        sent, value = None, None
        if text is None:
            value = self._free_value(name or "clicks")
        else:
            r = self.vocabulary.resolve(text, self.exact_text)
            if r.category is not None:
                sent, value = r.name, r.category.index
            else:
                if r.via == "unknown":
                    hint = f"; closest known: {', '.join(r.suggestions)}" if r.suggestions else ""
                    log.warning("'%s' is not a SegVol training category: used as typed%s", text, hint)
                sent, value = r.name, self._free_value(text)
        prompt = Prompt.make(self.shape, sent if text is not None else None, points, labels, box)
        return Target(value, name or text or "segvol", prompt, sent)

    def _free_value(self, text: str) -> int:
        if self._next_free > 255:
            raise ParamError(f"too many names outside the vocabulary in one request (at '{text}')")
        self._next_free += 1
        return self._next_free - 1


def explicit(params: dict) -> tuple[list[str], list, list, list | None]:
    """The plain REST parameters every task accepts."""
    points = _list(params, "points")
    labels = _list(params, "point_labels")
    return texts_param(params), points, labels, box_param(params)


def with_texts(builder: PromptBuilder, texts: list[str], points, labels, box) -> list[Target]:
    """One target per text (all sharing the clicks and box), or one target without text."""
    if not texts:
        return [builder.target(None, points, labels, box)]
    return [builder.target(t, points, labels, box) for t in texts]
