"""Client strings -> DICOM values.

Annotator names, segment names and the like come from clients (a panel field, a Slicer param, a
JSON body) and end up in the DICOM SEG we store. A value the standard forbids (a backslash, which
splits LO into two values; '=' or a sixth '^' in a person name; control characters; more than 64
characters; non-ASCII text without a SpecificCharacterSet) makes a SEG that validators reject and
viewers show garbled. These functions make valid values; the original strings are kept by the
callers (the team store), never changed here.
"""

from __future__ import annotations

import unicodedata

LIMIT = 64  # LO: 64 characters; PN: 64 characters per component group; we also keep to 64 bytes
PN_COMPONENTS = 5  # family, given, middle, prefix, suffix
UTF8 = "ISO_IR 192"
UNNAMED = "unnamed"
ANONYMOUS = "anonymous^"


def _clean(text: str, replace: dict[str, str]) -> str:
    """NFC text without control characters (whitespace ones become a space, the others, e.g. NUL
    or ESC, are dropped: DICOM text allows none of them and ESC would switch character sets), lone
    surrogates (from JSON "\\ud800"; they cannot be encoded) dropped, ``replace`` applied, runs of
    whitespace as one space, stripped."""
    out = []
    for c in unicodedata.normalize("NFC", text):
        kind = unicodedata.category(c)
        if kind == "Cc":
            out.append(" " if c.isspace() else "")
        elif kind != "Cs":
            out.append(replace.get(c, c))
    return " ".join("".join(out).split())


def _cut(text: str, size: int) -> str:
    """``text`` cut to ``size`` UTF-8 bytes (so also characters), at a character boundary, without
    trailing spaces. The standard counts LO and PN lengths in characters, but dciodvfy, and readers
    with byte buffers, count bytes: a value within both limits is valid by either reading."""
    return text.encode("utf-8")[: max(size, 0)].decode("utf-8", "ignore").rstrip()


def long_string(text: str, fallback: str = UNNAMED) -> str:
    """An LO value (SegmentLabel, SeriesDescription, ContentDescription, a local CodeMeaning, an
    algorithm version): one value (a backslash becomes '/', it would split the value in two), no
    control characters, whitespace normalised, at most 64 characters and 64 UTF-8 bytes (21 CJK
    characters); ``fallback`` (cleaned the same way, else "unnamed") when nothing is left, since
    these attributes must not be empty."""
    value = _cut(_clean(text, {"\\": "/"}), LIMIT)
    if value:
        return value
    return long_string(fallback) if fallback != UNNAMED else UNNAMED


def person_name(client: str) -> str:
    """A DICOM person name (PN) for an annotator. "Jane Doe" -> "Doe^Jane" (the last word is the
    family name); one word -> "word^" (without a '^' it reads as the retired free-text form, and
    highdicom refuses it); a value with '^' keeps its components, at most five (the rest are folded
    into the fifth, joined by spaces) and without trailing empty ones (except "family^"). Only the
    alphabetic component group is ours to fill: '=' becomes '-', a backslash '/' (it would make two
    names), control characters go, whitespace is normalised, and the group is at most 64 characters
    and 64 UTF-8 bytes (each component cut to what the ones before it leave). Nothing left:
    "anonymous^"."""
    text = _clean(client, {"\\": "/", "=": "-"})
    if "^" in text:
        parts = [" ".join(p.split()) for p in text.split("^")]
        if len(parts) > PN_COMPONENTS:
            parts = parts[: PN_COMPONENTS - 1] + [" ".join(p for p in parts[PN_COMPONENTS - 1 :] if p)]
    else:
        words = text.split()
        parts = [words[-1], " ".join(words[:-1])] if words else []
    if not any(parts):
        return ANONYMOUS
    fitted: list[str] = []
    for part in parts:
        # what the name so far and this part's '^' take; the family name leaves room for its '^'
        used = len("^".join(fitted).encode("utf-8")) + 1 if fitted else 1
        fitted.append(_cut(part, LIMIT - used))
    while len(fitted) > 2 and not fitted[-1]:
        fitted.pop()
    return "^".join(fitted)


def character_set(*values: str) -> str | None:
    """The SpecificCharacterSet for a dataset holding ``values``: "ISO_IR 192" (UTF-8, which holds
    every script, so names in Greek, CJK or with diacritics read back exactly) where any value is
    not ASCII; None (the default repertoire, what readers assume without the attribute) otherwise."""
    return UTF8 if any(not v.isascii() for v in values) else None
