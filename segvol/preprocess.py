"""SegVol's preprocessing, step for step as the official pipeline does it, and its inverse.

Model space is (d, h, w) = (k, j, i) of the stored array. The "crop" is the
foreground bounding box of the normalised, transposed image at the original
resolution (the zoom-in image); the zoom-out image is the crop resized to the
model's spatial size with nearest-exact sampling.
"""

from __future__ import annotations

import hashlib
import math
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


def check_volume(array: np.ndarray, finite: bool = True) -> None:
    """Shape and dtype checks (constant time); with ``finite``, also the scan for NaN / inf voxels."""
    if array.ndim != 3:
        raise ImageError(f"expected a 3D volume, got an array of shape {tuple(array.shape)}")
    if min(array.shape) < 1:
        raise ImageError(f"empty volume of shape {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ImageError(f"expected a real-valued image, got dtype {array.dtype}")
    if finite and np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageError(f"the image has {int((~np.isfinite(array)).sum())} NaN or infinite voxels")


def digest(array: np.ndarray) -> str:
    """Content key of an image (shape, dtype and bytes). SHA-256 because CPUs hash it in
    hardware: about 60 ms for a 512x512x200 int16 CT, half of BLAKE2's time."""
    h = hashlib.sha256()
    h.update(str((array.shape, array.dtype.str)).encode())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()[:32]


def foreground_normalise(ct: np.ndarray) -> np.ndarray:
    """Clip to the 0.05-99.95 percentiles of the voxels above the mean, then z-score with
    their mean and std (float32, numpy's own reductions, as the official code)."""
    ct = np.asarray(ct, dtype=np.float32)
    flat = ct.ravel()
    above = flat[flat > np.mean(flat)]
    if above.size == 0:
        raise ImageError("the image is constant: no voxel lies above its mean")
    lower, upper = np.percentile(above, [00.05, 99.95])  # one partition for both, same values
    mean = np.mean(above)
    std = np.std(above)
    out = np.clip(ct, lower, upper)
    out -= mean
    out /= max(std, 1e-8)
    return out


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """numpy's default (linear) percentile, from the two order statistics around q."""
    n = values.numel()
    pos = q / 100 * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    a, b = (torch.kthvalue(values, r + 1).values for r in (lo, hi))
    return a + (b - a) * (pos - lo)


def foreground_normalise_torch(ct: torch.Tensor) -> torch.Tensor:
    """``foreground_normalise`` in torch, for a GPU: the same statistics, equal to float noise
    (numpy is faster on a CPU, so the CPU path keeps it). ``ct``: float32."""
    flat = ct.flatten()
    above = flat[flat > flat.mean()]
    if above.numel() == 0:
        raise ImageError("the image is constant: no voxel lies above its mean")
    lower, upper = percentile(above, 0.05), percentile(above, 99.95)
    return (ct.clamp(lower, upper) - above.mean()) / above.std(correction=0).clamp_min(1e-8)


def foreground_box(volume: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box (start, exclusive stop) of the voxels > 0, no margin."""
    fg = volume > 0
    nz = []
    for ax in range(3):
        later, earlier = (a for a in (2, 1, 0) if a != ax)
        nz.append(torch.nonzero(fg.any(dim=later).any(dim=earlier)).flatten().tolist())
    if any(not n for n in nz):
        raise ImageError("the image has no foreground (all voxels equal after normalisation)")
    return tuple(n[0] for n in nz), tuple(n[-1] + 1 for n in nz)


def zoom_out_volume(zoom_in: torch.Tensor, spatial_size: tuple[int, int, int]) -> torch.Tensor:
    """The crop resized to the model's size with nearest-exact sampling, as an index gather with
    indices computed on the CPU, so every device reads exactly the same voxels."""
    idx = [torch.from_numpy(nearest_exact_source(n, s)).to(zoom_in.device) for n, s in zip(zoom_in.shape, spatial_size)]
    return zoom_in[idx[0]][:, idx[1]][:, :, idx[2]].contiguous()


def as_tensor(image: np.ndarray) -> torch.Tensor:
    """The volume as a tensor in its own dtype where torch takes it (an int16 CT moves to a GPU at
    2 bytes a voxel), else as float32 (big-endian files, unsigned types torch does little with)."""
    if (image.dtype.isnative and image.dtype.kind in "if") or image.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(image))
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))


def prepare(
    image_ijk: np.ndarray,
    spatial_size: tuple[int, int, int],
    key: str | None = None,
    device: str | torch.device | None = None,
) -> PreparedImage:
    """Image as stored (i, j, k) -> normalised crop and zoom-out volume (``key``: its digest, if known).
    ``device`` None: numpy statistics on the CPU (the fastest there); else torch on that device,
    where the crop then stays."""
    check_volume(image_ijk)
    key = key or digest(image_ijk)
    if device is None:
        x = torch.from_numpy(foreground_normalise(np.asarray(image_ijk, dtype=np.float32)))
    else:
        x = foreground_normalise_torch(as_tensor(image_ijk).to(device).float())
    x = x - x.min()
    x = x / x.max().clamp_min(1e-8)
    # symmetric zero padding to the spatial size never survives the foreground crop, so the
    # crop is taken on the unpadded volume; found in (i, j, k) order, where x is contiguous
    start, stop = foreground_box(x)
    crop = Crop(start[::-1], stop[::-1])
    inner = x[tuple(slice(a, b) for a, b in zip(start, stop))]
    zoom_in = inner.permute(2, 1, 0).contiguous()  # (i, j, k) -> (d, h, w) = (k, j, i)
    return PreparedImage(tuple(image_ijk.shape), crop, zoom_in, zoom_out_volume(zoom_in, spatial_size), key)


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
