"""Frame/pose pairs from videos: aligned crop of image and joints, successor-frame choice.

Joints follow the toy world's pixel convention: ``(x, y) = (column, row)``, pixel centres at integer + 0.5,
a joint is inside an ``S``-pixel side iff ``0 <= c < S``. In that convention a PIL resize from ``W`` to ``W'``
columns maps ``x`` to ``x * W' / W`` exactly, so the joints get the same transform as the pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

N_JOINTS = 13


def resize_center_crop_with_pose(
    image: np.ndarray, joints: np.ndarray, visible: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Resize the shorter side of ``image`` to ``size`` (PIL bilinear) and centre-crop ``size x size``.

    ``image`` is uint8 ``[H, W, 3]``, ``joints`` float ``[13, 2]`` pixels, ``visible`` bool ``[13]``. Returns
    ``(image uint8 [size, size, 3], joints float32 [13, 2], visible bool [13], available bool [13])``: the
    joints are scaled like the pixels and shifted by the crop offset; a joint that is NaN or falls outside the
    crop is not available (its coordinates are kept as computed) and not visible.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    joints = np.asarray(joints, np.float64)
    visible = np.asarray(visible)
    if joints.shape != (N_JOINTS, 2) or visible.shape != (N_JOINTS,) or visible.dtype != np.bool_:
        raise ValueError(
            f"joints must be float [{N_JOINTS}, 2] and visible bool [{N_JOINTS}], got {joints.shape} "
            f"and {visible.dtype} {visible.shape}"
        )
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_w = size if width <= height else max(size, round(width * scale))
    new_h = size if height <= width else max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = np.ascontiguousarray(image[top : top + size, left : left + size])
    out = joints * np.array([new_w / width, new_h / height]) - np.array([left, top])
    available = np.all(np.isfinite(out) & (out >= 0) & (out < size), axis=-1)
    return image, out.astype(np.float32), visible & available, available


def successor_indices(frames: np.ndarray, threshold: float, max_gap: int) -> np.ndarray:
    """For each frame ``t`` the first ``t' in (t, t + max_gap]`` that differs enough from it, else -1.

    "Differs enough": the mean absolute difference over all pixels and channels, in 0..255 units, is at least
    ``threshold``. ``frames`` is uint8 ``[T, H, W, 3]``; returns int64 ``[T]``.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0 (0..255 units), got {threshold!r}")
    if isinstance(max_gap, bool) or not isinstance(max_gap, (int, np.integer)) or max_gap < 1:
        raise ValueError(f"max_gap must be an integer >= 1, got {max_gap!r}")
    n = len(frames)
    result = np.full(n, -1, np.int64)
    per_frame = max(1, frames[0].size if n else 1)
    chunk = max(1, (32 << 20) // (2 * per_frame))  # ~32 MiB per int16 buffer
    for gap in range(1, min(max_gap, n - 1) + 1):
        todo = np.flatnonzero(result[: n - gap] < 0)  # frames still without a successor
        for s in range(0, len(todo), chunk):
            t = todo[s : s + chunk]
            diff = np.abs(frames[t + gap].astype(np.int16) - frames[t].astype(np.int16))
            mad = diff.reshape(len(t), -1).mean(axis=1)
            hit = t[mad >= threshold]
            result[hit] = hit + gap
    return result
