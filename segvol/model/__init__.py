"""SegVol network parts (parameter names equal to the official checkpoint)."""

from segvol.model.segvol import CONFIGS, SegVol, SegVolConfig

__all__ = ["CONFIGS", "SegVol", "SegVolConfig"]
