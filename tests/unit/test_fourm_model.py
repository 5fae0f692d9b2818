"""The 4M encoder-decoder and its LightningModule: heads, padding, loss weighting, token schedule, tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmsuite.lightning_modules.fourm.masking import DirichletMasking, fixed_plan
from mmsuite.lightning_modules.fourm.model import FourM, FourMNetSettings
from mmsuite.lightning_modules.fourm.module import FourMModule
from mmsuite.tokenizers.pose import PoseQuantizer

BINS = 64
MODS = [
    {"name": "tok_rgb", "kind": "image", "range": "image", "vocab": 50, "length": 16, "grid": [4, 4]},
    {"name": "coords", "kind": "pose", "range": "pose_bins", "vocab": BINS + 3, "length": 39},
    {"name": "tok_rgb_next", "kind": "image", "range": "image", "vocab": 50, "length": 16, "grid": [4, 4]},
    {"name": "coords_next", "kind": "pose", "range": "pose_bins", "vocab": BINS + 3, "length": 39},
]
LENGTHS = [m["length"] for m in MODS]


def _tokens(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = []
    quant = PoseQuantizer(bins=BINS, canvas=256)
    for m in MODS:
        if m["kind"] == "pose":
            xy = torch.rand(b, 13, 2, generator=g).numpy() * 255
            vis = torch.rand(b, 13, generator=g).numpy() > 0.2
            cols.append(torch.from_numpy(quant.encode(xy.astype(np.float32), vis)))
        else:
            cols.append(torch.randint(0, m["vocab"], (b, m["length"]), generator=g))
    return torch.cat(cols, dim=1)


def _net(**kw) -> FourM:
    torch.manual_seed(0)
    return FourMNetSettings(**{"dim": 32, "encoder_depth": 2, "decoder_depth": 2, "heads": 2, **kw}).build(MODS).eval()


def _masking() -> DirichletMasking:
    return DirichletMasking(LENGTHS, [1.5, 1.5, 0.5, 0.5], [0.5, 0.5, 1.5, 1.5], [10, 40], [10, 40])


def _module(**kw) -> FourMModule:
    args = dict(
        modalities=MODS,
        net={"dim": 32, "encoder_depth": 1, "decoder_depth": 1, "heads": 2},
        masking={
            "input_alphas": [1.5, 1.5, 0.5, 0.5],
            "target_alphas": [0.5, 0.5, 1.5, 1.5],
            "input_tokens_range": [10, 40],
            "target_tokens_range": [10, 40],
        },
        optim={"lr": 1e-3},
        schedule={"total_tokens": 1000, "warmup_tokens": 100, "floor_ratio": 0.1},
        tasks=[{"name": "pose_from_frame", "inputs": ["tok_rgb"], "target": "coords", "baseline": None}],
        pose={"bins": BINS, "canvas": 256},
    )
    args.update(kw)
    torch.manual_seed(0)
    return FourMModule(**args)


def test_logits_only_at_real_targets_and_only_over_the_targets_own_vocabulary():
    net, tokens = _net(), _tokens(6)
    plan = _masking()(6, np.random.default_rng(0))
    out = net(tokens, plan)
    seg = net.segment[plan.dec_index]
    for k, name in enumerate(net.names):
        n_real = int(((seg == k) & plan.dec_valid).sum())
        if n_real == 0:
            assert name not in out
            continue
        logits, target, rows = out[name]
        assert logits.shape == (n_real, MODS[k]["vocab"])  # the modality's own head: it can only emit its ids
        assert target.shape == rows.shape == (n_real,)
        assert int(target.max()) < MODS[k]["vocab"]
    assert sum(v[0].shape[0] for v in out.values()) == plan.n_real_target


def test_padding_does_not_change_real_outputs_and_empty_rows_stay_finite():
    net, tokens = _net(), _tokens(3)
    plan = _masking()(3, np.random.default_rng(1))
    ref = net(tokens, plan)
    pad = lambda t, v: torch.cat([t, torch.full((t.shape[0], 5), v, dtype=t.dtype)], dim=1)  # noqa: E731
    for name in ("enc", "dec"):
        setattr(plan, f"{name}_index", pad(getattr(plan, f"{name}_index"), 0))
        setattr(plan, f"{name}_valid", pad(getattr(plan, f"{name}_valid"), False))
    padded = net(tokens, plan)
    for name in ref:
        assert torch.allclose(ref[name][0], padded[name][0], atol=1e-5)
    plan.dec_valid[0] = False  # a sample with no targets, one with no inputs
    plan.enc_valid[1] = False
    logits = net.predict_logits(tokens, plan)
    assert torch.isfinite(logits[logits > float("-inf")]).all()


def test_positions_image_grid_shared_by_current_and_next_frame_pose_by_joint_and_axis():
    net = _net()
    off_rgb, off_next = net.offsets[0], net.offsets[2]
    idx = torch.arange(16)
    assert torch.equal(net.positions(idx + off_rgb), net.positions(idx + off_next))
    assert not torch.equal(net.positions(idx[:1] + off_rgb), net.positions(idx[1:2] + off_rgb))
    c0, c1 = net.offsets[1], net.offsets[3]
    assert torch.equal(net.positions(torch.arange(39) + c0), net.positions(torch.arange(39) + c1))
    # joint 0 x and joint 0 y differ (axis embedding), joint 0 x and joint 1 x differ (joint embedding)
    p = net.positions(torch.tensor([c0, c0 + 1, c0 + 3]))
    assert not torch.equal(p[0], p[1]) and not torch.equal(p[0], p[2])


def test_loss_weighting_modality_mean_vs_token_mean():
    m = _module()
    logits = {"tok_rgb": torch.zeros(2, 4), "coords": torch.zeros(6, 4)}  # each modality's CE is its kind's
    logits["tok_rgb"][0, 1] = 3.0  # tok_rgb has a lower loss on one token
    out = {
        k: (v, torch.zeros(len(v), dtype=torch.long), torch.zeros(len(v), dtype=torch.long)) for k, v in logits.items()
    }
    per = {k: torch.nn.functional.cross_entropy(v, torch.zeros(len(v), dtype=torch.long)) for k, v in logits.items()}
    assert float(m._losses(out)["loss"]) == pytest.approx(float((per["tok_rgb"] + per["coords"]) / 2), rel=1e-5)
    t = _module(loss={"weighting": "token"})
    tok = (per["tok_rgb"] * 2 + per["coords"] * 6) / 8
    assert float(t._losses(out)["loss"]) == pytest.approx(float(tok), rel=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        _module(loss={"weighting": "sample"})


def test_token_schedule_counts_real_tokens_and_survives_a_checkpoint():
    m = _module()
    assert m.lr_factor() == pytest.approx(1 / 101)
    m.tokens_seen = 100
    assert m.lr_factor() == pytest.approx(1.0)
    m.tokens_seen = 1000
    assert m.lr_factor() == pytest.approx(0.1)
    ckpt = {}
    m.tokens_seen = 321
    m.on_save_checkpoint(ckpt)
    other = _module()
    other.on_load_checkpoint(ckpt)
    assert other.tokens_seen == 321
    with pytest.raises(ValueError, match="warmup_tokens must be < total_tokens"):
        _module(schedule={"total_tokens": 10, "warmup_tokens": 10})


def test_training_step_adds_the_plans_real_tokens():
    m = _module()
    tokens = _tokens(4)
    plan = m.masking(4, m._rng(0, 0))
    m.training_step({"tokens": tokens}, 0)
    assert m.tokens_seen == plan.n_real_input + plan.n_real_target  # the same seeded plan


def test_predict_emits_only_the_target_modality_with_well_formed_pose_slots():
    m = _module().eval()
    tokens = _tokens(5)
    pred = m.predict(tokens, ["tok_rgb"], "coords")
    assert pred.shape == (5, 39)
    quant = PoseQuantizer(bins=BINS, canvas=256)
    xy, v = pred.reshape(5, 13, 3)[..., :2], pred.reshape(5, 13, 3)[..., 2]
    assert ((xy < BINS) | (xy == quant.NA)).all()
    assert ((v == quant.INVISIBLE) | (v == quant.VISIBLE)).all()
    img = m.predict(tokens, ["coords"], "tok_rgb")
    assert img.shape == (5, 16) and int(img.max()) < 50
    with pytest.raises(KeyError, match="unknown modality 'depth'"):
        m.predict(tokens, ["depth"], "coords")


def test_pose_errors_and_pck_against_known_offsets():
    m = _module()
    quant = m.pose
    xy = np.full((2, 13, 2), 100.0, dtype=np.float32)
    xy[:, :, 0] += np.arange(13) * 5  # a 60 px wide skeleton
    vis = np.ones((2, 13), dtype=bool)
    truth = torch.from_numpy(quant.encode(xy, vis))
    moved = torch.from_numpy(quant.encode(xy + np.float32(4.0), vis))  # 4 px in x and y: sqrt(32) px
    err, pck = m._pose_errors(moved, truth)
    assert err.shape == (26,)
    assert float(err.mean()) == pytest.approx(32**0.5, abs=quant.bin_width * 1.5)
    assert bool(pck.all())  # 5.7 px <= 0.1 x 60 px
    far = torch.from_numpy(quant.encode(xy + np.float32(20.0), vis))
    assert not bool(m._pose_errors(far, truth)[1].any())


def test_eval_metrics_are_epoch_means_and_metrics_without_values_are_left_out(monkeypatch):
    tasks = [
        {
            "name": "next_frame",
            "inputs": ["tok_rgb"],
            "target": "tok_rgb_next",
            "baseline": "copy",
            "copy_from": "tok_rgb",
        },
        {"name": "next_pose", "inputs": ["coords"], "target": "coords_next", "baseline": "copy", "copy_from": "coords"},
    ]
    m = _module(tasks=tasks)
    logged = {}
    monkeypatch.setattr(m, "log", lambda key, value, **kw: logged.__setitem__(key, value))
    m._accumulate("next_pose/joint_error_px", torch.tensor([1.0, 2.0, 3.0]))  # two batches of joints
    m._accumulate("next_pose/joint_error_px", torch.tensor([10.0]))
    m._accumulate("next_pose/baseline_error_px", torch.tensor([4.0, 4.0, 4.0, 8.0]))
    m.eval_means["loss"].update(2.0, weight=4)
    m.eval_means["loss_coords"].update(0.0, weight=0.0)  # no coords targets in any batch
    m._log_means("val")
    assert logged["val/next_pose/joint_error_px"] == pytest.approx(4.0)  # over every joint, not 6 (batch means)
    assert logged["val/next_pose/error_ratio"] == pytest.approx(4.0 / 5.0)  # a ratio of epoch means
    assert logged["val/loss"] == pytest.approx(2.0)
    # declared but without values: a modality without targets, the frame PSNR without an image tokenizer
    assert "val/loss_coords" not in logged and "val/next_frame/psnr_db" not in logged
    assert "val/next_frame/psnr_gain_db" not in logged
    logged.clear()
    m._log_means("val")  # the metrics were reset: the next epoch starts empty
    assert logged == {}
    with pytest.raises(ValueError, match="target must be 'caption' or an image modality, got 'coords'"):
        _module(tasks=[{"name": "bad", "kind": "attributes", "inputs": ["tok_rgb"], "target": "coords"}])


def test_fixed_plan_tasks_use_every_token():
    plan = fixed_plan(LENGTHS, 2, [0, 1], [3])
    assert plan.n_real_input == 2 * (16 + 39) and plan.n_real_target == 2 * 39


def test_shared_tables_and_tied_heads():
    shared = [dict(m) for m in MODS]
    shared[2]["share_with"], shared[3]["share_with"] = "tok_rgb", "coords"
    net = FourMNetSettings(dim=32, encoder_depth=1, decoder_depth=1, heads=2).build(shared)
    assert net.tok_emb[0] is net.tok_emb[2] and net.tok_emb[1] is net.tok_emb[3]
    h = torch.randn(3, 32)
    tied = h @ net.tok_emb[1].weight.T / 32**0.5  # tied: h . embeddings / sqrt(D) (rounding: scaled before)
    assert torch.allclose(net.logits(3, h), tied, atol=1e-6)
    untied = FourMNetSettings(dim=32, encoder_depth=1, decoder_depth=1, heads=2, tie_heads=False).build(MODS)
    assert untied.logits(1, h).shape == (3, BINS + 3)
    # the forward scores the targets of the modalities sharing a table in one matmul: the logits of each alone
    tokens, plan = _tokens(4), _masking()(4, np.random.default_rng(2))
    for model in (net, untied):
        out = model(tokens, plan)
        y, index, _, _ = model._states(tokens, plan, model.tables())
        seg = model.segment[index]
        assert len(out) == 4
        for k, name in enumerate(model.names):
            assert torch.allclose(out[name][0], model.logits(k, y[seg == k]), atol=1e-6)
    bad = [dict(m) for m in MODS]
    bad[2]["share_with"] = "coords"
    with pytest.raises(ValueError, match="vocab sizes differ"):
        FourMNetSettings(dim=32).build(bad)
    bad[2]["share_with"] = "coords_next"
    with pytest.raises(ValueError, match="must name an earlier modality"):
        FourMNetSettings(dim=32).build(bad)


def test_ordinal_pose_targets_cost_less_for_near_misses():
    m = _module(loss={"pose_sigma_bins": 2.0})
    target = torch.tensor([30])
    near, far = torch.full((1, BINS + 3), -10.0), torch.full((1, BINS + 3), -10.0)
    near[0, 31], far[0, 50] = 10.0, 10.0
    assert float(m._cross_entropy("coords", near, target)) < float(m._cross_entropy("coords", far, target))
    flag = torch.tensor([BINS + 1])  # a flag target stays one-hot
    logits = torch.randn(1, BINS + 3)
    ref = torch.nn.functional.cross_entropy(logits, flag, reduction="sum")
    assert float(m._cross_entropy("coords", logits, flag)) == pytest.approx(float(ref), rel=1e-5)
    one_hot = _module()  # sigma 0: plain CE, images always plain
    assert float(one_hot._cross_entropy("coords", far, target)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(far, target, reduction="sum")), rel=1e-5
    )


def test_pose_ordinal_init_makes_neighbouring_bins_alike():
    net = FourMNetSettings(dim=32, encoder_depth=1, decoder_depth=1, heads=2, pose_ordinal_init=0.05).build(MODS)
    table = net.tok_emb[1].weight.detach()
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(table[10], table[11], dim=0)) > float(cos(table[10], table[40], dim=0)) + 0.2
    flags = table[BINS:]
    assert float(flags.std()) > 0.5  # the flags keep the (unit-scale) random init


def _frame_sensitivity(net: FourM) -> float:
    """How much the pose predictions of frame -> pose move, relative to their spread, when every sample gets
    another sample's frame (at init)."""
    tokens = _tokens(8)
    swapped = tokens.clone()
    swapped[:, :16] = tokens.roll(1, 0)[:, :16]
    plan = fixed_plan(LENGTHS, 8, [0], [1])
    a, b = net.predict_logits(tokens, plan), net.predict_logits(swapped, plan)
    fin = torch.isfinite(a)
    return float((a[fin] - b[fin]).abs().mean() / a[fin].std())


def test_linear_init_gain_sets_fan_in_scaled_weights_and_lets_the_decoder_hear_the_frame():
    net = _net(linear_init_gain=0.5)
    fc = net.decoder[0].mlp.fc2
    assert float(fc.weight.std()) == pytest.approx(0.5 / fc.in_features**0.5, rel=0.1)
    default = _net()
    assert float(default.decoder[0].mlp.fc2.weight.std()) == pytest.approx(0.02, rel=0.1)
    # with 0.02 weights under unit-scale embeddings the frame barely reaches the pose logits at init
    assert _frame_sensitivity(net) > 5 * _frame_sensitivity(default)
    with pytest.raises(ValueError, match="linear_init_gain"):
        _net(linear_init_gain=-1.0)


@pytest.mark.parametrize("groups", [1, 3, 8])
def test_packed_tokens_give_the_padded_layouts_outputs(groups):
    """Per-token work on the real tokens only and attention on length buckets (nn.transformer.Packing) compute
    the same model as padding to the batch maximum."""
    tokens = _tokens(5)
    plan = _masking()(5, np.random.default_rng(3))
    plan.enc_valid[2] = False  # a sample without inputs: it must not read another sample's tokens
    packed, padded = _net(packed=True, attention_groups=groups), _net(packed=False)
    a, b = packed(tokens, plan), padded(tokens, plan)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name][1], b[name][1]) and torch.equal(a[name][2], b[name][2])
        seen = a[name][2] != 2  # the sample without inputs: padded, it reads its padding slot's tags
        assert torch.allclose(a[name][0][seen], b[name][0][seen], atol=1e-5)
        assert torch.isfinite(a[name][0]).all()
    la, lb = packed.predict_logits(tokens, plan), padded.predict_logits(tokens, plan)
    real = plan.dec_valid.clone()
    real[2] = False
    assert torch.allclose(la[real], lb[real], atol=1e-5)
    real = plan.dec_valid
    assert torch.isneginf(la[~real]).all()  # padding slots are never scored


def test_factorised_image_embedding_sums_fsq_digits_and_is_the_tied_table():
    from mmsuite.lightning_modules.fourm.model import FactorisedEmbedding
    from mmsuite.tokenizers.image import FSQ

    emb = FactorisedEmbedding([4, 3, 5], dim=8)
    emb.reset_parameters()
    assert emb.num_embeddings == 60
    codes = torch.tensor([[0, 2, 1], [3, 0, 4]])  # digits per channel
    fsq = FSQ([4, 3, 5])
    ids = fsq.codes_to_indices(((codes - torch.tensor([2, 1, 2])) / torch.tensor([2, 1, 2]))[..., None, None])
    ids = ids.reshape(-1)
    assert torch.equal(emb.digits[ids], codes)  # the same mixed radix as the image tokenizer's FSQ
    assert torch.allclose(emb.weight[ids], emb(ids))
    # codes that share a digit share that digit's row: with the residual at zero, the difference of two codes
    # differing only in channel 0 is the difference of channel 0's rows
    a, b = emb(torch.tensor([0])), emb(torch.tensor([1]))
    assert torch.allclose(a - b, emb.digit_emb.weight[0] - emb.digit_emb.weight[1], atol=1e-6)
    spec = dict(MODS[0], vocab=60, levels=[4, 3, 5])
    net = FourMNetSettings(dim=16, encoder_depth=1, decoder_depth=1, heads=2).build([spec, MODS[1]])
    assert isinstance(net.tok_emb[0], FactorisedEmbedding)
    assert isinstance(
        FourMNetSettings(dim=16, image_embedding="table").build([spec, MODS[1]]).tok_emb[0], torch.nn.Embedding
    )
    with pytest.raises(ValueError, match="FSQ levels"):
        FourMNetSettings(dim=16).build([dict(spec, levels=[4, 4]), MODS[1]])
    with pytest.raises(ValueError, match="image_embedding"):
        FourMNetSettings(dim=16, image_embedding="digits").build([spec, MODS[1]])


def test_adamw_is_fused_unless_told_otherwise_and_a_resumed_run_may_switch_it():
    from mmsuite.callbacks.run_state import resume_config_differences

    assert _module().configure_optimizers()["optimizer"].defaults["fused"] is True
    loop = _module(optim={"lr": 1e-3, "fused": False}).configure_optimizers()["optimizer"]
    assert not loop.defaults["fused"]
    saved = {"model": {"optim": {"lr": 1e-3}, "compile": False}}
    now = {"model": {"optim": {"lr": 1e-3, "fused": True}, "compile": True}}
    assert resume_config_differences(saved, now) == []
    assert resume_config_differences(saved, {"model": {"optim": {"lr": 2e-3}}})[0][0] == "model.optim.lr"


def test_compile_compiles_each_block_in_place_and_gives_the_eager_outputs(monkeypatch):
    """model.compile: every encoder and decoder block goes through torch.compile (dynamic shapes), the checkpoint
    keys stay those of the eager model, and the outputs are the eager ones. Dynamo traces with its eager backend
    here (the test checks the tracing, not inductor's code generation, which takes minutes on a small CPU)."""
    compiled = []
    original = torch.nn.Module.compile

    def compile_eager(self, *args, **kwargs):
        compiled.append((type(self).__name__, kwargs.get("dynamic")))
        return original(self, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eager)
    eager, comp = _module(), _module(compile=True)
    assert compiled == [("Block", True), ("DecoderBlock", True)]
    assert list(comp.state_dict()) == list(eager.state_dict())
    tokens, plan = _tokens(4), _masking()(4, np.random.default_rng(1))
    a, b = eager._losses(eager.net(tokens, plan))["loss"], comp._losses(comp.net(tokens, plan))["loss"]
    assert torch.allclose(a, b, atol=1e-6)


def test_factorised_table_built_once_gives_a_plain_tables_logits_and_gradients(monkeypatch):
    """The factorised table is assembled once per pass (by broadcasting over the FSQ digits) and shared by the input
    embedding and both tied image heads: a net with a plain table holding the same rows gives the same logits and
    loss, and the gradient reaching the rows is the same."""
    from mmsuite.lightning_modules.fourm.model import FactorisedEmbedding

    levels = [4, 3, 5]
    mods = [dict(MODS[0], vocab=60, levels=levels), MODS[1], dict(MODS[2], vocab=60, share_with="tok_rgb"), MODS[3]]
    torch.manual_seed(0)
    fact = FourMNetSettings(dim=16, encoder_depth=1, decoder_depth=1, heads=2).build(mods)
    torch.nn.init.normal_(fact.tok_emb[0].residual.weight)  # a trained residual, not the zero start
    emb = fact.tok_emb[0]
    assert isinstance(emb, FactorisedEmbedding)
    codes = torch.arange(60)
    assert torch.allclose(emb.weight, emb(codes), atol=1e-6)  # assembly == each code's digit rows + residual
    table = FourMNetSettings(dim=16, encoder_depth=1, decoder_depth=1, heads=2, image_embedding="table").build(mods)
    state = {k: v for k, v in fact.state_dict().items() if not k.startswith(("tok_emb.0.", "tok_emb.2."))}
    state["tok_emb.0.weight"] = state["tok_emb.2.weight"] = emb.weight.detach().clone()
    table.load_state_dict(state)
    tokens, plan = _tokens(6), _masking()(6, np.random.default_rng(4))
    tokens[:, :16] %= 60
    tokens[:, 55:71] %= 60
    built = []
    assemble = FactorisedEmbedding.weight.fget
    monkeypatch.setattr(FactorisedEmbedding, "weight", property(lambda self: built.append(1) or assemble(self)))
    a, b = fact(tokens, plan), table(tokens, plan)
    assert len(built) == 1  # once per pass: the input embedding and both tied heads read the same assembly
    assert list(a) == list(b) and {"tok_rgb", "tok_rgb_next"} <= set(a)
    for name in a:
        assert torch.allclose(a[name][0], b[name][0], atol=1e-5)
    sum(F.cross_entropy(a[n][0], a[n][1]) for n in a).backward()
    sum(F.cross_entropy(b[n][0], b[n][1]) for n in b).backward()
    # d loss / d table row: through the assembly, a row's residual gets exactly the plain table row's gradient
    assert torch.allclose(emb.residual.weight.grad, table.tok_emb[0].weight.grad, atol=1e-5)
    assert torch.allclose(fact.predict_logits(tokens, plan), table.predict_logits(tokens, plan), atol=1e-5)


@pytest.mark.parametrize("levels", [[7], [2, 3], [4, 3, 5], [8, 8, 8, 5, 5, 5]])
def test_factorised_table_assembly_has_the_gradients_of_each_codes_digit_rows(levels):
    """The hand-written assembly (one table-sized tensor each way) gives the table and the gradients, to the digit
    rows and to the residual, of summing each code's digit rows and residual (forward of every code)."""
    from mmsuite.lightning_modules.fourm.model import FactorisedEmbedding

    torch.manual_seed(0)
    emb = FactorisedEmbedding(levels, dim=8)
    emb.reset_parameters()
    torch.nn.init.normal_(emb.residual.weight)
    params = [emb.digit_emb.weight, emb.residual.weight]
    table, rows = emb.weight, emb(torch.arange(emb.num_embeddings))
    assert table.shape == (emb.num_embeddings, 8) and torch.allclose(table, rows, atol=1e-5)
    g = torch.randn_like(table)
    expected = torch.autograd.grad(rows, params, g)
    for a, b in zip(torch.autograd.grad(table, params, g), expected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)
    emb.residual.weight.requires_grad_(False)  # a frozen residual still passes the gradient to the digits
    (grad,) = torch.autograd.grad(emb.weight, [emb.digit_emb.weight], g)
    assert torch.allclose(grad, expected[0], rtol=1e-4, atol=1e-3)


def test_packing_buckets_pad_each_bucket_to_its_own_longest_sample():
    from mmsuite.nn.transformer import Packing

    valid = torch.zeros(4, 6, dtype=torch.bool)
    for b, n in enumerate([6, 1, 4, 2]):
        valid[b, :n] = True
    pack = Packing(valid, groups=2)
    assert [g.tolist() for g in pack.groups] == [[1, 3], [2, 0]]  # sorted by length, then cut
    rows, ok = pack.layout(pack.groups[0])
    assert rows.shape == (2, 2) and ok.tolist() == [[True, False], [True, True]]
    assert rows.tolist() == [[6, 13], [11, 12]]  # packed rows (sample 1 starts at 6, sample 3 at 11); 13 = T
    x = torch.arange(24.0).view(4, 6, 1)
    assert pack.pack(x).squeeze(1).tolist() == [0, 1, 2, 3, 4, 5, 6, 12, 13, 14, 15, 18, 19]
    with pytest.raises(ValueError, match="groups"):
        Packing(valid, groups=0)


def test_host_copies_of_the_plan_give_the_same_outputs():
    """_plan_to keeps CPU copies of the layout, from which FourM reads its packing and the modalities with
    targets (no device sync); the outputs are those of the plan without them."""
    import copy

    from mmsuite.lightning_modules.fourm.module import _plan_to

    net, tokens = _net(), _tokens(4)
    plan = _masking()(4, np.random.default_rng(5))
    moved = _plan_to(copy.deepcopy(plan), tokens.device)
    assert torch.equal(moved.host_dec_valid, plan.dec_valid) and moved.host_enc_valid.device.type == "cpu"
    a, b = net(tokens, plan), net(tokens, moved)
    assert list(a) == list(b)
    for name in a:
        assert torch.allclose(a[name][0], b[name][0], atol=1e-6) and torch.equal(a[name][1], b[name][1])
