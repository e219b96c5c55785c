"""``python -m segvol bench``: time every stage of SegVol inference, fast path against faithful.

Scenarios on one volume: the first text prompt (preprocessing and every encoder pass), a further
text prompt, a click and a box on the same image (decoder passes only where windows are cached),
and N categories in one call. ``--faithful`` also runs the first prompt on the plain path (explicit
attention, windows one at a time, a fresh predictor, as the official pipeline works) and
checks that both paths agree within the golden tolerances, so every speed-up is a ratio measured
in the same run.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from segvol.engine import SegVolPredictor
from segvol.model import CONFIGS, SegVol
from segvol.prompts import Prompt
from segvol.vocabulary import default_vocabulary

STAGES = ("preprocess", "encode", "text", "decode", "post", "write")


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A CT-like volume in HU: air, a body ellipse, two brighter organs, noise."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    ct = np.full(shape, -1000.0, np.float32)
    ct[(i / 0.85) ** 2 + (j / 0.7) ** 2 < 1] = 40
    ct[((i + 0.35) / 0.35) ** 2 + ((j + 0.1) / 0.3) ** 2 + (k / 0.8) ** 2 < 1] = 100
    ct[((i - 0.45) / 0.15) ** 2 + ((j - 0.2) / 0.15) ** 2 + (k / 0.5) ** 2 < 1] = 130
    ct += rng.normal(0, 15, shape).astype(np.float32)
    return ct.astype(np.int16)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_kind(device: torch.device) -> str:
    return "CUDA allocated" if device.type == "cuda" else "process RSS"


def _warm_up(predictor: SegVolPredictor) -> None:
    """One encoder and decoder pass on zeros, so no scenario pays the libraries' first-call set-up."""
    size = predictor.size
    with torch.no_grad():
        emb = predictor.model.encode_image(torch.zeros((1, 1, *size), device=predictor.device))
        predictor.model.decode(emb, predictor.model.encode_text(["liver"]))


def _run(predictor: SegVolPredictor, image: np.ndarray, prompts: list[Prompt]) -> tuple[dict, np.ndarray]:
    """One scenario's stage timings, and the first target's logits (for the agreement check, untimed)."""
    before = dict(predictor.timings)
    windows_before = predictor.stats["encoder_windows"]
    t0 = time.perf_counter()
    predictor.set_image(image)
    targets = predictor.predict(prompts)
    t1 = time.perf_counter()
    labelmap = predictor.labelmap_on_image(targets, list(range(1, len(targets) + 1)))
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        import nibabel as nib

        nib.save(nib.Nifti1Image(labelmap, np.eye(4)), str(Path(tmp) / "labels.nii.gz"))
    t3 = time.perf_counter()
    row = {k: predictor.timings.get(k, 0.0) - before.get(k, 0.0) for k in ("preprocess", "encode", "text", "decode")}
    row.update(
        post=t2 - t1, write=t3 - t2, total=t3 - t0, encoder_windows=predictor.stats["encoder_windows"] - windows_before
    )
    return row, predictor.logits_on_image(targets[0])


SCENARIO_CATEGORIES = (
    "liver",
    "spleen",
    "right kidney",
    "left kidney",
    "aorta",
    "pancreas",
    "stomach",
    "gallbladder",
    "inferior vena cava",
    "esophagus",
    "urinary bladder",
    "duodenum",
)


def _scenarios(shape: tuple[int, ...], categories: int) -> list[tuple[str, list[Prompt]]]:
    """The first text prompt (preprocessing and every encoder pass), further prompts of each kind on
    the same image, and ``categories`` categories in one call (the image already encoded)."""
    vocab = default_vocabulary()
    names = [vocab.resolve(n).name for n in SCENARIO_CATEGORIES][:categories]
    centre = [s // 2 for s in shape]
    box = [s // 4 for s in shape] + [3 * s // 4 for s in shape]
    return [
        ("first text prompt", [Prompt.make(shape, text="liver")]),
        ("further text prompt", [Prompt.make(shape, text="spleen")]),
        ("further click", [Prompt.make(shape, points=[centre], point_labels=[1])]),
        ("further box", [Prompt.make(shape, box=box)]),
        (f"{len(names)} categories, one call", [Prompt.make(shape, text=n) for n in names]),
    ]


def run(
    model: SegVol,
    image: np.ndarray,
    device: str = "auto",
    categories: int = 10,
    faithful: bool = False,
    window_batch: int = 4,
    zoom_in: bool = True,
    precision: str = "fp32",
    decode_batch: int = 0,
    load_s: float | None = None,
    overlap: float = 0.5,
) -> str:
    """Run the scenarios and return the table as text (``load_s``: how long loading the weights took)."""
    todo = _scenarios(image.shape, categories)
    rows = []
    fast = SegVolPredictor(
        model,
        device,
        zoom_in=zoom_in,
        overlap=overlap,
        window_batch=window_batch,
        decode_batch=decode_batch,
        precision=precision,
    )
    model.set_fast_kernels(True)
    _warm_up(fast)
    first_logits = None
    for label, prompts in todo:
        row, logits = _run(fast, image, prompts)
        first_logits = first_logits if first_logits is not None else logits
        rows.append(("fast", label, row))
    check = ""
    if faithful:
        label, prompts = todo[0]
        row, check = _faithful(model, fast, image, prompts, first_logits)
        rows.append(("faithful", label, row))
    lines = _heading(fast, image.shape, window_batch, load_s) + _table(rows)
    if faithful:
        lines.append(check)
    lines.append(f"peak memory: {_peak_mb(fast.device):.0f} MB ({_memory_kind(fast.device)})")
    return "\n".join(lines)


def _faithful(
    model: SegVol, fast: SegVolPredictor, image: np.ndarray, prompts: list[Prompt], fast_logits: np.ndarray
) -> tuple[dict, str]:
    """The first prompt as the official pipeline runs it: explicit attention, one window and one
    decoder pass at a time, preprocessing on the CPU, a fresh predictor. Its row, and how far its
    logits are from the fast path's."""
    model.set_fast_kernels(False)
    _warm_up(fast)
    plain = SegVolPredictor(
        model, fast.device, zoom_in=fast.zoom_in, window_batch=1, decode_batch=1, preprocess_on_device=False
    )
    row, logits = _run(plain, image, prompts)
    seen = fast_logits > -1000
    diff = float(np.abs(logits[seen] - fast_logits[seen]).max())
    a, b = logits > 0, fast_logits > 0
    dice = 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)
    model.set_fast_kernels(True)
    return row, f"fast vs faithful, first prompt: max |logit diff| {diff:.2e}, mask Dice {dice:.6f}"


def _heading(fast: SegVolPredictor, shape: tuple[int, ...], window_batch: int, load_s: float | None) -> list[str]:
    dev = fast.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    lines = [
        f"SegVol bench: image {shape}, device {dev} ({name}), window batch {window_batch}, decode batch "
        f"{fast.decode_batch}, zoom-in {fast.zoom_in}, overlap {fast.overlap}, precision {fast.precision}",
    ]
    if load_s is not None:
        lines.append(f"load weights: {load_s:.2f} s")
    return lines


def _table(rows: list[tuple[str, str, dict]]) -> list[str]:
    """One line per scenario and path, then the ratios that matter."""
    header = f"{'path':9} {'scenario':28} " + " ".join(f"{s:>10}" for s in STAGES) + f" {'total s':>9} {'enc.win':>7}"
    lines = [header]
    for path, label, row in rows:
        stages = " ".join(f"{row[s]:10.3f}" for s in STAGES)
        lines.append(f"{path:9} {label:28} {stages} {row['total']:9.3f} {row['encoder_windows']:7d}")
    by = {(p, label): r["total"] for p, label, r in rows}
    for path, label, row in rows:
        if label == "first text prompt" and row["encoder_windows"]:
            n, per = row["encoder_windows"], 1000 * row["encode"] / row["encoder_windows"]
            lines.append(f"{path}: {per:.1f} ms per encoder window ({n} incl. the zoom-out volume)")
    first = by[("fast", "first text prompt")]
    lines.append(f"further text prompt is {first / by[('fast', 'further text prompt')]:.1f}x faster than the first")
    if ("faithful", "first text prompt") in by:
        slow = by[("faithful", "first text prompt")]
        lines.append(f"first prompt: faithful {slow:.2f} s / fast {first:.2f} s = {slow / first:.2f}x")
    return lines


def build_model(weights: str | None, config: str) -> tuple[SegVol, str]:
    if weights:
        from segvol.weights import load_segvol

        return load_segvol(weights), str(weights)
    torch.manual_seed(0)
    return SegVol(CONFIGS[config]).eval(), f"random {config} weights (seed 0)"
