"""Zoom-out-zoom-in inference with encodings kept per image (a SAM-style predictor).

``set_image`` preprocesses once; the zoom-out embedding and every zoom-in window
embedding are computed at most once per image, so a further prompt (a click, another
category) costs decoder passes only, plus encoder passes for windows not seen yet.
Several prompts in one ``predict`` call share all encoder passes.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from segvol.embedding_store import EmbeddingStore
from segvol.labelmap import combine
from segvol.model import SegVol
from segvol.preprocess import ImageError, PreparedImage, check_volume, digest, prepare, to_image_grid
from segvol.prompts import (
    NO_BOX,
    Prompt,
    box_to_model,
    mask_box,
    model_box_on_crop,
    points_to_crop,
    points_to_model,
)

log = logging.getLogger(__name__)
TEXT_CACHE_ENTRIES = 512  # text embeddings kept (a few KB each)

WindowKey = tuple[tuple[int, int, int], ...]
# fp32 is the faithful default; bf16 / fp16 are opt-in approximations (their measured effect is in README)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return device


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


@dataclass
class Window:
    """One sliding-window position: where it sits in the padded ROI and what it contains."""

    start: tuple[int, int, int]  # in the padded ROI
    key: WindowKey  # per axis (crop from, crop to, offset in window): identifies the content
    box: tuple[int, ...] | None = None
    points: list[tuple[int, int, int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


@dataclass
class Plan:
    """Zoom-in plan of one target."""

    roi: tuple[tuple[int, int], ...]  # slices of the crop grid
    pad: tuple[int, int, int]  # zero padding before, per axis (after = the rest)
    padded: tuple[int, int, int]
    windows: list[Window]


@dataclass
class Target:
    """Result of one prompt: final logits on the crop grid and a record of what the model saw."""

    prompt: Prompt
    logits: torch.Tensor  # (d, h, w) float32, crop grid, CPU
    trace: dict

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


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window starts along one (padded) axis, as MONAI's dense patch slicing places them."""
    interval = window if window == size else max(int(window * (1 - overlap)), 1)
    starts = []
    for idx in range(math.ceil(size / interval)):
        s = idx * interval
        starts.append(s - max(s + window - size, 0))
        if s + window >= size:
            break
    return starts


def roi_from_mask(mask: torch.Tensor, window: tuple[int, int, int]) -> tuple[tuple[int, int], ...] | None:
    """ROI slices around the coarse mask, widened towards the window size as the official code does
    (including its upper clamp to the size, so an odd shortfall leaves the ROI one voxel short)."""
    nz = torch.nonzero(mask)
    if nz.shape[0] == 0:
        return None
    roi = []
    for ax in range(3):
        lo, hi = int(nz[:, ax].min()), int(nz[:, ax].max())
        half = max(0, window[ax] - (hi - lo + 1)) // 2
        lo, hi = max(0, lo - half), min(mask.shape[ax], hi + half)
        roi.append((lo, min(hi + 1, mask.shape[ax])))
    return tuple(roi)


@dataclass
class ImageCache:
    """What is kept for one image: its preprocessing and every encoding computed so far."""

    prepared: PreparedImage
    zoom_out: torch.Tensor | None = None
    windows: dict[WindowKey, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        tensors = [self.prepared.zoom_in, self.prepared.zoom_out, self.zoom_out, *self.windows.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


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
        self.cache_mb = cache_mb
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.precision = precision
        self._cache: OrderedDict[str, ImageCache] = OrderedDict()
        self._entry: ImageCache | None = None
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
        if key in self._cache:
            self._cache.move_to_end(key)
            self._entry = self._cache[key]
            self._evict()
            return
        self._entry = None
        self._entry = self._cache[key] = ImageCache(self._prepare(image_ijk, key))
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

    def clear_cache(self) -> None:
        self._entry = None
        self._cache.clear()

    def cache_bytes(self) -> int:
        return sum(e.nbytes() for e in self._cache.values())

    def _evict(self) -> None:
        """Drop least recently used images until the cache fits ``cache_mb`` (never the current one)."""
        while self.cache_bytes() > self.cache_mb * 2**20 and len(self._cache) > 1:
            key, entry = next(iter(self._cache.items()))
            if entry is self._entry:
                break
            del self._cache[key]
            self.stats["images_evicted"] += 1
            log.info("cache: evicted image %s (%.0f MB kept)", key[:8], self.cache_bytes() / 2**20)

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
        roi = roi_from_mask(mask, self.size)
        if roi is None:
            return None
        lengths = [b - a for a, b in roi]
        padded = tuple(max(n, w) for n, w in zip(lengths, self.size))
        pad = tuple((p - n) // 2 for p, n in zip(padded, lengths))
        per_axis = [window_starts(padded[ax], self.size[ax], self.overlap) for ax in range(3)]
        windows = []
        for start in ((a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]):
            key = []
            for ax in range(3):
                p0, p1 = start[ax] - pad[ax], start[ax] + self.size[ax] - pad[ax]
                a, b = max(p0, 0), min(p1, lengths[ax])
                key.append((roi[ax][0] + a, roi[ax][0] + b, max(-p0, 0)))
            windows.append(Window(start, tuple(key)))
        return Plan(roi, pad, padded, windows)

    def pad_roi(self, values: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Crop-grid values inside the plan's ROI, zero-padded as the window image is."""
        inner = values[tuple(slice(a, b) for a, b in plan.roi)]
        lengths = [b - a for a, b in plan.roi]
        return F.pad(
            inner, [p for ax in (2, 1, 0) for p in (plan.pad[ax], plan.padded[ax] - lengths[ax] - plan.pad[ax])]
        )

    def window_embeddings(self, keys: list[WindowKey]) -> list[torch.Tensor]:
        """Embeddings of zoom-in windows, encoding (in batches) only those not cached yet."""
        self._require_image()
        windows = self._entry.windows
        missing = list(dict.fromkeys(k for k in keys if k not in windows))
        if missing:
            for key, emb in zip(missing, self._encode_stored([self._window_volume(k) for k in missing], missing)):
                windows[key] = emb
            self._evict()
        return [windows[k] for k in keys]

    def _plan(self, prompt: Prompt, coarse: torch.Tensor, model_box) -> Plan | None:
        image = self._require_image()
        preds = torch.sigmoid(coarse) > 0.5
        plan = self.window_grid(preds)
        if plan is None:
            return None
        padded_preds = self.pad_roi(preds, plan).cpu().numpy()
        clicks = points_to_crop(prompt.points, image.crop) if prompt.points else []
        roi, pad = plan.roi, plan.pad
        for win in plan.windows:
            s = win.start
            in_window = padded_preds[tuple(slice(s[ax], s[ax] + self.size[ax]) for ax in range(3))]
            if prompt.points:
                win.box = mask_box(in_window)
                for c, lab in zip(clicks, prompt.point_labels):
                    w = tuple(c[ax] - roi[ax][0] + pad[ax] - s[ax] for ax in range(3))
                    if all(0 <= w[ax] < self.size[ax] for ax in range(3)):
                        win.points.append(w)
                        win.labels.append(lab)
            elif prompt.box is not None:
                if len(plan.windows) == 1:
                    win.box = model_box_on_crop(model_box, image.crop.shape, self.size, roi)
                else:
                    win.box = mask_box(in_window)
        return plan

    def _window_volume(self, key: WindowKey) -> torch.Tensor:
        image = self._require_image()
        vol = torch.zeros(self.size, dtype=torch.float32, device=image.zoom_in.device)
        src = tuple(slice(a, b) for a, b, _ in key)
        dst = tuple(slice(o, o + b - a) for a, b, o in key)
        vol[dst] = image.zoom_in[src]
        return vol

    def predict(self, prompts: list[Prompt], zoom_in: bool | None = None) -> list[Target]:
        """Segment one target per prompt. Prompts must be valid for the current image."""
        image = self._require_image()
        zoom_in = self.zoom_in if zoom_in is None else zoom_in
        shape = "x".join(map(str, image.shape_ijk))
        with memory_guard(f"segmenting {len(prompts)} target(s) on a {shape} volume", self.device):
            return self._predict(prompts, zoom_in)

    def _predict(self, prompts: list[Prompt], zoom_in: bool) -> list[Target]:
        image = self._require_image()
        embedding = self.zoom_out_embedding()
        crop = image.crop
        jobs, traces, texts, boxes = [], [], [], []
        for prompt in prompts:
            trace: dict = {
                "crop": {
                    "start_dhw": list(crop.start),
                    "stop_dhw": list(crop.stop),
                    "start_ijk": list(crop.start_ijk),
                    "stop_ijk": list(crop.stop_ijk),
                },
                "model_space": {},
            }
            text_emb = None
            if prompt.text is not None:
                text_emb, ids = self.text_embedding(prompt.text)
                trace["model_space"].update(text=prompt.text, token_ids=ids)
            model_box = box_to_model(prompt.box, crop, self.size) if prompt.box is not None else None
            model_points = points_to_model(prompt.points, crop, self.size) if prompt.points else []
            trace["model_space"].update(
                box_dhw=model_box and list(model_box),
                points_dhw=[list(p) for p in model_points] or None,
                point_labels=list(prompt.point_labels) or None,
            )
            jobs.append(DecodeJob(embedding, text_emb, model_box, model_points, list(prompt.point_labels)))
            traces.append(trace)
            texts.append(text_emb)
            boxes.append(model_box)
        # zoom-out: all prompts, batched where their token layouts agree; kept at model resolution
        # (8 MB each) and brought to the crop grid only while a target is planned or finished
        lows: list[torch.Tensor] = [None] * len(prompts)
        for i, low in self._decode_all(jobs):
            lows[i] = low
        plans = [
            self._plan(p, self._coarse(low), box) if zoom_in else None for p, low, box in zip(prompts, lows, boxes)
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

    def _finish(self, prompt: Prompt, low: torch.Tensor, plan: Plan | None, trace: dict, sums=None) -> Target:
        """Overlap-averaged window logits pasted into the coarse logits over the ROI."""
        final = self._coarse(low)
        if plan is None:
            trace["zoom_in"] = None
            return Target(prompt, final.cpu(), trace)
        total, count = sums
        inner = tuple(slice(p, p + b - a) for p, (a, b) in zip(plan.pad, plan.roi))
        final[tuple(slice(a, b) for a, b in plan.roi)] = (total / count)[inner]
        trace["zoom_in"] = {
            "roi_slice_dhw_in_crop": [list(r) for r in plan.roi],
            "pad_before_dhw": list(plan.pad),
            "padded_roi_shape_dhw": list(plan.padded),
            "windows": [
                {
                    "slice_dhw_in_padded_roi": [[s, s + w] for s, w in zip(win.start, self.size)],
                    "box_fed_dhw": list(win.box) if win.box is not None else None,
                    "points_fed_dhw": [list(p) for p in win.points] or None,
                }
                for win in plan.windows
            ],
        }
        return Target(prompt, final.cpu(), trace)

    # ------------------------------------------------------------------ outputs
    def logits_on_image(self, target: Target, fill: float = -1000.0) -> np.ndarray:
        """Final logits on the (i, j, k) grid; ``fill`` where the model saw nothing (outside the crop)."""
        return to_image_grid(target.logits.numpy(), self._require_image(), fill)

    def mask_on_image(self, target: Target) -> np.ndarray:
        """uint8 mask on the (i, j, k) grid: sigmoid(logit) > 0.5, 0 outside the crop."""
        return to_image_grid(target.mask.to(torch.uint8).numpy(), self._require_image(), 0)

    def labelmap_on_image(self, targets: list[Target], values: list[int]) -> np.ndarray:
        """One uint8 map on the (i, j, k) grid, ``values[n]`` where target n is foreground (the
        highest logit wins an overlap). Combined on the crop grid: no full-size float array per target."""
        return to_image_grid(combine([t.logits for t in targets], values).numpy(), self._require_image(), 0)


__all__ = ["NO_BOX", "DecodeJob", "ImageTooLarge", "Plan", "SegVolPredictor", "Target", "Window", "pick_device"]
