"""Label maps <-> DICOM SEG that reference their CT series, with SegVol's category codes.

Segments are numbered 1..n as DICOM requires; each carries the category name as its label,
SNOMED CT codes from the vocabulary where known (a local "99SEGVOL" code otherwise, never
a borrowed wrong code), the algorithm (SegVol and its model version) and its type:
AUTOMATIC when the saved voxels are exactly SegVol's, SEMIAUTOMATIC when a person edited
SegVol's result, MANUAL when SegVol never produced that label for the image. Every slice
is written (no empty-slice dropping), so reading back gives the image grid exactly.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk

from segvol.vocabulary import Category, Vocabulary

log = logging.getLogger(__name__)

LOCAL_SCHEME = "99SEGVOL"
ANATOMICAL_STRUCTURE = {
    "CodeValue": "123037004",
    "CodingSchemeDesignator": "SCT",
    "CodeMeaning": "Anatomical Structure",
}


class SegError(ValueError):
    """A label that cannot be stored as a DICOM SEG (empty, wrong grid)."""


@dataclass(frozen=True)
class Segment:
    value: int  # voxel value in our label maps (the /info label index)
    name: str
    category: Category | None
    algorithm: str  # AUTOMATIC, SEMIAUTOMATIC or MANUAL


def _code(d: dict | None) -> dict | None:
    if not d:
        return None
    return {k: d[k] for k in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")}


def segment_attributes(seg: Segment, number: int, model_version: str) -> dict:
    """dcmqi-style attributes of one segment."""
    snomed = seg.category.snomed if seg.category else None
    if snomed:
        category = _code(snomed.get("category")) or ANATOMICAL_STRUCTURE
        prop_type = _code(snomed)
    else:
        category = (
            ANATOMICAL_STRUCTURE
            if seg.category and seg.category.type != "lesion"
            else {"CodeValue": "C", "CodingSchemeDesignator": LOCAL_SCHEME, "CodeMeaning": "Category not coded"}
        )
        prop_type = {"CodeValue": f"V{seg.value}", "CodingSchemeDesignator": LOCAL_SCHEME, "CodeMeaning": seg.name[:64]}
    attrs = {
        "labelID": number,
        "SegmentLabel": seg.name[:64],
        "SegmentDescription": f"segvol-label value {seg.value}",
        "SegmentAlgorithmType": seg.algorithm,
        "SegmentedPropertyCategoryCodeSequence": category,
        "SegmentedPropertyTypeCodeSequence": prop_type,
    }
    if seg.algorithm != "MANUAL":
        attrs["SegmentAlgorithmName"] = "SegVol"
    if snomed and snomed.get("modifier"):
        attrs["SegmentedPropertyTypeModifierCodeSequence"] = _code(snomed["modifier"])
    if snomed and snomed.get("anatomic_region"):
        attrs["AnatomicRegionSequence"] = _code(snomed["anatomic_region"])
    return attrs


def _reference(series_dir: Path) -> tuple[sitk.Image, list[pydicom.Dataset]]:
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(series_dir))
    if not files:
        raise SegError(f"no DICOM series in {series_dir}")
    reader.SetFileNames(files)
    image = reader.Execute()
    return image, [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def write_seg(
    label_ijk: np.ndarray, series_dir: Path, segments: list[Segment], model_version: str, out: Path | None = None
) -> Path:
    """Write a DICOM SEG of ``label_ijk`` (values = Segment.value) over the CT series in ``series_dir``."""
    ref, datasets = _reference(series_dir)
    if tuple(label_ijk.shape) != tuple(ref.GetSize()):
        raise SegError(f"label shape {label_ijk.shape} differs from the image shape {tuple(ref.GetSize())}")
    present = [s for s in segments if (label_ijk == s.value).any()]
    if not present:
        raise SegError("the label is empty: a DICOM SEG needs at least one segment")
    renumbered = np.zeros(label_ijk.shape, np.uint16)
    for n, s in enumerate(present, start=1):
        renumbered[label_ijk == s.value] = n
    seg_img = sitk.GetImageFromArray(renumbered.transpose(2, 1, 0))
    seg_img.CopyInformation(ref)
    template = pydicom_seg.template.from_dcmqi_metainfo(
        {
            "ContentCreatorName": "segvol-label",
            "ClinicalTrialSeriesID": "segvol-label",
            "ClinicalTrialTimePointID": "1",
            "SeriesDescription": f"SegVol {model_version}"[:64],
            "SeriesNumber": "300",
            "InstanceNumber": "1",
            "BodyPartExamined": "",
            "segmentAttributes": [[segment_attributes(s, n, model_version) for n, s in enumerate(present, start=1)]],
            "ContentLabel": "SEGVOL",
            "ContentDescription": f"SegVol {model_version}"[:64],
        }
    )
    writer = pydicom_seg.MultiClassWriter(
        template=template, inplane_cropping=False, skip_empty_slices=False, skip_missing_segment=False
    )
    dcm = writer.write(seg_img, datasets)
    out = out or Path(tempfile.mkstemp(suffix=".dcm")[1])
    dcm.save_as(str(out))
    log.info("DICOM SEG %s: %s", out, ", ".join(f"{s.name}={s.value} ({s.algorithm})" for s in present))
    return out


def value_of(segment: pydicom.Dataset, vocabulary: Vocabulary) -> int:
    """Our voxel value for a SEG segment: from its local code, else its label as a category name."""
    code = segment.SegmentedPropertyTypeCodeSequence[0]
    if code.CodingSchemeDesignator == LOCAL_SCHEME and str(code.CodeValue).startswith("V"):
        return int(str(code.CodeValue)[1:])
    r = vocabulary.resolve(str(getattr(segment, "SegmentLabel", "")))
    if r.category is None:
        raise SegError(f"segment {segment.SegmentNumber} ({getattr(segment, 'SegmentLabel', '?')}) names no category")
    return r.category.index


def read_seg(seg_file: Path, reference: sitk.Image, vocabulary: Vocabulary) -> np.ndarray:
    """A SEG as an (i, j, k) uint8 label map on the reference image's grid (nearest resampling, so a
    SEG written by another tool on a cropped grid lands where it belongs)."""
    dcm = pydicom.dcmread(str(seg_file))
    result = pydicom_seg.SegmentReader().read(dcm)
    out = np.zeros(reference.GetSize(), np.uint8)
    for number in result.available_segments:
        seg_img = result.segment_image(number)
        on_grid = sitk.Resample(seg_img, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        mask = sitk.GetArrayFromImage(on_grid).transpose(2, 1, 0) > 0
        out[mask] = value_of(result.segment_infos[number], vocabulary)
    return out
