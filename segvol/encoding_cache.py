"""Images recently used and their encodings: the zoom-out embedding and every zoom-in window
encoded so far, so going back to an image, or a further prompt on it, costs no encoder pass.
An LRU bounded in megabytes that never drops the image in use."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from segvol.preprocess import PreparedImage
from segvol.zoom_in import WindowKey

log = logging.getLogger(__name__)


@dataclass
class ImageEncodings:
    """What is kept for one image: its preprocessing and every encoding computed so far."""

    prepared: PreparedImage
    zoom_out: torch.Tensor | None = None
    windows: dict[WindowKey, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        tensors = [self.prepared.zoom_in, self.prepared.zoom_out, self.zoom_out, *self.windows.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class EncodingCache:
    def __init__(self, max_mb: float) -> None:
        self.max_mb = max_mb
        self._images: OrderedDict[str, ImageEncodings] = OrderedDict()

    def get(self, key: str) -> ImageEncodings | None:
        """The image's encodings, now the most recently used (None if not kept)."""
        entry = self._images.get(key)
        if entry is not None:
            self._images.move_to_end(key)
        return entry

    def add(self, key: str, prepared: PreparedImage) -> ImageEncodings:
        entry = self._images[key] = ImageEncodings(prepared)
        return entry

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self._images.values())

    def evict(self, current: ImageEncodings | None) -> int:
        """Drop the least recently used images until the cache fits ``max_mb``, never ``current``;
        returns how many went."""
        dropped = 0
        while self.nbytes() > self.max_mb * 2**20 and len(self._images) > 1:
            key, entry = next(iter(self._images.items()))
            if entry is current:
                break
            del self._images[key]
            dropped += 1
            log.info("cache: evicted image %s (%.0f MB kept)", key[:8], self.nbytes() / 2**20)
        return dropped

    def drop(self, key: str) -> None:
        self._images.pop(key, None)

    def clear(self) -> None:
        self._images.clear()
