"""Pretrained image tokenizers from local files: diffusers VQ / KL autoencoders and Cosmos DI TorchScript models.

Each adapter gives the user-facing interface of :class:`mmsuite.tokenizers.image.ImageTokenizer`: uint8 images
``[B, H, W, 3]`` in, ``encode(images) -> LongTensor [B, h, w]`` of global ids (start of the tokenizer's
:class:`TokenSpace` range + code index), ``decode(ids) -> uint8 [B, H, W, 3]``, ``encode_latents`` /
``decode_latents``, and ``grid``, ``tokens_per_image``, ``codebook_size``, ``downsample``, ``image_size``.

Unlike ``ImageTokenizer`` the input may have any size: every image is resized on its shorter side to
``image_size`` and centre-cropped to ``image_size x image_size``
(:func:`mmsuite.sources.images.resize_center_crop`), so that every image gives exactly
``(image_size // downsample) ** 2`` tokens; the code grid the model returns is checked against that.

``kind`` (one :func:`image_tokenizer_from_config` entry point):

- ``vqmodel``: a ``diffusers.VQModel`` directory (``save_pretrained`` format: ``config.json`` + weights). Codes are
  the VQ indices: ``model.encode(x).latents`` are the pre-quantisation latents, ``model.quantize(h)`` returns
  ``(z_q, loss, (perplexity, min_encodings, indices))`` with the indices flattened to ``[B * h * w]``; ids decode
  through ``model.quantize.get_codebook_entry(indices, (B, h, w, C))`` and ``model.decode(z_q,
  force_not_quantize=True)`` (for models with ``lookup_from_codebook`` the model looks the indices up itself).
  ``codebook_size = config.num_vq_embeddings``, ``downsample = 2 ** (len(config.block_out_channels) - 1)``.
- ``cosmos_jit``: NVIDIA's Cosmos discrete image tokenizers (DI8x8, DI16x16) in their TorchScript release format, a
  directory with ``encoder.jit`` and ``decoder.jit``. ``encoder(x)`` (x float ``[B, 3, H, W]`` in ``[-1, 1]``)
  returns ``(indices [B, h, w] int, codes [B, 6, h, w], ...)`` (the released encoder also returns a dummy
  quantiser loss last, which Cosmos' own ``image_lib`` drops); ``decoder(indices)`` returns ``[B, 3, H, W]`` in
  ``[-1, 1]``. The vocabulary is FSQ with levels (8, 8, 8, 5, 5, 5) = 64,000 codes. ``downsample`` and
  ``codebook_size`` come from the config and every encoding is checked against them.
- ``autoencoder_kl``: a continuous ``diffusers.AutoencoderKL`` directory (e.g. a Stable Diffusion VAE). No token
  ids: ``encode_latents`` returns the posterior mean (or a sample) normalised as the diffusion pipelines do,
  ``(z - shift_factor) * scaling_factor`` (or ``(z - latents_mean) * scaling_factor / latents_std`` for VAEs that
  define per-channel statistics), and ``decode_latents`` undoes it.

Nothing is ever downloaded: diffusers loads with ``local_files_only=True`` and the paths must exist.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mmsuite.sources.images import resize_center_crop
from mmsuite.tokenizers.token_space import TokenSpace

KINDS = ("vqmodel", "cosmos_jit", "autoencoder_kl")
COSMOS_DI_LEVELS = (8, 8, 8, 5, 5, 5)  # 64,000 codes
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float ``[B, 3, H, W]`` in ``[-1, 1]`` -> uint8 ``[B, H, W, 3]`` on the CPU (as ``ImageTokenizer``)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


# ---------------------------------------------------------------------------------------------------------
# Common wrapper
# ---------------------------------------------------------------------------------------------------------


class PretrainedImageTokenizer:
    """What the adapters share: preprocessing, the token range, the id and grid checks, uint8 conversion.

    Subclasses implement ``_encode_indices(x) -> [B, h, w]`` and ``_decode_indices(idx) -> [B, 3, H, W]`` (discrete
    ones), ``_encode_latents`` / ``_decode_latents`` and ``latent_channels``; ``x`` is float ``[-1, 1]`` on the
    tokenizer's device and dtype, ``idx`` local code indices.
    """

    kind = "pretrained"

    def __init__(
        self,
        *,
        downsample: int,
        codebook_size: int | None,
        image_size: int = 256,
        token_space: TokenSpace | None = None,
        range_name: str = "image",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        source: str = "<in memory>",
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = str(source)
        self._downsample = int(downsample)
        if int(image_size) != image_size or image_size < 1:
            raise ValueError(f"tokenizer.image_size must be a positive int (square images), got {image_size!r}")
        if image_size % self._downsample:
            raise ValueError(
                f"tokenizer.image_size={image_size} is not divisible by the downsample factor {self._downsample} "
                f"of {self.source}: the token count would not be exact"
            )
        self.image_size: tuple[int, int] = (int(image_size), int(image_size))
        self._codebook_size = None if codebook_size is None else int(codebook_size)
        self.range_name = range_name
        self.token_space = token_space
        self.range = None
        if self._codebook_size is not None:
            if token_space is None:
                token_space = TokenSpace([(range_name, self._codebook_size)])
                self.token_space = token_space
            rng = token_space[range_name]
            if rng.size != self._codebook_size:
                raise ValueError(
                    f"token range {range_name!r} has {rng.size} ids but the image tokenizer {self.source} has "
                    f"{self._codebook_size} codes; they must be equal"
                )
            self.range = rng

    # -- properties -----------------------------------------------------------------------------------
    @property
    def downsample(self) -> int:
        return self._downsample

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.downsample, self.image_size[1] // self.downsample

    @property
    def tokens_per_image(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def codebook_size(self) -> int | None:
        return self._codebook_size

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    # -- conversion -----------------------------------------------------------------------------------
    def _to_model_input(self, images) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` (numpy/tensor), a list of uint8 ``[H, W, 3]`` of any sizes, or float
        ``[B, 3, H, W]`` in [0, 1] -> resized, centre-cropped float ``[-1, 1]`` BCHW on the device, in the
        model dtype."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images is an empty list")
            one = [im if isinstance(im, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(im)) for im in images]
            x = torch.cat([self._unit_bchw(im[None] if im.ndim == 3 else im) for im in one])
        else:
            x = self._unit_bchw(images)
        return x.mul(2.0).sub(1.0).to(device=self.device, dtype=self.dtype)

    def _unit_bchw(self, images) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a numpy array, torch tensor or list of them, got {type(images).__name__}")
        if x.ndim != 4:
            raise ValueError(f"images must be 4-D ([B,H,W,3] uint8 or [B,3,H,W] float), got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            if x.shape[-1] != 3:
                raise ValueError(f"uint8 images must be [B, H, W, 3], got shape {tuple(x.shape)}")
            x = x.permute(0, 3, 1, 2).float().div(255.0)
        elif x.is_floating_point():
            if x.shape[1] != 3:
                raise ValueError(f"float images must be [B, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
            x = x.float()
        else:
            raise TypeError(f"images must be uint8 or float, got dtype {x.dtype}")
        return resize_center_crop(x, self.image_size).clamp(0.0, 1.0)

    def _check_grid(self, got: Sequence[int], what: str) -> None:
        if tuple(got) != self.grid:
            h, w = got
            raise ValueError(
                f"{self.source}: the model gave a {h}x{w} {what} ({h * w} tokens) for {self.image_size[0]}x"
                f"{self.image_size[1]} images, but downsample {self.downsample} means {self.grid[0]}x{self.grid[1]} = "
                f"tokens_per_image {self.tokens_per_image}; tokenizer.downsample does not match the model"
            )

    def _check_ids(self, ids) -> torch.Tensor:
        """Global ids ``[B, h, w]`` -> local code indices (long), after checking the grid and the range."""
        if self.range is None:
            raise RuntimeError(f"the {self.kind} image tokenizer {self.source} is continuous; use decode_latents")
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        ids = ids.long()
        if ids.ndim != 3 or tuple(ids.shape[1:]) != self.grid:
            raise ValueError(
                f"ids must be [B, {self.grid[0]}, {self.grid[1]}] ({self.tokens_per_image} tokens per "
                f"{self.image_size[0]}x{self.image_size[1]} image), got shape {tuple(ids.shape)}"
            )
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < self.range.start or hi >= self.range.stop:
                raise ValueError(
                    f"token ids out of the {self.range.name!r} range [{self.range.start}, {self.range.stop}): "
                    f"got min {lo}, max {hi}"
                )
        return ids - self.range.start

    # -- public interface -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """Images (any size; resized + centre-cropped) -> global ids LongTensor ``[B, h, w]``."""
        if self.range is None:
            raise RuntimeError(f"the {self.kind} image tokenizer {self.source} is continuous; use encode_latents")
        idx = self._encode_indices(self._to_model_input(images))
        self._check_grid(idx.shape[1:], "code grid")
        return (idx.long() + self.range.start).cpu()

    @torch.no_grad()
    def decode(self, ids) -> torch.Tensor:
        """Global ids ``[B, h, w]`` -> uint8 images ``[B, H, W, 3]``."""
        idx = self._check_ids(ids)
        x = self._decode_indices(idx.to(self.device))
        self._check_image(x)
        return _to_uint8(x)

    @torch.no_grad()
    def encode_latents(self, images, **kw) -> torch.Tensor:
        """Images -> float latents ``[B, C, h, w]`` (float32, CPU)."""
        z = self._encode_latents(self._to_model_input(images), **kw)
        self._check_grid(z.shape[-2:], "latent grid")
        return z.float().cpu()

    @torch.no_grad()
    def decode_latents(self, latents) -> torch.Tensor:
        """Float latents ``[B, C, h, w]`` -> uint8 images ``[B, H, W, 3]``."""
        return _to_uint8(self.decode_latents_float(torch.as_tensor(latents)))

    def decode_latents_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Float latents ``[B, C, h, w]`` -> float images ``[B, 3, H, W]`` near ``[-1, 1]`` (not clamped), with autograd
        through the decoder when grad is enabled (a loss in pixels; the caller freezes the weights)."""
        z, c = latents, self.latent_channels
        if z.ndim != 4 or z.shape[1] != c or tuple(z.shape[-2:]) != self.grid:
            raise ValueError(f"latents must be [B, {c}, {self.grid[0]}, {self.grid[1]}], got shape {tuple(z.shape)}")
        x = self._decode_latents(z.to(device=self.device, dtype=self.dtype))
        self._check_image(x)
        return x

    def _check_image(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(
                f"{self.source}: the decoder returned shape {tuple(x.shape)}, expected [B, 3, {self.image_size[0]}, "
                f"{self.image_size[1]}]; tokenizer.downsample ({self.downsample}) does not match the model?"
            )

    # -- to implement ---------------------------------------------------------------------------------
    def _encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode_latents(self, x: torch.Tensor, **kw) -> torch.Tensor:
        raise NotImplementedError

    def _decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        rng = f"{self.range.name}=[{self.range.start},{self.range.stop})" if self.range else "continuous"
        return (
            f"{type(self).__name__}({self.source}, {self.image_size[0]}x{self.image_size[1]} -> "
            f"{self.grid[0]}x{self.grid[1]}, {rng})"
        )


# ---------------------------------------------------------------------------------------------------------
# diffusers VQModel
# ---------------------------------------------------------------------------------------------------------


def _diffusers_downsample(model) -> int:
    return 2 ** (len(model.config.block_out_channels) - 1)


class DiffusersVQTokenizer(PretrainedImageTokenizer):
    """A ``diffusers.VQModel``: ids = VQ codebook indices (``config.num_vq_embeddings`` of them)."""

    kind = "vqmodel"

    def __init__(
        self,
        model,
        image_size: int = 256,
        token_space: TokenSpace | None = None,
        range_name="image",
        device: str | torch.device = "cpu",
        source: str = "<in memory>",
    ):
        self.model = model.eval().to(device)
        super().__init__(
            downsample=_diffusers_downsample(model),
            codebook_size=int(model.config.num_vq_embeddings),
            image_size=image_size,
            token_space=token_space,
            range_name=range_name,
            device=device,
            dtype=next(model.parameters()).dtype,
            source=source,
        )

    @property
    def latent_channels(self) -> int:
        return int(self.model.quantize.vq_embed_dim)

    def _encode_indices(self, x):
        h = self.model.encode(x).latents
        _, _, (_, _, idx) = self.model.quantize(h)
        b, _, gh, gw = h.shape
        if idx.numel() != b * gh * gw:
            raise RuntimeError(f"{self.source}: VQ quantiser returned {idx.numel()} indices for a {b}x{gh}x{gw} grid")
        return idx.reshape(b, gh, gw)

    def _codebook_shape(self, idx: torch.Tensor) -> tuple[int, int, int, int]:
        return (*idx.shape, self.latent_channels)  # (batch, height, width, channel), as get_codebook_entry wants

    def _decode_indices(self, idx):
        flat, shape = idx.reshape(-1), self._codebook_shape(idx)
        if self.model.config.lookup_from_codebook:  # the model looks the indices up itself
            return self.model.decode(flat, force_not_quantize=True, shape=shape).sample
        z_q = self.model.quantize.get_codebook_entry(flat, shape)
        return self.model.decode(z_q, force_not_quantize=True).sample

    def _encode_latents(self, x):
        """The quantised latents (codebook vectors) ``[B, vq_embed_dim, h, w]``."""
        idx = self._encode_indices(x)
        return self.model.quantize.get_codebook_entry(idx.reshape(-1), self._codebook_shape(idx))

    def _decode_latents(self, z):
        if self.model.config.lookup_from_codebook:
            # decode(force_not_quantize=True) would read z as indices here; run its post-quantisation half directly
            quant = self.model.post_quant_conv(z)
            return self.model.decoder(quant, z if self.model.config.norm_type == "spatial" else None)
        return self.model.decode(z, force_not_quantize=True).sample


# ---------------------------------------------------------------------------------------------------------
# diffusers AutoencoderKL (continuous)
# ---------------------------------------------------------------------------------------------------------


class DiffusersKLTokenizer(PretrainedImageTokenizer):
    """A continuous ``diffusers.AutoencoderKL``: latents only, normalised as the diffusion pipelines do."""

    kind = "autoencoder_kl"

    def __init__(
        self,
        model,
        image_size: int = 256,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample_posterior: bool = False,
        device: str | torch.device = "cpu",
        source: str = "<in memory>",
    ):
        self.model = model.eval().to(device)
        super().__init__(
            downsample=_diffusers_downsample(model),
            codebook_size=None,
            image_size=image_size,
            device=device,
            dtype=next(model.parameters()).dtype,
            source=source,
        )
        cfg = model.config
        self.scaling_factor = float(cfg.scaling_factor if scaling_factor is None else scaling_factor)
        if not self.scaling_factor > 0:
            raise ValueError(f"tokenizer.scaling_factor must be positive, got {self.scaling_factor}")
        shift = cfg.get("shift_factor") if shift_factor is None else shift_factor
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if (mean is None) != (std is None):
            raise ValueError(f"{source}: config has only one of latents_mean / latents_std")
        if mean is not None and shift is not None:
            raise ValueError(
                f"{source}: config has both shift_factor and latents_mean; which one normalises is unclear"
            )
        c = self.latent_channels
        if mean is not None:
            if len(mean) != c or len(std) != c:
                raise ValueError(f"{source}: latents_mean/latents_std need {c} entries (latent_channels)")
            self._offset = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
            self._std = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
        else:
            self._offset = torch.tensor(float(shift or 0.0))
            self._std = torch.tensor(1.0)
        self.shift_factor = None if shift is None else float(shift)
        self.sample_posterior = bool(sample_posterior)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    def _encode_latents(self, x, generator: torch.Generator | None = None):
        """Posterior mean (or a sample, with ``sample_posterior``) ``(z - shift) * scaling_factor / std``."""
        posterior = self.model.encode(x).latent_dist
        z = posterior.sample(generator) if self.sample_posterior else posterior.mean
        z = z.float()
        return (z - self._offset.to(z.device)) * (self.scaling_factor / self._std.to(z.device))

    def _decode_latents(self, z):
        zf = z.float()
        zf = zf * (self._std.to(z.device) / self.scaling_factor) + self._offset.to(z.device)
        return self.model.decode(zf.to(self.dtype)).sample


# ---------------------------------------------------------------------------------------------------------
# Cosmos DI (TorchScript)
# ---------------------------------------------------------------------------------------------------------


class CosmosDiscreteTokenizer(PretrainedImageTokenizer):
    """NVIDIA Cosmos discrete image tokenizer (DI8x8 / DI16x16) from its ``encoder.jit`` / ``decoder.jit``.

    ``downsample`` and ``codebook_size`` are declared (a TorchScript module has no config) and every encoding is
    checked against them. ``levels`` (the FSQ levels, optional) lets ``decode_latents`` turn codes back into
    indices, as the decoder takes indices.
    """

    kind = "cosmos_jit"

    def __init__(
        self,
        encoder,
        decoder,
        *,
        downsample: int,
        codebook_size: int,
        levels: Sequence[int] | None = None,
        image_size: int = 256,
        token_space: TokenSpace | None = None,
        range_name: str = "image",
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        source: str = "<in memory>",
    ):
        if levels is not None:
            levels = [int(v) for v in levels]
            if math.prod(levels) != int(codebook_size):
                raise ValueError(
                    f"tokenizer.levels {levels} give {math.prod(levels)} codes but tokenizer.codebook_size is "
                    f"{codebook_size} (Cosmos DI: levels {list(COSMOS_DI_LEVELS)} = 64000)"
                )
        self.levels = levels
        params = list(encoder.parameters())
        if dtype is None:
            dtype = params[0].dtype if params else torch.float32
        self.encoder = encoder.eval().to(device=device, dtype=dtype)
        self.decoder = decoder.eval().to(device=device, dtype=dtype)
        super().__init__(
            downsample=downsample,
            codebook_size=codebook_size,
            image_size=image_size,
            token_space=token_space,
            range_name=range_name,
            device=device,
            dtype=dtype,
            source=source,
        )

    @property
    def latent_channels(self) -> int:
        if self.levels is None:
            raise RuntimeError(f"{self.source}: latent_channels needs tokenizer.levels (the FSQ levels)")
        return len(self.levels)

    def _run_encoder(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(x)
        if isinstance(out, torch.Tensor) or not isinstance(out, (tuple, list)) or len(out) < 2:
            got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{self.source}/encoder.jit returned {got}; a Cosmos discrete (DI) encoder returns a tuple "
                "(indices [B,h,w], codes [B,C,h,w], ...). A continuous (CI) tokenizer cannot give token ids."
            )
        idx, codes = out[0], out[1]
        if idx.is_floating_point() or idx.ndim != 3:
            raise ValueError(
                f"{self.source}/encoder.jit: first output must be integer indices [B, h, w], got {idx.dtype} "
                f"{tuple(idx.shape)}"
            )
        self._check_grid(idx.shape[1:], "index grid")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(
                f"{self.source}/encoder.jit returned indices in [{lo}, {hi}] but tokenizer.codebook_size is "
                f"{self.codebook_size}: the config does not match the model (Cosmos DI models have 64000 codes, "
                f"FSQ levels {list(COSMOS_DI_LEVELS)})"
            )
        if self.levels is not None and (codes.ndim != 4 or codes.shape[1] != len(self.levels)):
            raise ValueError(
                f"{self.source}/encoder.jit returned codes of shape {tuple(codes.shape)}, expected "
                f"[B, {len(self.levels)}, h, w] for tokenizer.levels {self.levels}"
            )
        return idx, codes

    def _encode_indices(self, x):
        return self._run_encoder(x)[0].long()

    def _decode_indices(self, idx):
        return self.decoder(idx.to(torch.int32))  # the released encoder emits int32 indices

    def _encode_latents(self, x):
        """The FSQ codes ``[B, C, h, w]`` (normalised to [-1, 1]) the encoder returns."""
        return self._run_encoder(x)[1]

    def _decode_latents(self, z):
        """FSQ codes -> indices (Cosmos' mixed-radix rule, first level fastest) -> ``decoder``."""
        if self.levels is None:
            raise RuntimeError(f"{self.source}: decode_latents needs tokenizer.levels to turn codes into indices")
        levels = torch.tensor(self.levels, device=z.device).view(1, -1, 1, 1)
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1], device=z.device), 0).view(1, -1, 1, 1)
        half = levels // 2
        digits = torch.round(z.float() * half + half).long().clamp_min(0)
        digits = torch.minimum(digits, levels - 1)
        return self._decode_indices((digits * basis).sum(1))


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def _model_dir(path: Path, subfolder: str | None, class_name: str) -> Path:
    d = path / subfolder if subfolder else path
    config = d / "config.json"
    if not config.is_file():
        hint = ""
        if (path / "model_index.json").is_file():
            subs = sorted(p.name for p in path.iterdir() if (p / "config.json").is_file())
            hint = f"; it is a pipeline folder: set tokenizer.subfolder to one of {subs} (e.g. vae, vqvae)"
        where = f"tokenizer.path={path}" + (f" with tokenizer.subfolder={subfolder}" if subfolder else "")
        raise FileNotFoundError(
            f"{where}: no config.json in {d}; expected a diffusers {class_name} directory "
            f"(config.json + diffusion_pytorch_model.safetensors, as written by save_pretrained){hint}"
        )
    try:
        got = json.loads(config.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise ValueError(f"{config}: not valid JSON ({e})") from None
    if got is not None and got != class_name:
        raise ValueError(f"{config} describes a diffusers {got}, but this tokenizer kind needs a {class_name}")
    return d


def load_diffusers_model(
    path: str | os.PathLike,
    class_name: str,
    subfolder: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
):
    """``diffusers.<class_name>.from_pretrained(path, local_files_only=True)``: never touches the network."""
    import diffusers

    path = Path(path)
    d = _model_dir(path, subfolder, class_name)
    cls = getattr(diffusers, class_name)
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        model = cls.from_pretrained(str(d), local_files_only=True, **kw)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ValueError(
            f"tokenizer.path={path}: cannot be loaded as a diffusers {class_name} from {d} ({type(e).__name__}: {e})"
        ) from None
    return model.eval().to(device)


def load_cosmos_jit(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(encoder, decoder)`` TorchScript modules from ``path/encoder.jit`` and ``path/decoder.jit``."""
    path = Path(path)
    out = []
    for name in ("encoder.jit", "decoder.jit"):
        f = path / name
        if not f.is_file():
            there = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            raise FileNotFoundError(
                f"tokenizer.path={path}: no {name} (a Cosmos DI TorchScript release folder has encoder.jit and "
                f"decoder.jit; found {there[:10]})"
            )
        try:
            out.append(torch.jit.load(str(f), map_location=device).eval())
        except Exception as e:
            raise ValueError(f"{f}: cannot be loaded as a TorchScript module ({type(e).__name__}: {e})") from None
    return tuple(out)


_COMMON_KEYS = {"name", "kind", "path", "image_size", "token_ranges", "dtype"}
_KIND_KEYS = {
    "vqmodel": {"subfolder", "codebook_size", "downsample"},
    "cosmos_jit": {"codebook_size", "downsample", "levels"},
    "autoencoder_kl": {
        "subfolder",
        "downsample",
        "latent_channels",
        "scaling_factor",
        "shift_factor",
        "sample_posterior",
    },
}


def _declared_range(declared, codebook_size: int | None, kind: str) -> str:
    """The range name from ``token_ranges``: one ``{name, size}`` (size = codebook) for discrete kinds, none else."""
    if codebook_size is None:
        if declared:
            raise ValueError(
                f"tokenizer.token_ranges must be [] for kind {kind} (continuous latents, no token ids), got {declared}"
            )
        return "image"
    if declared is None:
        return "image"
    declared = list(declared)
    if len(declared) != 1 or not isinstance(declared[0], Mapping) or "name" not in declared[0]:
        raise ValueError(f"tokenizer.token_ranges must be one {{name, size: {codebook_size}}} entry, got {declared}")
    size = declared[0].get("size")
    if size is None or int(size) != codebook_size:
        raise ValueError(
            f"tokenizer.token_ranges {declared} do not match the model's {codebook_size} codes "
            f"(expected [{{name: {declared[0]['name']}, size: {codebook_size}}}])"
        )
    return str(declared[0]["name"])


def _check_declared(cfg: dict, key: str, got, source: str) -> None:
    want = cfg.get(key)
    if want is not None and int(want) != int(got):
        raise ValueError(f"tokenizer.{key}={want} but the model at {source} has {key}={got}")


def image_tokenizer_from_config(
    cfg: Mapping | DictConfig, token_space: TokenSpace | None = None, device: str | torch.device = "cpu"
) -> PretrainedImageTokenizer:
    """A pretrained image tokenizer from a ``conf/tokenizer`` entry, dispatching on ``kind``:

    ``vqmodel`` (diffusers VQModel dir; ``subfolder``, ``codebook_size`` and ``downsample`` checked against it),
    ``cosmos_jit`` (folder with encoder.jit/decoder.jit; ``downsample``, ``codebook_size`` required, ``levels``
    optional) or ``autoencoder_kl`` (diffusers AutoencoderKL dir; ``scaling_factor`` / ``shift_factor`` override
    the model config's, ``sample_posterior``). All take ``name``, ``path``, ``image_size``, ``token_ranges``
    (checked) and ``dtype`` (float32/float16/bfloat16; null: as the weights load).
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise ValueError(
            f"tokenizer.kind={kind!r} is not a pretrained image tokenizer kind; choose one of {list(KINDS)}"
        )
    allowed = _COMMON_KEYS | _KIND_KEYS[kind]
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in a {kind} image tokenizer config; allowed: {sorted(allowed)}")
    path = cfg.get("path")
    if path in (None, "", "???"):
        raise ValueError(
            f"the {kind} image tokenizer needs tokenizer.path: a local model folder (got {path!r}); "
            "nothing is downloaded at run time"
        )
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise FileNotFoundError(f"tokenizer.path={path} does not exist (nothing is downloaded at run time)")
    dtype = cfg.get("dtype")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"tokenizer.dtype={dtype!r}: choose one of {list(_DTYPES)} or null")
    dtype = _DTYPES.get(dtype) if dtype is not None else None
    image_size = cfg.get("image_size", 256)
    source = str(path / cfg["subfolder"]) if cfg.get("subfolder") else str(path)

    if kind == "vqmodel":
        model = load_diffusers_model(path, "VQModel", cfg.get("subfolder"), dtype, device)
        codebook_size = int(model.config.num_vq_embeddings)
        _check_declared(cfg, "codebook_size", codebook_size, source)
        _check_declared(cfg, "downsample", _diffusers_downsample(model), source)
        range_name = _declared_range(cfg.get("token_ranges"), codebook_size, kind)
        return DiffusersVQTokenizer(model, image_size, token_space, range_name, device=device, source=source)

    if kind == "autoencoder_kl":
        _declared_range(cfg.get("token_ranges"), None, kind)
        model = load_diffusers_model(path, "AutoencoderKL", cfg.get("subfolder"), dtype, device)
        _check_declared(cfg, "downsample", _diffusers_downsample(model), source)
        _check_declared(cfg, "latent_channels", model.config.latent_channels, source)
        return DiffusersKLTokenizer(
            model,
            image_size,
            scaling_factor=cfg.get("scaling_factor"),
            shift_factor=cfg.get("shift_factor"),
            sample_posterior=bool(cfg.get("sample_posterior", False)),
            device=device,
            source=source,
        )

    # cosmos_jit
    for key in ("downsample", "codebook_size"):
        if cfg.get(key) is None:
            raise ValueError(f"the cosmos_jit image tokenizer needs tokenizer.{key} (DI16x16: downsample 16, 64000)")
    codebook_size = int(cfg["codebook_size"])
    range_name = _declared_range(cfg.get("token_ranges"), codebook_size, kind)
    encoder, decoder = load_cosmos_jit(path, device)
    return CosmosDiscreteTokenizer(
        encoder,
        decoder,
        downsample=int(cfg["downsample"]),
        codebook_size=codebook_size,
        levels=cfg.get("levels"),
        image_size=image_size,
        token_space=token_space,
        range_name=range_name,
        device=device,
        dtype=dtype,
        source=source,
    )
