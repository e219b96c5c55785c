"""3D ViT image encoder of SegVol.

Parameter names follow the official checkpoint (the layout of MONAI's ViT with a
perceptron patch embedding), so official weights load with strict checking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Patchify(nn.Module):
    """Cut a B x C x D x H x W volume into B x N x (pd*ph*pw*C) patch vectors.

    Patches are ordered d, h, w (d outermost); inside a patch the elements are
    ordered (p_d, p_h, p_w, c), the order the official perceptron embedding uses.
    """

    def __init__(self, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        pd, ph, pw = self.patch_size
        x = x.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, (d // pd) * (h // ph) * (w // pw), pd * ph * pw * c)


class PatchEmbedding(nn.Module):
    def __init__(
        self, in_channels: int, img_size: tuple[int, int, int], patch_size: tuple[int, int, int], hidden_size: int
    ) -> None:
        super().__init__()
        n_patches = 1
        for s, p in zip(img_size, patch_size):
            if s % p:
                raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
            n_patches *= s // p
        patch_dim = in_channels * patch_size[0] * patch_size[1] * patch_size[2]
        self.patch_embeddings = nn.Sequential(Patchify(patch_size), nn.Linear(patch_dim, hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_patches, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embeddings(x) + self.position_embeddings


class SelfAttention(nn.Module):
    """Multi-head self-attention with a bias-free fused qkv projection.

    ``fused=True`` uses torch's scaled_dot_product_attention (same maths, another
    kernel order: float noise only); ``fused=False`` is the explicit softmax(QK^T)V
    of the official code.
    """

    def __init__(self, hidden_size: int, num_heads: int, fused: bool = True) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = fused
        self.qkv = nn.Linear(hidden_size, hidden_size * 3, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # the qkv output splits as (3, heads, head_dim), 3 outermost
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, hidden_size: int, mlp_dim: int, num_heads: int, fused: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = SelfAttention(hidden_size, num_heads, fused)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = MLP(hidden_size, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """Volume B x 1 x D x H x W -> embedding B x hidden x D/pd x H/ph x W/pw."""

    def __init__(
        self,
        img_size: tuple[int, int, int],
        patch_size: tuple[int, int, int],
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        self.grid = tuple(s // p for s, p in zip(img_size, patch_size))
        self.patch_embedding = PatchEmbedding(1, img_size, patch_size, hidden_size)
        self.blocks = nn.ModuleList(Block(hidden_size, mlp_dim, num_heads, fused_attention) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)

    def set_fused_attention(self, fused: bool) -> None:
        for blk in self.blocks:
            blk.attn.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        b, _, c = x.shape
        return x.transpose(1, 2).reshape(b, c, *self.grid)
