"""Fine-tune SegVol's decoder on labelled volumes, with the encoders frozen.

Why this is cheap: the image encoder and the CLIP text encoder do not change, so every training
view (the zoom-out volume and the zoom-in windows around each label) is encoded once per round
and the decoder trains on the cached embeddings. Prompts are simulated from each label as SegVol
was trained: the category name as text, the label's bounding box (jittered), points inside and
outside it, and their combinations. The loss is Dice + BCE, as in the official training.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segvol.engine import SegVolPredictor
from segvol.preprocess import Crop
from segvol.training import distributed

log = logging.getLogger(__name__)

TRAINABLE = ("mask_decoder.", "prompt_encoder.")
# the official prompt combinations: (text, box, points)
COMBINATIONS = (
    (True, False, True),
    (True, True, False),
    (True, False, False),
    (False, True, False),
    (False, False, True),
    (False, True, True),
)


@dataclass
class View:
    """One encoded view of a labelled image: what the decoder sees and what it should answer."""

    embedding: torch.Tensor  # 1 x C x d x h x w, frozen
    target: torch.Tensor  # D x H x W in {0, 1}, model resolution of the view
    category: str
    image: str  # which image it came from (for splits and reports)


def crop_label(label_ijk: np.ndarray, crop: Crop) -> torch.Tensor:
    """A label on the image grid -> the crop grid (d, h, w), as preprocessing moves the image."""
    x = np.swapaxes(np.asarray(label_ijk), 0, 2)
    return torch.from_numpy(np.ascontiguousarray(x[tuple(slice(a, b) for a, b in zip(crop.start, crop.stop))]))


@dataclass(frozen=True)
class Skip:
    """A view left out of a round because its target is empty: sampled, it would give nothing to
    learn (and a box or points of no voxel cannot be drawn), so the round lists it instead."""

    image: str
    category: str
    view: str  # "zoom-out", "zoom-in window 2/4 (crop d 0..16, h 3..67, w 0..64)", or ALL_VIEWS
    reason: str

    def line(self) -> str:
        return f"skipped: {self.image} {self.category} {self.view}: {self.reason}"


ALL_VIEWS = "zoom-out and zoom-in"


def _sizes(shape: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in shape)


def views_of(
    predictor: SegVolPredictor,
    image_ijk: np.ndarray,
    mask_ijk: np.ndarray,
    category: str,
    image_id: str,
    zoom_in: bool = True,
    max_windows: int | None = None,
    skipped: list[Skip] | None = None,
) -> list[View]:
    """The zoom-out view and the zoom-in windows around the mask, each with its target; with
    ``max_windows``, only the windows holding the most of the mask (each costs an encoder pass).
    A view whose target is empty once cropped / downsampled / windowed is left out (one brush
    stroke on one slice vanishes from the zoom-out) and, with ``skipped``, recorded there."""
    skips: list[Skip] = []

    def skip(view: str, reason: str) -> None:
        skips.append(Skip(image_id, category, view, reason))

    views: list[View] = []
    if not np.any(mask_ijk):
        skip(ALL_VIEWS if zoom_in else "zoom-out", "the label has no voxel of it")
        return _recorded(views, skips, skipped)
    predictor.set_image(image_ijk)
    image = predictor.image
    mask = crop_label(mask_ijk > 0, image.crop).float()
    if not mask.any():
        c = image.crop
        where = ", ".join(f"{ax} {a}..{b}" for ax, a, b in zip("dhw", c.start, c.stop))
        skip(ALL_VIEWS if zoom_in else "zoom-out", f"no voxel inside the image's foreground crop ({where})")
        return _recorded(views, skips, skipped)
    size = predictor.size
    small = F.interpolate(mask[None, None], size=size, mode="nearest-exact")[0, 0]
    if small.any():
        views.append(View(predictor.zoom_out_embedding(), small, category, image_id))
    else:
        skip(
            "zoom-out",
            f"empty after downsampling to {_sizes(size)} (from the {_sizes(mask.shape)} crop, "
            f"{int(mask.sum())} voxels)",
        )
    plan = predictor.window_grid(mask > 0) if zoom_in else None
    if plan is not None:
        padded = predictor.pad_roi(mask, plan)
        targets = [padded[tuple(slice(s, s + n) for s, n in zip(win.start, size))] for win in plan.windows]
        for n, (win, target) in enumerate(zip(plan.windows, targets)):
            if not target.any():
                where = ", ".join(f"{ax} {a}..{b}" for ax, (a, b, _) in zip("dhw", win.key))
                skip(f"zoom-in window {n + 1}/{len(targets)} (crop {where})", "holds none of the label")
        chosen = [n for n in sorted(range(len(targets)), key=lambda n: -int(targets[n].sum())) if targets[n].any()]
        chosen = sorted(chosen[:max_windows] if max_windows else chosen)
        embeddings = predictor.window_embeddings([plan.windows[n].key for n in chosen])
        views += [View(emb, targets[n], category, image_id) for n, emb in zip(chosen, embeddings)]
    return _recorded(views, skips, skipped)


def _recorded(views: list[View], skips: list[Skip], skipped: list[Skip] | None) -> list[View]:
    for s in skips:
        log.debug("%s", s.line())
    if skipped is not None:
        skipped.extend(skips)
    return views


@dataclass
class Sample:
    """One simulated prompt on one view: what a training step feeds the decoder."""

    view: View
    text: bool
    box: list[float] | None  # jittered bounding box, view voxels
    points: tuple[list, list] | None  # (points, labels 1/0)


def check_batch(batch: int, processes: int) -> None:
    """A batch is split evenly over the processes: refused (before any work) when it cannot be."""
    if batch < 1 or batch % processes:
        raise ValueError(
            f"a batch of {batch} cannot be split evenly over {processes} processes: "
            "use a multiple of the number of processes"
        )


def _empty(target: torch.Tensor, what: str) -> ValueError:
    return ValueError(
        f"cannot draw {what} on an empty target ({_sizes(target.shape)}, no voxel): views_of leaves such views out"
    )


def _box(target: torch.Tensor, rng: random.Random, jitter: float) -> list[float]:
    """The target's bounding box, each side jittered; refused (ValueError) for an empty target."""
    nz = torch.nonzero(target)
    if nz.shape[0] == 0:
        raise _empty(target, "a box")
    lo, hi = nz.min(0).values.tolist(), nz.max(0).values.tolist()
    shape = target.shape
    out_lo, out_hi = [], []
    for ax in range(3):
        j = max(1, round(jitter * (hi[ax] - lo[ax] + 1)))
        out_lo.append(min(max(lo[ax] + rng.randint(-j, j), 0), shape[ax] - 1))
        out_hi.append(min(max(hi[ax] + rng.randint(-j, j), out_lo[ax]), shape[ax] - 1))
    return [float(v) for v in out_lo + out_hi]


def _points(target: torch.Tensor, rng: random.Random, max_extra: int = 4) -> tuple[list, list]:
    """One to 1 + ``max_extra`` points inside the target, up to ``max_extra`` outside; refused
    (ValueError) for an empty target, which has no point inside to click."""
    pos, neg = torch.nonzero(target > 0.5), torch.nonzero(target < 0.5)
    if len(pos) == 0:
        raise _empty(target, "points")
    pts, labels = [], []
    for pool, label, n in ((pos, 1, 1 + rng.randint(0, max_extra)), (neg, 0, rng.randint(0, max_extra))):
        for _ in range(n if len(pool) else 0):
            pts.append(pool[rng.randrange(len(pool))].tolist())
            labels.append(label)
    return pts, labels


def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    dice = 1 - (2 * inter + 1) / (prob.sum() + target.sum() + 1)
    return dice + F.binary_cross_entropy_with_logits(logits, target)


def dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    p, t = pred.bool(), target.bool()
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2 * int((p & t).sum()) / denom


def trainable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its own copies of the trainable parts (mask decoder, prompt encoder) and the
    frozen encoders shared: a round trains this, so the served weights stay bit-identical until a
    version is promoted, and the encoders are not duplicated in memory."""
    clone = copy.copy(model)
    clone._modules = dict(model._modules)
    for name in (t.rstrip(".") for t in TRAINABLE):
        clone._modules[name] = copy.deepcopy(model._modules[name])
    return clone


class DecoderTrainer:
    """Trains the decoder and prompt encoder of a copy of ``predictor.model`` (``self.model``)."""

    def __init__(self, predictor: SegVolPredictor, lr: float = 1e-4, seed: int = 0, jitter: float = 0.1) -> None:
        self.predictor = predictor
        self.model = trainable_copy(predictor.model)
        self.rng = random.Random(seed)
        self.jitter = jitter
        torch.manual_seed(seed)
        self.params = [p for n, p in self.model.named_parameters() if n.startswith(TRAINABLE)]
        distributed.broadcast_params(self.params)  # every process starts from rank 0's weights
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self._text: dict[str, torch.Tensor] = {}

    def _text_embedding(self, name: str) -> torch.Tensor:
        if name not in self._text:
            with torch.no_grad():
                self._text[name] = self.model.encode_text([name]).detach()
        return self._text[name]

    def _draw(self, views: list[View], replay: list[View], replay_weight: float, index: int) -> Sample:
        """The ``index``-th sample of a round; every process draws every sample, so all keep the
        same rng state (the calls in the order one process always made them)."""
        use_replay = replay and self.rng.random() < replay_weight / (1 + replay_weight)
        view = self.rng.choice(replay if use_replay else views)
        text, box, points = (True, False, False) if use_replay else COMBINATIONS[index % len(COMBINATIONS)]
        return Sample(
            view,
            text,
            _box(view.target, self.rng, self.jitter) if box else None,
            _points(view.target, self.rng) if points else None,
        )

    def _logits(self, sample: Sample) -> torch.Tensor:
        device = self.predictor.device
        view = sample.view
        boxes = torch.tensor([sample.box], device=device) if sample.box is not None else None
        pts = None
        if sample.points is not None:
            p, lab = sample.points
            pts = (
                torch.tensor([p], dtype=torch.float32, device=device),
                torch.tensor([lab], dtype=torch.float32, device=device),
            )
        text_emb = self._text_embedding(view.category).to(device) if sample.text else None
        size = tuple(view.target.shape)
        low = self.model.decode(view.embedding.to(device), text_emb, boxes, pts, upsample=False)
        return F.interpolate(low, size=size, mode="trilinear", align_corners=False)[0, 0]

    def train(
        self,
        views: list[View],
        steps: int,
        replay: Sequence[View] = (),
        replay_weight: float = 0.5,
        progress: Callable[[int, float], None] | None = None,
        batch: int = 1,
    ) -> list[float]:
        """``steps`` optimiser steps of ``batch`` samples each (a view and a simulated prompt);
        replay views keep other categories as they were. Returns each step's mean loss.

        Under torchrun each process computes the loss of its share of the batch, scaled by
        1/``batch``, and the gradients are summed across processes: the step is the one-process
        mean over the batch, so the same seed and batch give one process's result to float
        noise. (The decoder has no dropout: torch's global rng plays no part in a step.) Why not
        torch's DistributedDataParallel: the decoder is called through ``model.decode`` beside
        frozen encoders shared with the served model, and samples with different prompt
        combinations use different parameters in different processes; summing the gradients in
        one flat buffer (``distributed.sum_gradients``) is what DDP's reducer does."""
        if not views:
            raise ValueError("no training views")
        empty = [v for v in views if not v.target.any()]
        if empty:  # refused before any step rather than at the step that draws one
            v = empty[0]
            raise ValueError(f"{len(empty)} training view(s) with an empty target ({v.image} {v.category}, ...)")
        check_batch(batch, distributed.world())
        replay = list(replay)
        device = self.predictor.device
        self._train_mode(True)  # the trainable parts only: the shared encoders stay as they are served
        losses = []
        for step in range(steps):
            samples = [self._draw(views, replay, replay_weight, step * batch + b) for b in range(batch)]
            self.optimizer.zero_grad(set_to_none=True)
            mine = []
            for sample in distributed.shard(samples):
                loss = dice_bce(self._logits(sample), sample.view.target.to(device))
                (loss / batch).backward()
                mine.append(float(loss.detach()))
            distributed.sum_gradients(self.params)
            self.optimizer.step()
            losses.append(sum(distributed.gather_shards(mine)) / batch)
            if progress:
                progress(step + 1, losses[-1])
        self._train_mode(False)
        return losses

    def _train_mode(self, on: bool) -> None:
        for name in TRAINABLE:
            self.model._modules[name.rstrip(".")].train(on)

    @torch.no_grad()
    def predict(self, view: View) -> torch.Tensor:
        """Text-prompted mask of a view (the prompt annotators use most)."""
        self._train_mode(False)
        return self._logits(Sample(view, True, None, None)) > 0

    def mean_dice(self, views: list[View]) -> float:
        """Mean Dice of the text-prompted masks; under torchrun each process measures its share."""
        if not views:
            return math.nan
        mine = [dice(self.predict(v).cpu(), v.target) for v in distributed.shard(views)]
        return float(np.mean(distributed.gather_shards(mine)))

    def replay_views(self, views: list[View], categories: list[str]) -> list[View]:
        """For each image of ``views``, the current model's answer for other categories as targets
        (under torchrun each process answers its share; the masks travel, not the embeddings)."""
        firsts: dict[tuple[str, int], View] = {}  # one view per embedding (categories share the zoom-out)
        for v in views:
            firsts.setdefault((v.image, id(v.embedding)), v)
        jobs = [(v, name) for v in firsts.values() for name in categories]
        masks = distributed.gather_shards(
            [
                self.predict(View(v.embedding, torch.zeros_like(v.target), name, v.image)).cpu()
                for v, name in distributed.shard(jobs)
            ]
        )
        return [View(v.embedding, mask.float(), name, v.image) for (v, name), mask in zip(jobs, masks) if mask.any()]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.state_dict().items() if n.startswith(TRAINABLE)}
