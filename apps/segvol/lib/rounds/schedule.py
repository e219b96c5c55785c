"""When the server starts a round: once ``train_after_labels`` new final labels are saved, and every
``train_every_minutes`` when there are new final labels. "New" is against the labels the last
round used (its version's metadata); on DICOMweb the labels are SEG series, counted with QIDO only.
The round itself runs where the app's ``start`` sends it (MONAI Label's training subprocess, which
refuses a second one while one runs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from segvol.training.versions import VersionStore

log = logging.getLogger(__name__)


class RoundSchedule:
    def __init__(self, settings, versions: VersionStore, datastore: Callable[[], object], start: Callable[[], object]):
        """``datastore``: the app's datastore (asked each time: the app builds it late);
        ``start``: starts a round in the background."""
        self.settings = settings
        self.versions = versions
        self.datastore = datastore
        self._start = start

    def new_final_labels(self) -> int:
        """Labels the last round did not use (on DICOMweb: SEG series, counted with QIDO only)."""
        names = self.versions.names()
        used = {x.get("label") for x in self.versions.meta(names[-1]).get("labels", [])} if names else set()
        return len(self.datastore().label_keys() - used)

    def start_round(self, why: str) -> None:
        log.info("starting a fine-tune round: %s", why)
        self._start()

    def labels_saved(self) -> None:
        """A label was saved: a round once ``train_after_labels`` new final labels are in."""
        after = self.settings.train_after_labels
        if after > 0:
            new = self.new_final_labels()
            if new >= after:
                self.start_round(f"{new} new final labels (train_after_labels {after})")

    def start(self) -> None:
        """The scheduler thread, when ``train_every_minutes`` asks for one (the server process only)."""
        minutes = self.settings.train_every_minutes
        if minutes > 0:
            threading.Thread(target=self._every, args=(minutes,), name="segvol-rounds", daemon=True).start()

    def _every(self, minutes: float) -> None:
        while True:
            time.sleep(minutes * 60)
            try:
                if self.new_final_labels() > 0:
                    self.start_round(f"schedule (every {minutes:g} min) with new final labels")
            except Exception:  # a scheduler that dies silently is worse than a logged failure
                log.exception("scheduled round failed to start")
