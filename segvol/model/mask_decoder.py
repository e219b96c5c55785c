"""Mask decoder: two-way transformer, 3D upscaling, hypernetwork masks, text similarity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segvol.model.transformer import TwoWayTransformer


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Predicts the low-resolution mask (4x the embedding grid) of mask token 0.

    With a text embedding, the similarity of the text (projected to the upscaled
    width) with every upscaled voxel feature is added to the mask logits.
    """

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        embedding_grid: tuple[int, int, int],
        text_dim: int = 768,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        up_grid = tuple(2 * g for g in embedding_grid)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            nn.LayerNorm((transformer_dim // 4, *up_grid)),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        # trained but unused at inference (only mask token 0 is returned); kept for strict loading
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)
        self.txt_align_upscaled_embedding = nn.Linear(text_dim, transformer_dim // 8)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        text_embedding: torch.Tensor | None,
    ) -> torch.Tensor:
        """Returns B x 1 x (4d) x (4h) x (4w) low-resolution mask logits.

        ``image_embeddings`` is 1 x C x d x h x w (shared by all B prompts) or B x C x d x h x w.
        """
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(sparse_prompt_embeddings.shape[0], -1, -1)
        tokens = torch.cat((tokens, sparse_prompt_embeddings), dim=1)
        src = image_embeddings
        if src.shape[0] != tokens.shape[0]:
            src = src.expand(tokens.shape[0], *src.shape[1:])
        src = src + dense_prompt_embeddings
        pos_src = image_pe.expand(tokens.shape[0], *image_pe.shape[1:])
        b, c, d, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        mask_token_out = hs[:, 1, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, d, h, w))
        b, c, d, h, w = upscaled.shape
        hyper_in = self.output_hypernetworks_mlps[0](mask_token_out).unsqueeze(1)
        flat = upscaled.reshape(b, c, d * h * w)
        masks = hyper_in @ flat
        if text_embedding is not None:
            masks = masks + self.txt_align_upscaled_embedding(text_embedding).unsqueeze(1) @ flat
        return masks.reshape(b, 1, d, h, w)
