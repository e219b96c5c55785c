"""Image encodings kept on disk, keyed by the image's content, the encoder's weights and the window.

Why: a fine-tune round runs in a fresh process and trains the decoder only, so the image encoder
gives the same encodings round after round; encoding the views was most of a round's time. A
store under the versions folder lets every later round (and any process) reuse them. The key
holds a digest of the encoder's weights and the precision, so a different encoder never reads
another's encodings. Bounded by ``max_mb``: the least recently used files go first.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


def encoder_digest(model: torch.nn.Module, precision: str = "fp32") -> str:
    """A digest of the image encoder's weights (and the precision its encodings are computed in)."""
    h = hashlib.sha256(precision.encode())
    for name, tensor in sorted(model.image_encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EmbeddingStore:
    def __init__(self, folder: Path, encoder_key: str, max_mb: float = 4096) -> None:
        self.root = Path(folder) / encoder_key[:24]
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_mb * 2**20
        self.hits = 0
        self.misses = 0

    def _path(self, image_key: str, window: object) -> Path:
        name = hashlib.sha256(repr(window).encode()).hexdigest()[:24]
        return self.root / image_key[:32] / f"{name}.safetensors"

    def get(self, image_key: str, window: object) -> torch.Tensor | None:
        path = self._path(image_key, window)
        try:
            tensor = load_file(str(path))["embedding"]
        except (FileNotFoundError, OSError, KeyError, RuntimeError):  # absent, or left half-written
            self.misses += 1
            return None
        os.utime(path)  # recently used
        self.hits += 1
        return tensor

    def put(self, image_key: str, window: object, tensor: torch.Tensor) -> None:
        path = self._path(image_key, window)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file({"embedding": tensor.detach().cpu().contiguous()}, str(tmp))
            os.replace(tmp, path)
        except OSError as e:  # a full disk costs a re-encoding next time, nothing else
            tmp.unlink(missing_ok=True)
            log.warning("encoding not kept on disk (%s)", e)
            return
        self._trim()

    def _trim(self) -> None:
        files = []
        for path in self.root.glob("*/*.safetensors"):
            try:
                st = path.stat()
            except FileNotFoundError:  # trimmed meanwhile by another process of a torchrun round
                continue
            files.append((st.st_mtime, st.st_size, path))
        files.sort()
        total = sum(size for _, size, _ in files)
        while files and total > self.max_bytes:
            _, size, oldest = files.pop(0)
            total -= size
            oldest.unlink(missing_ok=True)
