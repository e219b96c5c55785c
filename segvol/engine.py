"""Zoom-out-zoom-in inference with encodings kept per image (a SAM-style predictor).

``set_image`` preprocesses once; the zoom-out embedding and every zoom-in window
embedding are computed at most once per image, so a further prompt (a click, another
category) costs decoder passes only, plus encoder passes for windows not seen yet.
Several prompts in one ``predict`` call share all encoder passes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segvol.embedding_store import EmbeddingStore
from segvol.encoding_cache import EncodingCache, ImageEncodings
from segvol.labelmap import combine
from segvol.memory import ImageTooLarge, check_fits, memory_guard
from segvol.model import SegVol
from segvol.preprocess import PreparedImage, check_volume, digest, prepare, to_image_grid
from segvol.prompts import NO_BOX, Prompt, box_to_model, points_to_model
from segvol.trace import ModelSpace, Trace, WindowTrace, ZoomInTrace
from segvol.zoom_in import Plan, WindowKey, pad_roi, paste, plan_prompt, window_grid, window_volume

log = logging.getLogger(__name__)
TEXT_CACHE_ENTRIES = 512  # text embeddings kept (a few KB each)

# fp32 is the faithful default; bf16 / fp16 are opt-in approximations (their measured effect is in README)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return device


@dataclass
class Prediction:
    """The answer to one prompt: final logits on the crop grid and what the model saw (its trace)."""

    prompt: Prompt
    logits: torch.Tensor  # (d, h, w) float32, crop grid, CPU
    trace: Trace

    @property
    def mask(self) -> torch.Tensor:
        """The official threshold: sigmoid(logit) > 0.5 (not logit > 0: float32 sigmoid rounds
        logits below about 3e-8 to exactly 0.5)."""
        return torch.sigmoid(self.logits) > 0.5


@dataclass
class DecodeJob:
    """One decoder pass: an embedding and the prompts fed with it (model-space voxels)."""

    embedding: torch.Tensor  # 1 x C x d x h x w
    text: torch.Tensor | None  # 1 x C
    box: tuple | None
    points: list
    labels: list

    @property
    def signature(self) -> tuple:
        """Jobs with equal signatures have the same token layout and can share one batched pass."""
        return self.text is None, self.box is None, len(self.points)


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
        self.window_batch = max(1, window_batch)
        # 0: by device. Batches pay on a GPU (fewer, fuller kernels); on a CPU one pass at a time
        # is faster (measured: 8 passes 2.1 s one by one, 2.7 s as one batch of 8)
        self.decode_batch = decode_batch if decode_batch > 0 else (8 if self.device.type == "cuda" else 1)
        self.preprocess_on_device = preprocess_on_device
        self.cache = EncodingCache(cache_mb)
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.precision = precision
        self._entry: ImageEncodings | None = None  # the current image
        self.stats: dict[str, int] = defaultdict(int)  # encoder passes, decoder passes, ...
        self.timings: dict[str, float] = defaultdict(float)
        # texts come from clients: an LRU, so distinct texts cannot grow it without bound
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, list[int]]] = OrderedDict()
        self.store: EmbeddingStore | None = None  # encodings on disk as well (fine-tune rounds set one)
        self.reset_image()

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

    def _prepare(self, image_ijk: np.ndarray, key: str) -> PreparedImage:
        """Preprocessing on the device; a volume too large for the GPU is preprocessed on the CPU
        and its windows moved to the GPU batch by batch."""
        if self.device.type == "cuda" and self.preprocess_on_device:
            try:
                prepared = prepare(image_ijk, self.size, key, self.device)
                self._sync()
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

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def _encode(self, volumes: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        t0 = time.perf_counter()
        for i in range(0, len(volumes), self.window_batch):
            batch = torch.stack(volumes[i : i + self.window_batch])[:, None].to(self.device)
            with self._autocast():
                emb = self.model.encode_image(batch).float()
            out.extend(emb[j : j + 1] for j in range(emb.shape[0]))
            self.stats["encoder_windows"] += batch.shape[0]
        self._sync()
        self.timings["encode"] += time.perf_counter() - t0
        return out

    def zoom_out_embedding(self) -> torch.Tensor:
        image = self._require_image()
        if self._entry.zoom_out is None:
            (self._entry.zoom_out,) = self._encode_stored([image.zoom_out], ["zoom-out"])
            self._evict()
        return self._entry.zoom_out

    def _encode_stored(self, volumes: list[torch.Tensor], names: list[object]) -> list[torch.Tensor]:
        """``_encode``, reading and writing ``store`` where there is one."""
        if self.store is None:
            return self._encode(volumes)
        key = self._require_image().key
        out = [self.store.get(key, name) for name in names]
        missing = [i for i, emb in enumerate(out) if emb is None]
        for i, emb in zip(missing, self._encode([volumes[i] for i in missing])):
            self.store.put(key, names[i], emb)
            out[i] = emb
        return [emb.to(self.device) for emb in out]

    @torch.no_grad()
    def text_embedding(self, name: str) -> tuple[torch.Tensor, list[int]]:
        if name in self._text_cache:
            self._text_cache.move_to_end(name)
            return self._text_cache[name]
        t0 = time.perf_counter()
        ids = self.model.text_encoder.tokenize([name])["input_ids"][0].tolist()
        self._text_cache[name] = (self.model.encode_text([name]), ids)
        while len(self._text_cache) > TEXT_CACHE_ENTRIES:
            self._text_cache.popitem(last=False)
        self.timings["text"] += time.perf_counter() - t0
        return self._text_cache[name]

    # ------------------------------------------------------------------ decoding
    def _decode_all(self, jobs: list[DecodeJob]) -> Iterator[tuple[int, torch.Tensor]]:
        """(job index, D x H x W logits) for every job. Jobs with the same token layout are decoded
        together, ``decode_batch`` at a time: several categories on the zoom-out embedding, the
        windows of one or many targets."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.signature].append(i)
        for idx in groups.values():
            for n in range(0, len(idx), self.decode_batch):
                chunk = idx[n : n + self.decode_batch]
                yield from zip(chunk, self._decode([jobs[i] for i in chunk]))

    @torch.no_grad()
    def _decode(self, jobs: list[DecodeJob]) -> torch.Tensor:
        t0 = time.perf_counter()
        first = jobs[0]
        if all(j.embedding is first.embedding for j in jobs):
            embedding = first.embedding  # the decoder broadcasts one embedding over the batch
        else:
            embedding = torch.cat([j.embedding for j in jobs])
        text = torch.cat([j.text for j in jobs]) if first.text is not None else None
        f32 = dict(dtype=torch.float32, device=self.device)
        boxes = torch.tensor([j.box for j in jobs], **f32) if first.box is not None else None
        points = None
        if first.points:
            points = torch.tensor([j.points for j in jobs], **f32), torch.tensor([j.labels for j in jobs], **f32)
        with self._autocast():
            logits = self.model.decode(embedding, text, boxes, points).float()
        self.stats["decoder_passes"] += len(jobs)
        self.stats["decoder_calls"] += 1
        self._sync()
        self.timings["decode"] += time.perf_counter() - t0
        return logits[:, 0]

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def window_grid(self, mask: torch.Tensor) -> Plan | None:
        """Zoom-in windows around a crop-grid mask: the official ROI, padding and window placement."""
        return window_grid(mask, self.size, self.overlap)

    def pad_roi(self, values: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Crop-grid values inside the plan's ROI, zero-padded as the window image is."""
        return pad_roi(values, plan)

    def window_embeddings(self, keys: list[WindowKey]) -> list[torch.Tensor]:
        """Embeddings of zoom-in windows, encoding (in batches) only those not cached yet."""
        self._require_image()
        windows = self._entry.windows
        missing = list(dict.fromkeys(k for k in keys if k not in windows))
        if missing:
            volumes = [window_volume(self._entry.prepared.zoom_in, k, self.size) for k in missing]
            for key, emb in zip(missing, self._encode_stored(volumes, missing)):
                windows[key] = emb
            self._evict()
        return [windows[k] for k in keys]

    def predict(self, prompts: list[Prompt], zoom_in: bool | None = None) -> list[Prediction]:
        """Segment one target per prompt. Prompts must be valid for the current image."""
        image = self._require_image()
        zoom_in = self.zoom_in if zoom_in is None else zoom_in
        shape = "x".join(map(str, image.shape_ijk))
        with memory_guard(f"segmenting {len(prompts)} target(s) on a {shape} volume", self.device):
            return self._predict(prompts, zoom_in)

    def _predict(self, prompts: list[Prompt], zoom_in: bool) -> list[Prediction]:
        image = self._require_image()
        embedding = self.zoom_out_embedding()
        crop = image.crop
        jobs, traces, texts, boxes = [], [], [], []
        for prompt in prompts:
            space = ModelSpace()
            text_emb = None
            if prompt.text is not None:
                text_emb, ids = self.text_embedding(prompt.text)
                space.text, space.token_ids = prompt.text, ids
            model_box = box_to_model(prompt.box, crop, self.size) if prompt.box is not None else None
            model_points = points_to_model(prompt.points, crop, self.size) if prompt.points else []
            space.box_dhw = model_box and list(model_box)
            space.points_dhw = [list(p) for p in model_points] or None
            space.point_labels = list(prompt.point_labels) or None
            jobs.append(DecodeJob(embedding, text_emb, model_box, model_points, list(prompt.point_labels)))
            traces.append(Trace(crop, space))
            texts.append(text_emb)
            boxes.append(model_box)
        # zoom-out: all prompts, batched where their token layouts agree; kept at model resolution
        # (8 MB each) and brought to the crop grid only while a target is planned or finished
        lows: list[torch.Tensor] = [None] * len(prompts)
        for i, low in self._decode_all(jobs):
            lows[i] = low
        plans = [
            plan_prompt(p, torch.sigmoid(self._coarse(low)) > 0.5, crop, self.size, self.overlap, box)
            if zoom_in
            else None
            for p, low, box in zip(prompts, lows, boxes)
        ]
        # zoom-in: encode every window not cached yet, then decode every window of every target
        self.window_embeddings([w.key for plan in plans if plan for w in plan.windows])
        window_jobs, owners = [], []
        for t, plan in enumerate(plans):
            for win in plan.windows if plan else []:
                window_jobs.append(DecodeJob(self._entry.windows[win.key], texts[t], win.box, win.points, win.labels))
                owners.append((t, win))
        done = [
            self._finish(p, low, None, trace) if plan is None else None
            for p, low, plan, trace in zip(prompts, lows, plans, traces)
        ]
        left = {t: len(plan.windows) for t, plan in enumerate(plans) if plan}
        sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for j, logits in self._decode_all(window_jobs):
            t, win = owners[j]
            if t not in sums:
                sums[t] = tuple(torch.zeros(plans[t].padded, device=self.device) for _ in range(2))
            total, count = sums[t]
            sl = tuple(slice(s, s + w) for s, w in zip(win.start, self.size))
            total[sl] += logits
            count[sl] += 1.0
            left[t] -= 1
            if not left[t]:  # finish a target as soon as its last window is in, and free its sums
                done[t] = self._finish(prompts[t], lows[t], plans[t], traces[t], sums.pop(t))
        return done

    def _coarse(self, low: torch.Tensor) -> torch.Tensor:
        """Zoom-out logits on the crop grid (nearest, as the official code resizes them back)."""
        return F.interpolate(low[None, None], size=self._require_image().crop.shape, mode="nearest")[0, 0]

    def _finish(self, prompt: Prompt, low: torch.Tensor, plan: Plan | None, trace: Trace, sums=None) -> Prediction:
        """Overlap-averaged window logits pasted into the coarse logits over the ROI."""
        final = self._coarse(low)
        if plan is None:
            return Prediction(prompt, final.cpu(), trace)
        paste(final, plan, *sums)
        trace.zoom_in = ZoomInTrace(
            [list(r) for r in plan.roi],
            list(plan.pad),
            list(plan.padded),
            [
                WindowTrace(
                    [[s, s + w] for s, w in zip(win.start, self.size)],
                    list(win.box) if win.box is not None else None,
                    [list(p) for p in win.points] or None,
                )
                for win in plan.windows
            ],
        )
        return Prediction(prompt, final.cpu(), trace)

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
