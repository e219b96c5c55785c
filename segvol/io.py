"""Reading volumes (NIfTI, NRRD, a DICOM series folder) and writing masks on the input's own grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np


class ImageReadError(ValueError):
    """The file is missing or not a volume this tool reads."""


@dataclass
class Volume:
    array: np.ndarray  # (i, j, k) as stored
    path: Path
    kind: str  # "nifti", "nrrd" or "dicom"
    header: object  # nibabel image, NRRD header dict or (DICOM) the RAS affine, to write results on the grid

    @property
    def affine(self) -> np.ndarray:
        """Voxel (i, j, k) -> RAS millimetres, whatever the file's own convention."""
        if self.kind == "nifti":
            return self.header.affine
        if self.kind == "dicom":
            return self.header
        h = self.header
        aff = np.eye(4)
        aff[:3, :3] = np.asarray(h["space directions"], dtype=float).T
        aff[:3, 3] = np.asarray(h.get("space origin", np.zeros(3)), dtype=float)
        space = str(h.get("space", "left-posterior-superior")).lower()
        if space in ("left-posterior-superior", "lps"):
            aff = LPS_RAS @ aff
        elif space not in ("right-anterior-superior", "ras"):
            raise ImageReadError(f"{self.path}: NRRD space {space!r} is not supported (LPS or RAS)")
        return aff


LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    raise ImageReadError(
        f"{path}: unsupported file type (expected .nii, .nii.gz, .nrrd, .nhdr or a DICOM series folder)"
    )


def read_dicom_series(folder: Path) -> Volume:
    """One CT series from a folder of single-frame DICOM files: slices ordered along the slice
    normal, i along a row (IOP's first cosine), j down a column, k across slices, values in HU."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    slices = []
    for f in sorted(x for x in folder.iterdir() if x.is_file()):
        try:
            ds = pydicom.dcmread(f)
        except (InvalidDicomError, OSError):
            continue  # DICOMDIR-less folders hold other files too
        if "PixelData" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            slices.append(ds)
    if not slices:
        raise ImageReadError(f"{folder}: no DICOM image slices with a position and orientation")
    series = {ds.SeriesInstanceUID for ds in slices}
    if len(series) > 1:
        raise ImageReadError(f"{folder}: {len(series)} series in one folder; give the folder of one series")
    iop = np.asarray(slices[0].ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    slices.sort(key=lambda ds: float(normal @ np.asarray(ds.ImagePositionPatient, dtype=float)))
    positions = np.array([ds.ImagePositionPatient for ds in slices], dtype=float)
    if len(slices) > 1:
        gaps = np.diff(positions @ normal)
        if gaps.min() <= 0 or gaps.max() - gaps.min() > 0.01 * gaps.mean():
            raise ImageReadError(
                f"{folder}: slices are not evenly spaced (gaps {gaps.min():.3f} to {gaps.max():.3f} mm); "
                "resample the series first"
            )
        step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        step = normal * float(slices[0].get("SliceThickness", 1.0))
    dj, di = (float(v) for v in slices[0].PixelSpacing)  # row spacing (along j), column spacing (along i)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * di, col * dj, step, positions[0]
    try:
        frames = [
            ds.pixel_array.T * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0)) for ds in slices
        ]
        array = np.stack(frames, axis=2)
    except Exception as e:
        raise ImageReadError(f"{folder}: pixel data cannot be decoded ({type(e).__name__}: {e})") from e
    if np.array_equal(array, np.round(array)) and -32768 <= array.min() and array.max() <= 32767:
        array = array.astype(np.int16)
    else:
        array = array.astype(np.float32)
    return Volume(array, folder, "dicom", LPS_RAS @ lps)


def read_volume(path: str | Path) -> Volume:
    p = Path(path)
    if p.is_dir():
        return read_dicom_series(p)
    if not p.is_file():
        raise ImageReadError(f"{p}: no such file")
    kind = _kind(p)
    try:
        if kind == "nifti":
            img = nib.load(str(p))
            array = np.asanyarray(img.dataobj)
            header: object = img
        else:
            import nrrd

            array, header = nrrd.read(str(p))
    except Exception as e:
        raise ImageReadError(f"{p}: cannot be read ({type(e).__name__}: {e})") from e
    return Volume(np.asarray(array), p, kind, header)


def write_like(reference: Volume, array: np.ndarray, path: str | Path, compress: bool = True) -> Path:
    """Write ``array`` (same shape as the reference) with the reference's grid and affine.
    The format follows the output file name; ``compress`` picks gzip or raw NRRD encoding."""
    p = Path(path)
    if array.shape != reference.array.shape:
        raise ValueError(f"result shape {array.shape} differs from the image shape {reference.array.shape}")
    p.parent.mkdir(parents=True, exist_ok=True)
    if _kind(p) == "nifti":
        header = reference.header.header.copy() if reference.kind == "nifti" else None
        img = nib.Nifti1Image(array, reference.affine, header=header)
        img.header.set_data_dtype(array.dtype)
        img.header.set_slope_inter(1, 0)
        nib.save(img, str(p))
    else:
        import nrrd

        lps = LPS_RAS @ reference.affine
        header = {
            "space": "left-posterior-superior",
            "space directions": lps[:3, :3].T,
            "space origin": lps[:3, 3],
            "encoding": "gzip" if compress else "raw",
        }
        nrrd.write(str(p), array, header)
    return p
