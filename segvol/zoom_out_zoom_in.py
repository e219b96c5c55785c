"""SegVol's zoom-out-zoom-in, for a batch of prompts on the predictor's current image.

Zoom-out: each prompt decoded on the embedding of the whole crop resized to the model's size.
Zoom-in: around each coarse mask, the windows ``zoom_in.plan_prompt`` places, decoded at the
crop's resolution; their logits are averaged where windows overlap and pasted over the ROI. The
predictor keeps every encoding per image and its ``decoder`` batches the decoder passes, so this
module is the algorithm only: which pass gets which embedding and prompts, and how the logits combine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from segvol.decoding import DecodeJob, Decoder
from segvol.preprocess import PreparedImage
from segvol.prompts import Prompt, box_to_model, points_to_model
from segvol.trace import ModelSpace, Trace, WindowTrace, ZoomInTrace
from segvol.zoom_in import Plan, Window, WindowKey, paste, plan_prompt


class Encodings(Protocol):
    """What zoom-out-zoom-in asks of the predictor (segvol/engine.py): the current image, its
    encodings, and the batching decoder."""

    size: tuple[int, int, int]
    overlap: float
    image: PreparedImage
    decoder: Decoder
    device: torch.device

    def zoom_out_embedding(self) -> torch.Tensor: ...

    def window_embeddings(self, keys: list[WindowKey]) -> list[torch.Tensor]: ...

    def text_embedding(self, name: str) -> tuple[torch.Tensor, list[int]]: ...


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


class ZoomOutZoomIn:
    """One ``predict`` call: ``run`` segments one target per prompt on the predictor's current image."""

    def __init__(self, predictor: Encodings) -> None:
        self.predictor = predictor
        self.size = predictor.size
        self.overlap = predictor.overlap
        self.crop = predictor.image.crop

    def run(self, prompts: list[Prompt], zoom_in: bool) -> list[Prediction]:
        """Zoom-out for all prompts, batched where their token layouts agree; its logits are kept at
        model resolution (8 MB each) and brought to the crop grid only while a target is planned or
        finished. Then zoom-in around each coarse mask (or not, without ``zoom_in``)."""
        embedding = self.predictor.zoom_out_embedding()
        made = [self._zoom_out_job(p, embedding) for p in prompts]
        jobs, traces = [job for job, _ in made], [trace for _, trace in made]
        lows: list[torch.Tensor] = [None] * len(prompts)
        for i, low in self.predictor.decoder.decode_all(jobs):
            lows[i] = low
        plans = [
            plan_prompt(p, torch.sigmoid(self._coarse(low)) > 0.5, self.crop, self.size, self.overlap, job.box)
            if zoom_in
            else None
            for p, low, job in zip(prompts, lows, jobs)
        ]
        return self._zoom_in(prompts, jobs, lows, plans, traces)

    def _zoom_out_job(self, prompt: Prompt, embedding: torch.Tensor) -> tuple[DecodeJob, Trace]:
        """The prompt in model space as the zoom-out pass gets it, and the trace that records it."""
        crop = self.crop
        space = ModelSpace()
        text_emb = None
        if prompt.text is not None:
            text_emb, ids = self.predictor.text_embedding(prompt.text)
            space.text, space.token_ids = prompt.text, ids
        model_box = box_to_model(prompt.box, crop, self.size) if prompt.box is not None else None
        model_points = points_to_model(prompt.points, crop, self.size) if prompt.points else []
        space.box_dhw = model_box and list(model_box)
        space.points_dhw = [list(p) for p in model_points] or None
        space.point_labels = list(prompt.point_labels) or None
        job = DecodeJob(embedding, text_emb, model_box, model_points, list(prompt.point_labels))
        return job, Trace(crop, space)

    def _zoom_in(
        self,
        prompts: list[Prompt],
        jobs: list[DecodeJob],
        lows: list[torch.Tensor],
        plans: list[Plan | None],
        traces: list[Trace],
    ) -> list[Prediction]:
        """Encode every window not cached yet, then decode every window of every target (each with its
        target's text); a target is finished as soon as its last window is in, and its sums freed."""
        keys = [w.key for plan in plans if plan for w in plan.windows]
        cached = dict(zip(keys, self.predictor.window_embeddings(keys)))
        window_jobs: list[DecodeJob] = []
        owners: list[tuple[int, Window]] = []
        for t, plan in enumerate(plans):
            for win in plan.windows if plan else []:
                window_jobs.append(DecodeJob(cached[win.key], jobs[t].text, win.box, win.points, win.labels))
                owners.append((t, win))
        done = [
            self._finish(p, low, None, trace) if plan is None else None
            for p, low, plan, trace in zip(prompts, lows, plans, traces)
        ]
        left = {t: len(plan.windows) for t, plan in enumerate(plans) if plan}
        sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for j, logits in self.predictor.decoder.decode_all(window_jobs):
            t, win = owners[j]
            if t not in sums:
                sums[t] = tuple(torch.zeros(plans[t].padded, device=self.predictor.device) for _ in range(2))
            total, count = sums[t]
            sl = tuple(slice(s, s + w) for s, w in zip(win.start, self.size))
            total[sl] += logits
            count[sl] += 1.0
            left[t] -= 1
            if not left[t]:
                done[t] = self._finish(prompts[t], lows[t], plans[t], traces[t], sums.pop(t))
        return done

    def _coarse(self, low: torch.Tensor) -> torch.Tensor:
        """Zoom-out logits on the crop grid (nearest, as the official code resizes them back)."""
        return F.interpolate(low[None, None], size=self.crop.shape, mode="nearest")[0, 0]

    def _finish(
        self, prompt: Prompt, low: torch.Tensor, plan: Plan | None, trace: Trace, sums: tuple | None = None
    ) -> Prediction:
        """The coarse logits on the crop grid, with the overlap-averaged window logits pasted over the ROI."""
        final = self._coarse(low)
        if plan is not None:
            paste(final, plan, *sums)
            trace.zoom_in = zoom_in_trace(plan, self.size)
        return Prediction(prompt, final.cpu(), trace)


def zoom_in_trace(plan: Plan, size: tuple[int, int, int]) -> ZoomInTrace:
    """What the zoom-in pass fed the model for one target: the ROI, its padding, each window's prompts."""
    return ZoomInTrace(
        [list(r) for r in plan.roi],
        list(plan.pad),
        list(plan.padded),
        [
            WindowTrace(
                [[s, s + w] for s, w in zip(win.start, size)],
                list(win.box) if win.box is not None else None,
                [list(p) for p in win.points] or None,
            )
            for win in plan.windows
        ],
    )
