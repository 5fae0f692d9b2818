"""Image preprocessing shared by the sources and the tokenizers: resize on the shorter side, then centre-crop, so
an image of any shape becomes exactly the size a tokenizer (or a data set) needs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _target_hw(size: int | Sequence[int]) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(hw) != 2 or any(int(s) != s or s < 1 for s in hw):
        raise ValueError(f"image size must be a positive int or [height, width], got {size!r}")
    return int(hw[0]), int(hw[1])


def _resize_center_crop_float(x: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Float ``[B, C, H, W]`` -> ``[B, C, th, tw]``: scale (bilinear, antialiased) so the image covers the target,
    i.e. the shorter side becomes ``size`` for a square target, then crop the centre. Exact sizes pass unchanged."""
    th, tw = _target_hw(size)
    h, w = x.shape[-2:]
    if (h, w) == (th, tw):
        return x
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return x[..., top : top + th, left : left + tw]


def resize_center_crop(images, size: int | Sequence[int]):
    """Resize on the shorter side to ``size`` and centre-crop to ``size x size`` (or to ``[h, w]``).

    ``images``: uint8 ``[B, H, W, 3]`` or ``[H, W, 3]`` (numpy or torch; returned as the same type and dtype,
    rounded), or a float tensor ``[B, 3, H, W]`` (returned as float). Images already at the size are returned
    unchanged.
    """
    was_numpy = isinstance(images, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(images)) if was_numpy else images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if x.is_floating_point():
        if x.ndim != 4:
            raise ValueError(f"float images must be [B, 3, H, W], got shape {tuple(x.shape)}")
        out = _resize_center_crop_float(x, size)
        return out.numpy() if was_numpy else out
    if x.dtype != torch.uint8 or x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 [B, H, W, 3] / [H, W, 3] or float [B, 3, H, W], got {x.dtype} {tuple(x.shape)}"
        )
    single = x.ndim == 3
    bchw = (x[None] if single else x).permute(0, 3, 1, 2)
    out = _resize_center_crop_float(bchw.float(), size)
    out = out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    out = out[0] if single else out
    return out.numpy() if was_numpy else out
