"""A folder of images (the embedded default, e.g. sample-datastore/): labels are NIfTI files on
each image's grid; a draft is MONAI Label's ``original`` label (a model's, not an annotator's)."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from lib.compat.datastore import SharedIndex
from lib.datastores.checked import CheckedLabels, no_image
from lib.labels.checks import LabelPart
from lib.labels.save import FINAL
from lib.paths import PathError, new_id
from lib.team.provenance import AUTOMATIC

log = logging.getLogger(__name__)
ORIGINAL = "original"
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


class SegVolLocalDatastore(CheckedLabels, SharedIndex, LocalDatastore):
    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        """A new image under a plain id (lib/paths.new_id), from a file the server named after its
        checked content; refused when the id exists. Written whole or not at all."""
        try:
            image_id = new_id(image_id)
        except PathError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        ext = next((e for e in IMAGE_EXTENSIONS if image_filename.endswith(e)), None)
        if ext is None:
            raise HTTPException(status_code=400, detail="images are NIfTI or NRRD files")
        name = self.file_name(image_id, ext)
        dest = self._inside(os.path.join(self.image_dir, name))
        with self.index_lock:
            self.reload_index()
            if image_id in self.objects:
                raise HTTPException(status_code=409, detail=f"image {image_id!r} exists")
            tmp = f"{dest}.{uuid.uuid4().hex}.partial"
            shutil.copyfile(image_filename, tmp)
            os.replace(tmp, dest)
            self.add_entry(image_id, ext, dict(image_info or {}, ts=int(time.time()), name=name))
            self.write_index()
        log.info("image %s added (%s)", image_id, name)
        return image_id

    def remove_image(self, image_id: str) -> None:
        with self.index_lock:
            self.reload_index()
            obj = self.objects.get(image_id)
            if obj is None:
                raise no_image(image_id)
            for tag in list(obj.labels):
                Path(self.get_label_uri(image_id, tag)).unlink(missing_ok=True)
            Path(self.get_image_uri(image_id)).unlink(missing_ok=True)
            del self.objects[image_id]
            self.write_index()
        log.info("image %s and its labels deleted", image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        with self.index_lock:
            self.reload_index()
            obj = self.objects.get(label_id)
            if obj is None or label_tag not in obj.labels:
                raise HTTPException(status_code=404, detail=f"image {label_id!r} has no {label_tag!r} label")
            Path(self.get_label_uri(label_id, label_tag)).unlink(missing_ok=True)
            del obj.labels[label_tag]
            self.write_index()
        log.info("label %s (%s) deleted", label_id, label_tag)

    def _finals(self) -> dict[str, str]:
        """Image id -> a key of its final label (changes when the label is saved again)."""
        out = {}
        for image_id, obj in self.objects.items():
            final = obj.labels.get(FINAL)
            if final is not None:
                out[image_id] = f"{image_id}@{(final.info or {}).get('ts', '')}"
        return out

    def label_keys(self) -> set[str]:
        return set(self._finals().values())

    def annotated_images(self) -> set[str]:
        """Images with a label of any tag, a draft or a final one: pre-annotation leaves them."""
        return {image_id for image_id, obj in self.objects.items() if obj.labels}

    def store_draft(self, image_id: str, label: np.ndarray, parts: list[LabelPart], creator: str, version: str) -> str:
        info = {
            "client": creator,
            "model_version": version,
            "segments": [
                {"value": p.value, "name": p.name, "type": AUTOMATIC, "model_version": version} for p in parts
            ],
        }
        self.write_label(image_id, self.get_image_uri(image_id), label, ORIGINAL, info)
        return self.get_label_uri(image_id, ORIGINAL)

    def datalist(self, full_path: bool = True) -> list[dict]:
        return [
            {
                "image": self.get_image_uri(image_id),
                "label": self.get_label_uri(image_id, FINAL),
                "image_id": image_id,
                "label_key": key,
            }
            for image_id, key in sorted(self._finals().items())
        ]
