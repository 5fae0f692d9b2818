"""Image tokenizer: a small convolutional autoencoder with a finite scalar quantiser (FSQ).

FSQ (Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple") replaces a learned codebook by
bounding each of a few latent channels and rounding it to one of ``levels[i]`` values; the implicit codebook
is the product of the per-channel grids (``prod(levels)`` codes) and needs no commitment loss or codebook
updates. The autoencoder around it is a plain GroupNorm + SiLU residual conv net (as in the Cosmos / LDM
tokenizers), small enough to train on a CPU.

Image convention inside the networks: float ``[B, 3, H, W]`` in ``[-1, 1]``. :class:`ImageTokenizer` is the
user-facing wrapper: uint8 ``[B, H, W, 3]`` images in, global token ids (offset into a :class:`TokenSpace`
range) out, and back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmsuite.settings import as_dict, setting
from mmsuite.tokenizers.token_space import TokenSpace

# ---------------------------------------------------------------------------------------------------------
# FSQ
# ---------------------------------------------------------------------------------------------------------


class FSQ(nn.Module):
    """Finite scalar quantiser over ``len(levels)`` channels (dim 1 of a ``[B, C, ...]`` tensor).

    Channel ``i`` is squashed by a shifted tanh into an interval whose rounding yields exactly ``levels[i]``
    integers (for even levels the grid is offset by half a step, e.g. 8 levels -> {-4, ..., 3}), rounded with a
    straight-through estimator, and rescaled to roughly ``[-1, 1]`` by ``levels[i] // 2``.
    """

    def __init__(self, levels: Sequence[int], eps: float = 1e-3):
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or any(v < 2 for v in levels):
            raise ValueError(f"FSQ levels must be a non-empty list of integers >= 2, got {levels}")
        self.levels = levels
        self.eps = eps
        lv = torch.tensor(levels, dtype=torch.float64)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.int64), 0)
        half_l = (lv - 1) * (1 + eps) / 2  # slightly past the outer grid points, so they are reachable
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        self.register_buffer("_levels", lv.float(), persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_half_l", half_l.float(), persistent=False)
        self.register_buffer("_offset", offset.float(), persistent=False)
        self._shift: torch.Tensor
        self.register_buffer("_shift", shift.float(), persistent=False)
        self.register_buffer("_half_width", (lv // 2).float(), persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return int(math.prod(self.levels))

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return t.view(1, -1, *([1] * (ndim - 2)))

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash ``z`` so that rounding gives exactly ``levels[i]`` integer values per channel."""
        v = lambda t: self._view(t, z.ndim)
        return torch.tanh(z + v(self._shift)) * v(self._half_l) - v(self._offset)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` float ``[B, C, ...]`` -> (normalised codes, same shape; int64 indices ``[B, ...]``)."""
        if z.shape[1] != self.dim:
            raise ValueError(f"FSQ expects {self.dim} channels (levels {self.levels}), got shape {tuple(z.shape)}")
        b = self.bound(z.float())
        q = b + (torch.round(b) - b).detach()  # straight-through rounding
        codes = q / self._view(self._half_width, z.ndim)
        return codes.to(z.dtype), self.codes_to_indices(codes)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Normalised codes ``[B, C, ...]`` -> mixed-radix indices ``[B, ...]`` in ``[0, codebook_size)``."""
        v = lambda t: self._view(t, codes.ndim)
        digits = torch.round(codes.float() * v(self._half_width) + v(self._half_width)).long()
        return (digits * v(self._basis)).sum(dim=1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, ...]`` -> normalised codes ``[B, C, ...]`` (float32)."""
        idx = indices.long().unsqueeze(1)
        v = lambda t: self._view(t, idx.ndim)
        digits = torch.div(idx, v(self._basis), rounding_mode="floor") % v(self._levels).long()
        return (digits.float() - v(self._half_width)) / v(self._half_width)


# ---------------------------------------------------------------------------------------------------------
# Encoder / decoder
# ---------------------------------------------------------------------------------------------------------


def _groups(c: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if c % g == 0 and c // g >= 4:
            return g
    return 1


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(c), c, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1 projected if needed) skip."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _per_level(value: int | Sequence[int], n: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = [int(v) for v in value]
    if len(value) != n:
        raise ValueError(f"{name} must be an int or a list of {n} ints (one per resolution level), got {value}")
    return value


def _num_down(downsample: int, patch_size: int = 1) -> int:
    """Stride-2 stages after a ``patch_size`` space-to-depth stem: log2(downsample / patch_size)."""
    if downsample not in (2, 4, 8, 16, 32):
        raise ValueError(f"downsample must be a power of two in {{2, 4, 8, 16, 32}} (8 or 16 usual), got {downsample}")
    if patch_size not in (1, 2, 4, 8, 16) or patch_size > downsample:
        raise ValueError(f"patch_size must be a power of two <= downsample ({downsample}), got {patch_size}")
    return int(round(math.log2(downsample // patch_size)))


class Encoder(nn.Module):
    """Images ``[B, 3, H, W]`` -> latents ``[B, out_channels, H/ds, W/ds]``.

    An optional ``patch_size`` stem first folds each ``p x p`` pixel patch into channels (space-to-depth),
    which moves all compute to coarser grids (much faster on CPUs). Resolution level ``i``
    (``0..log2(ds / p)``) has width ``channels * channel_mult[i]`` and ``num_res_blocks[i]`` residual blocks;
    a stride-2 conv goes from level ``i`` to ``i + 1``.
    """

    def __init__(
        self,
        out_channels: int,
        downsample: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int | Sequence[int],
        patch_size: int = 1,
    ):
        super().__init__()
        n = _num_down(downsample, patch_size)
        if len(channel_mult) != n + 1:
            raise ValueError(
                f"channel_mult needs log2(downsample / patch_size) + 1 = {n + 1} entries for downsample "
                f"{downsample} and patch_size {patch_size}, got {list(channel_mult)}"
            )
        self.patch_size = patch_size
        widths = [channels * int(m) for m in channel_mult]
        blocks = _per_level(num_res_blocks, n + 1, "num_res_blocks")
        self.conv_in = nn.Conv2d(3 * patch_size**2, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i in range(n + 1):
            layers += [ResBlock(widths[i], widths[i]) for _ in range(blocks[i])]
            if i < n:
                layers.append(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1))
        self.body = nn.Sequential(*layers)
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Decoder(nn.Module):
    """Latents ``[B, in_channels, h, w]`` -> images ``[B, 3, h*ds, w*ds]`` (trained towards ``[-1, 1]``).

    Mirror of :class:`Encoder`: nearest-neighbour x2 upsampling followed by a 3x3 conv between levels.
    The output is not squashed (a tanh/clamp would stall gradients at saturated pixels); clamp at use time.
    """

    def __init__(
        self,
        in_channels: int,
        downsample: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int | Sequence[int],
        patch_size: int = 1,
    ):
        super().__init__()
        n = _num_down(downsample, patch_size)
        if len(channel_mult) != n + 1:
            raise ValueError(
                f"channel_mult needs log2(downsample / patch_size) + 1 = {n + 1} entries for downsample "
                f"{downsample} and patch_size {patch_size}, got {list(channel_mult)}"
            )
        self.patch_size = patch_size
        widths = [channels * int(m) for m in channel_mult]
        blocks = _per_level(num_res_blocks, n + 1, "num_res_blocks")
        self.conv_in = nn.Conv2d(in_channels, widths[-1], 3, padding=1)
        layers: list[nn.Module] = []
        for i in range(n, -1, -1):
            layers += [ResBlock(widths[i], widths[i]) for _ in range(blocks[i])]
            if i > 0:
                layers += [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(widths[i], widths[i - 1], 3, padding=1),
                ]
        self.body = nn.Sequential(*layers)
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3 * patch_size**2, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))
        return F.pixel_shuffle(x, self.patch_size) if self.patch_size > 1 else x


@dataclass
class AutoencoderSettings:
    """:class:`ImageAutoencoder`'s settings (``model.net`` of ``model=image_tokenizer``; levels, downsample and
    latent_channels come from the ``tokenizer`` group)."""

    levels: list[int] | None = setting([8, 8, 8, 8], ge=2)  # FSQ levels per latent channel; null: continuous
    downsample: int = setting(8, ge=1)  # image side / latent side
    patch_size: int = setting(4, ge=1)  # space-to-depth stem: compute runs on 16x16 and 8x8 grids (fast on CPU)
    channels: int = setting(64, ge=1)
    channel_mult: list[int] = setting([1, 2], ge=1)  # width per level; log2(downsample / patch_size) + 1 entries
    num_res_blocks: Any = setting([2, 2])  # per level, or one number for every level
    latent_channels: int = setting(8, ge=1)  # continuous bottleneck only (FSQ has len(levels) channels)

    def build(self) -> ImageAutoencoder:
        return ImageAutoencoder(**as_dict(self))


class ImageAutoencoder(nn.Module):
    """Conv autoencoder with an FSQ bottleneck (``levels``) or a continuous one (``levels=None``); the arguments
    are the fields of :class:`AutoencoderSettings` (``AutoencoderSettings(...).build()`` fills in the defaults).

    Inputs are float images ``[B, 3, H, W]`` in ``[-1, 1]`` with ``H, W`` divisible by ``downsample``.
    """

    def __init__(
        self,
        *,
        levels: Sequence[int] | None,
        downsample: int,
        channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int | Sequence[int],
        latent_channels: int,
        patch_size: int,
    ):
        super().__init__()
        self.downsample = int(downsample)
        self.quantizer = FSQ(levels) if levels is not None else None
        self.latent_channels = self.quantizer.dim if self.quantizer is not None else int(latent_channels)
        kw = dict(
            downsample=downsample,
            channels=channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            patch_size=int(patch_size),
        )
        self.encoder = Encoder(self.latent_channels, **kw)
        self.decoder = Decoder(self.latent_channels, **kw)

    @property
    def quantized(self) -> bool:
        return self.quantizer is not None

    @property
    def codebook_size(self) -> int | None:
        return self.quantizer.codebook_size if self.quantizer is not None else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, 3, H, W]`` in ``[-1, 1]`` -> (latents ``[B, C, h, w]``, indices ``[B, h, w]`` or None)."""
        h, w = x.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not divisible by the downsample factor {self.downsample}")
        z = self.encoder(x)
        if self.quantizer is None:
            return z, None
        return self.quantizer(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        if self.quantizer is None:
            raise RuntimeError("indices_to_latents needs a quantised autoencoder (levels is None here)")
        return self.quantizer.indices_to_codes(indices)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z, idx = self.encode(x)
        return self.decode(z), idx


# ---------------------------------------------------------------------------------------------------------
# Tokenizer wrapper
# ---------------------------------------------------------------------------------------------------------


class ImageTokenizer:
    """uint8 images <-> global token ids of one :class:`TokenSpace` range, using a trained autoencoder."""

    def __init__(
        self,
        net: ImageAutoencoder,
        token_space: TokenSpace | None = None,
        range_name: str = "image",
        image_size: int | Sequence[int] = 64,
        device: str | torch.device = "cpu",
    ):
        self.net = net.eval().to(device)
        self.device = torch.device(device)
        self.hyper_parameters: dict = {}  # the training module's, when loaded from a checkpoint
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        self.image_size: tuple[int, int] = (int(hw[0]), int(hw[1]))
        ds = net.downsample
        if self.image_size[0] % ds or self.image_size[1] % ds:
            raise ValueError(f"image size {self.image_size} is not divisible by the downsample factor {ds}")
        self.range_name = range_name
        self.token_space = token_space
        self.range = None
        if net.quantized:
            if token_space is None:
                token_space = TokenSpace([(range_name, net.codebook_size)])
                self.token_space = token_space
            rng = token_space[range_name]
            if rng.size != net.codebook_size:
                raise ValueError(
                    f"token range {range_name!r} has {rng.size} ids but the image tokenizer's FSQ codebook "
                    f"(levels {net.quantizer.levels}) has {net.codebook_size} codes; they must be equal"
                )
            self.range = rng

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_module(
        cls, module: nn.Module, token_space: TokenSpace | None = None, range_name: str = "image", **kw
    ) -> ImageTokenizer:
        """From an :class:`ImageAutoencoder` or a module holding one as ``.net`` (the Lightning module)."""
        net = module.net if not isinstance(module, ImageAutoencoder) and hasattr(module, "net") else module
        if not isinstance(net, ImageAutoencoder):
            raise TypeError(f"expected an ImageAutoencoder or a module with .net, got {type(module).__name__}")
        if "image_size" not in kw:
            size = getattr(module, "image_size", None)
            if size is not None:
                kw["image_size"] = size
        return cls(net, token_space, range_name, **kw)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        token_space: TokenSpace | None = None,
        map_location: str | torch.device = "cpu",
        range_name: str = "image",
        image_size: int | Sequence[int] | None = None,
    ) -> ImageTokenizer:
        """Rebuild from a Lightning checkpoint of ``ImageTokenizerModule`` (loaded with ``weights_only=True``)."""
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        try:
            hp = ckpt["hyper_parameters"]
            net_kwargs = dict(hp["net"])
        except KeyError:
            raise ValueError(f"{path}: not an image tokenizer checkpoint (no hyper_parameters['net'])") from None
        if net_kwargs.pop("latent_bound", None) is not None:  # a setting that no longer exists; null meant no bound
            raise ValueError(f"{path}: trained with net.latent_bound, which this version no longer has; retrain it")
        state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        if not state:
            raise ValueError(f"{path}: checkpoint state_dict has no 'net.*' entries")
        net = AutoencoderSettings(**net_kwargs).build()
        net.load_state_dict(state)
        if image_size is None:
            image_size = hp.get("image_size") or 64
        tok = cls(net, token_space, range_name, image_size=image_size, device=map_location)
        tok.hyper_parameters = dict(hp)  # how it was trained
        return tok

    # -- properties -----------------------------------------------------------------------------------
    @property
    def downsample(self) -> int:
        return self.net.downsample

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.downsample, self.image_size[1] // self.downsample

    @property
    def tokens_per_image(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def codebook_size(self) -> int | None:
        return self.net.codebook_size

    # -- conversion -----------------------------------------------------------------------------------
    def _to_model_input(self, images) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` (numpy/tensor) or float ``[B, 3, H, W]`` in [0, 1] -> float [-1, 1] BCHW."""
        x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
        if x.ndim != 4:
            raise ValueError(f"images must be 4-D ([B,H,W,3] uint8 or [B,3,H,W] float), got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            if x.shape[-1] != 3:
                raise ValueError(f"uint8 images must be [B, H, W, 3], got shape {tuple(x.shape)}")
            x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        elif x.is_floating_point():
            if x.shape[1] != 3:
                raise ValueError(f"float images must be [B, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
            x = x.float().mul(2.0).sub(1.0)
        else:
            raise TypeError(f"images must be uint8 or float, got dtype {x.dtype}")
        got = tuple(x.shape[-2:])
        if got != self.image_size:
            raise ValueError(
                f"image tokenizer expects {self.image_size[0]}x{self.image_size[1]} images, "
                f"got {got[0]}x{got[1]} (resize/crop them explicitly; nothing is resized here)"
            )
        return x.to(self.device)

    @staticmethod
    def _to_uint8(x: torch.Tensor) -> torch.Tensor:
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """Images -> global ids LongTensor ``[B, h, w]`` (range start + FSQ index)."""
        if self.range is None:
            raise RuntimeError("this image tokenizer has a continuous bottleneck; use encode_latents")
        _, idx = self.net.encode(self._to_model_input(images))
        return (idx + self.range.start).cpu()

    @torch.no_grad()
    def decode(self, ids) -> torch.Tensor:
        """Global ids ``[B, h, w]`` -> uint8 images ``[B, H, W, 3]``."""
        if self.range is None:
            raise RuntimeError("this image tokenizer has a continuous bottleneck; use decode_latents")
        ids = torch.as_tensor(ids).long()
        if ids.ndim != 3 or tuple(ids.shape[1:]) != self.grid:
            raise ValueError(f"ids must be [B, {self.grid[0]}, {self.grid[1]}], got shape {tuple(ids.shape)}")
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < self.range.start or hi >= self.range.stop:
                raise ValueError(
                    f"token ids out of the {self.range.name!r} range [{self.range.start}, {self.range.stop}): "
                    f"got min {lo}, max {hi}"
                )
        z = self.net.indices_to_latents((ids - self.range.start).to(self.device))
        return self._to_uint8(self.net.decode(z))

    @torch.no_grad()
    def encode_latents(self, images) -> torch.Tensor:
        """Images -> float latents ``[B, C, h, w]`` (the quantised codes for the FSQ variant)."""
        z, _ = self.net.encode(self._to_model_input(images))
        return z.cpu()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Float latents ``[B, C, h, w]`` -> uint8 images ``[B, H, W, 3]``."""
        return self._to_uint8(self.decode_latents_float(torch.as_tensor(latents)))

    def decode_latents_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Float latents ``[B, C, h, w]`` -> float images ``[B, 3, H, W]`` near ``[-1, 1]`` (not clamped), with autograd
        through the decoder when grad is enabled (a loss in pixels; the caller freezes the weights)."""
        if latents.ndim != 4 or latents.shape[1] != self.net.latent_channels:
            raise ValueError(f"latents must be [B, {self.net.latent_channels}, h, w], got shape {tuple(latents.shape)}")
        return self.net.decode(latents.float().to(self.device))


PRETRAINED_FRAME_KINDS = ("autoencoder_kl",)  # pretrained continuous tokenizers a frame encoder may be


def load_frame_tokenizer(encoder: Mapping, image_size: int, device="cpu", ckpt: str | Path | None = None):
    """The frozen frame encoder/decoder of the dynamics family, named by ``encoder`` (``data.encoder``): a diffusers
    AutoencoderKL from a local folder (``encoder.tokenizer.kind=autoencoder_kl``) or the continuous image tokenizer
    checkpoint ``ckpt`` (default ``encoder.ckpt``).
    ``encode_latents(uint8 [N, S, S, 3])`` / ``decode_latents`` at ``image_size``."""
    tok = dict(encoder.get("tokenizer") or {})
    if tok.get("kind") in PRETRAINED_FRAME_KINDS:
        from mmsuite.tokenizers.pretrained_image import image_tokenizer_from_config

        return image_tokenizer_from_config({**tok, "image_size": int(image_size)}, device=device)
    path = Path(ckpt or encoder["ckpt"])
    if not path.exists():
        raise FileNotFoundError(f"frame encoder checkpoint not found: {path} (data.encoder.ckpt)")
    enc = ImageTokenizer.from_checkpoint(path, image_size=int(image_size), map_location=device)
    if enc.net.quantized:
        raise ValueError(
            f"{path} is a quantised (FSQ) image tokenizer; the dynamics model needs continuous latents: "
            "train one with tokenizer=continuous (data.encoder.train_overrides) or use tokenizer=sd_vae"
        )
    return enc
