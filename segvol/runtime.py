"""Where and how the model runs: the device, the autocast precision, and what the passes cost.

One object the encoders, the decoder and the predictor share, so a pass run by any of them is
counted and timed in the same ``stats`` and ``timings`` a caller reads from the predictor.
"""

from __future__ import annotations

from collections import defaultdict

import torch

# fp32 is the faithful default; bf16 / fp16 are opt-in approximations (their measured effect is in README)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return device


class Runtime:
    """The device and precision passes run with, their counters (encoder windows, decoder passes, ...)
    and the seconds spent per stage."""

    def __init__(self, device: torch.device, precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.device = device
        self.precision = precision
        self.stats: dict[str, int] = defaultdict(int)
        self.timings: dict[str, float] = defaultdict(float)

    def autocast(self) -> torch.autocast:
        """The precision's autocast (a no-op for fp32)."""
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def sync(self) -> None:
        """Wait for the device, so a stage's time is its own and not the next one's."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
