"""What both datastores share: ids proven to be paths inside the datastore, saves through the one
label-saving pipeline (lib/labels/save.py), the team's history, a label's voxels."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import nibabel as nib
import numpy as np
from fastapi import HTTPException

from lib.labels.checks import LabelError, check_tag
from lib.labels.save import FINAL, Checked, LabelSaver, Saved
from lib.labels.uploads import UploadError, UploadTooLarge
from lib.paths import PathError, inside
from lib.team.conflicts import ConflictError
from lib.team.identity import IdentityError
from lib.team.reviews import ReviewError, slicer_meta
from lib.team.team import Team
from segvol.io import ImageReadError, read_volume
from segvol.vocabulary import Vocabulary


def write_nifti_like(image_path: str, label: np.ndarray, path: str) -> None:
    """``label`` as a uint8 NIfTI with the image's header (its grid, its orientation)."""
    ref = nib.load(image_path)
    img = nib.Nifti1Image(label, ref.affine, header=ref.header.copy())
    img.header.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    nib.save(img, path)


def no_image(image_id: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")


class CheckedLabels:
    """Mixed in ahead of lib/compat/datastore.py's SharedIndex and a MONAI Label datastore."""

    def __init__(self, *args, saver: LabelSaver, team: Team, vocabulary: Vocabulary, read, **kwargs) -> None:
        """``read``: the model host's volume reader (it keeps the volume for the next request)."""
        self.saver, self.team, self.vocabulary, self.read = saver, team, vocabulary, read
        super().__init__(*args, **kwargs)

    def _inside(self, path: str) -> str:
        """``path`` proven inside the datastore's folder (lib/paths.py), else a 400."""
        try:
            return str(inside(self.root, path)) if path else path
        except PathError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e

    def get_image_uri(self, image_id: str) -> str:
        return self._inside(super().get_image_uri(image_id))

    def uri_if_ready(self, image_id: str) -> str | None:
        """The image's file for a Next image answer's ``path``: in a folder, the file itself."""
        return self.get_image_uri(image_id)

    @contextmanager
    def read_once(self, image_id: str) -> Iterator[str]:
        """The image's file for one read by the background scorer (lib/activelearning/scorer.py):
        in a folder, the file itself."""
        yield self.get_image_uri(image_id)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return self._inside(super().get_label_uri(label_id, label_tag))

    def check_readable(self, image_id: str) -> None:
        """Raises ImageReadError when the image's file cannot be read as a volume."""
        self.read(self.get_image_uri(image_id))

    def release(self, image_id: str) -> None:
        """Free what reading the image kept on this machine (nothing here: the image is the folder's)."""

    def save(self, image_id: str, upload: str, tag: str, params: object) -> Saved:
        """A label saved through the pipeline; what was saved (reported to the client)."""
        try:
            check_tag(tag)
            self.saver.client(params)  # identity before the image is listed or fetched
            if image_id not in self.list_images():
                raise no_image(image_id)
            return self.saver.save(image_id, self.get_image_uri(image_id), upload, tag, params, to=self)
        except UploadTooLarge as e:
            raise HTTPException(status_code=413, detail=str(e)) from e
        except (LabelError, UploadError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        except IdentityError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from e
        except ConflictError as e:
            raise HTTPException(status_code=409, detail=e.as_detail()) from e
        except ReviewError as e:
            raise HTTPException(status_code=e.status, detail=e.as_detail()) from e
        except ImageReadError as e:  # the datastore's own image: listed as unreadable, skipped from now on
            self.team.unreadable.add(image_id, str(e))
            raise HTTPException(status_code=422, detail=f"image {image_id!r} cannot be read: {e}") from e

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict, **_) -> str:
        """MONAI Label's interface to the same pipeline."""
        return self.save(image_id, label_filename, label_tag, label_info).image

    def store(self, image_id: str, image_path: str, checked: Checked, tag: str) -> dict:
        """The pipeline's destination: the label file on the image's grid (lib/labels/save.py)."""
        self.write_label(image_id, image_path, checked.label, tag, checked.info)
        return {}

    def write_label(self, image_id: str, image_path: str, label: np.ndarray, tag: str, info: dict) -> str:
        """The label file and its index entry, written whole or not at all. The index is read again
        first: another process (a replica that fetched the image) may have added the image's entry."""
        self.fresh()
        if image_id not in self.objects:
            raise no_image(image_id)
        label_dir = self._inside(self.label_dir(check_tag(tag)))
        target = self._inside(os.path.join(label_dir, self.file_name(image_id, ".nii.gz")))
        self.put_label_file(image_id, tag, target, lambda path: write_nifti_like(image_path, label, path), info)
        return image_id

    def json(self) -> dict:
        """MONAI Label's listing, each final label's info with its review as 3D Slicer's reviewer
        module reads it (``segmentationMeta``)."""
        out = super().json()
        reviews = self.team.reviews
        if reviews is None:
            return out
        for image, review in reviews.newest_by_image().items():
            final = out.get("objects", {}).get(image, {}).get("labels", {}).get(FINAL)
            if isinstance(final, dict):
                final["info"] = dict(final.get("info") or {}, segmentationMeta=slicer_meta(review))
        return out

    def reviewed_label(self, image_id: str, seg_series: str | None) -> tuple[np.ndarray, dict[int, str]]:
        """The label a reviewer corrects: the image's final label (its SEG series on an archive)."""
        return self.label_voxels(image_id, seg_series) if seg_series else self.label_voxels(image_id)

    def history(self, image_id: str) -> list[dict]:
        """Labels saved for the image through this server, newest first."""
        if image_id not in self.list_images():
            raise no_image(image_id)
        return self.team.history(image_id)

    def label_voxels(self, image_id: str, seg_series: str | None = None) -> tuple[np.ndarray, dict[int, str]]:
        """The image's final label (on its grid) and value -> name."""
        if seg_series is not None:
            raise HTTPException(status_code=400, detail="this datastore keeps no DICOM SEG series: leave out 'seg'")
        obj = self.objects.get(image_id)
        final = obj.labels.get(FINAL) if obj is not None else None
        if final is None:
            raise HTTPException(status_code=404, detail=f"image {image_id!r} has no final label")
        label = np.asarray(read_volume(self.get_label_uri(image_id, FINAL)).array).astype(np.uint8)
        names = {int(s["value"]): s["name"] for s in (final.info or {}).get("segments", [])}
        for v in np.unique(label):
            if v and int(v) not in names and 1 <= v <= len(self.vocabulary):
                names[int(v)] = self.vocabulary.categories[int(v) - 1].name
        return label, names
