"""What the archive holds: its CT series (the datastore's search filter, the images) and its SEG
series (labels and drafts, lib/archive/index.py).

The first listing is two QIDO queries, paged. Later listings (every ``archive_refresh_seconds``, in
the background: lib/archive/relisted.py) ask for everything again on a plain DICOMweb archive; on
Orthanc, whose REST API answers beside its DICOMweb root, they ask only for what changed: Orthanc's
list of series ids (one query, no DICOM read; unlike its change log, it also shows deletions) against
the ids known, and a lookup of each new id. At 10,000 series this is what keeps a refresh well under a
second (docs/scaling.md).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from pydicom import Dataset

from lib.archive.index import ListedSeg, is_draft
from lib.archive.orthanc_rest import OrthancRest
from lib.archive.outbox import ArchiveUnreachable
from lib.archive.relisted import Relisted

log = logging.getLogger(__name__)

PAGE = 1000  # series per QIDO answer
MAX_LOOKUPS = 1000  # more new series than this at once (a bulk import): list everything again instead
WILDCARDS = set("*?\\")  # QIDO matching that only the archive does right


@dataclass(frozen=True)
class Listing:
    images: dict[str, str]  # CT series UID -> its study UID, in the archive's order
    segs: dict[str, ListedSeg]  # SEG series UID -> the SEG
    ids: frozenset[str] = frozenset()  # every Orthanc series id when listed (empty: not Orthanc)
    uid_of: dict[str, str] = field(default_factory=dict)  # Orthanc id -> series UID, of the series listed


def orthanc_id(patient: str, study: str, series: str) -> str:
    """Orthanc's id of a series: the SHA-1 of its patient, study and series ids, in five groups."""
    digest = hashlib.sha1(f"{patient}|{study}|{series}".encode()).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


class ArchiveListing:
    def __init__(self, client, search_filter: dict, refresh_seconds: float) -> None:
        """``client``: the archive's DICOMweb client; ``search_filter``: the QIDO filter of its images."""
        self.client = client
        self.search_filter = dict(search_filter)
        self._rest: OrthancRest | None = None
        self._probed = False
        self._studies: dict[str, str] = {}  # Orthanc study id -> StudyInstanceUID (looked up once)
        self._relisted = Relisted(self._list_all, refresh_seconds, "archive series", update=self._update)

    def now(self) -> Listing:
        """The listing as it stands (a new object whenever it was brought up to date);
        ArchiveUnreachable before the archive ever answered (then the last list stands)."""
        return self._listing()

    def images(self) -> list[str]:
        """The CT series UIDs."""
        return list(self._listing().images)

    def segs(self) -> list[ListedSeg]:
        """Every SEG series, drafts included."""
        return list(self._listing().segs.values())

    def invalidate(self) -> None:
        """This server stored a SEG: the next question brings the listing up to date first."""
        self._relisted.invalidate()

    def _listing(self) -> Listing:
        try:
            return self._relisted()
        except Exception as e:  # requests' connection and HTTP errors, whatever the client wraps them in
            raise ArchiveUnreachable(str(e)) from e

    def _orthanc(self) -> OrthancRest | None:
        if not self._probed:  # asked again while the archive does not answer (beside() raises)
            self._rest = OrthancRest.beside(self.client)
            self._probed = True
            how = f"through Orthanc's REST API at {self._rest.root}" if self._rest else "again in full each time"
            log.info("the archive's series are brought up to date %s", how)
        return self._rest

    def _search(self, search_filters: dict, fields: list[str]) -> list[Dataset]:
        """A QIDO query for series, page by page."""
        out: list[Dataset] = []
        while True:
            page = self.client.search_for_series(
                search_filters=search_filters, fields=fields, limit=PAGE, offset=len(out)
            )
            out += [Dataset.from_json(item) for item in page]
            if len(page) < PAGE:
                return out

    def _list_all(self) -> Listing:
        rest = self._orthanc()
        ids = rest.series_ids() if rest else set()  # before the queries: a series stored meanwhile is new next time
        cts = self._search(self.search_filter, ["PatientID"])
        segs = self._search({"Modality": "SEG"}, ["PatientID", "SeriesDescription"])
        images = {str(ds.SeriesInstanceUID): str(ds.StudyInstanceUID) for ds in cts}
        listed = {
            str(ds.SeriesInstanceUID): ListedSeg(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), is_draft(ds))
            for ds in segs
        }
        uid_of = {}
        if rest:
            for ds in cts + segs:
                uid = str(ds.SeriesInstanceUID)
                uid_of[orthanc_id(str(ds.get("PatientID", "") or ""), str(ds.StudyInstanceUID), uid)] = uid
        return Listing(images, listed, frozenset(ids), uid_of)

    def _update(self, last: Listing) -> Listing:
        rest = self._orthanc()
        if rest is None:
            return self._list_all()
        ids = rest.series_ids()
        new, gone = ids - last.ids, last.ids - ids
        if len(new) > MAX_LOOKUPS:
            log.info("%d new series in the archive: listed again in full", len(new))
            return self._list_all()
        images, segs, uid_of = dict(last.images), dict(last.segs), dict(last.uid_of)
        unknown = False
        for gone_id in gone:
            uid = uid_of.pop(gone_id, None)
            unknown |= uid is None
            images.pop(uid, None)
            segs.pop(uid, None)
        if unknown and (set(images) | set(segs)) - set(uid_of.values()):
            # a deleted id not mapped while some listed series have no id: which one went is unknown
            log.info("series deleted from the archive that the listing cannot name: listed again in full")
            return self._list_all()
        for series_id in new:
            self._look_up(rest, series_id, images, segs, uid_of)
        if new or gone:
            log.info("archive: %d new and %d deleted series since the last listing", len(new), len(gone))
        return Listing(images, segs, frozenset(ids), uid_of)

    def _look_up(self, rest: OrthancRest, series_id: str, images: dict, segs: dict, uid_of: dict) -> None:
        """Add one new Orthanc series to the listing, as the image or SEG it is."""
        found = rest.series(series_id)
        if found is None:  # deleted again meanwhile
            return
        tags, study_id = found
        uid = str(tags.get("SeriesInstanceUID", ""))
        if not uid:
            return
        study = self._studies.get(study_id) or rest.study_uid(study_id)
        if not study:
            return
        self._studies[study_id] = study
        uid_of[series_id] = uid
        if tags.get("Modality") == "SEG":
            segs[uid] = ListedSeg(study, uid, is_draft(tags))
        if self._is_image(uid, tags):
            images[uid] = study

    def _is_image(self, uid: str, tags: dict) -> bool:
        """Whether the search filter takes this series: matched here on its main tags where every
        key is one and no value has a wildcard, else asked of the archive (QIDO on its UID)."""
        plain = all(key in tags and not (WILDCARDS & set(str(value))) for key, value in self.search_filter.items())
        if plain:
            return all(str(tags[key]) == str(value) for key, value in self.search_filter.items())
        return bool(self.client.search_for_series(search_filters={**self.search_filter, "SeriesInstanceUID": uid}))
