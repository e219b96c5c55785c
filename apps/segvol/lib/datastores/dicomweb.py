"""A DICOMweb archive (Orthanc): images are its CT series (lib/archive/listing.py). An image's
final label is its newest SEG in the archive, whoever wrote it (lib/archive/index.py), read onto
the image's grid once per SEG. A final label saved here becomes
a SEG referencing the CT series, sent through the outbox (lib/archive/outbox.py): when the archive
does not answer, the client gets HTTP 503 saying so and the SEG waits, so no label is lost. A
draft is a SEG marked as one (lib/archive/index.py), never the image's label.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import requests
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.utils.convert import dicom_to_nifti
from monailabel.datastore.utils.dicom import dicom_web_download_series

from lib.archive.index import SegIndex
from lib.archive.listing import ArchiveListing
from lib.archive.outbox import ArchiveRefused, ArchiveUnreachable, Outbox
from lib.archive.seg import SegError, Segment, read_seg, write_seg
from lib.compat.datastore import ArchiveAccess
from lib.datastores.checked import CheckedLabels
from lib.labels.checks import LabelPart
from lib.labels.save import FINAL, Checked
from lib.team.provenance import AUTOMATIC
from segvol.io import ImageReadError

log = logging.getLogger(__name__)
SERIES_UID = re.compile(r"^[0-9][0-9.]{0,63}$")
ARCHIVE_OWNS_IMAGES = (
    "on a DICOMweb archive, series and SEGs are added and deleted in the archive itself, not through this server"
)


class SegVolDICOMWebDatastore(CheckedLabels, ArchiveAccess, DICOMWebDatastore):
    def __init__(self, *args, refresh_seconds: float = 60, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.quiet()
        self.listing = ArchiveListing(self.archive, self.search_filter, refresh_seconds)
        cache = self.root / ".segvol" / "seg-index.json"
        self.seg_index = SegIndex(self.archive, cache, self.listing.segs, self.listing.invalidate)
        self.outbox = Outbox(self.archive, self.root / "pending-seg", on_stored=self.seg_index.refresh)
        self._fetching: dict[str, threading.Lock] = {}  # image id -> held while its series is fetched
        self._fetching_lock = threading.Lock()
        self._unlabelled: tuple[object, list[str]] | None = None  # (the listing, its unlabelled images)
        self._prefetch = ThreadPoolExecutor(2, thread_name_prefix="segvol-prefetch")  # series handed out

    def _archive_down(self, e: Exception) -> HTTPException:
        return HTTPException(503, f"the DICOMweb archive {self.archive.base_url} does not answer ({e})")

    def _asking(self, question):
        """The archive's answer to ``question()``, or a 503 naming the archive when it does not answer."""
        try:
            return question()
        except Exception as e:  # requests' connection and HTTP errors, whatever the client wraps them in
            raise self._archive_down(e) from e

    def list_images(self) -> list[str]:
        """The archive's CT series (lib/archive/listing.py); a 503 before the archive ever answered."""
        try:
            return self.listing.images()
        except ArchiveUnreachable as e:
            raise self._archive_down(e.__cause__ or e) from e

    def check_readable(self, image_id: str) -> None:
        """Not checked ahead on an archive (that would download the series on every Next image):
        a series that does not convert is listed as unreadable when first read."""

    def _archive_owns_them(self, *args, **kwargs):
        raise HTTPException(status_code=405, detail=ARCHIVE_OWNS_IMAGES)

    add_image = remove_image = remove_label = _archive_owns_them

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        images = set(self.list_images())
        return sorted(i for i in self._asking(self.seg_index.newest) if i in images)

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """The CT series without a final label, sorted (MONAI Label's also logs every labelled
        series UID, on each call: megabytes of log an hour on a big archive). Kept until the
        listing changes (this server storing a SEG changes it at once)."""
        listing = self._asking(self.listing.now)
        known = self._unlabelled
        if known is None or known[0] is not listing:  # worked out again once per listing, not per pick
            labelled = self._asking(self.seg_index.newest)
            known = self._unlabelled = (listing, sorted(i for i in listing.images if i not in labelled))
        return list(known[1])

    def get_image_info(self, image_id: str) -> dict:
        """The cache index's info of a series fetched before; for one not fetched yet (Next image
        fetches in the background), its study and series from the listing: the SegVol mode opens
        the study it is told."""
        info = super().get_image_info(image_id)
        if "StudyInstanceUID" not in info:
            try:
                study = self.listing.now().images.get(image_id)
            except ArchiveUnreachable:
                study = None
            if study:
                info = {**info, "StudyInstanceUID": study, "SeriesInstanceUID": image_id}
        return info

    def label_keys(self) -> set[str]:
        """Every SEG series in the archive but the drafts (QIDO only, nothing downloaded)."""
        return {seg.uid for seg in self._asking(self.seg_index.listed) if not seg.draft}

    def annotated_images(self) -> set[str]:
        """Images that any SEG references, a draft or a final label, whoever wrote it."""
        return {seg.image for seg in self._asking(self.seg_index.segs) if seg.image}

    def get_image_uri(self, image_id: str) -> str:
        """MONAI Label's, but its first call returns the cached NIfTI as well: its converter leaves
        a temporary copy in /tmp and returns that one (removed here). An image not in the cache while
        the archive does not answer is a 503 saying so. Only a DICOM UID becomes a path. One fetch of
        an image at a time in this process: a second caller would otherwise read its NIfTI half-written."""
        cached = self._cached_nifti(image_id)
        with self._fetch_of(image_id):  # a second caller (the background scorer, another annotator) waits
            if self.converts_to_nifti and os.path.exists(cached):  # fetched before: nothing to ask the archive
                return self._inside(cached)
            try:
                uri = self.archive_image_uri(image_id)
            except requests.RequestException as e:
                raise self._archive_down(e) from e
            if self.converts_to_nifti and uri != cached and os.path.exists(cached):
                os.unlink(uri)
                uri = cached
        return self._inside(uri)

    def uri_if_ready(self, image_id: str) -> str | None:
        """The cached NIfTI when the series was fetched before; else None, and the series is
        fetched in the background, so the annotator's first prompt finds it (Next image used to
        download and convert it on the request path: seconds for a real CT). Without a ``path``,
        Slicer downloads the image through /datastore/image, which waits for that fetch."""
        cached = self._cached_nifti(image_id)
        if self.converts_to_nifti and os.path.exists(cached) and not self._fetch_of(image_id).locked():
            return self._inside(cached)
        self._prefetch.submit(self._fetch_quietly, image_id)
        return None

    def _fetch_quietly(self, image_id: str) -> None:
        try:
            self.get_image_uri(image_id)
        except Exception as e:  # the archive down, a series that does not convert: the first prompt says so
            log.warning("series %s not fetched ahead: %s", image_id, getattr(e, "detail", e))

    def _cached_nifti(self, image_id: str) -> str:
        """Where the series' NIfTI is, or will be, in the cache; only a DICOM UID becomes a path."""
        if not SERIES_UID.match(image_id or ""):
            raise HTTPException(status_code=404, detail=f"{image_id!r} is not a series of the archive")
        return os.path.realpath(os.path.join(self.image_dir, f"{image_id}.nii.gz"))

    def _fetch_of(self, image_id: str) -> threading.Lock:
        """Held while the image's series is fetched into the cache."""
        with self._fetching_lock:
            return self._fetching.setdefault(image_id, threading.Lock())

    @contextmanager
    def read_once(self, image_id: str) -> Iterator[str]:
        """The image's NIfTI for one read by the background scorer: the cache's where the series
        was fetched before; else the series fetched into a folder of its own and removed after the
        read, the cache left as it was (the scorer reads every series of the archive: kept, they
        would fill the disk). A series that does not convert is an ImageReadError."""
        cached = self._cached_nifti(image_id)
        with self._fetch_of(image_id):
            fetched = self.converts_to_nifti and os.path.exists(cached)
        if fetched:
            yield self._inside(cached)
            return
        work = Path(tempfile.mkdtemp(prefix="segvol-read-once-"))
        try:
            try:
                dicom_web_download_series(None, image_id, str(work / "series"), self.archive, self.fetch_by_frame)
            except requests.RequestException as e:
                raise self._archive_down(e) from e
            try:
                nifti = dicom_to_nifti(str(work / "series"))
            except Exception as e:  # SimpleITK's RuntimeError, a series without files
                raise ImageReadError(f"series {image_id} does not convert to a volume: {e}") from e
            try:
                yield nifti
            finally:
                Path(nifti).unlink(missing_ok=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def release(self, image_id: str) -> None:
        """Delete the image's downloaded series and its NIfTI from the cache: pre-annotation reads
        each image once, and an archive does not fit on a worker's disk."""
        image_dir = Path(self.image_dir)
        shutil.rmtree(image_dir / image_id, ignore_errors=True)
        (image_dir / f"{image_id}.nii.gz").unlink(missing_ok=True)

    def store_draft(self, image_id: str, label: np.ndarray, parts: list[LabelPart], creator: str, version: str) -> str:
        """A SEG marked as a draft, every segment AUTOMATIC; returns its series UID. Not kept as
        pending when the archive does not answer: the series is simply not done (ArchiveUnreachable)."""
        segments = [Segment(p.value, p.name, p.category, AUTOMATIC, version) for p in parts]
        seg_file = self._write_seg(image_id, label, segments, creator, draft=True)
        try:
            uid = self.outbox.send(seg_file)
        finally:
            os.unlink(seg_file)
        self.seg_index.refresh()
        return uid

    def datalist(self, full_path: bool = True) -> list[dict]:
        """Every image with a final label: its newest SEG on its grid. A SEG that cannot be read
        (not on the image's grid, an unreadable file) is skipped with a log line naming it."""
        images = set(self.list_images())
        out = []
        for image, seg in sorted(self._asking(self.seg_index.newest).items()):
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
        cached = Path(self.label_dir(FINAL)) / f"{image_id}.nii.gz"
        final = self.objects[image_id].labels.get(FINAL)
        if final is not None and (final.info or {}).get("SeriesInstanceUID") == seg_series and cached.exists():
            return str(cached)
        label, names = self._seg_on_grid(image_id, seg_series)
        info = {
            "SeriesInstanceUID": seg_series,
            "source": "the archive",
            "segments": [{"value": v, "name": n} for v, n in sorted(names.items())],
        }
        self.write_label(image_id, image_path, label, FINAL, info)
        return str(cached)

    def status(self) -> dict:
        try:
            return super().status()
        except HTTPException as e:
            return {"total": 0, "completed": 0, "label_tags": {}, "error": e.detail}
        except Exception as e:  # the SEG query failed after the image query worked
            return {"total": 0, "completed": 0, "label_tags": {}, "error": f"DICOMweb archive: {e}"}

    def store(self, image_id: str, image_path: str, checked: Checked, tag: str) -> dict:
        """The pipeline's destination: a final label goes to the archive as a SEG first, then into
        the cache on the image's grid."""
        sent = self._send_seg(image_id, checked) if tag == FINAL else {}
        self.write_label(image_id, image_path, checked.label, tag, dict(checked.info, **sent))
        return sent

    def _write_seg(
        self, image_id: str, label: np.ndarray, segments: list[Segment], creator: str, draft: bool = False
    ) -> Path:
        """The label as a DICOM SEG over the image's series (in the cache) in a temporary file."""
        series_dir = Path(self.image_dir) / image_id
        try:
            return write_seg(label, series_dir, segments, self.saver.model_version(), creator=creator, draft=draft)
        except SegError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e

    def _send_seg(self, image_id: str, checked: Checked) -> dict:
        origins = {s["value"]: s for s in checked.info["segments"]}
        segments = [
            Segment(p.value, p.name, p.category, origins[p.value]["type"], origins[p.value]["model_version"])
            for p in checked.parts
        ]
        seg_file = self._write_seg(image_id, checked.label, segments, checked.info["client"])
        try:
            uid = self.outbox.deliver(seg_file, image_id)
        except ArchiveUnreachable as e:
            raise HTTPException(status_code=503, detail=f"the DICOMweb archive did not take the SEG: {e}") from e
        except ArchiveRefused as e:
            raise HTTPException(status_code=502, detail=f"the DICOMweb archive refused the SEG: {e}") from e
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
        if label_tag != FINAL:
            return super().get_label_uri(label_id, label_tag)
        if not image_id:
            seg = self._asking(self.seg_index.newest).get(label_id)
            if seg is None:
                return ""
            image_id, label_id = label_id, seg.uid
        return self._final_label_from(image_id, label_id)

    def _seg_on_grid(self, image_id: str, seg_series: str) -> tuple[np.ndarray, dict[int, str]]:
        """A SEG series of the archive as a label map on the image's grid, and value -> name."""
        import SimpleITK as sitk

        label_dir = Path(self.label_dir(FINAL)) / seg_series
        if not label_dir.exists() or not any(label_dir.iterdir()):
            dicom_web_download_series(None, seg_series, str(label_dir), self.archive, self.fetch_by_frame)
        reference = sitk.ReadImage(self.get_image_uri(image_id))
        try:
            return read_seg(next(label_dir.glob("*")), reference, self.vocabulary)
        except (SegError, StopIteration, ValueError) as e:
            raise HTTPException(status_code=422, detail=f"SEG {seg_series} cannot be read onto {image_id}: {e}") from e

    def history(self, image_id: str) -> list[dict]:
        """Every SEG in the archive that references the image (ours and any other tool's), newest
        first, with what this server recorded about its own (who saved it, from which results)."""
        ours = {s["seg_series"]: s for s in super().history(image_id) if s.get("seg_series")}
        self.seg_index.refresh()  # one QIDO query: a SEG stored a second ago by any tool is listed
        segs = self._asking(lambda: self.seg_index.of_image(image_id))
        return [dict(seg.as_history(), **ours.get(seg.uid, {})) for seg in segs]

    def label_voxels(self, image_id: str, seg_series: str | None = None) -> tuple[np.ndarray, dict[int, str]]:
        """The SEG ``seg_series`` of the image (404 unless the archive lists it as one of the
        image's SEGs), or without it the image's final label (its newest SEG that is no draft)."""
        segs = self._asking(lambda: self.seg_index.of_image(image_id))
        if seg_series is None:
            final = next((seg for seg in segs if not seg.draft), None)
            if final is None:
                raise HTTPException(status_code=404, detail=f"image {image_id!r} has no final label")
            seg_series = final.uid
        elif seg_series not in {seg.uid for seg in segs}:
            raise HTTPException(status_code=404, detail=f"no SEG {seg_series} of image {image_id!r} in the archive")
        return self._seg_on_grid(image_id, seg_series)
