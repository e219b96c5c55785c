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
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk

from lib.identity import person_name
from lib.params import FIRST_FREE_VALUE
from segvol.vocabulary import Category, Vocabulary

log = logging.getLogger(__name__)

LOCAL_SCHEME = "99SEGVOL"
ANATOMICAL_STRUCTURE = {
    "CodeValue": "123037004",
    "CodingSchemeDesignator": "SCT",
    "CodeMeaning": "Anatomical Structure",
}
ARTIFICIAL_INTELLIGENCE = ("123110", "DCM", "Artificial Intelligence")  # CID 7162, algorithm family


class SegError(ValueError):
    """A label that cannot be stored as a DICOM SEG (empty, wrong grid)."""


@dataclass(frozen=True)
class Segment:
    value: int  # voxel value in our label maps (the /info label index)
    name: str
    category: Category | None
    algorithm: str  # AUTOMATIC, SEMIAUTOMATIC or MANUAL
    model_version: str | None = None  # the SegVol version whose result it is (or was edited from)


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
    label_ijk: np.ndarray,
    series_dir: Path,
    segments: list[Segment],
    model_version: str,
    creator: str = "anonymous",
    out: Path | None = None,
) -> Path:
    """Write a DICOM SEG of ``label_ijk`` (values = Segment.value) over the CT series in ``series_dir``;
    ``creator`` (the annotator) becomes ContentCreatorName."""
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
            "ContentCreatorName": person_name(creator),
            "ClinicalTrialSeriesID": "segvol-label",
            "ClinicalTrialTimePointID": "1",
            "SeriesDescription": f"SegVol {model_version} by {creator}"[:64],
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
    dcm.SoftwareVersions = f"segvol-label; SegVol {model_version}"[:64]
    for item, s in zip(dcm.SegmentSequence, present):
        if s.algorithm != "MANUAL":
            item.SegmentationAlgorithmIdentificationSequence = [_algorithm(s.model_version or model_version)]
    if out is None:
        fd, name = tempfile.mkstemp(suffix=".dcm")
        os.close(fd)
        out = Path(name)
    dcm.save_as(str(out))
    log.info("DICOM SEG %s by %s: %s", out, creator, ", ".join(f"{s.name}={s.value} ({s.algorithm})" for s in present))
    return out


def _algorithm(version: str) -> pydicom.Dataset:
    """Segmentation Algorithm Identification: SegVol and the model version that made the segment."""
    family = pydicom.Dataset()
    family.CodeValue, family.CodingSchemeDesignator, family.CodeMeaning = ARTIFICIAL_INTELLIGENCE
    item = pydicom.Dataset()
    item.AlgorithmFamilyCodeSequence = [family]
    item.AlgorithmName = "SegVol"
    item.AlgorithmVersion = version[:64]
    return item


def value_of(segment: pydicom.Dataset, vocabulary: Vocabulary) -> int | None:
    """Our voxel value for a SEG segment (None: it names nothing SegVol knows). In this order: our
    local code; the coded anatomy (SegmentedPropertyTypeCodeSequence and its laterality modifier,
    inside the code item as the standard puts it, or beside it as some writers do); the label."""
    code = segment.SegmentedPropertyTypeCodeSequence[0]
    if code.CodingSchemeDesignator == LOCAL_SCHEME and str(code.CodeValue).startswith("V"):
        return int(str(code.CodeValue)[1:])
    modifiers = code.get("SegmentedPropertyTypeModifierCodeSequence") or segment.get(
        "SegmentedPropertyTypeModifierCodeSequence"
    )
    modifier = str(modifiers[0].CodeValue) if modifiers else None
    category = vocabulary.by_coded_concept(str(code.CodingSchemeDesignator), str(code.CodeValue), modifier)
    if category is None:
        category = vocabulary.resolve(str(getattr(segment, "SegmentLabel", ""))).category
    return category.index if category is not None else None


def _check_on_grid(image: sitk.Image, reference: sitk.Image, what: str, tolerance: float = 0.1) -> None:
    """A segment's voxels must sit on the CT's voxels: every corner and step of its grid maps to a
    whole voxel index of the CT, inside it. A cropped grid passes; frames between or beyond the
    CT's slices, or a rotated grid, do not (resampling would place them silently)."""
    size = image.GetSize()
    corners = [(i, j, k) for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    steps = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    for index in corners + [tuple(min(s, n - 1) for s, n in zip(step, size)) for step in steps]:
        point = image.TransformIndexToPhysicalPoint(index)
        at = np.array(reference.TransformPhysicalPointToContinuousIndex(point))
        if np.abs(at - np.round(at)).max() > tolerance:
            raise SegError(f"{what}: voxel {index} falls between the CT's voxels (at {np.round(at, 2).tolist()})")
        if (at < -tolerance).any() or (at > np.array(reference.GetSize()) - 1 + tolerance).any():
            raise SegError(f"{what}: voxel {index} lies outside the CT (at {np.round(at, 2).tolist()})")


def _code_text(segment: pydicom.Dataset) -> str:
    code = segment.SegmentedPropertyTypeCodeSequence[0]
    return f"{code.CodingSchemeDesignator} {code.CodeValue} {getattr(code, 'CodeMeaning', '')!r}"


def read_seg(seg_file: Path, reference: sitk.Image, vocabulary: Vocabulary) -> tuple[np.ndarray, dict[int, str]]:
    """A SEG as an (i, j, k) uint8 label map on the reference image's grid (nearest resampling, so a
    SEG written by another tool on a cropped grid lands where it belongs), and value -> segment
    label. Segments that name no category get free values from 224 on."""
    dcm = pydicom.dcmread(str(seg_file))
    result = pydicom_seg.SegmentReader().read(dcm)
    out = np.zeros(reference.GetSize(), np.uint8)
    names: dict[int, str] = {}
    free = iter(range(FIRST_FREE_VALUE, 256))
    for number in result.available_segments:
        info = result.segment_infos[number]
        label = str(getattr(info, "SegmentLabel", f"segment {number}"))
        value = value_of(info, vocabulary)
        if value is None:
            value = next(free, None)
            if value is None:
                raise SegError(f"{seg_file}: too many segments that name no category")
            log.warning(
                "%s: segment %d (%s, code %s) names no SegVol category: value %d, not trained on",
                seg_file,
                number,
                label,
                _code_text(info),
                value,
            )
        seg_img = result.segment_image(number)
        _check_on_grid(seg_img, reference, f"{seg_file}: segment {number} ({label})")
        on_grid = sitk.Resample(seg_img, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        mask = sitk.GetArrayFromImage(on_grid).transpose(2, 1, 0) > 0
        out[mask] = value
        names[value] = label
    return out, names
