"""The dynamics LightningModule's losses, the samplers, the rollout (cached = uncached) and the new conventions."""

from __future__ import annotations

import pytest
import torch

from mmsuite.lightning_modules.dynamics import conventions as C
from mmsuite.lightning_modules.dynamics import module as M
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
)
SKIP_VAR = 0.003  # the net's default skip_var


def _skip(guess: torch.Tensor, z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """What a zero head outputs: the prior's guess plus the input skip."""
    w = C.input_skip_weight(tau, SKIP_VAR)[..., None, None, None]
    return guess + w * C.innovation(z, guess, tau)


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


def _held_taus(steps: int = 20, period: int = 2, prefix: float = 0.0, fraction: float = 1.0) -> torch.Tensor:
    """τ indices [rows, 6] the training step gives with held frames on ``fraction`` of the rows (τ_ctx 0.1 -> 6)."""
    noise = {"held_fraction": fraction, "tau_ctx": 0.1, "held_period": period, "held_prefix": prefix}
    m = _module(global_step=0, noise=noise)
    calls = _record_calls(m)
    torch.manual_seed(0)
    for _ in range(steps):
        m.training_step(_batch(b=2, t=6), 0)
    return torch.cat([c["tau"] for c in calls])


def _prefix_run(row: list[bool]) -> int:
    """Length of the held run a row starts with."""
    return row.index(False) if False in row else len(row)


def test_held_frames_keep_one_target_every_period_from_a_random_phase():
    held = M.held_frames(400, 6, 1.0, 3, 0.0)
    phases = set()
    for row in held.tolist():
        targets = [i for i in range(6) if not row[i]]
        assert targets and all(j - i == 3 for i, j in zip(targets, targets[1:]))  # one target every three frames
        phases.add(targets[0])
    assert phases == {0, 1, 2}
    assert not M.held_frames(50, 1, 1.0, 3, 1.0).any()  # single frames are never held
    taus = _held_taus(period=2)  # in the training step: held frames sit at the snapped tau_ctx
    even, odd = (taus[:, 0::2] == 6).all(dim=1), (taus[:, 1::2] == 6).all(dim=1)
    assert (even | odd).all() and even.any() and odd.any() and not (even & odd).all()
    with pytest.raises(ValueError, match="held_period"):
        _module(noise={"held_period": 1})


def test_held_prefix_runs_and_held_rows_appear_at_the_configured_rates():
    torch.manual_seed(0)
    rows, t = 4000, 16
    held = M.held_frames(rows, t, 0.5, 3, 0.5)
    any_held = held.any(dim=1)
    assert abs(float(any_held.float().mean()) - 0.5) < 0.03  # held_fraction of the rows
    runs = torch.tensor([_prefix_run(r) for r in held.tolist()])
    # a prefix row holds L in 1..15 frames, then targets every 3 frames; an interleave row's run is at most 2
    long_runs = runs >= 3
    share = float(long_runs.sum()) / float(any_held.sum())
    # P(run >= 3 | prefix) = 13/15; interleave rows never hold 3 in a row
    assert abs(share - 0.5 * 13 / 15) < 0.04
    assert runs.max() == t - 1  # runs up to the whole row but one frame (a rollout's context, then its target)
    for r in torch.nonzero(long_runs).flatten()[:50].tolist():
        row, n = held[r].tolist(), int(runs[r])
        assert [not x for x in row[n:]] == [(i % 3 == 0) for i in range(t - n)]  # after the run: interleave
    plain = M.held_frames(2000, t, 1.0, 3, 0.0)
    assert max(_prefix_run(r) for r in plain.tolist()) <= 2  # without prefixes no run is longer than period - 1


def test_bootstrap_rows_get_held_context_kept_fixed_in_the_teacher_passes():
    noise = {"held_fraction": 1.0, "held_period": 3, "held_prefix": 0.5, "tau_ctx": 2 / 64}
    m = _module(global_step=20, noise=noise, shortcut={"fraction": 1.0, "start_step": 0, "anchor": 0.1})
    calls = []
    m.net.register_forward_hook(
        lambda _, args, kw, out: calls.append([a.clone() for a in args[:3]] + [torch.is_grad_enabled()]),
        with_kwargs=True,
    )
    for seed in range(20):
        torch.manual_seed(seed)
        m.training_step(_batch(b=4, t=8, seed=seed), 0)
    held_share = []
    for i in range(0, len(calls), 3):
        (zs, ts, ls, g), (z1, t1, l1, _), (z2, t2, l2, _) = calls[i : i + 3]
        assert g and zs.shape == z1.shape  # every row bootstraps: the teacher sees all of them
        held = (ts == 2) & (ls == C.finest_level(64))
        held_share.append(float(held.float().mean()))
        assert held.any(dim=1).all()  # every row holds context (held_fraction 1)
        assert (ls[~held] < C.finest_level(64)).all()  # the others bootstrap
        for tau_t, lvl_t, z_t in ((t1, l1, z1), (t2, l2, z2)):  # held frames: same input, τ and level
            assert torch.equal(tau_t[held], ts[held]) and torch.equal(lvl_t[held], ls[held])
            torch.testing.assert_close(z_t[held], zs[held])
        assert torch.equal(l1[~held], ls[~held] + 1) and (t2[~held] < ts[~held]).all()  # the rest: half steps
    assert 0.4 < sum(held_share) / len(held_share) < 0.8  # about 2/3 interleaved, more with prefixes


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


def test_rollout_scores_the_three_baselines_and_a_rollout_with_shuffled_actions(monkeypatch):
    from mmsuite.nn.metrics import psnr

    m = _module(rollout={"context": 3, "horizon": 2, "steps": [4, 64], "gifs": 0, "batches": 1})
    logged, calls = {}, []
    monkeypatch.setattr(m, "log", lambda key, value, **kw: logged.__setitem__(key, value))
    decode = lambda z: (z.float()[..., :3, :, :].movedim(-3, -1) * 20 + 128).clamp(0, 255).round().to(torch.uint8)  # noqa: E731
    monkeypatch.setattr(m, "decode", decode)

    def fake_rollout(net, context, horizon, steps, tau_ctx, actions, gen, cached, **kw):
        calls.append((steps, actions.clone()))
        return context[:, -1:].expand(-1, horizon, *context.shape[2:]) + (actions[:, -horizon:, None, None, None] == 1)

    monkeypatch.setattr(M, "rollout", fake_rollout)
    batch = _batch(b=3, t=5)
    z0, acts = batch["latents"], batch["actions"]
    m._rollout_eval(z0, acts, torch.Generator().manual_seed(0), 0, "val")
    m._log_eval("val")
    assert [(s, torch.equal(a, acts)) for s, a in calls] == [(4, True), (64, True), (4, False)]
    assert torch.equal(calls[2][1], acts.roll(1, dims=0))  # each clip with another clip's actions
    target = decode(z0[:, 3:5])
    change = z0[:, 2:3] - z0[:, 1:2]
    linear = torch.cat([z0[:, 2:3] + change, z0[:, 2:3] + 2 * change], dim=1)
    half = (z0[:, 2:3] + change / 2).expand(-1, 2, -1, -1, -1)
    for name, pred in (("linear", linear), ("half_change", half)):
        want = psnr(decode(pred), target, data_range=255).mean(0)
        assert [logged[f"val/{name}/psnr_h{i}"] for i in (1, 2)] == pytest.approx(want.tolist(), rel=1e-5)
    best = max(logged[f"val/{b}/psnr_h1_4"] for b in M.BASELINES)
    k4 = logged["val/rollout_k4/psnr_h1_4"]
    assert logged["val/rollout_k4/gain_over_best_h1_4"] == pytest.approx(k4 - best)
    shuffled = logged["val/rollout_k4_shuffled/psnr_h1_4"]
    assert logged["val/rollout_k4/shuffle_loss_h1_4"] == pytest.approx(k4 - shuffled)
    assert "val/rollout_k64/shuffle_loss_h1_4" not in logged  # only the fewest-step sampler is shuffled


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="noise.held_fraction"):
        _module(noise={"held_fraction": 1.5})
    with pytest.raises(ValueError, match="steps"):
        _module(rollout={"steps": [3]})
    with pytest.raises(ValueError, match="shortcut.fraction"):
        _module(shortcut={"fraction": 1.5})


# -- new conventions -----------------------------------------------------------------------------------------


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


def _net(seed=0, actions=3):
    torch.manual_seed(seed)
    net = _tiny(num_actions=actions).eval()
    torch.nn.init.normal_(net.head.weight, std=0.3)
    return net


def test_cached_forward_equals_the_full_forward():
    net = _net()
    z = torch.randn(2, 7, 4, 4, 4)
    tau, lvl, act = torch.randint(0, 65, (2, 7)), torch.randint(0, 7, (2, 7)), torch.randint(-1, 3, (2, 7))
    tau[0, :5] = 0  # clean frames too (the skip passes them through)
    with torch.no_grad():
        full = net(z, tau, lvl, act)
    out, cache = net.forward_cached(z[:, :3], tau[:, :3], lvl[:, :3], act[:, :3])
    torch.testing.assert_close(out, full[:, :3], atol=1e-5, rtol=0)
    prev = (z[:, 2:3], tau[:, 2:3])  # the last cached frame, for the prior
    two, kv = net.forward_cached(z[:, 3:5], tau[:, 3:5], lvl[:, 3:5], act[:, 3:5], cache, prev)
    torch.testing.assert_close(two, full[:, 3:5], atol=1e-5, rtol=0)
    prev = (z[:, 4:5], tau[:, 4:5])
    one, _ = net.forward_cached(z[:, 5:6], tau[:, 5:6], lvl[:, 5:6], act[:, 5:6], extend_cache(cache, kv), prev)
    torch.testing.assert_close(one, full[:, 5:6], atol=1e-5, rtol=0)


def test_prior_previous_starts_as_the_estimate_of_the_last_frame_and_the_cache_asks_for_it():
    net = _tiny().eval()  # zero-initialised head, gate 1 above the diagonal
    z = torch.randn(2, 4, 4, 4, 4)
    tau = torch.tensor([[0, 6, 32, 64], [64, 1, 0, 16]])
    lvl = torch.full((2, 4), 6)
    with torch.no_grad():
        out = net(z, tau, lvl)
    est = torch.cat([torch.zeros_like(z[:, :1]), C.linear_clean_estimate(z[:, :-1], tau[:, :-1])], dim=1)
    cleaner = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]]).float()  # predecessor's τ below this frame's
    torch.testing.assert_close(out, _skip(cleaner[..., None, None, None] * est, z, tau))
    torch.testing.assert_close(out[0, 3], z[0, 2])  # pure noise after a clean predecessor: the copy exactly
    torch.testing.assert_close(out[0, 0], z[0, 0])  # a clean frame: its input exactly
    torch.testing.assert_close(out[1, 0], torch.zeros_like(z[1, 0]))  # the first frame at pure noise: zero
    net.prior_gate.data.fill_(0.5)  # the weight is learned
    with torch.no_grad():
        torch.testing.assert_close(net(z, tau, lvl), _skip(0.5 * est, z, tau))
    net.prior_gate.data = net.prior_gate.data.fill_(1.0).triu(diagonal=1)
    _, cache = net.forward_cached(z[:, :2], tau[:, :2], lvl[:, :2])
    with pytest.raises(ValueError, match="prev"):
        net.forward_cached(z[:, 2:3], tau[:, 2:3], lvl[:, 2:3], cache=cache)


def test_the_input_skip_gives_the_input_at_the_clean_end_and_the_guess_at_pure_noise():
    net = _net()  # a random, non-zero head
    assert not any("skip" in name for name, _ in net.named_parameters())  # the skip has no parameters
    z0, eps, lvl = torch.randn(2, 5, 4, 4, 4), torch.randn(2, 5, 4, 4, 4), torch.full((2, 5), 6)
    tau = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 1, 64]])
    z = C.noise(z0, C.tau_value(tau), eps)
    raw = []
    net.head.register_forward_hook(lambda _, args, out: raw.append(net.unpatchify(out)))
    with torch.no_grad():
        out = net(z, tau, lvl)
        net.head.weight.zero_()
        guess = net(z, tau, lvl)  # a zero head: the prior's guess plus the skip
    torch.testing.assert_close(out[0], z[0], atol=1e-6, rtol=0)  # the oracle limit: a clean input comes out as is,
    torch.testing.assert_close(out[1, :3], z[1, :3], atol=1e-6, rtol=0)  # whatever the head says
    scale = C.input_skip_head_scale(tau, SKIP_VAR)[..., None, None, None]
    torch.testing.assert_close(out - guess, scale * raw[0], atol=1e-6, rtol=1e-5)  # the head's share, scaled
    assert float(scale[1, 4]) == 1.0 and float((out[1, 4] - guess[1, 4]).abs().max()) > 0.1  # in full at noise
    # nearly clean (τ 1/64) after clean frames: near the input, the head's error cut to a fraction
    assert (out[1, 3] - z0[1, 3]).pow(2).mean() < 0.1 * (raw[0][1, 3]).pow(2).mean()
    with pytest.raises(ValueError, match="skip_var"):
        _tiny(skip_var=0.0)


def test_linear_clean_estimate_is_the_least_squares_scale():
    g = torch.Generator().manual_seed(0)  # a fixed draw: the bound below is statistical
    z0, eps = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    for index in (0, 6, 32, 48, 64):
        z = C.noise(z0, index / 64, eps)
        est = C.linear_clean_estimate(z[None], torch.tensor([index]))[0]
        scale = (est * z).sum() / (z * z).sum()
        torch.testing.assert_close(est, scale * z)  # a multiple of its input
        best = (z * z0).mean() / (z * z).mean()  # the scale that minimises E(s·z − z0)² on this draw
        assert abs(float(scale - best)) < 0.01, (index, float(scale), float(best))  # ~4 standard errors


@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("with_actions", [False, True])
def test_cached_rollout_matches_the_uncached_one(context, with_actions):
    net = _net()
    ctx = torch.randn(2, context, 4, 4, 4)
    actions = torch.randint(-1, 3, (2, context + 3)) if with_actions else None
    runs = [rollout(net, ctx, 3, 4, 0.1, actions, torch.Generator().manual_seed(1), cached=c) for c in (1, 0)]
    assert runs[0].shape == (2, 3, 4, 4, 4)
    torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=0)


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
    m = _module(net={**NET, "num_actions": 3}, optim={"lr": 1e-2, "weight_decay": 0.5})
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
