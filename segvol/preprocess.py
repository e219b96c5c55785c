"""SegVol's preprocessing, step for step as the official pipeline does it, and its inverse.

Model space is (d, h, w) = (k, j, i) of the stored array. The "crop" is the
foreground bounding box of the normalised, transposed image at the original
resolution (the zoom-in image); the zoom-out image is the crop resized to the
model's spatial size with nearest-exact sampling.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


class ImageError(ValueError):
    """The image cannot be segmented (wrong dimensionality, NaNs, no foreground)."""


@dataclass(frozen=True)
class Crop:
    """Foreground crop in transposed original coordinates (d, h, w); stop is exclusive."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def start_ijk(self) -> tuple[int, int, int]:
        return self.start[::-1]

    @property
    def stop_ijk(self) -> tuple[int, int, int]:
        return self.stop[::-1]


@dataclass
class PreparedImage:
    """What every prompt on one image needs, computed once."""

    shape_ijk: tuple[int, int, int]
    crop: Crop
    zoom_in: torch.Tensor  # (d, h, w) float32, the normalised crop
    zoom_out: torch.Tensor  # spatial_size float32
    key: str  # content digest


def check_volume(array: np.ndarray) -> None:
    if array.ndim != 3:
        raise ImageError(f"expected a 3D volume, got an array of shape {tuple(array.shape)}")
    if min(array.shape) < 1:
        raise ImageError(f"empty volume of shape {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ImageError(f"expected a real-valued image, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageError(f"the image has {int((~np.isfinite(array)).sum())} NaN or infinite voxels")


def digest(array: np.ndarray) -> str:
    """Content key of an image (shape, dtype and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str((array.shape, array.dtype.str)).encode())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def foreground_normalise(ct: np.ndarray) -> np.ndarray:
    """Clip to the 0.05-99.95 percentiles of the voxels above the mean, then z-score with
    their mean and std (float32, numpy's own reductions, as the official code)."""
    flat = ct.flatten()
    above = flat[flat > np.mean(flat)]
    if above.size == 0:
        raise ImageError("the image is constant: no voxel lies above its mean")
    upper = np.percentile(above, 99.95)
    lower = np.percentile(above, 00.05)
    mean = np.mean(above)
    std = np.std(above)
    return (np.clip(ct, lower, upper) - mean) / max(std, 1e-8)


def foreground_crop(volume: np.ndarray) -> Crop:
    """Bounding box of the voxels > 0, no margin."""
    fg = volume > 0
    nz = [np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    if any(n.size == 0 for n in nz):
        raise ImageError("the image has no foreground (all voxels equal after normalisation)")
    return Crop(tuple(int(n[0]) for n in nz), tuple(int(n[-1]) + 1 for n in nz))


def prepare(image_ijk: np.ndarray, spatial_size: tuple[int, int, int], key: str | None = None) -> PreparedImage:
    """Image as stored (i, j, k) -> normalised crop and zoom-out volume (``key``: its digest, if known)."""
    check_volume(image_ijk)
    key = key or digest(image_ijk)
    x = foreground_normalise(np.asarray(image_ijk, dtype=np.float32))
    x = np.swapaxes(x, 0, 2)  # (i, j, k) -> (d, h, w) = (k, j, i)
    x = x - x.min()
    x = x / np.clip(x.max(), a_min=1e-8, a_max=None)
    # symmetric zero padding to the spatial size never survives the foreground crop,
    # so the crop is taken on the unpadded volume
    crop = foreground_crop(x)
    zoom_in = torch.from_numpy(np.ascontiguousarray(x[tuple(slice(a, b) for a, b in zip(crop.start, crop.stop))]))
    zoom_out = F.interpolate(zoom_in[None, None], size=tuple(spatial_size), mode="nearest-exact")[0, 0]
    return PreparedImage(tuple(image_ijk.shape), crop, zoom_in, zoom_out, key)


def nearest_exact_source(n_in: int, n_out: int) -> np.ndarray:
    """Input index read by each output index of torch's nearest-exact resize."""
    src = torch.arange(n_in, dtype=torch.float64)[None, None]
    return F.interpolate(src, size=n_out, mode="nearest-exact")[0, 0].long().numpy()


def nearest_source(n_in: int, n_out: int) -> np.ndarray:
    """Input index read by each output index of torch's legacy nearest resize."""
    src = torch.arange(n_in, dtype=torch.float64)[None, None]
    return F.interpolate(src, size=n_out, mode="nearest")[0, 0].long().numpy()


def to_image_grid(crop_values: torch.Tensor | np.ndarray, image: PreparedImage, fill: float) -> np.ndarray:
    """Crop-grid (d, h, w) values -> an (i, j, k) array of the image's shape, ``fill`` outside the crop."""
    values = crop_values.cpu().numpy() if isinstance(crop_values, torch.Tensor) else crop_values
    out = np.full(image.shape_ijk, fill, dtype=values.dtype)
    c = image.crop
    out[c.start[2] : c.stop[2], c.start[1] : c.stop[1], c.start[0] : c.stop[0]] = values.transpose(2, 1, 0)
    return out
