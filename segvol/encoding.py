"""The encoder passes: volumes through the image encoder in batches, texts through the text encoder.

These are the passes worth saving. The predictor decides which volumes need an embedding (the
zoom-out volume, zoom-in windows not cached yet); this module computes them as cheaply as it can:
``batch`` volumes per pass, read from an on-disk ``EmbeddingStore`` where the caller has one, and
text embeddings kept in a bounded LRU (texts come from clients, so distinct texts cannot grow it).
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch

from segvol.embedding_store import EmbeddingStore
from segvol.model import SegVol
from segvol.runtime import Runtime

TEXT_CACHE_ENTRIES = 512  # text embeddings kept (a few KB each)


class VolumeEncoder:
    """Model-size volumes (the zoom-out volume, zoom-in windows) to image embeddings, ``batch`` at a time."""

    def __init__(self, model: SegVol, runtime: Runtime, batch: int = 4) -> None:
        self.model = model
        self.runtime = runtime
        self.batch = max(1, batch)

    @torch.no_grad()
    def encode(self, volumes: list[torch.Tensor]) -> list[torch.Tensor]:
        """One 1 x C x d x h x w embedding per volume."""
        rt = self.runtime
        out = []
        t0 = time.perf_counter()
        for i in range(0, len(volumes), self.batch):
            batch = torch.stack(volumes[i : i + self.batch])[:, None].to(rt.device)
            with rt.autocast():
                emb = self.model.encode_image(batch).float()
            out.extend(emb[j : j + 1] for j in range(emb.shape[0]))
            rt.stats["encoder_windows"] += batch.shape[0]
        rt.sync()
        rt.timings["encode"] += time.perf_counter() - t0
        return out

    def encode_stored(
        self, volumes: list[torch.Tensor], names: list[object], store: EmbeddingStore | None, image_key: str
    ) -> list[torch.Tensor]:
        """``encode``, reading and writing ``store`` (under the image's key and each volume's name)
        where there is one."""
        if store is None:
            return self.encode(volumes)
        out = [store.get(image_key, name) for name in names]
        missing = [i for i, emb in enumerate(out) if emb is None]
        for i, emb in zip(missing, self.encode([volumes[i] for i in missing])):
            store.put(image_key, names[i], emb)
            out[i] = emb
        return [emb.to(self.runtime.device) for emb in out]


class TextEmbeddings:
    """Category texts to (embedding, token ids), the most recently used ``max_entries`` kept."""

    def __init__(self, model: SegVol, runtime: Runtime, max_entries: int = TEXT_CACHE_ENTRIES) -> None:
        self.model = model
        self.runtime = runtime
        self.max_entries = max_entries
        self._cache: OrderedDict[str, tuple[torch.Tensor, list[int]]] = OrderedDict()

    def names(self) -> list[str]:
        """The texts kept, least recently used first."""
        return list(self._cache)

    @torch.no_grad()
    def get(self, name: str) -> tuple[torch.Tensor, list[int]]:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        t0 = time.perf_counter()
        ids = self.model.text_encoder.tokenize([name])["input_ids"][0].tolist()
        self._cache[name] = (self.model.encode_text([name]), ids)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        self.runtime.timings["text"] += time.perf_counter() - t0
        return self._cache[name]
