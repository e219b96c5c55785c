"""The archive's CT series: the images of a DICOMweb datastore."""

from __future__ import annotations

import logging

from pydicom import Dataset

from lib.archive.outbox import ArchiveUnreachable
from lib.archive.relisted import Relisted

log = logging.getLogger(__name__)


class SeriesList:
    """Listed again at most every ``refresh_seconds``, in the background (lib/archive/relisted.py;
    MONAI Label keeps its list two hours: a study stored meanwhile would not be seen). While the
    archive does not answer, the last list stands, so a save of an image known before is kept,
    not refused; before any list, that is ArchiveUnreachable."""

    def __init__(self, client, search_filter: dict, refresh_seconds: float) -> None:
        self.client = client
        self.search_filter = search_filter
        self._relisted = Relisted(self._list, refresh_seconds, "CT series")

    def _list(self) -> list[str]:
        found = self.client.search_for_series(search_filters=self.search_filter)
        return [str(Dataset.from_json(ds).SeriesInstanceUID) for ds in found]

    def __call__(self) -> list[str]:
        try:
            return list(self._relisted())
        except Exception as e:  # requests' connection and HTTP errors, whatever the client wraps them in
            raise ArchiveUnreachable(str(e)) from e
