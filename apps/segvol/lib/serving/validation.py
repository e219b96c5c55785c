"""What a request may carry beyond the prompts: a params object, and parameters a task declares.

A parameter a task does not take, or takes with another type or range, is refused with a message
naming it and what the task takes; nothing starts (no round, no batch) on a request refused here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass


class RequestError(ValueError):
    """A request parameter that cannot be used; the message names it."""


def params_object(text: str | None, what: str = "params") -> dict:
    """A form field that must hold a JSON object ({} when empty)."""
    if not text:
        return {}
    try:
        value = json.loads(text)  # malformed JSON: the app's handler answers 400
    except (RecursionError, ValueError) as e:
        if isinstance(e, json.JSONDecodeError):
            raise
        raise RequestError(f"{what} cannot be read: {type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object, got {type(value).__name__ if value is not None else 'null'}")
    return value


@dataclass(frozen=True)
class Param:
    kind: type  # int or float
    low: float
    high: float
    help: str

    def describe(self, name: str) -> str:
        kind = "an integer" if self.kind is int else "a number"
        return f"{name} ({kind} from {self.low:g} to {self.high:g}: {self.help})"


def check(params: dict, declared: dict[str, Param], passed_through: frozenset[str], what: str) -> dict:
    """``params`` with every declared value checked; anything else but ``passed_through`` refused."""
    takes = "; ".join(p.describe(n) for n, p in declared.items())
    out = {}
    for name, value in params.items():
        if name in passed_through:
            continue
        p = declared.get(name)
        if p is None:
            raise RequestError(f"{what} takes no parameter {name!r}; it takes {takes}")
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if p.kind is int:
            ok_type = ok_type and float(value).is_integer()
        if not ok_type or not math.isfinite(value) or not p.low <= value <= p.high:
            raise RequestError(f"{what}: {name} = {value!r} is not {p.describe(name)}")
        out[name] = p.kind(value)
    return out
