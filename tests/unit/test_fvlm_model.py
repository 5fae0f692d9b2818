"""Foveated VLM network: sequence layout, labels, next-frame target, query wiring, per-sample scaling, passes,
controls, loss, and the KV-cached frame-by-frame loops against the parallel passes."""

from __future__ import annotations

import pytest
import torch

from mmsuite.lightning_modules.fvlm.model import (
    IGNORE,
    AttentionGlimpse,
    FiLMSettings,
    FoveatedVLM,
    FVLMLossSettings,
    FVLMSettings,
    GlimpseSettings,
    LMSettings,
    ShallowGlimpse,
    caption_labels,
    fvlm_loss,
    next_frame_pairs,
    training_passes,
)
from mmsuite.settings import SettingsError, parse

B, T, N, D, L, C, VOCAB, EOS = 3, 5, 10, 16, 6, 2, 40, 0


def _settings(**kw) -> FVLMSettings:
    base = dict(
        feature_dim=D,
        latent_channels=C,
        fine_iterations=2,
        glimpse=GlimpseSettings(heads=2),
        lm=LMSettings(
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
            max_positions=64,
        ),
        film=FiLMSettings(channels=[8, 8], mlp_dim=16),
    )
    base.update(kw)
    return FVLMSettings(**base)


def _model(**kw) -> FoveatedVLM:
    torch.manual_seed(0)
    model = FoveatedVLM(_settings(**kw)).eval()
    with torch.no_grad():  # start the FiLM modulation away from zero so the head reads the LM state
        model.film.mlp[-1].weight.normal_(0, 0.1) if model.film is not None else None
    return model


@pytest.fixture(scope="module")
def model() -> FoveatedVLM:
    return _model()


@pytest.fixture(scope="module")
def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, VOCAB, (B, L), generator=g)
    lengths = torch.tensor([L, 4, 1])  # the last caption is EOS alone
    mask = torch.arange(L)[None] < lengths[:, None]
    text[torch.arange(B), lengths - 1] = EOS
    text[~mask] = 7  # padding: any valid id
    return {
        "features": torch.randn(B, T, N, D, generator=g).half(),  # stored as fp16
        "text_ids": text,
        "text_mask": mask,
        "latents": torch.randn(B, T, C, 4, 4, generator=g),
    }


def _run(model, batch, **kw):
    with torch.no_grad():
        return model(batch["features"], batch["text_ids"], batch["text_mask"], batch["latents"], **kw)


# -- layout and labels ----------------------------------------------------------------------------------------


def test_caption_labels_supervise_the_first_token_and_eos(batch):
    labels = caption_labels(batch["text_ids"], batch["text_mask"], T)
    assert labels.shape == (B, T + 1 + L)
    assert (labels[:, : T + 1] == IGNORE).all()  # mode token and frames: no caption label
    for b, n in enumerate(batch["text_mask"].sum(1).tolist()):
        assert labels[b, T + 1] == batch["text_ids"][b, 0]  # predicted from <sep>
        assert labels[b, T + n] == EOS  # the last supervised label is EOS
        assert (labels[b, T + 1 + n :] == IGNORE).all()
        assert (labels[b] != IGNORE).sum() == n


def test_caption_loss_reads_the_sep_state_and_the_eos_label_and_ignores_padding(model, batch):
    hidden = torch.randn(B, T + 1 + L, 32)
    labels = caption_labels(batch["text_ids"], batch["text_mask"], T)
    nll, tokens = model.caption_nll(hidden, labels)
    assert tokens.tolist() == batch["text_mask"].sum(1).tolist()
    moved = hidden.clone()
    moved[:, T + 1] += 1.0  # the <sep> state: it predicts the first caption token
    assert (model.caption_nll(moved, labels)[0] != nll).all()
    moved = hidden.clone()
    moved[:, : T + 1] += 1.0  # mode token and frame states: unlabelled
    moved[1, T + 1 + 4 :] += 1.0  # past sample 1's EOS label
    torch.testing.assert_close(model.caption_nll(moved, labels)[0], nll, rtol=0, atol=0)
    other = labels.clone()
    other[1, T + 4] = 5  # sample 1's EOS label (4 tokens) replaced: its loss changes, no other's
    changed = model.caption_nll(hidden, other)[0]
    assert changed[1] != nll[1] and changed[0] == nll[0] and changed[2] == nll[2]


# -- reconstruction -------------------------------------------------------------------------------------------


def test_reconstruction_target_is_the_next_frame():
    hidden = torch.arange(T + 1 + L, dtype=torch.float)[None, :, None].expand(2, -1, 3)  # value = position
    latents = torch.arange(T, dtype=torch.float)[None, :, None, None, None].expand(2, T, C, 4, 4)  # value = frame
    state, previous, target = next_frame_pairs(hidden, latents)
    # frame t (0-based, t >= 1) is at position t + 1; it is predicted from position t (frame t - 1's token)
    assert state[0, :, 0].tolist() == [1, 2, 3, 4]
    assert previous[0, :, 0, 0, 0].tolist() == [0, 1, 2, 3]
    assert target[0, :, 0, 0, 0].tolist() == [1, 2, 3, 4]


def test_no_frame_is_reconstructed_from_a_state_that_has_seen_it(model, batch):
    """Changing the last frame's features changes the captions but no pass's reconstruction: every frame is
    predicted from states before its own token."""
    base = _run(model, batch)
    other = dict(batch, features=batch["features"].clone())
    other["features"][:, -1] = torch.randn(B, N, D).half()
    moved = _run(model, other)
    for p, q in zip(base, moved):
        torch.testing.assert_close(p.rec, q.rec, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(p.caption_nll, q.caption_nll)
    target = dict(batch, latents=batch["latents"].clone())
    target["latents"][:, -1] += 1.0  # the last frame's latent is a target: the loss sees it
    assert not torch.allclose(_run(model, target)[-1].rec, base[-1].rec)


# -- queries and scaling ----------------------------------------------------------------------------------------


def test_fine_query_of_frame_t_comes_from_frame_t_minus_1(model):
    hidden = torch.randn(B, T, 32)
    with torch.no_grad():
        q = model.fine_queries(hidden)
        for t in range(1, T):
            moved = hidden.clone()
            moved[:, t - 1] += 1.0
            changed = (model.fine_queries(moved) != q).any(dim=-1).any(dim=0)
            assert changed.nonzero().flatten().tolist() == [t]
        assert (q[:, 0] == model.q_init).all()  # frame 1: the learned initial query
        moved = hidden.clone()
        moved[:, -1] += 1.0  # the last frame's state feeds no query
        assert torch.equal(model.fine_queries(moved), q)


def test_visual_scaling_does_not_mix_samples(model, batch):
    base = _run(model, batch)
    other = dict(batch, features=batch["features"].clone(), latents=batch["latents"].clone())
    other["features"][1:] = (other["features"][1:].float() * 10 + 3).half()  # samples 2 and 3, far off scale
    other["latents"][1:] *= 5
    moved = _run(model, other)
    for p, q in zip(base, moved):
        torch.testing.assert_close(p.glimpses[0], q.glimpses[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.caption_nll[0], q.caption_nll[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.rec[0], q.rec[0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(p.caption_nll[1:], q.caption_nll[1:])
    e = model.visual_tokens(torch.randn(2, T, model.glimpse.out_dim) * torch.tensor([1.0, 100.0])[:, None, None])
    rms = e.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, float(model.visual_scale.detach())), rtol=1e-4, atol=0)


# -- glimpses ---------------------------------------------------------------------------------------------------


def test_shallow_glimpse_is_one_softmax_over_the_raw_features():
    torch.manual_seed(0)
    g = ShallowGlimpse(8, D)
    assert g.query_proj.bias is None
    q, patches = torch.randn(B, T, 8), torch.randn(B, T, N, D)
    z, attn = g(q, patches)
    want = torch.softmax(torch.einsum("btd,btnd->btn", g.query_proj(q), patches) / D**0.5, dim=-1)
    torch.testing.assert_close(attn[:, :, 0], want)
    torch.testing.assert_close(z, torch.einsum("btn,btnd->btd", want, patches))


def test_attention_glimpse_keys_ignore_what_every_patch_of_a_frame_shares():
    torch.manual_seed(0)
    g = AttentionGlimpse(8, D, dim=16, heads=4, temperature=0.5)
    q, patches = torch.randn(B, T, 8), torch.randn(B, T, N, D)
    z, attn = g(q, patches)
    assert z.shape == (B, T, 16) and attn.shape == (B, T, 4, N)
    torch.testing.assert_close(attn.sum(-1), torch.ones(B, T, 4))
    shifted = patches + torch.randn(B, T, 1, D) * 5  # a common component per frame
    torch.testing.assert_close(g(q, shifted)[1], attn, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(g(q, shifted)[0], z)  # values keep it
    sharper = AttentionGlimpse(8, D, dim=16, heads=4, temperature=0.1)
    sharper.load_state_dict({**g.state_dict(), "log_temperature": torch.full((4,), -2.3)})
    assert sharper(q, patches)[1].amax(-1).mean() > attn.amax(-1).mean()


# -- passes, controls, loss -------------------------------------------------------------------------------------


def test_passes_and_scoring(model, batch):
    passes = _run(model, batch)
    assert [p.name for p in passes] == ["coarse", "fine_1", "fine_2"]
    for p in passes:
        assert (
            p.glimpses.shape == (B, T, D) and p.attention.shape == (B, T, 2, N) and p.frame_hidden.shape == (B, T, 32)
        )
        assert p.caption_nll.shape == (B,) and p.rec.shape == (B,)
    calls = []
    head = model.lm.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    try:
        scored = _run(model, batch, scored={2})
    finally:
        hook.remove()
    n_labels = int(batch["text_mask"].sum())
    assert calls == [(n_labels, 32)]  # one LM head call, on labelled positions only
    assert scored[0].caption_nll is None and scored[1].caption_nll is None and scored[1].rec is None
    torch.testing.assert_close(scored[2].caption_nll, passes[2].caption_nll, rtol=1e-5, atol=1e-5)


def test_shuffled_queries_come_from_another_sample(model, batch):
    plain = _run(model, batch, fine_iterations=1)
    shuffled = _run(model, batch, fine_iterations=1, shuffle_queries=True)
    torch.testing.assert_close(shuffled[0].caption_nll, plain[0].caption_nll)
    with torch.no_grad():
        q = model.fine_queries(plain[0].frame_hidden).roll(1, dims=0)
        want, _ = model.glimpses(q, batch["features"])
    torch.testing.assert_close(shuffled[1].glimpses, want)
    assert not torch.allclose(shuffled[1].glimpses, plain[1].glimpses)
    with pytest.raises(ValueError, match="at least 2 samples"):
        model(batch["features"][:1], batch["text_ids"][:1], batch["text_mask"][:1], shuffle_queries=True)


def test_loss_is_caption_plus_weighted_reconstruction(model, batch):
    passes = _run(model, batch)
    c, f = passes[0], passes[-1]
    total, parts = fvlm_loss(passes, FVLMLossSettings())
    want = f.cap + 0.1 * f.rec.mean() + 1.0 * (c.cap + 0.1 * c.rec.mean())
    torch.testing.assert_close(total, want)
    assert set(parts) == {"cap_coarse", "rec_coarse", "cap_fine_2", "rec_fine_2"}
    torch.testing.assert_close(f.cap, f.caption_nll.sum() / batch["text_mask"].sum())
    no_coarse = FVLMLossSettings(lambda_coarse=0.0)
    assert training_passes(no_coarse, 2) == (2, {2})
    torch.testing.assert_close(fvlm_loss(passes, no_coarse)[0], f.cap + 0.1 * f.rec.mean())
    assert training_passes(FVLMLossSettings(), 2) == (2, {0, 2})


def test_coarse_only_trains_the_coarse_pass_alone(model, batch):
    loss = FVLMLossSettings(coarse_only=True)
    k, scored = training_passes(loss, 2)
    assert (k, scored) == (0, {0})
    passes = _run(model, batch, fine_iterations=k, scored=scored)
    assert [p.name for p in passes] == ["coarse"]
    total, parts = fvlm_loss(passes, loss)
    torch.testing.assert_close(total, passes[0].cap + 0.1 * passes[0].rec.mean())
    assert set(parts) == {"cap_coarse", "rec_coarse"}


def test_gradients_reach_every_part_through_the_last_pass(batch):
    model = _model().train()
    passes = model(batch["features"], batch["text_ids"], batch["text_mask"], batch["latents"], scored={2})
    fvlm_loss(passes, FVLMLossSettings(lambda_coarse=0.0))[0].backward()
    for name in ("q_static", "q_init", "llm_to_query.weight", "visual_scale", "sep_token", "mode_tokens"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


# -- frame by frame with the KV cache ---------------------------------------------------------------------------


def test_cached_loop_matches_the_parallel_passes_for_one_fine_pass(model, batch):
    """The loop that runs the coarse and the fine pass in lockstep, frame by frame, gives the parallel training
    pass's caption loss for both passes."""
    parallel = _run(model, batch, fine_iterations=1)
    stream = model.stream_caption_nll(
        batch["features"], batch["text_ids"], batch["text_mask"], fine_iterations=1, query_source="previous_pass"
    )
    assert stream.names == ["coarse", "fine_1"]
    for s, p in enumerate(parallel):
        torch.testing.assert_close(stream.caption_nll[s], p.caption_nll, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stream.glimpses[s], p.glimpses, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stream.caption_tokens[s], p.caption_tokens)


def test_true_autoregressive_loop_is_the_fixed_point_of_the_fine_passes(model, batch):
    """Frame t's query from the same running pass at frame t - 1: equal to T parallel fine passes (pass k gets
    frames 1..k right), and not to one fine pass after the coarse pass."""
    ar = model.stream_caption_nll(batch["features"], batch["text_ids"], batch["text_mask"], query_source="same_pass")
    assert ar.names == ["autoregressive"] and ar.caption_nll.shape == (1, B)
    deep = _run(model, batch, fine_iterations=T)
    torch.testing.assert_close(ar.caption_nll[0], deep[-1].caption_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ar.glimpses[0], deep[-1].glimpses, rtol=1e-5, atol=1e-5)
    one = _run(model, batch, fine_iterations=1)
    assert not torch.allclose(ar.glimpses[0], one[-1].glimpses, rtol=1e-4, atol=1e-5)


def test_greedy_generation_is_the_argmax_of_the_parallel_pass(model, batch):
    out = model.generate(
        batch["features"], eos_id=EOS, max_new_tokens=8, fine_iterations=1, query_source="previous_pass"
    )
    assert out.tokens.shape[:2] == (2, B) and out.tokens.shape[2] <= 8
    assert out.attention.shape == (2, B, T, 2, N)
    tokens = out.tokens[1]  # the fine pass's captions
    ended = (tokens == EOS).cumsum(1) > 0
    assert (tokens[ended] == EOS).all()  # after the first EOS only EOS
    # teacher-force the generated caption through the parallel fine pass: every token is that pass's argmax
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        coarse = model.run_pass(0, model.q_static.expand(B, T, -1), batch["features"])
        fine_q = model.fine_queries(coarse.frame_hidden)
        z, _ = model.glimpses(fine_q, batch["features"])
        seq = [model.mode_tokens[1].expand(B, 1, -1), model.visual_tokens(z), model.sep_token.expand(B, 1, -1)]
        hidden, _ = model._lm(torch.cat([*seq, model.text_embeddings(tokens[:, :-1])], dim=1))
        labels = caption_labels(tokens, mask, T)
        logits = model.lm.get_output_embeddings()(hidden[labels != IGNORE]).view(B, -1, VOCAB)
    first_eos = torch.where(ended.any(1), ended.float().argmax(1), tokens.shape[1] - 1)
    for b in range(B):
        n = int(first_eos[b]) + 1
        assert torch.equal(logits[b, :n].argmax(-1), tokens[b, :n])


# -- the LM, settings -------------------------------------------------------------------------------------------


def test_lm_loads_from_a_local_folder(tmp_path):
    torch.manual_seed(0)
    lm = FoveatedVLM(_settings()).lm
    lm.to(torch.bfloat16).save_pretrained(tmp_path)  # a bf16 checkpoint, as released LMs often are
    model = FoveatedVLM(_settings(lm=LMSettings(path=str(tmp_path), vocab_size=VOCAB)))
    loaded = model.lm
    assert type(loaded) is type(lm) and {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(loaded.get_input_embeddings().weight, lm.get_input_embeddings().weight.float())
    # a token space with more ids (the specials) grows the embeddings and keeps the LM's own rows
    grown = FoveatedVLM(_settings(lm=LMSettings(path=str(tmp_path), vocab_size=VOCAB + 3))).lm
    assert grown.get_input_embeddings().num_embeddings == VOCAB + 3
    assert grown.get_output_embeddings().weight.shape[0] == VOCAB + 3
    torch.testing.assert_close(grown.get_input_embeddings().weight[:VOCAB], lm.get_input_embeddings().weight.float())
    features, text = torch.randn(1, T, N, D), torch.tensor([[3, 4, EOS]])
    assert model(features, text, torch.ones_like(text, dtype=torch.bool))[-1].cap.isfinite()
    with pytest.raises(FileNotFoundError, match="model.lm.path="):
        FoveatedVLM(_settings(lm=LMSettings(path=str(tmp_path / "missing"))))


def test_a_qwen3_backbone_and_the_shallow_glimpse_run(batch):
    torch.manual_seed(0)
    lm = LMSettings(model_type="qwen3", vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_positions=64)  # fmt: skip
    model = FoveatedVLM(_settings(lm=lm, glimpse=GlimpseSettings(kind="shallow"), latent_channels=0)).eval()
    assert type(model.lm).__name__ == "Qwen3ForCausalLM"
    passes = _run(model, dict(batch, latents=None), fine_iterations=1)
    assert passes[-1].rec is None and passes[-1].attention.shape == (B, T, 1, N)
    stream = model.stream_caption_nll(
        batch["features"], batch["text_ids"], batch["text_mask"], fine_iterations=1, query_source="previous_pass"
    )
    torch.testing.assert_close(stream.caption_nll[1], passes[1].caption_nll, rtol=1e-5, atol=1e-5)


def test_settings_are_typed_and_errors_name_the_key():
    s = parse(FVLMSettings, {"glimpse": {"heads": 8}, "film": {"channels": [4]}}, "model.net")
    assert isinstance(s, FVLMSettings) and s.glimpse.heads == 8 and s.glimpse.kind == "attention"
    assert s.film.channels == [4] and s.lm.vocab_size == 512
    assert parse(FVLMLossSettings, {}, "model.loss") == FVLMLossSettings(0.1, 1.0, False)
    bad = [
        ({"glimpse": {"kind": "deep"}}, "model.net.glimpse.kind must be one of"),
        ({"fine_iterations": -1}, "model.net.fine_iterations must be >= 0"),
        ({"glimpse": {"heads": 5}}, "model.net.glimpse.dim (64) is not divisible"),
        ({"lm": {"hidden_size": 30}}, "model.net.lm.hidden_size"),
        ({"film": {"channels": []}}, "model.net.film.channels needs"),
        ({"glimpse": {"headz": 2}}, "model.net.glimpse.headz: unknown setting"),
    ]
    for values, message in bad:
        with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse(FVLMSettings, values, "model.net")
    with pytest.raises(SettingsError, match="model.loss.lambda_recon must be >= 0"):
        parse(FVLMLossSettings, {"lambda_recon": -1}, "model.loss")


def test_greedy_generation_picks_only_allowed_ids(model, batch):
    allowed = torch.zeros(model.lm.get_input_embeddings().num_embeddings, dtype=torch.bool)
    allowed[[3, 5]] = True  # e.g. the ids a text tokenizer can write, and EOS (5)
    out = model.generate(batch["features"], eos_id=5, max_new_tokens=6, allowed=allowed)
    assert set(out.tokens.unique().tolist()) <= {3, 5}
