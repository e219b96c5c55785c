"""Volumes too large for the memory that would process them: refused before a voxel is read
where the size says so, and an allocation that fails anyway reported as the same error."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from segvol.preprocess import ImageError


class ImageTooLarge(ImageError):
    """The volume does not fit the memory of the machine or device that would process it."""


# peak working set of preprocessing on the CPU, per voxel: float32 copy, voxels above the mean,
# their partitioned copy, the clipped output
PREPROCESS_BYTES_PER_VOXEL = 16


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get without swapping (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(shape: tuple[int, ...]) -> None:
    """Refuse, before touching a voxel, a volume whose preprocessing cannot fit in memory: an
    allocation that the kernel grants and cannot back ends in the OOM killer, not an error."""
    need = math.prod(shape) * PREPROCESS_BYTES_PER_VOXEL
    free = available_memory()
    if free is not None and need > free:
        raise ImageTooLarge(
            f"the volume {'x'.join(map(str, shape))} ({math.prod(shape) / 1e6:.0f} M voxels) needs about "
            f"{need / 2**30:.1f} GB to preprocess and this machine has {free / 2**30:.1f} GB available"
        )


@contextmanager
def memory_guard(what: str, device: torch.device) -> Iterator[None]:
    """Turn an allocation failure into ImageTooLarge, naming what failed and what to change."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError | torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise ImageTooLarge(
            f"out of memory on {device} while {what}; use a smaller window_batch / decode_batch / "
            f"cache_mb, or a machine with more memory ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
