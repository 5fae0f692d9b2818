"""Lightning module that trains an EnCodec audio tokenizer (the ``encodec`` package's SEANet encoder and
decoder and residual vector quantiser) from scratch.

Batches are dicts with ``"audio"``: float ``[B, 1, S]`` in [-1, 1] at the codec's sample rate. The network is
``self.net``, an ``encodec.EncodecModel`` built by :meth:`AudioTokenizer.from_config` from the tokenizer
config (``codec``), so checkpoint keys are ``net.*`` and
:func:`mmsuite.tokenizers.audio.audio_tokenizer_from_checkpoint` rebuilds the tokenizer with
``torch.load(..., weights_only=True)``. The codebooks and their EMA statistics (``embed``,
``embed_avg``, ``cluster_size``, ``inited``) are buffers of ``net``, so they are saved and restored with it.

Losses: waveform L1 + multi-scale STFT (linear + log magnitudes) + commitment. The residual quantisation loop is
written out here, on encodec's own codebook layers (k-means init on the first training batch, EMA updates),
with three fixes to encodec 0.1.1:

* commitment for every codebook: encodec subtracts the straight-through output from the residual, which
  cuts the gradient of every residual after the first, so only codebook 0's commitment reached the encoder
  (facebookresearch/encodec#25); here each layer's output is detached before the subtraction and the whole
  stack gets one straight-through estimator;
* dead codes are really replaced: encodec's ``expire_codes_`` writes new vectors into ``embed`` and the EMA
  step right after overwrites them from ``embed_avg / cluster_size`` (a no-op, and unused codes drift off to
  huge values). Here a code whose EMA count falls below ``dead_code_threshold`` gets a random vector of the
  current batch in ``embed`` *and* consistent ``embed_avg`` / ``cluster_size``; encodec's own is switched off;
* evaluation never initialises codebooks: encodec's codebook ``forward`` runs k-means on whatever it sees
  first, in eval mode too (e.g. Lightning's sanity validation); evaluation here uses ``encode``/``decode``.

and one to its init: :func:`variance_preserving_init_` (``init_output_gain``), without which a fresh encoder maps
every clip to nearly the same vector and codebook 0 collapses to a single code.

The adversarial loss (encodec's multi-scale STFT discriminator) is not implemented; ``loss.adversarial > 0``
stops with an error rather than being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.audio import ScaleInvariantSignalNoiseRatio

from mmsuite.callbacks.samples import log_audio
from mmsuite.nn.audio import MelDistance, MultiScaleSTFTLoss
from mmsuite.nn.metrics import CodebookUsage
from mmsuite.nn.schedule import AdamWSettings, StepSchedule, adamw_warmup_cosine
from mmsuite.settings import as_dict, fail, parse, setting
from mmsuite.sources.wav import write_wav
from mmsuite.tokenizers.audio import AudioTokenizer, import_encodec


@dataclass
class AudioLossSettings:
    """Loss weights. Waveform L1 is off: toy clips are mostly exact digital silence, and L1's median pull made the
    decoder output silence (energy 1e-6 of the input, SI-SNR -36 dB after 700 steps; experiments/audio_tokenizer)."""

    waveform: float = setting(0.0, ge=0.0)  # L1 between waveforms
    waveform_mse: float = setting(10.0, ge=0.0)  # MSE between waveforms: the correlated part, what SI-SNR measures
    stft: float = setting(0.05, ge=0.0)  # multi-scale STFT loss; at weight 1 it too drove the output to silence
    commitment: float = setting(1.0, ge=0.0)  # mean over codebooks of |residual - its code vector|^2
    adversarial: float = setting(0.0, ge=0.0)  # not implemented: must stay 0

    def check(self, key: str) -> None:
        if self.waveform + self.waveform_mse + self.stft <= 0:
            fail(key, f"needs waveform + waveform_mse + stft > 0, got {self}")
        if self.adversarial > 0:
            raise NotImplementedError(
                f"{key}.adversarial > 0: the adversarial loss (a multi-scale STFT discriminator, encodec.msstftd) is "
                "not implemented yet; set it to 0"
            )


@dataclass
class STFTSettings:
    """The multi-scale STFT loss (hann windows, hop n_fft/4)."""

    n_ffts: list[int] = setting([2048, 1024, 512, 256, 128], ge=2)
    n_mels: int | None = setting(None, ge=1)  # null: linear-frequency bins; a number: project on that many mels
    linear_weight: float = setting(1.0, ge=0.0)  # L1 between magnitudes
    log_weight: float = setting(1.0, ge=0.0)  # L1 between log magnitudes
    # log(|X| + eps): toy sounds have exact digital silence between events, and a small floor makes faint output
    # there cost more than missing the events themselves
    eps: float = setting(0.03, gt=0.0)

    def check(self, key: str) -> None:
        if not self.n_ffts:
            fail(f"{key}.n_ffts", "needs at least one FFT size")


@dataclass
class AudioTokenizerSettings:
    """``model`` of ``model=audio_tokenizer`` (conf/model/audio_tokenizer.yaml states only what differs)."""

    codec: Any = (
        setting()
    )  # the architecture, bandwidth and token ranges: the tokenizer group (AudioTokenizer checks it)
    optim: AdamWSettings = setting(AdamWSettings(lr=0.001, betas=[0.8, 0.99], weight_decay=0.0))
    schedule: Any = setting({}, schema=StepSchedule)  # = the schedule group (${schedule})
    loss: AudioLossSettings = setting(AudioLossSettings())
    stft: STFTSettings = setting(STFTSettings())
    dead_code_threshold: float = setting(0.25, ge=0.0)  # a code whose EMA count (vectors per batch) drops below this
    n_sample_audio: int = setting(4, ge=0)  # decoded clips sent to the logger at each validation
    # convolutions re-initialised N(0, 1/fan_in), zero bias; decoder output conv x this. null: encodec's (PyTorch's)
    # default init, under which the encoder output barely depends on the input and codebook 0 collapses to one code
    init_output_gain: float | None = setting(0.1, ge=0.0)

    def check(self, key: str) -> None:
        if not isinstance(self.codec, dict):
            fail(f"{key}.codec", f"must be a tokenizer config (conf/tokenizer/encodec_*.yaml), got {self.codec!r}")
        if "threshold_ema_dead_code" in self.codec:
            fail(
                f"{key}.codec.threshold_ema_dead_code",
                "is not used: set the dead-code threshold with model.dead_code_threshold (encodec's own dead-code "
                "replacement has no effect; see the module docstring)",
            )


_EVAL_LOSSES = ("loss", "l1", "mse", "stft", "commitment")


class AudioTokenizerModule(L.LightningModule):
    Settings = AudioTokenizerSettings

    def __init__(self, **settings):
        super().__init__()
        s = self.settings = parse(AudioTokenizerSettings, settings, "model")
        self.save_hyperparameters(as_dict(s))
        codec = s.codec
        self.w_wave, self.w_mse = s.loss.waveform, s.loss.waveform_mse
        self.w_stft, self.w_commit = s.loss.stft, s.loss.commitment

        tokenizer = AudioTokenizer.from_config({**codec, "threshold_ema_dead_code": 0})
        self.net = tokenizer.model.train()  # the tokenizer wrapper hands it over in eval mode
        if s.init_output_gain is not None and not codec.get("path"):
            variance_preserving_init_(self.net, s.init_output_gain)
        self.n_q, self.bins, self.bandwidth = tokenizer.n_q, tokenizer.bins, tokenizer.bandwidth
        self.sample_rate = tokenizer.sample_rate
        self.dead_code_threshold = s.dead_code_threshold
        self.stft_loss = MultiScaleSTFTLoss(self.sample_rate, **as_dict(s.stft))
        self.mel_distance = MelDistance(self.sample_rate)
        self.n_sample_audio = s.n_sample_audio
        # evaluation metrics (validation and test in turn): batch means weighted by batch size, per-clip SI-SNR and
        # mel distance averaged over clips, the usage of every codebook
        self.eval_losses = torch.nn.ModuleDict({key: MeanMetric() for key in _EVAL_LOSSES})
        self.eval_si_snr = ScaleInvariantSignalNoiseRatio()
        self.eval_mel = MeanMetric()
        self.eval_codes = CodebookUsage(self.n_q, self.bins)

    # -- the network ----------------------------------------------------------------------------------
    def quantize(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual VQ of encoder output ``[B, D, T]`` -> (quantized ``[B, D, T]``, codes ``[B, n_q, T]``,
        commitment loss of each codebook ``[n_q]``). Training updates the codebooks (see the module docstring)."""
        residual, total = emb, torch.zeros_like(emb)
        codes, commit = [], []
        for layer in self.net.quantizer.vq.layers[: self.n_q]:
            if self.training:
                q, idx, _ = layer(residual)  # k-means init on the first batch, EMA update of the codebook
                q = q.detach()
                revive_dead_codes(layer._codebook, residual.detach().transpose(1, 2), self.dead_code_threshold)
            else:
                idx = layer.encode(residual)
                q = layer.decode(idx)
            commit.append(F.mse_loss(residual, q))
            residual = residual - q
            total = total + q
            codes.append(idx)
        if self.training:
            total = emb + (total - emb).detach()  # straight-through over the whole residual stack
        return total, torch.stack(codes, dim=1), torch.stack(commit)

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, 1, S]`` -> (reconstruction ``[B, 1, S]``, codes ``[B, n_q, T]``, commitment loss)."""
        emb = self.net.encoder(audio)
        with torch.autocast(audio.device.type, enabled=False):  # distances and EMA statistics in fp32
            quantized, codes, commit = self.quantize(emb.float())
        recon = self.net.decoder(quantized)[..., : audio.shape[-1]]
        return recon, codes, commit.mean()

    @staticmethod
    def _audio(batch) -> torch.Tensor:
        x = batch["audio"]
        if not x.is_floating_point() or x.ndim != 3:
            raise TypeError(f"batch['audio'] must be float [B, C, S], got {x.dtype} {tuple(x.shape)}")
        return x.float()

    def _losses(self, recon: torch.Tensor, x: torch.Tensor, commit: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            recon = recon.float()
            wave = (recon - x).abs().mean()
            mse = (recon - x).pow(2).mean()
            spec = self.stft_loss(recon, x)
            loss = self.w_wave * wave + self.w_mse * mse + self.w_stft * spec + self.w_commit * commit
        return {"loss": loss, "l1": wave, "mse": mse, "stft": spec, "commitment": commit}

    # -- training -------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x = self._audio(batch)
        recon, _, commit = self(x)
        out = self._losses(recon, x, commit)
        bs = x.shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        for key in ("l1", "mse", "stft", "commitment"):
            self.log(f"train/{key}", out[key], batch_size=bs)
        return out["loss"]

    def throughput_counts(self, batch) -> tuple[int, None]:
        """Clips of a training batch, and no tokens (mmsuite.callbacks.perf)."""
        return int(batch["audio"].shape[0]), None

    # -- evaluation -----------------------------------------------------------------------------------
    def _eval_step(self, batch, batch_idx: int, prefix: str, dataloader_idx: int = 0):
        x = self._audio(batch)
        recon, codes, commit = self(x)
        recon = recon.float()
        out = self._losses(recon, x, commit)
        bs = x.shape[0]
        log = dict(on_step=False, on_epoch=True, add_dataloader_idx=False)
        for key, metric in self.eval_losses.items():
            metric.update(out[key], weight=bs)
            self.log(f"{prefix}/{key}", metric, **log)
        self.eval_si_snr.update(recon.double(), x.double())  # in float64, so long clips lose no precision
        self.log(f"{prefix}/si_snr", self.eval_si_snr, prog_bar=True, **log)
        self.eval_mel.update(self.mel_distance(recon, x))
        self.log(f"{prefix}/mel_distance", self.eval_mel, **log)
        self.eval_codes.update(codes)
        if (
            batch_idx == 0
            and dataloader_idx == 0
            and self.n_sample_audio > 0
            and self.trainer.is_global_zero
            and not self.trainer.sanity_checking
        ):
            n = min(self.n_sample_audio, bs)
            step = self.global_step
            log_audio(self.trainer, f"{prefix}/decoded", recon[:n, 0], self.sample_rate, step=step)
            log_audio(self.trainer, f"{prefix}/original", x[:n, 0], self.sample_rate, step=step)
        return out["loss"]

    def _log_code_stats(self, prefix: str) -> None:
        """Each codebook's usage over the epoch, all ranks merged (every rank computes and logs it)."""
        if self.eval_codes.update_count == 0:
            return
        usage = self.eval_codes.compute()["usage"].reshape(-1)  # torchmetrics squeezes a single codebook to 0-d
        self.eval_codes.reset()
        self.log(f"{prefix}/codebook_usage_min", float(usage.min()))
        for k, u in enumerate(usage.tolist()):
            self.log(f"{prefix}/codebook_usage_q{k}", u)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self._eval_step(batch, batch_idx, "val", dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_code_stats("val")

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self._eval_step(batch, batch_idx, "test", dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_code_stats("test")

    # -- generation (generate.py) -----------------------------------------------------------------------
    @torch.no_grad()
    def generate_samples(self, batch, out_dir) -> list:
        """Write each clip and its decoded version as 16-bit WAVs (plus captions.txt); returns the paths."""
        x = self._audio(batch)
        recon, _, _ = self(x)
        out_dir = Path(out_dir)
        written = []
        for i in range(x.shape[0]):
            for name, wav in (("original", x[i]), ("decoded", recon[i].float().clamp(-1, 1))):
                written.append(write_wav(out_dir / f"{i:02d}_{name}.wav", wav.cpu().numpy(), self.sample_rate))
        captions = batch.get("caption")
        if captions:
            path = out_dir / "captions.txt"
            path.write_text("".join(f"{i:02d} {c}\n" for i, c in enumerate(captions[: x.shape[0]])))
            written.append(path)
        return written

    # -- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        s = self.settings
        return adamw_warmup_cosine(
            self.net.parameters(), s.optim, s.schedule, self.trainer.max_steps, "AudioTokenizerModule"
        )


@torch.no_grad()
def variance_preserving_init_(net, output_gain: float = 0.1) -> None:
    """Re-initialise every convolution of an EnCodec model with weights ``N(0, 1/fan_in)`` and zero biases, and
    scale the decoder's last convolution by ``output_gain`` (the first reconstructions are quiet, not loud noise).

    With PyTorch's default init each convolution shrinks the signal's variance about threefold while its bias
    adds a constant, so a fresh SEANet encoder maps every toy clip to nearly the same vector (measured: frame to
    frame std ~3 % of the mean magnitude); k-means then puts it all in one code of codebook 0, the codes carry
    no information and training sits at "output silence" (SI-SNR around -75 dB after 100 steps). Here the
    signal keeps its scale through the encoder. Weight-normed convolutions get ``weight_v`` and a matching
    ``weight_g``.
    """
    is_conv = lambda m: isinstance(m, torch.nn.Conv1d | torch.nn.ConvTranspose1d)  # noqa: E731
    last = [m for m in net.decoder.modules() if is_conv(m)][-1]  # the decoder's output convolution
    for conv in filter(is_conv, net.modules()):
        v = conv.weight_v if hasattr(conv, "weight_v") else conv.weight
        if isinstance(conv, torch.nn.ConvTranspose1d):  # [in, out, k]: each output sees in * k / stride weights
            fan_in = v.shape[0] * v.shape[2] / conv.stride[0]
        else:  # [out, in, k]
            fan_in = v.shape[1] * v.shape[2]
        w = torch.randn_like(v) / fan_in**0.5
        if conv is last:
            w = w * output_gain
        if hasattr(conv, "weight_v"):
            conv.weight_v.copy_(w)
            conv.weight_g.copy_(w.norm(dim=tuple(range(1, w.ndim)), keepdim=True))
        else:
            conv.weight.copy_(w)
        if conv.bias is not None:
            conv.bias.zero_()


@torch.no_grad()
def revive_dead_codes(codebook, samples: torch.Tensor, threshold: float) -> None:
    """Give every code of an encodec ``EuclideanCodebook`` whose EMA count is below ``threshold`` a random
    vector from ``samples`` (``[..., D]``), with consistent EMA statistics so the next EMA step keeps it.

    No data-dependent branch (no GPU sync): the replacement is a masked write every step.
    """
    if threshold <= 0:
        return
    dead = codebook.cluster_size < threshold
    new = import_encodec().quantization.core_vq.sample_vectors(samples.reshape(-1, samples.shape[-1]), dead.numel())
    new = new.to(codebook.embed.dtype)
    codebook.embed.copy_(torch.where(dead[:, None], new, codebook.embed))
    codebook.embed_avg.copy_(torch.where(dead[:, None], new * threshold, codebook.embed_avg))
    floor = torch.full_like(codebook.cluster_size, threshold)
    codebook.cluster_size.copy_(torch.where(dead, floor, codebook.cluster_size))
    import_encodec().distrib.broadcast_tensors(codebook.buffers())
