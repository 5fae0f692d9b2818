"""The dynamics family's noise conventions: the ONE module that does arithmetic on the noise level τ.

Everything else (model, training step, samplers, rollout, evaluation) calls these functions and never adds,
scales or divides τ itself. The DreamerV4 paper and most reimplementations use the opposite convention (signal
level ``s``, 0 = noise); each formula below is written in ours, with the paper's form next to it.

Noise level and corruption
    ``τ ∈ [0, 1]``: **τ = 0 is clean, τ = 1 is pure noise**; ``z_τ = (1 − τ)·z0 + τ·ε`` with ``ε ~ N(0, I)``.
    The paper's signal level is ``s = 1 − τ``. τ is per frame (diffusion forcing): a ``[B, T]`` tensor of
    levels for latents ``[B, T, ...]``.

Step-size grid (shortcut forcing, paper Eq. 4)
    ``k_max`` is a power of two (64 by default). The step sizes are ``d = 1/k`` for ``k ∈ {1, 2, 4, …, k_max}``.
    A step size is named by its **level** ``ℓ = log2(1/d) ∈ {0, …, E}`` with ``E = log2(k_max)``: level 0 is
    ``d = 1`` (noise to clean in one step), level ``E`` is the finest step ``d_min = 1/k_max`` (plain flow
    matching). The τ grid reachable with step ``d`` is ``{d, 2d, …, 1}``: it starts at pure noise and never
    contains τ = 0, so a training target is never clean and no velocity ever divides by zero.
    Every τ used here is a multiple of ``1/k_max`` and is stored exactly as the **τ index**
    ``i = τ·k_max ∈ {0, …, k_max}`` (0 only for clean frames, e.g. unnoised context).

What the model embeds
    Two integers per frame, embedded separately: the τ index ``i ∈ {0, …, k_max}`` and the step level
    ``ℓ ∈ {0, …, E}`` (the log's "d/k_max" step conditioning, as an index). :func:`condition_indices` maps
    ``(τ, d)`` to them and refuses values off the grid (τ_ctx = 0.1 is off the 64-level grid: snap it first).

Training draws (diffusion forcing + shortcut forcing)
    Step levels are **uniform over the levels** (``P(ℓ) = 1/(E+1)``, or ``1/E`` without the finest level on
    bootstrap rows), i.e. d uniform over the powers of two. NOT ``P(d) ∝ 1/d``, which gives ``d = 1/4`` (the
    4-step level) about 3 % of the draws. Given the level, τ is uniform on the grid ``{d, 2d, …, 1}``,
    independently per frame.

x-prediction, velocity and the Euler step
    The model predicts the clean latent ``ẑ0 = f(z_τ, i, ℓ)`` (paper: ``ẑ1 = f(z̃, s, d)``). Its velocity per
    unit *decrease* of τ is ``v = (ẑ0 − z_τ)/τ`` (paper: ``(ẑ1 − z̃)/(1 − s)``). An Euler step of size ``d`` is
    ``z_{τ−d} = z_τ + d·v = (1 − d/τ)·z_τ + (d/τ)·ẑ0``; the last step (``d = τ``) lands exactly on ``ẑ0``. This is
    the same as re-noising ``ẑ0`` to ``τ − d`` with the *implied* noise ``ε̂ = (z_τ − (1 − τ)·ẑ0)/τ`` — never with
    the sampler's initial noise (that diverges as the step count grows).

Loss weight (paper Eq. 8)
    The paper's ramp ``w = 0.9·s + 0.1`` becomes ``w(τ) = 1 − 0.9·τ``: 1 at clean, 0.1 at pure noise.

Shortcut bootstrap target (paper Eq. 7), for ``d ≥ 2/k_max``
    The teacher (same network, no gradient) takes two half steps at level ``ℓ + 1``:
    ``x1 = f(z_τ, τ, d/2)``, ``z_m = z_τ + (d/2)·b1`` at ``τ_m = τ − d/2`` (on the grid), ``x2 = f(z_m, τ_m, d/2)``,
    with ``b1 = (x1 − z_τ)/τ`` and ``b2 = (x2 − z_m)/τ_m``; the target velocity is ``v* = (b1 + b2)/2``. The
    student makes one step of size ``d``. The paper's velocity loss, scaled by ``(1 − s)² = τ²``, is
    ``τ²·‖v̂ − v*‖²``, which equals the x-space loss ``‖ẑ0 − x*‖²`` with ``x* = z_τ + τ·v*``. Train on the x-space
    form: it has no division on the student side (velocity-space losses lose precision in bf16).

Sampling with K steps (K a power of two, ``K ≤ k_max``)
    ``d = 1/K``, level ``log2 K``, τ = 1, 1 − d, …, d. K = k_max is the plain Euler sampler; K = 4 the shortcut.

Context corruption at inference
    Context frames (and generated frames reused as context) are noised to ``τ_ctx`` (0.1 by default) with a
    **fixed** noise per frame, labelled with that same τ index and with the finest step level. ``τ_ctx`` is
    snapped to the nearest multiple of ``1/k_max`` (0.1 → 6/64 = 0.09375); a positive ``τ_ctx`` never snaps to
    clean.

All arithmetic runs in at least float32 (bf16/fp16 inputs are promoted). Arguments are checked and bad ones
raise ``ValueError`` naming the argument; the value checks read tensors, so each is a device sync on GPUs.
"""

from __future__ import annotations

import math

import torch

DEFAULT_K_MAX = 64
RAMP_FLOOR = 0.1  # paper Eq. 8: the weight at pure noise


# ---------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------


def check_k_max(k_max: int) -> int:
    """``k_max`` as an int; a power of two ≥ 1, else ``ValueError``."""
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1 or k_max & (k_max - 1):
        raise ValueError(f"k_max must be a power of two >= 1, got {k_max!r}")
    return k_max


def _float(x: torch.Tensor | float) -> torch.Tensor:
    """A float tensor in at least float32 (bf16/fp16 promoted, float64 kept)."""
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.float()
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _like(x: torch.Tensor | float, z: torch.Tensor) -> torch.Tensor:
    """A per-frame τ or d as a tensor with the latents' (≥ float32) dtype and device: τ math runs at that precision."""
    return _float(x).to(device=z.device, dtype=z.dtype)


def _check_range(name: str, x: torch.Tensor, low: float, high: float, low_open: bool = False) -> None:
    bad = torch.isnan(x) | (x > high) | ((x <= low) if low_open else (x < low))
    if bool(bad.any()):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got values from {x.min()} to {x.max()}")


def _per_frame(name: str, tau: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``tau`` ``[*F]`` reshaped to broadcast over latents ``z`` ``[*F, ...]`` (a 0-d tau broadcasts to all)."""
    if tau.ndim > z.ndim or tuple(z.shape[: tau.ndim]) != tuple(tau.shape):
        raise ValueError(
            f"{name} of shape {tuple(tau.shape)} must match the leading (frame) dims of the latents, "
            f"shape {tuple(z.shape)}"
        )
    return tau.reshape(tuple(tau.shape) + (1,) * (z.ndim - tau.ndim))


def _same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must be equal, got {shapes}")


# ---------------------------------------------------------------------------------------------------------
# The grid: step levels, step sizes, τ indices, what the model embeds
# ---------------------------------------------------------------------------------------------------------


def finest_level(k_max: int = DEFAULT_K_MAX) -> int:
    """``E = log2(k_max)``: the level of ``d_min = 1/k_max``."""
    return check_k_max(k_max).bit_length() - 1


def num_levels(k_max: int = DEFAULT_K_MAX) -> int:
    """``E + 1`` step levels (7 for k_max = 64)."""
    return finest_level(k_max) + 1


def _check_levels(name: str, level: torch.Tensor, k_max: int) -> torch.Tensor:
    level = torch.as_tensor(level)
    if level.is_floating_point() or level.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {level.dtype}")
    if level.numel() and (int(level.min()) < 0 or int(level.max()) > finest_level(k_max)):
        raise ValueError(
            f"{name} must lie in [0, {finest_level(k_max)}] for k_max={k_max}, "
            f"got values from {int(level.min())} to {int(level.max())}"
        )
    return level.long()


def step_sizes(k_max: int = DEFAULT_K_MAX) -> torch.Tensor:
    """All step sizes ``d`` by level: ``[1, 1/2, …, 1/k_max]`` (float32, exact)."""
    return step_size(torch.arange(num_levels(k_max)), k_max)


def step_size(level: torch.Tensor, k_max: int = DEFAULT_K_MAX) -> torch.Tensor:
    """Step level ``ℓ`` (integer tensor) -> step size ``d = 2^-ℓ`` (float32, exact)."""
    level = _check_levels("level", level, k_max)
    return torch.ldexp(torch.ones_like(level, dtype=torch.float32), -level)


def step_level(d: torch.Tensor | float, k_max: int = DEFAULT_K_MAX) -> torch.Tensor:
    """Step size ``d`` -> its level ``log2(1/d)`` (long); ``d`` must be one of :func:`step_sizes`."""
    d = _float(d)
    _check_range("d", d, 0.0, 1.0, low_open=True)
    level = torch.round(-torch.log2(d)).long()
    if level.numel() == 0:
        return level
    if int(level.max()) > finest_level(k_max) or not torch.equal(step_size(level, k_max).to(d), d):
        raise ValueError(f"d must be a power of two in [1/{k_max}, 1] (k_max={k_max}), got {d.unique().tolist()}")
    return level


def tau_value(tau_index: torch.Tensor, k_max: int = DEFAULT_K_MAX) -> torch.Tensor:
    """τ index ``i ∈ {0, …, k_max}`` -> ``τ = i/k_max`` (float32, exact)."""
    tau_index = torch.as_tensor(tau_index)
    if tau_index.is_floating_point() or tau_index.dtype == torch.bool:
        raise ValueError(f"tau_index must be an integer tensor, got dtype {tau_index.dtype}")
    k_max = check_k_max(k_max)
    if tau_index.numel() and (int(tau_index.min()) < 0 or int(tau_index.max()) > k_max):
        raise ValueError(
            f"tau_index must lie in [0, {k_max}], got values from {int(tau_index.min())} to {int(tau_index.max())}"
        )
    return tau_index.float() / k_max


def tau_index(tau: torch.Tensor | float, k_max: int = DEFAULT_K_MAX) -> torch.Tensor:
    """``τ`` -> its τ index ``τ·k_max`` (long); τ must be a multiple of ``1/k_max`` in [0, 1]."""
    tau = _float(tau)
    _check_range("tau", tau, 0.0, 1.0)
    k_max = check_k_max(k_max)
    index = torch.round(tau * k_max)
    if not torch.equal(index / k_max, tau):
        raise ValueError(
            f"tau must be a multiple of 1/k_max = 1/{k_max} (snap it with snap_context_tau), "
            f"got {tau.flatten()[:8].tolist()}"
        )
    return index.long()


def condition_indices(
    tau: torch.Tensor | float, d: torch.Tensor | float, k_max: int = DEFAULT_K_MAX
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(τ, d)`` -> ``(τ index, step level)``, the two integers the model embeds; both must be on the grid."""
    return tau_index(tau, k_max), step_level(d, k_max)


# ---------------------------------------------------------------------------------------------------------
# Training draws
# ---------------------------------------------------------------------------------------------------------


def sample_step_levels(
    shape: tuple[int, ...],
    k_max: int = DEFAULT_K_MAX,
    *,
    include_finest: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Step levels ``[*shape]`` drawn uniformly over ``{0, …, E}`` (d uniform over the powers of two).

    ``include_finest=False`` draws over ``{0, …, E − 1}``: the levels that can bootstrap (their half step
    ``d/2`` is still on the grid). Not ``P(d) ∝ 1/d``.
    """
    top = finest_level(k_max) + (1 if include_finest else 0)
    if top < 1:
        raise ValueError(f"include_finest=False needs k_max >= 2 (a level coarser than d_min), got k_max={k_max}")
    return torch.randint(0, top, tuple(shape), generator=generator, device=device)


def sample_tau_indices(
    level: torch.Tensor, k_max: int = DEFAULT_K_MAX, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-frame τ indices, uniform on the grid ``{d, 2d, …, 1}`` of each frame's step size ``d = 2^-level``.

    Returns longs in ``{1, …, k_max}`` (never 0: a target is never clean), multiples of ``k_max·d``.
    """
    level = _check_levels("level", level, k_max)
    steps = torch.ldexp(torch.ones_like(level, dtype=torch.float32), level)  # 1/d grid points: d, 2d, ..., 1
    # rand < 1 and steps is a power of two, so floor(rand·steps) < steps exactly: j ∈ {1, …, 1/d}.
    j = torch.floor(torch.rand(level.shape, generator=generator, device=level.device) * steps).long() + 1
    return j * torch.bitwise_right_shift(torch.full_like(level, check_k_max(k_max)), level)


def ramp_weight(tau: torch.Tensor | float) -> torch.Tensor:
    """Loss weight ``w(τ) = 1 − 0.9·τ`` (paper: ``0.9·s + 0.1``): 1 at clean, 0.1 at pure noise."""
    tau = _float(tau)
    _check_range("tau", tau, 0.0, 1.0)
    return 1.0 - (1.0 - RAMP_FLOOR) * tau


def motion_weight(z0: torch.Tensor, floor: float) -> torch.Tensor:
    """Per-frame loss weight for clean latents ``[B, T, ...]`` -> ``[B, T]``: ``1/(m + floor)``, normalised to mean 1
    over the frames given, where ``m`` is the frame's mean squared change from the frame before (frame 0: its change
    to frame 1; a single frame, ``T = 1``: weight 1).

    A rollout is scored by the mean of per-frame PSNRs, i.e. by ``log`` MSE: on a nearly still frame a small
    absolute error costs as many dB as a large one on a moving frame, but a plain MSE loss barely sees it.
    Weighting by ``1/(m + floor)`` spends the loss on the error *relative to* a frame's motion; ``floor`` (in
    squared normalised-latent units) caps the weight of a still frame at ``(mean + floor)/floor`` times the mean."""
    z0 = _float(z0)
    if not floor > 0:
        raise ValueError(f"motion weight floor must be > 0, got {floor}")
    if z0.ndim < 3:
        raise ValueError(f"motion_weight needs latents [B, T, ...], got shape {tuple(z0.shape)}")
    b, t = z0.shape[:2]
    if t < 2:
        return torch.ones(b, t, device=z0.device)
    change = per_frame_mse(z0[:, 1:], z0[:, :-1], 2)
    m = torch.cat([change[:, :1], change], dim=1)
    w = 1.0 / (m + floor)
    return w / w.mean()


# ---------------------------------------------------------------------------------------------------------
# Corruption, velocity, Euler
# ---------------------------------------------------------------------------------------------------------


def noise(z0: torch.Tensor, tau: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
    """``z_τ = (1 − τ)·z0 + τ·ε``; ``tau`` is per frame (``[*F]`` for latents ``[*F, ...]``) or a scalar."""
    z0, eps = _float(z0), _float(eps)
    _same_shape(z0=z0, eps=eps)
    tau = _like(tau, z0)
    _check_range("tau", tau, 0.0, 1.0)
    t = _per_frame("tau", tau, z0)
    return (1.0 - t) * z0 + t * eps


def velocity(x_hat: torch.Tensor, z_tau: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """x-prediction -> velocity per unit decrease of τ: ``v = (ẑ0 − z_τ)/τ``; needs τ > 0."""
    x_hat, z_tau = _float(x_hat), _float(z_tau)
    _same_shape(x_hat=x_hat, z_tau=z_tau)
    tau = _like(tau, z_tau)
    _check_range("tau", tau, 0.0, 1.0, low_open=True)
    return (x_hat - z_tau) / _per_frame("tau", tau, z_tau)


def implied_noise(x_hat: torch.Tensor, z_tau: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """The noise the prediction implies: ``ε̂ = (z_τ − (1 − τ)·ẑ0)/τ``; needs τ > 0."""
    x_hat, z_tau = _float(x_hat), _float(z_tau)
    _same_shape(x_hat=x_hat, z_tau=z_tau)
    tau = _like(tau, z_tau)
    _check_range("tau", tau, 0.0, 1.0, low_open=True)
    t = _per_frame("tau", tau, z_tau)
    return (z_tau - (1.0 - t) * x_hat) / t


def linear_clean_estimate(z_tau: torch.Tensor, tau_index: torch.Tensor, k_max: int = DEFAULT_K_MAX) -> torch.Tensor:
    """The best linear guess of ``z0`` from ``z_τ`` for unit-variance latents: ``(1 − τ)/((1 − τ)² + τ²)·z_τ``.

    (``E[z0 | z_τ]`` when ``z0`` and ``ε`` are independent standard normals.) ``z_τ`` itself at τ = 0, zero at
    τ = 1. ``tau_index`` ``[*F]`` per frame of ``z_τ`` ``[*F, ...]``. The model's prior adds this
    estimate of frame ``t − 1`` to its prediction of frame ``t`` (the untrained model copies the last frame).
    """
    z_tau = _float(z_tau)
    tau = _like(tau_value(tau_index, k_max), z_tau)
    scale = (1.0 - tau) / ((1.0 - tau).pow(2) + tau.pow(2))
    return _per_frame("tau_index", scale, z_tau) * z_tau


def input_skip_weight(tau_index: torch.Tensor, var: torch.Tensor | float, k_max: int = DEFAULT_K_MAX) -> torch.Tensor:
    """The weight of a frame's own noisy input against a guess ``g`` of it, per frame (``tau_index`` ``[*F]``).

    If ``z0 = g + δ`` with ``δ ~ N(0, var)`` per latent number, then ``E[z0 | z_τ, g] = g + w·(z_τ − (1 − τ)·g)``
    with ``w = var·(1 − τ)/(var·(1 − τ)² + τ²)``: 1 at τ = 0 (the input is the frame), 0 at τ = 1 (the guess).
    ``var`` (a float or per frame): how far the frame may be from the guess; 1 for no guess (``g = 0``, unit-variance
    latents), where ``w`` is :func:`linear_clean_estimate`'s scale. The model's input skip adds ``w`` times
    :func:`innovation`, so near the clean end it passes its input through instead of rebuilding it in the head.
    """
    tau, var = _skip_tau_var(tau_index, var, k_max)
    return var * (1.0 - tau) / (var * (1.0 - tau).pow(2) + tau.pow(2))


def _skip_tau_var(tau_index: torch.Tensor, var: torch.Tensor | float, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """τ of ``tau_index`` and the input skip's variance (checked > 0) as a float tensor on τ's device."""
    tau = tau_value(tau_index, k_max)
    if isinstance(var, (int, float)):  # the model's case: checked here, no device sync
        if not var > 0:
            raise ValueError(f"the input skip's variance must be > 0, got {var}")
    elif bool((torch.as_tensor(var) <= 0).any()):
        raise ValueError(f"the input skip's variance must be > 0, got {torch.as_tensor(var).min().item()}")
    return tau, _float(var).to(tau.device)


def input_skip_head_scale(
    tau_index: torch.Tensor, var: torch.Tensor | float, k_max: int = DEFAULT_K_MAX
) -> torch.Tensor:
    """The posterior's standard deviation over the guess's, ``τ/sqrt(var·(1 − τ)² + τ²)``, per frame.

    Under :func:`input_skip_weight`'s model the clean frame given its noisy input and the guess has variance
    ``var·τ²/(var·(1 − τ)² + τ²)``; this is its square root over ``sqrt(var)``: 0 at τ = 0, 1 at τ = 1, and
    ≥ 0.98 for τ ≥ 1/4 at ``var`` 0.003. The model multiplies its head's output by it (the
    output preconditioning of EDM, Karras et al. 2022, against a guess): the head's error then fades out where the
    input alone nearly gives the frame, so a zero head is the Gaussian posterior mean and a poor one cannot be
    worse than about the posterior's error at the clean end, where only a many-step sampler goes.
    """
    tau, var = _skip_tau_var(tau_index, var, k_max)
    return tau / torch.sqrt(var * (1.0 - tau).pow(2) + tau.pow(2))


def innovation(z_tau: torch.Tensor, guess: torch.Tensor, tau_index: torch.Tensor, k_max: int = DEFAULT_K_MAX):
    """``z_τ − (1 − τ)·guess``: what a frame's noisy input says beyond a guess of its clean latents (zero in
    expectation when the guess is right), per frame ``tau_index`` ``[*F]`` of ``z_τ`` ``[*F, ...]``."""
    _same_shape(z_tau=z_tau, guess=guess)
    z_tau = _float(z_tau)
    tau = _like(tau_value(tau_index, k_max), z_tau)
    return z_tau - _per_frame("tau_index", 1.0 - tau, z_tau) * guess.to(z_tau.dtype)


def _check_step(tau: torch.Tensor, d: torch.Tensor) -> None:
    _check_range("tau", tau, 0.0, 1.0, low_open=True)
    _check_range("d", d, 0.0, 1.0, low_open=True)
    if bool((d > tau).any()):
        raise ValueError("d must not exceed tau (a step of size d from tau would pass the clean end)")


def euler_step(
    z_tau: torch.Tensor, x_hat: torch.Tensor, tau: torch.Tensor | float, d: torch.Tensor | float
) -> torch.Tensor:
    """One Euler step of size ``d`` with x-prediction: ``z_{τ−d} = (1 − d/τ)·z_τ + (d/τ)·ẑ0`` (= ``z_τ + d·v``).

    ``tau`` and ``d`` are per frame or scalars, ``0 < d ≤ τ``; with ``d = τ`` the result is ``ẑ0`` exactly.
    Equal to re-noising ``ẑ0`` at ``τ − d`` with :func:`implied_noise`, not with the sampler's initial noise.
    """
    x_hat, z_tau = _float(x_hat), _float(z_tau)
    _same_shape(x_hat=x_hat, z_tau=z_tau)
    tau, d = torch.broadcast_tensors(_like(tau, z_tau), _like(d, z_tau))
    _check_step(tau, d)
    frac = _per_frame("tau", d / tau, z_tau)
    return (1.0 - frac) * z_tau + frac * x_hat


def sampling_schedule(steps: int, k_max: int = DEFAULT_K_MAX) -> tuple[torch.Tensor, int]:
    """The τ indices ``[steps]`` of a ``steps``-step sampler (τ = 1, 1 − d, …, d with d = 1/steps) and its level.

    ``steps`` is a power of two ≤ ``k_max``; step ``k`` goes from ``tau_value(indices[k])`` down by ``d``.
    """
    k_max = check_k_max(k_max)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or steps & (steps - 1) or steps > k_max:
        raise ValueError(f"steps must be a power of two in [1, k_max={k_max}], got {steps!r}")
    stride = k_max // steps
    return torch.arange(k_max, 0, -stride), steps.bit_length() - 1


# ---------------------------------------------------------------------------------------------------------
# Shortcut bootstrap
# ---------------------------------------------------------------------------------------------------------


def teacher_level(level: torch.Tensor, k_max: int = DEFAULT_K_MAX) -> torch.Tensor:
    """The teacher's half-step level ``ℓ + 1``; the finest level cannot bootstrap (its half step is off the grid)."""
    level = _check_levels("level", level, k_max)
    if level.numel() and int(level.max()) >= finest_level(k_max):
        raise ValueError(
            f"level {finest_level(k_max)} (d = 1/{k_max}) cannot bootstrap: its half step is off the grid; "
            "give bootstrap rows levels drawn with include_finest=False"
        )
    return level + 1


def teacher_midpoint(
    z_tau: torch.Tensor, x_first: torch.Tensor, tau: torch.Tensor | float, d: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's first half step: ``(z_m, τ_m)`` with ``z_m = euler_step(z_τ, x1, τ, d/2)``, ``τ_m = τ − d/2``."""
    z_tau = _float(z_tau)
    tau, d = torch.broadcast_tensors(_like(tau, z_tau), _like(d, z_tau))
    _check_step(tau, d)
    half = d / 2
    return euler_step(z_tau, x_first, tau, half), tau - half


def _bootstrap_args(z_tau, z_mid, x_first, x_second, tau, d):
    z_tau, z_mid, x_first, x_second = (_float(t) for t in (z_tau, z_mid, x_first, x_second))
    _same_shape(z_tau=z_tau, z_mid=z_mid, x_first=x_first, x_second=x_second)
    tau, d = torch.broadcast_tensors(_like(tau, z_tau), _like(d, z_tau))
    _check_step(tau, d)
    return z_tau, z_mid, x_first, x_second, tau, tau - d / 2


def bootstrap_velocity(
    z_tau: torch.Tensor,
    z_mid: torch.Tensor,
    x_first: torch.Tensor,
    x_second: torch.Tensor,
    tau: torch.Tensor | float,
    d: torch.Tensor | float,
) -> torch.Tensor:
    """Velocity-space target ``v* = (b1 + b2)/2``, ``b1 = (x1 − z_τ)/τ``, ``b2 = (x2 − z_m)/(τ − d/2)``.

    ``x_first``/``x_second`` are the teacher's predictions at ``(z_τ, τ)`` and ``(z_m, τ − d/2)``, both at the
    half step ``d/2``; ``z_mid`` comes from :func:`teacher_midpoint`.
    """
    z_tau, z_mid, x_first, x_second, tau, tau_mid = _bootstrap_args(z_tau, z_mid, x_first, x_second, tau, d)
    b1 = (x_first - z_tau) / _per_frame("tau", tau, z_tau)
    b2 = (x_second - z_mid) / _per_frame("tau", tau_mid, z_tau)
    return 0.5 * (b1 + b2)


def bootstrap_x_target(
    z_tau: torch.Tensor,
    z_mid: torch.Tensor,
    x_first: torch.Tensor,
    x_second: torch.Tensor,
    tau: torch.Tensor | float,
    d: torch.Tensor | float,
) -> torch.Tensor:
    """x-space target ``x* = z_τ + τ·v* = (z_τ + x1)/2 + τ/(2(τ − d/2))·(x2 − z_m)`` (same arguments as
    :func:`bootstrap_velocity`). Computed without dividing by τ; call it under ``no_grad`` and detach."""
    z_tau, z_mid, x_first, x_second, tau, tau_mid = _bootstrap_args(z_tau, z_mid, x_first, x_second, tau, d)
    gain = _per_frame("tau", tau / (2.0 * tau_mid), z_tau)
    return 0.5 * (z_tau + x_first) + gain * (x_second - z_mid)


def per_frame_mse(a: torch.Tensor, b: torch.Tensor, frame_dims: int) -> torch.Tensor:
    """Mean squared error over everything after the first ``frame_dims`` dims: ``[*F, ...]`` -> ``[*F]``."""
    a, b = _float(a), _float(b)
    _same_shape(a=a, b=b)
    if isinstance(frame_dims, bool) or not isinstance(frame_dims, int) or not 0 <= frame_dims < a.ndim:
        raise ValueError(f"frame_dims must be an int in [0, {a.ndim - 1}] for tensors of shape {tuple(a.shape)}")
    return (a - b).pow(2).flatten(frame_dims).mean(dim=-1)


def bootstrap_loss_velocity(
    x_hat: torch.Tensor, z_tau: torch.Tensor, v_star: torch.Tensor, tau: torch.Tensor | float
) -> torch.Tensor:
    """Per-frame paper loss ``τ²·mean((v̂ − v*)²)`` with the student's ``v̂ = velocity(ẑ0, z_τ, τ)`` -> ``[*F]``."""
    tau = _like(tau, _float(z_tau))
    v_hat = velocity(x_hat, z_tau, tau)
    return tau.pow(2) * per_frame_mse(v_hat, v_star, tau.ndim)


def bootstrap_loss_x(x_hat: torch.Tensor, x_star: torch.Tensor, frame_dims: int) -> torch.Tensor:
    """Per-frame x-space loss ``mean((ẑ0 − x*)²)`` -> ``[*F]``; equals :func:`bootstrap_loss_velocity`."""
    return per_frame_mse(x_hat, x_star, frame_dims)


# ---------------------------------------------------------------------------------------------------------
# Context corruption at inference
# ---------------------------------------------------------------------------------------------------------


def snap_context_tau(tau_ctx: float, k_max: int = DEFAULT_K_MAX) -> int:
    """``τ_ctx`` -> the nearest τ index on the ``1/k_max`` grid (0.1 -> 6 at k_max = 64); a positive ``τ_ctx``
    gives at least 1. ``τ_ctx`` must lie in ``[0, 1)`` (1 would be pure-noise context)."""
    k_max = check_k_max(k_max)
    if isinstance(tau_ctx, bool) or not isinstance(tau_ctx, int | float) or not 0.0 <= tau_ctx < 1.0:
        raise ValueError(f"tau_ctx must be a number in [0, 1), got {tau_ctx!r}")
    index = min(int(math.floor(tau_ctx * k_max + 0.5)), k_max - 1)
    return max(index, 1) if tau_ctx > 0 else 0


def corrupt_context(
    z_ctx: torch.Tensor, tau_ctx: float, eps: torch.Tensor, frame_dims: int = 2, k_max: int = DEFAULT_K_MAX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise context latents ``[*F, ...]`` to the snapped ``τ_ctx`` with the given (fixed) noise.

    Returns ``(z_noisy, tau_index [*F], step_level [*F])``: the condition that matches the noise actually added
    (τ index of the snapped level, finest step level), so the label and the corruption always agree.
    """
    z_ctx = _float(z_ctx)
    if isinstance(frame_dims, bool) or not isinstance(frame_dims, int) or not 0 <= frame_dims <= z_ctx.ndim:
        raise ValueError(f"frame_dims must be an int in [0, {z_ctx.ndim}] for latents {tuple(z_ctx.shape)}")
    index = snap_context_tau(tau_ctx, k_max)
    frames = tuple(z_ctx.shape[:frame_dims])
    tau_idx = torch.full(frames, index, dtype=torch.long, device=z_ctx.device)
    level = torch.full(frames, finest_level(k_max), dtype=torch.long, device=z_ctx.device)
    return noise(z_ctx, tau_value(tau_idx, k_max), eps), tau_idx, level


# ---------------------------------------------------------------------------------------------------------
# Evaluation probes
# ---------------------------------------------------------------------------------------------------------


def probe_tau_index(level: int, k_max: int = DEFAULT_K_MAX) -> int:
    """The τ index of a one-step denoising probe at step level ``level``: the point of that level's grid
    ``{d, 2d, …, 1}`` nearest τ = 0.5 (0.5 itself for ``d ≤ 1/2``; pure noise for ``d = 1``)."""
    d = step_size(torch.tensor(level), k_max)
    return int(tau_index(torch.clamp(torch.round(0.5 / d) * d, min=d, max=1.0), k_max))
