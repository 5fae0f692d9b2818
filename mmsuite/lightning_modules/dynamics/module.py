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
* **Held context** (:func:`held_frames`): ``noise.held_fraction`` of the rows, flow and bootstrap rows alike, hold
  some frames at τ_ctx (finest level), as a rollout holds its context: one target every ``noise.held_period`` = p
  frames, the p − 1 between held, so targets follow clean-ish frames. ``noise.held_prefix`` of those rows first hold
  a run of random length (a rollout's context is a run of held frames) and interleave after it. Held frames keep
  the flow loss; on bootstrap rows they stay as they are in both teacher passes (only the other frames take half
  steps), so the shortcut sampler is trained in the context it runs in.
* Long batches (``T >= activation_checkpointing.min_frames``) recompute block activations in backward.

Logged: ``train/loss``, ``train/flow_loss``, ``train/boot_loss``, ``train/anchor_loss``,
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
from mmsuite.lightning_modules.dynamics.sampling import rollout
from mmsuite.nn.metrics import psnr
from mmsuite.nn.schedule import AdamWSettings, StepSchedule, adamw_warmup_cosine
from mmsuite.settings import as_dict, fail, parse, setting


@dataclass
class ShortcutSettings:
    """Shortcut forcing (experiment=dynamics_shortcut); fraction 0: diffusion forcing only."""

    fraction: float = setting(0.0, ge=0.0, le=1.0)  # share of rows trained by bootstrap (teacher under no_grad)
    start_step: int = setting(0, ge=0)  # warm-up: plain flow rows only before this step
    anchor: float = setting(0.1, ge=0.0)  # flow-loss anchor on bootstrap frames (against the self-consistent deadlock)


@dataclass
class NoiseSettings:
    """Which frames are held at τ_ctx as context (see the module docstring); the others draw their own τ."""

    held_fraction: float = setting(0.0, ge=0.0, le=1.0)  # share of rows (flow and bootstrap) with held frames
    held_period: int = setting(2, ge=2)  # one target every this many frames, the rest held
    held_prefix: float = setting(0.0, ge=0.0, le=1.0)  # share of held rows that start with a run of held frames
    tau_ctx: float = setting(0.1, ge=0.0, le=1.0)


BASELINES = ("copy_last", "linear", "half_change")  # the rollout's baselines, no learning (see _rollout_eval)


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
    shuffled: bool = True  # also roll out the fewest-step sampler with the actions of another clip (shuffle loss)


@dataclass
class DynamicsLossSettings:
    motion_floor: float | None = setting(None, gt=0.0)  # frames weigh 1/(change + floor), mean 1 (null: off)


@dataclass
class ProbeSettings:
    batches: int = setting(1, ge=0)  # validation batches for the one-step denoising PSNR per step size


@dataclass
class EMASettings:
    # > 0: validation, the probes and the rollout use an EMA of the weights; the bootstrap teacher stays the online net
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
        for n in self.rollout.steps:
            try:
                C.sampling_schedule(n, self.net.k_max)  # a power of two <= k_max
            except ValueError as e:
                fail(f"{key}.rollout.steps", str(e))
        try:
            C.snap_context_tau(self.rollout.tau_ctx, self.net.k_max)
        except ValueError as e:
            fail(f"{key}.rollout.tau_ctx", str(e))


def held_frames(rows: int, frames: int, fraction: float, period: int, prefix: float) -> torch.Tensor:
    """Which frames of ``rows`` rows of ``frames`` frames are held at τ_ctx: bool ``[rows, frames]`` (CPU draws).

    A row holds frames with probability ``fraction``. A held row keeps one target every ``period`` frames and holds
    the ``period − 1`` between; with probability ``prefix`` it first holds a run of ``L`` frames, ``L`` uniform in
    ``1 … frames − 1`` (a rollout's context), and its targets are frames ``L, L + period, …``; otherwise they start at
    a random phase. Single frames (``frames`` = 1) are never held."""
    held = torch.zeros(rows, frames, dtype=torch.bool)
    if frames < 2:
        return held
    for r in range(rows):
        if float(torch.rand(())) >= fraction:
            continue
        if prefix > 0 and float(torch.rand(())) < prefix:
            start = int(torch.randint(1, frames, ()))
            held[r, :start] = True
        else:
            start = int(torch.randint(0, period, ()))
            held[r, :start] = True
        after = torch.arange(frames - start)
        held[r, start:] = after % period != 0
    return held


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
        self.noise = s.noise
        self.motion_floor = s.loss.motion_floor
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
        MSE and latent MSE (also of the baselines ``linear``: latent linear extrapolation, ``half_change``: half the
        last change, then hold; and of the fewest-step sampler with shuffled actions), with each sampler's seconds and
        frames."""
        horizon = int(self.rollout_cfg["horizon"])
        per_step = lambda: MultioutputWrapper(MeanMetric(), horizon, output_dim=1, remove_nans=False)  # noqa: E731
        out = {f"denoise/psnr_k{2**lvl}": MeanMetric() for lvl in range(C.num_levels(self.k_max))}
        fast = min(self.rollout_cfg["steps"])
        names = [*BASELINES, *(f"rollout_k{s}" for s in self.rollout_cfg["steps"]), f"rollout_k{fast}_shuffled"]
        for name in names:
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
        return self._decoder

    def _raw(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[N, C, h, w]`` -> the tokenizer's own latent scale."""
        return z.float() * self.latent_std.view(1, -1, 1, 1) + self.latent_mean.view(1, -1, 1, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[..., C, h, w]`` -> uint8 frames ``[..., H, W, 3]`` (CPU)."""
        lead = z.shape[:-3]
        raw = self._raw(z.flatten(0, -4))
        frames = torch.cat([self.decoder().decode_latents(raw[i : i + 256]) for i in range(0, len(raw), 256)])
        return frames.reshape(*lead, *frames.shape[1:])

    # -- training -------------------------------------------------------------------------------------------
    def _actions(self, batch) -> torch.Tensor | None:
        return batch.get("actions") if self.net.num_actions else None

    def _boot_rows(self, rows: int) -> int:
        """Bootstrap rows of a group: ``floor(f·rows + u)``, ``u ~ U(0, 1)`` on the CPU (no device sync)."""
        if self.boot_fraction <= 0 or self.global_step < self.boot_start or self.k_max < 2:
            return 0
        return min(rows, int(math.floor(self.boot_fraction * rows + float(torch.rand(())))))

    def _group_losses(self, z0: torch.Tensor, actions: torch.Tensor | None, checkpoint: bool) -> dict:
        """Sums and counts of the per-frame losses of one group of rows ``[B, T, ...]``: bootstrap rows last."""
        b, t = z0.shape[:2]
        dev = z0.device
        n_boot = self._boot_rows(b)
        n_flow = b - n_boot
        nz = self.noise
        held = held_frames(b, t, nz.held_fraction, nz.held_period, nz.held_prefix).to(dev)  # [B, T]
        level = torch.full((b, t), C.finest_level(self.k_max), dtype=torch.long, device=dev)
        if n_boot:
            level[n_flow:] = C.sample_step_levels((n_boot, t), self.k_max, include_finest=False, device=dev)
        level = level.masked_fill(held, C.finest_level(self.k_max))
        tau_idx = C.sample_tau_indices(level, self.k_max).masked_fill(held, C.snap_context_tau(nz.tau_ctx, self.k_max))
        tau = C.tau_value(tau_idx, self.k_max)
        z_tau = C.noise(z0, tau, torch.randn_like(z0))
        x_hat = self.net(z_tau, tau_idx, level, actions, checkpoint=checkpoint)
        w = C.ramp_weight(tau)
        if self.motion_floor is not None:  # nearly still frames weigh more (the rollout is scored in log MSE)
            w = w * C.motion_weight(z0, self.motion_floor)
        clean_err = w * C.per_frame_mse(x_hat, z0, 2)
        boot = torch.zeros_like(held)
        boot[n_flow:] = ~held[n_flow:]  # the frames that bootstrap: bootstrap rows' frames that are not held
        n_boot_frames = int(boot.sum())
        out = {"flow": clean_err[~boot].sum(), "n_flow": b * t - n_boot_frames, "n": b * t, "n_boot": n_boot_frames}
        if n_boot_frames:
            rows = slice(n_flow, b)
            zb, ib, lb, fb = z_tau[rows], tau_idx[rows], level[rows], boot[rows]
            ab = None if actions is None else actions[rows]
            with torch.no_grad():  # the teacher: two half steps of the same network; held frames stay as they are
                half = lb.clone()
                half[fb] = C.teacher_level(lb[fb], self.k_max)
                tau_b, d_b = tau[rows][fb], C.step_size(lb[fb], self.k_max).to(dev)
                x1 = self.net(zb, ib, half, ab)
                z_mid, i_mid = zb.clone(), ib.clone()
                z_mid[fb], tau_mid = C.teacher_midpoint(zb[fb], x1[fb], tau_b, d_b)
                i_mid[fb] = C.tau_index(tau_mid, self.k_max)
                x2 = self.net(z_mid, i_mid, half, ab)
                x_star = C.bootstrap_x_target(zb[fb], z_mid[fb], x1[fb], x2[fb], tau_b, d_b).detach()
            out["boot"] = (w[boot] * C.bootstrap_loss_x(x_hat[boot], x_star, 1)).sum()
            out["anchor"] = clean_err[boot].sum()
        return out

    def training_step(self, batch, batch_idx):
        z0 = batch["latents"]
        actions = self._actions(batch)
        b, t = z0.shape[:2]
        single = list(batch.get("single") or [False] * b)
        seq_rows = [i for i in range(b) if not single[i]]
        one_rows = [i for i in range(b) if single[i]]
        checkpoint = self.ckpt_min_frames is not None and t >= int(self.ckpt_min_frames)
        parts = []
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
        loss = (flow + boot + self.anchor * anchor) / n
        n_flow, n_boot = sum(p["n_flow"] for p in parts), sum(p["n_boot"] for p in parts)
        kind = batch.get("length", "S")
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/flow_loss", flow / max(n_flow, 1), batch_size=b)
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
        > 0, else the online one. The bootstrap teacher is always the online network (as in the paper)."""
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
        if c > 1:  # the latent baselines: linear extrapolation of the last change, and half of it then hold
            last, change = z0[:, c - 1 : c].float(), (z0[:, c - 1 : c] - z0[:, c - 2 : c - 1]).float()
            k = torch.arange(1, h + 1, device=z0.device, dtype=torch.float32).view(1, h, *[1] * (z0.dim() - 2))
            half = (last + change / 2).expand(-1, h, *z0.shape[2:])
            for name, pred in (("linear", last + k * change), ("half_change", half)):
                frames = self.decode(pred)
                self._update(f"{name}/psnr", psnr(frames, target, data_range=255))
                self._update(f"{name}/mse", (frames.float() / 255 - target.float() / 255).pow(2).flatten(-3).mean(-1))
                self._update(f"{name}/latent_mse", C.per_frame_mse(pred, z0[:, c : c + h].float(), 2))
        acts = None if actions is None else actions[:, : c + h]
        videos = {"truth": truth}
        runs = [(s, acts, f"rollout_k{s}") for s in cfg["steps"]]
        if cfg["shuffled"] and acts is not None and b > 1:  # every clip gets the next clip's actions
            fast = min(cfg["steps"])
            runs.append((fast, acts.roll(1, dims=0), f"rollout_k{fast}_shuffled"))
        for steps, acts, name in runs:
            gen = torch.Generator().manual_seed(int(cfg["seed"]) * 1000 + batch_idx)  # same noise for every sampler
            if z0.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            pred = rollout(self.eval_net, z0[:, :c], h, steps, float(cfg["tau_ctx"]), acts, gen, bool(cfg["cached"]))
            if z0.is_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            frames = self.decode(pred)
            self._update(f"{name}/psnr", psnr(frames, target, data_range=255))
            self._update(f"{name}/mse", (frames.float() / 255 - target.float() / 255).pow(2).flatten(-3).mean(-1))
            self._update(f"{name}/latent_mse", C.per_frame_mse(pred, z0[:, c : c + h].float(), 2))
            if name.endswith("_shuffled"):
                continue
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
                best = [out[f"{b}/psnr_h1_4"] for b in BASELINES if f"{b}/psnr_h1_4" in out]
                if best:
                    out[f"{name}/gain_over_best_h1_4"] = out[f"{name}/psnr_h1_4"] - max(best)
                if f"{name}_shuffled/psnr_h1_4" in out:  # > 0: the actions are used
                    out[f"{name}/shuffle_loss_h1_4"] = out[f"{name}/psnr_h1_4"] - out[f"{name}_shuffled/psnr_h1_4"]
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
        params = [
            {"params": [p for p in self.net.parameters() if p is not gate]},
            {"params": [gate], "weight_decay": 0.0},
        ]
        s = self.settings
        return adamw_warmup_cosine(params, s.optim, s.schedule, self.trainer.max_steps, "DynamicsModule")
