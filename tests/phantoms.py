"""Phantom CTs with liver labels in a local folder datastore, for the fine-tune round tests."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from phantom import make_phantom  # noqa: E402

# phantom liver -> "liver" (1). One category: the tiny random model (64 wide, random CLIP) does not
# learn to tell two categories apart by text within a CI-sized round (measured: Dice 0.05 -> 0.07).
VOCAB_VALUE = {1: 1}


def write_phantoms(folder: Path, n: int, labelled: bool = True) -> list[str]:
    """n phantom CTs (80 x 72 x 20) with liver labels in the app's values."""
    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    ids = []
    for seed in range(n):
        image, label, affine = make_phantom((80, 72, 20), (1.5, 1.5, 5.0), seed=seed)
        name = f"phantom{seed}"
        nib.save(nib.Nifti1Image(image, affine), str(folder / f"{name}.nii.gz"))
        if labelled:
            mapped = np.zeros(label.shape, np.uint8)
            for src, dst in VOCAB_VALUE.items():
                mapped[label == src] = dst
            nib.save(nib.Nifti1Image(mapped, affine), str(folder / "labels" / "final" / f"{name}.nii.gz"))
        ids.append(name)
    return ids
