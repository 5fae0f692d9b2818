"""Transformer building blocks shared by the families: SDPA attention with key-padding masks, MLP, pre-LN
encoder and decoder blocks, and fixed sin-cos position tables.

Masks follow one convention everywhere: a boolean ``key_valid`` ``[B, Nk]`` with True = this key may be
attended to (the opposite of 4M's "True = ignore" masks). A query row whose keys are all invalid would make
softmax return NaN; :func:`_safe_keys` lets such rows see their first key instead, so fully padded samples
give finite (and unused) outputs.

Packed tokens: a batch of variable-length samples padded to ``[B, N]`` wastes the per-token work (norms,
projections, MLPs: most of the FLOPs) on padding. With a :class:`Packing` of the ``valid`` mask, blocks take
the real tokens only, ``[T, D]`` with ``T = valid.sum()``; only the attention core (SDPA) runs padded, on
buckets of samples of similar length, each padded to its own longest.
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


class Packing:
    """The real tokens of a padded ``[B, N]`` layout (``valid [B, N]``), packed row-major into ``[T, C]``.

    Attention runs on length buckets: samples sorted by their real length and cut into ``groups`` buckets, each
    padded only to its own longest sample (``groups=1``: one bucket padded to the batch maximum). Inside a
    bucket a sample's real tokens sit first, in order; attention has no causal mask and positions are already
    in the embeddings, so moving a token within its row changes nothing. Cross-attention lays the context out
    with the queries' buckets (:meth:`layout` of the same samples). Index tensors are built once per packing,
    on the CPU (one device sync per layout, none with ``host``)."""

    def __init__(self, valid: torch.Tensor, groups: int = 1, host: torch.Tensor | None = None):
        """``host``: a CPU copy of ``valid`` when the caller has one (no device sync)."""
        if groups < 1:
            raise ValueError(f"attention groups must be >= 1, got {groups}")
        self.valid = valid
        self.shape = tuple(valid.shape)
        v = (valid if host is None else host).detach().cpu()
        self.device = valid.device
        self.lengths = v.sum(1)
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths
        self.flat = v.reshape(-1).nonzero().squeeze(1).to(self.device)
        order = torch.argsort(self.lengths, stable=True)
        self.groups = [g for g in torch.tensor_split(order, min(groups, max(len(order), 1))) if len(g)]
        self._layouts: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return int(self.flat.numel())

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` -> ``[T, C]`` (the real tokens, row-major)."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.flat)

    def layout(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows [b, n], valid [b, n])`` for ``samples``: the packed row of each of their real tokens, padded to
        their longest with row ``T`` (point it at an appended zero row)."""
        key = tuple(samples.tolist())
        if key not in self._layouts:
            lengths, starts = self.lengths[samples], self.starts[samples]
            n = max(int(lengths.max()), 1)
            i = torch.arange(n)[None]
            ok = i < lengths[:, None]
            rows = torch.where(ok, starts[:, None] + i, len(self))
            self._layouts[key] = (rows.to(self.device), ok.to(self.device))
        return self._layouts[key]


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
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        pack: Packing | None = None,
        context_pack: Packing | None = None,
    ) -> torch.Tensor:
        """Padded: ``x [B, N, D]`` (``context [B, Nk, D]``). Packed (``pack`` given): ``x [T, D]`` and
        ``context [Tk, D]`` (``context_pack``; self-attention uses ``pack``); ``key_valid`` then comes from the
        packing. Returns the layout of ``x``."""
        ctx = x if context is None else context
        q, kv = self.q(x), self.kv(ctx)
        if pack is None:
            return self.proj(self._attend(q, kv, key_valid))
        # packed: the projections ran on real tokens only; attend bucket by bucket (Packing)
        context_pack = pack if context is None else context_pack
        if context_pack is None:
            raise ValueError("packed cross-attention needs the context's packing")
        q0, kv0 = F.pad(q, (0, 0, 0, 1)), F.pad(kv, (0, 0, 0, 1))  # row T: zeros for the padding
        out = q.new_empty(q.shape)
        for samples in pack.groups:
            q_rows, q_ok = pack.layout(samples)
            k_rows, k_ok = context_pack.layout(samples)
            o = self._attend(q0[q_rows], kv0[k_rows], k_ok)
            out[q_rows[q_ok]] = o[q_ok]
        return self.proj(out)

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        """SDPA of ``q [b, n, D]`` over ``kv [b, m, 2D]`` -> ``[b, n, D]``."""
        b, n, d = q.shape
        q = q.view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = kv.view(b, kv.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = None if key_valid is None else _safe_keys(key_valid)[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, d)


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

    def forward(
        self, x: torch.Tensor, key_valid: torch.Tensor | None = None, pack: Packing | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_valid=key_valid, pack=pack)
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
        pack: Packing | None = None,
        context_pack: Packing | None = None,
    ) -> torch.Tensor:
        y = y + self.self_attn(self.norm1(y), key_valid=query_valid, pack=pack)
        ctx = self.norm_ctx(context)
        y = y + self.cross_attn(self.norm2(y), ctx, key_valid=context_valid, pack=pack, context_pack=context_pack)
        return y + self.mlp(self.norm3(y))


def sincos_1d(n: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Fixed 1-D sin-cos table ``[n, dim]`` (dim even)."""
    return sincos_at(torch.arange(n, dtype=torch.float64), dim, base)


def sincos_at(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Sin-cos features ``[n, dim]`` of (possibly fractional) ``positions [n]``, the same functions as
    :func:`sincos_1d` (which is this at 0, 1, ..., n - 1)."""
    if dim % 2:
        raise ValueError(f"sin-cos position dim must be even, got {dim}")
    n = positions.shape[0]
    pos = positions.to(torch.float64)[:, None]
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
