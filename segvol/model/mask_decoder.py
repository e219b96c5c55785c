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


def conv_transpose_blocks(x: torch.Tensor, conv: nn.ConvTranspose3d) -> torch.Tensor:
    """A kernel-2 stride-2 transposed convolution as one matmul. Its output blocks do not overlap:
    each input voxel's 2x2x2 block is the voxel's features times the kernel (2x faster than
    ConvTranspose3d on a CPU, equal to float noise). Channel-last input (b, d, h, w, c) ->
    blocks (b, d, h, w, o, 8), not yet interleaved into space."""
    b, d, h, w, c = x.shape
    o = conv.out_channels
    y = torch.addmm(conv.bias.repeat_interleave(8), x.reshape(-1, c), conv.weight.reshape(c, o * 8))
    return y.view(b, d, h, w, o, 8)


def interleave(blocks: torch.Tensor) -> torch.Tensor:
    """(b, d, h, w, o, 8) blocks -> (b, o, 2d, 2h, 2w), as ConvTranspose3d lays its output out."""
    b, d, h, w, o = blocks.shape[:5]
    x = blocks.view(b, d, h, w, o, 2, 2, 2).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, o, 2 * d, 2 * h, 2 * w)


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
        # the upscaling as matmuls (faster, float noise); False: ConvTranspose3d, as the official code
        self.matmul_upscaling = True

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
        hyper_in = self.output_hypernetworks_mlps[0](hs[:, 1, :])  # mask token 0
        text = self.txt_align_upscaled_embedding(text_embedding) if text_embedding is not None else None
        if not self.matmul_upscaling:
            up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, d, h, w))
            flat = up.flatten(2)
            masks = hyper_in.unsqueeze(1) @ flat
            if text is not None:
                masks = masks + text.unsqueeze(1) @ flat
            return masks.view(b, 1, *up.shape[2:])
        conv1, norm, gelu1, conv2, gelu2 = self.output_upscaling
        # src is already channel-last (b, d*h*w, c): the upscaling runs as matmuls on it
        up = gelu1(norm(interleave(conv_transpose_blocks(src.reshape(b, d, h, w, c), conv1))))
        blocks = gelu2(conv_transpose_blocks(up.permute(0, 2, 3, 4, 1), conv2))  # (b, 2d, 2h, 2w, c/8, 8)
        # the mask is a per-voxel dot product with the upscaled features, so it is taken on the
        # blocks and only the one-channel result is interleaved
        masks = hyper_in[:, None, None, None, None, :] @ blocks
        if text is not None:
            masks = masks + text[:, None, None, None, None, :] @ blocks
        return interleave(masks)
