"""Transformer building blocks shared by the families: SDPA attention with key-padding masks, MLP, pre-LN
encoder and decoder blocks, and fixed sin-cos position tables.

Masks follow one convention everywhere: a boolean ``key_valid`` ``[B, Nk]`` with True = this key may be
attended to (the opposite of 4M's "True = ignore" masks). A query row whose keys are all invalid would make
softmax return NaN; :func:`_safe_keys` lets such rows see their first key instead, so fully padded samples
give finite (and unused) outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _safe_keys(key_valid: torch.Tensor) -> torch.Tensor:
    """``key_valid`` with the first key switched on in rows that have no valid key (no NaN from softmax)."""
    empty = ~key_valid.any(dim=1, keepdim=True)
    first = torch.zeros_like(key_valid)
    first[:, 0] = True
    return key_valid | (empty & first)


class Attention(nn.Module):
    """Multi-head attention over ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPUs).

    Self-attention when ``context`` is None, cross-attention otherwise. Optional QK-norm (RMSNorm per head).
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, key_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, n, d = x.shape
        ctx = x if context is None else context
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = None if key_valid is None else _safe_keys(key_valid)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float = 4.0, bias: bool = False):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden, bias=bias), nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-LN: ``x += SA(LN(x)); x += MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, qk_norm)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_valid=key_valid)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Pre-LN: self-attention among the queries, cross-attention to the context, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, heads, qk_norm)
        self.norm2, self.cross_attn = nn.LayerNorm(dim), Attention(dim, heads, qk_norm)
        self.norm_ctx = nn.LayerNorm(dim)
        self.norm3, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_ratio)

    def forward(
        self,
        y: torch.Tensor,
        context: torch.Tensor,
        query_valid: torch.Tensor | None = None,
        context_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = y + self.self_attn(self.norm1(y), key_valid=query_valid)
        y = y + self.cross_attn(self.norm2(y), context=self.norm_ctx(context), key_valid=context_valid)
        return y + self.mlp(self.norm3(y))


def sincos_1d(n: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Fixed 1-D sin-cos table ``[n, dim]`` (dim even)."""
    if dim % 2:
        raise ValueError(f"sin-cos position dim must be even, got {dim}")
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)[None]
    out = torch.zeros(n, dim, dtype=torch.float64)
    out[:, 0::2], out[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return out.float()


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table ``[h * w, dim]`` in raster order: half the channels for rows, half for columns."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position dim must be divisible by 4, got {dim}")
    rows, cols = sincos_1d(h, dim // 2), sincos_1d(w, dim // 2)
    return torch.cat([rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)], dim=-1).reshape(h * w, dim)
