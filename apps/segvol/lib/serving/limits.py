"""Bounds on everything a client sends: the size of a request's JSON, of every list and string in
it, and of the numbers, so that no request can make the server do unbounded work or hold a lock
shared with other annotators for long. A value over a bound is refused (HTTP 400) with a message
naming the key, the size and the bound; nothing starts on a refused request.
"""

from __future__ import annotations

import math

from lib.serving.validation import RequestError

MAX_JSON_CHARS = 256 * 1024  # a params form field or body, as text
MAX_DEPTH = 6
MAX_ITEMS = 1024  # any list or object
MAX_CHARS = 1024  # any string
MAX_NUMBER = 1e9  # magnitude of any number

# keys whose lists have tighter bounds, because each item costs model work or a stored segment
MAX_ITEMS_OF = {
    "points": 256,
    "point_labels": 256,
    "foreground": 256,
    "background": 256,
    "texts": 32,
    "labels": 16,  # categories an uncertainty score decodes, per image
    "label_prompt": 255,
    "label_info": 255,
}
MAX_NAME_CHARS = 128  # a category or segment name, a client id


def check_json_text(text: str | None, what: str = "params") -> None:
    if text is not None and len(text) > MAX_JSON_CHARS:
        raise RequestError(f"{what} is {len(text)} characters; at most {MAX_JSON_CHARS} are accepted")


def check_sizes(value: object, what: str = "params", depth: int = 0) -> None:
    """Every list, object, string and number in ``value`` within its bound (recursively)."""
    if depth > MAX_DEPTH:
        raise RequestError(f"{what} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        if len(value) > MAX_CHARS:
            raise RequestError(f"{what} is a string of {len(value)} characters; at most {MAX_CHARS}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: no file, database or DICOM value can hold it
            raise RequestError(f"{what} is not valid Unicode text ({e.reason} at {e.start})") from e
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int | float):
        if not math.isfinite(value) or abs(value) > MAX_NUMBER:
            raise RequestError(f"{what} = {value!r} is not a finite number of magnitude at most {MAX_NUMBER:g}")
    elif isinstance(value, dict):
        if len(value) > MAX_ITEMS:
            raise RequestError(f"{what} has {len(value)} keys; at most {MAX_ITEMS}")
        for key, item in value.items():
            check_sizes(key, f"{what} key", depth + 1)
            bound = MAX_ITEMS_OF.get(key)
            if bound is not None and isinstance(item, list | str) and _count(item) > bound:
                raise RequestError(f"{what}.{key} has {_count(item)} items; at most {bound} are accepted")
            check_sizes(item, f"{what}.{key}", depth + 1)
    elif isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise RequestError(f"{what} has {len(value)} items; at most {MAX_ITEMS}")
        for i, item in enumerate(value):
            check_sizes(item, f"{what}[{i}]", depth + 1)


def _count(item: list | str) -> int:
    """Items of a list, or of a comma-separated string of names (``texts`` may be one)."""
    return len(item) if isinstance(item, list) else len([t for t in item.split(",") if t.strip()])
