"""Ids that clients send become paths in exactly one way: checked here.

A client's image or label id is only ever looked up among the ids the datastore lists (reading),
or, for a new image, must be a plain name (writing); and every path made from one is resolved
(links followed) and proven to lie inside its folder before the server opens, writes or deletes
it. A violation is a PathError (HTTP 400), never a file touched outside.
"""

from __future__ import annotations

import re
from pathlib import Path

NEW_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # an id a client may give a new image
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # a label tag (final, original, ...)


class PathError(ValueError):
    """An id or path that would leave its folder, or a name that cannot be an id."""


def new_id(image_id: object) -> str:
    """An id for a new image: letters, digits, '.', '_' and '-' only, not starting with '.'."""
    if not isinstance(image_id, str) or not NEW_ID.match(image_id) or ".." in image_id:
        raise PathError(
            f"image id {image_id!r} is not allowed for a new image: 1 to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, no '..'"
        )
    return image_id


def tag(value: object) -> str:
    if not isinstance(value, str) or not TAG.match(value):
        raise PathError(f"label tag {value!r} is not allowed (letters, digits, '_' and '-', up to 64)")
    return value


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` resolved, proven to lie inside ``root`` (resolved too)."""
    base = Path(root).resolve()
    try:
        resolved = (base / path).resolve()
    except (OSError, ValueError) as e:  # a NUL byte, a name the system cannot take, a link loop
        raise PathError(f"{str(path)!r} is not a usable path: {e}") from e
    if resolved != base and base not in resolved.parents:
        raise PathError(f"{str(path)!r} resolves outside {base}")
    return resolved
