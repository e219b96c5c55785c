"""3D Slicer's segmentation panel: the text prompt is an editable option."""

from __future__ import annotations

from lib.infers.base import SegVolInferTask
from lib.serving.params import ParamError, PromptBuilder, Target, explicit, with_texts

DEFAULT_TEXTS = "liver, spleen, right kidney, left kidney"


class SegVolSegmentation(SegVolInferTask):
    """``texts``: category names separated by commas (one label each, values = /info indices)."""

    def __init__(self, service, team) -> None:
        super().__init__(
            service,
            team,
            "segmentation",
            "SegVol: segment the categories named in 'texts' (comma-separated)",
            config={"texts": DEFAULT_TEXTS},
        )

    def targets(self, params: dict, builder: PromptBuilder) -> list[Target]:
        texts, points, labels, box = explicit(params)
        if not texts and not points and box is None:
            raise ParamError("no prompt: set 'texts' to one or more category names, e.g. 'liver, spleen'")
        return with_texts(builder, texts, points, labels, box)
