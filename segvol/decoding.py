"""Decoder passes, batched: jobs with the same token layout share one pass of the mask decoder.

A ``predict`` call can hold many decoder passes (several categories on the zoom-out embedding,
every window of every target); grouping them by layout turns them into few, fuller passes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from segvol.model import SegVol
from segvol.runtime import Runtime


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


class Decoder:
    """The mask decoder over ``DecodeJob``s, ``batch`` jobs of one layout per pass."""

    def __init__(self, model: SegVol, runtime: Runtime, batch: int) -> None:
        self.model = model
        self.runtime = runtime
        self.batch = batch

    def decode_all(self, jobs: list[DecodeJob]) -> Iterator[tuple[int, torch.Tensor]]:
        """(job index, D x H x W logits) for every job, as each batch comes out of the decoder."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.signature].append(i)
        for idx in groups.values():
            for n in range(0, len(idx), self.batch):
                chunk = idx[n : n + self.batch]
                yield from zip(chunk, self.decode([jobs[i] for i in chunk]))

    @torch.no_grad()
    def decode(self, jobs: list[DecodeJob]) -> torch.Tensor:
        """N x D x H x W logits for N jobs of one layout, in one pass."""
        rt = self.runtime
        t0 = time.perf_counter()
        first = jobs[0]
        if all(j.embedding is first.embedding for j in jobs):
            embedding = first.embedding  # the decoder broadcasts one embedding over the batch
        else:
            embedding = torch.cat([j.embedding for j in jobs])
        text = torch.cat([j.text for j in jobs]) if first.text is not None else None
        f32 = dict(dtype=torch.float32, device=rt.device)
        boxes = torch.tensor([j.box for j in jobs], **f32) if first.box is not None else None
        points = None
        if first.points:
            points = torch.tensor([j.points for j in jobs], **f32), torch.tensor([j.labels for j in jobs], **f32)
        with rt.autocast():
            logits = self.model.decode(embedding, text, boxes, points).float()
        rt.stats["decoder_passes"] += len(jobs)
        rt.stats["decoder_calls"] += 1
        rt.sync()
        rt.timings["decode"] += time.perf_counter() - t0
        return logits[:, 0]
