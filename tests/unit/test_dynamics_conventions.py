"""The dynamics noise conventions (τ = 0 clean, τ = 1 noise, x-prediction, shortcut forcing)."""

from __future__ import annotations

import pytest
import torch

from mmsuite.lightning_modules.dynamics import conventions as C

K_MAX = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and stall badly on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _latents(seed: int, shape=(2, 3, 4, 5), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


# --------------------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------------------


def test_step_grid_is_powers_of_two_with_levels():
    d = C.step_sizes(K_MAX)
    assert d.tolist() == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625]
    assert C.num_levels(K_MAX) == 7 and C.finest_level(K_MAX) == 6
    assert C.step_level(d, K_MAX).tolist() == list(range(7))
    assert C.step_size(torch.tensor([0, 2, 6]), K_MAX).tolist() == [1.0, 0.25, 1 / 64]


@pytest.mark.parametrize("steps, expected", [(1, [64]), (4, [64, 48, 32, 16]), (64, list(range(64, 0, -1)))])
def test_sampling_schedule_runs_from_noise_down_by_d(steps, expected):
    indices, level = C.sampling_schedule(steps, K_MAX)
    assert indices.tolist() == expected
    assert C.step_size(torch.tensor(level), K_MAX).item() == 1 / steps


def test_condition_indices_of_grid_values():
    tau_idx, level = C.condition_indices(
        torch.tensor([1.0, 0.25, 3 / 64, 0.0]), torch.tensor([1.0, 0.25, 1 / 64, 1 / 64])
    )
    assert tau_idx.tolist() == [64, 16, 3, 0]
    assert level.tolist() == [0, 2, 6, 6]
    assert torch.equal(C.tau_value(tau_idx, K_MAX), torch.tensor([1.0, 0.25, 3 / 64, 0.0]))


# --------------------------------------------------------------------------------------------------------
# Euler sampling with x-prediction
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 32, 64])
def test_euler_with_oracle_model_reproduces_z0_at_every_step_count(steps):
    """A model that always returns the true z0 must land on z0, and every state must lie on the straight path."""
    z0, eps = _latents(steps)
    frames = z0.shape[:2]
    schedule, level = C.sampling_schedule(steps, K_MAX)
    d = C.step_size(torch.full(frames, level), K_MAX)
    z = C.noise(z0, torch.ones(frames), eps)  # τ = 1: pure noise
    assert torch.equal(z, eps)
    for index in schedule.tolist():
        tau = C.tau_value(torch.full(frames, index), K_MAX)
        z = C.euler_step(z, z0, tau, d)  # oracle: x̂ = z0
        expected = C.noise(z0, C.tau_value(torch.full(frames, index - K_MAX // steps), K_MAX), eps)
        torch.testing.assert_close(z, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(z, z0, rtol=0, atol=1e-12)


def test_last_euler_step_lands_exactly_on_the_prediction():
    z, x_hat = _latents(1, dtype=torch.float32)
    tau = torch.full(z.shape[:2], 0.25)
    assert torch.equal(C.euler_step(z, x_hat, tau, tau), x_hat)


def test_euler_step_renoises_with_implied_noise_not_initial_noise():
    """Pain point P1: the Euler step equals re-noising x̂ with the implied noise, not with the starting noise."""
    z0, eps = _latents(2)
    x_hat = z0 + 0.3 * torch.randn_like(z0)  # an imperfect model
    tau, d = torch.full(z0.shape[:2], 0.75), torch.full(z0.shape[:2], 0.25)
    z_tau = C.noise(z0, tau, eps)
    stepped = C.euler_step(z_tau, x_hat, tau, d)
    renoised = C.noise(x_hat, tau - d, C.implied_noise(x_hat, z_tau, tau))
    torch.testing.assert_close(stepped, renoised, rtol=0, atol=1e-12)
    frozen = C.noise(x_hat, tau - d, eps)
    assert (stepped - frozen).abs().max() > 1e-2
    torch.testing.assert_close(z_tau + d[..., None, None] * C.velocity(x_hat, z_tau, tau), stepped)


def test_half_precision_inputs_are_promoted_to_float32():
    z, x_hat = (t.to(torch.bfloat16) for t in _latents(3, dtype=torch.float32))
    tau = torch.full(z.shape[:2], 0.5)
    out = C.euler_step(z, x_hat, tau, 0.25)
    assert out.dtype == torch.float32
    # dynamics.md P5: the bootstrap target from bf16 network outputs is formed in fp32, not rounded to bf16 on the way
    z_mid, x2 = (t.to(torch.bfloat16) for t in _latents(4, dtype=torch.float32))
    target = C.bootstrap_x_target(z, z_mid, x_hat, x2, tau, 0.25)
    exact = C.bootstrap_x_target(*(t.double() for t in (z, z_mid, x_hat, x2)), tau.double(), 0.25)
    assert target.dtype == torch.float32
    torch.testing.assert_close(target.double(), exact, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Shortcut bootstrap
# --------------------------------------------------------------------------------------------------------


def _bootstrap_case(seed: int):
    """Random latents, bootstrap levels and grid τ, an imperfect teacher and student (float64)."""
    g = torch.Generator().manual_seed(seed)
    z0, eps = _latents(seed, shape=(4, 6, 3, 8))
    level = C.sample_step_levels((4, 6), K_MAX, include_finest=False, generator=g)
    tau = C.tau_value(C.sample_tau_indices(level, K_MAX, generator=g), K_MAX).double()
    d = C.step_size(level, K_MAX).double()
    z_tau = C.noise(z0, tau, eps)
    x_first = z0 + 0.2 * torch.randn(z0.shape, generator=g, dtype=z0.dtype)
    z_mid, tau_mid = C.teacher_midpoint(z_tau, x_first, tau, d)
    x_second = z0 + 0.2 * torch.randn(z0.shape, generator=g, dtype=z0.dtype)
    x_hat = z0 + 0.5 * torch.randn(z0.shape, generator=g, dtype=z0.dtype)
    return z0, z_tau, z_mid, tau_mid, x_first, x_second, x_hat, tau, d, level


def test_velocity_space_bootstrap_loss_equals_x_space_loss():
    _, z_tau, z_mid, _, x1, x2, x_hat, tau, d, _ = _bootstrap_case(4)
    v_star = C.bootstrap_velocity(z_tau, z_mid, x1, x2, tau, d)
    x_star = C.bootstrap_x_target(z_tau, z_mid, x1, x2, tau, d)
    loss_v = C.bootstrap_loss_velocity(x_hat, z_tau, v_star, tau)
    loss_x = C.bootstrap_loss_x(x_hat, x_star, frame_dims=2)
    assert loss_v.shape == loss_x.shape == tau.shape
    assert loss_x.min() > 1e-3  # a real, non-trivial loss
    torch.testing.assert_close(loss_v, loss_x, rtol=1e-10, atol=0)
    torch.testing.assert_close(x_star, z_tau + tau[..., None, None] * v_star, rtol=1e-10, atol=1e-12)


def test_student_one_step_on_x_target_lands_where_teacher_two_half_steps_land():
    _, z_tau, z_mid, tau_mid, x1, x2, _, tau, d, _ = _bootstrap_case(5)
    x_star = C.bootstrap_x_target(z_tau, z_mid, x1, x2, tau, d)
    student = C.euler_step(z_tau, x_star, tau, d)
    teacher = C.euler_step(z_mid, x2, tau_mid, d / 2)
    torch.testing.assert_close(student, teacher, rtol=1e-10, atol=1e-12)


def test_teacher_midpoint_is_on_the_grid_and_oracle_teacher_targets_z0():
    z0, z_tau, _, tau_mid, _, _, _, tau, d, level = _bootstrap_case(6)
    mid_index = C.tau_index(tau_mid, K_MAX)  # raises if off the grid
    assert mid_index.min() >= 1
    assert torch.equal(C.step_size(C.teacher_level(level, K_MAX), K_MAX).double(), d / 2)
    z_mid, _ = C.teacher_midpoint(z_tau, z0, tau, d)
    x_star = C.bootstrap_x_target(z_tau, z_mid, z0, z0, tau, d)
    torch.testing.assert_close(x_star, z0, rtol=0, atol=1e-12)


def test_finest_level_cannot_bootstrap():
    with pytest.raises(ValueError, match="cannot bootstrap"):
        C.teacher_level(torch.tensor([0, 6]), K_MAX)


# --------------------------------------------------------------------------------------------------------
# Training draws and the loss weight
# --------------------------------------------------------------------------------------------------------


def test_ramp_weight_is_largest_at_clean():
    tau = C.tau_value(torch.arange(K_MAX + 1), K_MAX)
    w = C.ramp_weight(tau)
    assert int(w.argmax()) == 0 and w[0].item() == 1.0
    torch.testing.assert_close(w[-1], torch.tensor(0.1))
    assert bool((w[1:] < w[:-1]).all())


def test_targets_never_get_tau_zero_and_stay_on_their_grid():
    g = torch.Generator().manual_seed(7)
    level = C.sample_step_levels((200_000,), K_MAX, generator=g)
    index = C.sample_tau_indices(level, K_MAX, generator=g)
    assert index.min().item() >= 1 and index.max().item() == K_MAX
    stride = K_MAX >> level
    assert bool((index % stride == 0).all())
    for lv in range(C.num_levels(K_MAX)):  # every grid point {d, 2d, …, 1} of every level is reached
        assert torch.unique(index[level == lv]).tolist() == list(range(K_MAX >> lv, K_MAX + 1, K_MAX >> lv))


def _chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


# 99.9 % quantiles of chi-square with 6 and 5 degrees of freedom
CHI2_999 = {7: 22.46, 6: 20.52}


@pytest.mark.parametrize("include_finest, levels", [(True, 7), (False, 6)])
def test_each_step_level_is_drawn_equally_often(include_finest, levels):
    g = torch.Generator().manual_seed(8)
    drawn = C.sample_step_levels((70_000,), K_MAX, include_finest=include_finest, generator=g)
    counts = torch.bincount(drawn, minlength=C.num_levels(K_MAX)).double()
    assert counts[levels:].sum() == 0  # without the finest level, d_min is never drawn
    assert _chi_square(counts[:levels]) < CHI2_999[levels]
    # The same check rejects P(d) ∝ 1/d (d_min about half the time, d = 1/4 about 3 %).
    p = 1.0 / C.step_sizes(K_MAX)[:levels].double()
    wrong = torch.multinomial(p / p.sum(), 70_000, replacement=True, generator=g)
    assert _chi_square(torch.bincount(wrong, minlength=levels).double()) > CHI2_999[levels]


def test_sampling_is_reproducible_with_a_seeded_generator():
    draws = []
    for _ in range(2):
        g = torch.Generator().manual_seed(9)
        level = C.sample_step_levels((3, 16), K_MAX, generator=g)
        draws.append((level, C.sample_tau_indices(level, K_MAX, generator=g)))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])


# --------------------------------------------------------------------------------------------------------
# Context corruption
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau_ctx, index", [(0.1, 6), (0.12, 8), (0.125, 8), (0.0, 0), (0.001, 1), (0.999, 63)])
def test_tau_ctx_is_snapped_onto_the_grid(tau_ctx, index):
    assert C.snap_context_tau(tau_ctx, K_MAX) == index
    z, eps = _latents(10, dtype=torch.float32)
    noisy, tau_idx, level = C.corrupt_context(z, tau_ctx, eps, frame_dims=2, k_max=K_MAX)
    assert tau_idx.shape == level.shape == z.shape[:2]
    assert bool((tau_idx == index).all()) and bool((level == C.finest_level(K_MAX)).all())
    tau = C.tau_value(tau_idx, K_MAX)
    assert torch.equal(C.tau_index(tau, K_MAX), tau_idx)  # on the grid: round trip is exact
    torch.testing.assert_close(noisy, C.noise(z, torch.full(z.shape[:2], index / K_MAX), eps))


def test_off_grid_tau_is_refused_as_a_condition():
    with pytest.raises(ValueError, match="multiple of 1/k_max"):
        C.condition_indices(0.1, 1 / 64, K_MAX)


# --------------------------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------------------------

_Z = torch.zeros(2, 3, 4)
_T = torch.full((2, 3), 0.5)

BAD = [
    ("k_max", lambda: C.step_sizes(48)),
    ("k_max", lambda: C.step_sizes(0)),
    ("k_max", lambda: C.step_sizes(True)),
    ("level", lambda: C.step_size(torch.tensor([7]), 64)),
    ("level", lambda: C.step_size(torch.tensor([-1]), 64)),
    ("level", lambda: C.sample_tau_indices(torch.tensor([0.5]), 64)),
    ("d", lambda: C.step_level(0.3, 64)),
    ("d", lambda: C.step_level(1 / 128, 64)),
    ("d", lambda: C.step_level(0.0, 64)),
    ("tau_index", lambda: C.tau_value(torch.tensor([65]), 64)),
    ("tau_index", lambda: C.tau_value(torch.tensor([0.5]), 64)),
    ("tau", lambda: C.tau_index(1.5, 64)),
    ("tau", lambda: C.noise(_Z, torch.full((2, 3), -0.1), _Z)),
    ("tau", lambda: C.noise(_Z, torch.full((3, 2), 0.5), _Z)),
    ("shapes", lambda: C.noise(_Z, _T, torch.zeros(2, 3, 5))),
    ("tau", lambda: C.velocity(_Z, _Z, torch.zeros(2, 3))),
    ("tau", lambda: C.ramp_weight(float("nan"))),
    ("d must not exceed tau", lambda: C.euler_step(_Z, _Z, _T, 0.75)),
    ("d", lambda: C.euler_step(_Z, _Z, _T, 0.0)),
    ("steps", lambda: C.sampling_schedule(3, 64)),
    ("steps", lambda: C.sampling_schedule(128, 64)),
    ("include_finest", lambda: C.sample_step_levels((2,), 1, include_finest=False)),
    ("tau_ctx", lambda: C.snap_context_tau(1.0)),
    ("tau_ctx", lambda: C.snap_context_tau(-0.1)),
    ("frame_dims", lambda: C.per_frame_mse(_Z, _Z, 3)),
    ("frame_dims", lambda: C.corrupt_context(_Z, 0.1, _Z, frame_dims=4)),
]


@pytest.mark.parametrize("name, call", BAD, ids=[f"{i}-{name}" for i, (name, _) in enumerate(BAD)])
def test_bad_arguments_raise_value_errors_naming_them(name, call):
    with pytest.raises(ValueError, match=name):
        call()


def test_motion_weight_favours_still_frames_and_has_mean_one():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 1, 3, 4, 4, generator=g).repeat(1, 5, 1, 1, 1)  # still clips
    z[0, 3] += 1.0  # row 0: frame 3 moves (frames 3 and 4 change from their predecessor)
    w = C.motion_weight(z, floor=0.01)
    assert w.shape == (2, 5)
    assert torch.allclose(w.mean(), torch.tensor(1.0))
    assert w[0, 3] < w[0, 0] and w[0, 4] < w[0, 1] and w[0, 3] == w[0, 4]
    assert torch.allclose(w[1], w[1, :1].expand(5)) and torch.allclose(w[0, 0], w[1, 0])  # still frames alike
    assert w[1, 0] / w[0, 3] == pytest.approx((1.0 + 0.01) / 0.01, rel=1e-5)  # 1/(m + floor): change 1 vs 0
    z2 = z.clone()
    z2[:, 0] = z2[:, 1] + 0.5  # frame 0 has no predecessor: it takes its change to frame 1
    w2 = C.motion_weight(z2, floor=0.01)
    assert torch.allclose(w2[:, 0], w2[:, 1])


def test_motion_weight_of_single_frames_is_one_and_bad_floor_is_refused():
    assert torch.equal(C.motion_weight(torch.randn(3, 1, 2, 2, 2), 0.01), torch.ones(3, 1))
    for floor in (0.0, -1.0):
        with pytest.raises(ValueError, match="floor"):
            C.motion_weight(torch.randn(1, 2, 2, 2, 2), floor)
    with pytest.raises(ValueError, match="B, T"):
        C.motion_weight(torch.randn(4, 2), 0.01)


def test_input_skip_weight_is_the_posterior_weight_of_the_input_against_a_guess():
    w = C.input_skip_weight(torch.arange(K_MAX + 1), 0.01, K_MAX)
    assert w.shape == (K_MAX + 1,)
    assert float(w[0]) == 1.0 and float(w[-1]) == 0.0  # clean: the input; pure noise: the guess
    assert bool((w[1:] <= w[:-1]).all())  # less trust in the input as it gets noisier
    g = torch.Generator().manual_seed(0)
    guess = torch.randn(200_000, generator=g)
    z0 = guess + 0.1 * torch.randn(200_000, generator=g)  # change of variance 0.01 from the guess
    eps = torch.randn(200_000, generator=g)
    for index in (2, 8, 32):
        tau = torch.full((200_000,), index)
        innov = C.innovation(C.noise(z0, C.tau_value(tau, K_MAX), eps), guess, tau, K_MAX)
        best = ((z0 - guess) * innov).mean() / (innov * innov).mean()  # least squares: z0 ≈ guess + best·innov
        assert float(w[index]) == pytest.approx(float(best), rel=0.05), index
    torch.testing.assert_close(innov, C.tau_value(tau, K_MAX) * eps + (1 - C.tau_value(tau, K_MAX)) * (z0 - guess))
    idx = torch.tensor([[5, 40], [5, 40]])
    per_frame = C.input_skip_weight(idx, torch.tensor([[0.01, 0.01], [1.0, 1.0]]), K_MAX)
    torch.testing.assert_close(per_frame[0], w[[5, 40]])
    unit = C.linear_clean_estimate(torch.ones(2, 3), idx[1], K_MAX)[:, 0]  # var 1: the linear estimate's scale
    torch.testing.assert_close(per_frame[1], unit)
    for var in (0.0, -0.1):
        with pytest.raises(ValueError, match="variance"):
            C.input_skip_weight(idx, var, K_MAX)


def test_input_skip_head_scale_is_the_posterior_spread_over_the_guess_spread():
    s = C.input_skip_head_scale(torch.arange(K_MAX + 1), 0.003, K_MAX)
    assert float(s[0]) == 0.0 and float(s[-1]) == 1.0  # clean: the head has no say; pure noise: all of it
    assert bool((s[1:] >= s[:-1]).all())
    assert float(s[K_MAX // 4 :].min()) > 0.98  # from τ = 1/4 on (where a 4-step sampler goes) about 1
    g = torch.Generator().manual_seed(0)
    guess = torch.randn(200_000, generator=g)
    z0 = guess + 0.003**0.5 * torch.randn(200_000, generator=g)  # change of variance 0.003 from the guess
    eps = torch.randn(200_000, generator=g)
    for index in (1, 4, 16):
        tau = torch.full((200_000,), index)
        w = C.input_skip_weight(tau, 0.003, K_MAX)
        post = guess + w * C.innovation(C.noise(z0, C.tau_value(tau, K_MAX), eps), guess, tau, K_MAX)
        spread = ((z0 - post).pow(2).mean() / 0.003).sqrt()  # what is left of the frame after the skip, over var
        assert float(s[index]) == pytest.approx(float(spread), rel=0.02), index
    for var in (0.0, -0.1):
        with pytest.raises(ValueError, match="variance"):
            C.input_skip_head_scale(torch.arange(3), var, K_MAX)
