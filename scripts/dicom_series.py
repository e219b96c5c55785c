#!/usr/bin/env python3
"""Write a CT volume (NIfTI or NRRD, HU) as a DICOM CT series, one file per slice.

Why: the sample studies must reach the DICOMweb server (Orthanc) on a fresh machine from what
the repository ships. The geometry follows the volume's affine; UIDs are derived from the
name, so the same input always gives the same study (loading twice changes nothing).
Pixel layout: slice k's pixel_array[j, i] = volume[i, j, k], the convention of MONAI Label's
DICOM conversion, so OHIF's and Slicer's voxel indices equal the volume's (i, j, k).

  python scripts/dicom_series.py sample-datastore/lung1.nii.gz build/dicom/lung1 --name lung1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from segvol.io import LPS_RAS, read_volume  # noqa: E402


def write_series(src: Path, out: Path, name: str, description: str = "") -> list[Path]:
    vol = read_volume(src)
    data = np.asarray(vol.array)
    if data.ndim != 3:
        raise SystemExit(f"{src}: expected a 3D volume, got shape {data.shape}")
    lps = LPS_RAS @ vol.affine
    col_dir, row_dir, slice_vec = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    di, dj, dk = (float(np.linalg.norm(v)) for v in (col_dir, row_dir, slice_vec))
    study, series, frame = (
        generate_uid(entropy_srcs=["segvol-label", name, what]) for what in ("study", "series", "for")
    )
    hu = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["segvol-label", name, "slice", str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID = "CT", f"SAMPLE^{name.upper()}", f"SAMPLE-{name.upper()}"
        ds.StudyDescription = description or f"segvol-label sample {name}"
        ds.SeriesDescription = f"{name} axial"
        ds.StudyDate = ds.SeriesDate = "20200101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.AccessionNumber, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = name[:16], "1", 1, k + 1
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "O", ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*(col_dir / di), *(row_dir / dj))]
        ds.PixelSpacing = [f"{dj:.6f}", f"{di:.6f}"]  # row spacing (along j), column spacing (along i)
        ds.SliceThickness = ds.SpacingBetweenSlices = f"{dk:.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = np.ascontiguousarray(hu[:, :, k].T).tobytes()
        path = out / f"CT_{k + 1:04d}.dcm"
        ds.save_as(path, write_like_original=False)
        files.append(path)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("volume", type=Path)
    p.add_argument("out", type=Path, help="folder for the series")
    p.add_argument("--name", required=True, help="case name (also seeds the UIDs)")
    p.add_argument("--description", default="")
    a = p.parse_args(argv)
    files = write_series(a.volume, a.out, a.name, a.description)
    print(f"wrote {len(files)} slices to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
