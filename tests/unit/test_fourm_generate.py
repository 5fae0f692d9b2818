import pytest
import torch

from mmsuite.lightning_modules.fourm.generate import (
    filter_logits,
    generate,
    generate_chain,
    plan_from_known,
    pose_constraint,
    sample,
    temperature_at,
    tokens_per_step,
)
from mmsuite.lightning_modules.fourm.masking import fixed_plan
from mmsuite.lightning_modules.fourm.model import FourMNetSettings
from mmsuite.tokenizers.pose import PoseQuantizer

QUANT = PoseQuantizer(bins=8, canvas=16)  # vocab 11, 39 tokens
MODALITIES = [
    {"name": "img", "kind": "image", "grid": [2, 2], "length": 4, "vocab": 7},
    {"name": "pose", "kind": "pose", "length": 39, "vocab": QUANT.vocab_size},
    {"name": "img_next", "kind": "image", "grid": [2, 2], "length": 4, "vocab": 7, "share_with": "img"},
    {"name": "seq", "kind": "seq", "length": 5, "vocab": 9},
]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return FourMNetSettings(dim=16, encoder_depth=1, decoder_depth=1, heads=2).build(MODALITIES).eval()


def random_state(net, b=3, seed=0, p_known=0.5):
    g = torch.Generator().manual_seed(seed)
    seg = net.segment
    vocab = torch.tensor(net.vocabs)[seg]
    tokens = (torch.rand(b, net.seq_len, generator=g) * vocab).long()
    known = torch.rand(b, net.seq_len, generator=g) < p_known
    return tokens, known


def mod_mask(net, name):
    return net.segment == net.index(name)


# -- plan ---------------------------------------------------------------------------------------------------
def test_plan_from_known_matches_fixed_plan_and_pads_per_row(net):
    b, seg = 2, net.segment
    known = mod_mask(net, "img")[None].expand(b, -1).clone()
    targets = mod_mask(net, "pose")[None].expand(b, -1) | mod_mask(net, "seq")[None].expand(b, -1)
    got, want = plan_from_known(known, targets, seg), fixed_plan(net.lengths, b, [0], [1, 3])
    for f in ("enc_index", "enc_valid", "dec_index", "dec_valid", "b_in", "b_tg"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert (got.n_real_input, got.n_real_target) == (want.n_real_input, want.n_real_target)

    known[1] = False
    known[1, [3, 50]] = True
    p = plan_from_known(known, torch.zeros_like(known), seg)
    assert p.enc_index.shape == (2, 4) and p.enc_valid.sum(1).tolist() == [4, 2]
    assert p.enc_index[1].tolist() == [3, 50, 0, 0] and p.b_in[1].tolist() == [1, 0, 0, 1]
    assert p.dec_index.shape == (2, 1) and not p.dec_valid.any()  # no target anywhere: one padding slot
    with pytest.raises(ValueError, match="overlap"):
        plan_from_known(known, known, seg)


# -- helpers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_tokens_per_step_sums_exactly(schedule):
    for n in range(0, 60, 7):
        for steps in (1, 2, 3, 8, 25, 49):
            parts = tokens_per_step(n, steps, schedule)
            assert len(parts) == steps and sum(parts) == n and min(parts) >= 0
            if steps <= n:
                assert min(parts) >= 1
    cos = tokens_per_step(256, 8, "cosine")
    assert cos[0] < cos[3] and cos[-1] < cos[4]  # few tokens at the ends, most in the middle
    assert tokens_per_step(10, 3, "linear") == [4, 3, 3]
    with pytest.raises(ValueError):
        tokens_per_step(5, 0)


def test_temperature_at():
    assert temperature_at(0, 5, 6.0, 0.5) == 6.0 and temperature_at(4, 5, 6.0, 0.5) == 0.5
    assert temperature_at(2, 5, 6.0, 0.5) == pytest.approx(3.25)
    assert temperature_at(3, 5, 2.0, 0.5, "constant") == 2.0 == temperature_at(3, 5, 2.0, None)
    assert temperature_at(0, 1, 2.0, 0.5) == 2.0


def test_filter_logits_returns_a_new_tensor():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 20, generator=g)
    before = logits.clone()
    out = filter_logits(logits, top_k=3)
    assert torch.equal(logits, before) and out.data_ptr() != logits.data_ptr()
    assert (torch.isfinite(out).sum(-1) == 3).all()
    assert torch.equal(out.argmax(-1), logits.argmax(-1))
    out = filter_logits(logits, top_p=0.5)
    assert torch.equal(logits, before)
    kept = torch.isfinite(out)
    probs = logits.softmax(-1)
    mass = (probs * kept).sum(-1)
    assert (mass >= 0.5).all()
    smallest_kept = torch.where(kept, probs, 2.0).min(-1).values
    assert ((mass - smallest_kept) < 0.5).all()  # minimal: dropping the least likely kept id falls below p
    assert torch.equal(filter_logits(logits), logits)
    assert torch.isfinite(filter_logits(logits, top_k=100)).all()


def test_sample_argmax_and_generator():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    ids, prob = sample(logits, 0.0)
    assert torch.equal(ids, logits.argmax(-1))
    assert torch.allclose(prob, logits.softmax(-1).max(-1).values)
    a = sample(logits, 1.0, torch.Generator().manual_seed(3))
    b = sample(logits, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0])
    masked = logits.clone()
    masked[:, 2:] = float("-inf")
    for seed in range(5):
        assert (sample(masked, 5.0, torch.Generator().manual_seed(seed))[0] < 2).all()


# -- generate -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["maskgit", "roar"])
@pytest.mark.parametrize("target", ["img_next", "pose"])
def test_generate_keeps_given_tokens_and_fills_only_the_target(net, scheme, target):
    for seed in range(3):
        tokens, known = random_state(net, b=3, seed=seed)
        t0, k0 = tokens.clone(), known.clone()
        out, out_known = generate(
            net, tokens, known, target, steps=3, scheme=scheme, top_p=0.9, generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(tokens, t0) and torch.equal(known, k0)  # the caller's tensors are untouched
        assert torch.equal(out[k0], t0[k0])  # given tokens never change
        tgt = mod_mask(net, target)[None].expand_as(k0)
        assert torch.equal(out[~tgt], t0[~tgt])  # nothing outside the target changes
        assert torch.equal(out_known, k0 | tgt)  # every target position becomes known, nothing else
        assert (out[tgt] >= 0).all() and (out[tgt] < net.vocabs[net.index(target)]).all()


def test_generate_batched_rows_match_rows_alone_at_temperature_zero(net):
    tokens, known = random_state(net, b=3, seed=4)
    known[0] = True
    known[0, mod_mask(net, "pose")] = False  # row 0: everything but the pose
    known[2] = False  # row 2: nothing given
    batch = generate(net, tokens, known, "pose", steps=4, temperature=0.0)
    for i in range(3):
        alone = generate(net, tokens[i : i + 1], known[i : i + 1], "pose", steps=4, temperature=0.0)
        assert torch.equal(alone[0][0], batch[0][i]) and torch.equal(alone[1][0], batch[1][i])


def test_one_maskgit_step_at_temperature_zero_is_the_argmax_of_one_pass(net):
    tokens, known = random_state(net, b=3, seed=5)
    tgt = mod_mask(net, "seq")[None].expand_as(known)
    plan = plan_from_known(known, tgt & ~known, net.segment)
    logits = net.predict_logits(tokens, plan)
    want = tokens.clone()
    rows = torch.arange(3)[:, None].expand_as(plan.dec_index)
    want[rows[plan.dec_valid], plan.dec_index[plan.dec_valid]] = logits.argmax(-1)[plan.dec_valid]
    out, _ = generate(net, tokens, known, "seq", steps=1, scheme="maskgit", temperature=0.0)
    assert torch.equal(out, want)


@pytest.mark.parametrize("scheme", ["maskgit", "roar"])
def test_one_token_per_step_when_steps_equal_the_tokens(net, scheme):
    tokens, known = random_state(net, b=3, seed=6)
    known[:, mod_mask(net, "img")] = False
    counts = [known.sum(1)]
    generate(
        net, tokens, known, "img", steps=4, scheme=scheme, generator=torch.Generator().manual_seed(0),
        on_step=lambda step, t, k: counts.append(k.sum(1)),
    )  # fmt: skip
    steps = torch.stack(counts).diff(dim=0)
    assert steps.shape == (4, 3) and (steps == 1).all()


def test_rows_with_fewer_unknowns_than_steps(net):
    tokens, known = random_state(net, b=2, seed=7)
    known[:, mod_mask(net, "img")] = True
    known[0, net.offsets[0]] = False  # one unknown image token in row 0, none in row 1
    out, out_known = generate(net, tokens, known, "img", steps=5, scheme="roar")
    assert out_known[:, mod_mask(net, "img")].all()
    assert torch.equal(out[1], tokens[1]) and torch.equal(out[0, 1:], tokens[0, 1:])


@pytest.mark.parametrize("scheme", ["maskgit", "roar"])
def test_constrain_hook_sees_slot_positions_and_masks_pose_slots(net, scheme):
    tokens, known = random_state(net, b=3, seed=8)
    hook, seen = pose_constraint(QUANT), []

    def spy(logits, slot):
        seen.append(slot.clone())
        assert logits.shape == (len(slot), QUANT.vocab_size)
        return hook(logits, slot)

    out, _ = generate(
        net, tokens, known, "pose", steps=6, scheme=scheme, temperature=3.0, constrain=spy,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    slots = torch.cat(seen)
    assert slots.min() >= 0 and slots.max() < 39
    if scheme == "roar":  # ROAR decodes every unknown slot exactly once
        assert len(slots) == int((~known[:, mod_mask(net, "pose")]).sum())
    pose = out[:, mod_mask(net, "pose")]
    allowed = QUANT.slot_mask()
    new = ~known[:, mod_mask(net, "pose")]
    assert allowed[torch.arange(39).expand_as(pose)[new], pose[new]].all()


def test_chain_feeds_each_finished_modality_to_the_next(net, monkeypatch):
    tokens, known = random_state(net, b=2, seed=9)
    known[:] = False
    known[:, mod_mask(net, "img")] = True  # current frame only
    order = ["pose", {"target": "img_next", "steps": 2, "scheme": "roar"}]
    grown = []
    out, out_known = generate_chain(
        net, tokens, known, order, steps=3, temperature=0.0, generator=torch.Generator().manual_seed(0),
        on_target=lambda name, t, k: grown.append((name, k)),
    )  # fmt: skip
    assert [g[0] for g in grown] == ["pose", "img_next"]
    pose, nxt = mod_mask(net, "pose"), mod_mask(net, "img_next")
    assert grown[0][1][:, pose].all() and not grown[0][1][:, nxt].any()
    assert grown[1][1][:, pose | nxt].all() and grown[1][1].sum() > grown[0][1].sum() > known.sum()
    assert torch.equal(out_known, grown[1][1])

    g = torch.Generator().manual_seed(0)
    step1 = generate(net, tokens, known, "pose", steps=3, temperature=0.0, generator=g)
    step2 = generate(net, *step1, "img_next", steps=2, scheme="roar", temperature=0.0, generator=g)
    assert torch.equal(out, step2[0])

    encoded = []
    real = net.predict_logits
    monkeypatch.setattr(net, "predict_logits", lambda t, plan: (encoded.append(plan), real(t, plan))[1])
    generate_chain(net, tokens, known, ["pose", "img_next"], steps=2, temperature=0.0)
    last = encoded[-1]  # the next frame's last step reads the generated pose
    enc_pos = last.enc_index[last.enc_valid]
    assert pose[enc_pos].sum() == 2 * 39
