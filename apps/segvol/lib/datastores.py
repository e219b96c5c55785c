"""Datastores that check what is saved and store labels in the app's convention.

Local folder: labels are validated (tag, grid, values), normalised to /info label indices and
written atomically. DICOMweb (Orthanc): a final label also becomes a DICOM SEG referencing the
CT series, stored with STOW-RS; when the archive does not answer, the SEG is kept in a pending
folder, the client gets HTTP 503 saying so, and the upload is retried on the next save and at
start-up, so no label is lost.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.datastore.utils.dicom import dicom_web_download_series, dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.dicom_seg import SegError, Segment, read_seg, write_seg
from lib.labels import LabelError, LabelPart, check_tag, normalise, read_upload
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

    def _prepare_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict):
        try:
            check_tag(label_tag)
            if image_id not in self.list_images():
                raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")
            image_path = self.get_image_uri(image_id)
            image = read_volume(image_path)
            arr = read_upload(label_filename, image)
            label, parts = normalise(arr, (label_info or {}).get("label_info"), self.service.vocabulary)
        except LabelError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        info = dict(label_info or {})
        info["segments"] = [
            {
                "value": p.value,
                "name": p.name,
                "algorithm": self.service.algorithm_type(image_path, p.value, label == p.value),
            }
            for p in parts
        ]
        info["model_version"] = self.service.version
        return image_path, label, parts, info

    def _store_label(self, image_id: str, image_path: str, label: np.ndarray, tag: str, info: dict) -> str:
        """Write the label file and the datastore index so that a kill at any moment leaves either
        the old or the new label, never half of one (temporary file + os.replace)."""
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")
        label_dir = self._datastore.label_path(tag)
        os.makedirs(label_dir, exist_ok=True)
        name = self._filename(image_id, ".nii.gz")
        tmp = _write_nifti_like(image_path, label, os.path.join(label_dir, f".{name}.{os.getpid()}.partial.nii.gz"))
        with FileLock(self._lock_file):
            os.replace(tmp, os.path.join(label_dir, name))
            obj.labels[tag] = DataModel(info=dict(info, ts=int(time.time()), name=name), ext=".nii.gz")
            self._update_datastore_file(lock=False)
        return image_id

    def _update_datastore_file(self, lock: bool = True) -> None:
        """The datastore index, replaced atomically (MONAI Label rewrites it in place)."""

        def write() -> None:
            self._ignore_event_config = True
            tmp = f"{self._datastore_config_path}.{os.getpid()}.partial"
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
        return self._store_label(image_id, image_path, label, label_tag, info)


class SegVolDICOMWebDatastore(SegVolLabels, DICOMWebDatastore):
    def __init__(self, service, *args, **kwargs) -> None:
        self.service = service
        super().__init__(*args, **kwargs)
        # one retry policy, ours (RETRIES tries, short back-off): the client's own would hold a
        # request for about 30 s per call while the archive is down
        self._client.set_http_retry_params(retry=False)
        self.pending = Path(self._datastore_path) / "pending-seg"
        self.pending.mkdir(parents=True, exist_ok=True)
        self.flush_pending()

    def list_images(self) -> list[str]:
        try:
            return super().list_images()
        except Exception as e:  # requests' connection and HTTP errors, whatever the client wraps them in
            raise HTTPException(
                status_code=503, detail=f"the DICOMweb archive {self._client.base_url} does not answer ({e})"
            ) from e

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
        """Upload SEGs kept while the archive was unreachable; returns their series UIDs."""
        done = []
        for seg_file in sorted(self.pending.glob("*.dcm")):
            try:
                done.append(self._upload(seg_file))
                seg_file.unlink()
                log.info("pending SEG %s stored in the archive", seg_file.name)
            except ConnectionError as e:
                log.warning("archive still unreachable; %s stays pending (%s)", seg_file.name, e)
                break
        return done

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict, label_id: str = ""
    ) -> str:
        image_path, label, parts, info = self._prepare_label(image_id, label_filename, label_tag, label_info)
        if label_tag == DefaultLabelTag.FINAL:
            info.update(self._store_seg(image_id, label, parts, info))
        return self._store_label(image_id, image_path, label, label_tag, info)

    def _store_seg(self, image_id: str, label: np.ndarray, parts: list[LabelPart], info: dict) -> dict:
        series_dir = Path(self._datastore.image_path()) / image_id
        algorithms = {s["value"]: s["algorithm"] for s in info["segments"]}
        segments = [Segment(p.value, p.name, p.category, algorithms[p.value]) for p in parts]
        try:
            seg_file = write_seg(label, series_dir, segments, self.service.version)
        except SegError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        self.flush_pending()
        try:
            uid = self._upload(seg_file)
        except ConnectionError as e:
            kept = self.pending / f"{image_id}-{int(time.time() * 1000)}.dcm"
            shutil.move(seg_file, kept)
            raise HTTPException(
                status_code=503,
                detail=f"the DICOMweb archive did not take the SEG after {RETRIES} tries ({e}); "
                f"it is kept in {kept} and will be sent on the next save or restart",
            ) from e
        os.unlink(seg_file)
        DICOMWebDatastore.get_labeled_images.cache_clear()  # the new SEG counts at once
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
        cached = Path(self._datastore.label_path(DefaultLabelTag.FINAL)) / f"{image_id}.nii.gz"
        if cached.exists():
            return str(cached)
        label_dir = Path(self._datastore.label_path(label_tag)) / label_id
        if not label_dir.exists() or not any(label_dir.iterdir()):
            dicom_web_download_series(None, label_id, str(label_dir), self._client, self._fetch_by_frame)
        import SimpleITK as sitk

        image_path = self.get_image_uri(image_id)
        reference = sitk.ReadImage(image_path)
        seg_file = next(label_dir.glob("*"))
        label = read_seg(seg_file, reference, self.service.vocabulary)
        self._store_label(image_id, image_path, label, label_tag, self._dicom_info(label_id))
        return str(cached)
