"""Pretrained image tokenizer adapters: tiny models saved in each real format, loaded back through the config alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mmsuite.sources.images import resize_center_crop
from mmsuite.tokenizers.pretrained_image import (
    CosmosDiscreteTokenizer,
    DiffusersKLTokenizer,
    DiffusersVQTokenizer,
    image_tokenizer_from_config,
)
from mmsuite.tokenizers.token_space import TokenSpace

CONF = Path(__file__).resolve().parents[2] / "conf" / "tokenizer"
VQ_CODES = 32


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: intra-op threads only add overhead (and stall badly on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _space(image_size: int) -> TokenSpace:
    """Other ranges before the image range, so that a missing offset shows."""
    return TokenSpace([("text", 100), ("specials", ["<pad>", "<bos>"]), ("image", image_size), ("audio_q0", 10)])


def _images(n=2, h=16, w=16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _model_input(images: np.ndarray) -> torch.Tensor:
    """What the adapters feed the model for images already at the size: float [-1, 1] BCHW."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).mul(2).sub(1)


def _u8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


# -- preprocessing ---------------------------------------------------------------------------------------


def test_resize_center_crop_shapes_types_and_exact_crop():
    img = _images(2, 30, 50)
    out = resize_center_crop(img, 16)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (2, 16, 16, 3)
    t = resize_center_crop(torch.from_numpy(_images(1, 50, 30)), 16)
    assert isinstance(t, torch.Tensor) and t.shape == (1, 16, 16, 3)
    assert resize_center_crop(img[0], 8).shape == (8, 8, 3)
    assert resize_center_crop(torch.rand(2, 3, 9, 20), 8).shape == (2, 3, 8, 8)
    # shorter side already at the size: a pure centre crop; the exact size passes unchanged
    wide = _images(1, 16, 24)
    assert np.array_equal(resize_center_crop(wide, 16), wide[:, :, 4:20])
    assert np.array_equal(resize_center_crop(wide[:, :, :16], 16), wide[:, :, :16])
    with pytest.raises(ValueError, match="uint8"):
        resize_center_crop(np.zeros((2, 8, 8), np.int32), 4)


# -- diffusers VQModel -----------------------------------------------------------------------------------


def _save_vq(root: Path, lookup: bool) -> Path:
    from diffusers import VQModel

    torch.manual_seed(0)
    model = VQModel(
        block_out_channels=(8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        num_vq_embeddings=VQ_CODES,
        lookup_from_codebook=lookup,
    )
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()  # spread codes so that many are used
    d = root / f"vq_lookup{int(lookup)}"
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    return _save_vq(tmp_path_factory.mktemp("vq"), lookup=False)


def _vq_tok(path, **kw):
    cfg = _cfg("diffusers_vq", **{"path": str(path), "image_size": 16, "codebook_size": VQ_CODES, **kw})
    return image_tokenizer_from_config(cfg, token_space=_space(VQ_CODES))


@pytest.mark.parametrize("lookup", [False, True], ids=["vq", "vq_lookup_from_codebook"])
def test_vqmodel_ids_match_the_model_and_decode_exactly(vq_dir, tmp_path, lookup):
    from diffusers import VQModel

    if lookup:  # models such as aMUSEd's look the indices up inside decode(force_not_quantize=True)
        vq_dir = _save_vq(tmp_path, lookup=True)
    tok = _vq_tok(vq_dir)
    assert isinstance(tok, DiffusersVQTokenizer)
    assert (tok.grid, tok.tokens_per_image, tok.codebook_size, tok.downsample) == ((4, 4), 16, VQ_CODES, 4)
    assert tok.image_size == (16, 16) and tok.range.start == 102
    model = VQModel.from_pretrained(vq_dir, local_files_only=True).eval()
    img = _images(3)
    ids = tok.encode(img)
    assert ids.dtype == torch.long and ids.shape == (3, 4, 4)
    assert ids.min() >= tok.range.start and ids.max() < tok.range.stop
    with torch.no_grad():
        h = model.encode(_model_input(img)).latents
        _, _, (_, _, ref_idx) = model.quantize(h)
        assert torch.equal(ids - tok.range.start, ref_idx.reshape(3, 4, 4))
        z_q = model.quantize.embedding.weight[ids - tok.range.start].permute(0, 3, 1, 2)
        if model.config.lookup_from_codebook:
            ref = model.decoder(model.post_quant_conv(z_q))
        else:
            ref = model.decode(z_q, force_not_quantize=True).sample
        quantising = model.decode(h).sample  # the model's own forward (re-quantises h)
    out = tok.decode(ids)
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16, 3)
    assert torch.equal(out, _u8(ref))
    assert (out.int() - _u8(quantising).int()).abs().max() <= 1
    lat = tok.encode_latents(img)
    assert lat.shape == (3, 4, 4, 4) and torch.allclose(lat, z_q)
    assert torch.equal(tok.decode_latents(lat), out)


def test_vqmodel_resizes_and_crops_any_input_to_the_exact_token_count(vq_dir):
    tok = _vq_tok(vq_dir)
    odd = _images(2, 20, 36, seed=1)
    ids = tok.encode(odd)
    assert ids.shape == (2, *tok.grid)
    unit = torch.from_numpy(odd).permute(0, 3, 1, 2).float().div(255.0)
    assert torch.equal(ids, tok.encode(resize_center_crop(unit, 16)))  # same preprocessing, float [0, 1] input
    mixed = tok.encode([_images(1, 40, 24)[0], _images(1, 16, 16)[0]])
    assert mixed.shape == (2, 4, 4)


def test_vqmodel_errors(vq_dir):
    tok = _vq_tok(vq_dir)
    ids = tok.encode(_images(1))
    with pytest.raises(ValueError, match=r"out of the 'image' range \[102, 134\): got min 101"):
        tok.decode(ids.clone().fill_(101))
    bad = torch.full_like(ids, 102)
    bad[0, 1, 2] = 134
    with pytest.raises(ValueError, match=r"got min 102, max 134"):
        tok.decode(bad)
    with pytest.raises(ValueError, match=r"ids must be \[B, 4, 4\]"):
        tok.decode(ids[:, :3, :3])
    with pytest.raises(ValueError, match=r"tokenizer.codebook_size=1000 but the model .* has codebook_size=32"):
        image_tokenizer_from_config(_cfg("diffusers_vq", path=str(vq_dir), image_size=16, codebook_size=1000))
    with pytest.raises(ValueError, match=r"tokenizer.downsample=8 but the model .* has downsample=4"):
        _vq_tok(vq_dir, downsample=8)
    with pytest.raises(ValueError, match=r"token_ranges .* do not match the model's 32 codes"):
        _vq_tok(vq_dir, token_ranges=[{"name": "image", "size": 64}])
    with pytest.raises(ValueError, match=r"token range 'image' has 50 ids"):
        image_tokenizer_from_config(
            _cfg("diffusers_vq", path=str(vq_dir), image_size=16, codebook_size=VQ_CODES), token_space=_space(50)
        )
    with pytest.raises(ValueError, match=r"image_size=18 is not divisible by the downsample factor 4"):
        _vq_tok(vq_dir, image_size=18)
    with pytest.raises(
        ValueError, match=r"describes a diffusers VQModel, but this tokenizer kind needs a AutoencoderKL"
    ):
        image_tokenizer_from_config(_cfg("sd_vae", path=str(vq_dir), downsample=None, latent_channels=None))


# -- Cosmos DI (TorchScript) -----------------------------------------------------------------------------

LEVELS = [8, 8, 8, 5, 5, 5]


class FakeCosmosEncoder(nn.Module):
    """Same call signature as Cosmos DI's encoder.jit: x [B,3,H,W] -> (int32 indices [B,h,w], codes [B,6,h,w], loss)."""

    def __init__(self, downsample: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, len(LEVELS), downsample, stride=downsample)
        self.register_buffer("levels", torch.tensor(LEVELS, dtype=torch.float32).view(1, -1, 1, 1))
        basis = torch.cumprod(torch.tensor([1] + LEVELS[:-1]), 0)
        self.register_buffer("basis", basis.view(1, -1, 1, 1))

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.conv(x) * 3.0
        digits = torch.round((torch.tanh(z) + 1) / 2 * (self.levels - 1))
        half = torch.floor(self.levels / 2)
        codes = (digits - half) / half
        idx = (digits.long() * self.basis).sum(1).to(torch.int32)
        return idx, codes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx, codes = self.quantize(x)
        return idx, codes, torch.zeros(x.shape[0], 1, 1, 1)


class FakeCosmosEncoderTwo(FakeCosmosEncoder):
    """As Cosmos' image_lib.encode returns it: (indices, codes)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize(x)


class FakeContinuousEncoder(FakeCosmosEncoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FakeCosmosDecoder(nn.Module):
    """indices [B,h,w] -> FSQ codes -> a strided transposed conv -> [B,3,H,W] in [-1, 1]."""

    def __init__(self, downsample: int = 16):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(len(LEVELS), 3, downsample, stride=downsample)
        self.register_buffer("levels", torch.tensor(LEVELS).view(1, -1, 1, 1))
        self.register_buffer("basis", torch.cumprod(torch.tensor([1] + LEVELS[:-1]), 0).view(1, -1, 1, 1))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        digits = torch.remainder(torch.div(indices.long().unsqueeze(1), self.basis, rounding_mode="floor"), self.levels)
        half = torch.div(self.levels, 2, rounding_mode="floor")
        codes = ((digits - half).float() / half.float()).to(self.deconv.weight.dtype)
        return torch.tanh(self.deconv(codes))


def _save_cosmos(d: Path, encoder_cls=FakeCosmosEncoder) -> Path:
    torch.manual_seed(0)
    d.mkdir(parents=True, exist_ok=True)
    torch.jit.script(encoder_cls()).save(str(d / "encoder.jit"))
    torch.jit.script(FakeCosmosDecoder()).save(str(d / "decoder.jit"))
    return d


@pytest.fixture(scope="module")
def cosmos_dir(tmp_path_factory):
    return _save_cosmos(tmp_path_factory.mktemp("cosmos") / "DI16x16")


def _cosmos_tok(path, token_space=None, **kw):
    cfg = _cfg("cosmos_di16", **{"path": str(path), "image_size": 64, **kw})
    return image_tokenizer_from_config(cfg, token_space=token_space if token_space is not None else _space(64000))


@pytest.mark.parametrize("two_outputs", [False, True], ids=["released_encoder", "image_lib_outputs"])
def test_cosmos_ids_match_the_model_and_decode_exactly(cosmos_dir, tmp_path, two_outputs):
    path = _save_cosmos(tmp_path / "two", FakeCosmosEncoderTwo) if two_outputs else cosmos_dir
    tok = _cosmos_tok(path)
    assert isinstance(tok, CosmosDiscreteTokenizer)
    assert (tok.grid, tok.tokens_per_image, tok.codebook_size, tok.downsample) == ((4, 4), 16, 64000, 16)
    enc = torch.jit.load(str(path / "encoder.jit"))
    dec = torch.jit.load(str(path / "decoder.jit"))
    img = _images(2, 64, 64)
    ids = tok.encode(img)
    assert ids.shape == (2, 4, 4) and ids.min() >= tok.range.start and ids.max() < tok.range.stop
    with torch.no_grad():
        ref_idx, ref_codes = enc(_model_input(img))[:2]
        ref = dec(ref_idx)
    assert torch.equal(ids - tok.range.start, ref_idx.long())
    assert torch.unique(ids).numel() > 4  # the fake uses many codes
    out = tok.decode(ids)
    assert out.shape == (2, 64, 64, 3) and torch.equal(out, _u8(ref))
    codes = tok.encode_latents(img)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(tok.decode_latents(codes), out)  # codes -> indices uses Cosmos' FSQ rule
    assert tok.encode(_images(3, 40, 100)).shape == (3, 4, 4)  # non-square: resized + centre-cropped


def test_cosmos_errors(cosmos_dir, tmp_path):
    tok = _cosmos_tok(cosmos_dir)
    ids = tok.encode(_images(1, 64, 64))
    with pytest.raises(ValueError, match=r"out of the 'image' range \[102, 64102\): got min .*, max 64102"):
        tok.decode(torch.cat([ids[:, :2], ids[:, 2:].clone().fill_(64102)], 1))
    with pytest.raises(ValueError, match=r"ids must be \[B, 4, 4\]"):
        tok.decode(ids.reshape(1, 2, 8))
    small = _cosmos_tok(
        cosmos_dir,
        TokenSpace([("text", 7), ("image", 1000)]),
        codebook_size=1000,
        levels=None,
        token_ranges=[{"name": "image", "size": 1000}],
    )
    with pytest.raises(ValueError, match=r"indices in \[\d+, \d+\] but tokenizer.codebook_size is 1000"):
        small.encode(_images(2, 64, 64))
    with pytest.raises(ValueError, match=r"4x4 index grid .* downsample 8 means 8x8 = tokens_per_image 64"):
        _cosmos_tok(cosmos_dir, downsample=8).encode(_images(1, 64, 64))
    with pytest.raises(ValueError, match=r"levels \[8, 8\] give 64 codes but tokenizer.codebook_size is 64000"):
        _cosmos_tok(cosmos_dir, levels=[8, 8])
    with pytest.raises(ValueError, match=r"token_ranges .* do not match the model's 64000 codes"):
        _cosmos_tok(cosmos_dir, token_ranges=[{"name": "image", "size": 1000}])
    (tmp_path / "only_decoder").mkdir()
    (tmp_path / "only_decoder" / "decoder.jit").write_bytes((cosmos_dir / "decoder.jit").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"tokenizer.path=.*only_decoder: no encoder.jit"):
        _cosmos_tok(tmp_path / "only_decoder")
    ci = _save_cosmos(tmp_path / "CI", FakeContinuousEncoder)
    with pytest.raises(ValueError, match=r"encoder.jit returned a tensor of shape .*continuous \(CI\)"):
        _cosmos_tok(ci).encode(_images(1, 64, 64))


# -- diffusers AutoencoderKL -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        scaling_factor=0.5,
    )
    pipe = tmp_path_factory.mktemp("pipe")  # a pipeline-style folder: model_index.json + vae/
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline"}))
    model.save_pretrained(pipe / "vae")
    return pipe


def _kl_tok(path, **kw):
    cfg = _cfg("sd_vae", **{"path": str(path), "image_size": 16, "downsample": 2, **kw})
    return image_tokenizer_from_config(cfg)


def test_autoencoder_kl_latents_scale_and_decode(kl_dir):
    from diffusers import AutoencoderKL

    tok = _kl_tok(kl_dir, subfolder="vae")
    assert isinstance(tok, DiffusersKLTokenizer)
    assert tok.range is None and tok.codebook_size is None and tok.grid == (8, 8) and tok.scaling_factor == 0.5
    model = AutoencoderKL.from_pretrained(kl_dir / "vae", local_files_only=True).eval()
    img = _images(2)
    z = tok.encode_latents(img)
    with torch.no_grad():
        mean = model.encode(_model_input(img)).latent_dist.mean
        ref = model.decode(z / 0.5).sample
    assert z.shape == (2, 4, 8, 8) and torch.allclose(z, mean * 0.5, atol=1e-6)
    out = tok.decode_latents(z)
    assert out.shape == (2, 16, 16, 3) and torch.equal(out, _u8(ref))
    zg = z.clone().requires_grad_(True)  # the float decode, differentiable (a pixel loss through it)
    x = tok.decode_latents_float(zg)
    assert torch.allclose(x.detach(), ref, atol=1e-5)
    x.sum().backward()
    assert zg.grad.abs().max() > 0
    over = _kl_tok(kl_dir, subfolder="vae", scaling_factor=0.25, shift_factor=0.1)
    assert torch.allclose(over.encode_latents(img), (mean - 0.1) * 0.25, atol=1e-6)
    assert torch.equal(over.decode_latents((mean - 0.1) * 0.25), tok.decode_latents(mean * 0.5))
    assert tok.encode_latents(_images(3, 24, 40)).shape == (3, 4, 8, 8)  # non-square: resized + cropped
    sampled = _kl_tok(kl_dir, subfolder="vae", sample_posterior=True)
    g = lambda: torch.Generator().manual_seed(1)
    assert torch.equal(sampled.encode_latents(img, generator=g()), sampled.encode_latents(img, generator=g()))
    with pytest.raises(RuntimeError, match="continuous; use encode_latents"):
        tok.encode(img)
    with pytest.raises(RuntimeError, match="continuous; use decode_latents"):
        tok.decode(torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, 8, 8\]"):
        tok.decode_latents(z[:, :3])


def test_autoencoder_kl_config_errors(kl_dir):
    with pytest.raises(FileNotFoundError, match=r"no config.json .*set tokenizer.subfolder to one of \['vae'\]"):
        _kl_tok(kl_dir)
    with pytest.raises(ValueError, match=r"token_ranges must be \[\] for kind autoencoder_kl"):
        _kl_tok(kl_dir, subfolder="vae", token_ranges=[{"name": "image", "size": 4}])
    with pytest.raises(ValueError, match=r"tokenizer.latent_channels=16 but the model .* has latent_channels=4"):
        _kl_tok(kl_dir, subfolder="vae", latent_channels=16)


# -- config dispatch -------------------------------------------------------------------------------------


def test_config_errors_name_the_key_and_path(tmp_path):
    with pytest.raises(ValueError, match=r"needs tokenizer.path.*got '\?\?\?'"):
        image_tokenizer_from_config(_cfg("cosmos_di16"))
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"tokenizer.path={missing} does not exist"):
        image_tokenizer_from_config(_cfg("diffusers_vq", path=str(missing)))
    with pytest.raises(
        ValueError, match=r"tokenizer.kind='vqgan' .*choose one of \['vqmodel', 'cosmos_jit', 'autoencoder_kl'\]"
    ):
        image_tokenizer_from_config(_cfg("diffusers_vq", kind="vqgan", path=str(tmp_path)))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['scaling_factor'\] in a cosmos_jit"):
        image_tokenizer_from_config(_cfg("cosmos_di16", path=str(tmp_path), scaling_factor=1.0))
    with pytest.raises(ValueError, match=r"tokenizer.dtype='fp8'"):
        image_tokenizer_from_config(_cfg("cosmos_di16", path=str(tmp_path), dtype="fp8"))


def test_shipped_configs_declare_their_token_ranges():
    cosmos = OmegaConf.to_container(OmegaConf.load(CONF / "cosmos_di16.yaml"), resolve=True)
    assert cosmos["kind"] == "cosmos_jit" and cosmos["downsample"] == 16 and cosmos["codebook_size"] == 64000
    assert cosmos["token_ranges"] == [{"name": "image", "size": 64000}] and cosmos["image_size"] == 256
    vq = OmegaConf.to_container(OmegaConf.load(CONF / "diffusers_vq.yaml"), resolve=True)
    assert vq["kind"] == "vqmodel" and vq["token_ranges"] == [{"name": "image", "size": vq["codebook_size"]}]
    sd = OmegaConf.to_container(OmegaConf.load(CONF / "sd_vae.yaml"), resolve=True)
    assert sd["kind"] == "autoencoder_kl" and sd["token_ranges"] == []
    for c in (cosmos, vq, sd):
        assert c["path"] == "???" and {"name", "kind", "image_size"} <= set(c)
