"""The DICOM SEGs in a DICOMweb archive, image by image, whoever wrote them.

Which SEG series exist comes from the archive's listing (lib/archive/listing.py, brought up to date
in the background); what each
references and when it was made comes from its metadata, fetched once per SEG (a stored SEG never
changes) and kept on disk beside the datastore, so a restart or a second process does not fetch
it again; the metadata of many new SEGs (a first start on a big archive) is fetched several at a
time. Counting labels needs the listing only; the newest SEG of each image is its label.

A draft (``python apps/segvol preannotate``) is a SEG too, marked by its SeriesDescription, which
QIDO returns: it is listed with the image's SEGs (to open and correct) but is never its label, so
rounds never learn from it and the image stays unlabelled for the next-image strategies.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from pydicom import Dataset

log = logging.getLogger(__name__)

DRAFT_PREFIX = "DRAFT "  # a draft SEG's SeriesDescription starts with it (a final one with its creator's name)


def is_draft(series: Dataset | dict) -> bool:
    """A pre-annotation draft, from its series attributes (a QIDO answer, the SEG's metadata, or
    Orthanc's main tags of the series)."""
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


FETCHERS = 8  # SEG metadata questions in flight at once


class SegIndex:
    def __init__(
        self, client, cache_file: Path, listed: Callable[[], list[ListedSeg]], relist: Callable[[], None]
    ) -> None:
        """``listed``: the archive's SEG series now (lib/archive/listing.py); ``relist``: list them
        again at the next question."""
        self.client = client
        self.cache_file = Path(cache_file)
        self.listed = listed
        self.refresh = relist
        self._known: dict[str, ArchivedSeg] = self._load()
        self._fetching = threading.Lock()  # one fetch of new SEGs' metadata at a time; ``_known`` changes under it

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

    def segs(self) -> list[ArchivedSeg]:
        """Every SEG with what it references and when it was made (metadata of new ones fetched)."""
        listed = self.listed()
        if any(seg.uid not in self._known for seg in listed):
            with self._fetching:
                new = [seg for seg in listed if seg.uid not in self._known]
                if new:
                    with ThreadPoolExecutor(min(FETCHERS, len(new)), thread_name_prefix="segvol-seg-meta") as pool:
                        described = list(pool.map(self._describe, new))
                    self._known.update((seg.uid, seg) for seg in described if seg is not None)
                    self._save()
        return [self._known[seg.uid] for seg in listed if seg.uid in self._known]

    def _describe(self, listed: ListedSeg) -> ArchivedSeg | None:
        try:
            meta = Dataset.from_json(self.client.retrieve_series_metadata(listed.study, listed.uid)[0])
        except Exception as e:  # an archive that lists a series it cannot describe: skip it
            log.warning("SEG series %s: no metadata (%s); skipped", listed.uid, e)
            return None
        return describe(listed.uid, listed.study, meta)

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
