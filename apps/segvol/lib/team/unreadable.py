"""Images that cannot be read (a truncated file, not a volume, a series that does not convert).

One bad file must not stop anyone: each is logged once, shown in /segvol/status, and skipped by
every next-image strategy, while the other images are served as usual.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class Unreadable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._found: dict[str, tuple[str, float]] = {}  # image id -> (why, when found)

    def add(self, image_id: str, why: str) -> None:
        with self._lock:
            if image_id in self._found:
                return
            self._found[image_id] = (why, time.time())
        log.error("image %s cannot be read; every strategy skips it: %s", image_id, why)

    def has(self, image_id: str) -> bool:
        return image_id in self._found

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._found)

    def as_json(self) -> list[dict]:
        with self._lock:
            found = sorted(self._found.items())
        return [
            {"image": i, "error": why, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))}
            for i, (why, t) in found
        ]
