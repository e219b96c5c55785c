"""Tiny synthetic DICOM for archive-scale work (scripts/bench_archive.py, tests/test_listing.py):
CT series of two 16x16 slices, each of its own study, and SEGs referencing them, valid enough for
Orthanc to index and for the server to read their metadata. The archive's size is the point, not
the image's."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SegmentationStorage, generate_uid

SIZE = 16  # pixels a side of the synthetic slices: the archive's size is the point, not the image's


def _file(ds: Dataset, sop_class: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = FileDataset(None, ds, file_meta=meta, preamble=b"\0" * 128)
    buf = io.BytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.save_as(buf, write_like_original=False)
    return buf.getvalue()


def ct_series(n: int, slices: int = 2) -> tuple[str, str, list[bytes]]:
    """A tiny CT series of its own study: (study, series, files)."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(n)
    files = []
    for k in range(slices):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName = "CT", f"BENCH{n:05d}", f"Bench^{n:05d}"
        ds.StudyDate, ds.SeriesDate, ds.SeriesNumber, ds.InstanceNumber = "20260101", "20260101", 1, k + 1
        ds.SeriesDescription = f"bench {n}"
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 5.0 * k], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [2.0, 2.0], 5.0
        ds.Rows = ds.Columns = SIZE
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = rng.integers(-1000, 300, (SIZE, SIZE), dtype=np.int16).tobytes()
        files.append(_file(ds, CTImageStorage))
    return study, series, files


def seg_of(study: str, series: str, n: int) -> bytes:
    """A SEG referencing the series: what the server's index reads of it (its metadata) is real."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SegmentationStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.Modality, ds.PatientID = "SEG", f"BENCH{n:05d}"
    ds.SeriesDate, ds.SeriesNumber = "20260102", 100
    ds.SeriesTime = f"{n // 3600 % 24:02d}{n // 60 % 60:02d}{n % 60:02d}"
    ds.SeriesDescription, ds.ContentCreatorName = "bench SegVol", "Bench^Annotator"
    ref = Dataset()
    ref.SeriesInstanceUID = series
    ds.ReferencedSeriesSequence = [ref]
    segment = Dataset()
    segment.SegmentNumber, segment.SegmentLabel, segment.SegmentAlgorithmType = 1, "liver", "MANUAL"
    ds.SegmentSequence = [segment]
    ds.Rows = ds.Columns = SIZE
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = b"\xff" * (SIZE * SIZE // 8)
    return _file(ds, SegmentationStorage)
