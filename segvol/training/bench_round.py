"""``python -m segvol bench-round``: where a fine-tune round's time goes.

A round as the app runs it (segvol.training.finetune): encode the views of N labelled CTs (the zoom-out
volume and up to ``windows`` zoom-in windows per label), measure held-out Dice, train the
decoder ``steps`` steps, measure again. Run twice: the second round starts in a fresh predictor
(as each round's process does) with the encodings of the first on disk, as the app keeps them.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from segvol.bench import synthetic_ct
from segvol.embedding_store import EmbeddingStore, encoder_digest
from segvol.engine import SegVolPredictor
from segvol.training.finetune import DecoderTrainer, views_of


def organ_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """The larger organ of ``synthetic_ct``, as its label."""
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    return ((i + 0.35) / 0.35) ** 2 + ((j + 0.1) / 0.3) ** 2 + (k / 0.8) ** 2 < 1


def one_round(model, images, mask, store_dir: Path, device: str, steps: int, windows: int) -> dict:
    predictor = SegVolPredictor(model, device)
    predictor.store = EmbeddingStore(store_dir, encoder_digest(model, predictor.precision))
    t0 = time.perf_counter()
    views = [views_of(predictor, image, mask, "liver", f"ct{n}", max_windows=windows) for n, image in enumerate(images)]
    t_views = time.perf_counter() - t0
    train, held = [v for vs in views[1:] for v in vs], views[0]
    trainer = DecoderTrainer(predictor, lr=1e-4)
    t0 = time.perf_counter()
    before = trainer.mean_dice(held)
    t_measure = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.train(train, steps)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.mean_dice(held)
    t_measure += time.perf_counter() - t0
    return {
        "views": sum(len(v) for v in views),
        "encoded": predictor.store.misses,
        "reused": predictor.store.hits,
        "encode views s": t_views,
        "measure s": t_measure,
        "train s": t_train,
        "s per step": t_train / max(steps, 1),
        "total s": t_views + t_measure + t_train,
        "dice": before,
    }


def run(model, shape: tuple[int, int, int], n_images: int, steps: int, windows: int, device: str = "cpu") -> str:
    images = [synthetic_ct(shape, seed) for seed in range(n_images)]
    mask = organ_mask(shape)
    with tempfile.TemporaryDirectory() as store_dir:
        first = one_round(model, images, mask, Path(store_dir), device, steps, windows)
        second = one_round(model, images, mask, Path(store_dir), device, steps, windows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [
        f"| round on {n_images} labelled CTs {shape} | first round | a later round (encodings on disk) |",
        "|---|---|---|",
    ]
    for key in ("views", "encoded", "reused", "encode views s", "measure s", "train s", "s per step", "total s"):
        a, b = (f"{v:.2f}" if isinstance(v, float) else str(v) for v in (first[key], second[key]))
        rows.append(f"| {key} | {a} | {b} |")
    rows.append(f"| steps, windows per label, peak RSS | {steps}, {windows}, {peak:.0f} MB | |")
    return "\n".join(rows)
