"""LightningModule of the foveated VLM: trains :class:`FoveatedVLM` on captions + next-frame latents and measures
what the fine passes buy on held-out clips.

Training: the coarse pass and ``net.fine_iterations`` fine passes in parallel over the frames; loss
``cap + lambda_recon * rec`` of the last pass plus ``lambda_coarse`` times the coarse pass's (:func:`fvlm_loss`);
``loss.coarse_only`` (``experiment=fvlm_coarse_only``) trains the coarse pass alone with the same budget.

Validation / test (every figure a mean over the whole split, reduced over ranks by torchmetrics):

* ``cap_<pass>`` (token-mean caption cross-entropy of every pass), ``cap_fine`` (the last), ``rec_<pass>``;
  ``cap_ratio = cap_coarse / cap_fine`` with a paired bootstrap 95 % interval over clips (``cap_ratio_lo/hi``),
  ``cap_improvement_pct``, ``rec_ratio``;
* controls: ``cap_shuffled`` (the last fine pass when every fine query comes from another clip of the batch) and
  ``cap_ratio_shuffled = cap_coarse / cap_shuffled`` with its interval; ``cap_autoregressive``: the true
  frame-by-frame loop (each frame's query from the same pass's state after the frame before, KV cache);
* glimpses: ``attn_entropy_<pass>`` (nats; uniform = ``log N``), ``attn_max_<pass>``, ``glimpse_corr_<fine pass>``
  (against the coarse glimpses of the same frames);
* greedy captions of the first ``eval.caption_batches`` batches, read back with the toy world's caption parser and
  scored per attribute (``caption/<pass>/<attribute>``; the small detail's colour and shape separately), beside the
  best constant guess on the same clips (``caption/majority/<attribute>``). The passes: ``coarse`` and the last fine
  pass as trained (queries from the previous pass), and ``autoregressive`` (the true loop);
* attention maps of the first ``eval.attention_clips`` clips over their frames, as images (``val/attention/<pass>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import CatMetric, MeanMetric, SumMetric

from mmsuite.lightning_modules.fvlm.metrics import attention_stats, bootstrap_ratio, glimpse_correlation
from mmsuite.lightning_modules.fvlm.model import (
    FoveatedVLM,
    FVLMLossSettings,
    FVLMSettings,
    fvlm_loss,
    pass_names,
    training_passes,
)
from mmsuite.nn.schedule import AdamWSettings, StepSchedule, adamw_warmup_cosine
from mmsuite.settings import as_dict, parse, setting
from mmsuite.sources import toyworld

ATTRIBUTES = ("color", "action", "background", "background_color", "detail_color", "detail_shape")
ATTRIBUTE_VALUES = {
    "color": toyworld.FIGURE_COLORS,
    "action": toyworld.ACTIONS,
    "background": toyworld.BACKGROUNDS,
    "background_color": tuple(toyworld.PALETTE),
    "detail_color": toyworld.DETAIL_COLORS,
    "detail_shape": toyworld.DETAIL_SHAPES,
}


@dataclass
class FVLMEvalSettings:
    shuffle_control: bool = True  # the shuffled-query control (batches of >= 2 clips)
    autoregressive: bool = True  # the caption loss of the true frame-by-frame loop
    caption_batches: int = setting(2, ge=0)  # batches whose greedy captions are generated and scored
    max_new_tokens: int = setting(64, ge=1)  # greedy captions stop at EOS or here
    attention_clips: int = setting(4, ge=0)  # clips whose attention maps are logged as images
    bootstrap: int = setting(1000, ge=10)  # resamples of the cap_ratio interval
    seed: int = setting(0, ge=0)  # of the bootstrap


@dataclass
class FVLMModuleSettings:
    """``model`` of ``model=fvlm`` (conf/model/fvlm.yaml states only what comes from elsewhere)."""

    net: FVLMSettings = setting(FVLMSettings())
    loss: FVLMLossSettings = setting(FVLMLossSettings())
    optim: AdamWSettings = setting(AdamWSettings(lr=1e-4, betas=[0.9, 0.95], weight_decay=0.01))
    schedule: Any = setting({}, schema=StepSchedule)  # = the schedule group (${schedule})
    eval: FVLMEvalSettings = setting(FVLMEvalSettings())


def score_captions(generated: list[str], truth: list[str]) -> dict[str, list[tuple[bool, str]]]:
    """Per attribute, ``(generated states the true value, true value)`` for every clip whose true caption states it."""
    out: dict[str, list[tuple[bool, str]]] = {a: [] for a in ATTRIBUTES}
    for gen, ref in zip(generated, truth):
        got, want = toyworld.read_caption(gen), toyworld.read_caption(ref)
        for a in ATTRIBUTES:
            if want[a] is not None:
                out[a].append((got[a] == want[a], want[a]))
    return out


def attention_overlay(
    frames: torch.Tensor, attention: torch.Tensor, grid: tuple[int, int], has_cls: bool
) -> torch.Tensor:
    """uint8 ``frames [T, S, S, 3]`` and glimpse weights ``[T, heads, N]`` -> uint8 ``[T, 3, S, S]``: the frame darkened
    where the glimpse does not look (weights averaged over heads, CLS dropped, scaled to each frame's maximum)."""
    a = attention.float().mean(dim=1)[:, int(has_cls) :]  # [T, h*w]
    a = a.view(len(a), 1, *grid)
    a = a / a.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    size = frames.shape[1:3]
    a = F.interpolate(a, size=size, mode="nearest")
    img = frames.permute(0, 3, 1, 2).float()
    red = torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1)
    out = img * (0.25 + 0.75 * a) + red * 0.35 * a
    return out.clamp(0, 255).to(torch.uint8)


class FVLMModule(L.LightningModule):
    Settings = FVLMModuleSettings

    def __init__(self, **settings):
        super().__init__()
        s = self.settings = parse(FVLMModuleSettings, settings, "model")
        self.save_hyperparameters(as_dict(s))
        self.net = FoveatedVLM(s.net)
        self.loss_cfg, self.eval_cfg = s.loss, s.eval
        self.passes = pass_names(s.net.fine_iterations)
        self.text_tokenizer = None  # from the data module (setup / attach_data): EOS id and decoding
        self.caption_ids: torch.Tensor | None = None  # bool [V]: what greedy captions may write (attach_data)
        self.grid, self.has_cls = None, True
        sums = {f"nll_{p}": SumMetric() for p in self.passes}
        sums |= {"tokens": SumMetric(), "nll_autoregressive": SumMetric()}
        means = {"loss": MeanMetric()}
        for p in self.passes:
            means |= {f"rec_{p}": MeanMetric(), f"attn_entropy_{p}": MeanMetric(), f"attn_max_{p}": MeanMetric()}
            if p != "coarse":
                means[f"glimpse_corr_{p}"] = MeanMetric()
        self.eval_sums = torch.nn.ModuleDict(sums)
        self.eval_means = torch.nn.ModuleDict(means)
        # per clip, for the bootstrap: summed caption NLL of the coarse / last / shuffled-control pass, and tokens
        self.eval_clips = torch.nn.ModuleDict({k: CatMetric() for k in ("coarse", "fine", "shuffled", "tokens")})
        captions = {}
        for p in self.caption_passes:
            captions |= {f"{p},{a}": MeanMetric() for a in ATTRIBUTES}
        self.caption_acc = torch.nn.ModuleDict(captions)
        self.caption_truth = torch.nn.ModuleDict({a: CatMetric() for a in ATTRIBUTES})  # value indices

    @property
    def caption_passes(self) -> list[str]:
        if self.loss_cfg.coarse_only or len(self.passes) == 1:
            return ["coarse"]
        return ["coarse", self.passes[-1], "autoregressive"]

    # -- the data's side ------------------------------------------------------------------------------------
    def attach_data(self, datamodule) -> None:
        """The text tokenizer (EOS id, decoding) and the feature grid of a set-up data module."""
        self.text_tokenizer = text = datamodule.text_tokenizer
        self.grid, self.has_cls = datamodule.grid, datamodule.has_cls
        lm_vocab = self.net.lm.get_input_embeddings().num_embeddings
        # greedy captions pick among the ids the text tokenizer can write, and EOS (the LM may rank an unused id first)
        self.caption_ids = torch.zeros(lm_vocab, dtype=torch.bool)
        self.caption_ids[text.range.start : text.range.start + text.vocab_size] = True
        self.caption_ids[text.eos_id] = True
        if lm_vocab < datamodule.token_space.vocab_size:
            raise ValueError(
                f"the LM reads {lm_vocab} ids but the token space has {datamodule.token_space.vocab_size}: "
                "set model.net.lm.vocab_size to the token space's size"
            )
        if datamodule.feature_shape[1] != self.settings.net.feature_dim:
            raise ValueError(
                f"the data's patch features are {datamodule.feature_shape[1]} wide, model.net.feature_dim is "
                f"{self.settings.net.feature_dim}"
            )
        channels = datamodule.latent_shape[0]
        if self.net.film is not None and channels != self.settings.net.latent_channels:
            raise ValueError(
                f"the data's latents have {channels} channels, model.net.latent_channels is "
                f"{self.settings.net.latent_channels}"
            )

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "text_tokenizer", None) is not None:
            self.attach_data(dm)

    # -- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        fine, scored = training_passes(self.loss_cfg, self.settings.net.fine_iterations)
        passes = self.net(
            batch["features"],
            batch["text_ids"],
            batch["text_mask"],
            batch["latents"],
            fine_iterations=fine,
            scored=scored,
        )
        loss, parts = fvlm_loss(passes, self.loss_cfg)
        b = len(batch["text_ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        for key, value in parts.items():
            self.log(f"train/{key}", value, batch_size=b)
        return loss

    def throughput_counts(self, batch) -> tuple[int, torch.Tensor]:
        """Clips and LM positions of a training batch (mmsuite.callbacks.perf): every pass that runs reads the mode
        token and one glimpse per frame; the scored passes also read ``<sep>`` and the caption (padding left out)."""
        b, n_frames = batch["features"].shape[:2]
        fine, scored = training_passes(self.loss_cfg, self.settings.net.fine_iterations)
        return b, b * (1 + n_frames) * (fine + 1) + len(scored) * batch["text_mask"].sum()

    # -- evaluation -------------------------------------------------------------------------------------------
    def _eval_step(self, batch, batch_idx: int, prefix: str) -> None:
        f, ids, mask, lat = batch["features"], batch["text_ids"], batch["text_mask"], batch["latents"]
        b = len(ids)
        passes = self.net(f, ids, mask, lat)
        loss, _ = fvlm_loss(passes, self.loss_cfg)
        self.eval_means["loss"].update(loss, b)
        coarse, last = passes[0], passes[-1]
        self.eval_sums["tokens"].update(coarse.caption_tokens.sum())
        for p in passes:
            self.eval_sums[f"nll_{p.name}"].update(p.caption_nll.sum())
            if p.rec is not None:
                self.eval_means[f"rec_{p.name}"].update(p.rec.mean(), b)
            entropy, peak = attention_stats(p.attention)
            self.eval_means[f"attn_entropy_{p.name}"].update(entropy, b)
            self.eval_means[f"attn_max_{p.name}"].update(peak, b)
            if p is not coarse:
                self.eval_means[f"glimpse_corr_{p.name}"].update(glimpse_correlation(coarse.glimpses, p.glimpses), b)
        shuffled = torch.full_like(coarse.caption_nll, float("nan"))
        if self.eval_cfg.shuffle_control and len(passes) > 1 and b >= 2:
            k = len(passes) - 1
            shuffled = self.net(f, ids, mask, fine_iterations=k, scored={k}, shuffle_queries=True)[-1].caption_nll
        for key, value in (
            ("coarse", coarse.caption_nll),
            ("fine", last.caption_nll),
            ("shuffled", shuffled),
            ("tokens", coarse.caption_tokens.float()),
        ):
            self.eval_clips[key].update(value)
        if self.eval_cfg.autoregressive and len(passes) > 1:
            ar = self.net.stream_caption_nll(f, ids, mask, query_source="same_pass")
            self.eval_sums["nll_autoregressive"].update(ar.caption_nll.sum())
        if batch_idx < self.eval_cfg.caption_batches and self.text_tokenizer is not None:
            self._score_captions(batch)
        if batch_idx == 0 and self.eval_cfg.attention_clips and "frames" in batch and self.grid is not None:
            n = min(self.eval_cfg.attention_clips, b)
            for p in (coarse, last) if last is not coarse else (coarse,):
                rows = [attention_overlay(batch["frames"][i].cpu(), p.attention[i].cpu(), self.grid, self.has_cls)
                        for i in range(n)]  # fmt: skip
                self._log_images(f"{prefix}/attention/{p.name}", torch.cat(rows), nrow=rows[0].shape[0])

    def generate_captions(self, features: torch.Tensor) -> dict[str, tuple[list[str], Any]]:
        """Greedy captions of every caption pass: ``{pass: (texts, attention [B, T, heads, N])}``."""
        eos, n = self.text_tokenizer.eos_id, self.eval_cfg.max_new_tokens
        kw = {"eos_id": eos, "max_new_tokens": n, "allowed": self.caption_ids}
        out = {}
        k = 0 if "autoregressive" not in self.caption_passes else len(self.passes) - 1
        trained = self.net.generate(features, fine_iterations=k, query_source="previous_pass", **kw)
        for i, name in enumerate(trained.names):
            if name in self.caption_passes:
                out[name] = (self.text_tokenizer.decode_batch(trained.tokens[i].tolist(), skip_specials=True),
                             trained.attention[i])  # fmt: skip
        if "autoregressive" in self.caption_passes:
            ar = self.net.generate(features, query_source="same_pass", **kw)
            out["autoregressive"] = (self.text_tokenizer.decode_batch(ar.tokens[0].tolist(), skip_specials=True),
                                     ar.attention[0])  # fmt: skip
        return out

    def _score_captions(self, batch) -> None:
        for name, (texts, _) in self.generate_captions(batch["features"]).items():
            for attribute, rows in score_captions(texts, batch["caption"]).items():
                for ok, _value in rows:
                    self.caption_acc[f"{name},{attribute}"].update(torch.tensor(float(ok)))
        truth = score_captions(batch["caption"], batch["caption"])
        for attribute, rows in truth.items():
            values = ATTRIBUTE_VALUES[attribute]
            idx = [values.index(v) for _, v in rows if v in values]
            if idx:
                self.caption_truth[attribute].update(torch.tensor(idx, dtype=torch.float32, device=self.device))

    def _log_images(self, tag: str, images: torch.Tensor, nrow: int) -> None:
        from mmsuite.callbacks.samples import log_image_grid

        if self._trainer is not None:
            log_image_grid(self.trainer, tag, images, nrow=nrow, step=self.global_step)

    def _log_eval(self, prefix: str) -> None:
        tokens = self.eval_sums["tokens"].compute().clamp_min(1)
        out = {}
        for p in self.passes:
            out[f"cap_{p}"] = self.eval_sums[f"nll_{p}"].compute() / tokens
        out["cap_fine"] = out[f"cap_{self.passes[-1]}"]
        if self.eval_cfg.autoregressive and len(self.passes) > 1:
            out["cap_autoregressive"] = self.eval_sums["nll_autoregressive"].compute() / tokens
        for key, metric in self.eval_means.items():
            if metric.update_called:
                out[key] = metric.compute()
        if len(self.passes) > 1:
            clips = {k: m.compute().flatten() for k, m in self.eval_clips.items()}
            boot = {"n_boot": self.eval_cfg.bootstrap, "seed": self.eval_cfg.seed}
            ratio, lo, hi = bootstrap_ratio(clips["coarse"], clips["fine"], **boot)
            out |= {
                "cap_ratio": ratio,
                "cap_ratio_lo": lo,
                "cap_ratio_hi": hi,
                "cap_improvement_pct": (ratio - 1) * 100,
            }
            if f"rec_{self.passes[-1]}" in out:
                out["rec_ratio"] = out["rec_coarse"] / out[f"rec_{self.passes[-1]}"]
            have = ~torch.isnan(clips["shuffled"])
            if bool(have.any()):
                out["cap_shuffled"] = clips["shuffled"][have].sum() / clips["tokens"][have].sum()
                ratio, lo, hi = bootstrap_ratio(clips["coarse"][have], clips["shuffled"][have], **boot)
                out |= {"cap_ratio_shuffled": ratio, "cap_ratio_shuffled_lo": lo, "cap_ratio_shuffled_hi": hi}
        for key, metric in self.caption_acc.items():
            if metric.update_called:
                name, attribute = key.split(",")
                out[f"caption/{name}/{attribute}"] = metric.compute()
        for attribute, metric in self.caption_truth.items():
            if metric.update_called:
                idx = metric.compute().flatten().long()
                out[f"caption/majority/{attribute}"] = torch.bincount(idx).max().float() / len(idx)
        for key, value in out.items():
            self.log(f"{prefix}/{key}", torch.as_tensor(value, dtype=torch.float32, device=self.device))
        for group in (self.eval_sums, self.eval_means, self.eval_clips, self.caption_acc, self.caption_truth):
            for metric in group.values():
                metric.reset()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # -- generate.py ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_samples(self, batch, out_dir) -> list:
        """Greedy captions of each clip (every caption pass), scored against the true caption, to ``captions.json``;
        per clip an image of its frames over the attention maps of each pass (``clip<i>_attention.png``)."""
        from PIL import Image

        from mmsuite.callbacks.samples import make_grid

        if self.text_tokenizer is None:
            raise RuntimeError("FVLMModule.generate_samples needs attach_data(datamodule) first")
        out_dir = Path(out_dir)
        captions = self.generate_captions(batch["features"])
        records, written = [], []
        for i, truth in enumerate(batch["caption"][: len(batch["features"])]):  # lists are not cut to n_samples
            rec = {"clip": batch["attributes"][i].get("clip", batch["attributes"][i].get("video")), "truth": truth}
            for name, (texts, _) in captions.items():
                scores = score_captions([texts[i]], [truth])
                rec[name] = {"caption": texts[i], "correct": {a: rows[0][0] for a, rows in scores.items() if rows}}
            records.append(rec)
            if "frames" in batch and self.grid is not None:
                frames = batch["frames"][i].cpu()
                rows = [frames.permute(0, 3, 1, 2)]
                rows += [
                    attention_overlay(frames, att[i].cpu(), self.grid, self.has_cls) for _, att in captions.values()
                ]
                grid = make_grid(torch.cat(rows), nrow=frames.shape[0])
                path = out_dir / f"clip{i}_attention.png"
                Image.fromarray(np.ascontiguousarray(grid.permute(1, 2, 0).numpy())).save(path)
                written.append(path)
        path = out_dir / "captions.json"
        path.write_text(json.dumps({"passes": list(captions), "clips": records}, indent=2) + "\n")
        return [path, *written]

    # -- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        s = self.settings
        return adamw_warmup_cosine(self.parameters(), s.optim, s.schedule, self.trainer.max_steps, "FVLMModule")
