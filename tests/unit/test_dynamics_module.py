"""The dynamics LightningModule's losses, the samplers, the rollout (cached = uncached) and the new conventions."""

from __future__ import annotations

import pytest
import torch

from mmsuite.lightning_modules.dynamics import conventions as C
from mmsuite.lightning_modules.dynamics.model import DynamicsNetSettings, DynamicsTransformer, extend_cache
from mmsuite.lightning_modules.dynamics.module import DynamicsModule
from mmsuite.lightning_modules.dynamics.sampling import rollout, sample_frame

NET = dict(
    latent_channels=4,
    latent_size=4,
    patch=2,
    dim=32,
    depth=2,
    heads=2,
    temporal_every=2,
    registers=1,
    num_actions=0,
    prior="none",
)


def _tiny(**kw) -> DynamicsTransformer:
    """A tiny net: NET with ``kw`` over it."""
    return DynamicsNetSettings(**{**NET, **kw}).build()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Trainer:
    """What training_step reads from a trainer."""

    log_every_n_steps = 10**9
    is_global_zero = True
    max_steps = 10
    progress_bar_callback = None  # LightningModule.print (the step's console line) writes above the bar, if any


class _Module(DynamicsModule):
    """The module outside a Trainer: a fixed global step, a stub trainer, logging off."""

    step = 0

    @property
    def trainer(self):
        return _Trainer()

    @property
    def global_step(self) -> int:
        return self.step

    def log(self, *args, **kwargs) -> None:
        pass


def _module(global_step: int = 0, **kw) -> DynamicsModule:
    torch.manual_seed(0)
    args = dict(
        net={**NET, "num_actions": 3},
        optim={"lr": 1e-3},
        schedule={"warmup_steps": 0},
        shortcut={"fraction": 0.5, "start_step": 10, "anchor": 0.1},
    )
    args.update(kw)
    m = _Module(**args)
    m.step = global_step
    return m


def _batch(b=4, t=5, single=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(b, t, 4, 4, 4, generator=g),
        "actions": torch.randint(-1, 3, (b, t), generator=g),
        "single": single or [False] * b,
        "length": "S",
    }


def _record_calls(module):
    calls = []

    def hook(_, args, kwargs, out):
        calls.append(
            {"shape": tuple(args[0].shape), "grad": torch.is_grad_enabled(), "tau": args[1].clone(), "level": args[2]}
        )

    module.net.register_forward_hook(hook, with_kwargs=True)
    return calls


def test_losses_on_a_tiny_batch_are_finite_and_train():
    m = _module(global_step=20)
    calls = _record_calls(m)
    torch.manual_seed(3)
    loss = m.training_step(_batch(), 0)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert m.net.head.weight.grad.abs().max() > 0
    grads = [c["grad"] for c in calls]
    assert grads[0] is True and all(g is False for g in grads[1:])  # student with grad, teacher without
    n_boot = calls[1]["shape"][0] if len(calls) > 1 else 0
    assert len(calls) in (1, 3) and (len(calls) == 1 or calls[1]["shape"] == calls[2]["shape"])
    assert n_boot in (0, 2, 3)  # floor(0.5 * 4 + u): 2 (or 3 when u rounds up); teacher only on those rows


def test_bootstrap_rows_draw_coarser_levels_and_the_teacher_takes_half_steps():
    m = _module(global_step=20)
    calls = _record_calls(m)
    torch.manual_seed(5)
    m.training_step(_batch(b=8, t=6), 0)
    student, first, second = calls
    n_boot = first["shape"][0]
    levels = student["level"]
    assert (levels[: 8 - n_boot] == C.finest_level(64)).all()
    assert (levels[8 - n_boot :] < C.finest_level(64)).all()
    assert torch.equal(first["level"], levels[8 - n_boot :] + 1) and torch.equal(second["level"], first["level"])
    half_step = 64 >> first["level"]  # tau index of d/2
    assert torch.equal(second["tau"], first["tau"] - half_step)
    assert (student["tau"] >= 1).all()


def test_no_bootstrap_before_the_warm_up_ends():
    m = _module(global_step=3)
    calls = _record_calls(m)
    for seed in range(5):
        torch.manual_seed(seed)
        m.training_step(_batch(), 0)
    assert len(calls) == 5 and all((c["level"] == 6).all() for c in calls)


def test_small_batches_still_get_bootstrap_rows_at_the_configured_share():
    # dynamics.md P10: floor(B * fraction) is 0 for B=2 at 0.25, so a batch of two would never bootstrap.
    m = _module(global_step=20, shortcut={"fraction": 0.25, "start_step": 10, "anchor": 0.1})
    calls = _record_calls(m)
    torch.manual_seed(0)
    steps = 400
    for _ in range(steps):
        m.training_step(_batch(b=2, t=3), 0)
    boot_rows = [int((c["level"] < C.finest_level(64)).all(dim=1).sum()) for c in calls if c["grad"]]  # student passes
    assert len(boot_rows) == steps  # one student pass per step, whatever the teacher does
    assert set(boot_rows) == {0, 1}  # never both rows of two at 0.25, but some steps bootstrap one
    assert abs(sum(boot_rows) / (2 * steps) - 0.25) < 0.05  # the share of rows matches the fraction


def test_diffusion_forcing_only_never_calls_a_teacher():
    m = _module(global_step=100, shortcut={"fraction": 0.0})
    calls = _record_calls(m)
    m.training_step(_batch(), 0)
    assert len(calls) == 1


def test_t1_rows_run_as_independent_frames():
    m = _module(global_step=0)
    calls = _record_calls(m)
    m.training_step(_batch(b=3, t=5, single=[False, True, True]), 0)
    assert [c["shape"][:2] for c in calls] == [(1, 5), (10, 1)]


def test_rising_pattern_is_an_option():
    m = _module(global_step=0, noise={"pattern": "rising", "pattern_context": 2, "tau_ctx": 0.1})
    calls = _record_calls(m)
    m.training_step(_batch(b=2, t=6), 0)
    want = C.rising_tau_indices(6, 2, 0.1, 64)
    assert torch.equal(calls[0]["tau"], want.expand(2, -1))
    m = _module(global_step=0)
    calls = _record_calls(m)
    torch.manual_seed(0)
    m.training_step(_batch(b=2, t=6), 0)
    assert not torch.equal(calls[0]["tau"], want.expand(2, -1))  # iid by default


def _pattern_taus(pattern: str, steps: int = 20, period: int = 2, prefix_share: float = 0.0) -> torch.Tensor:
    """τ indices [rows, 6] the training step gives with ``pattern`` on every flow row (τ_ctx 0.1 -> index 6)."""
    noise = {"pattern": pattern, "pattern_fraction": 1.0, "tau_ctx": 0.1, "pattern_period": period}
    if prefix_share:
        noise["prefix_share"] = prefix_share
    m = _module(global_step=0, noise=noise)
    calls = _record_calls(m)
    torch.manual_seed(0)
    for _ in range(steps):
        m.training_step(_batch(b=2, t=6), 0)
    return torch.cat([c["tau"] for c in calls])


def test_prefix_pattern_holds_a_random_prefix_at_tau_ctx():
    taus = _pattern_taus("prefix")
    assert (taus[:, 0] == 6).all()  # every row starts at the snapped tau_ctx
    assert (taus != 6).any(dim=1).all()  # and keeps at least one iid target (the prefix is shorter than the row)
    assert len({int((row == 6).cumprod(0).sum()) for row in taus}) > 2  # prefix lengths vary


def test_interleave_pattern_holds_every_other_frame_at_tau_ctx():
    taus = _pattern_taus("interleave")
    even = (taus[:, 0::2] == 6).all(dim=1)
    odd = (taus[:, 1::2] == 6).all(dim=1)
    assert (even | odd).all()  # every row holds one phase at the snapped tau_ctx
    assert even.any() and odd.any()  # both phases occur
    assert not (even & odd).all()  # the other phase keeps its iid tau


def test_interleave_with_period_three_keeps_one_target_every_three_frames():
    taus = _pattern_taus("interleave", period=3)
    held = taus == 6
    phases = set()
    for row in held:
        free = [i for i in range(6) if not row[i]]  # the iid targets (an iid draw may also land on 6)
        phase = next(p for p in range(3) if all(row[i] for i in range(6) if (i - p) % 3))
        phases.add(phase)
        assert all((i - phase) % 3 == 0 for i in free)  # only every third frame is free
    assert phases == {0, 1, 2}
    with pytest.raises(ValueError, match="pattern_period"):
        _module(noise={"pattern": "interleave", "pattern_period": 1})


def _is_prefix_row(row: torch.Tensor) -> bool:
    """Held frames (τ index 6) only at the start, one run (an iid target may also land on 6 and count as held)."""
    held = (row == 6).tolist()
    first_free = held.index(False) if False in held else len(held)
    return first_free >= 1 and not any(held[first_free:])


def test_prefix_share_turns_that_share_of_interleave_rows_into_prefix_rows():
    taus = _pattern_taus("interleave", steps=60, period=3, prefix_share=0.5)
    share = sum(_is_prefix_row(row) for row in taus) / len(taus)
    assert 0.35 < share < 0.65, share  # about half the rows hold a prefix, the others interleave
    plain = _pattern_taus("interleave", steps=60, period=3)
    assert not any(_is_prefix_row(row) for row in plain)  # period 3 over 6 frames never holds only a prefix
    with pytest.raises(ValueError, match="prefix_share"):
        _module(noise={"pattern": "interleave", "prefix_share": 1.5})
    with pytest.raises(ValueError, match="needs noise.pattern=interleave"):
        _module(noise={"pattern": "iid", "prefix_share": 0.5})


def test_eval_metrics_are_per_horizon_means_over_every_clip_and_only_what_ran_is_logged(monkeypatch):
    m = _module(rollout={"horizon": 4, "steps": [4, 64]})
    logged = {}
    monkeypatch.setattr(m, "log", lambda key, value, **kw: logged.__setitem__(key, value))
    copy = torch.tensor([[10.0, 20.0, 30.0, 40.0], [20.0, 30.0, 40.0, 50.0]])  # [clips, horizon]
    for clip in (0, 1):  # two batches of one clip
        m._update("copy_last/psnr", copy[clip : clip + 1])
        for steps, gain in ((4, 1.0), (64, 3.0)):
            m._update(f"rollout_k{steps}/psnr", copy[clip : clip + 1] + gain)
            m._update(f"rollout_k{steps}/seconds", torch.tensor(1.0 + clip))
            m._update(f"rollout_k{steps}/frames", torch.tensor(4.0))
    m._log_eval("val")
    assert [logged[f"val/copy_last/psnr_h{i}"] for i in range(1, 5)] == pytest.approx([15.0, 25.0, 35.0, 45.0])
    assert logged["val/copy_last/psnr_h1_4"] == pytest.approx(30.0) == logged["val/copy_last/psnr_mean"]
    assert logged["val/rollout_k4/gain_over_copy_h1_4"] == pytest.approx(1.0)
    assert logged["val/rollout_k4/frames_per_s"] == pytest.approx(8.0 / 3.0)  # all frames over all seconds
    assert logged["val/k4_vs_k64/psnr_gap_h1_4"] == pytest.approx(2.0)
    assert not any("denoise" in key or "latent_mse" in key for key in logged)  # not run: not logged
    logged.clear()
    m._log_eval("val")  # reset after logging: an epoch without a rollout logs none of it
    assert logged == {}


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="noise.pattern"):
        _module(noise={"pattern": "ramp"})
    with pytest.raises(ValueError, match="steps"):
        _module(rollout={"steps": [3]})
    with pytest.raises(ValueError, match="shortcut.fraction"):
        _module(shortcut={"fraction": 1.5})


# -- new conventions -----------------------------------------------------------------------------------------


def test_rising_pattern_holds_context_and_rises_to_pure_noise():
    idx = C.rising_tau_indices(8, 4, 0.1, 64)
    assert idx[:4].tolist() == [6] * 4 and idx[-1] == 64
    assert (idx[4:].diff() > 0).all() and (idx >= 1).all()
    assert C.rising_tau_indices(3, 0, 0.1, 64).tolist() == [25, 45, 64]
    with pytest.raises(ValueError, match="context"):
        C.rising_tau_indices(4, 4, 0.1, 64)


def test_probe_tau_is_on_each_levels_grid():
    idx = [C.probe_tau_index(lvl, 64) for lvl in range(7)]
    assert idx == [64, 32, 32, 32, 32, 32, 32]
    for lvl, i in enumerate(idx):
        assert i % (64 >> lvl) == 0  # a multiple of that level's step


# -- samplers and rollout -------------------------------------------------------------------------------------


class Oracle(torch.nn.Module):
    """Predicts the given clean latents for every frame, whatever the input: the sampler must land on them."""

    k_max = 64

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.seen = []

    def forward(self, z, tau_index, step_level, actions=None):
        self.seen.append((tau_index.clone(), step_level.clone()))
        return self.target[:, -z.shape[1] :].expand_as(z)


@pytest.mark.parametrize("steps", [1, 4, 64])
def test_sampler_with_an_oracle_lands_on_the_clean_frame(steps):
    target = torch.randn(2, 1, 4, 4, 4)
    oracle = Oracle(target)
    out = sample_frame(oracle, torch.randn(2, 1, 4, 4, 4), steps)
    torch.testing.assert_close(out, target)
    assert len(oracle.seen) == steps
    assert [int(t[0, 0]) for t, _ in oracle.seen] == C.sampling_schedule(steps, 64)[0].tolist()
    assert all(int(lvl[0, 0]) == C.sampling_schedule(steps, 64)[1] for _, lvl in oracle.seen)


def test_uncached_rollout_labels_context_with_the_snapped_tau_ctx():
    target = torch.randn(1, 5, 4, 4, 4)
    oracle = Oracle(target)
    rollout(oracle, target[:, :3], horizon=2, steps=4, tau_ctx=0.1, cached=False)
    tau, level = oracle.seen[-1]
    assert tau[0, :4].tolist() == [6, 6, 6, 6] and level[0, :4].tolist() == [6, 6, 6, 6]  # 3 context + 1 generated


def _net(seed=0, actions=3, prior="none", copy_mask=False, velocity=False, input_skip=False, scale=False):
    torch.manual_seed(seed)
    net = _tiny(
        num_actions=actions,
        prior=prior,
        copy_mask=copy_mask,
        velocity=velocity,
        input_skip=input_skip,
        input_skip_scale=scale,
    ).eval()
    torch.nn.init.normal_(net.head.weight, std=0.3)
    if velocity:
        torch.nn.init.normal_(net.velocity_head.weight, std=0.05)
    return net


@pytest.mark.parametrize(
    "prior", ["none", "none+skip", "previous", "previous+velocity", "previous+velocity+skip", "previous+skip+scale"]
)
def test_cached_forward_equals_the_full_forward(prior):
    net = _net(
        prior=prior.split("+")[0], velocity="velocity" in prior, input_skip="skip" in prior, scale="scale" in prior
    )
    z = torch.randn(2, 7, 4, 4, 4)
    tau, lvl, act = torch.randint(0, 65, (2, 7)), torch.randint(0, 7, (2, 7)), torch.randint(-1, 3, (2, 7))
    tau[0, :5] = 0  # clean frames, so the velocity term acts (frames 2..5 of row 0)
    keep = 2 if net.velocity_head is not None else 1  # the cached frames the prior needs
    with torch.no_grad():
        full = net(z, tau, lvl, act)
    out, cache = net.forward_cached(z[:, :3], tau[:, :3], lvl[:, :3], act[:, :3])
    torch.testing.assert_close(out, full[:, :3], atol=1e-5, rtol=0)
    prev = (z[:, 3 - keep : 3], tau[:, 3 - keep : 3])  # the last cached frame(s), for the prior
    two, kv = net.forward_cached(z[:, 3:5], tau[:, 3:5], lvl[:, 3:5], act[:, 3:5], cache, prev)
    torch.testing.assert_close(two, full[:, 3:5], atol=1e-5, rtol=0)
    prev = (z[:, 5 - keep : 5], tau[:, 5 - keep : 5])
    one, _ = net.forward_cached(z[:, 5:6], tau[:, 5:6], lvl[:, 5:6], act[:, 5:6], extend_cache(cache, kv), prev)
    torch.testing.assert_close(one, full[:, 5:6], atol=1e-5, rtol=0)


def test_prior_previous_starts_as_the_estimate_of_the_last_frame_and_the_cache_asks_for_it():
    net = _tiny(prior="previous").eval()  # zero-initialised head, gate 1 above the diagonal
    z = torch.randn(2, 4, 4, 4, 4)
    tau = torch.tensor([[0, 6, 32, 64], [64, 1, 0, 16]])
    lvl = torch.full((2, 4), 6)
    with torch.no_grad():
        out = net(z, tau, lvl)
    est = torch.cat([torch.zeros_like(z[:, :1]), C.linear_clean_estimate(z[:, :-1], tau[:, :-1])], dim=1)
    cleaner = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]]).float()  # predecessor's τ below this frame's
    torch.testing.assert_close(out, cleaner[..., None, None, None] * est)
    torch.testing.assert_close(out[0, 1], z[0, 0])  # a clean predecessor is copied exactly
    torch.testing.assert_close(out[1, 3], z[1, 2])
    assert float(out[1, :3].abs().max()) == 0.0  # the first frame, and predecessors noisier than the frame
    net.prior_gate.data.fill_(0.5)  # the weight is learned
    with torch.no_grad():
        torch.testing.assert_close(net(z, tau, lvl), 0.5 * est)
    net.prior_gate.data = net.prior_gate.data.fill_(1.0).triu(diagonal=1)
    _, cache = net.forward_cached(z[:, :2], tau[:, :2], lvl[:, :2])
    with pytest.raises(ValueError, match="prev"):
        net.forward_cached(z[:, 2:3], tau[:, 2:3], lvl[:, 2:3], cache=cache)
    with pytest.raises(ValueError, match="prior"):
        _tiny(prior="last")


def test_fixed_clean_gate_copies_a_clean_predecessor_at_weight_one_and_learns_the_rest():
    net = _tiny(prior="previous", fixed_clean_gate_from=16)  # zero head: the output is the prior
    net.prior_gate.data.fill_(0.5)  # what a learned gate might have drifted to
    z = torch.randn(2, 4, 4, 4, 4)
    tau = torch.tensor([[0, 48, 0, 0], [5, 0, 20, 3]])  # (0 → 48) and (0 → 20): a clean predecessor, noisier frame
    lvl = torch.full((2, 4), 6)
    out = net(z, tau, lvl)
    est = C.linear_clean_estimate(z[:, :-1], tau[:, :-1])
    torch.testing.assert_close(out[0, 1], z[0, 0])  # weight 1, however the parameter drifted
    torch.testing.assert_close(out[1, 2], z[1, 1])
    torch.testing.assert_close(out[0, 2], 0.5 * est[0, 1])  # a noisy predecessor: the learned weight
    torch.testing.assert_close(out[0, 3], 0.5 * est[0, 2])  # clean → clean (column 0): learned
    torch.testing.assert_close(out[1, 1], 0.5 * est[1, 0])
    torch.testing.assert_close(out[1, 3], 0.5 * est[1, 2])
    out.sum().backward()
    grad = net.prior_gate.grad
    assert float(grad[0, 48]) == 0.0 and float(grad[0, 20]) == 0.0  # the fixed entries get no gradient
    assert all(float(grad[i, j].abs()) > 0 for i, j in ((48, 0), (0, 0), (5, 0), (20, 3)))  # the learned ones do
    learned = _tiny(prior="previous")
    learned.prior_gate.data.fill_(0.5)
    with torch.no_grad():
        torch.testing.assert_close(learned(z, tau, lvl)[0, 1], 0.5 * z[0, 0])  # the default learns that weight too
    with torch.no_grad():  # below the threshold (0 → 8) the weight stays learned
        low = net(z, torch.tensor([[0, 8, 0, 0], [5, 0, 20, 3]]), lvl)
    torch.testing.assert_close(low[0, 1], 0.5 * z[0, 0])
    for bad in (0, 65):
        with pytest.raises(ValueError, match="fixed_clean_gate_from"):
            _tiny(prior="previous", fixed_clean_gate_from=bad)


def test_copy_mask_lets_a_position_take_the_prior_exactly():
    net = _tiny(prior="previous", copy_mask=True).eval()
    torch.nn.init.normal_(net.head.weight, std=0.3)  # a head that outputs something everywhere
    z = torch.randn(2, 3, 4, 4, 4)
    tau, lvl = torch.tensor([[0, 64, 64], [0, 48, 16]]), torch.full((2, 3), 6)
    with torch.no_grad():
        half = net(z, tau, lvl)  # mask logits start at 0: the head's output counts half
        net.mask_head.bias.fill_(-40.0)  # mask 0 everywhere
        copied = net(z, tau, lvl)
        net.mask_head.bias.fill_(40.0)  # mask 1: the plain head
        full = net(z, tau, lvl)
        net.mask_head.bias.copy_(torch.tensor([-40.0, 40.0, 40.0, 40.0]))  # the first position of each patch copies
        mixed = net(z, tau, lvl)
    base = net.prior_gate[tau[:, :-1], tau[:, 1:]][..., None, None, None] * C.linear_clean_estimate(
        z[:, :-1], tau[:, :-1]
    )
    torch.testing.assert_close(copied[:, 1:], base)  # exactly the prior, however large the head's output
    torch.testing.assert_close(copied[:, 0], torch.zeros_like(z[:, 0]))  # the first frame: zero prior
    assert float((full - copied).abs().max()) > 0.1  # the head does add something where the mask is open
    torch.testing.assert_close(half - copied, 0.5 * (full - copied))
    torch.testing.assert_close(mixed[..., 0::2, 0::2], copied[..., 0::2, 0::2])  # every channel of that position
    torch.testing.assert_close(mixed[..., 1::2, :], full[..., 1::2, :])
    with pytest.raises(ValueError, match="copy_mask"):
        _tiny(prior="none", copy_mask=True)


def test_linear_clean_estimate_is_the_least_squares_scale():
    z0, eps = torch.randn(200_000), torch.randn(200_000)
    for index in (0, 6, 32, 48, 64):
        z = C.noise(z0, index / 64, eps)
        est = C.linear_clean_estimate(z[None], torch.tensor([index]))[0]
        best = (z * z0).mean() / (z * z).mean()  # the scale that minimises E(s·z − z0)²
        torch.testing.assert_close(est, best * z, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "prior",
    [
        "none",
        "previous",
        "previous+clean",
        "previous+clean+mask",
        "previous+clean+mask+velocity",
        "previous+clean+mask+velocity+skip",
        "previous+clean+mask+velocity+skip+scale",
    ],
)
@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("with_actions", [False, True])
def test_cached_rollout_matches_the_uncached_one(context, with_actions, prior):
    kinds = prior.split("+")
    net = _net(
        prior=kinds[0],
        copy_mask="mask" in kinds,
        velocity="velocity" in kinds,
        input_skip="skip" in kinds,
        scale="scale" in kinds,
    )
    if net.mask_head is not None:
        torch.nn.init.normal_(net.mask_head.weight, std=0.3)
    ctx = torch.randn(2, context, 4, 4, 4)
    actions = torch.randint(-1, 3, (2, context + 3)) if with_actions else None
    clean = "clean" in prior
    runs = [
        rollout(net, ctx, 3, 4, 0.1, actions, torch.Generator().manual_seed(1), cached=cached, clean_prior=clean)
        for cached in (1, 0)
    ]
    assert runs[0].shape == (2, 3, 4, 4, 4)
    torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=0)


def test_prior_reads_what_it_is_given_and_checks_its_shapes():
    net = _net(prior="previous").eval()
    z, clean = torch.randn(2, 4, 4, 4, 4), torch.randn(2, 4, 4, 4, 4)
    tau, lvl = torch.tensor([[2, 2, 40, 64], [1, 30, 2, 9]]), torch.full((2, 4), 6)
    with torch.no_grad():
        plain, same = net(z, tau, lvl), net(z, tau, lvl, prior_z=z, prior_index=tau)
        other = net(z, tau, lvl, prior_z=clean, prior_index=torch.zeros_like(tau))
    torch.testing.assert_close(plain, same)  # the default is the input itself
    gate = net.prior_gate[torch.zeros_like(tau[:, :-1]), tau[:, 1:]][..., None, None, None]
    base_plain = net.prior_gate[tau[:, :-1], tau[:, 1:]][..., None, None, None] * C.linear_clean_estimate(
        z[:, :-1], tau[:, :-1]
    )
    torch.testing.assert_close(other[:, 1:] - plain[:, 1:], gate * clean[:, :-1] - base_plain)  # only the base moves
    torch.testing.assert_close(other[:, :1], plain[:, :1])  # the first frame has no predecessor
    with pytest.raises(ValueError, match="go together"):
        net(z, tau, lvl, prior_z=clean)
    with pytest.raises(ValueError, match="shapes"):
        net(z, tau, lvl, prior_z=clean[:, :2], prior_index=tau[:, :2])


def test_clean_prior_rollout_of_an_untrained_model_copies_the_clean_last_frame():
    net = _tiny(prior="previous").eval()  # zero head: ẑ0 is the gated base alone
    ctx = torch.randn(2, 3, 4, 4, 4)
    clean = rollout(net, ctx, 3, 4, 2 / 64, generator=torch.Generator().manual_seed(0), clean_prior=True)
    torch.testing.assert_close(clean, ctx[:, -1:].expand_as(clean))  # the context noise never reaches the base
    noisy = rollout(net, ctx, 3, 4, 2 / 64, generator=torch.Generator().manual_seed(0))
    assert float((noisy - ctx[:, -1:]).abs().max()) > 1e-3  # without it the base is the noisy frame's estimate


def test_clean_prior_training_passes_the_clean_latents_of_context_frames():
    m = _module(global_step=20, noise={"pattern": "interleave", "tau_ctx": 2 / 64, "clean_prior": True})
    seen = []
    m.net.register_forward_hook(lambda _, args, kwargs, out: seen.append((args, kwargs)), with_kwargs=True)
    batch = _batch()
    torch.manual_seed(5)
    loss = m.training_step(batch, 0)
    assert torch.isfinite(loss)
    (z_tau, tau, _, _), kwargs = seen[0]
    held = tau <= 2
    assert held.any() and (~held).any()
    frames = held[..., None, None, None].expand_as(z_tau)
    torch.testing.assert_close(kwargs["prior_z"][frames], batch["latents"][frames])
    torch.testing.assert_close(kwargs["prior_z"][~frames], z_tau[~frames])
    assert torch.equal(kwargs["prior_index"], torch.where(held, 0, tau))
    assert all("prior_z" in kw for _, kw in seen)  # the teacher passes read the same way
    assert all("prior_z" not in kw for _, kw in _calls_without_clean_prior())


def _calls_without_clean_prior():
    m = _module(global_step=20)
    seen = []
    m.net.register_forward_hook(lambda _, args, kwargs, out: seen.append((args, kwargs)), with_kwargs=True)
    m.training_step(_batch(), 0)
    return seen


def test_rollout_is_reproducible_and_depends_on_the_noise():
    net = _net()
    ctx = torch.randn(1, 2, 4, 4, 4)
    a = rollout(net, ctx, 2, 4, generator=torch.Generator().manual_seed(0))
    b = rollout(net, ctx, 2, 4, generator=torch.Generator().manual_seed(0))
    c = rollout(net, ctx, 2, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_ema_is_off_by_default_and_evaluation_uses_it_when_on():
    off = _module()
    assert off.net_ema is None and off.eval_net is off.net
    m = _module(ema={"decay": 0.9})
    assert m.eval_net is m.net_ema and not any(p.requires_grad for p in m.net_ema.parameters())
    assert not any(p is q for p in m.net.parameters() for q in m.net_ema.parameters())
    before = m.net_ema.head.weight.clone()
    with torch.no_grad():
        m.net.head.weight.fill_(1.0)
    m.update_ema()  # first update: warm-up decay min(0.9, 1/10) = 0.1
    assert torch.allclose(m.net_ema.head.weight, 0.1 * before + 0.9 * torch.ones_like(before))
    for _ in range(200):
        m.update_ema()
    assert torch.allclose(m.net_ema.head.weight, torch.ones_like(before), atol=1e-6)
    # the EMA copy is what the rollout/validation read, and it is saved with the checkpoint
    assert any(k.startswith("net_ema.") for k in m.state_dict())
    with pytest.raises(ValueError, match="ema.decay"):
        _module(ema={"decay": 1.0})


def test_ema_updates_once_per_optimizer_step():
    m = _module(ema={"decay": 0.5})
    for step, n in ((0, 1), (0, 1), (1, 2), (1, 2), (2, 3)):  # two micro-batches per step (accumulation)
        m.step = step
        m.on_train_batch_end(None, None, 0)
        assert m._ema_updates == n


def test_weight_decay_spares_the_prior_gate():
    m = _module(net={**NET, "num_actions": 3, "prior": "previous"}, optim={"lr": 1e-2, "weight_decay": 0.5})
    opt = m.configure_optimizers()["optimizer"]
    gate_group = [g for g in opt.param_groups if any(p is m.net.prior_gate for p in g["params"])]
    assert len(gate_group) == 1 and gate_group[0]["weight_decay"] == 0.0 and len(gate_group[0]["params"]) == 1
    rest = [g for g in opt.param_groups if g is not gate_group[0]]
    assert [g["weight_decay"] for g in rest] == [0.5]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.net.parameters()))
    before_gate, before_w = m.net.prior_gate.detach().clone(), m.net.head.weight.detach().clone() + 1.0
    with torch.no_grad():
        m.net.head.weight.add_(1.0)
    for p in m.net.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only weight decay moves anything
    opt.step()
    torch.testing.assert_close(m.net.prior_gate.detach(), before_gate)  # not decayed
    assert float(m.net.head.weight.abs().sum()) < float(before_w.abs().sum())  # decayed


def test_motion_floor_weights_the_training_loss_by_frame_motion():
    def loss_of(batch, **kw):
        m = _module(global_step=20, **kw)
        torch.manual_seed(7)
        return m.training_step(batch, 0)

    even = _batch(b=4, t=5)
    step = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    even["latents"] = even["latents"][:, :1] + step * torch.arange(5).view(1, 5, 1, 1, 1)  # equal change per frame
    plain = loss_of(even)
    assert torch.allclose(loss_of(even, loss={"motion_floor": 0.01}), plain)  # equal motion: every weight is 1
    mixed = _batch(b=4, t=5)
    mixed["latents"][:2] = mixed["latents"][:2, :1].expand(2, 5, 4, 4, 4).clone()  # two still rows
    assert not torch.allclose(loss_of(mixed, loss={"motion_floor": 0.01}), loss_of(mixed))
    with pytest.raises(ValueError, match="motion_floor"):
        _module(loss={"motion_floor": 0.0})


def test_velocity_starts_off_and_extrapolates_only_from_two_clean_frames_before():
    with pytest.raises(ValueError, match="velocity"):
        _tiny(velocity=True)  # needs prior: previous
    with pytest.raises(ValueError, match="clean_prior"):
        _module(net={**NET, "prior": "previous", "velocity": True})
    torch.manual_seed(0)
    plain = _tiny(prior="previous").eval()
    torch.manual_seed(0)
    net = _tiny(prior="previous", velocity=True).eval()
    z = torch.randn(2, 5, 4, 4, 4)
    tau = torch.tensor([[0, 0, 0, 64, 64], [0, 32, 0, 64, 64]])
    lvl = torch.full((2, 5), 6)
    with torch.no_grad():
        torch.testing.assert_close(net(z, tau, lvl), plain(z, tau, lvl))  # coefficient 0 at the start
        net.velocity_head.bias.fill_(1.0)  # coefficient 1 everywhere: linear extrapolation where it acts
        out, base = net(z, tau, lvl), plain(z, tau, lvl)
    change = out - base
    torch.testing.assert_close(change[0, 2], z[0, 1] - z[0, 0])  # two clean frames before
    torch.testing.assert_close(change[0, 3], z[0, 2] - z[0, 1])
    for row, t in [(0, 0), (0, 1), (0, 4), (1, 1), (1, 2), (1, 3)]:  # no frame or a noisy frame among the two
        assert change[row, t].abs().max() == 0, (row, t)
    torch.testing.assert_close(change[1, 4], torch.zeros_like(z[1, 4]))  # t-1 = 3 is noisy


def test_input_skip_passes_a_nearly_clean_input_through():
    with pytest.raises(ValueError, match="input_skip_var"):
        _tiny(input_skip=True, input_skip_var=0.0)
    torch.manual_seed(0)
    plain = _tiny(prior="previous", velocity=True, velocity_init=0.5).eval()
    torch.manual_seed(0)
    net = _tiny(prior="previous", velocity=True, velocity_init=0.5, input_skip=True).eval()
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in plain.parameters())  # fixed weights
    z0, eps = torch.randn(2, 4, 4, 4, 4), torch.randn(2, 4, 4, 4, 4)
    lvl = torch.full((2, 4), 6)
    for index in (0, 1, 32, 64):
        tau = torch.tensor([[0, 0, 0, index], [index, 64, 16, index]])
        z = C.noise(z0, C.tau_value(tau), eps)
        with torch.no_grad():
            out, guess = net(z, tau, lvl), plain(z, tau, lvl)  # zero heads: plain is the prior's guess alone
        w = C.input_skip_weight(tau, 0.01)[..., None, None, None]
        torch.testing.assert_close(out, guess + w * C.innovation(z, guess, tau))
        torch.testing.assert_close(out[0, :3], z[0, :3])  # clean frames: the input exactly
        if index == 1:  # nearly clean after a clean frame: near the input, far from the guess
            err = (out[0, 3] - z0[0, 3]).pow(2).mean()
            assert err < 0.01 * (guess[0, 3] - z0[0, 3]).pow(2).mean()
        if index == 64:  # pure noise: the guess alone
            torch.testing.assert_close(out[:, 3], guess[:, 3])
    bare = _tiny(input_skip=True, input_skip_var=1.0).eval()  # no prior, unit variance:
    tau = torch.tensor([[0, 16, 48, 64]] * 2)
    with torch.no_grad():  # the linear clean estimate of the input
        torch.testing.assert_close(bare(z0, tau, lvl), C.linear_clean_estimate(z0, tau))


def test_input_skip_scale_fades_the_head_out_towards_the_clean_end():
    with pytest.raises(ValueError, match="needs input_skip"):
        _tiny(input_skip_scale=True)
    kw = dict(prior="previous", velocity=True, velocity_init=0.5, input_skip=True, input_skip_var=0.003)
    torch.manual_seed(0)
    skip = _tiny(**kw).eval()
    torch.manual_seed(0)
    scaled = _tiny(**kw, input_skip_scale=True).eval()
    for net in (skip, scaled):  # the same non-zero head in both
        torch.manual_seed(1)
        torch.nn.init.normal_(net.head.weight, std=0.3)
    torch.manual_seed(0)
    zero = _tiny(**kw).eval()  # zero head: the skip's posterior mean alone
    z0, eps, lvl = torch.randn(2, 4, 4, 4, 4), torch.randn(2, 4, 4, 4, 4), torch.full((2, 4), 6)
    tau = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 64]])  # after three clean frames: nearly clean, pure noise
    z = C.noise(z0, C.tau_value(tau), eps)
    with torch.no_grad():
        a, b, mean = skip(z, tau, lvl), scaled(z, tau, lvl), zero(z, tau, lvl)
    scale = C.input_skip_head_scale(tau, 0.003)[..., None, None, None]
    torch.testing.assert_close(b - mean, scale * (a - mean))  # only the head's share is scaled
    torch.testing.assert_close(b[:, :3], z[:, :3])  # clean frames: the input exactly, whatever the head says
    torch.testing.assert_close(b[1, 3], a[1, 3])  # pure noise: the head unscaled
    head_err = (a[0, 3] - mean[0, 3]).pow(2).mean()
    assert (b[0, 3] - mean[0, 3]).pow(2).mean() < 0.1 * head_err  # τ 1/64: the head's share cut to 0.28² of it


def test_velocity_init_starts_as_that_multiple_of_the_last_change():
    torch.manual_seed(0)
    plain = _tiny(prior="previous").eval()
    torch.manual_seed(0)
    net = _tiny(prior="previous", velocity=True, velocity_init=0.5).eval()
    z, tau, lvl = torch.randn(1, 3, 4, 4, 4), torch.tensor([[0, 0, 64]]), torch.full((1, 3), 6)
    with torch.no_grad():
        change = net(z, tau, lvl) - plain(z, tau, lvl)
    torch.testing.assert_close(change[0, 2], 0.5 * (z[0, 1] - z[0, 0]))


def test_velocity_learned_false_keeps_the_coefficients_at_velocity_init_through_training():
    net = {**NET, "num_actions": 3, "prior": "previous", "velocity": True, "velocity_init": 0.5}
    noise = {"pattern": "interleave", "pattern_period": 3, "tau_ctx": 2 / 64, "clean_prior": True}
    fixed = _module(global_step=20, net={**net, "velocity_learned": False}, noise=noise)
    learned = _module(global_step=20, net=net, noise=noise)
    for m in (fixed, learned):
        opt = torch.optim.AdamW([p for p in m.net.parameters() if p.requires_grad], lr=1e-2)
        for step in range(3):
            torch.manual_seed(step)
            m.training_step(_batch(b=4, t=6, seed=step), 0).backward()
            opt.step()
            opt.zero_grad()
    head = fixed.net.velocity_head
    assert not any(p.requires_grad for p in head.parameters())
    assert torch.equal(head.weight, torch.zeros_like(head.weight))
    assert torch.equal(head.bias, torch.full_like(head.bias, 0.5))
    assert fixed.net.head.weight.abs().max() > 0  # the rest of the net trains
    assert (learned.net.velocity_head.bias - 0.5).abs().max() > 0  # learned: the same steps move the coefficients
    in_optimizer = {id(p) for g in fixed.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert id(head.weight) not in in_optimizer and id(head.bias) not in in_optimizer
    assert id(fixed.net.head.weight) in in_optimizer


@pytest.mark.parametrize("cached", [True, False])
def test_observed_velocity_rollout_uses_the_velocity_term_for_the_first_frame_only(cached):
    net = _net(prior="previous", copy_mask=True, velocity=True)
    ctx, actions = torch.randn(2, 3, 4, 4, 4), torch.randint(-1, 3, (2, 6))

    def run(velocity):
        g = torch.Generator().manual_seed(1)
        return rollout(net, ctx, 3, 4, 0.1, actions, g, cached=cached, clean_prior=True, velocity=velocity)

    every, observed = run("all"), run("observed")
    torch.testing.assert_close(observed[:, 0], every[:, 0], atol=1e-6, rtol=0)  # frame 1: changes between given frames
    assert (observed[:, 1:] - every[:, 1:]).abs().max() > 1e-3  # later frames follow a generated one
    with pytest.raises(ValueError, match="velocity"):
        run("sometimes")
    with pytest.raises(ValueError, match="rollout.velocity"):
        _module(rollout={"velocity": "sometimes"})


@pytest.mark.parametrize("velocity_mode", ["observed", "all"])
def test_own_context_rows_train_the_frame_after_the_models_own_prediction(velocity_mode):
    net = {**NET, "num_actions": 3, "prior": "previous", "velocity": True, "velocity_init": 0.5}
    noise = {"own_context": 1.0, "own_context_steps": 4, "pattern_period": 3, "tau_ctx": 2 / 64, "clean_prior": True}
    m = _module(global_step=20, net=net, noise=noise, shortcut={"fraction": 0.0}, rollout={"velocity": velocity_mode})
    torch.nn.init.normal_(m.net.head.weight, std=0.3)  # predictions that differ from the real frames
    calls = []

    def hook(_, args, kwargs, out):
        calls.append(
            {
                "grad": torch.is_grad_enabled(),
                "z": args[0].clone(),
                "tau": args[1].clone(),
                "out": out,
                "level": args[2].clone(),
                **{k: v for k, v in kwargs.items() if k != "checkpoint"},
            }
        )

    m.net.register_forward_hook(hook, with_kwargs=True)
    batch = _batch(b=3, t=8)
    z0 = batch["latents"]
    torch.manual_seed(4)
    loss = m.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and m.net.head.weight.grad.abs().max() > 0
    assert [c["grad"] for c in calls] == [False] * 4 + [True]  # four no-grad sampler steps, then the student
    first, student = calls[0], calls[-1]
    own = first["tau"] == 64  # the predicted frames start from pure noise
    assert own.any() and not own[:, -1].any()
    for r in range(3):  # one every pattern_period frames
        pos = own[r].nonzero().flatten()
        assert (pos.diff() == 3).all()
    assert [int(c["tau"][own].unique()) for c in calls[:4]] == [64, 48, 32, 16]  # the 4-step schedule
    assert (first["level"][own] == 2).all() and (first["level"][~own] == C.finest_level(64)).all()
    assert (first["tau"][~own] == 2).all() and "velocity" not in first  # the real frames held, h1 keeps velocity
    target = torch.zeros_like(own)
    target[:, 1:] = own[:, :-1]
    assert (student["tau"][~target] == 2).all() and (student["tau"][target] >= 1).all()  # predictions held
    predicted = student["prior_z"][own]
    assert not torch.allclose(predicted, z0[own], atol=1e-3)  # the prior reads the model's own frames there...
    torch.testing.assert_close(student["prior_z"][~own & ~target], z0[~own & ~target])  # ...and real ones here
    assert (student["prior_index"][own] == 0).all()
    if velocity_mode == "observed":  # as in the rollout: no velocity term for a frame after a prediction
        torch.testing.assert_close(student["velocity"], ~target)
    else:
        assert "velocity" not in student
    assert m.net.velocity_head.weight.grad is not None  # used in every batch (DDP needs every parameter used)
    # the predictions carry no loss: changing the real latents there leaves the loss as it was
    m2 = _module(global_step=20, net=net, noise=noise, shortcut={"fraction": 0.0}, rollout={"velocity": velocity_mode})
    m2.net.load_state_dict(m.net.state_dict())
    batch2 = {**batch, "latents": z0.clone()}
    batch2["latents"][own] += 5.0
    torch.manual_seed(4)
    with torch.no_grad():
        loss_a = m2.training_step(batch, 0)
        torch.manual_seed(4)
        loss_b = m2.training_step(batch2, 0)
    torch.testing.assert_close(loss_a, loss_b)  # nothing of the real frames behind the predictions is used
    # (here: with loss.motion_floor the real clip's motion still weights the frames next to them)
    torch.manual_seed(4)
    batch2["latents"][target] += 5.0
    with torch.no_grad():
        assert not torch.allclose(m2.training_step(batch2, 0), loss_a)  # while the targets are
    with pytest.raises(ValueError, match="own_context"):
        _module(noise={"own_context": 1.5})


def test_velocity_per_frame_mask_and_velocity_drop():
    torch.manual_seed(0)
    net = _tiny(prior="previous", velocity=True, velocity_init=0.5).eval()
    z, lvl = torch.randn(2, 5, 4, 4, 4), torch.full((2, 5), 6)
    tau = torch.tensor([[0, 0, 0, 0, 64], [0, 0, 0, 64, 64]])
    keep = torch.tensor([[True, True, False, True, False], [False, True, True, False, True]])
    with torch.no_grad():
        on, off, mixed = net(z, tau, lvl), net(z, tau, lvl, velocity=False), net(z, tau, lvl, velocity=keep)
    torch.testing.assert_close(mixed[keep], on[keep])
    torch.testing.assert_close(mixed[~keep], off[~keep])
    assert not torch.allclose(on[0, 2], off[0, 2])  # the dropped frame did have a velocity term
    for bad in (keep.float(), keep[0]):
        with pytest.raises(ValueError, match="velocity mask"):
            net(z, tau, lvl, velocity=bad)
    net_cfg = {**NET, "num_actions": 3, "prior": "previous", "velocity": True, "velocity_init": 0.5}
    noise = {"velocity_drop": 0.5, "clean_prior": True, "tau_ctx": 2 / 64}
    m = _module(global_step=20, net=net_cfg, noise=noise)
    calls = []
    m.net.register_forward_hook(lambda _, a, kw, out: calls.append(kw.get("velocity")), with_kwargs=True)
    torch.manual_seed(2)
    m.training_step(_batch(b=8, t=6), 0)
    student, teachers = calls[0], calls[1:]
    assert student.shape == (8, 6) and 0 < int(student.sum()) < 48  # about half the frames keep it
    assert len(teachers) == 2 and all(torch.equal(t, student[8 - t.shape[0] :]) for t in teachers)
    with pytest.raises(ValueError, match="velocity_drop"):
        _module(noise={"velocity_drop": 1.0})
    with pytest.raises(ValueError, match="velocity_drop needs"):
        _module(noise={"velocity_drop": 0.5})  # no velocity term to drop


def _tiny_decoder(monkeypatch):
    """A random continuous image tokenizer (4 latent channels, 4x4 -> 8x8 px) in place of the checkpoint."""
    from mmsuite.tokenizers.image import AutoencoderSettings, ImageTokenizer

    torch.manual_seed(5)
    net = AutoencoderSettings(
        levels=None, downsample=2, channels=8, channel_mult=[1, 1], num_res_blocks=1, latent_channels=4, patch_size=1
    ).build()
    tok = ImageTokenizer(net, image_size=8)
    monkeypatch.setattr("mmsuite.tokenizers.image.load_frame_tokenizer", lambda *a, **k: tok)
    return tok


def test_decoded_loss_is_the_weighted_pixel_mse_through_a_frozen_decoder(monkeypatch):
    tok = _tiny_decoder(monkeypatch)
    m = _module(global_step=0, shortcut={"fraction": 0.0}, loss={"decoded": 3.0, "decoded_frames": 1000})
    m.latent_std.fill_(2.0)  # the decoder reads the tokenizer's own scale
    batch = _batch(b=2, t=3)
    x_hat = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    w = torch.rand(2, 3)
    got = m._decoded_loss(x_hat, batch["latents"], w)
    img = tok.net.decode(x_hat.flatten(0, 1) * 2.0)
    ref = tok.net.decode(batch["latents"].flatten(0, 1) * 2.0)
    want = (w.flatten() * ((img - ref) ** 2).flatten(1).mean(1) / 4).sum()  # every frame: exact
    assert torch.allclose(got, want, rtol=1e-5)
    got.backward()
    assert x_hat.grad.abs().max() > 0  # the gradient reaches the latents ...
    assert all(not p.requires_grad and p.grad is None for p in tok.net.parameters())  # ... not the decoder
    # one frame of six, scaled up six times: an unbiased estimate of the sum
    m.decoded_frames = 1
    torch.manual_seed(0)
    one = m._decoded_loss(x_hat.detach(), batch["latents"], w)
    per = w.flatten() * ((img - ref) ** 2).flatten(1).mean(1).detach() / 4
    assert torch.isclose(one, 6 * per).any()
    # decoded_floor f: f*log(1 + mse/f), the MSE for small errors and its log for large ones
    m.decoded_frames, m.decoded_floor = 1000, 1e-3
    mse = ((img - ref) ** 2).flatten(1).mean(1).detach() / 4
    want = (w.flatten() * 1e-3 * torch.log1p(mse / 1e-3)).sum()
    assert torch.allclose(m._decoded_loss(x_hat.detach(), batch["latents"], w), want, rtol=1e-5)
    with pytest.raises(ValueError, match="decoded_floor"):
        _module(loss={"decoded": 1.0, "decoded_floor": 0.0})


def test_decoded_loss_enters_training_only_when_on(monkeypatch):
    _tiny_decoder(monkeypatch)
    batch = _batch(b=4, t=5)

    def loss_of(**kw):
        m = _module(global_step=0, shortcut={"fraction": 0.0}, **kw)
        torch.manual_seed(7)
        return m, m.training_step(batch, 0)

    _, plain = loss_of()
    m, same = loss_of(loss={"decoded": 0.0})
    assert torch.equal(plain, same) and m._decoder is None  # off: the decoder is not even loaded
    m, more = loss_of(loss={"decoded": 2.0})
    assert more > plain
    more.backward()
    assert m.net.head.weight.grad.abs().max() > 0
    for bad in ({"decoded": -1.0}, {"decoded": 1.0, "decoded_frames": 0}):
        with pytest.raises(ValueError, match="loss.decoded"):
            _module(loss=bad)
