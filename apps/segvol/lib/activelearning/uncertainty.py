"""Next image to annotate: the one on which SegVol is least sure of the categories being annotated.

The scores (mean binary entropy of the zoom-out prediction; lib/activelearning/scorer.py) are
computed in the background and kept in the team store: a pick only reads them, so Next image
never runs the model and never waits for it. It takes the least certain unlabelled image among
those the served model has scored, else among those an earlier model scored (after a promotion,
until the new scores are in), else a random one; for the request's ``labels`` where they have
scores, else for the team's categories. The answer says which (``scored_by``).
"""

from __future__ import annotations

import heapq
import logging
import random
import threading

from monailabel.interfaces.tasks.strategy import Strategy

from lib.activelearning.scorer import team_categories
from lib.serving.host import ModelHost
from lib.team.scores import Score, Scores
from lib.team.store import TeamStore
from lib.team.unreadable import Unreadable

log = logging.getLogger(__name__)
SHOWN = 20  # least certain images listed in an answer


class Uncertainty(Strategy):
    def __init__(self, service: ModelHost, unreadable: Unreadable, store: TeamStore) -> None:
        super().__init__("Least certain SegVol prediction first (scored in the background)")
        self.service = service
        self.unreadable = unreadable
        self.store = store
        self.scores = Scores(store)
        self._read: dict[tuple, list] = {}  # the scores last read, by what they were read for
        self._team: tuple[int, list[str]] = (-1, [])  # (saves generation, the team's categories then)
        self._prepared = threading.local()  # (request, what prepare read for it), per request thread

    def prepare(self, request: dict, datastore) -> None:
        """Read the scores before the pick lock (lib/team/leases.py): annotators asking at once
        then wait on each other only for the choice, not for reading thousands of scores (nor
        for asking whether there are new ones)."""
        self._prepared.read = (request, self.stored(request))

    def stored(self, request: dict) -> list[tuple[list[str], dict[str, Score]]]:
        """(categories, image -> newest score) for each category set of the request, read again
        only when a score was stored since (one cheap query tells)."""
        version = self.service.version
        scores, saves = self.generations()
        sets = self.category_sets(request, saves)
        key = (version, tuple(tuple(names) for names in sets), scores)
        if key not in self._read:
            self._read = {key: [(names, self.scores.newest(names, version)) for names in sets]}
        return self._read[key]

    def generations(self) -> tuple[int, int]:
        """How many scores and saves the team store has had: one query says whether to read again."""
        with self.store.connect() as db:
            row = db.execute(
                "SELECT (SELECT n FROM generations WHERE name = 'scores'), (SELECT MAX(id) FROM saves)"
            ).fetchone()
        return row[0] or 0, row[1] or 0

    def category_sets(self, request: dict, saves: int) -> list[list[str]]:
        """The request's ``labels`` as category names (main.next_sample refused other names), then
        the team's (read again when a label was saved since: ``saves``)."""
        if saves != self._team[0]:
            self._team = (saves, team_categories(self.store, self.service.settings.auto_labels))
        team = self._team[1]
        asked = request.get("labels")
        if isinstance(asked, list) and asked:
            vocab = self.service.vocabulary
            names = sorted({vocab.resolve(str(n)).category.name for n in asked})
            return [names] if names == team else [names, team]
        return [team]

    def __call__(self, request: dict, datastore) -> dict | None:
        unreadable = self.unreadable.ids()
        candidates = [i for i in datastore.get_unlabeled_images(request.get("label_tag"), None) if i not in unreadable]
        if not candidates:
            return None
        version = self.service.version
        prepared = getattr(self._prepared, "read", None)
        sets = prepared[1] if prepared and prepared[0] is request else self.stored(request)
        for served in (True, False):  # the served model's scores first, then an earlier model's
            for names, stored in sets:
                scored = {i: stored[i] for i in candidates if i in stored}
                if served:
                    scored = {i: s for i, s in scored.items() if s.model_version == version}
                if scored:
                    return self._pick(scored, names, version, len(candidates))
        pick = random.choice(candidates)
        log.info("uncertainty: no unlabelled image has a score yet; %s at random", pick)
        return {"id": pick, "scored_by": {"random": "no unlabelled image has a score yet"}}

    @staticmethod
    def _pick(scored: dict[str, Score], names: list[str], version: str, total: int) -> dict:
        """The least certain image; the answer lists the ``SHOWN`` least certain with their scores
        (all of them would be megabytes on a big archive, for every Next image)."""
        top = heapq.nlargest(SHOWN, scored, key=lambda i: scored[i].value)
        best = top[0]
        older = sorted({s.model_version for s in scored.values()} - {version})
        log.info("uncertainty over %s: %s", ", ".join(names), ", ".join(f"{i}={scored[i].value:.3f}" for i in top[:5]))
        return {
            "id": best,
            "weight": scored[best].value,
            "uncertainty": {i: scored[i].value for i in top},
            "categories": names,
            "scored_by": {
                "model_version": scored[best].model_version,
                "served_model": version,
                "earlier_models": older,
                "scored": len(scored),
                "unlabelled": total,
            },
        }
