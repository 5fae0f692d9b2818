"""LightningModule of the 4M family (``m4_pose``, ``nano4m``): Dirichlet-masked multimodal training of
:class:`~mmsuite.lightning_modules.fourm.model.FourM`, a token-based learning-rate schedule, and the
evaluation tasks (pose from frame, next pose, any fixed input -> target task) against their baselines.

Batches are ``{"tokens": long [B, S]}`` of LOCAL ids in the model's concatenated modality layout (the
DataModule converts the shards' global ids). Masks are drawn here, on the CPU, from a generator seeded by
``(seed, global step)`` for training and ``(seed, batch index)`` for validation: a resumed run draws the
masks the uninterrupted one would have, validation is the same every time, and the real-token counts that
drive the schedule are Python ints (no device sync).

Loss (4M's ``mod`` loss): per modality the mean cross-entropy over its real targets in the batch, then the
mean over the modalities that have targets in this batch (``loss.weighting: token`` averages over tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torchmetrics import MeanMetric

from mmsuite.lightning_modules.fourm.attributes import attribute_metric_names, eval_attribute_task
from mmsuite.lightning_modules.fourm.masking import DirichletMasking, fixed_plan
from mmsuite.lightning_modules.fourm.model import FourMNetSettings
from mmsuite.nn.metrics import psnr
from mmsuite.nn.schedule import AdamWSettings, TokenSchedule, warmup_cosine
from mmsuite.settings import as_dict, fail, parse, setting
from mmsuite.tokenizers.pose import PoseSettings


def _slot(name: str) -> str:
    """The ``eval_means`` key of a metric name (module keys cannot hold a ".")."""
    return name.replace(".", ",")


def _plan_to(plan, device):
    """Move a CPU-drawn plan to ``device``, keeping host copies of its layout (``host_*``): FourM reads the
    packing and the modalities with targets from them, with no device sync in the training step."""
    for key in ("enc_valid", "dec_index", "dec_valid"):
        setattr(plan, f"host_{key}", getattr(plan, key))
    for key in ("enc_index", "enc_valid", "dec_index", "dec_valid"):
        setattr(plan, key, getattr(plan, key).to(device, non_blocking=True))
    return plan


@dataclass
class MaskingSettings:
    """4M's Dirichlet masking (:class:`DirichletMasking`): alphas over the modalities, one row or a mixture of rows."""

    input_alphas: Any = setting()  # = the alphas group (${alphas.input_alphas}) unless an experiment says otherwise
    target_alphas: Any = setting()
    weights: Any = setting(None)  # the mixture components' weights (null: one Dirichlet, or uniform)
    input_tokens_range: list[int] = setting([96, 256], ge=0)  # inclusive [min, max] input tokens per sample
    target_tokens_range: list[int] = setting([39, 256], ge=0)


@dataclass
class FourMLossSettings:
    weighting: str = setting("modality", choices=["modality", "token"])  # 4M: mean CE per modality, then their mean
    pose_sigma_bins: float = setting(0.0, ge=0.0)  # > 0: ordinal soft targets for pose bins (Gaussian); 0: one-hot


@dataclass
class TaskSettings:
    """A fixed input -> target evaluation (``model.tasks``): token accuracy, pose error or frame PSNR against a
    baseline; ``kind: attributes`` (nano4m) generates the target and scores caption/image attributes."""

    name: str = setting()
    inputs: list[str] = setting()
    target: str = setting()
    kind: str | None = setting(None, choices=["attributes"])
    baseline: str | None = setting(None, choices=["copy", "mean_pose"])  # copy: copy_from's tokens as the guess
    copy_from: str | None = None
    scheme: str = setting("maskgit", choices=["maskgit", "roar"])  # attributes: the generation
    steps: int = setting(8, ge=1)
    temperature: float = setting(0.0, ge=0.0)  # 0: greedy
    top_k: int | None = setting(None, ge=1)
    top_p: float | None = setting(None, gt=0.0, le=1.0)

    def check(self, key: str) -> None:
        if self.baseline == "copy" and not self.copy_from:
            fail(f"{key}.copy_from", "must name a modality for baseline: copy")


@dataclass
class GenerationSettings:
    """generate.py and the validation sample grid: from the given modalities, generate the chain in order."""

    given: list[str] = setting(["tok_rgb"])
    chain: list[str] = setting(["coords", "coords_next", "tok_rgb_next"])
    scheme: str = setting("maskgit", choices=["maskgit", "roar"])
    steps: int = setting(8, ge=1)
    temperature: float = setting(0.0, ge=0.0)  # 0: greedy
    grid_samples: int = setting(8, ge=0)  # validation: rows of the sample grid logged to TensorBoard (val/samples)


@dataclass
class FourMSettings:
    """``model`` of ``model=fourm`` (conf/model/fourm.yaml states only what differs)."""

    modalities: list[Any] = setting()  # the modalities group's list (FourM checks each entry)
    net: FourMNetSettings = setting(FourMNetSettings())
    masking: MaskingSettings = setting(MaskingSettings())
    optim: AdamWSettings = setting(AdamWSettings(lr=0.002, betas=[0.9, 0.95], weight_decay=0.05, fused=True))
    schedule: Any = setting({}, schema=TokenSchedule)  # = the schedule group (${schedule})
    loss: FourMLossSettings = setting(FourMLossSettings())
    pose_decode: str = setting("mean", choices=["mean", "argmax"])  # evaluation: x/y slots' mean bin | argmax
    tasks: list[Any] = setting([], items=TaskSettings)  # the experiment lists them
    pose: Any = setting(None, schema=PoseSettings)  # = the experiment's pose block (null: no pose modality)
    seed: int = setting(0, ge=0)  # masks are drawn from (seed, rank, step)
    generation: GenerationSettings = setting(GenerationSettings())
    image_tokenizer_ckpt: str | None = None  # decodes generated frames (sample grids, frame PSNR)
    compile: bool = False  # torch.compile each transformer block (dynamic shapes; the attention buckets stay eager)

    def check(self, key: str) -> None:
        if self.pose is None and any(isinstance(m, dict) and m.get("kind") == "pose" for m in self.modalities):
            fail(
                f"{key}.pose", "is null, but the pose modalities need it ({bins, canvas}: the experiment's pose block)"
            )


class FourMModule(L.LightningModule):
    Settings = FourMSettings

    def __init__(self, **settings):
        super().__init__()
        s = self.settings = parse(FourMSettings, settings, "model")
        self.save_hyperparameters(as_dict(s))
        self.net = s.net.build(s.modalities)
        if s.compile:  # torch.compile of each transformer block, in place (checkpoint keys unchanged)
            for block in (*self.net.encoder, *self.net.decoder):
                block.compile(dynamic=True)
        self.names = self.net.names
        self.masking = DirichletMasking(lengths=self.net.lengths, **as_dict(s.masking))
        self.weighting = s.loss.weighting
        self.pose_sigma = s.loss.pose_sigma_bins
        self.tasks = [as_dict(t) for t in s.tasks]
        for t in self.tasks:
            for name in [*t["inputs"], t["target"]]:
                self.net.index(name)  # a clear error for unknown modality names
        self.pose = s.pose.build() if s.pose is not None else None  # None: no pose modality (nano4m)
        self.pose_decode = s.pose_decode
        self.seed = s.seed
        self.generation = s.generation
        self.image_tokenizer_ckpt = s.image_tokenizer_ckpt
        # every evaluation metric is an epoch mean over all ranks, declared here so that each rank holds the same set;
        # the loss terms and token accuracies are batch means (of every modality, with targets in the batch or not)
        self._batch_keys = ["loss", *(f"{kind}_{m}" for m in self.names for kind in ("loss", "acc"))]
        self.eval_means = torch.nn.ModuleDict({_slot(k): MeanMetric() for k in self._eval_metric_names()})
        self._tokenizer = None  # the image tokenizer, loaded on first use (not part of the module's state)
        self._grid_tokens = None  # the first val batch's tokens, for the epoch's sample grid
        self.tokens_seen = 0  # real (non-padding) input + target tokens trained on; drives the schedule
        self.step_tokens = 0  # those of the last training batch (what perf/tokens_per_s counts)
        self.total_tokens = s.schedule.total_tokens
        self.warmup_tokens = s.schedule.warmup_tokens
        self.floor_ratio = s.schedule.floor_ratio

    # -- masks ------------------------------------------------------------------------------------------
    def _rng(self, *stream: int) -> np.random.Generator:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return np.random.default_rng([self.seed, rank, *stream])

    def _losses(self, out: dict) -> dict[str, torch.Tensor]:
        per_mod, total_ce, total_n = {}, 0.0, 0
        for name, (logits, target, _) in out.items():
            ce = self._cross_entropy(name, logits.float(), target)
            per_mod[name] = (ce, target.numel(), (logits.argmax(-1) == target).float().mean())
            total_ce, total_n = total_ce + ce, total_n + target.numel()
        if self.weighting == "token":
            loss = total_ce / max(total_n, 1)
        else:
            loss = sum(ce / n for ce, n, _ in per_mod.values()) / max(len(per_mod), 1)
        return {"loss": loss, **{f"loss_{k}": ce / n for k, (ce, n, _) in per_mod.items()}} | {
            f"acc_{k}": acc for k, (_, _, acc) in per_mod.items()
        }

    def _cross_entropy(self, name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Summed CE of modality ``name``, as its kind defines it (poses: optional ordinal soft targets)."""
        return self.net.modalities[self.net.index(name)].cross_entropy(self, logits, target)

    # -- training ---------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        tokens = batch["tokens"]
        plan = _plan_to(self.masking(tokens.shape[0], self._rng(0, self.global_step)), tokens.device)
        out = self._losses(self.net(tokens, plan))
        self.step_tokens = plan.n_real_input + plan.n_real_target
        self.tokens_seen += self.step_tokens
        bs = tokens.shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        for key, value in out.items():
            if key != "loss":
                self.log(f"train/{key}", value, batch_size=bs)
        self.log("train/tokens_seen_M", self.tokens_seen / 1e6, batch_size=bs)
        self.log("train/real_tokens_per_sample", (plan.n_real_input + plan.n_real_target) / bs, batch_size=bs)
        return out["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.tokens_seen >= self.total_tokens:
            self.trainer.should_stop = True

    def throughput_counts(self, batch) -> tuple[int, int]:
        """Samples and real (non-padding) tokens of the training batch just trained on (mmsuite.callbacks.perf)."""
        return int(batch["tokens"].shape[0]), self.step_tokens

    def estimated_total_steps(self) -> int | None:
        """Optimizer steps the token budget lasts: the steps so far plus the tokens left at the mean tokens per step
        so far (None before the first step). The progress bar's total."""
        if self.global_step <= 0 or self.tokens_seen <= 0:
            return None
        left = max(self.total_tokens - self.tokens_seen, 0.0)
        return self.global_step + math.ceil(left * self.global_step / self.tokens_seen)

    def lr_factor(self) -> float:
        return warmup_cosine(self.tokens_seen, self.warmup_tokens, self.total_tokens, self.floor_ratio)

    def configure_optimizers(self):
        o = self.settings.optim
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            # no weight decay on norms, biases, embeddings and the query token (4M's choice)
            (no_decay if p.ndim < 2 or "emb" in name or name == "query" else decay).append(p)
        # optim.fused: one fused kernel for the whole update where torch has one (float tensors on CPU or CUDA)
        fused = o.fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0}],
            lr=o.lr,
            betas=tuple(o.betas),
            fused=fused or None,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: self.lr_factor())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["fourm_tokens_seen"] = int(self.tokens_seen)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = int(checkpoint.get("fourm_tokens_seen", 0))

    # -- evaluation -------------------------------------------------------------------------------------
    def _modality(self, name: str) -> tuple[int, int, int]:
        k = self.net.index(name)
        return k, self.net.offsets[k], self.net.lengths[k]

    def predict(self, tokens: torch.Tensor, inputs: list[str], target: str) -> torch.Tensor:
        """One-pass prediction (MaskGIT with a single step) of every token of ``target`` from every token of
        ``inputs``: local ids ``[B, length]``. Pose slots are decoded within their kind (x/y -> bins,
        visibility -> flags)."""
        b = tokens.shape[0]
        plan = fixed_plan(self.net.lengths, b, [self.net.index(n) for n in inputs], [self.net.index(target)])
        plan = _plan_to(plan, tokens.device)
        k, _, length = self._modality(target)
        logits = self.net.predict_logits(tokens, plan)[:, :length, : self.net.vocabs[k]]
        return self.net.modalities[k].pick(self, logits)

    def _pose_errors(self, pred: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per visible joint of ``truth``: pixel error (canvas pixels) and whether it is within 0.1 x the
        truth's bounding-box size (PCK@0.1)."""
        p_xy, _, p_ok = self.pose.decode_torch(pred)
        t_xy, t_vis, t_ok = self.pose.decode_torch(truth)
        mask = t_vis & t_ok
        err = (p_xy - t_xy).norm(dim=-1)
        err = torch.where(p_ok, err, torch.full_like(err, self.pose.canvas))  # NA predicted for a visible joint
        lo = torch.where(mask[..., None], t_xy, torch.full_like(t_xy, float("inf"))).amin(1)
        hi = torch.where(mask[..., None], t_xy, torch.full_like(t_xy, float("-inf"))).amax(1)
        size = (hi - lo).amax(-1).clamp_min(1.0)[:, None]
        return err[mask], (err <= 0.1 * size)[mask]

    def _eval_metric_names(self) -> list[str]:
        """Every metric the evaluation reports (before the derived ratios and gains), without the split prefix."""
        names = list(self._batch_keys)
        for task in self.tasks:
            name, modality = task["name"], self.net.modalities[self.net.index(task["target"])]
            if task.get("kind") == "attributes":
                names += [f"{name}/{key}" for key in attribute_metric_names(task, modality.grid is not None)]
                continue
            names += [f"{name}/token_acc", *(f"{name}/{key}" for key in modality.metric_names(task))]
        return names

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, batch_idx)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, batch_idx)

    def _eval_step(self, batch, batch_idx: int) -> None:
        tokens = batch["tokens"]
        bs = tokens.shape[0]
        plan = _plan_to(self.masking(bs, self._rng(1, batch_idx)), tokens.device)
        out = self._losses(self.net(tokens, plan))
        # batch means weighted by the batch size; a modality without targets in this batch adds weight 0, so every
        # metric is updated in every batch on every rank
        for key in self._batch_keys:
            value = out.get(key)
            self.eval_means[_slot(key)].update(0.0 if value is None else value, weight=0.0 if value is None else bs)
        for task in self.tasks:
            if task["kind"] == "attributes":  # nano4m: caption <-> image attribute accuracy
                eval_attribute_task(self, task, batch, batch_idx)
                continue
            self._eval_task(task, tokens)

    def _eval_task(self, task: dict, tokens: torch.Tensor) -> None:
        name, target = task["name"], task["target"]
        k, off, length = self._modality(target)
        pred = self.predict(tokens, list(task["inputs"]), target)
        truth = tokens[:, off : off + length]
        self._accumulate(f"{name}/token_acc", (pred == truth).float())
        self.net.modalities[k].evaluate(self, task, pred, truth, tokens)  # the target kind's own metrics

    def _pose_task(self, task: dict, pred: torch.Tensor, truth: torch.Tensor, tokens: torch.Tensor) -> None:
        """Joint error and PCK@0.1 of a pose prediction, and the error of the task's ``baseline``."""
        name = task["name"]
        err, pck = self._pose_errors(pred, truth)
        self._accumulate(f"{name}/joint_error_px", err)
        self._accumulate(f"{name}/pck@0.1", pck.float())
        baseline = task["baseline"]
        if baseline == "copy":  # copy a given pose modality (next pose := current pose)
            _, boff, blen = self._modality(task["copy_from"])
            b_err, _ = self._pose_errors(tokens[:, boff : boff + blen], truth)
        elif baseline == "mean_pose":  # the training split's mean pose, from the DataModule
            b_err, _ = self._pose_errors(self._mean_pose_tokens(tokens.shape[0], tokens.device), truth)
        elif baseline is None:
            return
        else:
            raise ValueError(f"task {name!r}: baseline must be 'copy', 'mean_pose' or null, got {baseline!r}")
        self._accumulate(f"{name}/baseline_error_px", b_err)

    def _frame_psnr(self, task: dict, modality, pred: torch.Tensor, truth: torch.Tensor, tokens: torch.Tensor) -> None:
        """PSNR (dB, per frame, then the mean) of the decoded predicted frame against the decoded true tokens (the
        shards hold tokens, so the reference is the tokenizer's reconstruction of the true frame), and of the
        ``copy`` baseline (decode ``copy_from``, e.g. the current frame). Needs ``image_tokenizer_ckpt``."""
        tok = self._image_tokenizer()
        if tok is None:
            return
        h, w = modality.grid
        ref = self._decode_frames(tok, truth, h, w)
        self._accumulate(f"{task['name']}/psnr_db", psnr(self._decode_frames(tok, pred, h, w), ref, data_range=255))
        if task["baseline"] == "copy":
            _, off, length = self._modality(task["copy_from"])
            copy = self._decode_frames(tok, tokens[:, off : off + length], h, w)
            self._accumulate(f"{task['name']}/baseline_psnr_db", psnr(copy, ref, data_range=255))

    def _image_tokenizer(self):
        """The image tokenizer of ``image_tokenizer_ckpt`` (loaded once, kept off the module's state), or None."""
        from pathlib import Path

        if not self.image_tokenizer_ckpt or not Path(self.image_tokenizer_ckpt).exists():
            return None
        if self._tokenizer is None:
            from mmsuite.tokenizers.image import ImageTokenizer

            grid = next((m.grid[0] for m in self.net.modalities if m.grid is not None), None)
            if grid is None:
                return None
            tok = ImageTokenizer.from_checkpoint(self.image_tokenizer_ckpt)
            self._tokenizer = ImageTokenizer.from_checkpoint(
                self.image_tokenizer_ckpt, image_size=grid * tok.downsample
            )
        return self._tokenizer

    @staticmethod
    def _decode_frames(tok, ids: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Local image ids ``[B, h*w]`` -> uint8 frames ``[B, H, W, 3]`` (CPU)."""
        with torch.no_grad():
            return tok.decode(ids.reshape(-1, h, w).cpu())

    def _accumulate(self, key: str, values: torch.Tensor) -> None:
        """Add per-item values (every joint, frame, token, clip, ...) to the epoch mean ``key``: ratios are then
        ratios of means over the epoch, not means of per-batch ratios."""
        self.eval_means[_slot(key)].update(values.to(self.device))

    def on_validation_epoch_end(self) -> None:
        self._log_means("val")
        self._log_sample_grid()

    def on_test_epoch_end(self) -> None:
        self._log_means("test")

    def _log_means(self, prefix: str) -> None:
        """The epoch means over all ranks (every rank computes and logs them; a metric without values, e.g. the
        PSNR without an image tokenizer, is left out), the PSNR gains and the error ratios."""
        means = {}
        for key in self._eval_metric_names():
            metric = self.eval_means[_slot(key)]
            if metric.update_count == 0:  # updated in every batch or in none, on every rank alike
                continue
            value = float(metric.compute())
            metric.reset()
            if key == "loss" or not np.isnan(value):  # NaN: no rank had a value (MeanMetric drops NaN values)
                means[key] = value
        for key, value in list(means.items()):
            if key.endswith("/baseline_psnr_db"):
                task = key.removesuffix("/baseline_psnr_db")
                if f"{task}/psnr_db" in means:
                    means[f"{task}/psnr_gain_db"] = means[f"{task}/psnr_db"] - value
            if key.endswith("/baseline_error_px"):
                task = key.removesuffix("/baseline_error_px")
                if f"{task}/joint_error_px" in means and value > 0:
                    means[f"{task}/error_ratio"] = means[f"{task}/joint_error_px"] / value
        for key, value in means.items():
            self.log(f"{prefix}/{key}", value, prog_bar=key == "loss")

    def _mean_pose_tokens(self, batch_size: int, device) -> torch.Tensor:
        dm = self.trainer.datamodule if self._trainer is not None else None
        mean = getattr(dm, "mean_pose", None)
        if mean is None:
            raise RuntimeError("the mean_pose baseline needs a DataModule with a mean_pose (train-split mean joints)")
        xy = np.broadcast_to(np.asarray(mean, dtype=np.float32)[None], (batch_size, *np.shape(mean)))
        ones = np.ones(xy.shape[:2], dtype=bool)
        return torch.as_tensor(self.pose.encode(np.ascontiguousarray(xy), ones, ones)).to(device)

    # -- generation (generate.py) and sample grids ---------------------------------------------------------
    @torch.no_grad()
    def generate_chain(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[str], list[str]]:
        """From each row's ``generation.given`` modalities alone, generate ``generation.chain`` in order (default:
        pose -> next pose -> next frame) with MaskGIT or ROAR (``scheme``, ``steps``, ``temperature``).
        -> (tokens with the chain filled in, given, chain)."""
        from mmsuite.lightning_modules.fourm.generate import generate_chain

        g = self.generation
        given = list(g.given)
        known = torch.zeros_like(tokens, dtype=torch.bool)
        for name in given:
            _, off, length = self._modality(name)
            known[:, off : off + length] = True
        chain = list(g.chain)
        targets = []
        for name in chain:
            t = {"target": name}
            constrain = self.net.modalities[self.net.index(name)].constraint(self)
            if constrain is not None:
                t["constrain"] = constrain
            targets.append(t)
        out, _ = generate_chain(
            self.net,
            tokens.masked_fill(~known, 0),
            known,
            targets,
            steps=g.steps,
            scheme=g.scheme,
            temperature=g.temperature,
            generator=torch.Generator(device=tokens.device).manual_seed(self.seed),
        )
        return out, given, chain

    def _decoded_poses(self, out: torch.Tensor, tokens: torch.Tensor, chain: list[str]) -> dict:
        """``{pose modality in chain: (generated xy, generated visible, true xy, true visible)}`` (canvas px)."""
        poses = {}
        for name in ("coords", "coords_next"):
            if name in chain:
                _, off, length = self._modality(name)
                xy, vis, ok = self.pose.decode(out[:, off : off + length].cpu().numpy(), strict=False)
                txy, tvis, tok = self.pose.decode(tokens[:, off : off + length].cpu().numpy(), strict=False)
                poses[name] = (xy, vis & ok, txy, tvis & tok)
        return poses

    @torch.no_grad()
    def generate_samples(self, batch, out_dir, datamodule=None) -> list:
        """With captions (nano4m): caption -> image, image -> caption, caption -> sound, sound -> caption and the
        ``generation`` chain as PNG / WAV / JSON files (:func:`.media.write_samples`; needs the ``datamodule``: its
        tokenizers). Else :meth:`generate_chain` on a batch, then ``samples.json`` (generated and true joints,
        canvas pixels) and, with an image tokenizer, ``samples.png`` (:meth:`sample_grid`)."""
        import json
        from pathlib import Path

        tokens = batch["tokens"].to(self.device)
        if "caption" in self.names:
            from mmsuite.lightning_modules.fourm.media import write_samples

            if datamodule is None:
                raise ValueError("generate_samples: a model with captions needs the datamodule (its tokenizers)")
            return write_samples(self, datamodule, tokens, out_dir, tokens.shape[0])
        out, given, chain = self.generate_chain(tokens)
        out_dir = Path(out_dir)
        record = {"given": given, "chain": chain, "samples": []}
        poses = self._decoded_poses(out, tokens, chain)
        for i in range(tokens.shape[0]):
            record["samples"].append(
                {
                    name: {
                        "generated": np.nan_to_num(p[0][i], nan=-1).round(2).tolist(),
                        "true": p[2][i].round(2).tolist(),
                    }
                    for name, p in poses.items()
                }
            )
        written = [out_dir / "samples.json"]
        written[0].write_text(json.dumps(record, indent=1) + "\n")
        grid = self.sample_grid(out, tokens, poses)
        if grid is not None:
            from PIL import Image

            written.append(out_dir / "samples.png")
            Image.fromarray(grid).save(written[-1])
        return written

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and self.trainer.is_global_zero:  # the first val batch feeds the epoch's samples
            self._grid_tokens = batch["tokens"]

    def _log_sample_grid(self) -> None:
        """Every validation, from the first val samples, to the loggers (TensorBoard; file loggers get files): with
        captions (nano4m) caption -> image, caption -> sound and image -> caption (:mod:`.media`); else frame -> pose
        -> next pose -> next frame (``val/samples``)."""
        tokens, self._grid_tokens = self._grid_tokens, None
        if tokens is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        if "caption" in self.names:
            from mmsuite.lightning_modules.fourm.media import log_validation_samples

            log_validation_samples(self, tokens)
            return
        tokens = tokens[: self.generation.grid_samples]
        if self._image_tokenizer() is None:
            return
        from mmsuite.callbacks.samples import log_image_grid

        out, _, chain = self.generate_chain(tokens)
        grid = self.sample_grid(out, tokens, self._decoded_poses(out, tokens, chain))
        if grid is not None:
            image = torch.from_numpy(np.ascontiguousarray(grid)).permute(2, 0, 1)[None]
            log_image_grid(self.trainer, "val/samples", image, nrow=1, step=self.global_step)

    def sample_grid(self, out: torch.Tensor, tokens: torch.Tensor, poses: dict) -> np.ndarray | None:
        """uint8 ``[H, W, 3]``: rows of [given frame + generated pose | generated next frame + generated next
        pose | true next frame + true next pose], decoded with the image tokenizer, skeletons drawn in white
        (generated) / green (true). None without an image tokenizer."""
        from PIL import Image, ImageDraw

        from mmsuite.sources.toyworld import SKELETON

        tok = self._image_tokenizer()
        if tok is None:
            return None
        k, off, length = self._modality("tok_rgb")
        h, w = self.net.modalities[k].grid
        size = h * tok.downsample
        _, noff, _ = self._modality("tok_rgb_next")
        frames = [
            self._decode_frames(tok, tokens[:, off : off + length], h, w),
            self._decode_frames(tok, out[:, noff : noff + length], h, w),
            self._decode_frames(tok, tokens[:, noff : noff + length], h, w),
        ]
        scale = size / self.pose.canvas
        drawn = [(0, "coords", 0, "white"), (1, "coords_next", 0, "white"), (2, "coords_next", 2, "lime")]
        rows = []
        for i in range(tokens.shape[0]):
            tiles = []
            for col, name, which, colour in drawn:
                img = Image.fromarray(frames[col][i].numpy()).resize((4 * size, 4 * size), Image.NEAREST)
                if name in poses:
                    xy, vis = poses[name][which][i] * scale * 4, poses[name][which + 1][i]
                    d = ImageDraw.Draw(img)
                    for a, b in SKELETON:
                        if vis[a] and vis[b]:
                            d.line([tuple(xy[a]), tuple(xy[b])], fill=colour, width=2)
                tiles.append(np.asarray(img))
            rows.append(np.concatenate(tiles, axis=1))
        return np.concatenate(rows, axis=0)
