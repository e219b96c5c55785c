"""CLIP text tower + the 512->768 alignment layer, as SegVol prompts it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

PROMPT_TEMPLATE = "A computerized tomography of a {}."
BUNDLED_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"


def load_tokenizer(directory: str | Path | None = None) -> CLIPTokenizerFast:
    """The CLIP BPE tokenizer from ``directory`` (a weights snapshot), else the bundled copy."""
    return CLIPTokenizerFast.from_pretrained(str(directory or BUNDLED_TOKENIZER))


class TextEncoder(nn.Module):
    """Category names -> B x ``out_dim`` embeddings (CLIP pooled output, then ``dim_align``)."""

    def __init__(self, clip_config: CLIPTextConfig, out_dim: int, tokenizer: CLIPTokenizerFast | None = None) -> None:
        super().__init__()
        self.clip_text_model = CLIPTextModel(clip_config)
        self.dim_align = nn.Linear(clip_config.hidden_size, out_dim)
        self.tokenizer = tokenizer or load_tokenizer()
        self.clip_text_model.requires_grad_(False)

    def tokenize(self, names: list[str]) -> dict[str, torch.Tensor]:
        texts = [PROMPT_TEMPLATE.format(n) for n in names]
        tokens = dict(self.tokenizer(texts, padding=True, return_tensors="pt"))
        limit = self.clip_text_model.config.max_position_embeddings
        if tokens["input_ids"].shape[1] > limit:
            from segvol.prompts import PromptError

            raise PromptError(f"text prompt too long for CLIP ({tokens['input_ids'].shape[1]} tokens, at most {limit})")
        return tokens

    def forward(self, names: list[str]) -> torch.Tensor:
        device = self.dim_align.weight.device
        tokens = {k: v.to(device) for k, v in self.tokenize(names).items()}
        pooled = self.clip_text_model(**tokens).pooler_output
        return self.dim_align(pooled)
