"""The team's shared state, in one object: who holds which image (leases), what each served
result and saved label was (provenance), which final label is newest (conflicts), each
annotator's unsaved work (autosaves), the review of every final label and the double readings
(reviews, double_reading), who reviews (roles), and which images cannot be read.

Leases and provenance live in the team store (SQLite beside the datastore, or ``--conf team_db``),
so every process on the datastore sees them; the store is opened once the datastore is known.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lib.settings import AppSettings
from lib.team.autosaves import Autosaves
from lib.team.conflicts import FinalSaves
from lib.team.double_reading import DoubleReading
from lib.team.held import HeldSaves
from lib.team.leases import Leases
from lib.team.provenance import Provenance
from lib.team.reviews import Reviews
from lib.team.roles import Roles
from lib.team.store import TeamStore, open_store
from lib.team.unreadable import Unreadable
from segvol.postgres import DatabaseUnavailable

log = logging.getLogger(__name__)


def store_path(team_db: str | None, datastore_root: Path) -> str | Path:
    """The team store: ``--conf team_db`` (a postgresql:// URL or an SQLite file), else
    .segvol/team.sqlite beside the datastore."""
    return team_db or Path(datastore_root) / ".segvol" / "team.sqlite"


class Team:
    def __init__(self, lease_minutes: float, double_read_fraction: float = 0.0, roles: Roles | None = None) -> None:
        self.lease_minutes = lease_minutes
        self.double_read_fraction = double_read_fraction
        self.roles = roles or Roles((), False)
        self.store: TeamStore | None = None  # set by open() once the datastore is known
        self.provenance: Provenance | None = None
        self.leases: Leases | None = None
        self.final_saves: FinalSaves | None = None
        self.autosaves: Autosaves | None = None
        self.reviews: Reviews | None = None
        self.double: DoubleReading | None = None
        self.held: HeldSaves | None = None  # saves kept on this host while the team database is down
        self.unreadable = Unreadable()  # images that cannot be read, skipped by every strategy

    @classmethod
    def of(cls, settings: AppSettings) -> Team:
        return cls(
            settings.lease_minutes, settings.double_read_fraction, Roles(settings.reviewers, settings.self_review)
        )

    def open(self, where: str | Path, held: Path | None = None) -> None:
        """The team's shared state (leases, served results, saved labels, reviews) at ``where``: an
        SQLite file or a postgresql:// URL; saves are held in the folder ``held`` while it does not answer."""
        store = self.store = open_store(where)
        self.provenance = Provenance(store)
        self.leases = Leases(store, self.lease_minutes)
        self.final_saves = FinalSaves(store)
        self.autosaves = Autosaves(store)
        self.reviews = Reviews(store)
        self.double = DoubleReading(store, self.reviews, self.double_read_fraction)
        if held is not None:
            self.held = HeldSaves(held)
            self.held.replay_record = self._replay
            self.held.before = self.provenance.flush_held
        log.info("team state (leases, provenance, history, reviews): %s", store)

    def blind(self, image_id: str, client: str) -> set[int]:
        """The saves of the image ``client`` may not see yet: another annotator's double reading while
        the pair is incomplete (a reviewer sees everything)."""
        if self.double is None:
            return set()
        return self.double.hidden_from(image_id, client, self.roles.reviewer(client))

    def final_hidden(self, image_id: str, client: str) -> bool:
        """Whether the image's newest final label is a double reading ``client`` may not see yet."""
        hidden = self.blind(image_id, client)
        newest = self.final_saves.newest(image_id) if hidden else None
        return newest is not None and newest["version"] in hidden

    def hidden_series(self, client: str) -> set[str]:
        """The SEG series of every double reading ``client`` may not see yet (for the DICOMweb proxy)."""
        if self.reviews is None or self.roles.reviewer(client):
            return set()
        return self.reviews.waiting_series(client)

    def saved(self, image_id: str, tag: str, info: dict, label: np.ndarray | None = None, spacing=None) -> None:
        """A label was stored: its history entry; a final label is submitted for review (a double
        reading keeps its voxels, and the pair's agreement is measured once both are in), ends the
        leases on the image (a double reading only its reader's) and replaces the annotator's autosave.
        With the team database down, the record is held on this host (lib/team/held.py) and written
        when it answers: each step may run again (the history entry is kept once, in ``info``)."""
        try:
            self._saved(image_id, tag, info, label, spacing)
        except DatabaseUnavailable as e:
            if self.held is None:
                raise
            self.held.hold_record(image_id, tag, info, label, spacing, e)
            info["held"] = f"{e}: the label is stored; the team's record of it is written when the database answers"

    def _replay(self, request: dict, label: np.ndarray | None) -> None:
        """A held record written now (HeldSaves.flush); DatabaseUnavailable while still down."""
        self._saved(request["image"], request["tag"], request["info"], label, request.get("spacing"))

    def _saved(self, image_id: str, tag: str, info: dict, label: np.ndarray | None, spacing) -> None:
        if self.provenance is not None and "version" not in info:
            info["version"] = self.provenance.record_save(
                image_id, info["client"], tag, info["model_version"], info["segments"], info.get("SeriesInstanceUID")
            )
        if tag != "final" or self.store is None:
            return
        client, version = info["client"], info["version"]
        review_of = info.get("review_of")
        reading = review_of is None and self.double.is_reading(image_id, client)
        lease = self.leases.held_by(client)  # a client holds one lease at most
        lease = lease if lease is not None and lease.image == image_id else None
        if reading:
            self.leases.give_back(image_id, client)
        else:
            self.leases.end(image_id)
        self.autosaves.drop(image_id, client)
        review = self.reviews.of(version)  # recorded already when a held record is written again
        if review is None:
            review = self.reviews.submitted(
                version, image_id, client, lease.granted if lease else None, reading, review_of
            )
        if review_of is not None and info.get("corrections"):
            self.reviews.record_changes(version, info["corrections"])
        if reading and label is not None:
            names = {int(s["value"]): s["name"] for s in info["segments"]}
            self.double.keep(version, image_id, client, label, names, spacing)
            if review["pair"]:
                try:
                    self.double.measure(version, review["pair"])
                except Exception:  # the figures can be measured again on request; the save stands
                    log.exception("agreement of readings %s and %s of %s failed", version, review["pair"], image_id)
        info["review"] = {k: v for k, v in review.items() if v is not None}

    def history(self, image_id: str) -> list[dict]:
        """Labels saved for the image through this server, newest first."""
        return self.provenance.saves(image_id) if self.provenance is not None else []
