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
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmsuite.nn.transformer import sincos_2d
from mmsuite.settings import SettingsError, fail, parse, setting
from mmsuite.tokenizers.pretrained_image import resize_center_crop
from mmsuite.tokenizers.token_space import weights_sha256

KINDS = ("pixel_patches", "dinov2")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class PixelPatchSettings:
    """``features`` of ``kind: pixel_patches``."""

    image_size: int = setting(64, ge=1)  # frames are resized / centre-cropped to this square first
    grid: int = setting(16, ge=1)  # patches per side: patch side = image_size // grid
    dim: int = setting(64, ge=1)  # feature width D (64 = 4*4*3 pixels + 16 position channels: lossless at 64 px)
    pos_dim: int = setting(16, ge=0)  # width of the 2-D sin-cos position code (a multiple of 4; 0: none)
    cls: bool = True  # a first token: the mean of the patch features
    seed: int = setting(0, ge=0)  # of the fixed random projection
    batch_size: int = setting(256, ge=1)  # frames per step

    def check(self, key: str) -> None:
        if self.image_size % self.grid:
            fail(f"{key}.image_size", f"({self.image_size}) must be a multiple of {key}.grid ({self.grid})")
        if self.pos_dim % 4:
            fail(f"{key}.pos_dim", f"must be a multiple of 4, got {self.pos_dim}")


@dataclass
class Dinov2Settings:
    """``features`` of ``kind: dinov2``."""

    path: str = ""  # a local Dinov2Model folder (config.json + weights); nothing is downloaded
    image_size: int = setting(252, ge=1)  # frames are resized / centre-cropped to this square (252 = 18 x 14)
    batch_size: int = setting(32, ge=1)  # frames per forward
    dtype: str = setting("float32", choices=list(_DTYPES))  # compute dtype (the output is float16 either way)
    device: str = "cpu"
    mean: list[float] = setting(list(IMAGENET_MEAN))
    std: list[float] = setting(list(IMAGENET_STD), gt=0.0)
    # what the model must give, checked when loaded (null: not checked): patches per side and width D
    grid: int | None = setting(None, ge=1)
    dim: int | None = setting(None, ge=1)

    def check(self, key: str) -> None:
        if len(self.mean) != 3 or len(self.std) != 3:
            fail(f"{key}.mean", f"and {key}.std need 3 values each, got {self.mean}, {self.std}")


SCHEMAS = {"pixel_patches": PixelPatchSettings, "dinov2": Dinov2Settings}


def feature_settings(cfg: Mapping, key: str = "features") -> PixelPatchSettings | Dinov2Settings:
    """The settings of ``{kind, **settings}``, checked (:func:`mmsuite.settings.parse`); errors name ``key``."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if kind not in SCHEMAS:
        raise SettingsError(f"{key}.kind must be one of {list(KINDS)}, got {kind!r}")
    return parse(SCHEMAS[kind], cfg, key)


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
        for key in ("path", "device", "batch_size", "grid", "dim"):
            s.pop(key, None)
        return {"kind": self.kind, "settings": s, "grid": list(self.grid), "cls": self.has_cls, "dim": self.dim}

    def weights_sha256(self) -> str:
        """The identity of the extractor's weights (a data set's manifest records it beside :meth:`describe`)."""
        raise NotImplementedError

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

    def weights_sha256(self) -> str:
        """sha256 of the fixed projection (float32 bytes): it depends on the seed and the shapes alone."""
        return hashlib.sha256(self.proj.numpy().tobytes()).hexdigest()

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
        for key, want, got in (("grid", s.grid, side), ("dim", s.dim, self.dim)):
            if want is not None and want != got:
                raise ValueError(f"features.{key}={want}, but {source} at image_size {s.image_size} gives {got}")
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

    def weights_sha256(self) -> str:
        """sha256 of the weight files of the folder it was loaded from (or of the in-memory state)."""
        sha = weights_sha256(self.source) if self.source != "<in memory>" else None
        if sha is None:
            digest = hashlib.sha256()
            for name, t in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(t.detach().float().cpu().numpy().tobytes())
            sha = digest.hexdigest()
        return sha

    def _features(self, frames: torch.Tensor) -> torch.Tensor:
        x = (self._unit(frames) - self._mean) / self._std
        x = x.to(device=self.settings.device, dtype=_DTYPES[self.settings.dtype])
        return self.model(pixel_values=x).last_hidden_state.float()


def patch_features_from_config(cfg: Mapping, key: str = "features") -> PatchFeatureExtractor:
    """A feature extractor from ``{kind, **settings}``; an unknown kind, key or invalid value is an error naming it."""
    settings = feature_settings(cfg, key)
    if isinstance(settings, Dinov2Settings):
        return Dinov2Features.from_pretrained(settings)
    return PixelPatchFeatures(settings)
