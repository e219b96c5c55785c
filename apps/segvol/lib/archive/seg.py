"""Label maps <-> DICOM SEG that reference their CT series, with SegVol's category codes.

Written with highdicom (which builds the IOD and checks what it writes; every SEG passes
dciodvfy, tests/test_dicomweb.py runs it): one BINARY segment per label, numbered 1..n; each
carries the category name as its label, SNOMED CT codes from the vocabulary where known, the
laterality modifier inside the property type code item (a local "99SEGVOL" code otherwise, never
a borrowed wrong code), its type (AUTOMATIC when the saved voxels are exactly SegVol's,
SEMIAUTOMATIC when a person edited SegVol's result, MANUAL when SegVol never produced that
label for the image) and, unless MANUAL, the Segmentation Algorithm Identification (SegVol, the
model version that made it). The annotator is ContentCreatorName. Every slice is written (no
empty frames dropped), so reading back gives the image grid exactly. Each segment carries its
value's colour (lib/labels/colours.py, the page's) as RecommendedDisplayCIELabValue. The
SeriesDescription tells versions apart in a viewer's list, where only it shows: the annotator, the
time to the second and the short model version, within LO's 64 characters; a pre-annotation draft
starts it with DRAFT_PREFIX (what lib/archive/index.py reads) and says so in its ContentLabel.
SeriesNumber is the seconds since 2020 (UTC), so it grows from version to version.

Read with pydicom-seg, whose reader gives each segment as an image with the SEG's own geometry
(highdicom 0.22, the last release for the pydicom 2 that MONAI Label needs, has no volume
reader): SEGs of other tools on cropped grids land where they belong, and a SEG whose voxels
are not on the CT's is refused.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import highdicom._iods  # noqa: F401 - highdicom imports these two tables (~0.4 s holding the GIL, the
import highdicom._modules  # noqa: F401 - server's event loop stalls) on its first SEG: at start-up instead
import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM

import segvol
from lib.archive.dicom_text import character_set, long_string, person_name
from lib.archive.index import DRAFT_PREFIX
from lib.labels.checks import FIRST_FREE_VALUE
from lib.labels.colours import cielab_dicom, colour
from segvol.vocabulary import Category, Vocabulary

log = logging.getLogger(__name__)

LOCAL_SCHEME = "99SEGVOL"
ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
NOT_CODED = Code("C", LOCAL_SCHEME, "Category not coded")
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")  # CID 7162, algorithm family
SERIES_EPOCH = datetime(2020, 1, 1, tzinfo=UTC)  # SeriesNumber: seconds since, < 2**31 until 2088
CREATOR_BYTES = 20  # of the SeriesDescription's 64: the time and the model version must fit after the name
TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}  # what SpecificCharacterSet applies to


class SegError(ValueError):
    """A label that cannot be stored as a DICOM SEG (empty, wrong grid)."""


@dataclass(frozen=True)
class Segment:
    value: int  # voxel value in our label maps (the /info label index)
    name: str
    category: Category | None
    algorithm: str  # AUTOMATIC, SEMIAUTOMATIC or MANUAL
    model_version: str | None = None  # the SegVol version whose result it is (or was edited from)


def _code(d: dict) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(str(d["CodeValue"]), d["CodingSchemeDesignator"], long_string(d["CodeMeaning"]))


def describe(seg: Segment, number: int, model_version: str) -> hd.seg.SegmentDescription:
    """One segment: label, codes (the laterality modifier inside the type code item, where the
    standard puts it), algorithm type and identification. The name is the client's: it is made a
    valid LO value (lib.archive.dicom_text) for the label and the local code's meaning."""
    name = long_string(seg.name, f"segment {number}")
    snomed = seg.category.snomed if seg.category else None
    if snomed:
        category = _code(snomed["category"]) if snomed.get("category") else ANATOMICAL_STRUCTURE
        prop_type = _code(snomed)
    else:
        category = ANATOMICAL_STRUCTURE if seg.category and seg.category.type != "lesion" else NOT_CODED
        prop_type = hd.sr.CodedConcept(f"V{seg.value}", LOCAL_SCHEME, name)
    algorithm = None
    if seg.algorithm != "MANUAL":
        algorithm = hd.AlgorithmIdentificationSequence(
            name="SegVol", family=ARTIFICIAL_INTELLIGENCE, version=long_string(seg.model_version or model_version)
        )
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name,
        segmented_property_category=category,
        segmented_property_type=prop_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues[seg.algorithm],
        algorithm_identification=algorithm,
        anatomic_regions=[_code(snomed["anatomic_region"])] if snomed and snomed.get("anatomic_region") else None,
    )
    description.SegmentDescription = f"segvol-label value {seg.value}"
    description.RecommendedDisplayCIELabValue = list(cielab_dicom(colour(seg.value)))
    if snomed and snomed.get("modifier"):
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _code(snomed["modifier"])
        ]
    return description


def short_version(model_version: str) -> str:
    """The part of a model version that tells versions apart: a fine-tuned decoder's name
    ("...+v0003" -> "v0003"), else the base's first word ("seeded-untrained (segvol-tiny, seed 0)")."""
    _, plus, decoder = model_version.rpartition("+")
    if plus and decoder.strip():
        return decoder.strip()
    words = model_version.split()
    return words[0] if words else model_version


def _head(text: str, size: int) -> str:
    """``text`` cut to ``size`` UTF-8 bytes at a character boundary."""
    return text.encode("utf-8")[:size].decode("utf-8", "ignore").rstrip()


def series_description(model_version: str, creator: str, when: datetime, draft: bool = False) -> str:
    """What a viewer's series list shows, most distinguishing first within 64 characters: a final
    label "<creator> <YYYY-MM-DD HH:MM:SS> SegVol <short version>" (the name cut to CREATOR_BYTES),
    a draft "DRAFT <time> SegVol <short version>". A final label never starts with DRAFT_PREFIX
    (an annotator called "DRAFT ..." gets "by " before the name): it would be listed as a draft."""
    tail = f"{when:%Y-%m-%d %H:%M:%S} SegVol {short_version(model_version)}"
    if draft:
        return long_string(f"{DRAFT_PREFIX}{tail}")
    name = _head(long_string(creator, "anonymous"), CREATOR_BYTES)
    text = f"{name} {tail}"
    return long_string(f"by {text}" if text.startswith(DRAFT_PREFIX) else text)


def series_number(when: datetime) -> int:
    """Seconds since SERIES_EPOCH: later versions list after earlier ones; a valid IS (< 2**31)."""
    return max(1, min(2**31 - 1, int((when - SERIES_EPOCH).total_seconds())))


def _reference(series_dir: Path) -> tuple[sitk.Image, list[pydicom.Dataset]]:
    """The CT as ITK orders it (slice k of our label maps) and its datasets in that order."""
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(series_dir))
    if not files:
        raise SegError(f"no DICOM series in {series_dir}")
    reader.SetFileNames(files)
    image = reader.Execute()
    return image, [pydicom.dcmread(f) for f in files]


def _texts(dataset: pydicom.Dataset) -> list[str]:
    """Every text value of ``dataset``, inside sequences too."""
    values = []
    for element in dataset.iterall():
        if element.VR in TEXT_VRS and element.value is not None:
            values += [str(v) for v in (element.value if element.VM > 1 else [element.value])]
    return values


def write_seg(
    label_ijk: np.ndarray,
    series_dir: Path,
    segments: list[Segment],
    model_version: str,
    creator: str = "anonymous",
    out: Path | None = None,
    draft: bool = False,
    when: datetime | None = None,
) -> Path:
    """Write a DICOM SEG of ``label_ijk`` (values = Segment.value) over the CT series in ``series_dir``;
    ``creator`` (the annotator) becomes ContentCreatorName; ``draft``: a pre-annotation to correct.
    Client strings (creator, segment names) are made valid DICOM values (lib.archive.dicom_text); the SEG
    says ISO_IR 192 (UTF-8) where any of its text is not ASCII, so it reads back exactly. ``when``
    (default: now, local time) dates the SEG: its series and content date and time, its
    SeriesDescription and SeriesNumber."""
    ref, datasets = _reference(series_dir)
    if tuple(label_ijk.shape) != tuple(ref.GetSize()):
        raise SegError(f"label shape {label_ijk.shape} differs from the image shape {tuple(ref.GetSize())}")
    present = [s for s in segments if (label_ijk == s.value).any()]
    if not present:
        raise SegError("the label is empty: a DICOM SEG needs at least one segment")
    # frames in the datasets' order (slice k), rows = j, columns = i; one plane per segment
    when = (when or datetime.now()).astimezone().replace(microsecond=0)
    frames = np.empty((label_ijk.shape[2], label_ijk.shape[1], label_ijk.shape[0], len(present)), bool)
    for k in range(label_ijk.shape[2]):  # slice by slice: one long copy would hold the GIL (the server's loop)
        for n, s in enumerate(present):
            frames[k, :, :, n] = (label_ijk[:, :, k] == s.value).T
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[describe(s, n, model_version) for n, s in enumerate(present, start=1)],
        series_instance_uid=hd.UID(),
        series_number=series_number(when),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="segvol-label",
        manufacturer_model_name="SegVol",
        software_versions=long_string(f"segvol-label {segvol.__version__}; SegVol {model_version}"),
        device_serial_number="segvol-label",
        content_creator_name=person_name(creator),
        content_label="DRAFT" if draft else "SEGVOL",
        content_description=long_string(f"SegVol {model_version}"),
        series_description=series_description(model_version, creator, when, draft),
        omit_empty_frames=False,
    )
    # the time the description shows, also for lists that sort by series or content time
    seg.SeriesDate = seg.ContentDate = DA(when.date())
    seg.SeriesTime = seg.ContentTime = TM(when.time())
    # highdicom 0.22 sets no SpecificCharacterSet (nor copies the CT's): without one, pydicom writes
    # what Latin-1 cannot hold as '?'. Every text value counts, also the patient's copied from the CT.
    charset = character_set(*_texts(seg))
    if charset:
        seg.SpecificCharacterSet = charset
    if out is None:
        fd, name = tempfile.mkstemp(suffix=".dcm")
        os.close(fd)
        out = Path(name)
    seg.save_as(str(out))
    log.info("DICOM SEG %s by %s: %s", out, creator, ", ".join(f"{s.name}={s.value} ({s.algorithm})" for s in present))
    return out


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
