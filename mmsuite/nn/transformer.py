"""Transformer building blocks shared by every family: one SDPA attention (key-padding and causal masks, packing,
grouped key/value heads, RoPE, a key/value cache), GELU MLP and SwiGLU, a pre-norm self-attention block (LayerNorm
or RMSNorm), the 4M decoder block, RoPE tables and fixed sin-cos position tables.

Masks follow one convention everywhere: a boolean ``key_valid`` ``[B, Nk]`` with True = this key may be
attended to (the opposite of 4M's "True = ignore" masks). A query row whose keys are all invalid would make
softmax return NaN; :func:`_safe_rows` lets such rows see their first key instead, so fully padded samples
give finite (and unused) outputs.

Packed tokens: a batch of variable-length samples padded to ``[B, N]`` wastes the per-token work (norms,
projections, MLPs: most of the FLOPs) on padding. With a :class:`Packing` of the ``valid`` mask, blocks take
the real tokens only, ``[T, D]`` with ``T = valid.sum()``; only the attention core (SDPA) runs padded, on
buckets of samples of similar length, each padded to its own longest.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def _safe_rows(mask: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask (last dim: keys) with the first key switched on in rows that have no allowed key,
    so softmax never returns NaN (such rows are padding; their outputs are finite and unused)."""
    empty = ~mask.any(dim=-1, keepdim=True)
    first = torch.zeros_like(mask)
    first[..., 0] = True
    return mask | (empty & first)


class Packing:
    """The real tokens of a padded ``[B, N]`` layout (``valid [B, N]``), packed row-major into ``[T, C]``.

    Attention runs on length buckets: samples sorted by their real length and cut into ``groups`` buckets, each
    padded only to its own longest sample (``groups=1``: one bucket padded to the batch maximum). Inside a
    bucket a sample's real tokens sit first, in order, so a causal mask over the bucket is causal over the real
    tokens, and RoPE tables travel with their tokens (one row per packed token). Cross-attention lays the context out
    with the queries' buckets (:meth:`layout` of the same samples; :meth:`buckets` for both sides at once). Index
    tensors are built once per packing, on the CPU (one device sync per packing, none with ``host``)."""

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
        self._buckets: dict[Packing, Buckets] = {}

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
            rows, ok = self._host_layout(samples)
            self._layouts[key] = (rows.to(self.device), ok.to(self.device))
        return self._layouts[key]

    def _host_layout(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`layout` on the CPU."""
        lengths, starts = self.lengths[samples], self.starts[samples]
        i = torch.arange(max(int(lengths.max()), 1))[None]
        ok = i < lengths[:, None]
        return torch.where(ok, starts[:, None] + i, len(self)), ok

    def buckets(self, context: Packing) -> Buckets:
        """How this packing's tokens attend over ``context``'s (itself for self-attention), bucket by bucket, with
        one gather per side and one for the outputs, so that the backward pass adds each side's gradient into one
        buffer instead of one per bucket (cached per context)."""
        if context not in self._buckets:
            q_index, k_index, shapes, key_valid, out_slots = [], [], [], [], []
            offset = 0
            for samples in self.groups:
                q_rows, q_ok = self._host_layout(samples)
                k_rows, k_ok = context._host_layout(samples)
                (b, n), m = q_rows.shape, k_rows.shape[1]
                q_index.append(q_rows.reshape(-1))
                k_index.append(k_rows.reshape(-1))
                shapes.append((b, n, m))
                key_valid.append(k_ok.to(self.device))
                out_slots.append((q_rows[q_ok], offset + q_ok.reshape(-1).nonzero().squeeze(1)))
                offset += b * n
            out_index = torch.empty(len(self), dtype=torch.long)
            for rows, slots in out_slots:  # every packed row sits in exactly one bucket slot
                out_index[rows] = slots
            to = self.device
            self._buckets[context] = Buckets(
                torch.cat(q_index).to(to), torch.cat(k_index).to(to), shapes, key_valid, out_index.to(to)
            )
        return self._buckets[context]


class Buckets(NamedTuple):
    """Attention layout of :meth:`Packing.buckets`: rows of the padded (row ``T`` = zeros) queries and keys to
    gather, bucket after bucket (``[sum b n]``, ``[sum b m]``), each bucket's ``(b, n, m)`` and key mask ``[b, m]``,
    and for each packed query token the row of the concatenated bucket outputs that holds it (``[T]``)."""

    q_index: torch.Tensor
    k_index: torch.Tensor
    shapes: list[tuple[int, int, int]]
    key_valid: list[torch.Tensor]
    out_index: torch.Tensor


def rope_tables(length: int, head_dim: int, base: float = 10_000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[length, head_dim]`` for rotary embeddings over positions 0..length-1 (rotate-half layout)."""
    return rope_tables_at(torch.arange(length, device=device, dtype=torch.float32), head_dim, base)


def rope_tables_at(positions: torch.Tensor, head_dim: int, base: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[..., head_dim]`` for rotary embeddings at ``positions [...]`` (any shape, e.g. per packed
    token); :func:`rope_tables` is this at 0, 1, ..., length - 1."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[..., L, head_dim]`` by position (tables ``[L, head_dim]``, or any shape that broadcasts,
    e.g. ``[B, 1, L, head_dim]`` for per-sample positions); computed in float32."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention over ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPUs).

    Self-attention when ``context`` is None, cross-attention otherwise. Options, in any combination that makes
    sense: QK-norm (RMSNorm per head), grouped key/value heads (``kv_heads`` < ``heads``), rotary positions
    (``rope`` = cos/sin tables, self-attention), a causal mask (self-attention), key-padding masks (``key_valid``),
    packed tokens (:class:`Packing`) and a key/value cache for incremental decoding (:meth:`forward_cached`).
    Parameters: ``q``, ``kv`` (keys then values), ``proj``, ``q_norm``, ``k_norm``.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, bias: bool = False, *, kv_heads: int | None = None):
        super().__init__()
        kv_heads = heads if kv_heads is None else int(kv_heads)
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by heads {heads}")
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads {kv_heads} must divide heads {heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=bias)
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
        causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Padded: ``x [B, N, D]`` (``context [B, Nk, D]``), ``key_valid [B, Nk]``, ``rope`` tables ``[N, head_dim]``
        (or broadcastable to ``[B, heads, N, head_dim]``). Packed (``pack`` given): ``x [T, D]`` and ``context
        [Tk, D]`` (``context_pack``; self-attention uses ``pack``), ``key_valid`` then comes from the packing and
        ``rope`` holds one row per packed token, ``[T, head_dim]``. ``causal``: position ``i`` sees keys ``<= i`` (in
        packed mode: the real tokens up to it, in order). Returns the layout of ``x``."""
        if context is not None and (causal or rope is not None):
            raise ValueError("causal masks and RoPE are for self-attention (context must be None)")
        ctx = x if context is None else context
        q, kv = self.q(x), self.kv(ctx)
        if pack is None:
            return self.proj(self._attend(q, kv, key_valid, causal, rope))
        # packed: the projections ran on real tokens only; attend bucket by bucket (Packing)
        context_pack = pack if context is None else context_pack
        if context_pack is None:
            raise ValueError("packed cross-attention needs the context's packing")
        return self.proj(self._attend_packed(q, kv, pack, context_pack, causal, rope))

    @torch.compiler.disable
    def _attend_packed(self, q, kv, pack: Packing, context_pack: Packing, causal: bool, rope) -> torch.Tensor:
        """Attention of packed ``q [T, D]`` over packed ``kv [Tk, ·]``, bucket by bucket. Left to eager mode under
        ``torch.compile``: the bucket layouts are Python-level and differ every batch."""
        plan = pack.buckets(context_pack)
        q_sizes = [b * n for b, n, _ in plan.shapes]
        pad = (0, 0, 0, 1)  # row T: zeros for the padding
        qs = F.pad(q, pad).index_select(0, plan.q_index).split(q_sizes)
        ks = F.pad(kv, pad).index_select(0, plan.k_index).split([b * m for b, _, m in plan.shapes])
        rots = [None] * len(qs)
        if rope is not None:
            cos, sin = (F.pad(t, pad).index_select(0, plan.q_index).split(q_sizes) for t in rope)
            rots = [(c.view(b, 1, n, -1), s.view(b, 1, n, -1)) for c, s, (b, n, _) in zip(cos, sin, plan.shapes)]
        out = []
        for qb, kb, (b, n, m), k_ok, rot in zip(qs, ks, plan.shapes, plan.key_valid, rots):
            out.append(self._attend(qb.view(b, n, -1), kb.view(b, m, -1), k_ok, causal, rot).reshape(b * n, -1))
        return torch.cat(out).index_select(0, plan.out_index)

    def _heads(self, q: torch.Tensor, kv: torch.Tensor):
        """``q [b, n, D]``, ``kv [b, m, 2·kv_heads·head_dim]`` -> per-head ``q, k, v`` ``[b, heads, ·, head_dim]``
        with QK-norm applied."""
        b, n, _ = q.shape
        q = q.view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = kv.view(b, kv.shape[1], 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v

    def _sdpa(self, q, k, v, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """SDPA over per-head tensors -> ``[b, n, heads·head_dim]``."""
        b, _, n, _ = q.shape
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.kv_heads != self.heads
        )
        return out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)

    def _attend(self, q, kv, key_valid=None, causal: bool = False, rope=None) -> torch.Tensor:
        """SDPA of ``q [b, n, D]`` over ``kv [b, m, ·]`` -> ``[b, n, D]``."""
        q, k, v = self._heads(q, kv)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if key_valid is None:
            return self._sdpa(q, k, v, causal=causal)
        mask = key_valid[:, None, None, :]
        if causal:
            n, m = q.shape[2], k.shape[2]
            mask = mask & torch.ones(n, m, dtype=torch.bool, device=q.device).tril(diagonal=m - n)
        return self._sdpa(q, k, v, _safe_rows(mask))

    def forward_cached(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Causal self-attention of ``n`` new positions ``x [b, n, D]`` to ``past`` keys/values (``[b, kv_heads, P,
        head_dim]``, RoPE already applied) and to themselves; ``rope`` holds the new positions' tables (None: no
        RoPE). Returns ``(out, (k, v))`` with the new positions' keys/values, for the caller to append once they are
        final. Equal to :meth:`forward` with ``causal=True`` over all ``P + n`` positions, restricted to the new
        ones (tested)."""
        q, k, v = self._heads(self.q(x), self.kv(x))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2))
        n = x.shape[1]
        p = keys.shape[2] - n
        mask = None
        if n > 1:  # new position i sees every past position and new positions <= i
            mask = torch.ones(n, p + n, dtype=torch.bool, device=x.device).tril(diagonal=p)
        return self.proj(self._sdpa(q, keys, values, mask)), (k, v)


class MLP(nn.Module):
    """``fc2(GELU(fc1(x)))``, hidden width ``ratio·dim``."""

    def __init__(self, dim: int, ratio: float = 4.0, bias: bool = False):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden, bias=bias), nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def swiglu_hidden(dim: int, ratio: float = 4.0, multiple: int = 64) -> int:
    """SwiGLU hidden width for the parameter count of a ``ratio·dim`` GELU MLP: ``ratio·dim·2/3``, rounded up to
    a multiple of ``multiple`` (LLaMA's convention)."""
    return -(-int(ratio * dim * 2 / 3) // multiple) * multiple


class SwiGLU(nn.Module):
    """``down(SiLU(gate) · up)`` with ``gate, up`` from one projection ``gate_up``."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


NORMS = {"layer": nn.LayerNorm, "rms": nn.RMSNorm}


class Block(nn.Module):
    """Pre-norm self-attention layer: ``x += Attn(norm1(x)); x += MLP(norm2(x))``.

    ``norm``: ``layer`` (LayerNorm) or ``rms`` (RMSNorm); ``mlp``: ``gelu`` (:class:`MLP`, ``mlp_ratio``) or
    ``swiglu`` (:class:`SwiGLU`, hidden :func:`swiglu_hidden` of ``mlp_ratio`` unless ``mlp_hidden`` is given).
    :meth:`forward` passes the attention options (``key_valid``, ``pack``, ``causal``, ``rope``) through; a layer
    that lays its tokens out differently for attention overrides :meth:`mix`."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        *,
        kv_heads: int | None = None,
        norm: str = "layer",
        mlp: str = "gelu",
        mlp_hidden: int | None = None,
    ):
        super().__init__()
        if norm not in NORMS or mlp not in ("gelu", "swiglu"):
            raise ValueError(f"norm must be one of {list(NORMS)} and mlp 'gelu' or 'swiglu', got {norm!r}, {mlp!r}")
        self.norm1, self.attn = NORMS[norm](dim), Attention(dim, heads, qk_norm, kv_heads=kv_heads)
        self.norm2 = NORMS[norm](dim)
        if mlp == "gelu":
            self.mlp = MLP(dim, mlp_ratio)
        else:
            self.mlp = SwiGLU(dim, mlp_hidden or swiglu_hidden(dim, mlp_ratio))

    def mix(self, h: torch.Tensor, **attn) -> torch.Tensor:
        """The token-mixing step on normed inputs ``h``: attention."""
        return self.attn(h, **attn)

    def forward(self, x: torch.Tensor, **attn) -> torch.Tensor:
        x = x + self.mix(self.norm1(x), **attn)
        return x + self.mlp(self.norm2(x))

    def forward_cached(self, x: torch.Tensor, rope, past):
        """:meth:`forward` (causal) for new positions ``x [b, n, D]`` after the cached ones ``past``; returns ``(x,
        (k, v))`` with this layer's new keys/values (:meth:`Attention.forward_cached`)."""
        h, kv = self.attn.forward_cached(self.norm1(x), rope, past)
        x = x + h
        return x + self.mlp(self.norm2(x)), kv


class DecoderBlock(nn.Module):
    """Pre-LN: self-attention among the queries, cross-attention to the context, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, heads, qk_norm=qk_norm)
        self.norm2, self.cross_attn = nn.LayerNorm(dim), Attention(dim, heads, qk_norm=qk_norm)
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
