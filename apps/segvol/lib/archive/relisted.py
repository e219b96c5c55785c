"""A listing of the archive kept fresh in the background.

Listing every series of a large archive is slow (QIDO over 10,000 series: seconds, measured in
docs/scaling.md), and the request that found the list too old used to pay for it, with every
request behind it. Here the first listing is made on the spot; later, a list older than
``refresh_seconds`` is still answered at once while one background thread brings it up to date
(``update(last list)``: only what changed, where the archive can tell; else ``list_all`` again).
After this server changed the archive (``invalidate``), the next question updates on the spot.
While the archive does not answer, the last list stands (the log says so).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Relisted(Generic[T]):
    def __init__(
        self,
        list_all: Callable[[], T],
        refresh_seconds: float,
        what: str,
        update: Callable[[T], T] | None = None,
    ) -> None:
        self.list_all = list_all
        self.update = update or (lambda _last: list_all())
        self.refresh_seconds = refresh_seconds
        self.what = what
        self._listed: tuple[float, T] | None = None  # (when, the list)
        self._stale = False  # this server changed the archive: update before answering
        self._lock = threading.Lock()  # one listing at a time
        self._refreshing = False

    def invalidate(self) -> None:
        """Update on the spot at the next question (this server just changed the archive)."""
        self._stale = True

    def __call__(self) -> T:
        listed = self._listed
        if listed is None or self._stale:
            with self._lock:
                if self._listed is None:
                    self._listed = (time.monotonic(), self.list_all())
                elif self._stale:
                    self._stale = False
                    try:
                        self._listed = (time.monotonic(), self.update(self._listed[1]))
                    except BaseException:
                        self._stale = True  # asked again at the next question
                        raise
                return self._listed[1]
        if time.monotonic() - listed[0] > self.refresh_seconds and not self._refreshing:
            self._refreshing = True
            threading.Thread(target=self._refresh, name=f"segvol-relist-{self.what}", daemon=True).start()
        return listed[1]

    def _refresh(self) -> None:
        try:
            t0 = time.perf_counter()
            with self._lock:
                if self._listed is not None:
                    self._listed = (time.monotonic(), self.update(self._listed[1]))
            log.debug("%s listed again in %.2f s", self.what, time.perf_counter() - t0)
        except Exception as e:  # the archive does not answer: the last list stands
            age = time.monotonic() - self._listed[0] if self._listed else float("nan")
            log.warning("archive does not answer (%s); using the %s listed %.0f s ago", e, self.what, age)
        finally:
            self._refreshing = False
