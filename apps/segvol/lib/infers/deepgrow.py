"""Clicks (Slicer and OHIF deepgrow), with Slicer's ROI box and segment name."""

from __future__ import annotations

from lib.infers.base import SegVolInferTask
from lib.serving.params import PromptBuilder, Target, _list, explicit, slicer_roi, with_texts


class SegVolDeepgrow(SegVolInferTask):
    """``foreground`` / ``background`` clicks, ``roi`` box, and ``label`` (the segment's name, used
    as a text prompt when it names a SegVol category). The mask is written with the label's
    /info index (a free value from 224 up for names outside the vocabulary), reported in label_names."""

    def __init__(self, service, team) -> None:
        super().__init__(
            service, team, "deepgrow", "SegVol: positive/negative clicks and an ROI box, with the segment name"
        )

    def targets(self, params: dict, builder: PromptBuilder) -> list[Target]:
        texts, points, labels, box = explicit(params)
        fg, bg = _list(params, "foreground"), _list(params, "background")
        points = points + fg + bg
        labels = (labels or [1] * (len(points) - len(fg) - len(bg))) + [1] * len(fg) + [0] * len(bg)
        if box is None:
            box = slicer_roi(params, builder.shape)
        label = params.get("label")
        if isinstance(label, str) and label.strip() and not texts:
            if builder.vocabulary.resolve(label).category is not None:
                return [builder.target(label, points, labels, box, name=label)]
            return [builder.target(None, points, labels, box, name=label)]
        return with_texts(builder, texts, points, labels, box)
