"""LightningModule of the dynamics world model: diffusion forcing + shortcut forcing over frame latents.

Training (one forward for every row, teacher passes only on bootstrap rows; all τ arithmetic in
:mod:`.conventions`):

* Every frame gets its own step level and τ (diffusion forcing). **Flow rows** use the finest level
  ``d_min = 1/k_max`` and τ uniform on its grid; their loss is the ramp-weighted x-space MSE ``w(τ)·‖ẑ0 − z0‖²``.
* **Bootstrap rows** (``shortcut.fraction`` of the rows, after ``shortcut.start_step`` warm-up steps; the row
  count is rounded stochastically so small batches still get them on average) draw a level per frame uniformly
  over the levels that can bootstrap (d uniform over the powers of two, not ``P(d) ∝ 1/d``) and τ on that level's
  grid. The same network under ``no_grad`` takes two half steps (the teacher); the student regresses in one step
  onto the x-space target ``x*`` (equal to the paper's τ²-scaled velocity loss), ramp-weighted, plus a small flow
  anchor ``shortcut.anchor·w(τ)·‖ẑ0 − z0‖²`` on the same frames.
* Rows flagged ``single`` by the data (T=1 rows) are run as independent one-frame sequences.
* ``noise.pattern=rising`` replaces the τ of ``noise.pattern_fraction`` of the flow rows by the log's "context at
  τ_ctx, targets rising to 1" pattern (for comparison; the default ``iid`` is the paper's). ``prefix`` instead
  sets a random-length prefix of those rows to τ_ctx and leaves the later frames' iid τ alone (the rollout's
  situation, without coupling a target's τ to its position). ``interleave`` sets every other frame (random phase)
  to τ_ctx, so half the frames of the row are targets whose predecessor is clean-ish, as at a rollout's first step;
  ``noise.pattern_period`` = p > 2 keeps one target every p frames and holds the p − 1 between (targets with two
  clean predecessors, what ``net.velocity`` reads). ``noise.prefix_share``: that share of the interleave rows takes a
  random-length prefix instead. Interleave never holds more than p − 1 frames in a row, but a rollout's context is
  a run of held frames; after such a run a nearly clean frame came out 4–6× worse than after an interleaved context
  (experiments/dynamics/README.md; off: it costs the 4-step rollout 0.2–0.4 dB).
* ``noise.clean_prior``: the model's ``prior: previous`` reads a context frame's (τ ≤ τ_ctx) clean latents instead
  of its noisy input, in training and (``rollout.clean_prior``) in the rollout, so the copied base carries no
  context noise.
* ``noise.velocity_drop``: that share of the frames is trained without ``net.velocity``'s term (a per-frame mask,
  the teacher keeps it), so the model also learns a clean predecessor without it, which is what the rollout's
  later frames see under ``rollout.velocity: observed``.
* ``noise.own_context`` (self-forcing): that share of the sequence rows (after ``noise.own_context_start`` steps)
  first predicts one frame every ``pattern_period`` frames from the frames before it (``own_context_steps`` Euler
  steps, no grad, all of a row's predictions at once, so a later one sees the earlier ones half-denoised), then
  trains the frame after each prediction with the prediction as its predecessor (held at τ_ctx, read by the prior
  as given, and under ``rollout.velocity: observed`` without the velocity term), as a rollout's second step sees it.
  The predicted frames carry no loss; the real held frames keep theirs.
* ``loss.decoded`` (off): the flow rows' error also in decoded pixels, through the frozen frame decoder, on
  ``loss.decoded_frames`` random frames a batch (``loss.decoded_floor``: per-frame ``f·log(1 + mse/f)``), as the
  rollout is scored; measured no better than the latent loss alone (experiments/dynamics/README.md).
* Long batches (``T >= activation_checkpointing.min_frames``) recompute block activations in backward.

Logged: ``train/loss``, ``train/flow_loss``, ``train/boot_loss``, ``train/anchor_loss``, ``train/decoded_loss``,
``train/boot_rows``, ``train/seq_len`` and a console line ``S T=..`` / ``L T=..`` every ``log_every_n_steps``.

Validation: ``val/loss`` (flow loss at d_min with fixed noise), one-step denoising PSNR per step size
(``val/denoise/psnr_k{1/d}`` at τ ≈ 0.5), and on the first ``rollout.batches`` batches an autoregressive rollout
(``rollout.context`` frames → ``rollout.horizon`` predicted, for every sampler in ``rollout.steps``, at
``rollout.tau_ctx``) scored on decoded frames per horizon against the copy-last-frame baseline, with wall-clock
frames/s; GIFs of ground truth | samplers | copy-last go to the loggers. Pixel metrics compare against the decoded
ground-truth latents (what a perfect dynamics model would give through this decoder). With ``ema.decay`` > 0
all of validation/test runs on an EMA copy of the weights (``net_ema``, updated once per optimizer step, saved in
the checkpoint); training and the bootstrap teacher use the online network.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.wrappers import MultioutputWrapper

from mmsuite.lightning_modules.dynamics import conventions as C
from mmsuite.lightning_modules.dynamics.model import DynamicsNetSettings, DynamicsTransformer
from mmsuite.lightning_modules.dynamics.sampling import VELOCITY_MODES, rollout
from mmsuite.nn.metrics import psnr
from mmsuite.nn.schedule import AdamWSettings, StepSchedule, adamw_warmup_cosine
from mmsuite.settings import as_dict, fail, parse, setting

PATTERNS = ("iid", "rising", "prefix", "interleave")


@dataclass
class ShortcutSettings:
    """Shortcut forcing (experiment=dynamics_shortcut); fraction 0: diffusion forcing only."""

    fraction: float = setting(0.0, ge=0.0, le=1.0)  # share of rows trained by bootstrap (teacher under no_grad)
    start_step: int = setting(0, ge=0)  # warm-up: plain flow rows only before this step
    anchor: float = setting(0.1, ge=0.0)  # flow-loss anchor on bootstrap frames (against the self-consistent deadlock)


@dataclass
class NoiseSettings:
    """Which τ each frame of a flow row gets (see the module docstring)."""

    # iid (paper: per-frame tau on its grid) | rising (the log's ctx 0.1 -> targets to 1) | prefix (a random prefix at
    # tau_ctx, later frames iid) | interleave (every other frame at tau_ctx, random phase; the rest iid)
    pattern: str = setting("iid", choices=list(PATTERNS))
    pattern_fraction: float = setting(1.0, ge=0.0, le=1.0)  # rising / prefix / interleave: share of flow rows
    pattern_context: int = setting(16, ge=0)  # rising: frames held at tau_ctx
    pattern_period: int = setting(2, ge=2)  # interleave: one target every this many frames, the rest at tau_ctx
    prefix_share: float = setting(0.0, ge=0.0, le=1.0)  # interleave: this share of rows holds a prefix instead
    tau_ctx: float = setting(0.1, ge=0.0, le=1.0)
    clean_prior: bool = False  # net.prior reads frames at tau <= tau_ctx clean (the rollout: the clean context)
    velocity_drop: float = setting(0.0, ge=0.0, lt=1.0)  # share of frames trained without net.velocity's term
    # self-forcing: share of sequence rows trained after the model's own prediction of the frame before (one every
    # pattern_period frames, own_context_steps no-grad Euler steps)
    own_context: float = setting(0.0, ge=0.0, le=1.0)
    own_context_steps: int = setting(4, ge=1)
    own_context_start: int = setting(0, ge=0)  # no self-forcing rows before this step

    def check(self, key: str) -> None:
        if self.prefix_share and self.pattern != "interleave":
            fail(
                f"{key}.prefix_share", "needs noise.pattern=interleave (it turns some interleave rows into prefix rows)"
            )


@dataclass
class RolloutSettings:
    """The autoregressive rollout of validation (eval.py rollout.context=.. rollout.steps=[..] override these)."""

    context: int = setting(16, ge=1)
    horizon: int = setting(16, ge=1)
    steps: list[int] = setting([4, 64], ge=1)  # samplers compared: 4-step shortcut vs 64-step Euler (powers of two)
    tau_ctx: float = setting(0.1, ge=0.0, le=1.0)  # snapped onto the 1/k_max grid (0.1 -> 6/64)
    batches: int = setting(2, ge=0)  # validation batches rolled out
    cached: bool = True  # keys/values of committed frames are kept (equal to the uncached path; tested)
    during_fit: str = setting("final", choices=["final", "every", "never"])  # final: the last validation of train.py
    gifs: int = setting(4, ge=0)
    seed: int = setting(0, ge=0)
    clean_prior: bool = False  # must match training (noise.clean_prior)
    # net.velocity: all (every frame) | observed (only the first predicted frame, whose change before is given)
    velocity: str = setting("all", choices=list(VELOCITY_MODES))


@dataclass
class DynamicsLossSettings:
    motion_floor: float | None = setting(None, gt=0.0)  # frames weigh 1/(change + floor), mean 1 (null: off)
    decoded: float = setting(0.0, ge=0.0)  # + this x the flow frames' pixel MSE through the frozen decoder
    decoded_frames: int = setting(16, ge=1)  # ... on this many random frames a batch, scaled to all of them
    decoded_floor: float | None = setting(None, gt=0.0)  # f: a frame adds f*log(1 + mse/f), not its mse


@dataclass
class ProbeSettings:
    batches: int = setting(1, ge=0)  # validation batches for the one-step denoising PSNR per step size


@dataclass
class EMASettings:
    # > 0: validation, the probes and the rollout use an EMA of the weights (dynamics.md e.7); the bootstrap teacher
    # stays the online network
    decay: float = setting(0.0, ge=0.0, lt=1.0)


@dataclass
class CheckpointingSettings:
    min_frames: int | None = setting(None, ge=1)  # recompute activations in backward for batches this long or longer


@dataclass
class DynamicsSettings:
    """``model`` of ``model=dynamics`` (conf/model/dynamics.yaml states only what differs)."""

    net: DynamicsNetSettings = setting(DynamicsNetSettings())
    optim: AdamWSettings = setting(AdamWSettings(lr=0.001, betas=[0.9, 0.95], weight_decay=0.01))
    schedule: Any = setting({}, schema=StepSchedule)  # = the schedule group (${schedule})
    shortcut: ShortcutSettings = setting(ShortcutSettings())
    noise: NoiseSettings = setting(NoiseSettings())
    decoder: Any = setting({})  # = data.encoder: the frozen frame decoder for pixel metrics and GIFs (not saved)
    image_size: int = setting(64, ge=1)  # = data.image_size
    rollout: RolloutSettings = setting(RolloutSettings())
    probe: ProbeSettings = setting(ProbeSettings())
    activation_checkpointing: CheckpointingSettings = setting(CheckpointingSettings())
    ema: EMASettings = setting(EMASettings())
    loss: DynamicsLossSettings = setting(DynamicsLossSettings())

    def check(self, key: str) -> None:
        if self.shortcut.fraction > 0 and self.net.k_max < 2:
            fail(f"{key}.shortcut.fraction", "> 0 needs net.k_max >= 2")
        if self.noise.velocity_drop and not self.net.velocity:
            fail(f"{key}.noise.velocity_drop", "needs model.net.velocity=true (there is no velocity term to drop)")
        if self.net.velocity and not self.noise.clean_prior:
            fail(
                f"{key}.net.velocity",
                "needs model.noise.clean_prior=true (it acts only where the prior reads two clean frames before, "
                "which only clean_prior gives)",
            )
        own = [self.noise.own_context_steps] if self.noise.own_context else []
        for what, steps in (("noise.own_context_steps", own), ("rollout.steps", self.rollout.steps)):
            for n in steps:
                try:
                    C.sampling_schedule(n, self.net.k_max)  # a power of two <= k_max
                except ValueError as e:
                    fail(f"{key}.{what}", str(e))
        try:
            C.snap_context_tau(self.rollout.tau_ctx, self.net.k_max)
        except ValueError as e:
            fail(f"{key}.rollout.tau_ctx", str(e))


class DynamicsModule(L.LightningModule):
    Settings = DynamicsSettings

    def __init__(self, **settings):
        super().__init__()
        s = self.settings = parse(DynamicsSettings, settings, "model")
        self.save_hyperparameters(as_dict(s))
        self.net = s.net.build()
        self.k_max = self.net.k_max
        self.ema_decay = s.ema.decay
        self.net_ema = copy.deepcopy(self.net).requires_grad_(False) if self.ema_decay > 0 else None
        self._ema_updates, self._ema_step = 0, -1
        self.boot_fraction, self.boot_start, self.anchor = s.shortcut.fraction, s.shortcut.start_step, s.shortcut.anchor
        nz = s.noise
        self.pattern = nz.pattern
        self.pattern_fraction = nz.pattern_fraction
        self.pattern_context = nz.pattern_context
        self.pattern_period = nz.pattern_period
        self.prefix_share = nz.prefix_share
        self.pattern_tau_ctx = nz.tau_ctx
        self.clean_prior = nz.clean_prior
        self.velocity_drop = nz.velocity_drop
        self.own_context = nz.own_context
        self.own_context_steps = nz.own_context_steps
        self.own_context_start = nz.own_context_start
        self.motion_floor = s.loss.motion_floor
        self.decoded_floor = s.loss.decoded_floor
        self.decoded_weight = s.loss.decoded
        self.decoded_frames = s.loss.decoded_frames
        self.rollout_cfg = as_dict(s.rollout)
        self.probe_batches = s.probe.batches
        self.ckpt_min_frames = s.activation_checkpointing.min_frames
        self.decoder_cfg = dict(s.decoder)
        self.image_size = s.image_size
        channels = s.net.latent_channels
        self.register_buffer("latent_mean", torch.zeros(channels))
        self.register_buffer("latent_std", torch.ones(channels))
        self._decoder = None
        self._lengths: list[tuple[int, str, int, int]] = []
        self.eval_loss = MeanMetric()
        self.eval_metrics = torch.nn.ModuleDict(self._eval_metrics())

    def _eval_metrics(self) -> dict:
        """Validation/test metrics, means (or sums) over every evaluated clip of every rank: the denoising probe's PSNR
        per step size, and per horizon step (``[B, horizon]`` updates) the rollout's and copy-last's pixel PSNR, pixel
        MSE and latent MSE, with each sampler's seconds and frames."""
        horizon = int(self.rollout_cfg["horizon"])
        per_step = lambda: MultioutputWrapper(MeanMetric(), horizon, output_dim=1, remove_nans=False)  # noqa: E731
        out = {f"denoise/psnr_k{2**lvl}": MeanMetric() for lvl in range(C.num_levels(self.k_max))}
        for name in ["copy_last", *(f"rollout_k{s}" for s in self.rollout_cfg["steps"])]:
            out |= {f"{name}/{key}": per_step() for key in ("psnr", "mse", "latent_mse")}
        for s in self.rollout_cfg["steps"]:
            out |= {f"rollout_k{s}/seconds": SumMetric(), f"rollout_k{s}/frames": SumMetric()}
        return out

    # -- data statistics and the frozen decoder ---------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Copy the data's latent statistics (the DataModule's ``setup`` runs first) and check the latent shape."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or getattr(dm, "latent_mean", None) is None:
            return
        shape = tuple(getattr(dm, "latent_shape", ()))
        want = (self.net.latent_channels, *self.net.latent_size)
        if shape != want:
            raise ValueError(f"the data's latents are {shape} per frame, the model expects {want} (model.net)")
        self.latent_mean.copy_(dm.latent_mean)
        self.latent_std.copy_(dm.latent_std)

    def decoder(self):
        if self._decoder is None:
            from mmsuite.tokenizers.image import load_frame_tokenizer

            self._decoder = load_frame_tokenizer(self.decoder_cfg, self.image_size, device=self.device)
            for p in self._decoder_params():  # frozen: the pixel loss (loss.decoded) reaches the latents only
                p.requires_grad_(False)
        return self._decoder

    def _decoder_params(self):
        net = getattr(self._decoder, "net", None)
        net = getattr(self._decoder, "model", None) if net is None else net
        return list(net.parameters()) if isinstance(net, torch.nn.Module) else []

    def _raw(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[N, C, h, w]`` -> the tokenizer's own latent scale."""
        return z.float() * self.latent_std.view(1, -1, 1, 1) + self.latent_mean.view(1, -1, 1, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[..., C, h, w]`` -> uint8 frames ``[..., H, W, 3]`` (CPU)."""
        lead = z.shape[:-3]
        raw = self._raw(z.flatten(0, -4))
        frames = torch.cat([self.decoder().decode_latents(raw[i : i + 256]) for i in range(0, len(raw), 256)])
        return frames.reshape(*lead, *frames.shape[1:])

    def _decoded_loss(self, x_hat: torch.Tensor, z0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``loss.decoded``: the frames' weighted pixel MSE through the frozen decoder (on the [0, 1] scale of the
        rollout's PSNR, against the decoded truth as that PSNR is), on ``loss.decoded_frames`` frames drawn at random
        from ``x_hat`` ``[B, T, ...]`` and scaled up to all of them (an unbiased estimate of the sum over every
        frame: decoding all would cost more than the dynamics step). With ``loss.decoded_floor`` = f a frame adds
        ``w·f·log(1 + mse/f)`` instead: its MSE below f, its log above (as PSNR counts a frame), so the frames with
        large errors do not take over the term."""
        x, z, wf = x_hat.flatten(0, 1), z0.flatten(0, 1), w.flatten()
        n = x.shape[0]
        k = min(self.decoded_frames, n)
        pick = torch.randperm(n)[:k].to(x.device)
        dec = self.decoder()
        images = dec.decode_latents_float(self._raw(x[pick]))
        with torch.no_grad():
            truth = dec.decode_latents_float(self._raw(z[pick]))
        mse = (images.float() - truth.float()).pow(2).flatten(1).mean(1) / 4  # [-1, 1] -> [0, 1] pixels
        if self.decoded_floor is not None:
            mse = self.decoded_floor * torch.log1p(mse / self.decoded_floor)
        return (wf[pick] * mse).sum() * (n / k)

    # -- training -------------------------------------------------------------------------------------------
    def _actions(self, batch) -> torch.Tensor | None:
        return batch.get("actions") if self.net.num_actions else None

    def _boot_rows(self, rows: int) -> int:
        """Bootstrap rows of a group: ``floor(f·rows + u)``, ``u ~ U(0, 1)`` on the CPU (no device sync)."""
        if self.boot_fraction <= 0 or self.global_step < self.boot_start or self.k_max < 2:
            return 0
        return min(rows, int(math.floor(self.boot_fraction * rows + float(torch.rand(())))))

    def _prior(self, z_tau: torch.Tensor, z0: torch.Tensor, tau_idx: torch.Tensor) -> dict:
        """``noise.clean_prior``: the model's prior reads the clean latents of frames at or below τ_ctx (as the
        rollout reads the clean context); otherwise nothing is passed and it reads the noisy input."""
        if not self.clean_prior:
            return {}
        prior_z, prior_index = C.clean_prior_source(z_tau, z0, tau_idx, self.pattern_tau_ctx, self.k_max)
        return {"prior_z": prior_z, "prior_index": prior_index}

    def _group_losses(self, z0: torch.Tensor, actions: torch.Tensor | None, checkpoint: bool) -> dict:
        """Sums and counts of the per-frame losses of one group of rows ``[B, T, ...]``."""
        b, t = z0.shape[:2]
        dev = z0.device
        n_boot = self._boot_rows(b)
        n_flow = b - n_boot
        level = torch.full((b, t), C.finest_level(self.k_max), dtype=torch.long, device=dev)
        if n_boot:
            level[n_flow:] = C.sample_step_levels((n_boot, t), self.k_max, include_finest=False, device=dev)
        tau_idx = C.sample_tau_indices(level, self.k_max)
        if self.pattern != "iid" and t > 1 and n_flow:
            rows = [r for r in range(n_flow) if float(torch.rand(())) < self.pattern_fraction]
            if rows and self.pattern == "rising":
                ctx = min(self.pattern_context, t - 1)
                tau_idx[rows] = C.rising_tau_indices(t, ctx, self.pattern_tau_ctx, self.k_max).to(dev)
            held = C.snap_context_tau(self.pattern_tau_ctx, self.k_max)
            for r in rows if self.pattern != "rising" else []:  # frames held clean-ish; the others keep their iid tau
                # prefix_share (interleave only): a run of held frames, as a rollout's context, on that share of rows
                prefix = self.pattern == "prefix" or (
                    self.prefix_share > 0 and float(torch.rand(())) < self.prefix_share
                )
                if prefix:  # a random-length prefix
                    frames = slice(int(torch.randint(1, t, ())))
                else:  # interleave: one target every pattern_period frames from a random phase, the rest held
                    phase = int(torch.randint(0, self.pattern_period, ()))
                    frames = [i for i in range(t) if (i - phase) % self.pattern_period]
                tau_idx[r, frames] = held
        tau = C.tau_value(tau_idx, self.k_max)
        z_tau = C.noise(z0, tau, torch.randn_like(z0))
        vkw = {}
        if self.velocity_drop and self.net.velocity_head is not None:  # frames trained without the velocity term
            vkw["velocity"] = torch.rand(b, t, device=dev) >= self.velocity_drop
        x_hat = self.net(
            z_tau, tau_idx, level, actions, checkpoint=checkpoint, **self._prior(z_tau, z0, tau_idx), **vkw
        )
        w = C.ramp_weight(tau)
        if self.motion_floor is not None:  # nearly still frames weigh more (the rollout is scored in log MSE)
            w = w * C.motion_weight(z0, self.motion_floor)
        clean_err = w * C.per_frame_mse(x_hat, z0, 2)
        out = {"flow": clean_err[:n_flow].sum(), "n_flow": n_flow * t, "n": b * t, "n_boot": n_boot * t}
        if self.decoded_weight and n_flow:  # the flow rows' error as the rollout is scored: in decoded pixels
            wd = w if self.decoded_floor is None else C.ramp_weight(tau)  # the log weighs frames itself
            out["decoded"] = self._decoded_loss(x_hat[:n_flow], z0[:n_flow], wd[:n_flow])
        if n_boot:
            zb, ib, lb = z_tau[n_flow:], tau_idx[n_flow:], level[n_flow:]
            ab = None if actions is None else actions[n_flow:]
            vkb = {k: v[n_flow:] for k, v in vkw.items()}  # the teacher keeps the student's velocity frames
            with torch.no_grad():  # the teacher: two half steps of the same network
                half = C.teacher_level(lb, self.k_max)
                tau_b, d_b = tau[n_flow:], C.step_size(lb, self.k_max).to(dev)
                x1 = self.net(zb, ib, half, ab, **self._prior(zb, z0[n_flow:], ib), **vkb)
                z_mid, tau_mid = C.teacher_midpoint(zb, x1, tau_b, d_b)
                i_mid = C.tau_index(tau_mid, self.k_max)
                x2 = self.net(z_mid, i_mid, half, ab, **self._prior(z_mid, z0[n_flow:], i_mid), **vkb)
                x_star = C.bootstrap_x_target(zb, z_mid, x1, x2, tau_b, d_b).detach()
            out["boot"] = (w[n_flow:] * C.bootstrap_loss_x(x_hat[n_flow:], x_star, 2)).sum()
            out["anchor"] = clean_err[n_flow:].sum()
        return out

    def _own_context_losses(self, z0: torch.Tensor, actions: torch.Tensor | None, checkpoint: bool) -> dict:
        """Self-forcing rows ``[B, T, ...]`` (``noise.own_context``): the model predicts one frame every
        ``pattern_period`` frames (random phase, never the last frame) from the frames before it (the real ones held
        at τ_ctx; all predictions of a row denoised together), in ``own_context_steps`` no-grad Euler steps; then
        the frame after each prediction is a target (iid τ at the finest level) whose predecessor is that
        prediction, held at τ_ctx and read by the prior as given. The predicted frames have no loss (the motion
        weights still read the real clip)."""
        b, t = z0.shape[:2]
        dev = z0.device
        fine = torch.full((b, t), C.finest_level(self.k_max), dtype=torch.long, device=dev)
        held = torch.full_like(fine, C.snap_context_tau(self.pattern_tau_ctx, self.k_max))
        own = torch.zeros(b, t, dtype=torch.bool)  # built on the CPU: its count needs no device sync
        for r in range(b):
            own[r, int(torch.randint(0, self.pattern_period, ())) : t - 1 : self.pattern_period] = True
        n = b * t - int(own.sum())  # the frames with a loss
        own = own.to(dev)
        target = torch.zeros_like(own)
        target[:, 1:] = own[:, :-1]
        mask = own[..., None, None, None]
        indices, level = C.sampling_schedule(self.own_context_steps, self.k_max)
        ctx = C.noise(z0, C.tau_value(held, self.k_max), torch.randn_like(z0))
        z = torch.randn_like(z0)
        lvl = fine.masked_fill(own, level)
        d = C.step_size(torch.full_like(fine, level), self.k_max).to(dev)  # the step of every frame (only own kept)
        with torch.no_grad():  # the model's own predictions of the frames in ``own``, from the real ones
            for index in indices.tolist():
                idx = held.masked_fill(own, index)
                z_in = torch.where(mask, z, ctx)
                reads = {}
                if self.clean_prior:  # the real frames are read clean, the predicted ones as they are
                    reads = {"prior_z": torch.where(mask, z_in, z0), "prior_index": idx.masked_fill(~own, 0)}
                x_hat = self.net(z_in, idx, lvl, actions, **reads)
                z = C.euler_step(z, x_hat, C.tau_value(torch.full_like(fine, index), self.k_max).to(dev), d)
        z_own = torch.where(mask, z.detach(), z0)
        tau_idx = torch.where(target, C.sample_tau_indices(fine, self.k_max), held)
        tau = C.tau_value(tau_idx, self.k_max)
        z_tau = C.noise(z_own, tau, torch.randn_like(z0))
        vkw = {}  # observed: as in the rollout, no velocity term for a frame after a prediction (the others keep it)
        if self.rollout_cfg["velocity"] == "observed" and self.net.velocity_head is not None:
            vkw["velocity"] = ~target
        x_hat = self.net(
            z_tau, tau_idx, fine, actions, checkpoint=checkpoint, **self._prior(z_tau, z_own, tau_idx), **vkw
        )
        w = C.ramp_weight(tau) * (~own).float()
        if self.motion_floor is not None:
            w = w * C.motion_weight(z0, self.motion_floor)
        err = (w * C.per_frame_mse(x_hat, z0, 2)).sum()
        return {"flow": err, "n_flow": n, "n": n, "n_boot": 0}

    def training_step(self, batch, batch_idx):
        z0 = batch["latents"]
        actions = self._actions(batch)
        b, t = z0.shape[:2]
        single = list(batch.get("single") or [False] * b)
        seq_rows = [i for i in range(b) if not single[i]]
        one_rows = [i for i in range(b) if single[i]]
        own_rows = []
        if self.own_context and t >= 3 and self.global_step >= self.own_context_start:
            own_rows = [i for i in seq_rows if float(torch.rand(())) < self.own_context]
            seq_rows = [i for i in seq_rows if i not in own_rows]
        checkpoint = self.ckpt_min_frames is not None and t >= int(self.ckpt_min_frames)
        parts = []
        if own_rows:
            parts.append(
                self._own_context_losses(z0[own_rows], None if actions is None else actions[own_rows], checkpoint)
            )
        if seq_rows:
            parts.append(self._group_losses(z0[seq_rows], None if actions is None else actions[seq_rows], checkpoint))
        if one_rows:  # T=1 rows: every frame of the row on its own
            zs = z0[one_rows].reshape(len(one_rows) * t, 1, *z0.shape[2:])
            acts = None if actions is None else actions[one_rows].reshape(-1, 1)
            parts.append(self._group_losses(zs, acts, False))
        n = sum(p["n"] for p in parts)
        flow = sum(p["flow"] for p in parts)
        boot = sum(p.get("boot", 0.0) for p in parts)
        anchor = sum(p.get("anchor", 0.0) for p in parts)
        decoded = sum(p.get("decoded", 0.0) for p in parts)
        loss = (flow + boot + self.anchor * anchor + self.decoded_weight * decoded) / n
        n_flow, n_boot = sum(p["n_flow"] for p in parts), sum(p["n_boot"] for p in parts)
        kind = batch.get("length", "S")
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/flow_loss", flow / max(n_flow, 1), batch_size=b)
        if self.decoded_weight:
            self.log("train/decoded_loss", decoded / max(n_flow, 1), batch_size=b)
        if n_boot:
            self.log("train/boot_loss", boot / n_boot, batch_size=b)
            self.log("train/anchor_loss", anchor / n_boot, batch_size=b)
        self.log("train/boot_rows", float(n_boot) / max(n, 1), batch_size=b)
        self.log("train/seq_len", float(t), batch_size=b)
        self._lengths.append((int(self.global_step), kind, t, b))
        every = max(int(getattr(self.trainer, "log_every_n_steps", 50) or 50), 1)
        if self.trainer.is_global_zero and self.global_step % every == 0:
            self.print(f"[dynamics] step {self.global_step} {kind} T={t} B={b} boot_frames={n_boot}")  # above the bar
        return loss

    def throughput_counts(self, batch) -> tuple[int, int]:
        """Clips and tokens (frames x the transformer's slots per frame) of a batch (mmsuite.callbacks.perf)."""
        b, t = batch["latents"].shape[:2]
        return int(b), int(b * t * self.net.slots)

    @property
    def eval_net(self) -> DynamicsTransformer:
        """The network validation, test, the denoising probe and the rollout use: the EMA copy when ``ema.decay``
        > 0 (dynamics.md §e.7: "keep an EMA of the weights for eval"), else the online one. The bootstrap teacher
        is always the online network (the paper's and nicklashansen's choice)."""
        return self.net if self.net_ema is None else self.net_ema

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step toward the online weights, with the warm-up ``min(decay, (1 + n)/(10 + n))`` after ``n``
        updates so early validations do not read the initial weights."""
        if self.net_ema is None:
            return
        decay = min(self.ema_decay, (1 + self._ema_updates) / (10 + self._ema_updates))
        for pe, pn in zip(self.net_ema.parameters(), self.net.parameters()):
            pe.lerp_(pn.detach().to(pe.dtype), 1.0 - decay)
        for be, bn in zip(self.net_ema.buffers(), self.net.buffers()):
            be.copy_(bn)
        self._ema_updates += 1

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """Update the EMA once per optimizer step (``global_step`` has moved on; accumulation-safe)."""
        if self.net_ema is not None and self.global_step != self._ema_step:
            self._ema_step = self.global_step
            self.update_ema()

    def on_train_end(self) -> None:
        """Every rank writes the lengths it trained on (``batch_lengths_rank<r>.json``): the DDP test reads them."""
        root = Path(self.trainer.default_root_dir)
        rank = self.trainer.global_rank
        rows = [{"step": s, "length": k, "T": t, "B": b} for s, k, t, b in self._lengths]
        (root / f"batch_lengths_rank{rank}.json").write_text(json.dumps(rows) + "\n")

    # -- evaluation -----------------------------------------------------------------------------------------
    def _rollout_now(self) -> bool:
        if self.trainer.sanity_checking or int(self.rollout_cfg["batches"]) <= 0:
            return False
        if self.trainer.state.fn != "fit":
            return True
        when = self.rollout_cfg["during_fit"]
        if when == "every":
            return True
        max_steps = self.trainer.max_steps
        return when == "final" and max_steps is not None and max_steps > 0 and self.global_step >= max_steps

    def _eval_step(self, batch, batch_idx: int, prefix: str):
        z0 = batch["latents"]
        actions = self._actions(batch)
        b, t = z0.shape[:2]
        g = torch.Generator().manual_seed(10_000 + batch_idx)
        level = torch.full((b, t), C.finest_level(self.k_max), dtype=torch.long, device=z0.device)
        tau_idx = C.sample_tau_indices(level.cpu(), self.k_max, generator=g).to(z0.device)
        eps = torch.randn(z0.shape, generator=g).to(z0.device)
        tau = C.tau_value(tau_idx, self.k_max)
        x_hat = self.eval_net(C.noise(z0, tau, eps), tau_idx, level, actions)
        loss = (C.ramp_weight(tau) * C.per_frame_mse(x_hat, z0, 2)).mean()
        self.eval_loss.update(loss, weight=b)
        self.log(f"{prefix}/loss", self.eval_loss, on_step=False, on_epoch=True, prog_bar=True)
        if batch_idx < self.probe_batches:
            self._denoise_probe(z0, actions, g)
        if batch_idx < int(self.rollout_cfg["batches"]) and self._rollout_now():
            self._rollout_eval(z0, actions, g, batch_idx, prefix)
        return loss

    def _denoise_probe(self, z0, actions, g) -> None:
        """One-step denoising at τ ≈ 0.5 per step size, scored on decoded frames."""
        b, t = z0.shape[:2]
        truth = self.decode(z0)
        eps = torch.randn(z0.shape, generator=g).to(z0.device)
        for lvl in range(C.num_levels(self.k_max)):
            idx = torch.full((b, t), C.probe_tau_index(lvl, self.k_max), dtype=torch.long, device=z0.device)
            levels = torch.full_like(idx, lvl)
            x_hat = self.eval_net(C.noise(z0, C.tau_value(idx, self.k_max), eps), idx, levels, actions)
            self._update(f"denoise/psnr_k{2**lvl}", psnr(self.decode(x_hat), truth, data_range=255))

    def _rollout_eval(self, z0, actions, g, batch_idx: int, prefix: str) -> None:
        cfg = self.rollout_cfg
        c, h = int(cfg["context"]), int(cfg["horizon"])
        b, t = z0.shape[:2]
        if c + h > t:
            raise ValueError(
                f"rollout.context + rollout.horizon = {c + h} frames, but validation clips have {t} "
                "(data.clip_frames); shorten the rollout"
            )
        truth = self.decode(z0[:, : c + h])  # [B, c+h, H, W, 3]
        target = truth[:, c:]
        copy = truth[:, c - 1 : c].expand_as(target) if c > 0 else torch.full_like(target, 128)
        self._update("copy_last/psnr", psnr(copy, target, data_range=255))
        self._update("copy_last/mse", (copy.float() / 255 - target.float() / 255).pow(2).flatten(-3).mean(-1))
        if c > 0:
            last = z0[:, c - 1 : c].float().expand(-1, h, *z0.shape[2:])
            self._update("copy_last/latent_mse", C.per_frame_mse(last, z0[:, c : c + h].float(), 2))
        acts = None if actions is None else actions[:, : c + h]
        videos = {"truth": truth}
        for steps in cfg["steps"]:
            gen = torch.Generator().manual_seed(int(cfg["seed"]) * 1000 + batch_idx)  # same noise for every sampler
            if z0.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            pred = rollout(
                self.eval_net,
                z0[:, :c],
                h,
                steps,
                float(cfg["tau_ctx"]),
                acts,
                gen,
                bool(cfg["cached"]),
                clean_prior=bool(cfg["clean_prior"]),
                velocity=str(cfg["velocity"]),
            )
            if z0.is_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            frames = self.decode(pred)
            name = f"rollout_k{steps}"
            self._update(f"{name}/psnr", psnr(frames, target, data_range=255))
            self._update(f"{name}/mse", (frames.float() / 255 - target.float() / 255).pow(2).flatten(-3).mean(-1))
            self._update(f"{name}/latent_mse", C.per_frame_mse(pred, z0[:, c : c + h].float(), 2))
            self._update(f"{name}/seconds", torch.tensor(seconds))
            self._update(f"{name}/frames", torch.tensor(float(b * h)))
            videos[name] = torch.cat([truth[:, :c], frames], dim=1)
        videos["copy_last"] = torch.cat([truth[:, :c], copy], dim=1)
        if batch_idx == 0 and int(cfg["gifs"]) > 0 and self.trainer.is_global_zero:
            self._log_gifs(videos, f"{prefix}/rollout", int(cfg["gifs"]))

    def _log_gifs(self, videos: dict, tag: str, n: int) -> None:
        from mmsuite.callbacks.samples import log_gif

        columns = list(videos.values())
        strip = torch.cat([v[:n] for v in columns], dim=3)  # [n, T, H, W*cols, 3]
        for i in range(strip.shape[0]):
            log_gif(self.trainer, f"{tag}/{i}", strip[i], fps=4, step=self.global_step)

    def _update(self, key: str, values: torch.Tensor) -> None:
        """Add values (decoded-frame metrics come from the CPU) to the metric ``key`` on the module's device."""
        self.eval_metrics[key].update(values.to(self.device))

    def _log_eval(self, prefix: str) -> None:
        """The epoch's metrics over all ranks (every rank computes and logs them), per horizon step ``_h{i}``, over
        steps 1-4 (``_h1_4``) and over the horizon (``_mean``), with frames/s, gains over copy-last and the gap
        between the fastest and slowest sampler. The rollout's metrics are there only if it ran this epoch (alike
        on every rank: each runs the same number of batches)."""
        values = {}
        for key, metric in self.eval_metrics.items():
            updated = metric.metrics[0] if isinstance(metric, MultioutputWrapper) else metric
            if updated.update_count:
                values[key] = metric.compute().double()
                metric.reset()
        out: dict[str, float] = {}
        for key, v in values.items():
            if key.startswith("denoise/"):
                out[key] = float(v)
            elif key.endswith("/psnr") or key.endswith("/mse") or key.endswith("/latent_mse"):
                for i, x in enumerate(v.tolist()):
                    out[f"{key}_h{i + 1}"] = x
                out[f"{key}_h1_4"] = float(v[:4].mean())
                out[f"{key}_mean"] = float(v.mean())
        for steps in self.rollout_cfg["steps"]:
            name = f"rollout_k{steps}"
            if f"{name}/seconds" in values:
                secs, frames = float(values[f"{name}/seconds"]), float(values[f"{name}/frames"])
                out[f"{name}/frames_per_s"] = frames / max(secs, 1e-9)
                out[f"{name}/seconds"] = secs
                if "copy_last/psnr_h1_4" in out:
                    out[f"{name}/gain_over_copy_h1_4"] = out[f"{name}/psnr_h1_4"] - out["copy_last/psnr_h1_4"]
        fast, slow = min(self.rollout_cfg["steps"]), max(self.rollout_cfg["steps"])
        if fast != slow and f"rollout_k{fast}/seconds" in out:
            pair = f"k{fast}_vs_k{slow}"
            out[f"{pair}/psnr_gap_h1_4"] = out[f"rollout_k{slow}/psnr_h1_4"] - out[f"rollout_k{fast}/psnr_h1_4"]
            out[f"{pair}/psnr_gap_mean"] = out[f"rollout_k{slow}/psnr_mean"] - out[f"rollout_k{fast}/psnr_mean"]
            out[f"{pair}/speedup"] = out[f"rollout_k{slow}/seconds"] / max(out[f"rollout_k{fast}/seconds"], 1e-9)
        for key, value in out.items():
            if np.isfinite(value):
                self.log(f"{prefix}/{key}", value)

    def validation_step(self, batch, batch_idx):
        return self._eval_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch, batch_idx):
        return self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # -- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        # the prior's weights are mixing weights whose neutral value is 1 (copy), not 0: no weight decay on them
        # (``optim.weight_decay`` 0.01 at lr 3e-3 alone pulls an unused entry from 1 to 0.91 in 3000 steps)
        gate = self.net.prior_gate
        params = [{"params": [p for p in self.net.parameters() if p is not gate and p.requires_grad]}]
        if gate is not None:
            params.append({"params": [gate], "weight_decay": 0.0})
        s = self.settings
        return adamw_warmup_cosine(params, s.optim, s.schedule, self.trainer.max_steps, "DynamicsModule")
