"""The team's shared state, in one object: who holds which image (leases), what each served
result and saved label was (provenance), which final label is newest (conflicts), each
annotator's unsaved work (autosaves), and which images cannot be read.

Leases and provenance live in the team store (SQLite beside the datastore, or ``--conf team_db``),
so every process on the datastore sees them; the store is opened once the datastore is known.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lib.team.autosaves import Autosaves
from lib.team.conflicts import FinalSaves
from lib.team.leases import Leases
from lib.team.provenance import Provenance
from lib.team.store import TeamStore
from lib.team.unreadable import Unreadable

log = logging.getLogger(__name__)


class Team:
    def __init__(self, lease_minutes: float) -> None:
        self.lease_minutes = lease_minutes
        self.provenance: Provenance | None = None  # set by open() once the datastore is known
        self.leases: Leases | None = None
        self.final_saves: FinalSaves | None = None
        self.autosaves: Autosaves | None = None
        self.unreadable = Unreadable()  # images that cannot be read, skipped by every strategy

    def open(self, path: Path) -> None:
        """The team's shared state (leases, served results, saved labels) in the SQLite file ``path``."""
        store = TeamStore(path)
        self.provenance = Provenance(store)
        self.leases = Leases(store, self.lease_minutes)
        self.final_saves = FinalSaves(store)
        self.autosaves = Autosaves(store)
        log.info("team state (leases, provenance, history): %s", path)

    def saved(self, image_id: str, tag: str, info: dict) -> None:
        """A label was stored: its history entry; a final label ends the leases on the image and
        replaces its annotator's autosaved work."""
        if self.provenance is not None:
            info["version"] = self.provenance.record_save(
                image_id, info["client"], tag, info["model_version"], info["segments"], info.get("SeriesInstanceUID")
            )
        if tag == "final" and self.leases is not None:
            self.leases.end(image_id)
        if tag == "final" and self.autosaves is not None:
            self.autosaves.drop(image_id, info["client"])

    def history(self, image_id: str) -> list[dict]:
        """Labels saved for the image through this server, newest first."""
        return self.provenance.saves(image_id) if self.provenance is not None else []
