"""A team's server for the tests: three small phantom CTs in a local folder datastore, the seeded
tiny model, and leases short enough that a test can wait one out."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from conftest import phantom

IMAGES = ("abdo1", "abdo2", "abdo3")
LEASE_MINUTES = 0.1  # 6 s, so a test can wait one out
CONF = {"weights": "seeded", "model_config": "segvol-tiny", "zoom_in": "false", "lease_minutes": str(LEASE_MINUTES)}


def studies(folder: Path) -> Path:
    """The IMAGES as NIfTI CTs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(IMAGES):
        nib.save(
            nib.Nifti1Image(phantom((48, 40, 12), seed=n), np.diag([2.0, 2.0, 5.0, 1.0])),
            str(folder / f"{name}.nii.gz"),
        )
    return folder
