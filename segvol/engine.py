"""Zoom-out-zoom-in inference with encodings kept per image (a SAM-style predictor).

``set_image`` preprocesses once; the zoom-out embedding and every zoom-in window
embedding are computed at most once per image, so a further prompt (a click, another
category) costs decoder passes only, plus encoder passes for windows not seen yet.
Several prompts in one ``predict`` call share all encoder passes.

The predictor keeps the images and their encodings; the passes themselves are elsewhere:
``encoding`` (encoder passes, batched), ``decoding`` (decoder passes, batched),
``zoom_out_zoom_in`` (which pass gets what, and how the logits combine).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from segvol.decoding import DecodeJob, Decoder
from segvol.embedding_store import EmbeddingStore
from segvol.encoding import TextEmbeddings, VolumeEncoder
from segvol.encoding_cache import EncodingCache, ImageEncodings
from segvol.labelmap import combine
from segvol.memory import ImageTooLarge, check_fits, memory_guard
from segvol.model import SegVol
from segvol.preprocess import PreparedImage, check_volume, digest, prepare, to_image_grid
from segvol.prompts import NO_BOX, Prompt
from segvol.runtime import Runtime, pick_device
from segvol.zoom_in import Plan, WindowKey, pad_roi, window_grid, window_volume
from segvol.zoom_out_zoom_in import Prediction, ZoomOutZoomIn

log = logging.getLogger(__name__)


class SegVolPredictor:
    """SegVol on one image at a time, with the encodings of recently used images kept (LRU,
    bounded by ``cache_mb``), so going back to an image costs no encoder pass either."""

    def __init__(
        self,
        model: SegVol,
        device: str | torch.device = "auto",
        zoom_in: bool = True,
        overlap: float = 0.5,
        window_batch: int = 4,
        decode_batch: int = 0,
        cache_mb: float = 2048,
        precision: str = "fp32",
        preprocess_on_device: bool = True,
    ) -> None:
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.size = tuple(model.config.spatial_size)
        self.zoom_in = zoom_in
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap {overlap}: expected 0 <= overlap < 1 (0.5 is the official value)")
        self.overlap = overlap
        self.preprocess_on_device = preprocess_on_device
        self.cache = EncodingCache(cache_mb)
        self.runtime = Runtime(self.device, precision)
        self.precision = precision
        self.stats, self.timings = self.runtime.stats, self.runtime.timings  # encoder windows, decoder passes, ...
        self.encoder = VolumeEncoder(self.model, self.runtime, window_batch)
        self.texts = TextEmbeddings(self.model, self.runtime)
        # 0: by device. Batches pay on a GPU (fewer, fuller kernels); on a CPU one pass at a time
        # is faster (measured: 8 passes 2.1 s one by one, 2.7 s as one batch of 8)
        decode_batch = decode_batch if decode_batch > 0 else (8 if self.device.type == "cuda" else 1)
        self.decoder = Decoder(self.model, self.runtime, decode_batch)
        self.store: EmbeddingStore | None = None  # encodings on disk as well (fine-tune rounds set one)
        self._entry: ImageEncodings | None = None  # the current image

    @property
    def window_batch(self) -> int:
        return self.encoder.batch

    @property
    def decode_batch(self) -> int:
        return self.decoder.batch

    # ------------------------------------------------------------------ image
    def set_image(self, image_ijk: np.ndarray, key: str | None = None) -> None:
        """Preprocess an (i, j, k) volume (on the device); encodings are computed lazily and kept.
        ``key``: the volume's content digest where the caller already knows it."""
        t0 = time.perf_counter()
        check_volume(image_ijk, finite=False)  # the NaN scan runs once, in prepare, and only on a cache miss
        check_fits(image_ijk.shape)
        key = key or digest(image_ijk)
        entry = self.cache.get(key)
        if entry is not None:
            self._entry = entry
            self._evict()
            return
        self._entry = None
        self._entry = self.cache.add(key, self._prepare(image_ijk, key))
        self.timings["preprocess"] += time.perf_counter() - t0
        c = self.image.crop
        log.info("image %s: shape %s, crop %s..%s", key[:8], self.image.shape_ijk, c.start_ijk, c.stop_ijk)
        self._evict()

    def zoom_out_logits(self, image_ijk: np.ndarray, names: list[str]) -> list[torch.Tensor]:
        """The zoom-out pass's logits (model space, not upsampled) for each category name, the image
        left out of the encoding cache if it was not there: scoring a whole archive image by image
        must not push out the images annotators are working on."""
        key = digest(image_ijk)
        cached = self.cache.get(key) is not None
        self.set_image(image_ijk, key)
        try:
            embedding = self.zoom_out_embedding()
            with torch.no_grad():
                return [self.model.decode(embedding, self.text_embedding(n)[0], upsample=False) for n in names]
        finally:
            if not cached:
                self.cache.drop(key)
                self._entry = None

    def _prepare(self, image_ijk: np.ndarray, key: str) -> PreparedImage:
        """Preprocessing on the device; a volume too large for the GPU is preprocessed on the CPU
        and its windows moved to the GPU batch by batch."""
        if self.device.type == "cuda" and self.preprocess_on_device:
            try:
                prepared = prepare(image_ijk, self.size, key, self.device)
                self.runtime.sync()
                return prepared
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                log.warning("image %s does not fit %s for preprocessing: using the CPU", key[:8], self.device)
        with memory_guard(f"preprocessing a {'x'.join(map(str, image_ijk.shape))} volume", torch.device("cpu")):
            return prepare(image_ijk, self.size, key, device=None)

    @property
    def image(self) -> PreparedImage | None:
        return self._entry.prepared if self._entry else None

    def reset_image(self) -> None:
        """Forget which image is current (its encodings stay cached until evicted)."""
        self._entry = None

    @property
    def cache_mb(self) -> float:
        return self.cache.max_mb

    @cache_mb.setter
    def cache_mb(self, mb: float) -> None:
        self.cache.max_mb = mb

    def clear_cache(self) -> None:
        self._entry = None
        self.cache.clear()

    def cache_bytes(self) -> int:
        return self.cache.nbytes()

    def _evict(self) -> None:
        self.stats["images_evicted"] += self.cache.evict(self._entry)

    def _require_image(self) -> PreparedImage:
        if self._entry is None:
            raise RuntimeError("no image set: call set_image first")
        return self._entry.prepared

    # ------------------------------------------------------------------ embeddings
    def zoom_out_embedding(self) -> torch.Tensor:
        """The embedding of the whole crop at the model's size (encoded on first use)."""
        image = self._require_image()
        if self._entry.zoom_out is None:
            (self._entry.zoom_out,) = self.encoder.encode_stored([image.zoom_out], ["zoom-out"], self.store, image.key)
            self._evict()
        return self._entry.zoom_out

    def window_embeddings(self, keys: list[WindowKey]) -> list[torch.Tensor]:
        """Embeddings of zoom-in windows, encoding (in batches) only those not cached yet."""
        image = self._require_image()
        windows = self._entry.windows
        missing = list(dict.fromkeys(k for k in keys if k not in windows))
        if missing:
            volumes = [window_volume(image.zoom_in, k, self.size) for k in missing]
            for key, emb in zip(missing, self.encoder.encode_stored(volumes, missing, self.store, image.key)):
                windows[key] = emb
            self._evict()
        return [windows[k] for k in keys]

    def text_embedding(self, name: str) -> tuple[torch.Tensor, list[int]]:
        """The text's embedding (1 x C) and its token ids."""
        return self.texts.get(name)

    def window_grid(self, mask: torch.Tensor) -> Plan | None:
        """Zoom-in windows around a crop-grid mask: the official ROI, padding and window placement."""
        return window_grid(mask, self.size, self.overlap)

    def pad_roi(self, values: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Crop-grid values inside the plan's ROI, zero-padded as the window image is."""
        return pad_roi(values, plan)

    # ------------------------------------------------------------------ prediction
    def predict(self, prompts: list[Prompt], zoom_in: bool | None = None) -> list[Prediction]:
        """Segment one target per prompt. Prompts must be valid for the current image."""
        image = self._require_image()
        zoom_in = self.zoom_in if zoom_in is None else zoom_in
        shape = "x".join(map(str, image.shape_ijk))
        with memory_guard(f"segmenting {len(prompts)} target(s) on a {shape} volume", self.device):
            return ZoomOutZoomIn(self).run(prompts, zoom_in)

    # ------------------------------------------------------------------ outputs
    def logits_on_image(self, target: Prediction, fill: float = -1000.0) -> np.ndarray:
        """Final logits on the (i, j, k) grid; ``fill`` where the model saw nothing (outside the crop)."""
        return to_image_grid(target.logits.numpy(), self._require_image(), fill)

    def mask_on_image(self, target: Prediction) -> np.ndarray:
        """uint8 mask on the (i, j, k) grid: sigmoid(logit) > 0.5, 0 outside the crop."""
        return to_image_grid(target.mask.to(torch.uint8).numpy(), self._require_image(), 0)

    def labelmap_on_image(self, targets: list[Prediction], values: list[int]) -> np.ndarray:
        """One uint8 map on the (i, j, k) grid, ``values[n]`` where target n is foreground (the
        highest logit wins an overlap). Combined on the crop grid: no full-size float array per target."""
        return to_image_grid(combine([t.logits for t in targets], values).numpy(), self._require_image(), 0)


__all__ = ["NO_BOX", "DecodeJob", "ImageTooLarge", "Prediction", "SegVolPredictor", "check_fits", "pick_device"]
