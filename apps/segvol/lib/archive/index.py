"""The DICOM SEGs in a DICOMweb archive, image by image, whoever wrote them.

Which SEG series exist is a QIDO query (repeated in the background at most every
``refresh_seconds``, lib/archive/relisted.py); what each
references and when it was made comes from its metadata, fetched once per SEG (a stored SEG never
changes) and kept on disk beside the datastore, so a restart or a second process does not fetch
it again. Counting labels needs the QIDO query only; the newest SEG of each image is its label.

A draft (``python apps/segvol preannotate``) is a SEG too, marked by its SeriesDescription, which
QIDO returns: it is listed with the image's SEGs (to open and correct) but is never its label, so
rounds never learn from it and the image stays unlabelled for the next-image strategies.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from pydicom import Dataset

from lib.archive.relisted import Relisted

log = logging.getLogger(__name__)

DRAFT_PREFIX = "DRAFT "  # a draft SEG's SeriesDescription starts with it (a final one with its creator's name)


def is_draft(series: Dataset) -> bool:
    """A pre-annotation draft, from its series attributes (a QIDO answer or the SEG's metadata)."""
    return str(series.get("SeriesDescription", "") or "").startswith(DRAFT_PREFIX)


class ListedSeg(NamedTuple):
    study: str
    uid: str
    draft: bool


@dataclass(frozen=True)
class ArchivedSeg:
    uid: str
    study: str
    image: str  # the referenced CT series ("" when the SEG names none)
    made: str  # SeriesDate + SeriesTime (else ContentDate + ContentTime), sortable
    creator: str
    description: str
    software: str
    segments: tuple[tuple[str, str], ...]  # (label, algorithm type) of each segment
    draft: bool = False  # a pre-annotation draft: never the image's label

    def as_history(self) -> dict:
        """The SEG as one entry of an image's label history (GET /segvol/labels)."""
        return {
            "seg_series": self.uid,
            "archived": self.made,
            "creator": self.creator,
            "description": self.description,
            "software": self.software,
            "segments": [{"name": name, "type": kind} for name, kind in self.segments],
            "draft": self.draft,
        }


def _text(meta: Dataset, *keys: str) -> str:
    return "".join(str(meta.get(k, "") or "") for k in keys)


def describe(uid: str, study: str, meta: Dataset) -> ArchivedSeg:
    refs = meta.get("ReferencedSeriesSequence") or []
    return ArchivedSeg(
        uid=uid,
        study=study,
        image=str(refs[0].SeriesInstanceUID) if refs else "",
        made=_text(meta, "SeriesDate", "SeriesTime") or _text(meta, "ContentDate", "ContentTime"),
        creator=str(meta.get("ContentCreatorName", "") or ""),
        description=str(meta.get("SeriesDescription", "") or ""),
        software=str(meta.get("SoftwareVersions", "") or meta.get("Manufacturer", "") or ""),
        segments=tuple(
            (str(s.get("SegmentLabel", "")), str(s.get("SegmentAlgorithmType", "")))
            for s in meta.get("SegmentSequence", [])
        ),
        draft=is_draft(meta),
    )


class SegIndex:
    def __init__(self, client, cache_file: Path, refresh_seconds: float = 60) -> None:
        self.client = client
        self.cache_file = Path(cache_file)
        self._listed = Relisted(self._list, refresh_seconds, "SEG series")
        self._known: dict[str, ArchivedSeg] = self._load()

    def _load(self) -> dict[str, ArchivedSeg]:
        try:
            entries = json.loads(self.cache_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return {e["uid"]: ArchivedSeg(**{**e, "segments": tuple(map(tuple, e["segments"]))}) for e in entries}

    def _save(self) -> None:
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_name(f".{self.cache_file.name}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps([asdict(s) for s in self._known.values()]))
        os.replace(tmp, self.cache_file)

    def refresh(self) -> None:
        """Query the archive again at the next question (after a SEG was stored)."""
        self._listed.invalidate()

    def _list(self) -> list[ListedSeg]:
        found = self.client.search_for_series(search_filters={"Modality": "SEG"}, fields=["SeriesDescription"])
        series = [Dataset.from_json(item) for item in found]
        return [ListedSeg(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), is_draft(ds)) for ds in series]

    def listed(self) -> list[ListedSeg]:
        """Every SEG series, drafts included: QIDO only (listed again in the background)."""
        return list(self._listed())

    def segs(self) -> list[ArchivedSeg]:
        """Every SEG with what it references and when it was made (metadata of new ones fetched)."""
        out, fetched = [], False
        for study, uid, _ in self.listed():
            seg = self._known.get(uid)
            if seg is None:
                try:
                    meta = Dataset.from_json(self.client.retrieve_series_metadata(study, uid)[0])
                except Exception as e:  # an archive that lists a series it cannot describe: skip it
                    log.warning("SEG series %s: no metadata (%s); skipped", uid, e)
                    continue
                seg = self._known[uid] = describe(uid, study, meta)
                fetched = True
            out.append(seg)
        if fetched:
            self._save()
        return out

    def of_image(self, image: str) -> list[ArchivedSeg]:
        """The SEGs referencing ``image``, newest first."""
        return sorted((s for s in self.segs() if s.image == image), key=lambda s: s.made, reverse=True)

    def newest(self) -> dict[str, ArchivedSeg]:
        """Image -> its newest SEG that is not a draft: the image's final label."""
        out: dict[str, ArchivedSeg] = {}
        for seg in self.segs():
            if seg.draft:
                continue
            if seg.image and (seg.image not in out or seg.made > out[seg.image].made):
                out[seg.image] = seg
        return out
