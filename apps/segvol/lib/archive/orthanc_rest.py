"""Orthanc's own REST API, where it answers beside the DICOMweb root the datastore was given (the
same host, the same credentials): the few questions DICOMweb cannot answer cheaply, for an
incremental listing (lib/archive/listing.py). Nothing here writes."""

from __future__ import annotations

import logging
import re

import requests

log = logging.getLogger(__name__)
TIMEOUT = 30  # seconds for one question
ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")  # what Orthanc's ids look like; nothing else goes in a path


class OrthancRest:
    def __init__(self, session: requests.Session, root: str) -> None:
        self.session = session
        self.root = root.rstrip("/")

    @classmethod
    def beside(cls, client) -> OrthancRest | None:
        """Orthanc's REST API one level above the DICOMweb root (Orthanc serves DICOMweb at
        ``<root>/dicom-web`` by default), if ``GET /system`` there answers as Orthanc does; else
        None. No answer at all (the archive is down) raises, so the question is asked again later."""
        base = str(client.base_url).rstrip("/")
        root = base.rsplit("/", 1)[0]
        session = getattr(client, "_session", None) or requests.Session()
        answer = session.get(f"{root}/system", timeout=TIMEOUT)
        try:
            system = answer.json() if answer.ok else {}
        except ValueError:
            system = {}
        if not isinstance(system, dict) or "ApiVersion" not in system or "DicomAet" not in system:
            return None
        return cls(session, root)

    def _get(self, path: str):
        answer = self.session.get(f"{self.root}{path}", timeout=TIMEOUT)
        if answer.status_code == 404:
            return None
        answer.raise_for_status()
        return answer.json()

    def series_ids(self) -> set[str]:
        """Every series' Orthanc id: one query of Orthanc's index, no DICOM file read."""
        found = self._get("/series")
        if not isinstance(found, list):
            raise requests.RequestException(f"{self.root}/series answered {type(found).__name__}, not a list")
        return {str(i) for i in found if ORTHANC_ID.match(str(i))}

    def series(self, series_id: str) -> tuple[dict, str] | None:
        """(the series' main DICOM tags, its study's Orthanc id), or None when it is gone."""
        if not ORTHANC_ID.match(series_id):
            return None
        found = self._get(f"/series/{series_id}")
        if not isinstance(found, dict):
            return None
        return dict(found.get("MainDicomTags") or {}), str(found.get("ParentStudy", ""))

    def study_uid(self, study_id: str) -> str:
        """The StudyInstanceUID of an Orthanc study ("" when it is gone)."""
        if not ORTHANC_ID.match(study_id):
            return ""
        found = self._get(f"/studies/{study_id}")
        return str(((found or {}).get("MainDicomTags") or {}).get("StudyInstanceUID", ""))
