"""Reading volumes and writing masks on the input's own grid (NIfTI and NRRD)."""

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
    kind: str  # "nifti" or "nrrd"
    header: object  # nibabel image or NRRD header dict, to write results on the same grid

    @property
    def affine(self) -> np.ndarray:
        """Voxel (i, j, k) -> RAS millimetres, whatever the file's own convention."""
        if self.kind == "nifti":
            return self.header.affine
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
    raise ImageReadError(f"{path}: unsupported file type (expected .nii, .nii.gz, .nrrd or .nhdr)")


def read_volume(path: str | Path) -> Volume:
    p = Path(path)
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
