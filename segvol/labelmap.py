"""Several binary targets -> one label map."""

from __future__ import annotations

import torch


def combine(logits: list[torch.Tensor], values: list[int]) -> torch.Tensor:
    """uint8 map with ``values[n]`` where target n is foreground (sigmoid(logit) > 0.5); where
    targets overlap, the one with the highest logit wins (the earlier one on a tie). One target
    at a time, so the memory is two maps, whatever the number of targets."""
    out = torch.zeros(logits[0].shape, dtype=torch.uint8, device=logits[0].device)
    best = torch.full(logits[0].shape, -torch.inf, device=logits[0].device)
    for logit, value in zip(logits, values):
        score = torch.where(torch.sigmoid(logit) > 0.5, logit.float(), -torch.inf)
        out[score > best] = value
        best = torch.maximum(best, score)
    return out
