"""SAM-style 3D prompt encoder: points, boxes and text become sparse tokens.

Coordinates are model-space voxels (d, h, w) of the zoom-out volume. Two quirks of
the official model are kept because the trained weights depend on them: coordinate 0
is normalised by size[1] and coordinate 1 by size[0], and the dense positional
grid stacks its axes as (h, d, w).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LayerNorm2d(nn.Module):
    """Channel LayerNorm of the (unused at inference) 2D mask-prompt branch."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of coordinates normalised to [0, 1]."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((3, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Dense PE of a grid (a, b, c) -> C x a x b x c."""
        a, b, c = size
        device = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((a, b, c), device=device, dtype=torch.float32)
        pos0 = (grid.cumsum(dim=0) - 0.5) / a
        pos1 = (grid.cumsum(dim=1) - 0.5) / b
        pos2 = (grid.cumsum(dim=2) - 0.5) / c
        pe = self._pe_encoding(torch.stack([pos1, pos0, pos2], dim=-1))
        return pe.permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int, int]) -> torch.Tensor:
        """B x N x 3 model-space coordinates -> B x N x C."""
        scale = torch.tensor([image_size[1], image_size[0], image_size[2]], dtype=coords.dtype, device=coords.device)
        return self._pe_encoding((coords / scale).to(torch.float32))


class PromptEncoder(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int, int],
        input_image_size: tuple[int, int, int],
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: negative point, 1: positive point, 2/3: box corners
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        # kept for strict loading: SegVol never passes mask prompts
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """1 x C x d x h x w positional encoding of the image-embedding grid."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # voxel centre
        if pad:
            points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        emb = torch.where((labels == -1)[..., None], torch.zeros_like(emb), emb)
        emb = emb + (labels == -1)[..., None] * self.not_a_point_embed.weight
        emb = emb + (labels == 0)[..., None] * self.point_embeddings[0].weight
        return emb + (labels == 1)[..., None] * self.point_embeddings[1].weight

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 3)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return emb + corner_embed

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        text_embedding: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse tokens (points, box corners, text, in that order) and the dense no-mask embedding.

        Arguments:
          points: (B x N x 3 coordinates, B x N labels in {1, 0, -1}) or None.
          boxes: B x 6 inclusive [d0, h0, w0, d1, h1, w1] or None.
          text_embedding: B x C or None.
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif text_embedding is not None:
            bs = text_embedding.shape[0]
        else:
            bs = 1
        tokens = [torch.empty((bs, 0, self.embed_dim), device=self.no_mask_embed.weight.device)]
        if points is not None:
            tokens.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes))
        if text_embedding is not None:
            tokens.append(text_embedding.unsqueeze(1))
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return torch.cat(tokens, dim=1), dense
