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
from lib.team.reviews import ReviewError
from lib.team.team import Team
from segvol.io import read_volume
from segvol.vocabulary import Vocabulary

FINAL = "final"
REPORTED = ("client", "model_version", "segments", "SeriesInstanceUID", "version", "review")  # what the client is told


@dataclass
class Checked:
    """A label that passed every check, normalised to /info label indices."""

    label: np.ndarray  # uint8 on the image's grid
    parts: list[LabelPart]
    info: dict  # client, model_version, segments (value, name, origin), the client's own keys
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # the image's voxel size, mm


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

    def reviewed_label(self, image_id: str, seg_series: str | None) -> tuple[np.ndarray, dict[int, str]]:
        """A stored final label (the SEG series ``seg_series`` on an archive) and value -> name."""


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
        spacing = tuple(float(v) for v in np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0))
        return Checked(label, parts, info, spacing)

    @staticmethod
    def client(params: object) -> str:
        """Who saves: checked before anything else is read (LabelError, IdentityError)."""
        if not isinstance(params, dict):
            raise LabelError(f"params must be a JSON object, got {type(params).__name__}")
        return client_of(params)

    def save(self, image_id: str, image_path: str, upload: str, tag: str, params: object, to: Destination) -> Saved:
        """Checked, then stored and recorded while the image is claimed: a final label that names
        the version it started from is refused (ConflictError) when a colleague's newer one exists.
        A reviewer's correction (``review_of``) is checked against the review before anything is read
        and again under the claim; a double reading is never in conflict with the other reading."""
        client = self.client(params)
        base, force = self.versions(params)
        review_of = self.review_of(params, client, tag)
        checked = self.check(image_id, image_path, upload, tag, params)
        guard = self.team.final_saves
        if tag != FINAL or guard is None:
            return self._store(image_id, image_path, checked, tag, to)
        if review_of is not None:
            base, force = None, True  # the review's state decides, not the newest version
        double = self.team.double
        others = set(double.readers(image_id).values()) if double.is_reading(image_id, client) else set()
        with guard.guard(image_id, client, base, force, ignore=others):
            if review_of is not None:
                reviewed = self.team.reviews.check_correction(review_of, client, self.team.roles.self_review)
                if reviewed["image"] != image_id:
                    raise ReviewError(f"version {review_of} is a label of image {reviewed['image']!r}, not this one")
                checked.info["review_of"] = review_of
                checked.info["corrections"] = changes = self._changes(image_id, reviewed, checked, to)
                for segment in checked.info["segments"]:
                    segment["changes"] = changes[segment["name"]]
            return self._store(image_id, image_path, checked, tag, to)

    def review_of(self, params: dict, client: str, tag: str) -> int | None:
        """The version a reviewer's save corrects (or adjudicates), checked before the upload is read."""
        of = params.get("review_of")
        if of is None:
            return None
        if isinstance(of, bool) or not isinstance(of, int) or of <= 0:
            raise LabelError(f"review_of must be the version of the label being reviewed, got {of!r}")
        if tag != FINAL:
            raise LabelError("review_of goes with a final label (a reviewer's corrected version)")
        if self.team.reviews is None:
            raise ReviewError("the team store is not open yet: try again in a moment", 503)
        if not self.team.roles.reviewer(client):
            raise ReviewError(f"{client} is not a reviewer: only a reviewer saves a corrected version", 403)
        self.team.reviews.check_correction(of, client, self.team.roles.self_review)
        return of

    def _changes(self, image_id: str, reviewed: dict, checked: Checked, to: Destination) -> dict:
        """Per segment name, the voxels the reviewer added to and removed from the reviewed label."""
        kept = self.team.double.reading(reviewed["version"]) if reviewed["double_read"] else None
        if kept is not None:
            before, names = kept[0], kept[1]
        else:
            series = next(s["seg_series"] for s in self.team.history(image_id) if s["version"] == reviewed["version"])
            before, names = to.reviewed_label(image_id, series)
        after = {p.name: checked.label == p.value for p in checked.parts}
        old = {name: before == value for value, name in names.items()}
        out = {}
        for name in sorted(set(after) | set(old)):
            a = old.get(name, np.zeros(before.shape, bool))
            b = after.get(name, np.zeros(checked.label.shape, bool))
            out[name] = {"added": int((b & ~a).sum()), "removed": int((a & ~b).sum())}
        return out

    @staticmethod
    def versions(params: dict) -> tuple[int | None, bool]:
        """The version the save started from and whether to save anyway (LabelError when malformed)."""
        try:
            return based_on(params)
        except ValueError as e:
            raise LabelError(str(e)) from e

    def _store(self, image_id: str, image_path: str, checked: Checked, tag: str, to: Destination) -> Saved:
        checked.info.update(to.store(image_id, image_path, checked, tag))
        self.team.saved(image_id, tag, checked.info, checked.label, checked.spacing)
        return Saved(image_id, tag, checked.info)

    def _origin(self, image_id: str, value: int, label: np.ndarray) -> Origin:
        provenance = self.team.provenance
        return provenance.origin(image_id, value, label) if provenance is not None else Origin(MANUAL)
