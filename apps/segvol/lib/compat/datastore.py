"""MONAI Label 0.8.5's datastores, made safe to share and reached through public names.

Its LocalDatastore (and the DICOMweb one, which keeps its cache the same way) holds the index
(``datastore_v2.json``) in memory and writes it back in place, from whatever copy it has: two
processes on one folder drop each other's labels, and a kill mid-write leaves half a file.
``SharedIndex`` keeps the index the way several processes need: read again whenever the file
changed (a stat per question), changed only as read-modify-write under its file lock, replaced
atomically, a stale copy never written back. The adapters in lib/datastores/ use the public
names below, never MONAI Label's private attributes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastoreModel

from lib.compat import MONAI_LABEL, require

require("monailabel", MONAI_LABEL, __name__)
log = logging.getLogger(__name__)


def _signature(path: str) -> tuple[int, int, int]:
    """What identifies one version of the index file: every write replaces it (a new inode), and
    mtime alone can repeat within a clock tick."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


class SharedIndex:
    """Mixed in ahead of MONAI Label's LocalDatastore (or DICOMWebDatastore)."""

    # ------------------------------------------------------------------ public names for the adapters
    @property
    def root(self) -> Path:
        """The folder every file of this datastore lies in (images, labels, the cache)."""
        return Path(self._datastore_path).resolve()

    @property
    def objects(self) -> dict[str, ImageLabelModel]:
        """Image id -> its entry (image info, labels by tag), as this process last read it."""
        return self._datastore.objects

    @property
    def image_dir(self) -> str:
        return self._datastore.image_path()

    def label_dir(self, tag: str) -> str:
        return self._datastore.label_path(tag)

    def file_name(self, image_id: str, ext: str) -> str:
        return self._filename(image_id, ext)

    @property
    def index_lock(self) -> FileLock:
        """One lock object per datastore, re-entrant in a thread (filelock counts), so a change
        may hold it across MONAI Label's own steps that take it again."""
        lock = self.__dict__.get("_segvol_index_lock")
        if lock is None:
            lock = self.__dict__["_segvol_index_lock"] = FileLock(self._lock_file)
        return lock

    def add_entry(self, image_id: str, ext: str, info: dict) -> None:
        """A new image in the index (hold the index lock; write_index after)."""
        self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))

    def put_label_file(self, image_id: str, tag: str, target: str, write: Callable[[str], None], info: dict) -> None:
        """The label file (``write(path)`` makes it) and its index entry, so that a kill at any
        moment leaves either the old or the new label, never half of one (temporary file +
        os.replace). ``target``: the label's path, already proven inside the datastore."""
        ours = self._datastore.objects[image_id]
        label_dir, name = os.path.split(target)
        os.makedirs(label_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial.nii.gz", dir=label_dir)
        os.close(fd)  # a name of its own for each save, so concurrent saves never share a file
        try:
            write(tmp)
        except BaseException:
            os.unlink(tmp)
            raise
        with self.index_lock:
            os.replace(tmp, target)
            self.reload_index()
            obj = self._datastore.objects.setdefault(image_id, ours)
            obj.labels[tag] = DataModel(info=dict(info, ts=int(time.time()), name=name), ext=".nii.gz")
            self.write_index()

    def reload_index(self) -> None:
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

    def write_index(self) -> None:
        """The index, replaced atomically (called holding the index lock)."""
        self._update_datastore_file(lock=False)

    def fresh(self) -> None:
        """Read the index again if another process changed it."""
        try:
            changed = _signature(self._datastore_config_path) != self._config_ts
        except FileNotFoundError:
            return
        if changed:
            self._init_from_datastore_file()

    # ------------------------------------------------------------------ MONAI Label's methods, made safe
    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        try:
            with self.index_lock:
                self.reload_index()
        except ValueError as e:
            log.error("the datastore index %s cannot be read: %s", self._datastore_config_path, e)
            if throw_exception:
                raise

    def _reconcile_datastore(self) -> None:
        with self.index_lock:
            super()._reconcile_datastore()

    def list_images(self) -> list[str]:
        self.fresh()
        return super().list_images()

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        self.fresh()
        return super().get_unlabeled_images(label_tag, labels)

    def json(self) -> dict:
        self.fresh()
        return super().json()

    def update_image_info(self, image_id: str, info: dict) -> None:
        with self.index_lock:
            self.reload_index()
            super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict) -> None:
        with self.index_lock:
            self.reload_index()
            super().update_label_info(label_id, label_tag, info)

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

    def _update_datastore_file(self, lock: bool = True) -> None:
        """Replaces MONAI Label's in-place rewrite. When the file changed since this process read
        it (MONAI Label's own steps, such as adding a series just downloaded, change the copy in
        memory without reading the file first), the file's version is kept and only the images
        this process added (whose files exist) are added to it."""

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
            with self.index_lock:
                write()
        else:
            write()


class ArchiveAccess(SharedIndex):
    """Mixed in ahead of MONAI Label's DICOMWebDatastore: its client and options by public names."""

    @property
    def archive(self):
        """The archive's DICOMweb client (MONAI Label's DICOMwebClientX)."""
        return self._client

    @property
    def search_filter(self) -> dict:
        return self._search_filter

    @property
    def fetch_by_frame(self) -> bool:
        return self._fetch_by_frame

    @property
    def converts_to_nifti(self) -> bool:
        return self._convert_to_nifti

    def quiet(self) -> None:
        """MONAI Label watches the whole cache for file events (every downloaded slice, every SEG
        written): the archive is the source here and the index is read again when it changes, so
        the watcher only spends the server's time (and its GIL) on pattern matching. Its client
        retries each call for about 30 s while the archive is down: the outbox has its own policy."""
        observer = getattr(self, "_observer", None)
        if observer is not None:
            observer.stop()
        self._client.set_http_retry_params(retry=False)

    def archive_image_uri(self, image_id: str) -> str:
        """MONAI Label's own answer (downloads and converts the series), before any check of ours."""
        return DICOMWebDatastore.get_image_uri(self, image_id)
