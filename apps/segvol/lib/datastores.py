"""Datastores that check what is saved and store labels in the app's convention.

Local folder: labels are validated (tag, grid, values), normalised to /info label indices and
written atomically. DICOMweb (Orthanc): a final label also becomes a DICOM SEG referencing the
CT series, stored with STOW-RS; when the archive does not answer, the SEG is kept in a pending
folder, the client gets HTTP 503 saying so, and the upload is retried on the next save and at
start-up, so no label is lost.

Drafts (``python -m segvol preannotate``) are stored beside the labels but are none: a folder's
draft is MONAI Label's ``original`` label, an archive's a SEG marked as a draft (lib/archive/index.py);
both leave the image unlabelled until an annotator saves a final label.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
from fastapi import HTTPException
from filelock import FileLock, Timeout
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.datastore.utils.dicom import dicom_web_download_series, dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from lib.archive.index import SegIndex
from lib.archive.seg import SegError, Segment, read_seg, write_seg
from lib.labels.checks import LabelError, LabelPart, check_tag, normalise, read_upload
from lib.labels.uploads import UploadError, UploadTooLarge
from lib.paths import PathError, inside, new_id
from lib.team.identity import IdentityError, client_of
from lib.team.provenance import AUTOMATIC, MANUAL, Origin
from segvol.io import ImageReadError, read_volume

log = logging.getLogger(__name__)
SERIES_UID = re.compile(r"^[0-9][0-9.]{0,63}$")

RETRIES = 3
ARCHIVE_OWNS_IMAGES = (
    "on a DICOMweb archive, series and SEGs are added and deleted in the archive itself, not through this server"
)
DOWN_RECENTLY = 30.0  # seconds: after the archive failed to answer, one try per upload instead of RETRIES


class ArchiveUnreachable(ConnectionError):
    """The archive did not answer (connection refused, timeout, 5xx): try again later."""


class ArchiveRefused(ValueError):
    """The archive answered and refused the SEG (4xx), or the file cannot be sent at all: sending
    it again unchanged would fail again."""


def _write_nifti_like(image_path: str, label: np.ndarray, path: str) -> str:
    ref = nib.load(image_path)
    img = nib.Nifti1Image(label, ref.affine, header=ref.header.copy())
    img.header.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    nib.save(img, path)
    return path


def _signature(path: str) -> tuple[int, int, int]:
    """What identifies one version of the index file: every write replaces it (a new inode), and
    mtime alone can repeat within a clock tick."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


class SegVolLabels:
    """What both datastores do before storing a label, and how their index file is kept.

    The index (MONAI Label's ``datastore_v2.json``) is shared by every process on the folder. It
    is read again whenever the file changed (a stat per question), and changed only as
    read-modify-write under its file lock: no process ever writes back a copy older than the
    file (which would drop another process's labels), and writing a stale copy is refused."""

    last_saved = threading.local()  # what this thread saved last (the app reports it to the client)

    @property
    def root(self) -> Path:
        """The folder every file of this datastore lies in (images, labels, the cache)."""
        return Path(self._datastore_path).resolve()

    @property
    def _index_lock(self) -> FileLock:
        """One lock object per datastore, re-entrant in a thread (filelock counts), so a change
        may hold it across MONAI Label's own steps that take it again."""
        lock = self.__dict__.get("_segvol_index_lock")
        if lock is None:
            lock = self.__dict__["_segvol_index_lock"] = FileLock(self._lock_file)
        return lock

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        try:
            with self._index_lock:
                self._reload_index()
        except ValueError as e:
            log.error("the datastore index %s cannot be read: %s", self._datastore_config_path, e)
            if throw_exception:
                raise

    def _fresh(self) -> None:
        """Read the index again if another process changed it."""
        try:
            changed = _signature(self._datastore_config_path) != self._config_ts
        except FileNotFoundError:
            return
        if changed:
            self._init_from_datastore_file()

    def _reconcile_datastore(self) -> None:
        with self._index_lock:
            super()._reconcile_datastore()

    def list_images(self) -> list[str]:
        self._fresh()
        return super().list_images()

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        self._fresh()
        return super().get_unlabeled_images(label_tag, labels)

    def json(self) -> dict:
        self._fresh()
        return super().json()

    def update_image_info(self, image_id: str, info: dict) -> None:
        with self._index_lock:
            self._reload_index()
            super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict) -> None:
        with self._index_lock:
            self._reload_index()
            super().update_label_info(label_id, label_tag, info)

    def _inside(self, path: str) -> str:
        """``path`` proven inside the datastore's folder (lib/paths.py), else a 400."""
        try:
            return str(inside(self.root, path)) if path else path
        except PathError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e

    def get_image_uri(self, image_id: str) -> str:
        return self._inside(super().get_image_uri(image_id))

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return self._inside(super().get_label_uri(label_id, label_tag))

    def check_readable(self, image_id: str) -> None:
        """Raises ImageReadError when the image's file cannot be read as a volume."""
        self.service.read(self.get_image_uri(image_id))

    def _prepare_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict):
        try:
            check_tag(label_tag)
            if not isinstance(label_info, dict):
                raise LabelError(f"params must be a JSON object, got {type(label_info).__name__}")
            client = client_of(label_info)
            if image_id not in self.list_images():
                raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")
            image_path = self.get_image_uri(image_id)
            image = read_volume(image_path)
            arr = read_upload(label_filename, image, self.service.settings.max_upload_bytes)
            label, parts = normalise(arr, (label_info or {}).get("label_info"), self.service.vocabulary)
        except UploadTooLarge as e:
            raise HTTPException(status_code=413, detail=str(e)) from e
        except (LabelError, UploadError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        except IdentityError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from e
        except ImageReadError as e:  # the datastore's own image: listed as unreadable, skipped from now on
            self.service.unreadable.add(image_id, str(e))
            raise HTTPException(status_code=422, detail=f"image {image_id!r} cannot be read: {e}") from e
        info = dict(label_info or {})
        info.pop("client_id", None)
        info["client"] = client
        info["segments"] = [
            dict(value=p.value, name=p.name, **self._origin(image_id, p.value, label).as_json()) for p in parts
        ]
        info["model_version"] = self.service.version
        return image_path, label, parts, info

    def _origin(self, image_id: str, value: int, label: np.ndarray) -> Origin:
        provenance = self.service.provenance
        return provenance.origin(image_id, value, label == value) if provenance is not None else Origin(MANUAL)

    def _saved(self, image_id: str, tag: str, info: dict) -> None:
        """History and leases: who saved what; a final label ends the leases on the image."""
        self.last_saved.info = info
        service = self.service
        if service.provenance is not None:
            service.provenance.record_save(
                image_id, info["client"], tag, info["model_version"], info["segments"], info.get("SeriesInstanceUID")
            )
        if tag == DefaultLabelTag.FINAL and service.leases is not None:
            service.leases.end(image_id)

    def history(self, image_id: str) -> list[dict]:
        """Labels saved for the image through this server, newest first."""
        if image_id not in self.list_images():
            raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")
        provenance = self.service.provenance
        return provenance.saves(image_id) if provenance is not None else []

    def label_voxels(self, image_id: str, seg_series: str | None = None) -> tuple[np.ndarray, dict[int, str]]:
        """The image's final label (on its grid) and value -> name."""
        if seg_series is not None:
            raise HTTPException(status_code=400, detail="this datastore keeps no DICOM SEG series: leave out 'seg'")
        obj = self._datastore.objects.get(image_id)
        final = obj.labels.get(DefaultLabelTag.FINAL) if obj is not None else None
        if final is None:
            raise HTTPException(status_code=404, detail=f"image {image_id!r} has no final label")
        label = np.asarray(read_volume(self.get_label_uri(image_id, DefaultLabelTag.FINAL)).array).astype(np.uint8)
        vocab = self.service.vocabulary
        names = {int(s["value"]): s["name"] for s in (final.info or {}).get("segments", [])}
        for v in np.unique(label):
            if v and int(v) not in names and 1 <= v <= len(vocab):
                names[int(v)] = vocab.categories[int(v) - 1].name
        return label, names

    def _store_label(self, image_id: str, image_path: str, label: np.ndarray, tag: str, info: dict) -> str:
        """Write the label file and the datastore index so that a kill at any moment leaves either
        the old or the new label, never half of one (temporary file + os.replace)."""
        ours = self._datastore.objects.get(image_id)
        if ours is None:
            raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")
        label_dir = self._inside(self._datastore.label_path(check_tag(tag)))
        os.makedirs(label_dir, exist_ok=True)
        name = self._filename(image_id, ".nii.gz")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial.nii.gz", dir=label_dir)
        os.close(fd)  # a name of its own for each save, so concurrent saves never share a file
        try:
            _write_nifti_like(image_path, label, tmp)
        except BaseException:
            os.unlink(tmp)
            raise
        with self._index_lock:
            os.replace(tmp, self._inside(os.path.join(label_dir, name)))
            self._reload_index()
            obj = self._datastore.objects.setdefault(image_id, ours)
            obj.labels[tag] = DataModel(info=dict(info, ts=int(time.time()), name=name), ext=".nii.gz")
            self._update_datastore_file(lock=False)
        return image_id

    def _reload_index(self) -> None:
        """Take in what other processes wrote to the index since this one read it (called holding
        the lock): writing this process's copy back would drop their labels otherwise."""
        try:
            ts = _signature(self._datastore_config_path)
        except FileNotFoundError:
            return
        if ts != self._config_ts:
            with open(self._datastore_config_path) as f:
                self._datastore = LocalDatastoreModel.model_validate_json(f.read())
            self._datastore.base_path = self._datastore_path
            self._config_ts = ts

    def _merge_into_file_version(self) -> None:
        mine = self._datastore.objects
        with open(self._datastore_config_path) as f:
            on_disk = LocalDatastoreModel.model_validate_json(f.read())
        on_disk.base_path = self._datastore_path
        added = [
            image_id
            for image_id, obj in mine.items()
            if image_id not in on_disk.objects
            and os.path.exists(os.path.join(on_disk.image_path(), self._filename(image_id, obj.image.ext)))
        ]
        for image_id in added:
            on_disk.objects[image_id] = mine[image_id]
        log.info("datastore index changed on disk meanwhile: kept its version, added %d new image(s)", len(added))
        self._datastore = on_disk

    def release(self, image_id: str) -> None:
        """Free what reading the image kept on this machine (nothing here: the image is the folder's)."""

    def _update_datastore_file(self, lock: bool = True) -> None:
        """The datastore index, replaced atomically (MONAI Label rewrites it in place). Called
        holding the index lock. When the file changed since this process read it (MONAI Label's
        own steps, such as adding a series just downloaded, change the copy in memory without
        reading the file first), the file's version is kept and only the images this process
        added (whose files exist) are added to it: a stale copy is never written back."""

        def write() -> None:
            try:
                stale = _signature(self._datastore_config_path) != self._config_ts
            except FileNotFoundError:
                stale = False
            if stale:
                self._merge_into_file_version()
            self._ignore_event_config = True
            tmp = f"{self._datastore_config_path}.{os.getpid()}.{uuid.uuid4().hex}.partial"
            with open(tmp, "w") as f:
                f.write(json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._datastore_config_path)
            self._config_ts = _signature(self._datastore_config_path)

        if lock:
            with self._index_lock:
                write()
        else:
            write()


class SegVolLocalDatastore(SegVolLabels, LocalDatastore):
    def __init__(self, service, *args, **kwargs) -> None:
        self.service = service
        super().__init__(*args, **kwargs)

    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        """A new image under a plain id (lib/paths.new_id), from a file the server named after its
        checked content; refused when the id exists. Written whole or not at all."""
        try:
            image_id = new_id(image_id)
        except PathError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        ext = next((e for e in (".nii.gz", ".nii", ".nrrd") if image_filename.endswith(e)), None)
        if ext is None:
            raise HTTPException(status_code=400, detail="images are NIfTI or NRRD files")
        name = self._filename(image_id, ext)
        dest = self._inside(os.path.join(self._datastore.image_path(), name))
        with self._index_lock:
            self._reload_index()
            if image_id in self._datastore.objects:
                raise HTTPException(status_code=409, detail=f"image {image_id!r} exists")
            tmp = f"{dest}.{uuid.uuid4().hex}.partial"
            shutil.copyfile(image_filename, tmp)
            os.replace(tmp, dest)
            info = dict(image_info or {}, ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        log.info("image %s added (%s)", image_id, name)
        return image_id

    def remove_image(self, image_id: str) -> None:
        with self._index_lock:
            self._reload_index()
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")
            for tag in list(obj.labels):
                Path(self.get_label_uri(image_id, tag)).unlink(missing_ok=True)
            Path(self.get_image_uri(image_id)).unlink(missing_ok=True)
            del self._datastore.objects[image_id]
            self._update_datastore_file(lock=False)
        log.info("image %s and its labels deleted", image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        with self._index_lock:
            self._reload_index()
            obj = self._datastore.objects.get(label_id)
            if obj is None or label_tag not in obj.labels:
                raise HTTPException(status_code=404, detail=f"image {label_id!r} has no {label_tag!r} label")
            Path(self.get_label_uri(label_id, label_tag)).unlink(missing_ok=True)
            del obj.labels[label_tag]
            self._update_datastore_file(lock=False)
        log.info("label %s (%s) deleted", label_id, label_tag)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        image_path, label, _, info = self._prepare_label(image_id, label_filename, label_tag, label_info)
        stored = self._store_label(image_id, image_path, label, label_tag, info)
        self._saved(image_id, label_tag, info)
        return stored

    def _finals(self) -> dict[str, str]:
        """Image id -> a key of its final label (changes when the label is saved again)."""
        out = {}
        for image_id, obj in self._datastore.objects.items():
            final = obj.labels.get(DefaultLabelTag.FINAL)
            if final is not None:
                out[image_id] = f"{image_id}@{(final.info or {}).get('ts', '')}"
        return out

    def label_keys(self) -> set[str]:
        return set(self._finals().values())

    def annotated_images(self) -> set[str]:
        """Images with a label of any tag, a draft or a final one: pre-annotation leaves them."""
        return {image_id for image_id, obj in self._datastore.objects.items() if obj.labels}

    def store_draft(self, image_id: str, label: np.ndarray, parts: list[LabelPart], creator: str, version: str) -> str:
        """A draft is MONAI Label's ``original`` label (a model's, not yet an annotator's)."""
        info = {
            "client": creator,
            "model_version": version,
            "segments": [
                {"value": p.value, "name": p.name, "type": AUTOMATIC, "model_version": version} for p in parts
            ],
        }
        self._store_label(image_id, self.get_image_uri(image_id), label, DefaultLabelTag.ORIGINAL, info)
        return self.get_label_uri(image_id, DefaultLabelTag.ORIGINAL)

    def datalist(self, full_path: bool = True) -> list[dict]:
        return [
            {
                "image": self.get_image_uri(image_id),
                "label": self.get_label_uri(image_id, DefaultLabelTag.FINAL),
                "image_id": image_id,
                "label_key": key,
            }
            for image_id, key in sorted(self._finals().items())
        ]


class SegVolDICOMWebDatastore(SegVolLabels, DICOMWebDatastore):
    """Images are the archive's CT series, listed again at most every ``refresh_seconds`` (MONAI
    Label keeps its list 2 hours: a study stored meanwhile would not be seen). An image's final
    label is its newest SEG in the archive, whoever wrote it (lib/archive/index.py), read onto the
    image's grid once per SEG."""

    def __init__(self, service, *args, refresh_seconds: float = 60, **kwargs) -> None:
        self.service = service
        super().__init__(*args, **kwargs)
        # MONAI Label watches the whole cache for file events (every downloaded slice, every SEG
        # written): the archive is the source here and the index is read again when it changes
        # (_fresh), so the watcher only spends the server's time (and its GIL) on pattern matching
        observer = getattr(self, "_observer", None)
        if observer is not None:
            observer.stop()
        # one retry policy, ours (RETRIES tries, short back-off): the client's own would hold a
        # request for about 30 s per call while the archive is down
        self._client.set_http_retry_params(retry=False)
        self.pending = Path(self._datastore_path) / "pending-seg"
        self.pending.mkdir(parents=True, exist_ok=True)
        self.refresh_seconds = refresh_seconds
        self._down_since: float | None = None  # when an upload last found the archive not answering
        self._series: tuple[float, list[str]] | None = None
        self.seg_index = SegIndex(
            self._client, Path(self._datastore_path) / ".segvol" / "seg-index.json", refresh_seconds
        )

    def _archive_down(self, e: Exception) -> HTTPException:
        return HTTPException(
            status_code=503, detail=f"the DICOMweb archive {self._client.base_url} does not answer ({e})"
        )

    def list_images(self) -> list[str]:
        """The archive's CT series, listed again every ``refresh_seconds``. While the archive does
        not answer, the last list stands (a save of an image known before is kept, not refused);
        before any list, that is a 503."""
        if self._series is None or time.monotonic() - self._series[0] > self.refresh_seconds:
            try:
                found = self._client.search_for_series(search_filters=self._search_filter)
            except Exception as e:  # requests' connection and HTTP errors, whatever the client wraps them in
                if self._series is None:
                    raise self._archive_down(e) from e
                log.warning("archive does not answer (%s); using the series listed %.0f s ago", e, self._age())
                return list(self._series[1])
            self._series = (time.monotonic(), [str(Dataset.from_json(ds).SeriesInstanceUID) for ds in found])
        return list(self._series[1])

    def _age(self) -> float:
        return time.monotonic() - self._series[0] if self._series else 0.0

    def check_readable(self, image_id: str) -> None:
        """Not checked ahead on an archive (that would download the series on every Next image):
        a series that does not convert is listed as unreadable when first read."""

    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        raise HTTPException(status_code=405, detail=ARCHIVE_OWNS_IMAGES)

    def remove_image(self, image_id: str) -> None:
        raise HTTPException(status_code=405, detail=ARCHIVE_OWNS_IMAGES)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        raise HTTPException(status_code=405, detail=ARCHIVE_OWNS_IMAGES)

    def _newest_segs(self) -> dict:
        try:
            return self.seg_index.newest()
        except Exception as e:
            raise self._archive_down(e) from e

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        images = set(self.list_images())
        return sorted(i for i in self._newest_segs() if i in images)

    def label_keys(self) -> set[str]:
        """Every SEG series in the archive but the drafts (QIDO only, nothing downloaded)."""
        try:
            return {seg.uid for seg in self.seg_index.listed() if not seg.draft}
        except Exception as e:
            raise self._archive_down(e) from e

    def annotated_images(self) -> set[str]:
        """Images that any SEG references, a draft or a final label, whoever wrote it."""
        try:
            return {seg.image for seg in self.seg_index.segs() if seg.image}
        except Exception as e:
            raise self._archive_down(e) from e

    def get_image_uri(self, image_id: str) -> str:
        """MONAI Label's, but its first call returns the cached NIfTI as well: its converter leaves
        a temporary copy in /tmp and returns that one (removed here). An image not in the cache while
        the archive does not answer is a 503 saying so. Only a DICOM UID becomes a path."""
        if not SERIES_UID.match(image_id or ""):
            raise HTTPException(status_code=404, detail=f"{image_id!r} is not a series of the archive")
        try:
            uri = super(SegVolLabels, self).get_image_uri(image_id)  # MONAI Label's, before the path check
        except requests.RequestException as e:
            raise self._archive_down(e) from e
        cached = os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))
        if self._convert_to_nifti and uri != cached and os.path.exists(cached):
            os.unlink(uri)
            uri = cached
        return self._inside(uri)

    def release(self, image_id: str) -> None:
        """Delete the image's downloaded series and its NIfTI from the cache: pre-annotation reads
        each image once, and an archive does not fit on a worker's disk."""
        image_dir = Path(self._datastore.image_path())
        shutil.rmtree(image_dir / image_id, ignore_errors=True)
        (image_dir / f"{image_id}.nii.gz").unlink(missing_ok=True)

    def store_draft(self, image_id: str, label: np.ndarray, parts: list[LabelPart], creator: str, version: str) -> str:
        """A SEG marked as a draft, every segment AUTOMATIC; returns its series UID. Not kept as
        pending when the archive does not answer: the series is simply not done (ArchiveUnreachable)."""
        segments = [Segment(p.value, p.name, p.category, AUTOMATIC, version) for p in parts]
        seg_file = self._write_seg(image_id, label, segments, creator, draft=True)
        try:
            uid = self._upload(seg_file)
        finally:
            os.unlink(seg_file)
        self.seg_index.refresh()
        return uid

    def datalist(self, full_path: bool = True) -> list[dict]:
        """Every image with a final label: its newest SEG on its grid. A SEG that cannot be read
        (not on the image's grid, an unreadable file) is skipped with a log line naming it."""
        images = set(self.list_images())
        out = []
        for image, seg in sorted(self._newest_segs().items()):
            if image not in images:
                log.warning("SEG %s references %s, which is not among the archive's CT series; skipped", seg.uid, image)
                continue
            try:
                label = self._final_label_from(image, seg.uid)
            except HTTPException as e:
                log.warning("SEG %s of image %s skipped: %s", seg.uid, image, e.detail)
                continue
            out.append({"image": self.get_image_uri(image), "label": label, "image_id": image, "label_key": seg.uid})
        return out

    def _final_label_from(self, image_id: str, seg_series: str) -> str:
        image_path = self.get_image_uri(image_id)  # fetched and indexed first
        cached = Path(self._datastore.label_path(DefaultLabelTag.FINAL)) / f"{image_id}.nii.gz"
        final = self._datastore.objects[image_id].labels.get(DefaultLabelTag.FINAL)
        if final is not None and (final.info or {}).get("SeriesInstanceUID") == seg_series and cached.exists():
            return str(cached)
        label, names = self._seg_on_grid(image_id, seg_series)
        info = {
            "SeriesInstanceUID": seg_series,
            "source": "the archive",
            "segments": [{"value": v, "name": n} for v, n in sorted(names.items())],
        }
        self._store_label(image_id, image_path, label, DefaultLabelTag.FINAL, info)
        return str(cached)

    def status(self) -> dict:
        try:
            return super().status()
        except HTTPException as e:
            return {"total": 0, "completed": 0, "label_tags": {}, "error": e.detail}
        except Exception as e:  # the SEG query failed after the image query worked
            return {"total": 0, "completed": 0, "label_tags": {}, "error": f"DICOMweb archive: {e}"}

    def _upload(self, seg_file: Path) -> str:
        """Store one SEG file; its series UID. ArchiveRefused when the archive answers no (or the
        file cannot be read to send), ArchiveUnreachable when it does not answer after RETRIES
        tries (one try while it was found down in the last DOWN_RECENTLY seconds)."""
        recently_down = self._down_since is not None and time.monotonic() - self._down_since < DOWN_RECENTLY
        last: Exception | None = None
        for attempt in range(1 if recently_down else RETRIES):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                uid = dicom_web_upload_dcm(str(seg_file), self._client)
            except requests.HTTPError as e:
                status = e.response.status_code if e.response is not None else 0
                if 400 <= status < 500:
                    body = (e.response.text or "").strip().replace("\n", " ")[:300]
                    raise ArchiveRefused(f"the archive answered HTTP {status}: {body or e}") from e
                last = e
            except (InvalidDicomError, AttributeError, KeyError, ValueError) as e:  # not a SEG we can send
                raise ArchiveRefused(f"the file cannot be sent: {type(e).__name__}: {e}") from e
            except Exception as e:  # connection refused, timeouts, 5xx: worth another try
                last = e
            else:
                if not uid:
                    raise ArchiveRefused("the archive stored nothing (its answer names no series)")
                self._down_since = None
                return uid
        self._down_since = time.monotonic()
        raise ArchiveUnreachable(f"{type(last).__name__}: {last}")

    @property
    def refused(self) -> Path:
        return self.pending / "refused"

    def flush_pending(self, wait: bool = True) -> list[str]:
        """Send the SEGs kept while the archive did not answer, oldest first; returns their series
        UIDs. A SEG the archive refuses is moved aside to ``pending-seg/refused/`` with the reason
        beside it (``/segvol/status`` lists it; ``POST /segvol/pending/retry`` sends it again) and
        the others go on; the archive not answering stops the flush. One process at a time (a lock
        beside them); with ``wait`` false, a flush already running elsewhere is left to finish."""
        done = []
        lock = FileLock(str(self.pending / ".lock"))
        try:
            lock.acquire(timeout=-1 if wait else 0)
        except Timeout:
            return done
        try:
            for seg_file in sorted(self.pending.glob("*.dcm")):
                try:
                    done.append(self._upload(seg_file))
                except ArchiveUnreachable as e:
                    log.warning("archive unreachable; %s and later SEGs stay pending (%s)", seg_file.name, e)
                    break
                except ArchiveRefused as e:
                    self._set_aside(seg_file, str(e))
                    continue
                seg_file.unlink(missing_ok=True)
                log.info("pending SEG %s stored in the archive", seg_file.name)
        finally:
            lock.release()
        if done:
            self.seg_index.refresh()
        return done

    def _set_aside(self, seg_file: Path, why: str) -> Path:
        self.refused.mkdir(exist_ok=True)
        kept = self.refused / seg_file.name
        shutil.move(seg_file, kept)
        kept.with_suffix(".reason.json").write_text(json.dumps({"reason": why, "time": time.time()}))
        log.error("archive refused SEG %s; kept aside in %s: %s", seg_file.name, kept, why)
        return kept

    def pending_state(self) -> dict:
        """What waits to be sent, and what the archive refused (with why), for /segvol/status."""
        refused = []
        for seg_file in sorted(self.refused.glob("*.dcm")) if self.refused.exists() else []:
            try:
                reason = json.loads(seg_file.with_suffix(".reason.json").read_text())
            except (OSError, ValueError):
                reason = {"reason": "unknown", "time": seg_file.stat().st_mtime}
            when = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(reason.get("time", 0)))
            refused.append({"file": seg_file.name, "reason": reason.get("reason"), "since": when})
        return {"waiting": len(list(self.pending.glob("*.dcm"))), "refused": refused}

    def retry_refused(self) -> list[str]:
        """Put the refused SEGs back in the queue and flush: after the archive's settings changed."""
        for seg_file in sorted(self.refused.glob("*.dcm")) if self.refused.exists() else []:
            seg_file.with_suffix(".reason.json").unlink(missing_ok=True)
            shutil.move(seg_file, self.pending / seg_file.name)
        return self.flush_pending()

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict, label_id: str = ""
    ) -> str:
        image_path, label, parts, info = self._prepare_label(image_id, label_filename, label_tag, label_info)
        if label_tag == DefaultLabelTag.FINAL:
            info.update(self._store_seg(image_id, label, parts, info))
        stored = self._store_label(image_id, image_path, label, label_tag, info)
        self._saved(image_id, label_tag, info)
        return stored

    def _write_seg(
        self, image_id: str, label: np.ndarray, segments: list[Segment], creator: str, draft: bool = False
    ) -> Path:
        """The label as a DICOM SEG over the image's series (in the cache) in a temporary file."""
        series_dir = Path(self._datastore.image_path()) / image_id
        try:
            return write_seg(label, series_dir, segments, self.service.version, creator=creator, draft=draft)
        except SegError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e

    def _store_seg(self, image_id: str, label: np.ndarray, parts: list[LabelPart], info: dict) -> dict:
        origins = {s["value"]: s for s in info["segments"]}
        segments = [
            Segment(p.value, p.name, p.category, origins[p.value]["type"], origins[p.value]["model_version"])
            for p in parts
        ]
        seg_file = self._write_seg(image_id, label, segments, info["client"])
        self.flush_pending(wait=False)
        try:
            uid = self._upload(seg_file)
        except ArchiveUnreachable as e:
            kept = self.pending / f"{image_id}-{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.dcm"
            shutil.move(seg_file, kept)
            raise HTTPException(
                status_code=503,
                detail=f"the DICOMweb archive did not take the SEG ({e}); "
                f"it is kept in {kept} and will be sent on the next save or restart",
            ) from e
        except ArchiveRefused as e:
            kept = self._set_aside(seg_file, str(e))
            raise HTTPException(
                status_code=502,
                detail=f"the DICOMweb archive refused the SEG ({e}); it is kept in {kept}: "
                "an admin can send it again (POST /segvol/pending/retry) once the archive takes it",
            ) from e
        os.unlink(seg_file)
        self.seg_index.refresh()  # the new SEG counts at once
        image_info = self.get_image_info(image_id)
        return {
            "SeriesInstanceUID": uid,
            "Modality": "SEG",
            "PatientID": image_info.get("PatientID"),
            "StudyInstanceUID": image_info.get("StudyInstanceUID"),
        }

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A label on the image's grid. As MONAI Label calls it, ``label_id`` is a SEG series and
        ``image_id`` its image; as this app's routes call it (no ``image_id``), ``label_id`` is the
        image and its final label is its newest SEG ("" when it has none)."""
        if label_tag != DefaultLabelTag.FINAL:
            return super().get_label_uri(label_id, label_tag)
        if not image_id:
            seg = self._newest_segs().get(label_id)
            if seg is None:
                return ""
            image_id, label_id = label_id, seg.uid
        return self._final_label_from(image_id, label_id)

    def _seg_on_grid(self, image_id: str, seg_series: str) -> tuple[np.ndarray, dict[int, str]]:
        """A SEG series of the archive as a label map on the image's grid, and value -> name."""
        import SimpleITK as sitk

        label_dir = Path(self._datastore.label_path(DefaultLabelTag.FINAL)) / seg_series
        if not label_dir.exists() or not any(label_dir.iterdir()):
            dicom_web_download_series(None, seg_series, str(label_dir), self._client, self._fetch_by_frame)
        reference = sitk.ReadImage(self.get_image_uri(image_id))
        try:
            return read_seg(next(label_dir.glob("*")), reference, self.service.vocabulary)
        except (SegError, StopIteration, ValueError) as e:
            raise HTTPException(status_code=422, detail=f"SEG {seg_series} cannot be read onto {image_id}: {e}") from e

    def history(self, image_id: str) -> list[dict]:
        """Every SEG in the archive that references the image (ours and any other tool's), newest
        first, with what this server recorded about its own (who saved it, from which results)."""
        ours = {s["seg_series"]: s for s in super().history(image_id) if s.get("seg_series")}
        self.seg_index.refresh()  # one QIDO query: a SEG stored a second ago by any tool is listed
        try:
            segs = self.seg_index.of_image(image_id)
        except Exception as e:
            raise self._archive_down(e) from e
        out = []
        for seg in segs:
            entry = {
                "seg_series": seg.uid,
                "archived": seg.made,
                "creator": seg.creator,
                "description": seg.description,
                "software": seg.software,
                "segments": [{"name": name, "type": kind} for name, kind in seg.segments],
                "draft": seg.draft,
            }
            entry.update(ours.get(seg.uid, {}))
            out.append(entry)
        return out

    def label_voxels(self, image_id: str, seg_series: str | None = None) -> tuple[np.ndarray, dict[int, str]]:
        """The SEG ``seg_series`` of the image (404 unless the archive lists it as one of the
        image's SEGs), or without it the image's final label (its newest SEG that is no draft)."""
        try:
            segs = self.seg_index.of_image(image_id)
        except Exception as e:
            raise self._archive_down(e) from e
        if seg_series is None:
            final = next((seg for seg in segs if not seg.draft), None)
            if final is None:
                raise HTTPException(status_code=404, detail=f"image {image_id!r} has no final label")
            seg_series = final.uid
        elif seg_series not in {seg.uid for seg in segs}:
            raise HTTPException(status_code=404, detail=f"no SEG {seg_series} of image {image_id!r} in the archive")
        return self._seg_on_grid(image_id, seg_series)


def open_datastore(service, studies: str, cache_path: str | None, auto_reload: bool) -> SegVolLabels:
    """The app's datastore for ``studies``: a DICOMweb URL (MONAI Label's DICOMweb settings: basic
    auth from MONAI_LABEL_DICOMWEB_USERNAME / _PASSWORD, URL prefixes, search filter; downloads in
    ``cache_path``) or a folder."""
    if not studies.startswith(("http://", "https://")):
        return SegVolLocalDatastore(
            service,
            studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=auto_reload,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )
    from dicomweb_client.session_utils import create_session_from_user_pass

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
        service,
        client=client,
        search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
        cache_path=cache_path or None,
        fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
        convert_to_nifti=True,
        refresh_seconds=service.settings.archive_refresh_seconds,
    )
