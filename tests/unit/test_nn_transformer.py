"""The shared blocks of mmsuite.nn.transformer: one attention for every family (key padding, causal, GQA, RoPE,
packing, KV cache), checked against a written-out reference and against itself where the math is the same."""

from __future__ import annotations

import math

import pytest
import torch

from mmsuite.nn.transformer import (
    Attention,
    Block,
    Packing,
    SwiGLU,
    apply_rope,
    rope_tables,
    rope_tables_at,
    swiglu_hidden,
)

DIM, HEADS = 32, 4


def _attn(kv_heads=None, qk_norm=True, seed=0) -> Attention:
    torch.manual_seed(seed)
    a = Attention(DIM, HEADS, qk_norm, kv_heads=kv_heads)
    for p in a.parameters():  # random norms too, so QK-norm's weights matter
        torch.nn.init.normal_(p, std=0.3)
    return a


def _reference(a: Attention, x, key_valid=None, causal=False, rope=None):
    """Softmax attention written out with einsum, key/value heads repeated per group."""
    b, n, _ = x.shape
    q = a.q(x).view(b, n, a.heads, a.head_dim).transpose(1, 2)
    k, v = a.kv(x).view(b, n, 2, a.kv_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k = a.q_norm(q), a.k_norm(k)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    rep = a.heads // a.kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(a.head_dim)
    allowed = torch.ones(b, 1, n, n, dtype=torch.bool)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    out = torch.einsum("bhnm,bhmd->bhnd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    return a.proj(out.transpose(1, 2).reshape(b, n, DIM))


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_the_written_out_reference(kv_heads, causal):
    a = _attn(kv_heads)
    x = torch.randn(2, 7, DIM)
    rope = rope_tables(7, a.head_dim)
    want = _reference(a, x, causal=causal, rope=rope)
    assert torch.allclose(a(x, causal=causal, rope=rope), want, atol=1e-5)
    valid = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    want = _reference(a, x, key_valid=valid, causal=causal)
    got = a(x, key_valid=valid, causal=causal)  # explicit mask path (SDPA attn_mask, causal folded in)
    assert torch.allclose(got, want, atol=1e-5)


def test_the_causal_flag_and_the_explicit_causal_mask_agree():
    a, x = _attn(2), torch.randn(3, 6, DIM)
    rope = rope_tables(6, a.head_dim)
    flag = a(x, causal=True, rope=rope)  # SDPA is_causal
    explicit = a(x, causal=True, rope=rope, key_valid=torch.ones(3, 6, dtype=torch.bool))  # tril & keys mask
    assert torch.allclose(flag, explicit, atol=1e-6)


def test_grouped_heads_equal_full_heads_with_repeated_key_value_weights():
    g = _attn(kv_heads=2)
    full = Attention(DIM, HEADS, kv_heads=HEADS, qk_norm=True)
    state = dict(g.state_dict())
    kv = state["kv.weight"].view(2, 2, g.head_dim, DIM)  # (k|v, group, head_dim, dim)
    state["kv.weight"] = kv.repeat_interleave(HEADS // 2, dim=1).reshape(2 * DIM, DIM)
    full.load_state_dict(state)
    x = torch.randn(2, 5, DIM)
    assert torch.allclose(g(x, causal=True), full(x, causal=True), atol=1e-6)


def test_the_kv_cache_gives_the_uncached_causal_output_step_by_step():
    a, x = _attn(kv_heads=2), torch.randn(2, 7, DIM)
    cos, sin = rope_tables(7, a.head_dim)
    full = a(x, causal=True, rope=(cos, sin))
    past, outs = None, []
    for lo, hi in ((0, 3), (3, 4), (4, 7)):  # a prompt, one step, then a chunk of three
        out, (k, v) = a.forward_cached(x[:, lo:hi], (cos[lo:hi], sin[lo:hi]), past)
        past = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        outs.append(out)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)
    assert past[0].shape == (2, 2, 7, a.head_dim)  # the cache holds kv_heads, not heads


def test_rope_depends_only_on_relative_positions():
    a, x = _attn(), torch.randn(2, 6, DIM)
    pos = torch.arange(6)
    at = lambda p: a(x, causal=True, rope=rope_tables_at(p.float(), a.head_dim))  # noqa: E731
    assert torch.allclose(at(pos), at(pos + 37), atol=1e-4)
    assert not torch.allclose(at(pos), at(pos * 2), atol=1e-3)  # other distances: other outputs
    cos, sin = rope_tables(6, a.head_dim)
    assert torch.equal(torch.stack(rope_tables_at(pos.float(), a.head_dim)), torch.stack([cos, sin]))
    # the score of two rotated vectors is that of the unrotated ones turned by their offset alone
    q, k = torch.randn(a.head_dim), torch.randn(a.head_dim)
    c, s = rope_tables_at(torch.tensor([3.0, 10.0, 103.0, 110.0]), a.head_dim)
    rq, rk = apply_rope(q.expand(4, -1), c, s), apply_rope(k.expand(4, -1), c, s)
    assert torch.allclose(rq[0] @ rk[1], rq[2] @ rk[3], atol=1e-4)


def test_padded_keys_change_nothing_and_empty_rows_stay_finite():
    a, x = _attn(), torch.randn(2, 6, DIM)
    valid = torch.tensor([[True] * 6, [True, True, False, True, False, False]])
    out = a(x, key_valid=valid)
    y = x.clone()
    y[1, [2, 4, 5]] = torch.randn(3, DIM)  # other content at the invalid keys (their queries change, unused)
    assert torch.allclose(a(y, key_valid=valid)[1, [0, 1, 3]], out[1, [0, 1, 3]], atol=1e-6)
    empty = torch.zeros(2, 6, dtype=torch.bool)
    assert torch.isfinite(a(x, key_valid=empty)).all()
    assert torch.isfinite(a(x, key_valid=empty, causal=True)).all()


@pytest.mark.parametrize("causal", [False, True])
def test_packed_attention_equals_padded_with_rope_and_causal_masks(causal):
    a = _attn(kv_heads=2)
    lengths = [5, 2, 7, 4]
    valid = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    x = torch.randn(4, 7, DIM)
    pos = torch.arange(7).expand(4, 7)
    cos, sin = rope_tables_at(pos.float(), a.head_dim)  # [B, N, hd]: per-sample tables
    padded = a(x, key_valid=valid, causal=causal, rope=(cos[:, None], sin[:, None]))
    for groups in (1, 3):
        pack = Packing(valid, groups)
        packed = a(pack.pack(x), pack=pack, causal=causal, rope=(pack.pack(cos), pack.pack(sin)))
        assert torch.allclose(packed, padded[valid], atol=1e-5)


def test_attention_rejects_what_it_cannot_do():
    a, x = _attn(), torch.randn(1, 3, DIM)
    with pytest.raises(ValueError, match="self-attention"):
        a(x, x, causal=True)
    with pytest.raises(ValueError, match="kv_heads 3 must divide heads 4"):
        Attention(DIM, HEADS, kv_heads=3)
    with pytest.raises(ValueError, match="even head dim"):
        rope_tables(4, 7)


def test_block_parameters_keep_their_names_shapes_and_order():
    """Checkpoints of both families name these parameters; the creation order fixes the seeded init."""
    torch.manual_seed(0)
    enc = Block(DIM, HEADS, 4.0, False)  # 4M encoder: LayerNorm, GELU MLP
    assert [(n, tuple(p.shape)) for n, p in enc.named_parameters()] == [
        ("norm1.weight", (DIM,)),
        ("norm1.bias", (DIM,)),
        ("attn.q.weight", (DIM, DIM)),
        ("attn.kv.weight", (2 * DIM, DIM)),
        ("attn.proj.weight", (DIM, DIM)),
        ("norm2.weight", (DIM,)),
        ("norm2.bias", (DIM,)),
        ("mlp.fc1.weight", (4 * DIM, DIM)),
        ("mlp.fc2.weight", (DIM, 4 * DIM)),
    ]
    hidden = swiglu_hidden(DIM, 4.0)
    lm = Block(DIM, HEADS, qk_norm=True, kv_heads=2, norm="rms", mlp="swiglu")  # dynamics / LM layer
    assert [(n, tuple(p.shape)) for n, p in lm.named_parameters()] == [
        ("norm1.weight", (DIM,)),
        ("attn.q.weight", (DIM, DIM)),
        ("attn.kv.weight", (DIM, DIM)),  # 2 x kv_heads 2 x head_dim 8
        ("attn.proj.weight", (DIM, DIM)),
        ("attn.q_norm.weight", (DIM // HEADS,)),
        ("attn.k_norm.weight", (DIM // HEADS,)),
        ("norm2.weight", (DIM,)),
        ("mlp.gate_up.weight", (2 * hidden, DIM)),
        ("mlp.down.weight", (DIM, hidden)),
    ]
    assert swiglu_hidden(256, 4.0) == 704 and swiglu_hidden(48, 4.0) == 128  # 2/3 of 4x, up to a multiple of 64


def test_block_cached_forward_matches_the_causal_forward():
    torch.manual_seed(1)
    blk, x = Block(DIM, HEADS, qk_norm=True, kv_heads=1, norm="rms", mlp="swiglu"), torch.randn(2, 5, DIM)
    cos, sin = rope_tables(5, DIM // HEADS)
    full = blk(x, causal=True, rope=(cos, sin))
    first, kv = blk.forward_cached(x[:, :3], (cos[:3], sin[:3]), None)
    rest, _ = blk.forward_cached(x[:, 3:], (cos[3:], sin[3:]), kv)
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5)


def test_swiglu_is_silu_gate_times_up():
    torch.manual_seed(2)
    m, x = SwiGLU(8, 16), torch.randn(3, 8)
    gate, up = m.gate_up.weight[:16], m.gate_up.weight[16:]
    want = m.down(torch.nn.functional.silu(x @ gate.T) * (x @ up.T))
    assert torch.allclose(m(x), want, atol=1e-6)
