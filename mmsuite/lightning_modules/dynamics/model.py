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

``prior``: what the head's output is added to. ``none``: nothing, so the untrained model predicts ẑ0 = 0.
``previous``: the linear clean estimate of the frame before (:func:`.conventions.linear_clean_estimate` of
``z_{t−1}`` at its τ; zero for the first frame) times a learned weight per pair (τ index of frame ``t − 1``,
τ index of frame ``t``), which starts at 1 where the predecessor is the cleaner frame and at 0 elsewhere: the
untrained model copies a cleaner last frame, and training learns what changes. (An unweighted estimate is
worse: a noisy predecessor's noise then has to be cancelled by the network.) Consecutive latents of slow video
are close (the copy-last baseline), and a small model trained from ``none`` spends its budget relearning the
copy. Both measured in experiments/dynamics/README.md.
The cached path needs the frame before the new ones for this (``prev`` of :meth:`forward_cached`).
What the prior reads of each frame is ``(z, tau_index)`` unless the caller passes ``prior_z`` / ``prior_index``:
with ``clean_prior`` (module and rollout) a context frame's clean latents at index 0 (the frame the context noise
was added to), so the base does not carry the context noise (:func:`.conventions.clean_prior_source`).
``copy_mask``: the head's output is multiplied by a sigmoid mask the network predicts per latent position, so a
position that does not change can take the base exactly; ``fixed_clean_gate_from``: the weight of a clean
predecessor is 1, not learned, for frames noisier than a given τ index (the learned weights are not weight-decayed:
the module keeps ``prior_gate`` out of AdamW's decay).
``velocity``: where the two frames before are both clean as the prior reads them (τ index 0: with ``clean_prior``,
context frames), the output also gets ``a ⊙ (z_{t−1} − z_{t−2})`` with coefficients ``a`` the network predicts per
latent number (starting at ``velocity_init``; at 0 an untrained model is unchanged). Slow, smooth motion (an idle
figure, the camera pan) continues from one frame to the next, and a learned multiple of the last change says so
exactly; a head that had to recompute that change from noisy inputs could not. The cached path then needs the last
two cached frames.
``input_skip``: the output also gets ``w·(z_τ − (1 − τ)·g)``, the frame's own noisy input beyond the guess ``g``
(the prior's base and velocity term; 0 without a prior), at the fixed Gaussian posterior weight ``w`` for a change of
variance ``input_skip_var`` (:func:`.conventions.input_skip_weight`; one variance for every frame, also those with
no real guess: the first frame, T=1 rows, a noisy predecessor): near the clean end the output is then the input
itself; at τ ≥ 1/4 the term is small. Without it the head has to rebuild a nearly clean input from the residual
stream, and does so badly (a frame at τ 1/64 after a clean context came out 100× worse than its input), which is
what a 64-step sampler's last steps ask of it. The weights are not learned: a learned weight per τ index drifted up
to 0.7 at τ = 1/2 and 0.2 at τ = 1 and broke the rollout (experiments/dynamics/README.md).
``input_skip_scale``: the head's output is also multiplied by the posterior's spread over the guess's
(:func:`.conventions.input_skip_head_scale`, EDM's output scaling): 0 at τ = 0, about 1 from τ = 1/4 at small
variances. The skip alone left the head's own error in place near the clean end (on one seed of two the head worked
against the skip there); scaled, a zero head is the Gaussian posterior mean, and the head's error fades out where only
a many-step sampler goes. Off: with it the 64-step rollout gains 1.3–2.4 dB but the 4-step one loses 0.2–0.4 dB
(experiments/dynamics/README.md).
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

PRIORS = ("none", "previous")


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
    prior: ``none`` (ẑ0 = head output) or ``previous`` (ẑ0 = head output + the clean estimate of frame t − 1).
    fixed_clean_gate_from: None (every weight of the prior is learned) or a τ index ``i`` ≥ 1: a clean predecessor
        (τ index 0) enters a frame whose τ index is ≥ ``i`` at weight 1, not learned (the head learns only what
        changes); below ``i`` the weight stays learned.
    copy_mask: with ``prior: previous``, the head's output is multiplied by a per-position sigmoid mask that the
        network predicts (one value per latent position, shared by its channels), so a position that does not
        change can take the prior exactly (mask → 0) instead of through a head output that must cancel to 0.
    velocity: with ``prior: previous``, add predicted coefficients times the change between the two frames
        before, where both are clean (τ index 0 as the prior reads them); the coefficients start at
        ``velocity_init`` (0: the untrained model is unchanged; 0.5: it starts as half the last change).
    velocity_learned: False keeps the coefficients at ``velocity_init`` (the velocity head's parameters are
        frozen; the net learns only what the rule ``velocity_init`` times the last change leaves).
    input_skip: add the posterior weight times the frame's noisy input beyond the guess (the prior's base and
        velocity term), for a change of variance ``input_skip_var`` per latent number from the guess; 1 at
        τ = 0, 0 at τ = 1. No parameters.
    input_skip_scale: with ``input_skip``, the head's output is also multiplied by
        :func:`.conventions.input_skip_head_scale` (0 at τ = 0, about 1 from τ = 1/4 at small variances): the
        head predicts the frame beyond the skip's posterior mean in units of the posterior's spread, so its
        error fades out near the clean end (EDM's output scaling). No parameters.
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
    prior: str = setting("previous", choices=list(PRIORS))  # previous: the head adds to the frame before's estimate
    fixed_clean_gate_from: int | None = setting(None, ge=1)
    copy_mask: bool = False
    velocity: bool = False
    velocity_init: float = 0.0
    velocity_learned: bool = True
    input_skip: bool = False
    input_skip_var: float = setting(0.01, gt=0.0)
    input_skip_scale: bool = False

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
        prior: str,
        fixed_clean_gate_from: int | None,
        copy_mask: bool,
        velocity: bool,
        velocity_init: float,
        velocity_learned: bool,
        input_skip: bool,
        input_skip_var: float,
        input_skip_scale: bool,
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
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {list(PRIORS)}, got {prior!r}")
        self.k_max = check_k_max(k_max)
        if fixed_clean_gate_from is not None and not 1 <= int(fixed_clean_gate_from) <= self.k_max:
            raise ValueError(
                f"fixed_clean_gate_from must be null or a τ index in [1, {self.k_max}], got {fixed_clean_gate_from}"
            )
        self.fixed_clean_gate_from = None if fixed_clean_gate_from is None else int(fixed_clean_gate_from)
        if copy_mask and prior != "previous":
            raise ValueError("copy_mask needs prior='previous' (the mask chooses between the prior and the head)")
        if velocity and prior != "previous":
            raise ValueError("velocity needs prior='previous' (it extends the copy of the frame before)")
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
        # prior: previous — a learned weight of the predecessor's estimate per (its τ index, this frame's τ index),
        # 1 where the predecessor is the cleaner of the two, 0 elsewhere, to start
        self.prior_gate = None
        if prior == "previous":
            self.prior_gate = nn.Parameter(torch.ones(self.k_max + 1, self.k_max + 1).triu(diagonal=1))
        # copy_mask: logits of the per-position mask (p² per patch slot); starts at 0 (mask 1/2)
        self.mask_head = nn.Linear(dim, patch * patch) if copy_mask else None
        # velocity: a coefficient per latent number on the change between the two clean frames before, from
        # velocity_init
        self.velocity_head = nn.Linear(dim, self.patch_dim) if velocity else None
        if input_skip and not float(input_skip_var) > 0:
            raise ValueError(f"input_skip_var must be > 0, got {input_skip_var}")
        self.input_skip, self.input_skip_var = bool(input_skip), float(input_skip_var)
        if input_skip_scale and not input_skip:
            raise ValueError("input_skip_scale needs input_skip (it scales the head against the skip's posterior)")
        self.input_skip_scale = bool(input_skip_scale)
        self.apply(self._init_weights)
        for extra in (self.mask_head, self.velocity_head):
            if extra is not None:
                nn.init.zeros_(extra.weight)
                nn.init.zeros_(extra.bias)
        if self.velocity_head is not None:
            nn.init.constant_(self.velocity_head.bias, float(velocity_init))
            self.velocity_head.requires_grad_(bool(velocity_learned))  # frozen: the constant velocity_init
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
        prior_z: torch.Tensor | None = None,
        prior_index: torch.Tensor | None = None,
        velocity: bool | torch.Tensor = True,
    ) -> torch.Tensor:
        """Predicted clean latents ``[B, T, C, H, W]``; ``checkpoint`` recomputes block activations in backward
        (for long batches). ``prior_z`` / ``prior_index`` (shapes of ``z`` / ``tau_index``): what ``prior:
        previous`` reads of each frame instead of ``(z, tau_index)``. ``velocity=False`` (or a bool ``[B, T]``, per
        frame: where False) leaves out the ``velocity`` term (a rollout past its first frame, where the change before
        is the model's own)."""
        self._check_inputs(z, tau_index, step_level, actions)
        x = self.frame_tokens(z, tau_index, step_level, actions)
        rope = rope_tables(z.shape[1], self.head_dim, self.rope_base, device=z.device)
        for block in self.blocks:
            if checkpoint and torch.is_grad_enabled():
                x = activation_checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return self._output(x, z, tau_index, None, prior_z, prior_index, velocity)

    def _output(self, x, z, tau_index, prev, prior_z=None, prior_index=None, velocity=True) -> torch.Tensor:
        """Head on the patch slots, plus the prior's guess (:meth:`_guess_terms`; for the first frame from ``prev`` =
        ``(z [B, k, ...], tau_index [B, k])``, the ``k`` frames before, or zero) and, with ``input_skip``, the
        weighted input beyond that guess."""
        feats = self.norm_out(x[:, :, -self.num_patches :])
        out = self.head(feats)
        if self.mask_head is not None:  # [B, T, N, p²] -> the same mask for every channel of a position
            out = out * torch.sigmoid(self.mask_head(feats)).repeat(1, 1, 1, self.latent_channels)
        out = self.unpatchify(out)
        terms = self._guess_terms(feats, z, tau_index, prev, prior_z, prior_index, velocity)
        if not self.input_skip:
            for term in terms:
                out = out + term.to(out.dtype)
            return out
        # the guess plus the frame's own input beyond it at the posterior weight, summed in float32 and rounded once
        guess = sum((term.float() for term in terms), torch.zeros_like(z, dtype=torch.float32))
        w = input_skip_weight(tau_index, self.input_skip_var, self.k_max)[..., None, None, None]
        if self.input_skip_scale:  # the head's share fades out towards the clean end (0 at τ = 0)
            out = out * input_skip_head_scale(tau_index, self.input_skip_var, self.k_max)[..., None, None, None].to(
                out.dtype
            )
        return out + (guess + w * innovation(z, guess, tau_index, self.k_max)).to(out.dtype)

    def _guess_terms(self, feats, z, tau_index, prev, prior_z, prior_index, velocity) -> list[torch.Tensor]:
        """What ``prior: previous`` guesses of each frame, as the terms added to the head's output: the
        predecessor's weighted clean estimate and, with ``velocity``, the predicted coefficients times the change
        between the two frames before (no terms without a prior)."""
        if self.prior_gate is None:  # prior: none
            return []
        if (prior_z is None) != (prior_index is None):
            raise ValueError("prior_z and prior_index go together (what the prior reads of each frame)")
        if prior_z is not None and (prior_z.shape != z.shape or prior_index.shape != tau_index.shape):
            raise ValueError(
                f"prior_z {tuple(prior_z.shape)} / prior_index {tuple(prior_index.shape)} must have the shapes "
                f"of z {tuple(z.shape)} / tau_index {tuple(tau_index.shape)}"
            )
        reads, reads_index = (z, tau_index) if prior_z is None else (prior_z, prior_index)
        # the frames as the prior reads them, after ``prev`` and after clean zero frames (estimate 0, not real) that
        # pad the sequence to the predecessors it needs; the gate's column is the frame's own input τ index
        b, t = tau_index.shape
        prev_z, prev_index = (z[:, :0], tau_index[:, :0]) if prev is None else prev
        pad = max((2 if self.velocity_head is not None else 1) - prev_z.shape[1], 0)
        seq = torch.cat([z.new_zeros(b, pad, *z.shape[2:]), prev_z.to(z.dtype), reads.to(z.dtype)], dim=1)
        seq_index = torch.cat([tau_index.new_zeros(b, pad), prev_index, reads_index], dim=1)
        first = pad + prev_z.shape[1]  # position of frame 0 in seq

        def before(n: int):  # the frames n before each frame, with their τ indices
            return seq[:, first - n : first - n + t], seq_index[:, first - n : first - n + t]

        pred, pred_index = before(1)
        real = torch.arange(t, device=tau_index.device) + first  # positions in seq; the pad comes first
        clean_before = (pred_index == 0) & (real - 1 >= pad)  # a real clean frame before
        base = linear_clean_estimate(pred, pred_index, self.k_max)
        gate = self.prior_gate[pred_index, tau_index]  # [B, T]
        if self.fixed_clean_gate_from is not None:  # a clean predecessor of a noisy enough frame: 1, no gradient
            gate = gate.masked_fill((pred_index == 0) & (tau_index >= self.fixed_clean_gate_from), 1.0)
        terms = [gate[..., None, None, None] * base]
        on_frames = velocity if torch.is_tensor(velocity) else None  # per frame, else for all frames or none
        if on_frames is not None and (on_frames.dtype != torch.bool or on_frames.shape != tau_index.shape):
            raise ValueError(
                f"a per-frame velocity mask must be bool with the shape of tau_index {tuple(tau_index.shape)}, got "
                f"{on_frames.dtype} {tuple(on_frames.shape)}"
            )
        if self.velocity_head is not None and (on_frames is not None or velocity):  # where kept and both frames
            # before are real and clean
            pred2, pred2_index = before(2)
            on = clean_before & (pred2_index == 0) & (real - 2 >= pad)
            if on_frames is not None:
                on = on & on_frames.to(on.device)
            change = (pred - pred2) * on[..., None, None, None].to(pred.dtype)
            coef = self.unpatchify(self.velocity_head(feats))
            terms.append(coef * change.to(coef.dtype))
        return terms

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
        prior_z: torch.Tensor | None = None,
        prior_index: torch.Tensor | None = None,
        velocity: bool | torch.Tensor = True,
    ) -> tuple[torch.Tensor, list]:
        """:meth:`forward` for frames ``z`` ``[B, t, ...]`` that follow the frames already in ``cache``.

        ``cache`` is a list with one ``(keys, values)`` per temporal layer (``None`` or ``[]``: no earlier frames),
        as returned here; the new frames sit at positions ``P .. P + t − 1`` after the ``P`` cached ones. Returns
        ``(ẑ0 of the new frames, their keys/values per temporal layer)``; extend the cache with
        :func:`extend_cache` only once the frames are final (a frame being denoised changes at every step).
        Equal to :meth:`forward` over all ``P + t`` frames, restricted to the new ones (tested). With
        ``prior: previous`` and a non-empty cache, ``prev`` = ``(z [B, 1, ...], tau_index [B, 1])`` of the last
        cached frame as the prior reads it (its ``prior_z`` / ``prior_index`` when those were given, else its input);
        with ``velocity``, the last two cached frames (``[B, 2, ...]``; one is enough when only one is cached).
        """
        self._check_inputs(z, tau_index, step_level, actions)
        temporal = [block for block in self.blocks if block.temporal]
        cache = list(cache or [None] * len(temporal))
        if len(cache) != len(temporal):
            raise ValueError(f"cache has {len(cache)} entries, the model has {len(temporal)} temporal layers")
        start = 0 if cache[0] is None else cache[0][0].shape[2]
        if self.prior_gate is not None and start > 0 and prev is None:
            raise ValueError("prior='previous' with a cache needs prev = (z, tau_index) of the last cached frame")
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
        out = self._output(x, z, tau_index, prev if start > 0 else None, prior_z, prior_index, velocity)
        return out, new


def extend_cache(cache: list | None, new: list) -> list:
    """The cache after committing new frames: each temporal layer's keys/values concatenated over positions."""
    if not cache or cache[0] is None:
        return list(new)
    return [(torch.cat([k, nk], dim=2), torch.cat([v, nv], dim=2)) for (k, v), (nk, nv) in zip(cache, new)]
