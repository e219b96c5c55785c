"""SegVol's category vocabulary: the names it was trained with, their synonyms and codes.

A text prompt is sent to the model as a trained name whenever we can tell which one
is meant (an exact name, or a known synonym); anything else is sent as typed, with a
warning that lists the closest known names.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

CATEGORIES_FILE = Path(__file__).resolve().parent / "assets" / "categories.json"


def _norm(text: str) -> str:
    return " ".join(text.replace("_", " ").lower().split())


@dataclass(frozen=True)
class Category:
    index: int  # 1-based, stable: the order of the vocabulary file
    name: str  # the trained label string
    preferred_name: str
    synonyms: tuple[str, ...]
    region: str | None
    type: str | None
    snomed: dict | None


@dataclass(frozen=True)
class Resolved:
    """What a typed text became: ``name`` is what the model receives."""

    typed: str
    name: str
    category: Category | None
    via: str  # "name", "synonym", "unknown" or "as typed"
    suggestions: tuple[str, ...] = ()


class Vocabulary:
    def __init__(self, path: Path = CATEGORIES_FILE) -> None:
        entries = json.loads(Path(path).read_text())["categories"]
        self.categories = [
            Category(
                i + 1,
                e["name"],
                e.get("preferred_name") or e["name"],
                tuple(e.get("synonyms") or ()) + tuple(e.get("equivalent_names") or ()),
                e.get("region"),
                e.get("type"),
                e.get("snomed"),
            )
            for i, e in enumerate(entries)
        ]
        self.by_name = {_norm(c.name): c for c in self.categories}
        self.by_synonym: dict[str, Category] = {}
        for c in self.categories:
            for s in c.synonyms:
                key = _norm(s)
                if key in self.by_name:
                    continue
                current = self.by_synonym.get(key)
                # several trained strings can share a synonym: prefer the concept's preferred entry
                if current is None or (c.name == c.preferred_name and current.name != current.preferred_name):
                    self.by_synonym[key] = c

        # (scheme, code, laterality modifier code or None) -> the first category coded so
        self.by_code: dict[tuple[str, str, str | None], Category] = {}
        for c in self.categories:
            if c.snomed:
                modifier = (c.snomed.get("modifier") or {}).get("CodeValue")
                key = (c.snomed["CodingSchemeDesignator"], str(c.snomed["CodeValue"]), modifier)
                self.by_code.setdefault(key, c)

    def __len__(self) -> int:
        return len(self.categories)

    def by_coded_concept(self, scheme: str, code: str, modifier: str | None = None) -> Category | None:
        """The category of a coded anatomy (e.g. a DICOM SEG's SegmentedPropertyTypeCode, SCT
        64033007 "Kidney" with modifier SCT 7771000 "Left" -> left kidney); None if none is coded so."""
        return self.by_code.get((scheme, str(code), modifier))

    def resolve(self, text: str, exact: bool = False) -> Resolved:
        """What the model receives for a typed text: the trained name of its category (a synonym
        mapped), or with ``exact`` the text as typed, the category kept for labelling."""
        if exact:
            found = self.resolve(text)
            return Resolved(text, text.strip(), found.category, "as typed", found.suggestions)
        key = _norm(text)
        if key in self.by_name:
            return Resolved(text, self.by_name[key].name, self.by_name[key], "name")
        if key in self.by_synonym:
            c = self.by_synonym[key]
            return Resolved(text, c.name, c, "synonym")
        close = difflib.get_close_matches(key, list(self.by_name) + list(self.by_synonym), n=5, cutoff=0.6)
        names = tuple(dict.fromkeys((self.by_name.get(k) or self.by_synonym[k]).name for k in close))
        return Resolved(text, text.strip(), None, "unknown", names)

    def search(self, text: str = "") -> list[Category]:
        key = _norm(text)
        return [
            c for c in self.categories if not key or key in _norm(c.name) or any(key in _norm(s) for s in c.synonyms)
        ]


@cache
def default_vocabulary() -> Vocabulary:
    return Vocabulary()


def resolve_texts(texts: list[str], vocabulary: Vocabulary | None = None, exact: bool = False) -> list[Resolved]:
    """Resolve typed names, logging a warning for each unknown one. With ``exact``, the model gets
    the text as typed (as the official pipeline sends it), its category kept for the label value."""
    vocabulary = vocabulary or default_vocabulary()
    out = []
    for t in texts:
        r = vocabulary.resolve(t, exact)
        if r.via == "unknown":
            hint = f"; closest known: {', '.join(r.suggestions)}" if r.suggestions else ""
            log.warning("'%s' is not a SegVol training category: used as typed%s", t, hint)
        elif r.via == "synonym":
            log.info("'%s' -> trained name '%s'", t, r.name)
        out.append(r)
    return out
