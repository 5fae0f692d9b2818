"""Unit tests for the FSQ image tokenizer, its Lightning module and the image-grid logger (CPU, fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmsuite.settings import as_dict
from mmsuite.tokenizers.image import FSQ, AutoencoderSettings, ImageAutoencoder, ImageTokenizer
from mmsuite.tokenizers.token_space import TokenSpace

TINY = dict(
    levels=[4, 3, 2], downsample=8, channels=4, channel_mult=[1, 1, 2, 2], num_res_blocks=[0, 0, 1, 1], patch_size=1
)


def _tiny(**kw) -> ImageAutoencoder:
    torch.manual_seed(0)
    return AutoencoderSettings(**{**TINY, **kw}).build()


def _images(n=3, size=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# -- FSQ -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3, 4, 7], [8, 8, 8, 5, 5, 5]])
def test_fsq_each_channel_takes_exactly_its_levels(levels):
    fsq = FSQ(levels)
    z = torch.randn(20000, len(levels), 1, 1) * 4
    codes, idx = fsq(z)
    for i, n in enumerate(levels):
        values = torch.unique(codes[:, i])
        assert values.numel() == n, (i, values)
        # evenly spaced grid
        assert torch.allclose(values.diff(), values.diff()[0].expand(n - 1))
    assert idx.min() >= 0 and idx.max() < fsq.codebook_size
    assert fsq.codebook_size == int(np.prod(levels))


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3, 4, 7]])
def test_fsq_indices_round_trip_over_all_codes(levels):
    fsq = FSQ(levels)
    all_idx = torch.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(all_idx)
    assert codes.shape == (fsq.codebook_size, len(levels))
    assert torch.equal(fsq.codes_to_indices(codes), all_idx)
    # all codes are distinct and re-quantising a code is the identity
    assert torch.unique(codes, dim=0).shape[0] == fsq.codebook_size
    # codes are fixed points of the quantiser's grid: inverting bound() and quantising gives them back
    again, idx = fsq(
        torch.atanh(((codes * fsq._half_width + fsq._offset) / fsq._half_l).clamp(-0.999, 0.999)) - fsq._shift
    )
    assert torch.equal(idx, all_idx)
    assert torch.allclose(again, codes)


def test_fsq_straight_through_gradient():
    fsq = FSQ([8, 5, 5, 5])
    z = torch.randn(4, 4, 3, 3, requires_grad=True)
    codes, _ = fsq(z)
    codes.sum().backward()
    assert z.grad is not None
    assert torch.isfinite(z.grad).all() and (z.grad.abs() > 0).all()


# -- autoencoder ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("downsample,mult", [(8, [1, 1, 2, 2]), (16, [1, 1, 2, 2, 2])])
@pytest.mark.parametrize("levels", [[8, 5, 5, 5], None])
def test_autoencoder_shapes(downsample, mult, levels):
    net = AutoencoderSettings(
        levels=levels,
        downsample=downsample,
        channels=4,
        channel_mult=mult,
        num_res_blocks=1,
        latent_channels=6,
        patch_size=1,
    ).build()
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    recon, idx = net(x)
    assert recon.shape == x.shape
    h, w = 64 // downsample, 48 // downsample
    z, idx2 = net.encode(x)
    if levels is None:
        assert idx is None and idx2 is None
        assert z.shape == (2, 6, h, w)
    else:
        assert idx.shape == (2, h, w) and idx.dtype == torch.long
        assert z.shape == (2, 4, h, w)
        assert torch.allclose(net.indices_to_latents(idx), z)
    with pytest.raises(ValueError, match="divisible"):
        net.encode(torch.zeros(1, 3, 60, 64))


@pytest.mark.parametrize("downsample,patch_size,mult", [(8, 4, [1, 2]), (16, 4, [1, 2, 2]), (8, 8, [1])])
def test_autoencoder_patch_stem_shapes(downsample, patch_size, mult):
    net = AutoencoderSettings(
        levels=[8, 5, 5, 5],
        downsample=downsample,
        patch_size=patch_size,
        channels=8,
        channel_mult=mult,
        num_res_blocks=1,
    ).build()
    x = torch.rand(2, 3, 32, 64) * 2 - 1
    recon, idx = net(x)
    assert recon.shape == x.shape
    assert idx.shape == (2, 32 // downsample, 64 // downsample)
    with pytest.raises(ValueError, match="channel_mult"):
        AutoencoderSettings(downsample=8, patch_size=4, channel_mult=[1, 2, 2]).build()


# -- tokenizer --------------------------------------------------------------------------------------------


def _space(net) -> TokenSpace:
    return TokenSpace([("text", 300), ("image", net.codebook_size), ("audio", 7)])


def test_tokenizer_ids_in_range_and_round_trip_shape():
    net = _tiny()
    space = _space(net)
    tok = ImageTokenizer(net, space, image_size=32)
    assert tok.grid == (4, 4) and tok.tokens_per_image == 16
    imgs = _images()
    ids = tok.encode(imgs)
    assert ids.shape == (3, 4, 4) and ids.dtype == torch.long
    rng = space["image"]
    assert rng.start == 300
    assert ids.min() >= rng.start and ids.max() < rng.stop
    # the same images as a tensor, and as float [B, 3, H, W] in [0, 1], give the same ids
    assert torch.equal(tok.encode(torch.from_numpy(imgs)), ids)
    assert torch.equal(tok.encode(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255), ids)
    out = tok.decode(ids)
    assert out.shape == (3, 32, 32, 3) and out.dtype == torch.uint8


def test_tokenizer_rejects_out_of_range_ids():
    net = _tiny()
    tok = ImageTokenizer(net, _space(net), image_size=32)
    ids = tok.encode(_images(1))
    with pytest.raises(ValueError, match="out of the 'image' range"):
        tok.decode(ids - 300)  # local indices, not global ids
    bad = ids.clone()
    bad[0, 0, 0] = tok.range.stop
    with pytest.raises(ValueError, match=str(tok.range.stop)):
        tok.decode(bad)


def test_tokenizer_rejects_wrong_image_size():
    net = _tiny()
    tok = ImageTokenizer(net, _space(net), image_size=32)
    with pytest.raises(ValueError, match="expects 32x32 images, got 40x40"):
        tok.encode(_images(1, size=40))
    with pytest.raises(ValueError, match="expects 32x32"):
        tok.encode(_images(1, size=64))


def test_tokenizer_range_size_must_match_codebook():
    net = _tiny()  # 24 codes
    with pytest.raises(ValueError, match="must be equal"):
        ImageTokenizer(net, TokenSpace([("text", 10), ("image", 1000)]), image_size=32)
    with pytest.raises(KeyError):
        ImageTokenizer(net, TokenSpace([("text", 10)]), image_size=32)


def test_continuous_tokenizer_latents():
    net = _tiny(levels=None, latent_channels=5)
    tok = ImageTokenizer(net, image_size=32)
    z = tok.encode_latents(_images(2))
    assert z.shape == (2, 5, 4, 4) and z.is_floating_point()
    assert tok.decode_latents(z).shape == (2, 32, 32, 3)
    with pytest.raises(RuntimeError, match="continuous"):
        tok.encode(_images(1))
    # the float decode (a pixel loss through the decoder) is the uint8 one before rounding, with autograd
    zg = z.clone().requires_grad_(True)
    x = tok.decode_latents_float(zg)
    assert torch.equal(tok._to_uint8(x.detach()), tok.decode_latents(z))
    x.sum().backward()
    assert zg.grad.abs().max() > 0


# -- Lightning module and checkpoint ----------------------------------------------------------------------


class _Images(torch.utils.data.Dataset):
    def __init__(self, n=8, size=32):
        self.x = torch.from_numpy(_images(n, size, seed=1)).permute(0, 3, 1, 2).contiguous()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


def _module(**kw):
    from mmsuite.lightning_modules.image_tokenizer import ImageTokenizerModule

    args = dict(
        net=dict(TINY),
        optim={"lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.0},
        schedule={"warmup_steps": 1, "floor_ratio": 0.1},
        loss={"l1": 1.0, "mse": 0.0, "perceptual": 0.0},
        n_sample_images=2,
        image_size=32,
    )
    args.update(kw)
    return ImageTokenizerModule(**args)


def test_perceptual_loss_is_not_silently_ignored():
    with pytest.raises(NotImplementedError, match="pretrained feature network"):
        _module(loss={"l1": 1.0, "mse": 0.0, "perceptual": 0.1})


def test_fit_checkpoint_from_checkpoint_weights_only(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    module = _module()
    loader = torch.utils.data.DataLoader(_Images(), batch_size=4)
    logger = CSVLogger(tmp_path, name="tok")
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=2,
        val_check_interval=2,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader, loader)
    m = trainer.callback_metrics
    for key in ("train/loss", "val/loss", "val/psnr", "val/codebook_usage", "val/perplexity"):
        assert key in m, key
    assert 0 < float(m["val/codebook_usage"]) <= 1
    assert list((tmp_path / "tok").rglob("samples/val_reconstructions_step2.png"))

    path = tmp_path / "tok.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no pickle needed
    assert ckpt["hyper_parameters"]["net"] == as_dict(AutoencoderSettings(**TINY))  # every setting, plain dicts
    assert all(k.startswith("net.") for k in ckpt["state_dict"])

    space = TokenSpace([("text", 300), ("image", 24)])
    loaded = ImageTokenizer.from_checkpoint(path, token_space=space)
    original = ImageTokenizer.from_module(module, space)
    imgs = _images(4, seed=5)
    ids = original.encode(imgs)
    assert ids.min() >= 300
    assert torch.equal(loaded.encode(imgs), ids)
    assert torch.equal(loaded.decode(ids), original.decode(ids))
    # default token space: a single "image" range
    plain = ImageTokenizer.from_checkpoint(path)
    assert torch.equal(plain.encode(imgs), ids - 300)


def test_schedule_needs_max_steps():
    import lightning as L

    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module = _module()
    module.trainer = trainer
    with pytest.raises(ValueError, match="max_steps"):
        module.configure_optimizers()


# -- image grid logging -----------------------------------------------------------------------------------


def test_log_image_grid_csv_writes_png(tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    from PIL import Image

    from mmsuite.callbacks.samples import log_image_grid

    class _Trainer:
        is_global_zero = True
        global_step = 7
        default_root_dir = str(tmp_path)
        loggers = [CSVLogger(tmp_path, name="csv")]

    images = torch.zeros(6, 3, 8, 10, dtype=torch.uint8)
    images[0] = 200
    written = log_image_grid(_Trainer(), "val/recon", images, nrow=3)
    assert len(written) == 1 and written[0].name == "val_recon_step7.png" and written[0].exists()
    assert written[0].parent.name == "samples"
    arr = np.asarray(Image.open(written[0]))
    assert arr.shape == (2 * 10 + 2, 3 * 12 + 2, 3)  # 2 rows x 3 cols, padding 2
    assert (arr[2:10, 2:12] == 200).all() and (arr[2:10, 14:24] == 0).all()


def test_patch_size_stem_shapes_and_validation():
    import pytest as _pytest

    from mmsuite.tokenizers.image import AutoencoderSettings

    net = AutoencoderSettings(
        levels=[8, 5, 5, 5], downsample=8, patch_size=4, channels=8, channel_mult=[1, 2], num_res_blocks=[1, 1]
    ).build()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    recon, idx = net(x)
    assert recon.shape == x.shape and idx.shape == (2, 8, 8)
    with _pytest.raises(ValueError, match="channel_mult"):
        AutoencoderSettings(downsample=8, patch_size=4, channel_mult=[1, 2, 4]).build()
    with _pytest.raises(ValueError, match="patch_size"):
        AutoencoderSettings(downsample=8, patch_size=16, channel_mult=[1]).build()


def test_a_checkpoint_with_the_removed_latent_bound_loads_only_without_a_bound(tmp_path):
    module = _module(net={**TINY, "levels": None, "latent_channels": 5})
    hp = dict(module.hparams)
    for bound, ok in ((None, True), ("tanh", False)):
        path = tmp_path / f"{bound}.ckpt"
        torch.save(
            {
                "hyper_parameters": {**hp, "net": {**hp["net"], "latent_bound": bound}},
                "state_dict": module.state_dict(),
            },
            path,
        )
        if ok:  # null meant no bound: the same tokenizer
            torch.testing.assert_close(
                ImageTokenizer.from_checkpoint(path, image_size=32).encode_latents(_images(2)),
                ImageTokenizer(module.net, image_size=32).encode_latents(_images(2)),
            )
        else:
            with pytest.raises(ValueError, match="latent_bound"):
                ImageTokenizer.from_checkpoint(path, image_size=32)
    for key in ("latent_noise", "net.latent_bound"):  # removed settings are unknown keys
        with pytest.raises(ValueError, match=key.split(".")[-1]):
            _module(**({key: 0.1} if "." not in key else {"net": {**TINY, "latent_bound": "tanh"}}))
