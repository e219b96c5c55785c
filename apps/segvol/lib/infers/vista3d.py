"""OHIF v3's monai-label panel: class prompts, point prompts and Auto-Segmentation."""

from __future__ import annotations

import logging

from lib.infers.base import SegVolInferTask
from lib.serving.params import ParamError, PromptBuilder, Target, _list, explicit, with_texts

log = logging.getLogger(__name__)


class SegVolVista3D(SegVolInferTask):
    """``label_prompt`` indices become text prompts (several share one engine call); with
    ``points`` the (single) class name is combined with the clicks. Output values are the
    /info label indices, which OHIF copies into its labelmap."""

    def __init__(self, service, team) -> None:
        super().__init__(service, team, "vista3d", "SegVol: class prompts (text) and point prompts, as OHIF sends them")

    def targets(self, params: dict, builder: PromptBuilder) -> list[Target]:
        texts, points, labels, box = explicit(params)
        indices = _list(params, "label_prompt")
        names = [builder.by_index(i) for i in indices]
        if points and len(names) > 1:
            raise ParamError(f"point prompts take one class in label_prompt, got {len(names)}: {indices}")
        settings = self.service.settings
        if not points and not box and len(names) > settings.auto_max_labels:
            asked = set(names)
            names = [n for n in settings.auto_labels if builder.vocabulary.resolve(n).name in asked]
            log.info(
                "Auto-Segmentation asked for %d labels: segmenting the configured %d: %s",
                len(asked),
                len(names),
                ", ".join(names),
            )
            if not names:
                raise ParamError("Auto-Segmentation: none of the configured auto_labels is among the labels asked for")
        return with_texts(builder, texts + names, points, labels, box)
