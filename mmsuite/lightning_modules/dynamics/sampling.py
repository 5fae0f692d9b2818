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

``clean_prior`` (for a model trained with it): the model's ``prior: previous`` reads each context frame's clean
latents (the given context, a generated frame before its context noise) instead of the noisy input.
"""

from __future__ import annotations

import torch

from mmsuite.lightning_modules.dynamics import conventions as C
from mmsuite.lightning_modules.dynamics.model import DynamicsTransformer, extend_cache

VELOCITY_MODES = ("all", "observed")  # rollout(velocity=...): the model's velocity term on every frame / the first


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
    context_prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    velocity: bool = True,
) -> torch.Tensor:
    """One new frame ``[B, 1, C, H, W]`` from ``noise`` (τ = 1) in ``steps`` Euler steps, re-running the context
    ``[B, Tc, ...]`` (already corrupted, with its τ indices and levels ``[B, Tc]``) at every step; ``actions``
    ``[B, Tc + 1]`` or None; ``context_prior`` = ``(prior_z, prior_index)`` of the context frames, what the
    model's prior reads of them (default: the corrupted context itself); ``velocity=False``: without the model's
    ``velocity`` term."""
    args = (model, noise, steps, actions, context, context_tau_index, context_level)
    return _sample(*args, cache=None, context_prior=context_prior, velocity=velocity)[0]


def _prior_kwargs(reads, z, tau_idx) -> dict:
    """The model's ``prior_z`` / ``prior_index`` for earlier frames ``reads`` = ``(prior_z, prior_index)``
    followed by the frame being denoised (as it is); nothing when ``reads`` is None (the prior reads the input)."""
    if reads is None:
        return {}
    return {"prior_z": torch.cat([reads[0], z], dim=1), "prior_index": torch.cat([reads[1], tau_idx], dim=1)}


def _keep_last(last, new, n: int = 2):
    """``(prior_z, prior_index)`` of the last ``n`` cached frames after committing ``new`` (what ``prev`` needs:
    the frame before, and for a ``velocity`` model the one before that)."""
    if last is None:
        return new
    return torch.cat([last[0], new[0]], dim=1)[:, -n:], torch.cat([last[1], new[1]], dim=1)[:, -n:]


def _sample(
    model,
    noise,
    steps,
    actions,
    context,
    context_tau_index,
    context_level,
    cache,
    pending=None,
    last=None,
    context_prior=None,
    velocity=True,
):
    """The Euler loop of both paths. Cached (``cache`` a list, possibly empty): only the new frame runs, after
    the cached ones; ``pending`` = ``(z, tau_index, level, actions, (prior_z, prior_index))`` of a finished frame
    not yet in the cache is run together with the first step and committed from it; ``last`` = ``(prior_z,
    prior_index)`` of the last two cached frames (what the model's ``prior`` reads of them). Uncached, ``context_prior``
    is what the prior reads of the context frames (None: the context as given). Returns ``(frame, cache, last)``."""
    indices, level = C.sampling_schedule(steps, model.k_max)
    vkw = {} if velocity else {"velocity": False}  # only said when off: any x-prediction model can be sampled
    b = noise.shape[0]
    lvl = torch.full((b, 1), level, dtype=torch.long, device=noise.device)
    d = C.step_size(lvl, model.k_max).to(noise.device)
    z = noise.float()
    for index in indices.tolist():
        tau_idx = torch.full((b, 1), index, dtype=torch.long, device=noise.device)
        if cache is not None and pending is not None:  # commit the last frame in the same pass
            pz, pidx, plvl, pact, reads = pending
            acts = None if actions is None else torch.cat([pact, actions], dim=1)
            out, kv = model.forward_cached(
                torch.cat([pz, z], dim=1),
                torch.cat([pidx, tau_idx], dim=1),
                torch.cat([plvl, lvl], dim=1),
                acts,
                cache,
                last,
                **_prior_kwargs(reads, z, tau_idx),
                **vkw,
            )
            x_hat = out[:, -1:]
            cache, pending = extend_cache(cache, [(k[:, :, :1], v[:, :, :1]) for k, v in kv]), None
            last = _keep_last(last, (pz, pidx) if reads is None else reads)
        elif cache is not None:
            x_hat, _ = model.forward_cached(z, tau_idx, lvl, actions, cache, last, **vkw)
        elif context is None or context.shape[1] == 0:
            x_hat = model(z, tau_idx, lvl, actions, **vkw)
        else:
            x_hat = model(
                torch.cat([context, z], dim=1),
                torch.cat([context_tau_index, tau_idx], dim=1),
                torch.cat([context_level, lvl], dim=1),
                actions,
                **_prior_kwargs(context_prior, z, tau_idx),
                **vkw,
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
    clean_prior: bool = False,
    velocity: str = "all",
) -> torch.Tensor:
    """Predict ``horizon`` frames after clean context latents ``[B, Tc, C, H, W]`` (``Tc`` may be 0: start frames).

    ``actions`` ``[B, Tc + horizon]`` (or None). Returns the predicted clean latents ``[B, horizon, C, H, W]``;
    each is fed back as context at ``τ_ctx`` with its own fixed noise. Cached, a generated frame is committed to
    the cache in the first denoising pass of the next one (a two-frame pass), so K-step sampling costs K passes a
    frame. ``clean_prior``: the model's prior reads the context frames' clean latents (see the module docstring).
    ``velocity`` (a model with ``velocity``): ``all`` uses its velocity term for every frame; ``observed`` only where
    the change it reads is between given frames, i.e. for the first predicted frame after a context of >= 2
    (later frames follow a generated one, whose change from the frame before is the model's own guess).
    """
    if velocity not in VELOCITY_MODES:
        raise ValueError(f"velocity must be one of {list(VELOCITY_MODES)}, got {velocity!r}")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    b, tc = context.shape[:2]
    if actions is not None and actions.shape[:2] != (b, tc + horizon):
        raise ValueError(f"actions must be [B, Tc + horizon] = {(b, tc + horizon)}, got {tuple(actions.shape)}")
    frame_shape = (b, 1, *context.shape[2:])
    eps = _randn(context.shape, generator, context)
    ctx, ctx_idx, ctx_lvl = C.corrupt_context(context.float(), tau_ctx, eps, k_max=model.k_max)

    # clean_prior: the model's prior reads the context frames clean, at τ index 0 (else None: their noisy input)
    reads = (context.float(), torch.zeros_like(ctx_idx)) if clean_prior else None
    cache, pending, last = None, None, None
    if cached:
        cache = []
        if tc > 0:
            acts = None if actions is None else actions[:, :tc]
            kwargs = {} if reads is None else {"prior_z": reads[0], "prior_index": reads[1]}
            _, cache = model.forward_cached(ctx, ctx_idx, ctx_lvl, acts, **kwargs)
            last = (ctx[:, -2:], ctx_idx[:, -2:]) if reads is None else (reads[0][:, -2:], reads[1][:, -2:])
    frames = []
    for h in range(horizon):
        pos = tc + h
        noise = _randn(frame_shape, generator, context)
        use_velocity = velocity == "all" or h == 0
        if cached:
            act = None if actions is None else actions[:, pos : pos + 1]
            new, cache, last = _sample(
                model, noise, steps, act, None, None, None, cache, pending, last, velocity=use_velocity
            )
        else:
            act = None if actions is None else actions[:, : pos + 1]
            new = sample_frame(
                model,
                noise,
                steps,
                context=ctx,
                context_tau_index=ctx_idx,
                context_level=ctx_lvl,
                actions=act,
                context_prior=reads,
                velocity=use_velocity,
            )
        frames.append(new)
        if h == horizon - 1:
            break
        noisy, idx1, lvl1 = C.corrupt_context(new, tau_ctx, _randn(frame_shape, generator, context), k_max=model.k_max)
        new_reads = None if reads is None else (new, torch.zeros_like(idx1))
        if cached:
            pending = (noisy, idx1, lvl1, None if actions is None else actions[:, pos : pos + 1], new_reads)
        else:
            ctx = torch.cat([ctx, noisy], dim=1)
            ctx_idx, ctx_lvl = torch.cat([ctx_idx, idx1], dim=1), torch.cat([ctx_lvl, lvl1], dim=1)
            if reads is not None:
                reads = (torch.cat([reads[0], new], dim=1), torch.cat([reads[1], new_reads[1]], dim=1))
    return torch.cat(frames, dim=1)
