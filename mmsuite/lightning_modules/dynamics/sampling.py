"""Sampling and autoregressive rollout for the dynamics model (x-prediction, Euler steps, shortcut steps).

All τ arithmetic goes through :mod:`.conventions`. One new frame is sampled from pure noise with ``steps`` Euler
steps of size ``d = 1/steps`` (``steps = k_max``: the plain flow sampler; ``steps = 4``: the shortcut sampler),
conditioned at step level ``log2(steps)``. Context frames — the given ones and every generated one once it is
final — are corrupted to ``τ_ctx`` (snapped onto the grid) with a FIXED noise per frame and labelled with that same
τ index and the finest step level, so label and corruption agree.

Two equal paths (tested): ``cached=False`` re-runs every frame at every step; ``cached=True`` (default) keeps the
keys/values of the committed context frames in each temporal layer and runs only the new frame per step; a
generated frame is committed at τ_ctx inside the first pass of the next frame (two frames in that pass). Noise
comes from a CPU generator in a fixed order, so both paths and every device draw the same noise.
"""

from __future__ import annotations

import torch

from mmsuite.lightning_modules.dynamics import conventions as C
from mmsuite.lightning_modules.dynamics.model import DynamicsTransformer, extend_cache


def _randn(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(like.device)


@torch.no_grad()
def sample_frame(
    model: DynamicsTransformer,
    noise: torch.Tensor,
    steps: int,
    *,
    context: torch.Tensor | None = None,
    context_tau_index: torch.Tensor | None = None,
    context_level: torch.Tensor | None = None,
    actions: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new frame ``[B, 1, C, H, W]`` from ``noise`` (τ = 1) in ``steps`` Euler steps, re-running the context
    ``[B, Tc, ...]`` (already corrupted, with its τ indices and levels ``[B, Tc]``) at every step; ``actions``
    ``[B, Tc + 1]`` or None."""
    return _sample(model, noise, steps, actions, context, context_tau_index, context_level, cache=None)[0]


def _sample(model, noise, steps, actions, context, context_tau_index, context_level, cache, pending=None, last=None):
    """The Euler loop of both paths. Cached (``cache`` a list, possibly empty): only the new frame runs, after
    the cached ones; ``pending`` = ``(z, tau_index, level, actions)`` of a finished frame not yet in the cache is
    run together with the first step and committed from it; ``last`` = ``(z, tau_index)`` of the last cached frame
    (what the model's prior reads). Returns ``(frame, cache, last)``."""
    indices, level = C.sampling_schedule(steps, model.k_max)
    b = noise.shape[0]
    lvl = torch.full((b, 1), level, dtype=torch.long, device=noise.device)
    d = C.step_size(lvl, model.k_max).to(noise.device)
    z = noise.float()
    for index in indices.tolist():
        tau_idx = torch.full((b, 1), index, dtype=torch.long, device=noise.device)
        if cache is not None and pending is not None:  # commit the last frame in the same pass
            pz, pidx, plvl, pact = pending
            acts = None if actions is None else torch.cat([pact, actions], dim=1)
            out, kv = model.forward_cached(
                torch.cat([pz, z], dim=1),
                torch.cat([pidx, tau_idx], dim=1),
                torch.cat([plvl, lvl], dim=1),
                acts,
                cache,
                last,
            )
            x_hat = out[:, -1:]
            cache, pending = extend_cache(cache, [(k[:, :, :1], v[:, :, :1]) for k, v in kv]), None
            last = (pz, pidx)
        elif cache is not None:
            x_hat, _ = model.forward_cached(z, tau_idx, lvl, actions, cache, last)
        elif context is None or context.shape[1] == 0:
            x_hat = model(z, tau_idx, lvl, actions)
        else:
            x_hat = model(
                torch.cat([context, z], dim=1),
                torch.cat([context_tau_index, tau_idx], dim=1),
                torch.cat([context_level, lvl], dim=1),
                actions,
            )[:, -1:]
        z = C.euler_step(z, x_hat, C.tau_value(tau_idx, model.k_max).to(z.device), d)
    return z, cache, last


@torch.no_grad()
def rollout(
    model: DynamicsTransformer,
    context: torch.Tensor,
    horizon: int,
    steps: int,
    tau_ctx: float = 0.1,
    actions: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    cached: bool = True,
) -> torch.Tensor:
    """Predict ``horizon`` frames after clean context latents ``[B, Tc, C, H, W]`` (``Tc`` may be 0: start frames).

    ``actions`` ``[B, Tc + horizon]`` (or None). Returns the predicted clean latents ``[B, horizon, C, H, W]``;
    each is fed back as context at ``τ_ctx`` with its own fixed noise. Cached, a generated frame is committed to
    the cache in the first denoising pass of the next one (a two-frame pass), so K-step sampling costs K passes a
    frame.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    b, tc = context.shape[:2]
    if actions is not None and actions.shape[:2] != (b, tc + horizon):
        raise ValueError(f"actions must be [B, Tc + horizon] = {(b, tc + horizon)}, got {tuple(actions.shape)}")
    frame_shape = (b, 1, *context.shape[2:])
    eps = _randn(context.shape, generator, context)
    ctx, ctx_idx, ctx_lvl = C.corrupt_context(context.float(), tau_ctx, eps, k_max=model.k_max)

    cache, pending, last = None, None, None
    if cached:
        cache = []
        if tc > 0:
            acts = None if actions is None else actions[:, :tc]
            _, cache = model.forward_cached(ctx, ctx_idx, ctx_lvl, acts)
            last = (ctx[:, -1:], ctx_idx[:, -1:])
    frames = []
    for h in range(horizon):
        pos = tc + h
        noise = _randn(frame_shape, generator, context)
        if cached:
            act = None if actions is None else actions[:, pos : pos + 1]
            new, cache, last = _sample(model, noise, steps, act, None, None, None, cache, pending, last)
        else:
            act = None if actions is None else actions[:, : pos + 1]
            new = sample_frame(
                model, noise, steps, context=ctx, context_tau_index=ctx_idx, context_level=ctx_lvl, actions=act
            )
        frames.append(new)
        if h == horizon - 1:
            break
        noisy, idx1, lvl1 = C.corrupt_context(new, tau_ctx, _randn(frame_shape, generator, context), k_max=model.k_max)
        if cached:
            pending = (noisy, idx1, lvl1, None if actions is None else actions[:, pos : pos + 1])
        else:
            ctx = torch.cat([ctx, noisy], dim=1)
            ctx_idx, ctx_lvl = torch.cat([ctx_idx, idx1], dim=1), torch.cat([ctx_lvl, lvl1], dim=1)
    return torch.cat(frames, dim=1)
