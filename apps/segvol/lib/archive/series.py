"""The archive's CT series: the images of a DICOMweb datastore."""

from __future__ import annotations

import logging
import time

from pydicom import Dataset

from lib.archive.outbox import ArchiveUnreachable

log = logging.getLogger(__name__)


class SeriesList:
    """Listed again at most every ``refresh_seconds`` (MONAI Label keeps its list two hours: a
    study stored meanwhile would not be seen). While the archive does not answer, the last list
    stands, so a save of an image known before is kept, not refused; before any list, that is
    ArchiveUnreachable."""

    def __init__(self, client, search_filter: dict, refresh_seconds: float) -> None:
        self.client = client
        self.search_filter = search_filter
        self.refresh_seconds = refresh_seconds
        self._listed: tuple[float, list[str]] | None = None  # (when, series UIDs)

    def __call__(self) -> list[str]:
        listed = self._listed
        if listed is None or time.monotonic() - listed[0] > self.refresh_seconds:
            try:
                found = self.client.search_for_series(search_filters=self.search_filter)
            except Exception as e:  # requests' connection and HTTP errors, whatever the client wraps them in
                if listed is None:
                    raise ArchiveUnreachable(str(e)) from e
                age = time.monotonic() - listed[0]
                log.warning("archive does not answer (%s); using the series listed %.0f s ago", e, age)
                return list(listed[1])
            listed = self._listed = (time.monotonic(), [str(Dataset.from_json(ds).SeriesInstanceUID) for ds in found])
        return list(listed[1])
