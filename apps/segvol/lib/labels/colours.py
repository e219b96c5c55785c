"""One colour per label value, the same in the page and in every DICOM SEG we write.

Clients pick colours by position (OHIF gave liver and both lungs near-identical ones), so a
structure changed colour with the list it sat in. Here a value's colour is fixed: hand-picked for
the common CT structures so that anatomical neighbours differ clearly (CIE76 ΔE >= 20, checked by
tests/test_colours.py against NEIGHBOURS), and golden-angle hues by value for everything else,
values outside the vocabulary (224 on) included.

A SEG carries the colour as RecommendedDisplayCIELabValue: CIELab from sRGB with the D65 white
(as dcmjs and DCMTK convert, so OHIF and Slicer show what the page shows), scaled as PS3.3
C.10.7.1.1 says: L* 0..100 -> 0..0xFFFF, a* and b* -128..127 -> 0..0xFFFF (0 -> 0x8080).
"""

from __future__ import annotations

import colorsys
import math
from functools import cache

from segvol.vocabulary import Vocabulary, default_vocabulary

RGB = tuple[int, int, int]

# vocabulary names -> colour; a category's synonymous entries (e.g. "postcava") share its colour
HAND_PICKED: dict[RGB, tuple[str, ...]] = {
    (190, 75, 55): ("liver",),
    (145, 70, 200): ("spleen",),
    (240, 200, 50): ("right kidney", "kidney right"),
    (225, 215, 95): ("left kidney", "kidney left"),
    (70, 175, 75): ("gallbladder", "gall bladder"),
    (250, 145, 40): ("stomach",),
    (250, 150, 200): ("pancreas",),
    (225, 25, 45): ("aorta",),
    (45, 85, 205): ("inferior vena cava", "postcava", "vena cava"),
    (205, 160, 115): ("esophagus",),
    (130, 195, 245): ("right lung",),
    (140, 150, 240): ("left lung",),
    (205, 60, 150): ("heart",),
    (40, 200, 180): ("trachea",),
    (245, 225, 60): ("urinary bladder", "bladder"),
    (150, 100, 60): ("colon",),
    (250, 230, 170): ("duodenum",),
    (240, 180, 150): ("small bowel", "small intestin", "intestine"),
    (100, 230, 100): ("right adrenal gland", "right suprarenal gland", "adrenal gland right"),
    (110, 215, 130): ("left adrenal gland", "left suprarenal gland", "adrenal gland left"),
    (120, 35, 70): ("rectum",),
    (180, 120, 230): ("prostate or uterus",),
    (20, 160, 230): ("portal vein and splenic vein", "portal vein"),
    (255, 240, 200): ("spinal cord",),
    (235, 225, 195): ("sacrum",),
}

# pairs that touch (or face each other across a thin wall) in a CT: their colours must differ
NEIGHBOURS = (
    ("liver", "right lung"),
    ("liver", "right kidney"),
    ("liver", "gallbladder"),
    ("liver", "inferior vena cava"),
    ("liver", "duodenum"),
    ("liver", "stomach"),
    ("liver", "heart"),
    ("liver", "esophagus"),
    ("liver", "right adrenal gland"),
    ("liver", "colon"),
    ("liver", "portal vein and splenic vein"),
    ("gallbladder", "duodenum"),
    ("gallbladder", "stomach"),
    ("gallbladder", "colon"),
    ("right kidney", "inferior vena cava"),
    ("right kidney", "duodenum"),
    ("right kidney", "right adrenal gland"),
    ("right kidney", "colon"),
    ("inferior vena cava", "duodenum"),
    ("inferior vena cava", "aorta"),
    ("inferior vena cava", "right adrenal gland"),
    ("inferior vena cava", "heart"),
    ("inferior vena cava", "pancreas"),
    ("spleen", "left kidney"),
    ("spleen", "stomach"),
    ("spleen", "pancreas"),
    ("spleen", "left lung"),
    ("spleen", "colon"),
    ("spleen", "left adrenal gland"),
    ("spleen", "portal vein and splenic vein"),
    ("left kidney", "pancreas"),
    ("left kidney", "left adrenal gland"),
    ("left kidney", "colon"),
    ("left kidney", "aorta"),
    ("stomach", "pancreas"),
    ("stomach", "left lung"),
    ("stomach", "esophagus"),
    ("stomach", "duodenum"),
    ("stomach", "colon"),
    ("stomach", "heart"),
    ("pancreas", "duodenum"),
    ("pancreas", "aorta"),
    ("pancreas", "small bowel"),
    ("pancreas", "portal vein and splenic vein"),
    ("pancreas", "left adrenal gland"),
    ("duodenum", "small bowel"),
    ("duodenum", "colon"),
    ("duodenum", "aorta"),
    ("right lung", "left lung"),
    ("right lung", "heart"),
    ("right lung", "esophagus"),
    ("right lung", "trachea"),
    ("right lung", "inferior vena cava"),
    ("left lung", "heart"),
    ("left lung", "aorta"),
    ("left lung", "esophagus"),
    ("left lung", "trachea"),
    ("heart", "aorta"),
    ("heart", "esophagus"),
    ("aorta", "esophagus"),
    ("aorta", "trachea"),
    ("aorta", "spinal cord"),
    ("esophagus", "trachea"),
    ("left adrenal gland", "aorta"),
    ("urinary bladder", "colon"),
    ("urinary bladder", "small bowel"),
    ("urinary bladder", "rectum"),
    ("urinary bladder", "prostate or uterus"),
    ("colon", "small bowel"),
    ("colon", "rectum"),
    ("rectum", "prostate or uterus"),
    ("rectum", "sacrum"),
    ("small bowel", "prostate or uterus"),
)

GOLDEN_ANGLE = 137.50776405003785  # degrees: successive hues as far from each other as they can be


def _golden(value: int) -> RGB:
    """A deterministic colour for a value nobody picked: its golden-angle hue at fixed lightness
    and saturation, so nearby values (often related categories) get distant hues."""
    r, g, b = colorsys.hls_to_rgb((value * GOLDEN_ANGLE % 360) / 360, 0.55, 0.65)
    return round(r * 255), round(g * 255), round(b * 255)


@cache
def _picked(vocabulary: Vocabulary) -> dict[int, RGB]:
    """HAND_PICKED by vocabulary index (names the vocabulary lacks are ignored)."""
    out = {}
    for rgb, names in HAND_PICKED.items():
        for name in names:
            category = vocabulary.by_name.get(name.lower())
            if category is not None:
                out[category.index] = rgb
    return out


def colour(value: int, vocabulary: Vocabulary | None = None) -> RGB:
    """The colour of a label value: a category's vocabulary index, or a free value (224 on)."""
    return _picked(vocabulary or default_vocabulary()).get(value) or _golden(value)


def _linear(channel: int) -> float:
    c = channel / 255
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


D65 = (0.95047, 1.0, 1.08883)
SRGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)


def cielab(rgb: RGB) -> tuple[float, float, float]:
    """CIE L*a*b* (D65) of an sRGB colour."""
    linear = [_linear(c) for c in rgb]
    xyz = [sum(m * c for m, c in zip(row, linear)) / white for row, white in zip(SRGB_TO_XYZ, D65)]

    def f(t: float) -> float:
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    fx, fy, fz = (f(t) for t in xyz)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def cielab_dicom(rgb: RGB) -> tuple[int, int, int]:
    """RecommendedDisplayCIELabValue of an sRGB colour: three uint16 (PS3.3 C.10.7.1.1)."""
    lightness, a, b = cielab(rgb)

    def scaled(v: float, low: float, high: float) -> int:
        return min(0xFFFF, max(0, round((v - low) * 0xFFFF / (high - low))))

    return scaled(lightness, 0, 100), scaled(a, -128, 127), scaled(b, -128, 127)


def delta_e(one: RGB, other: RGB) -> float:
    """CIE76 colour difference: about 2.3 is just noticeable; 20 and more tell regions apart at a glance."""
    return math.dist(cielab(one), cielab(other))


def catalog(vocabulary: Vocabulary, configured: tuple[str, ...] | list[str]) -> list[dict]:
    """Every category with its colour, for the page's label search: the configured ones first, in
    their order, then the rest by name."""
    first = [c for c in (vocabulary.resolve(n).category for n in configured) if c is not None]
    first = list({c.index: c for c in first}.values())
    chosen = {c.index for c in first}
    rest = sorted((c for c in vocabulary.categories if c.index not in chosen), key=lambda c: (c.name.lower(), c.index))
    return [
        {"index": c.index, "name": c.name, "colour": list(colour(c.index, vocabulary)), "configured": c.index in chosen}
        for c in first + rest
    ]
