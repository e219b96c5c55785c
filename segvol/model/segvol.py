"""SegVol assembled from its parts, and the named configurations it is built from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig

from segvol.model.image_encoder import ImageEncoderViT
from segvol.model.mask_decoder import MaskDecoder
from segvol.model.prompt_encoder import PromptEncoder
from segvol.model.text_encoder import TextEncoder
from segvol.model.transformer import TwoWayTransformer


@dataclass(frozen=True)
class SegVolConfig:
    """Sizes of every part. ``segvol-official`` is the released model; small ones are for tests."""

    spatial_size: tuple[int, int, int] = (32, 256, 256)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    embed_dim: int = 768
    vit_layers: int = 12
    vit_heads: int = 12
    vit_mlp_dim: int = 3072
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    clip: dict = field(default_factory=dict)  # CLIPTextConfig overrides; empty = CLIP ViT-B/32 text tower

    @property
    def embedding_grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.spatial_size, self.patch_size))

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS: dict[str, SegVolConfig] = {
    "segvol-official": SegVolConfig(),
    "segvol-tiny": SegVolConfig(
        spatial_size=(16, 64, 64),
        patch_size=(4, 16, 16),
        embed_dim=64,
        vit_layers=2,
        vit_heads=4,
        vit_mlp_dim=128,
        decoder_depth=2,
        decoder_heads=4,
        decoder_mlp_dim=128,
        iou_head_hidden_dim=32,
        clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    ),
}


class SegVol(nn.Module):
    """Image encoder, prompt encoder, mask decoder and text encoder, with encoding and
    decoding as separate calls so one encoding serves many prompts."""

    def __init__(self, config: SegVolConfig = CONFIGS["segvol-official"], fused_attention: bool = True) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoderViT(
            config.spatial_size,
            config.patch_size,
            config.embed_dim,
            config.vit_mlp_dim,
            config.vit_layers,
            config.vit_heads,
            fused_attention,
        )
        self.mask_decoder = MaskDecoder(
            config.embed_dim,
            TwoWayTransformer(config.decoder_depth, config.embed_dim, config.decoder_heads, config.decoder_mlp_dim),
            config.embedding_grid,
            text_dim=config.embed_dim,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        )
        self.prompt_encoder = PromptEncoder(config.embed_dim, config.embedding_grid, config.spatial_size)
        self.text_encoder = TextEncoder(CLIPTextConfig(**config.clip), config.embed_dim)

    def set_fast_kernels(self, enabled: bool) -> None:
        """Fused attention in the encoder and matmul upscaling in the decoder (default), or the
        official kernels (explicit attention, ConvTranspose3d): the same maths, float noise apart."""
        self.image_encoder.set_fused_attention(enabled)
        self.mask_decoder.matmul_upscaling = enabled

    def encode_image(self, volume: torch.Tensor) -> torch.Tensor:
        """B x 1 x D x H x W (the model's spatial size) -> B x C x d x h x w."""
        return self.image_encoder(volume)

    def encode_text(self, names: list[str]) -> torch.Tensor:
        return self.text_encoder(names)

    def decode(
        self,
        image_embedding: torch.Tensor,
        text_embedding: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        upsample: bool = True,
    ) -> torch.Tensor:
        """Mask logits B x 1 x D x H x W (trilinear from the low-resolution grid), or the
        low-resolution logits with ``upsample=False``. Prompts are model-space voxels."""
        sparse, dense = self.prompt_encoder(points, boxes, text_embedding)
        low_res = self.mask_decoder(image_embedding, self.prompt_encoder.get_dense_pe(), sparse, dense, text_embedding)
        if not upsample:
            return low_res
        return F.interpolate(low_res, size=self.config.spatial_size, mode="trilinear", align_corners=False)
