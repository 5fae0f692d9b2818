"""Unit tests for the audio tokenizer experiment: SI-SNR, spectral losses, usage, WAV I/O, the toy-sound
DataModule and the EnCodec LightningModule (codebook init/revival, checkpoints, logging). CPU, tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmsuite.nn.audio import MelDistance, MultiScaleSTFTLoss, mel_filterbank
from mmsuite.sources import toysound
from mmsuite.sources.splits import split_by_item
from mmsuite.sources.wav import decode_wav, encode_wav, write_wav

SR = 8000
# 8 kHz, hop 320 -> 25 frames/s; 16 codes = 4 bits -> 0.1 kbps per codebook; 0.4 kbps -> 4 codebooks
CODEC = dict(
    kind="scratch",
    name="tiny",
    sample_rate=SR,
    n_filters=4,
    ratios=[8, 5, 4, 2],
    dimension=16,
    lstm=0,
    causal=False,
    bins=16,
    bandwidth=0.4,
    target_bandwidths=[0.4],
    kmeans_iters=3,
    token_ranges=[{"name": f"audio_q{k}", "size": 16} for k in range(4)],
)


def _sounds(n=4, start=0, duration=0.5) -> torch.Tensor:
    cfg = toysound.ToySoundConfig(sample_rate=SR, duration_s=duration)
    return torch.from_numpy(np.stack([toysound.make_sound(cfg, start + i).audio for i in range(n)]))[:, None]


def _module(**kw):
    from mmsuite.lightning_modules.audio_tokenizer import AudioTokenizerModule

    args = dict(
        codec=dict(CODEC),
        optim={"lr": 1e-3, "betas": [0.8, 0.99], "weight_decay": 0.0},
        schedule={"warmup_steps": 1, "floor_ratio": 0.1},
        loss={"waveform": 1.0, "stft": 1.0, "commitment": 1.0, "adversarial": 0.0},
        stft={"n_ffts": [256, 64]},
        dead_code_threshold=0.25,
        n_sample_audio=2,
    )
    args.update(kw)
    torch.manual_seed(0)
    return AudioTokenizerModule(**args)


# -- metrics and losses -------------------------------------------------------------------------------------


def test_module_si_snr_is_the_clip_mean_of_a_scale_and_offset_invariant_ratio():
    metric = _module().eval_si_snr  # what val/si_snr reports

    def si_snr(estimate, reference):
        metric.reset()
        metric.update(estimate.double(), reference.double())
        return float(metric.compute())

    x = _sounds(3)[:, 0]
    assert si_snr(x, x) > 60  # limited only by eps
    noisy = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    base = si_snr(noisy, x)
    assert si_snr(3.0 * noisy, x) == pytest.approx(base, abs=1e-4)
    assert si_snr(0.2 * noisy, x) == pytest.approx(base, abs=1e-4)
    assert si_snr(noisy + 0.3, x) == pytest.approx(base, abs=1e-4)  # zero-mean: an offset does not count
    per_clip = [si_snr(noisy[i : i + 1], x[i : i + 1]) for i in range(3)]
    assert base == pytest.approx(sum(per_clip) / 3, abs=1e-4)  # the mean over clips
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert si_snr(noise, x) < -10
    # a known value: estimate = reference + orthogonal noise of equal energy -> 0 dB
    t = torch.arange(4000) / SR
    ref, orth = torch.sin(2 * torch.pi * 100 * t), torch.cos(2 * torch.pi * 100 * t)
    assert si_snr(ref + orth, ref) == pytest.approx(0.0, abs=1e-3)


def test_spectral_losses_zero_for_identical_positive_otherwise():
    x = _sounds(2)
    y = x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for n_mels in (None, 32):
        loss = MultiScaleSTFTLoss(SR, n_ffts=(512, 128), n_mels=n_mels)
        assert float(loss(x, x)) == 0.0
        assert float(loss(y, x)) > 0
        assert float(loss(0.5 * x, x)) > 0  # the linear term sees the scale
    mel = MelDistance(SR)
    assert torch.equal(mel(x, x), torch.zeros(2))
    d = mel(y, x)
    assert d.shape == (2,) and (d > 0).all()


def test_log_spectral_term_pushes_a_silent_estimate_towards_the_target():
    """The bug this guards against: ``log(max(|X|, eps))`` has zero gradient once the estimate is quieter than eps,
    so a codec whose output had gone silent got no push back from the log term (measured: output energy 1e-6 of
    the input, SI-SNR -36 dB). ``log(|X| + eps)`` must pull a near-silent estimate up, towards the reference."""
    x = _sounds(2)
    quiet = (1e-6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    loss = MultiScaleSTFTLoss(SR, n_ffts=(256,), linear_weight=0.0, log_weight=1.0, eps=1e-3)
    loss(quiet, x).backward()
    assert quiet.grad.abs().sum() > 0
    with torch.no_grad():  # a step against the gradient makes the estimate louder and the loss smaller
        louder = quiet - 1e-5 * quiet.grad / quiet.grad.abs().max()
    assert louder.pow(2).sum() > quiet.pow(2).sum()
    assert float(loss(louder, x)) < float(loss(quiet.detach(), x))


def test_waveform_mse_term_is_weighted_and_logged():
    m = _module(loss={"waveform": 0.0, "waveform_mse": 2.0, "stft": 0.0, "commitment": 0.0})
    x = _sounds(2)
    y = x + 0.1
    out = m._losses(y, x, torch.zeros(()))
    assert float(out["mse"]) == pytest.approx(0.01, rel=1e-4)
    assert float(out["loss"]) == pytest.approx(0.02, rel=1e-4)
    with pytest.raises(ValueError, match=r"waveform \+ waveform_mse \+ stft > 0"):
        _module(loss={"waveform": 0.0, "waveform_mse": 0.0, "stft": 0.0})


def test_mel_filterbank():
    fb = mel_filterbank(SR, 512, 40)
    assert fb.shape == (40, 257) and (fb >= 0).all()
    peaks = fb.argmax(dim=1)
    assert (peaks[1:] >= peaks[:-1]).all() and fb.sum(dim=1)[5:].gt(0).all()
    with pytest.raises(ValueError, match="f_min"):
        mel_filterbank(SR, 512, 40, f_max=SR)


def test_wav_round_trip_and_atomic_write(tmp_path):
    x = _sounds(1)[0, 0].numpy()
    y, rate = decode_wav(encode_wav(x, SR))
    assert rate == SR and y.shape == (1, len(x)) and np.abs(y[0] - x).max() < 1.0 / 32767
    stereo = np.stack([x, -x])
    assert decode_wav(encode_wav(stereo, SR))[0].shape == (2, len(x))
    path = write_wav(tmp_path / "a.wav", np.array([2.0, -2.0, 0.5]), SR)  # clipped, not wrapped
    z, _ = decode_wav(path.read_bytes())
    assert z[0, 0] > 0.99 and z[0, 1] < -0.99 and list(tmp_path.iterdir()) == [path]
    with pytest.raises(ValueError, match="not a readable WAV"):
        decode_wav(b"RIFF1234", name="x.wav")
    with pytest.raises(ValueError, match="NaN"):
        encode_wav(np.array([np.nan]), SR)


# -- the toy-sound DataModule ---------------------------------------------------------------------------------


def _datamodule(data_dir, **kw):
    from mmsuite.datamodules.sounds import ToySoundDataModule

    args = dict(
        data_dir=str(data_dir),
        sound={"sample_rate": SR, "duration_s": 0.5, "seed": 3},
        n_clips=30,
        splits={"train": 0.8, "val": 0.1, "test": 0.1},
        batch_size=4,
        val_batch_size=2,
        samples_per_shard=4,
        shuffle_buffer=4,
        seed=0,
    )
    args.update(kw)
    return ToySoundDataModule(**args)


def test_toysound_datamodule_builds_and_val_is_deterministic(tmp_path):
    dm = _datamodule(tmp_path)
    dm.prepare_data()
    manifest = json.loads((dm.root / "manifest.json").read_text())
    assert dm.root.name.startswith("toysound-8khz-")
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {"train": 24, "val": 3, "test": 3}
    assert manifest["source"]["audio"] == {"format": "wav", "sample_width_bits": 16, "channels": 1, "sample_rate": SR}
    dm.setup("fit")
    val = list(dm.val_dataloader())
    assert [b["audio"].shape for b in val] == [(2, 1, 4000), (1, 1, 4000)]
    assert all(b["audio"].dtype == torch.float32 for b in val)
    assert all(isinstance(c, str) and c for b in val for c in b["caption"])
    # the val split's first clip is the source's clip, up to 16-bit rounding
    cfg = toysound.ToySoundConfig(sample_rate=SR, duration_s=0.5, seed=3)
    split = split_by_item(range(30), {"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)
    first = min(i for i, s in split.items() if s == "val")
    assert np.abs(val[0]["audio"][0, 0].numpy() - toysound.make_sound(cfg, int(first)).audio).max() < 1.0 / 32767
    again = _datamodule(tmp_path)  # reads the same folder: no rebuild, same batches
    again.prepare_data()
    again.setup("validate")
    for a, b in zip(val, again.val_dataloader(), strict=True):
        assert torch.equal(a["audio"], b["audio"]) and a["caption"] == b["caption"]
    train = next(iter(dm.train_dataloader()))
    assert train["audio"].shape == (4, 1, 4000) and len(train["caption"]) == 4
    # a second build elsewhere writes identical data
    other = _datamodule(tmp_path / "other")
    other.prepare_data()
    other.setup("validate")
    for a, b in zip(val, other.val_dataloader(), strict=True):
        assert torch.equal(a["audio"], b["audio"])


def test_toysound_datamodule_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="duration_s"):
        _datamodule(tmp_path, sound={"sample_rate": SR, "duration_s": 0.1})
    a, b = _datamodule(tmp_path), _datamodule(tmp_path, n_clips=31)
    assert a.dataset_name != b.dataset_name


# -- the LightningModule --------------------------------------------------------------------------------------


def _codebooks(module):
    return [layer._codebook for layer in module.net.quantizer.vq.layers]


def test_module_config_checks():
    with pytest.raises(NotImplementedError, match="adversarial"):
        _module(loss={"waveform": 1.0, "adversarial": 0.5})
    with pytest.raises(ValueError, match=r"model\.loss\.wave: unknown setting"):
        _module(loss={"wave": 1.0})
    with pytest.raises(ValueError, match="dead_code_threshold"):
        _module(codec={**CODEC, "threshold_ema_dead_code": 2})
    with pytest.raises(ValueError, match="token_ranges"):
        _module(codec={**CODEC, "token_ranges": CODEC["token_ranges"][:3]})
    m = _module()
    assert (m.n_q, m.bins, m.sample_rate) == (4, 16, SR) and len(m.net.quantizer.vq.layers) == 4


def test_init_passes_the_signal_through_the_encoder():
    x = _sounds(4)

    def spread(module):  # how much the encoder output varies from frame to frame, relative to its size
        with torch.no_grad():
            emb = module.net.encoder(x)
        return float(emb.std(dim=2).mean() / emb.abs().mean())

    default, ours = _module(init_output_gain=None), _module()
    assert spread(ours) > 0.5 and spread(ours) > 5 * spread(default)
    with torch.no_grad():
        recon = ours.net.decoder(ours.net.encoder(x))
    assert recon.abs().mean() < x.abs().mean()  # the first reconstructions are quiet
    biases = [m.bias for m in ours.net.modules() if isinstance(m, torch.nn.Conv1d | torch.nn.ConvTranspose1d)]
    assert all(float(b.abs().max()) == 0 for b in biases)


def test_eval_never_initialises_codebooks_and_training_does():
    m = _module()
    x = _sounds(4)
    m.eval()
    with torch.no_grad():
        m(x)
    assert not any(bool(cb.inited) for cb in _codebooks(m))
    m.train()
    recon, codes, commit = m(x)
    assert recon.shape == x.shape and codes.shape == (4, 4, 13) and commit.ndim == 0
    assert all(bool(cb.inited) for cb in _codebooks(m))
    assert int(codes.min()) >= 0 and int(codes.max()) < 16


def test_commitment_reaches_the_encoder_through_every_codebook():
    m = _module()
    x = _sounds(2)
    m.train()
    m(x)  # k-means init
    emb = m.net.encoder(x).detach()
    # encodec's own loop: the commitment of codebooks > 0 has no gradient (facebookresearch/encodec#25)
    theirs = emb.clone().requires_grad_(True)
    _, _, losses = m.net.quantizer.vq(theirs, n_q=4)
    assert torch.autograd.grad(losses[1].sum(), theirs)[0].abs().max() == 0
    ours = emb.clone().requires_grad_(True)
    _, _, commit = m.quantize(ours)
    assert commit.shape == (4,)
    for k in range(1, 4):
        (grad,) = torch.autograd.grad(commit[k], ours, retain_graph=True)
        assert grad.abs().max() > 0, f"codebook {k}'s commitment does not reach the encoder"


def test_dead_codes_are_replaced_and_survive_the_next_ema_step():
    from mmsuite.lightning_modules.audio_tokenizer import revive_dead_codes

    m = _module()
    m.train()
    x = _sounds(4)
    m(x)
    cb = _codebooks(m)[0]
    cb.cluster_size[3] = 0.0  # code 3 is dead
    cb.embed[3] = 1e4
    samples = torch.randn(50, 16)
    revive_dead_codes(cb, samples, threshold=0.25)
    assert (samples == cb.embed[3]).all(dim=1).any(), "dead code did not get a batch vector"
    assert float(cb.cluster_size[3]) == 0.25
    revived = cb.embed[3].clone()
    cb(cb.embed[:1].clone())  # an EMA step in which code 3 wins nothing (code 0 takes the one vector)
    assert torch.allclose(cb.embed[3], revived, rtol=1e-3, atol=1e-4), "the EMA step undid the replacement"


def test_fit_logs_metrics_audio_and_checkpoint_restores_codebooks(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from mmsuite.lightning_modules.audio_tokenizer import AudioTokenizerModule
    from mmsuite.tokenizers.audio import audio_tokenizer_from_checkpoint

    x = _sounds(8)
    rows = [{"audio": x[i], "caption": f"clip {i}"} for i in range(8)]
    loader = torch.utils.data.DataLoader(rows, batch_size=4)

    def trainer(steps, **kw):
        return L.Trainer(
            max_steps=steps,
            limit_val_batches=2,
            val_check_interval=2,
            logger=CSVLogger(tmp_path, name="tok"),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=1,
            accelerator="cpu",
            default_root_dir=tmp_path,
            **kw,
        )

    class _Mode(L.Callback):  # every submodule trains (EMA codebook updates need it)
        def on_train_batch_end(self, trainer, pl_module, *args):
            modes.append(all(sub.training for sub in pl_module.modules()))

    modes = []
    module = _module()
    t = trainer(2, callbacks=[_Mode()])
    t.fit(module, loader, loader)
    assert modes == [True, True]
    m = t.callback_metrics
    for key in ("train/loss", "val/loss", "val/si_snr", "val/mel_distance", "val/codebook_usage_min", "val/commitment"):
        assert key in m, key
    usage = [float(m[f"val/codebook_usage_q{k}"]) for k in range(4)]
    assert all(0 < u <= 1 for u in usage) and float(m["val/codebook_usage_min"]) == pytest.approx(min(usage))
    wavs = sorted(p.name for p in (tmp_path / "tok").rglob("samples/*.wav"))
    assert wavs == [f"val_{kind}_step2_{i}.wav" for kind in ("decoded", "original") for i in (0, 1)]

    path = tmp_path / "tok.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert all(k.startswith("net.") for k in ckpt["state_dict"])
    for name in ("embed", "embed_avg", "cluster_size", "inited"):
        assert f"net.quantizer.vq.layers.3._codebook.{name}" in ckpt["state_dict"], name

    # restored codebooks and EMA buffers are bit-identical, and a restored module is not re-initialised
    fresh = _module()
    fresh.load_state_dict(ckpt["state_dict"])
    for a, b in zip(_codebooks(module), _codebooks(fresh), strict=True):
        for name in ("embed", "embed_avg", "cluster_size", "inited"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    module.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(module(x)[1], fresh(x)[1])

    # resume through Lightning: the first training step starts from the saved codebooks (no new k-means)
    resumed = AudioTokenizerModule(**{k: v for k, v in ckpt["hyper_parameters"].items()})
    seen = {}

    class _Peek(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("embed", _codebooks(pl_module)[0].embed.clone())

    trainer(4, callbacks=[_Peek()]).fit(resumed, loader, loader, ckpt_path=path, weights_only=True)
    assert torch.equal(seen["embed"], ckpt["state_dict"]["net.quantizer.vq.layers.0._codebook.embed"])

    # the AudioTokenizer rebuilt from the checkpoint encodes exactly as the module does
    tok = audio_tokenizer_from_checkpoint(path)
    assert (tok.n_q, tok.bins, tok.sample_rate) == (4, 16, SR)
    assert torch.equal(tok.encode_codes(x), module(x)[1])
    ids = tok.encode(x)
    assert ids.shape == (8, 13 * 4) and tok.decode(ids, length=4000).shape == (8, 1, 4000)


def test_tensorboard_gets_audio_and_generate_writes_wavs(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmsuite.callbacks.samples import log_audio

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)

    class _Trainer:
        is_global_zero = True
        global_step = 3
        default_root_dir = str(tmp_path)
        loggers = [logger]

    x = _sounds(2)
    log_audio(_Trainer(), "val/decoded", x[:, 0] * 2, SR)  # out of range: clipped, no error
    logger.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"audio": 0})
    acc.Reload()
    assert sorted(acc.Tags()["audio"]) == ["val/decoded/0", "val/decoded/1"]
    assert acc.Audio("val/decoded/0")[0].sample_rate == SR

    m = _module()
    m.eval()
    out = tmp_path / "gen"
    out.mkdir()
    written = m.generate_samples({"audio": x, "caption": ["a", "b"]}, out)
    assert sorted(p.name for p in written) == [
        "00_decoded.wav",
        "00_original.wav",
        "01_decoded.wav",
        "01_original.wav",
        "captions.txt",
    ]
    y, rate = decode_wav((out / "00_original.wav").read_bytes())
    assert rate == SR and np.abs(y - x[0].numpy()).max() < 1.0 / 32767
