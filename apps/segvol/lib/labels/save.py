"""Saving a label, one pipeline for every datastore: check -> normalise -> provenance -> store.

No MONAI Label here: a datastore adapter (lib/datastores/) hands over the upload and a place to
store it, and gets back what was saved, which the client is told (who, from which model version,
each segment's origin, the SEG series on an archive).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lib.labels.checks import LabelError, LabelPart, check_tag, normalise, read_upload
from lib.team.conflicts import based_on
from lib.team.identity import client_of
from lib.team.provenance import MANUAL, Origin
from lib.team.team import Team
from segvol.io import read_volume
from segvol.vocabulary import Vocabulary

FINAL = "final"
REPORTED = ("client", "model_version", "segments", "SeriesInstanceUID", "version")  # what the client is told


@dataclass
class Checked:
    """A label that passed every check, normalised to /info label indices."""

    label: np.ndarray  # uint8 on the image's grid
    parts: list[LabelPart]
    info: dict  # client, model_version, segments (value, name, origin), the client's own keys


@dataclass
class Saved:
    image: str
    tag: str
    info: dict

    def report(self) -> dict:
        return {key: self.info[key] for key in REPORTED if key in self.info}


class Destination(Protocol):
    """Where a checked label is stored (a folder's label files, an archive's SEGs)."""

    def store(self, image_id: str, image_path: str, checked: Checked, tag: str) -> dict:
        """Stores the label; returns what to add to its info (e.g. the SEG series)."""


class LabelSaver:
    def __init__(
        self, vocabulary: Vocabulary, team: Team, model_version: Callable[[], str], max_upload_bytes: int
    ) -> None:
        self.vocabulary = vocabulary
        self.team = team
        self.model_version = model_version
        self.max_upload_bytes = max_upload_bytes

    def check(self, image_id: str, image_path: str, upload: str, tag: str, params: object) -> Checked:
        """The upload read by its content onto the image's grid, its values brought to the app's
        convention, each segment's origin found (AUTOMATIC / SEMIAUTOMATIC / MANUAL). Raises
        LabelError, UploadError, UploadTooLarge, IdentityError, ImageReadError (the image's own)."""
        check_tag(tag)
        client = self.client(params)
        image = read_volume(image_path)
        arr = read_upload(upload, image, self.max_upload_bytes)
        label, parts = normalise(arr, params.get("label_info"), self.vocabulary)
        info = dict(params)
        info.pop("client_id", None)
        info["client"] = client
        info["segments"] = [
            dict(value=p.value, name=p.name, **self._origin(image_id, p.value, label).as_json()) for p in parts
        ]
        info["model_version"] = self.model_version()
        return Checked(label, parts, info)

    @staticmethod
    def client(params: object) -> str:
        """Who saves: checked before anything else is read (LabelError, IdentityError)."""
        if not isinstance(params, dict):
            raise LabelError(f"params must be a JSON object, got {type(params).__name__}")
        return client_of(params)

    def save(self, image_id: str, image_path: str, upload: str, tag: str, params: object, to: Destination) -> Saved:
        """Checked, then stored and recorded while the image is claimed: a final label that names
        the version it started from is refused (ConflictError) when a colleague's newer one exists."""
        self.client(params)
        base, force = self.versions(params)
        checked = self.check(image_id, image_path, upload, tag, params)
        guard = self.team.final_saves
        if tag != FINAL or guard is None:
            return self._store(image_id, image_path, checked, tag, to)
        with guard.guard(image_id, checked.info["client"], base, force):
            return self._store(image_id, image_path, checked, tag, to)

    @staticmethod
    def versions(params: dict) -> tuple[int | None, bool]:
        """The version the save started from and whether to save anyway (LabelError when malformed)."""
        try:
            return based_on(params)
        except ValueError as e:
            raise LabelError(str(e)) from e

    def _store(self, image_id: str, image_path: str, checked: Checked, tag: str, to: Destination) -> Saved:
        checked.info.update(to.store(image_id, image_path, checked, tag))
        self.team.saved(image_id, tag, checked.info)
        return Saved(image_id, tag, checked.info)

    def _origin(self, image_id: str, value: int, label: np.ndarray) -> Origin:
        provenance = self.team.provenance
        return provenance.origin(image_id, value, label) if provenance is not None else Origin(MANUAL)
