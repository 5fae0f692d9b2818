"""Space-time factorised transformer for the dynamics world model (x-prediction over frame latents).

Input: noisy frame latents ``z`` ``[B, T, C, H, W]`` (continuous tokenizer latents), and per frame the two
condition integers from :mod:`.conventions` (``tau_index`` ∈ {0, …, k_max}, ``step_level`` ∈ {0, …, E}) and
optionally a discrete action id (``-1`` = no label). Output: the predicted clean latents ``ẑ0``, same shape.
The model does no arithmetic on τ; it only embeds the indices.

Tokens of one frame (``S = 2 + registers + N`` slots, each with a learned slot embedding)::

    [condition] [action] [register × R] [latent patch × N]      N = (H/p)·(W/p), each patch C·p² numbers

* condition: ``concat(tau_embed(tau_index), step_embed(step_level))``, two separate discrete embeddings of
  half the width each, so the step size stays salient (a model that ignores d deadlocks the bootstrap).
* action: a learned base embedding plus ``action_embed(action)`` for labelled frames; unlabelled video (no
  ``actions``, or id -1) gets the base alone, so the action parameters are always used (DDP-friendly).

Layers: pre-RMSNorm, one attention and one SwiGLU MLP each. Layer ``l`` attends over **time** when
``(l + 1) % temporal_every == 0`` (causal, per token slot, RoPE over the frame index; shape ``[B·S, T, D]``) and
within **its frame** otherwise (all S slots of one frame; shape ``[B·T, S, D]``). Both go through the suite's one
SDPA attention (:class:`mmsuite.nn.transformer.Attention`) with QK-norm and optional grouped-query heads. Frame ``t``
therefore never sees frames after ``t``. The output head (RMSNorm + linear on the patch slots) starts at zero.

Output: ``ẑ0 = scale·head + g + w·(z_τ − (1 − τ)·g)``.

* ``g``, the prior's guess of the frame: the linear clean estimate of the frame before
  (:func:`.conventions.linear_clean_estimate` of ``z_{t−1}`` at its τ; zero for the first frame) times a learned
  weight per pair (τ index of frame ``t − 1``, τ index of frame ``t``) that starts at 1 where the predecessor is the
  cleaner frame and at 0 elsewhere: the untrained model copies a cleaner last frame, and the head learns what
  changes. The cached path needs the frame before the new ones for this (``prev`` of :meth:`forward_cached`). The
  weights are not weight-decayed (the module keeps ``prior_gate`` out of AdamW's decay).
* ``w·(z_τ − (1 − τ)·g)``, the input skip: the frame's own noisy input beyond the guess at the fixed Gaussian
  posterior weight ``w`` for a change of variance ``skip_var`` (:func:`.conventions.input_skip_weight`): 1 at τ = 0,
  so a clean input passes through; small from τ ≈ 1/4 on. ``scale`` (:func:`.conventions.input_skip_head_scale`,
  EDM's output scaling) is the posterior's spread over the guess's: 0 at τ = 0, about 1 from τ = 1/4. A zero head
  is thus the posterior mean, and the head's error fades out near the clean end, where the last steps of a
  many-step sampler run; without the skip the head would have to rebuild a nearly clean input from the residual
  stream. No parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from mmsuite.lightning_modules.dynamics.conventions import (
    DEFAULT_K_MAX,
    check_k_max,
    finest_level,
    innovation,
    input_skip_head_scale,
    input_skip_weight,
    linear_clean_estimate,
    num_levels,
)
from mmsuite.nn import transformer
from mmsuite.nn.transformer import rope_tables, swiglu_hidden
from mmsuite.settings import as_dict, setting


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


class SpaceTimeBlock(transformer.Block):
    """Pre-RMSNorm layer with QK-norm attention and a SwiGLU MLP (:class:`mmsuite.nn.transformer.Block`) whose
    attention runs over space (all slots of one frame) or, for a ``temporal`` layer, over causal time (each slot
    against the same slot in this and earlier frames, RoPE over the frame index)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, mlp_hidden: int, temporal: bool):
        super().__init__(dim, heads, qk_norm=True, kv_heads=kv_heads, norm="rms", mlp="swiglu", mlp_hidden=mlp_hidden)
        self.temporal = temporal

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        """``x [B, T, S, D]``; ``rope``: the frame positions' tables ``[T, head_dim]``."""
        return super().forward(x, rope=rope)

    def mix(self, h: torch.Tensor, rope) -> torch.Tensor:
        b, t, s, d = h.shape
        if self.temporal:  # each token slot attends to the same slot in this and earlier frames
            h = h.transpose(1, 2).reshape(b * s, t, d)
            return self.attn(h, causal=True, rope=rope).view(b, s, t, d).transpose(1, 2)
        return self.attn(h.reshape(b * t, s, d)).view(b, t, s, d)  # all slots of one frame attend to each other

    def forward_cached(self, x: torch.Tensor, rope, past):
        """:meth:`forward` for new frames ``x`` ``[B, t, S, D]`` after cached ones; returns ``(x, kv)`` with this
        layer's new keys/values (``None`` for a space layer, which needs no cache)."""
        if not self.temporal:
            return self.forward(x, rope), None
        b, t, s, d = x.shape
        h = self.norm1(x).transpose(1, 2).reshape(b * s, t, d)
        h, kv = self.attn.forward_cached(h, rope, past)
        x = x + h.view(b, s, t, d).transpose(1, 2)
        return x + self.mlp(self.norm2(x)), kv


@dataclass
class DynamicsNetSettings:
    """:class:`DynamicsTransformer`'s settings (``model.net`` of ``model=dynamics``).

    latent_channels, latent_size: C and (H, W) of one frame's latents; patch: p (H and W divisible by p).
    dim, depth, heads, kv_heads (default heads): transformer width, layers, query and key/value heads.
    temporal_every: every this-many-th layer attends over time, the others within a frame (2 ≤ it ≤ depth).
    mlp_ratio: SwiGLU hidden width is ``mlp_ratio·dim·2/3`` rounded up to a multiple of 64.
    registers: learned register tokens per frame. num_actions: discrete actions (0 = no action labels).
    k_max: the finest step count of :mod:`.conventions` (sizes of the τ and step embeddings).
    rope_base: RoPE frequency base over frame positions.
    skip_var: the variance of a frame's change from the prior's guess that sets the input skip's weight and the
        head's scale (see the module docstring).
    """

    latent_channels: int = setting(8, ge=1)
    latent_size: int = setting(8, ge=1)  # data.image_size / tokenizer.downsample (checked against the data)
    patch: int = setting(2, ge=1)
    dim: int = setting(128, ge=1)
    depth: int = setting(4, ge=1)
    heads: int = setting(4, ge=1)
    kv_heads: int | None = setting(None, ge=1)  # null: = heads
    temporal_every: int = setting(2, ge=2)  # every this-many-th layer attends over time (causal, RoPE over frames)
    mlp_ratio: float = setting(4.0, gt=0.0)
    registers: int = setting(2, ge=0)
    num_actions: int = setting(7, ge=0)  # toy-world actions; unlabelled video rows use the learned base alone
    k_max: int = setting(DEFAULT_K_MAX, ge=1)  # finest step d_min = 1/k_max; step sizes are the powers of two up to 1
    rope_base: float = setting(10_000.0, gt=0.0)
    skip_var: float = setting(0.003, gt=0.0)

    def build(self) -> DynamicsTransformer:
        return DynamicsTransformer(**as_dict(self))


class DynamicsTransformer(nn.Module):
    """x-prediction network ``ẑ0 = f(z_τ, tau_index, step_level, actions)`` over latents ``[B, T, C, H, W]``; the
    keyword arguments are the fields of :class:`DynamicsNetSettings` (``DynamicsNetSettings(...).build()`` fills in
    the defaults).
    """

    def __init__(
        self,
        *,
        latent_channels: int,
        latent_size: int | tuple[int, int],
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        kv_heads: int | None,
        temporal_every: int,
        mlp_ratio: float,
        registers: int,
        num_actions: int,
        k_max: int,
        rope_base: float,
        skip_var: float,
    ):
        super().__init__()
        kv_heads = heads if kv_heads is None else int(kv_heads)
        h, w = _pair(latent_size)
        if latent_channels < 1 or h < 1 or w < 1:
            raise ValueError(f"latent_channels and latent_size must be positive, got {latent_channels}, {(h, w)}")
        if patch < 1 or h % patch or w % patch:
            raise ValueError(f"patch {patch} must be positive and divide latent_size {(h, w)}")
        if heads < 1 or dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim {dim} must be divisible by heads {heads} into an even head dim (for RoPE)")
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads {kv_heads} must divide heads {heads}")
        if temporal_every < 2 or depth < temporal_every:
            raise ValueError(
                f"temporal_every {temporal_every} must be in [2, depth={depth}]: 1 leaves no layer attending within a "
                "frame, more than depth none over time"
            )
        if not float(skip_var) > 0:
            raise ValueError(f"skip_var must be > 0, got {skip_var}")
        self.skip_var = float(skip_var)
        self.k_max = check_k_max(k_max)
        if registers < 0 or num_actions < 0:
            raise ValueError(f"registers and num_actions must be >= 0, got {registers}, {num_actions}")
        self.latent_channels, self.latent_size, self.patch = int(latent_channels), (h, w), int(patch)
        self.grid = (h // patch, w // patch)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_dim = self.latent_channels * patch * patch
        self.num_actions, self.registers, self.rope_base = int(num_actions), int(registers), float(rope_base)
        self.slots = 2 + self.registers + self.num_patches
        self.head_dim = dim // heads

        self.patch_in = nn.Linear(self.patch_dim, dim)
        self.slot_embed = nn.Parameter(torch.zeros(self.slots, dim))
        self.register_tokens = nn.Parameter(torch.zeros(self.registers, dim))
        self.tau_embed = nn.Embedding(self.k_max + 1, dim // 2)
        self.step_embed = nn.Embedding(num_levels(self.k_max), dim - dim // 2)
        self.action_base = nn.Parameter(torch.zeros(dim))
        self.action_embed = nn.Embedding(self.num_actions, dim) if self.num_actions else None
        hidden = swiglu_hidden(dim, mlp_ratio)
        self.blocks = nn.ModuleList(
            SpaceTimeBlock(dim, heads, kv_heads, hidden, temporal=(i + 1) % temporal_every == 0) for i in range(depth)
        )
        self.norm_out = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, self.patch_dim)
        # the prior's learned weight of the predecessor's estimate per (its τ index, this frame's τ index), 1 where
        # the predecessor is the cleaner of the two, 0 elsewhere, to start
        self.prior_gate = nn.Parameter(torch.ones(self.k_max + 1, self.k_max + 1).triu(diagonal=1))
        self.apply(self._init_weights)
        for p in (self.slot_embed, self.register_tokens, self.action_base):
            nn.init.normal_(p, std=0.02)
        nn.init.zeros_(self.head.weight)  # zero-initialised output: ẑ0 = 0 at the start
        nn.init.zeros_(self.head.bias)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # --- latents <-> patch tokens -------------------------------------------------------------------------

    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, T, C, H, W]`` -> ``[B, T, N, C·p²]``."""
        b, t, c, _, _ = z.shape
        (gh, gw), p = self.grid, self.patch
        z = z.reshape(b, t, c, gh, p, gw, p).permute(0, 1, 3, 5, 2, 4, 6)
        return z.reshape(b, t, gh * gw, c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, N, C·p²]`` -> ``[B, T, C, H, W]``."""
        b, t = x.shape[:2]
        (gh, gw), p, c = self.grid, self.patch, self.latent_channels
        x = x.reshape(b, t, gh, gw, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, t, c, gh * p, gw * p)

    # --- forward -------------------------------------------------------------------------------------------

    def _check_inputs(self, z, tau_index, step_level, actions) -> None:
        if z.ndim != 5 or tuple(z.shape[2:]) != (self.latent_channels, *self.latent_size):
            raise ValueError(
                f"z must be [B, T, {self.latent_channels}, {self.latent_size[0]}, {self.latent_size[1]}], "
                f"got shape {tuple(z.shape)}"
            )
        frames = tuple(z.shape[:2])
        checks = [("tau_index", tau_index, 0, self.k_max), ("step_level", step_level, 0, finest_level(self.k_max))]
        if actions is not None:
            if self.action_embed is None:
                raise ValueError("actions given, but this model has num_actions=0 (no action conditioning)")
            checks.append(("actions", actions, -1, self.num_actions - 1))
        for name, x, low, high in checks:
            if tuple(x.shape) != frames or x.is_floating_point() or x.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor of shape {frames}, got {x.dtype} {tuple(x.shape)}")
            if x.numel() and (int(x.min()) < low or int(x.max()) > high):
                raise ValueError(f"{name} must lie in [{low}, {high}], got {int(x.min())} to {int(x.max())}")

    def frame_tokens(self, z, tau_index, step_level, actions=None) -> torch.Tensor:
        """The token grid ``[B, T, S, D]``: condition, action, registers, latent patches, plus slot embeddings."""
        b, t = z.shape[:2]
        cond = torch.cat([self.tau_embed(tau_index), self.step_embed(step_level)], dim=-1)
        action = self.action_base.expand(b, t, -1)
        if actions is None and self.action_embed is not None:  # unlabelled: base only, action table still in graph
            actions = torch.full((b, t), -1, dtype=torch.long, device=z.device)
        if actions is not None:
            labelled = actions >= 0
            action = action + self.action_embed(actions.clamp(min=0)) * labelled[..., None].to(action.dtype)
        regs = self.register_tokens.expand(b, t, -1, -1)
        patches = self.patch_in(self.patchify(z).to(self.patch_in.weight.dtype))
        x = torch.cat([cond[:, :, None], action[:, :, None], regs, patches], dim=2)
        return x + self.slot_embed

    def forward(
        self,
        z: torch.Tensor,
        tau_index: torch.Tensor,
        step_level: torch.Tensor,
        actions: torch.Tensor | None = None,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """Predicted clean latents ``[B, T, C, H, W]``; ``checkpoint`` recomputes block activations in backward
        (for long batches)."""
        self._check_inputs(z, tau_index, step_level, actions)
        x = self.frame_tokens(z, tau_index, step_level, actions)
        rope = rope_tables(z.shape[1], self.head_dim, self.rope_base, device=z.device)
        for block in self.blocks:
            if checkpoint and torch.is_grad_enabled():
                x = activation_checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return self._output(x, z, tau_index, None)

    def _output(self, x, z, tau_index, prev) -> torch.Tensor:
        """``scale·head + g + w·(z − (1 − τ)·g)`` (the module docstring), with the prior's guess ``g`` from
        :meth:`_guess` (for the first frame from ``prev`` = ``(z [B, k, ...], tau_index [B, k])``, the frames
        before, or zero)."""
        out = self.unpatchify(self.head(self.norm_out(x[:, :, -self.num_patches :])))
        guess = self._guess(z, tau_index, prev).float()  # the guess and skip in float32, rounded once
        w = input_skip_weight(tau_index, self.skip_var, self.k_max)[..., None, None, None]
        scale = input_skip_head_scale(tau_index, self.skip_var, self.k_max)[..., None, None, None]
        return out * scale.to(out.dtype) + (guess + w * innovation(z, guess, tau_index, self.k_max)).to(out.dtype)

    def _guess(self, z, tau_index, prev) -> torch.Tensor:
        """The prior's guess of each frame: the frame before's clean estimate at the learned weight of the pair
        (its τ index, this frame's τ index); the first frame's predecessor is the last of ``prev``, or none (0)."""
        b, t = tau_index.shape
        prev_z, prev_index = (z[:, :0], tau_index[:, :0]) if prev is None else prev
        pad = max(1 - prev_z.shape[1], 0)  # a clean zero frame (estimate 0) where there is no frame before
        pred = torch.cat([z.new_zeros(b, pad, *z.shape[2:]), prev_z.to(z.dtype), z[:, :-1]], dim=1)
        pred_index = torch.cat([tau_index.new_zeros(b, pad), prev_index, tau_index[:, :-1]], dim=1)
        first = pred.shape[1] - t  # the frame before frame 0
        pred, pred_index = pred[:, first:], pred_index[:, first:]
        gate = self.prior_gate[pred_index, tau_index]  # [B, T]
        return gate[..., None, None, None] * linear_clean_estimate(pred, pred_index, self.k_max)

    # --- incremental (cached) forward for rollouts ----------------------------------------------------------

    @torch.no_grad()
    def forward_cached(
        self,
        z: torch.Tensor,
        tau_index: torch.Tensor,
        step_level: torch.Tensor,
        actions: torch.Tensor | None = None,
        cache: list | None = None,
        prev: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list]:
        """:meth:`forward` for frames ``z`` ``[B, t, ...]`` that follow the frames already in ``cache``.

        ``cache`` is a list with one ``(keys, values)`` per temporal layer (``None`` or ``[]``: no earlier frames),
        as returned here; the new frames sit at positions ``P .. P + t − 1`` after the ``P`` cached ones. Returns
        ``(ẑ0 of the new frames, their keys/values per temporal layer)``; extend the cache with
        :func:`extend_cache` only once the frames are final (a frame being denoised changes at every step).
        Equal to :meth:`forward` over all ``P + t`` frames, restricted to the new ones (tested). With a non-empty
        cache, ``prev`` = ``(z [B, 1, ...], tau_index [B, 1])``: the last cached frame's input, which the prior reads.
        """
        self._check_inputs(z, tau_index, step_level, actions)
        temporal = [block for block in self.blocks if block.temporal]
        cache = list(cache or [None] * len(temporal))
        if len(cache) != len(temporal):
            raise ValueError(f"cache has {len(cache)} entries, the model has {len(temporal)} temporal layers")
        start = 0 if cache[0] is None else cache[0][0].shape[2]
        if start > 0 and prev is None:
            raise ValueError("a cache needs prev = (z, tau_index) of the last cached frame (the prior reads it)")
        t = z.shape[1]
        cos, sin = rope_tables(start + t, self.head_dim, self.rope_base, device=z.device)
        rope = (cos[start:], sin[start:])
        x = self.frame_tokens(z, tau_index, step_level, actions)
        new, i = [], 0
        for block in self.blocks:
            x, kv = block.forward_cached(x, rope, cache[i] if block.temporal else None)
            if block.temporal:
                new.append(kv)
                i += 1
        out = self._output(x, z, tau_index, prev if start > 0 else None)
        return out, new


def extend_cache(cache: list | None, new: list) -> list:
    """The cache after committing new frames: each temporal layer's keys/values concatenated over positions."""
    if not cache or cache[0] is None:
        return list(new)
    return [(torch.cat([k, nk], dim=2), torch.cat([v, nv], dim=2)) for (k, v), (nk, nv) in zip(cache, new)]
