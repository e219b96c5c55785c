"""Datastores that check what is saved and store labels in the app's convention.

Local folder: labels are validated (tag, grid, values), normalised to /info label indices and
written atomically. DICOMweb (Orthanc): a final label also becomes a DICOM SEG referencing the
CT series, stored with STOW-RS; when the archive does not answer, the SEG is kept in a pending
folder, the client gets HTTP 503 saying so, and the upload is retried on the next save and at
start-up, so no label is lost.

Drafts (``python -m segvol preannotate``) are stored beside the labels but are none: a folder's
draft is MONAI Label's ``original`` label, an archive's a SEG marked as a draft (lib/archive.py);
both leave the image unlabelled until an annotator saves a final label.
"""

from __future__ import annotations

import json
import logging
import os
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
from filelock import FileLock
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import DataModel, LocalDatastore, LocalDatastoreModel
from monailabel.datastore.utils.dicom import dicom_web_download_series, dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom import Dataset

from lib.archive import SegIndex
from lib.dicom_seg import SegError, Segment, read_seg, write_seg
from lib.identity import IdentityError, client_of
from lib.labels import LabelError, LabelPart, check_tag, normalise, read_upload
from lib.provenance import AUTOMATIC, MANUAL, Origin
from segvol.io import read_volume

log = logging.getLogger(__name__)

RETRIES = 3


def _write_nifti_like(image_path: str, label: np.ndarray, path: str) -> str:
    ref = nib.load(image_path)
    img = nib.Nifti1Image(label, ref.affine, header=ref.header.copy())
    img.header.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    nib.save(img, path)
    return path


class SegVolLabels:
    """What both datastores do before storing a label."""

    last_saved = threading.local()  # what this thread saved last (the app reports it to the client)

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
            arr = read_upload(label_filename, image)
            label, parts = normalise(arr, (label_info or {}).get("label_info"), self.service.vocabulary)
        except (LabelError, IdentityError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
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
        label_dir = self._datastore.label_path(tag)
        os.makedirs(label_dir, exist_ok=True)
        name = self._filename(image_id, ".nii.gz")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial.nii.gz", dir=label_dir)
        os.close(fd)  # a name of its own for each save, so concurrent saves never share a file
        try:
            _write_nifti_like(image_path, label, tmp)
        except BaseException:
            os.unlink(tmp)
            raise
        with FileLock(self._lock_file):
            os.replace(tmp, os.path.join(label_dir, name))
            self._reload_index()
            obj = self._datastore.objects.setdefault(image_id, ours)
            obj.labels[tag] = DataModel(info=dict(info, ts=int(time.time()), name=name), ext=".nii.gz")
            self._update_datastore_file(lock=False)
        return image_id

    def _reload_index(self) -> None:
        """Take in what other processes wrote to the index since this one read it (called holding
        the lock): writing this process's copy back would drop their labels otherwise."""
        try:
            ts = os.stat(self._datastore_config_path).st_mtime
        except FileNotFoundError:
            return
        if ts != self._config_ts:
            with open(self._datastore_config_path) as f:
                self._datastore = LocalDatastoreModel.model_validate_json(f.read())
            self._datastore.base_path = self._datastore_path
            self._config_ts = ts

    def release(self, image_id: str) -> None:
        """Free what reading the image kept on this machine (nothing here: the image is the folder's)."""

    def _update_datastore_file(self, lock: bool = True) -> None:
        """The datastore index, replaced atomically (MONAI Label rewrites it in place)."""

        def write() -> None:
            self._ignore_event_config = True
            tmp = f"{self._datastore_config_path}.{os.getpid()}.{uuid.uuid4().hex}.partial"
            with open(tmp, "w") as f:
                f.write(json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._datastore_config_path)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()


class SegVolLocalDatastore(SegVolLabels, LocalDatastore):
    def __init__(self, service, *args, **kwargs) -> None:
        self.service = service
        super().__init__(*args, **kwargs)

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
    label is its newest SEG in the archive, whoever wrote it (lib/archive.py), read onto the
    image's grid once per SEG."""

    def __init__(self, service, *args, refresh_seconds: float = 60, **kwargs) -> None:
        self.service = service
        super().__init__(*args, **kwargs)
        # one retry policy, ours (RETRIES tries, short back-off): the client's own would hold a
        # request for about 30 s per call while the archive is down
        self._client.set_http_retry_params(retry=False)
        self.pending = Path(self._datastore_path) / "pending-seg"
        self.pending.mkdir(parents=True, exist_ok=True)
        self.refresh_seconds = refresh_seconds
        self._series: tuple[float, list[str]] | None = None
        self.seg_index = SegIndex(
            self._client, Path(self._datastore_path) / ".segvol" / "seg-index.json", refresh_seconds
        )

    def _archive_down(self, e: Exception) -> HTTPException:
        return HTTPException(
            status_code=503, detail=f"the DICOMweb archive {self._client.base_url} does not answer ({e})"
        )

    def list_images(self) -> list[str]:
        if self._series is None or time.monotonic() - self._series[0] > self.refresh_seconds:
            try:
                found = self._client.search_for_series(search_filters=self._search_filter)
            except Exception as e:  # requests' connection and HTTP errors, whatever the client wraps them in
                raise self._archive_down(e) from e
            self._series = (time.monotonic(), [str(Dataset.from_json(ds).SeriesInstanceUID) for ds in found])
        return list(self._series[1])

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
        the archive does not answer is a 503 saying so."""
        try:
            uri = super().get_image_uri(image_id)
        except requests.RequestException as e:
            raise self._archive_down(e) from e
        cached = os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))
        if self._convert_to_nifti and uri != cached and os.path.exists(cached):
            os.unlink(uri)
            return cached
        return uri

    def release(self, image_id: str) -> None:
        """Delete the image's downloaded series and its NIfTI from the cache: pre-annotation reads
        each image once, and an archive does not fit on a worker's disk."""
        image_dir = Path(self._datastore.image_path())
        shutil.rmtree(image_dir / image_id, ignore_errors=True)
        (image_dir / f"{image_id}.nii.gz").unlink(missing_ok=True)

    def store_draft(self, image_id: str, label: np.ndarray, parts: list[LabelPart], creator: str, version: str) -> str:
        """A SEG marked as a draft, every segment AUTOMATIC; returns its series UID. Not kept as
        pending when the archive does not answer: the series is simply not done (ConnectionError)."""
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
        last: Exception | None = None
        for attempt in range(RETRIES):
            try:
                uid = dicom_web_upload_dcm(str(seg_file), self._client)
                if uid:
                    return uid
                last = RuntimeError("the archive returned no series for the stored SEG")
            except Exception as e:  # connection refused, timeouts, HTTP errors: all retried
                last = e
            time.sleep(0.5 * 2**attempt)
        raise ConnectionError(f"{type(last).__name__}: {last}")

    def flush_pending(self) -> list[str]:
        """Upload SEGs kept while the archive was unreachable; returns their series UIDs. One
        process at a time (a lock beside them), so no SEG is sent twice."""
        done = []
        with FileLock(str(self.pending / ".lock")):
            for seg_file in sorted(self.pending.glob("*.dcm")):
                try:
                    done.append(self._upload(seg_file))
                except ConnectionError as e:
                    log.warning("archive still unreachable; %s stays pending (%s)", seg_file.name, e)
                    break
                seg_file.unlink(missing_ok=True)
                log.info("pending SEG %s stored in the archive", seg_file.name)
        if done:
            self.seg_index.refresh()
        return done

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
        self.flush_pending()
        try:
            uid = self._upload(seg_file)
        except ConnectionError as e:
            kept = self.pending / f"{image_id}-{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.dcm"
            shutil.move(seg_file, kept)
            raise HTTPException(
                status_code=503,
                detail=f"the DICOMweb archive did not take the SEG after {RETRIES} tries ({e}); "
                f"it is kept in {kept} and will be sent on the next save or restart",
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
        if label_tag != DefaultLabelTag.FINAL:
            return super().get_label_uri(label_id, label_tag)
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
        if seg_series is None:
            return super().label_voxels(image_id)
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
