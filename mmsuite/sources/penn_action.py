"""Reader for a Penn Action folder (2326 videos of 15 actions with 13 annotated joints per frame).

Layout::

    <root>/frames/0001/000001.jpg, 000002.jpg, ...
    <root>/labels/0001.mat     fields x [T,13], y [T,13], visibility [T,13], action (str), train (1 / -1),
                               nframes (T); also pose, bbox, dimensions, which are not needed here

Conventions, relative to the raw labels:

* Joint order: Penn Action's (head, left/right shoulder, elbow, wrist, hip, knee, ankle) is the toy world's
  :data:`~mmsuite.sources.toyworld.JOINTS` order, so the mapping :data:`PENN_TO_OURS` is the identity; it is
  still applied by name so that a change on either side cannot silently scramble joints.
* Coordinates: the labels are MATLAB-style, with the centre of the top-left pixel at ``(1, 1)``. We use the toy
  world's convention (that centre is ``(0.5, 0.5)``), so ``joints = labels - LABEL_OFFSET`` with
  ``LABEL_OFFSET = 0.5``. Unannotated joints stored as ``(0, 0)`` thereby land outside the image.
* ``visible`` is the label's visibility flag AND the joint lying inside the frame.
* ``train_flag`` is the data set's own split (1 = train, -1 = test); splits are made by video, never by frame.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from mmsuite.sources.toyworld import JOINTS

PENN_JOINTS: tuple[str, ...] = (
    "head",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
PENN_TO_OURS = np.array([PENN_JOINTS.index(name) for name in JOINTS])  # ours[:, j] = penn[:, PENN_TO_OURS[j]]
LABEL_OFFSET = 0.5
ACTIONS: tuple[str, ...] = (
    "baseball_pitch",
    "baseball_swing",
    "bench_press",
    "bowl",
    "clean_and_jerk",
    "golf_swing",
    "jump_rope",
    "jumping_jacks",
    "pullup",
    "pushup",
    "situp",
    "squat",
    "strum_guitar",
    "tennis_forehand",
    "tennis_serve",
)
REQUIRED_FIELDS = ("x", "y", "visibility", "action", "train", "nframes")


def list_videos(root: str | os.PathLike) -> list[str]:
    """Sorted ids of the videos that have both ``frames/<id>/`` and ``labels/<id>.mat``."""
    root = Path(root)
    frames, labels = root / "frames", root / "labels"
    have_frames = {p.name for p in frames.iterdir() if p.is_dir()} if frames.is_dir() else set()
    have_labels = {p.stem for p in labels.glob("*.mat")} if labels.is_dir() else set()
    ids = sorted(have_frames & have_labels)
    if not ids:
        raise FileNotFoundError(
            f"no Penn Action videos under {root}: expected frames/<id>/*.jpg and labels/<id>.mat "
            f"(found {len(have_frames)} frame folders and {len(have_labels)} label files)"
        )
    return ids


def load_labels(root: str | os.PathLike, vid: str) -> dict:
    """The labels of video ``vid``: ``joints float32 [T,13,2]`` (our convention), ``labelled bool [T,13]`` (the
    raw visibility flag), ``action str``, ``train_flag int``, ``n_frames int``."""
    path = Path(root) / "labels" / f"{vid}.mat"
    if not path.is_file():
        raise FileNotFoundError(f"Penn Action label file not found: {path}")
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as e:  # scipy raises several types for corrupt files
        raise ValueError(f"{path}: cannot read as a MATLAB file ({e})") from None
    missing = [f for f in REQUIRED_FIELDS if f not in mat]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing} (has {sorted(k for k in mat if not k.startswith('_'))})")
    n_frames = _scalar_int(path, "nframes", mat["nframes"])
    if n_frames < 1:
        raise ValueError(f"{path}: nframes must be >= 1, got {n_frames}")
    arrays = {}
    for name in ("x", "y", "visibility"):
        a = np.asarray(mat[name])
        if a.ndim == 1 and n_frames == 1:  # squeeze_me turns a [1, 13] matrix into [13]
            a = a[None]
        if a.ndim != 2 or a.shape[1] != len(PENN_JOINTS):
            raise ValueError(f"{path}: field {name!r} must be [T, {len(PENN_JOINTS)}], got shape {a.shape}")
        if a.shape[0] != n_frames:
            raise ValueError(f"{path}: field {name!r} has {a.shape[0]} rows but nframes is {n_frames}")
        if not np.issubdtype(a.dtype, np.number):
            raise ValueError(f"{path}: field {name!r} must be numeric, got dtype {a.dtype}")
        arrays[name] = a[:, PENN_TO_OURS]
    vis = arrays["visibility"]
    if not np.all((vis == 0) | (vis == 1)):
        raise ValueError(f"{path}: field 'visibility' must hold only 0/1, got values {np.unique(vis)[:8].tolist()}")
    action = mat["action"]
    if isinstance(action, np.ndarray) and action.size == 1:
        action = action.item()
    if not isinstance(action, str) or not action:
        raise ValueError(f"{path}: field 'action' must be a non-empty string, got {action!r}")
    train_flag = _scalar_int(path, "train", mat["train"])
    if train_flag not in (1, -1):
        raise ValueError(f"{path}: field 'train' must be 1 (train) or -1 (test), got {train_flag}")
    joints = np.stack([arrays["x"], arrays["y"]], axis=-1).astype(np.float64) - LABEL_OFFSET
    return {
        "joints": joints.astype(np.float32),
        "labelled": vis.astype(bool),
        "action": action,
        "train_flag": train_flag,
        "n_frames": n_frames,
    }


def load_video(root: str | os.PathLike, vid: str) -> dict:
    """Frames and labels of video ``vid``.

    Returns ``dict(frames uint8 [T,H,W,3], joints float32 [T,13,2], visible bool [T,13], action str,
    train_flag int)``; the frame files must be ``000001.jpg .. <T>.jpg`` with ``T`` the label rows.
    """
    root = Path(root)
    labels = load_labels(root, vid)
    n_frames = labels["n_frames"]
    folder = root / "frames" / vid
    if not folder.is_dir():
        raise FileNotFoundError(f"Penn Action frame folder not found: {folder}")
    files = sorted(folder.glob("*.jpg"))
    expected = [folder / f"{i:06d}.jpg" for i in range(1, n_frames + 1)]
    if files != expected:
        label_file = root / "labels" / f"{vid}.mat"
        missing = sorted(set(expected) - set(files))
        extra = sorted(set(files) - set(expected))
        detail = f"first missing {missing[0]}" if missing else f"first unexpected {extra[0]}"
        raise ValueError(
            f"{folder}: {len(files)} frame files but {label_file} has {n_frames} label rows "
            f"(expected 000001.jpg .. {n_frames:06d}.jpg; {detail})"
        )
    frames = None
    for t, path in enumerate(files):
        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise ValueError(f"{path}: cannot read image ({e})") from None
        if frames is None:
            frames = np.empty((n_frames, *img.shape), np.uint8)
        elif img.shape != frames.shape[1:]:
            raise ValueError(f"{path}: frame size {img.shape[:2]} differs from the first frame's {frames.shape[1:3]}")
        frames[t] = img
    height, width = frames.shape[1:3]
    joints = labels["joints"]
    inside = np.all(np.isfinite(joints) & (joints >= 0) & (joints < np.array([width, height])), axis=-1)
    return {
        "frames": frames,
        "joints": joints,
        "visible": labels["labelled"] & inside,
        "action": labels["action"],
        "train_flag": labels["train_flag"],
    }


def write_fake_penn_action(
    root: str | os.PathLike, n_videos: int, n_frames: int, size: tuple[int, int] = (48, 64), seed: int = 0
) -> dict[str, dict]:
    """Write a tiny valid Penn Action folder: a bright blob moving over a dark gradient, with joints around it.

    Video ids are ``0001, 0002, ...``; ``train`` alternates 1, -1, ... Returns ``{id: dict(frames, joints,
    visible, action, train_flag)}`` with what was written, in our conventions (frames before JPEG compression;
    ``visible`` is the written visibility flag, before the inside-the-frame test of :func:`load_video`).
    """
    if n_videos < 1 or n_frames < 1:
        raise ValueError(f"n_videos and n_frames must be >= 1, got {n_videos} and {n_frames}")
    height, width = (int(s) for s in size)
    if height < 8 or width < 8:
        raise ValueError(f"size must be (H, W) with both >= 8, got {size}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    # A standing figure template in units of the blob radius (x right, y down), Penn Action order.
    template = np.array(
        [[0, -2.2], [0.8, -1.4], [-0.8, -1.4], [1.2, -0.6], [-1.2, -0.6], [1.4, 0.2], [-1.4, 0.2],
         [0.5, 0.4], [-0.5, 0.4], [0.6, 1.3], [-0.6, 1.3], [0.6, 2.2], [-0.6, 2.2]]
    )  # fmt: skip
    radius = min(height, width) / 8
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    base = (40 + 60 * xx / width + 30 * yy / height)[..., None] * np.array([0.6, 0.8, 1.0])
    written = {}
    for v in range(n_videos):
        vid = f"{v + 1:04d}"
        start = rng.uniform([radius, 3 * radius], [width - radius, height - 3 * radius])
        end = rng.uniform([radius, 3 * radius], [width - radius, height - 3 * radius])
        tau = np.linspace(0.0, 1.0, n_frames)[:, None] if n_frames > 1 else np.zeros((1, 1))
        centres = start + (end - start) * tau  # [T, 2]
        joints = centres[:, None] + radius * template[None] + rng.normal(0, 0.3, (n_frames, 13, 2))
        visible = rng.random((n_frames, 13)) > 0.1
        color = rng.uniform(180, 255, 3)
        frames = np.empty((n_frames, height, width, 3), np.uint8)
        (root / "frames" / vid).mkdir(parents=True, exist_ok=True)
        for t in range(n_frames):
            d2 = (xx - centres[t, 0]) ** 2 + (yy - centres[t, 1]) ** 2
            alpha = np.clip(radius - np.sqrt(d2) + 0.5, 0, 1)[..., None]
            frames[t] = np.clip(base + (color - base) * alpha + 0.5, 0, 255).astype(np.uint8)
            Image.fromarray(frames[t]).save(root / "frames" / vid / f"{t + 1:06d}.jpg", quality=95)
        action = ACTIONS[int(rng.integers(len(ACTIONS)))]
        train_flag = 1 if v % 2 == 0 else -1
        penn = joints[:, np.argsort(PENN_TO_OURS)] + LABEL_OFFSET  # back to Penn order and MATLAB pixels
        lo, hi = penn.min(axis=1), penn.max(axis=1)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(
            root / "labels" / f"{vid}.mat",
            {
                "action": action,
                "pose": "front",
                "x": penn[..., 0],
                "y": penn[..., 1],
                "visibility": visible[:, np.argsort(PENN_TO_OURS)].astype(np.float64),
                "train": float(train_flag),
                "bbox": np.concatenate([lo, hi], axis=1),
                "dimensions": np.array([height, width, n_frames], np.float64),
                "nframes": float(n_frames),
            },
        )
        written[vid] = {
            "frames": frames,
            "joints": joints.astype(np.float32),
            "visible": visible,
            "action": action,
            "train_flag": train_flag,
        }
    return written


def _scalar_int(path: Path, name: str, value) -> int:
    a = np.asarray(value)
    ok = a.size == 1 and np.issubdtype(a.dtype, np.number) and np.isfinite(a.item())
    if not ok or float(a.item()) != int(a.item()):
        raise ValueError(f"{path}: field {name!r} must be an integer scalar, got {value!r}")
    return int(a.item())
