"""The labels a round may learn from, by their review (``--conf train_on``).

``approved``: an image's newest final label, when a reviewer approved it (an annotator's label
approved as it is, or a reviewer's corrected or adjudicated version). ``final``: every newest
final label, but a double reading still waiting for adjudication (two readings of one image that
may disagree are not a label yet). A label saved outside this server (no review on record) is
``unreviewed``: a round on ``approved`` leaves it out, one on ``final`` takes it.
"""

from __future__ import annotations

import logging

from lib.rounds.round import image_id_of
from lib.team.reviews import APPROVED, Reviews

log = logging.getLogger(__name__)
UNREVIEWED = "unreviewed"


class ReviewedLabels:
    """The datastore as a round sees it: ``datalist`` limited by ``train_on``, each item with its
    ``review_state``; ``states`` keeps every listed label's state for the round's metadata."""

    def __init__(self, datastore, reviews: Reviews, train_on: str) -> None:
        self._inner = datastore
        self.reviews = reviews
        self.train_on = train_on
        self.states: dict[str, str] = {}

    def datalist(self, full_path: bool = True) -> list[dict]:
        out, left = [], []
        for item in self._inner.datalist(full_path=full_path):
            image = item.get("image_id") or image_id_of(item["image"])
            review = self.reviews.of_label(image, item.get("label_key", ""))
            state = review["state"] if review else UNREVIEWED
            reading = bool(review and review["double_read"])
            self.states[item.get("label_key", "")] = state
            if (self.train_on == "approved" and state != APPROVED) or reading:
                left.append(f"{image} ({state}{', a double reading' if reading else ''})")
                continue
            out.append(dict(item, review_state=state))
        if left:
            log.info("round on %s labels: %d left out: %s", self.train_on, len(left), ", ".join(left[:20]))
        return out

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def reviewed_labels(datastore, reviews: Reviews | None, train_on: str):
    """``datastore`` as a round on ``train_on`` labels sees it (as it is without a team store)."""
    return datastore if reviews is None else ReviewedLabels(datastore, reviews, train_on)
