"""Frozen patch feature extractors: uint8 frames ``[T, H, W, 3]`` -> fp16 patch features ``[T, N, D]``.

One interface (:class:`PatchFeatureExtractor`) for the glimpse model's visual input: ``N = cls + h * w`` tokens in
raster order, the CLS token first where the extractor has one; ``grid = (h, w)``, ``dim = D``. Frames of any size
are resized on their shorter side and centre-cropped to ``image_size`` first (a no-op at that size). Nothing
trains here: the features are computed once and stored.

``kind`` (one :func:`patch_features_from_config` entry point):

- ``dinov2``: a transformers ``Dinov2Model`` folder (``save_pretrained`` format, e.g. DINOv2-S/14), loaded with
  ``local_files_only``. ImageNet mean/std normalisation, ``last_hidden_state`` (after the final LayerNorm):
  CLS + ``(image_size // patch_size) ** 2`` patches. At ``image_size: 252`` DINOv2-S/14 gives 18 x 18 + CLS =
  325 tokens of 384, the grid the reference used at 256 px (whose last 4 pixel rows and columns the patch
  convolution drops).
- ``pixel_patches``: for the toy world on a CPU. Each patch's own pixels (in [-1, 1]) plus a fixed 2-D sin-cos
  code of its position, through a fixed random orthogonal projection (seeded) to ``dim``; CLS is the mean patch
  feature. Exact, local and nearly free: with ``dim >= p*p*3 + pos_dim`` nothing of the frame is lost, a detail of a
  few pixels stays in the few patches it covers (what foveation is for), and it needs no weights. A randomly
  initialised ViT would mix every patch into every token at random and add nothing a learned glimpse cannot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmsuite.nn.transformer import sincos_2d
from mmsuite.tokenizers.pretrained_image import resize_center_crop

KINDS = ("pixel_patches", "dinov2")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class PixelPatchSettings:
    """``features`` of ``kind: pixel_patches``."""

    image_size: int = 64  # frames are resized / centre-cropped to this square first
    grid: int = 16  # patches per side: patch side = image_size // grid
    dim: int = 64  # feature width D (64 = 4*4*3 pixels + 16 position channels: lossless at 64 px, grid 16)
    pos_dim: int = 16  # width of the 2-D sin-cos position code (a multiple of 4; 0: none)
    cls: bool = True  # a first token: the mean of the patch features
    seed: int = 0  # of the fixed random projection
    batch_size: int = 256  # frames per step

    def __post_init__(self):
        if self.image_size < 1 or self.grid < 1 or self.image_size % self.grid:
            raise ValueError(
                f"features.image_size={self.image_size} must be a positive multiple of features.grid={self.grid}"
            )
        if self.dim < 1 or self.pos_dim < 0 or self.pos_dim % 4 or self.batch_size < 1:
            raise ValueError(
                f"features: dim >= 1, pos_dim a multiple of 4 and batch_size >= 1 are needed, got dim={self.dim}, "
                f"pos_dim={self.pos_dim}, batch_size={self.batch_size}"
            )


@dataclass
class Dinov2Settings:
    """``features`` of ``kind: dinov2``."""

    path: str = ""  # a local Dinov2Model folder (config.json + weights); nothing is downloaded
    image_size: int = 252  # frames are resized / centre-cropped to this square (252 = 18 patches of 14)
    batch_size: int = 32  # frames per forward
    dtype: str = "float32"  # compute dtype: float32, float16 or bfloat16 (the output is float16 either way)
    device: str = "cpu"
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def __post_init__(self):
        self.mean, self.std = [float(v) for v in self.mean], [float(v) for v in self.std]
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"features.mean and features.std need 3 values (std > 0), got {self.mean}, {self.std}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"features.dtype={self.dtype!r}: choose one of {list(_DTYPES)}")
        if self.image_size < 1 or self.batch_size < 1:
            raise ValueError(
                f"features.image_size and features.batch_size must be >= 1, got {self.image_size}, {self.batch_size}"
            )


class PatchFeatureExtractor:
    """uint8 frames ``[T, H, W, 3]`` (numpy or torch) -> float16 ``[T, N, D]`` on the CPU, ``N = has_cls + h*w``."""

    kind = "patch_features"
    settings: PixelPatchSettings | Dinov2Settings
    grid: tuple[int, int]
    has_cls: bool
    dim: int

    @property
    def num_tokens(self) -> int:
        return int(self.has_cls) + self.grid[0] * self.grid[1]

    def describe(self) -> dict:
        """What a data set built with these features records: kind, settings (less where and how fast they ran:
        path, device, batch size; a weights checksum belongs beside it), token layout."""
        s = dataclasses.asdict(self.settings)
        for key in ("path", "device", "batch_size"):
            s.pop(key, None)
        return {"kind": self.kind, "settings": s, "grid": list(self.grid), "cls": self.has_cls, "dim": self.dim}

    @torch.no_grad()
    def __call__(self, frames) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(frames).__name__
            raise ValueError(f"{self.kind} features take uint8 frames [T, H, W, 3], got {got}")
        step = self.settings.batch_size
        out = [self._features(x[i : i + step]) for i in range(0, len(x), step)]
        feats = torch.cat(out) if out else torch.zeros(0, self.num_tokens, self.dim)
        if tuple(feats.shape[1:]) != (self.num_tokens, self.dim):
            raise ValueError(
                f"{self.kind} features gave shape {tuple(feats.shape)}, expected [T, {self.num_tokens}, {self.dim}]"
            )
        return feats.to(torch.float16).cpu()

    def _unit(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[t, H, W, 3]`` -> float ``[t, 3, S, S]`` in [0, 1], resized and centre-cropped."""
        x = frames.permute(0, 3, 1, 2).float().div(255.0)
        return resize_center_crop(x, self.settings.image_size).clamp(0.0, 1.0)

    def _features(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelPatchFeatures(PatchFeatureExtractor):
    """Each patch's pixels + a sin-cos position code, through a fixed orthogonal projection; CLS = mean patch."""

    kind = "pixel_patches"

    def __init__(self, settings: PixelPatchSettings | None = None):
        s = self.settings = settings or PixelPatchSettings()
        self.patch = s.image_size // s.grid
        self.grid, self.has_cls, self.dim = (s.grid, s.grid), s.cls, s.dim
        in_dim = self.patch * self.patch * 3 + s.pos_dim
        gen = torch.Generator().manual_seed(s.seed)
        q, _ = torch.linalg.qr(torch.randn(max(in_dim, s.dim), min(in_dim, s.dim), generator=gen, dtype=torch.float64))
        proj = q if in_dim >= s.dim else q.T  # [in_dim, dim], orthonormal columns (or rows)
        # per-channel variance kept about that of the inputs whichever width is larger
        self.proj = (proj * math.sqrt(max(s.dim / in_dim, 1.0))).float()
        self.pos = sincos_2d(s.grid, s.grid, s.pos_dim) if s.pos_dim else torch.zeros(s.grid * s.grid, 0)

    def _features(self, frames: torch.Tensor) -> torch.Tensor:
        x = self._unit(frames).mul(2.0).sub(1.0)  # [t, 3, S, S] in [-1, 1]
        p = self.patch
        patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # [t, h*w, 3*p*p]
        pos = self.pos.expand(len(x), -1, -1)
        feats = torch.cat([patches, pos], dim=-1) @ self.proj  # [t, h*w, dim]
        if self.has_cls:
            feats = torch.cat([feats.mean(dim=1, keepdim=True), feats], dim=1)
        return feats


class Dinov2Features(PatchFeatureExtractor):
    """A transformers ``Dinov2Model``: ImageNet-normalised frames -> ``last_hidden_state`` (CLS + patches)."""

    kind = "dinov2"

    def __init__(self, model, settings: Dinov2Settings | None = None, source: str = "<in memory>"):
        s = self.settings = settings or Dinov2Settings()
        self.source = source
        self.model = model.eval().to(device=s.device, dtype=_DTYPES[s.dtype])
        cfg = model.config
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        side = s.image_size // patch
        if side < 1:
            raise ValueError(f"features.image_size={s.image_size} is smaller than the patch size {patch} of {source}")
        registers = int(getattr(cfg, "num_register_tokens", 0) or 0)
        if registers:
            raise ValueError(f"{source} has {registers} register tokens; only a plain Dinov2Model is supported")
        self.grid, self.has_cls, self.dim = (side, side), True, int(cfg.hidden_size)
        self._mean = torch.tensor(s.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(s.std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, settings: Dinov2Settings) -> Dinov2Features:
        """Load ``settings.path`` (a ``save_pretrained`` folder of a ``Dinov2Model``) without touching the network."""
        from transformers import Dinov2Model

        path = Path(os.path.expanduser(settings.path)) if settings.path else None
        if path is None or not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"features.path={settings.path!r}: no config.json there; a local Dinov2Model folder (config.json + "
                "model.safetensors, as written by save_pretrained) is needed; nothing is downloaded"
            )
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type != "dinov2":
            raise ValueError(f"features.path={path} holds a {model_type!r} model, not a dinov2 one")
        model = Dinov2Model.from_pretrained(str(path), local_files_only=True)
        return cls(model, settings, source=str(path))

    def _features(self, frames: torch.Tensor) -> torch.Tensor:
        x = (self._unit(frames) - self._mean) / self._std
        x = x.to(device=self.settings.device, dtype=_DTYPES[self.settings.dtype])
        return self.model(pixel_values=x).last_hidden_state.float()


def patch_features_from_config(cfg: Mapping) -> PatchFeatureExtractor:
    """A feature extractor from ``{kind, **settings}``; an unknown kind or key is an error naming it."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    schema = {"pixel_patches": PixelPatchSettings, "dinov2": Dinov2Settings}.get(kind)
    if schema is None:
        raise ValueError(f"features.kind={kind!r}: choose one of {list(KINDS)}")
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in features of kind {kind}; allowed: {sorted(known)}")
    settings = schema(**cfg)
    if kind == "dinov2":
        return Dinov2Features.from_pretrained(settings)
    return PixelPatchFeatures(settings)
