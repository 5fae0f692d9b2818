"""Lightning module that trains :class:`~mmsuite.tokenizers.image.ImageAutoencoder` (FSQ or continuous).

Batches are dicts with ``"image"``: uint8 ``[B, 3, H, W]``. Checkpoint keys of the network are ``net.*`` and
the hyper-parameters are plain python, so :meth:`ImageTokenizer.from_checkpoint` can rebuild the tokenizer
with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from mmsuite.callbacks.samples import log_image_grid
from mmsuite.nn.metrics import CodebookUsage, psnr
from mmsuite.nn.schedule import AdamWSettings, StepSchedule, adamw_warmup_cosine
from mmsuite.settings import as_dict, fail, parse, setting
from mmsuite.tokenizers.image import AutoencoderSettings


@dataclass
class ImageLossSettings:
    """Loss weights; PSNR is an MSE figure: MSE alone gave +0.8 dB over L1 at 1000 steps (21.81 vs 21.00)."""

    l1: float = setting(0.0, ge=0.0)
    mse: float = setting(1.0, ge=0.0)
    perceptual: float = setting(0.0, ge=0.0)  # not implemented: must stay 0

    def check(self, key: str) -> None:
        if self.l1 + self.mse <= 0:
            fail(key, f"needs l1 + mse > 0, got l1={self.l1}, mse={self.mse}")
        if self.perceptual > 0:
            raise NotImplementedError(
                f"{key}.perceptual > 0: a perceptual loss needs a local pretrained feature network "
                "(e.g. VGG/LPIPS weights on disk), which is not implemented yet; set it to 0"
            )


@dataclass
class ImageTokenizerSettings:
    """``model`` of ``model=image_tokenizer`` (conf/model/image_tokenizer.yaml states only what differs)."""

    net: AutoencoderSettings = setting(AutoencoderSettings())
    optim: AdamWSettings = setting(AdamWSettings(lr=0.002, betas=[0.9, 0.99], weight_decay=0.0))
    schedule: Any = setting({}, schema=StepSchedule)  # = the schedule group (${schedule})
    loss: ImageLossSettings = setting(ImageLossSettings())
    n_sample_images: int = setting(8, ge=0)  # originals | reconstructions logged at each validation
    image_size: int = setting(64, ge=1)  # the tokenizer's default input size (ImageTokenizer.from_checkpoint)
    # training only: the decoder reads latents + N(0, latent_noise²), so a small latent error (a world model's
    # prediction) decodes to a small pixel error; continuous bottleneck only (FSQ rounds noise away)
    latent_noise: float = setting(0.0, ge=0.0)

    def check(self, key: str) -> None:
        if self.latent_noise > 0 and self.net.levels is not None:
            fail(f"{key}.latent_noise", f"needs the continuous bottleneck (net.levels: null), got {self.latent_noise}")


class ImageTokenizerModule(L.LightningModule):
    Settings = ImageTokenizerSettings

    def __init__(self, **settings):
        super().__init__()
        s = self.settings = parse(ImageTokenizerSettings, settings, "model")
        self.save_hyperparameters(as_dict(s))
        self.net = s.net.build()
        self.image_size = s.image_size
        self.w_l1, self.w_mse = s.loss.l1, s.loss.mse
        self.n_sample_images = s.n_sample_images
        self.latent_noise = s.latent_noise
        # evaluation metrics (validation and test in turn): means over images, and code usage with a quantiser
        self.eval_loss = MeanMetric()
        self.eval_psnr = MeanMetric()  # of per-image PSNR
        k = self.net.codebook_size
        self.eval_codes = CodebookUsage(1, k) if k else None

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _images(batch) -> torch.Tensor:
        x = batch["image"]
        if x.dtype == torch.uint8:
            return x.float().div(127.5).sub(1.0)
        if x.is_floating_point():  # float images in [0, 1]
            return x.float().mul(2.0).sub(1.0)
        raise TypeError(f"batch['image'] must be uint8 [B, 3, H, W] (or float in [0, 1]), got {x.dtype}")

    def _losses(self, recon: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        l1 = (recon - x).abs().mean()
        mse = (recon - x).pow(2).mean()
        return {"loss": self.w_l1 * l1 + self.w_mse * mse, "l1": l1, "mse": mse}

    # -- training -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x = self._images(batch)
        if self.latent_noise > 0:
            z, _ = self.net.encode(x)
            recon = self.net.decode(z + self.latent_noise * torch.randn_like(z))
        else:
            recon, _ = self.net(x)
        out = self._losses(recon.float(), x)
        bs = x.shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        self.log("train/l1", out["l1"], batch_size=bs)
        self.log("train/mse", out["mse"], batch_size=bs)
        return out["loss"]

    def throughput_counts(self, batch) -> tuple[int, None]:
        """Images of a training batch, and no tokens (mmsuite.callbacks.perf)."""
        return int(batch["image"].shape[0]), None

    # -- evaluation ---------------------------------------------------------------------------------
    def _eval_step(self, batch, batch_idx: int, prefix: str, dataloader_idx: int = 0):
        x = self._images(batch)
        recon, idx = self.net(x)
        recon = recon.float()
        out = self._losses(recon, x)
        bs = x.shape[0]
        recon01 = (recon.clamp(-1, 1) + 1) / 2
        x01 = (x + 1) / 2
        self.eval_loss.update(out["loss"], weight=bs)
        self.eval_psnr.update(psnr(recon01, x01))
        log = dict(on_step=False, on_epoch=True, add_dataloader_idx=False)
        self.log(f"{prefix}/loss", self.eval_loss, **log)
        self.log(f"{prefix}/psnr", self.eval_psnr, prog_bar=True, **log)
        if idx is not None:
            self.eval_codes.update(idx.flatten(1)[:, None])
        if (
            batch_idx == 0
            and dataloader_idx == 0
            and self.n_sample_images > 0
            and self.trainer.is_global_zero
            and not self.trainer.sanity_checking
        ):
            n = min(self.n_sample_images, bs)
            to_u8 = lambda t: (t[:n] * 255).round().clamp(0, 255).to(torch.uint8)
            grid = torch.cat([to_u8(x01), to_u8(recon01)])
            log_image_grid(self.trainer, f"{prefix}/reconstructions", grid, nrow=n, step=self.global_step)
        return out["loss"]

    def _log_code_stats(self, prefix: str) -> None:
        """Codebook usage and perplexity over the epoch, all ranks merged (every rank computes and logs them)."""
        if self.eval_codes is None or self.eval_codes.update_count == 0:
            return
        stats = self.eval_codes.compute()
        self.eval_codes.reset()
        self.log(f"{prefix}/codebook_usage", float(stats["usage"]))  # one codebook: torchmetrics squeezes it to 0-d
        self.log(f"{prefix}/perplexity", float(stats["perplexity"]))

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self._eval_step(batch, batch_idx, "val", dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_code_stats("val")

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self._eval_step(batch, batch_idx, "test", dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_code_stats("test")

    # -- generation (generate.py) ---------------------------------------------------------------------
    @torch.no_grad()
    def generate_samples(self, batch, out_dir) -> list:
        """Write originals (top row) over reconstructions (bottom row) as one PNG; returns the paths."""
        from pathlib import Path

        from PIL import Image

        x = self._images(batch)
        recon, _ = self.net(x)
        to_u8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        top, bottom = (torch.cat(list(to_u8(t)), dim=2) for t in (x, recon.float()))
        grid = torch.cat([top, bottom], dim=1).permute(1, 2, 0).cpu().numpy()
        path = Path(out_dir) / "reconstructions.png"
        Image.fromarray(grid).save(path)
        return [path]

    # -- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self):
        s = self.settings
        return adamw_warmup_cosine(
            self.net.parameters(), s.optim, s.schedule, self.trainer.max_steps, "ImageTokenizerModule"
        )
