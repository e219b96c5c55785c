"""Several binary targets -> one label map."""

from __future__ import annotations

import numpy as np


def combine(masks: list[np.ndarray], logits: list[np.ndarray], values: list[int]) -> np.ndarray:
    """uint8 map with ``values[n]`` where target n is foreground; where targets overlap, the one
    with the highest logit wins."""
    if len(masks) == 1:
        return (masks[0] > 0).astype(np.uint8) * np.uint8(values[0])
    stacked = np.where(np.stack(masks).astype(bool), np.stack(logits), -np.inf)
    best = np.asarray(values, dtype=np.uint8)[stacked.argmax(axis=0)]
    return np.where(np.isfinite(stacked.max(axis=0)), best, 0).astype(np.uint8)
