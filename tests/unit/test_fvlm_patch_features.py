"""Frozen patch feature extractors: one interface, the toy-world pixel patches, DINOv2 from a local folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmsuite.settings import SettingsError
from mmsuite.tokenizers.patch_features import (
    Dinov2Features,
    Dinov2Settings,
    PixelPatchFeatures,
    PixelPatchSettings,
    feature_settings,
    patch_features_from_config,
)


def _frames(t: int = 3, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, size, size, 3), dtype=np.uint8)


# -- pixel patches --------------------------------------------------------------------------------------------


def test_pixel_patches_give_cls_plus_a_16x16_grid_in_fp16():
    ex = PixelPatchFeatures()
    feats = ex(_frames())
    assert feats.dtype == torch.float16 and feats.shape == (3, 1 + 16 * 16, 64)
    assert ex.grid == (16, 16) and ex.has_cls and ex.num_tokens == 257 and ex.dim == 64
    torch.testing.assert_close(feats[:, 0].float(), feats[:, 1:].float().mean(dim=1), atol=2e-3, rtol=0)


def test_pixel_patches_are_lossless_and_local():
    """At the default width the frame's pixels come back exactly from the features, and a changed pixel changes
    only its own patch (and the CLS mean)."""
    ex = PixelPatchFeatures(PixelPatchSettings(cls=False))
    frames = _frames(2)
    feats = ex(frames).float()
    scale = math.sqrt(max(ex.dim / ex.proj.shape[0], 1.0))
    inputs = feats @ ex.proj.T / scale**2  # orthonormal projection: its transpose inverts it
    pixels = inputs[..., : 4 * 4 * 3]  # [T, 256, 3*4*4] (channel, row, col) per patch
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    want = torch.nn.functional.unfold(x, 4, stride=4).transpose(1, 2)
    torch.testing.assert_close(pixels, want, atol=0.02, rtol=0)

    changed = frames.copy()
    changed[1, 37, 10] = 255 - changed[1, 37, 10]  # row 37, col 10 -> patch (9, 2)
    diff = (ex(changed).float() - feats).abs().amax(dim=-1)
    assert diff[0].max() == 0
    assert set(torch.nonzero(diff[1] > 0).flatten().tolist()) == {9 * 16 + 2}


def test_pixel_patches_are_fixed_by_their_seed_and_resize_other_sizes():
    a, b = PixelPatchFeatures(), PixelPatchFeatures()
    frames = _frames(1)
    torch.testing.assert_close(a(frames), b(frames), rtol=0, atol=0)
    other = PixelPatchFeatures(PixelPatchSettings(seed=1))(frames)
    assert not torch.equal(a(frames), other)

    def smooth(size: int) -> np.ndarray:  # one smooth picture sampled at ``size`` px (pixel centres)
        u = (np.arange(size) + 0.5) / size
        rgb = [np.sin(2 * u[:, None] + k) * np.cos(3 * u[None, :] - k) for k in range(3)]
        return ((np.stack(rgb, -1) + 1) * 127.5).round().astype(np.uint8)[None]

    assert a(smooth(128)).shape == (1, 257, 64)  # resized to 64 px first
    torch.testing.assert_close(a(smooth(128)).float(), a(smooth(64)).float(), atol=0.05, rtol=0)
    assert a(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, 257, 64)


def test_pixel_patches_reject_bad_input_and_settings():
    ex = PixelPatchFeatures()
    with pytest.raises(ValueError, match=r"uint8 frames \[T, H, W, 3\]"):
        ex(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"uint8 frames \[T, H, W, 3\]"):
        ex(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(SettingsError, match=r"data.features.image_size \(64\) must be a multiple of"):
        feature_settings({"kind": "pixel_patches", "grid": 12}, "data.features")
    with pytest.raises(SettingsError, match="features.pos_dim must be a multiple of 4"):
        patch_features_from_config({"kind": "pixel_patches", "pos_dim": 6})
    assert feature_settings({"kind": "pixel_patches", "grid": 8}) == PixelPatchSettings(grid=8)


# -- DINOv2 ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=28, patch_size=7
    )
    path = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(config).eval().save_pretrained(path)
    return path


def test_dinov2_loads_from_a_local_folder_and_gives_cls_plus_patches(tiny_dinov2):
    from transformers import Dinov2Model

    ex = patch_features_from_config({"kind": "dinov2", "path": str(tiny_dinov2), "image_size": 56, "batch_size": 2})
    assert isinstance(ex, Dinov2Features)
    assert ex.grid == (8, 8) and ex.has_cls and ex.dim == 32 and ex.num_tokens == 65
    frames = _frames(3, size=80)  # resized to 56 px: 8 x 8 patches of 7 (the position table is interpolated)
    feats = ex(frames)
    assert feats.dtype == torch.float16 and feats.shape == (3, 65, 32)

    model = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(56, 56), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        want = model(pixel_values=(x.clamp(0, 1) - mean[:, None, None]) / std[:, None, None]).last_hidden_state
    torch.testing.assert_close(feats.float(), want, atol=2e-2, rtol=1e-2)
    assert ex.describe() == {
        "kind": "dinov2",
        "settings": {"image_size": 56, "dtype": "float32", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "grid": [8, 8],
        "cls": True,
        "dim": 32,
    }


def test_dinov2_errors_name_the_setting(tmp_path, tiny_dinov2):
    with pytest.raises(FileNotFoundError, match="features.path="):
        Dinov2Features.from_pretrained(Dinov2Settings(path=str(tmp_path / "missing")))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="not a dinov2 one"):
        Dinov2Features.from_pretrained(Dinov2Settings(path=str(tmp_path)))
    with pytest.raises(SettingsError, match="features.dtype must be one of"):
        feature_settings({"kind": "dinov2", "dtype": "int8"})
    with pytest.raises(SettingsError, match="features.pos_dim: unknown setting"):  # a pixel_patches key
        patch_features_from_config({"kind": "dinov2", "path": str(tiny_dinov2), "pos_dim": 16})
    with pytest.raises(SettingsError, match="features.kind must be one of"):
        patch_features_from_config({"kind": "clip"})


def test_weights_checksums_name_the_weights(tiny_dinov2, tmp_path):
    a = patch_features_from_config({"kind": "dinov2", "path": str(tiny_dinov2)})
    assert a.weights_sha256() == a.weights_sha256() and len(a.weights_sha256()) == 64
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_dinov2, other)
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(other)
    with torch.no_grad():
        model.embeddings.cls_token.add_(1.0)
    model.save_pretrained(other)
    assert patch_features_from_config({"kind": "dinov2", "path": str(other)}).weights_sha256() != a.weights_sha256()
    pix = PixelPatchFeatures()
    assert pix.weights_sha256() == PixelPatchFeatures().weights_sha256()
    assert pix.weights_sha256() != PixelPatchFeatures(PixelPatchSettings(seed=1)).weights_sha256()


def test_dinov2_checks_the_grid_and_width_a_config_expects(tiny_dinov2):
    base = {"kind": "dinov2", "path": str(tiny_dinov2), "image_size": 56}
    ex = patch_features_from_config({**base, "grid": 8, "dim": 32})  # what the config says is what the model gives
    assert ex.grid == (8, 8) and ex.dim == 32 and "grid" not in ex.describe()["settings"]
    with pytest.raises(ValueError, match=r"features\.grid=18.*gives 8"):
        patch_features_from_config({**base, "grid": 18})
    with pytest.raises(ValueError, match=r"features\.dim=384.*gives 32"):
        patch_features_from_config({**base, "dim": 384})
