"""MONAI Label datastores over the app's wings: a folder (local.py) or a DICOMweb archive
(dicomweb.py). Both save through lib/labels/save.py and keep MONAI Label's index safe to share
(lib/compat/datastore.py)."""

from __future__ import annotations

from dicomweb_client.session_utils import create_session_from_user_pass
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX

from lib.datastores.checked import CheckedLabels
from lib.datastores.dicomweb import SegVolDICOMWebDatastore
from lib.datastores.local import SegVolLocalDatastore
from lib.labels.save import LabelSaver
from lib.serving.host import ModelHost
from lib.team.team import Team

__all__ = ["CheckedLabels", "SegVolDICOMWebDatastore", "SegVolLocalDatastore", "open_datastore", "studies_of", "wiring"]


def wiring(host: ModelHost, team: Team) -> dict:
    """What a datastore takes from the rest of the app: the saving pipeline, the team, the
    vocabulary and the model host's volume reader (which keeps the volume for the next request)."""
    saver = LabelSaver(host.vocabulary, team, lambda: host.version, host.settings.max_upload_bytes)
    return dict(saver=saver, team=team, vocabulary=host.vocabulary, read=host.read)


def studies_of(studies: str) -> str:
    """A DICOMweb URL without trailing slashes (MONAI Label appends its own); a folder as given."""
    return studies.rstrip("/").strip() if studies.startswith(("http://", "https://")) else studies


def open_datastore(
    host: ModelHost, team: Team, studies: str, auto_reload: bool = False, cache_path: str | None = None
) -> CheckedLabels:
    """The app's datastore for ``studies``: a DICOMweb URL (MONAI Label's DICOMweb settings: basic
    auth from MONAI_LABEL_DICOMWEB_USERNAME / _PASSWORD, URL prefixes, search filter; downloads in
    ``cache_path``, by default MONAI_LABEL_DICOMWEB_CACHE_PATH) or a folder. It takes from the model
    host only the vocabulary, the served version (recorded with each label) and its volume reader."""
    studies = studies_of(studies)
    if cache_path is None:
        cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
    wings = wiring(host, team)
    if not studies.startswith(("http://", "https://")):
        return SegVolLocalDatastore(
            studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=auto_reload,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            **wings,
        )
    session = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        session = create_session_from_user_pass(
            settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
        )
    client = DICOMwebClientX(
        url=studies,
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    return SegVolDICOMWebDatastore(
        client=client,
        search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
        cache_path=cache_path or None,
        fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
        convert_to_nifti=True,
        refresh_seconds=host.settings.archive_refresh_seconds,
        **wings,
    )
