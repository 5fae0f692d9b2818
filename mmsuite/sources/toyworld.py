"""Procedural "toy world": deterministic short clips of a coloured stick figure doing one action.

Every clip is a pure function of ``(cfg.seed, index)``: a 13-joint stick figure (Penn Action joint order)
performs one of :data:`ACTIONS` on a plain / striped / checkered / noisy background, under a small smooth
camera pan and an optional occluding grey rectangle. Each clip carries per-frame joint positions,
visibility flags and action ids, plus a caption built from its attributes. numpy only.

Conventions:

* Pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``; its centre is ``(col + 0.5, row + 0.5)``.
  Joints are continuous ``(x, y) = (column, row)`` positions in that system, so a joint lies in pixel
  ``(floor(y), floor(x))`` and is inside the image iff ``0 <= x < S`` and ``0 <= y < S``.
* The figure faces the viewer: its *left* joints appear on the image's right (larger x).
* ``visible`` is False for a joint outside the image or whose pixel is covered by the occluder.
* Drawing order: background, figure, occluder, then (only with ``detail=True``) the small detail. The camera pan
  moves all of them together.
* The optional *small detail* (``ToyWorldConfig.detail``, off by default) is a few-pixel square, diamond or cross
  of a named colour, fixed in the world away from the figure; the caption names it last ("... with a small green
  cross", :func:`caption_detail` reads it back) and ``attributes`` give its box in every frame. It draws from its
  own random stream, so the rest of a clip is the same with and without it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

JOINTS: tuple[str, ...] = (
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
SKELETON: tuple[tuple[int, int], ...] = (
    (0, 1), (0, 2), (1, 2),  # neck: head to both shoulders, shoulder line
    (1, 3), (3, 5), (2, 4), (4, 6),  # arms
    (1, 7), (2, 8), (7, 8),  # torso
    (7, 9), (9, 11), (8, 10), (10, 12),  # legs
)  # fmt: skip
ACTIONS: tuple[str, ...] = (
    "walk_left",
    "walk_right",
    "wave_left_arm",
    "wave_right_arm",
    "jump",
    "squat",
    "idle",
)
ACTION_PHRASES: dict[str, str] = {
    "walk_left": "walking to the left",
    "walk_right": "walking to the right",
    "wave_left_arm": "waving its left arm",
    "wave_right_arm": "waving its right arm",
    "jump": "jumping",
    "squat": "squatting",
    "idle": "standing still",
}
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
    "cyan": (40, 200, 210),
    "pink": (245, 130, 190),
    "brown": (130, 80, 40),
}
FIGURE_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black")
BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "checker", "noise")
DETAIL_COLORS: tuple[str, ...] = FIGURE_COLORS
DETAIL_SHAPES: tuple[str, ...] = ("square", "diamond", "cross")
DETAIL_STREAM = 1  # the detail's random stream is default_rng([seed, index, DETAIL_STREAM])
# Bump when the rendering of a given (config, index) changes: it is part of every toy-world data set's name, so
# shards built by older code are rebuilt instead of silently reused. 2: anti-aliased stripes / checkers.
RENDER_VERSION = 2

MIN_CONTRAST = 120.0  # min RGB distance between the figure colour and any background colour
PATTERN_CONTRAST = 80.0  # min RGB distance between the two colours of a stripe / checker pattern
# Pattern scales at S=64 (scaled with S). They sit at or above the 8-px grid of an f8 image tokenizer, so a
# small tokenizer can learn to reproduce them; finer high-contrast patterns would dominate every PSNR.
STRIPE_PERIOD_PX = (16.0, 32.0)  # one dark + one light band
CHECKER_CELL_PX = (8.0, 16.0)
NOISE_AMPLITUDE = 35.0  # +- grey-level swing of the noise background around its base colour
OCCLUDER_GREYS = (64, 128, 192)
MAX_DRIFT = 16.0  # largest allowed drift_px

# Body proportions as fractions of the figure height (ankle to head top, standing straight).
HEAD_RADIUS, NECK, TORSO = 0.085, 0.12, 0.30
SHOULDER_HALF_WIDTH, HIP_HALF_WIDTH = 0.10, 0.06
UPPER_ARM, FOREARM, THIGH, SHIN = 0.17, 0.16, 0.24, 0.24

# Motion period range in frames per action cycle.
PERIODS: dict[str, tuple[float, float]] = {
    "walk_left": (8.0, 16.0),
    "walk_right": (8.0, 16.0),
    "wave_left_arm": (6.0, 12.0),
    "wave_right_arm": (6.0, 12.0),
    "jump": (10.0, 16.0),
    "squat": (12.0, 24.0),
    "idle": (16.0, 32.0),
}

_EDGE_A = np.array([a for a, _ in SKELETON])
_EDGE_B = np.array([b for _, b in SKELETON])
_SIDE = np.array([1.0, -1.0])  # left, right; +1 points to the image right (the figure faces the viewer)


@dataclass(frozen=True)
class ToyWorldConfig:
    """Settings of the toy world; every length is given at S=64 and scales with ``image_size``."""

    image_size: int = 64
    frames: int = 16
    seed: int = 0
    occluder_prob: float = 0.2
    drift_px: float = 3.0  # max camera drift over a clip at S=64
    limb_width: float = 3.0  # limb thickness in px at S=64, scaled with S but never below 2.5 px
    figure_height: tuple[float, float] = (0.5, 0.62)  # range of the standing height, as a fraction of S
    actions: tuple[str, ...] = ACTIONS  # actions to draw from (uniformly)
    backgrounds: tuple[str, ...] = BACKGROUNDS  # background kinds to draw from (uniformly)
    colors: tuple[str, ...] = FIGURE_COLORS  # figure colours to draw from (uniformly)
    detail: bool = False  # draw a small named object (a few pixels) away from the figure, named in the caption
    detail_size: float = 5.0  # its side in px at S=64 (scaled, rounded to an odd number >= 3)
    detail_colors: tuple[str, ...] = DETAIL_COLORS  # detail colours to draw from (those contrasting the background)
    detail_shapes: tuple[str, ...] = DETAIL_SHAPES

    def __post_init__(self):
        lists = ("figure_height", "actions", "backgrounds", "colors", "detail_colors", "detail_shapes")
        for name in lists:  # lists from Hydra / JSON
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_int("image_size", self.image_size, 32, 256)
        _check_int("frames", self.frames, 1, None)
        _check_int("seed", self.seed, 0, None)
        if not 0.0 <= self.occluder_prob <= 1.0:
            raise ValueError(f"ToyWorldConfig.occluder_prob must be in [0, 1], got {self.occluder_prob!r}")
        if not 0.0 <= self.drift_px <= MAX_DRIFT:
            raise ValueError(f"ToyWorldConfig.drift_px must be in [0, {MAX_DRIFT}], got {self.drift_px!r}")
        if not 2.5 <= self.limb_width <= 8.0:
            raise ValueError(f"ToyWorldConfig.limb_width must be in [2.5, 8], got {self.limb_width!r}")
        lo_hi = self.figure_height
        if len(lo_hi) != 2 or not 0.2 <= lo_hi[0] <= lo_hi[1] <= 0.75:
            msg = f"must be (lo, hi) with 0.2 <= lo <= hi <= 0.75, got {lo_hi}"
            raise ValueError(f"ToyWorldConfig.figure_height {msg}")
        if not isinstance(self.detail, (bool, np.bool_)):
            raise ValueError(f"ToyWorldConfig.detail must be true or false, got {self.detail!r}")
        if not 3.0 <= self.detail_size <= 16.0:
            raise ValueError(f"ToyWorldConfig.detail_size must be in [3, 16], got {self.detail_size!r}")
        named = (
            ("actions", ACTIONS),
            ("backgrounds", BACKGROUNDS),
            ("colors", FIGURE_COLORS),
            ("detail_colors", DETAIL_COLORS),
            ("detail_shapes", DETAIL_SHAPES),
        )
        for name, allowed in named:
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if not values or bad or len(set(values)) != len(values):
                msg = f"must be a non-empty list of distinct names from {allowed}, got {values}"
                raise ValueError(f"ToyWorldConfig.{name} {msg}")


def _check_int(name: str, value, lo: int, hi: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"ToyWorldConfig.{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"ToyWorldConfig.{name} must be {bounds}, got {value}")


@dataclass
class Clip:
    """One rendered clip and its labels."""

    index: int
    frames: np.ndarray  # uint8 [T, S, S, 3]
    joints: np.ndarray  # float32 [T, 13, 2], (x, y) pixels, pixel centres at integer + 0.5
    visible: np.ndarray  # bool [T, 13]
    actions: np.ndarray  # int64 [T], index into ACTIONS (constant within a clip)
    caption: str
    attributes: dict  # JSON-friendly: color, background, background_color(s), action, occluder_color


# -- public API ---------------------------------------------------------------------------------------


def make_clip(cfg: ToyWorldConfig, index: int) -> Clip:
    """Render clip ``index`` of the world ``cfg``; deterministic in ``(cfg.seed, index)``."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"clip index must be a non-negative integer, got {index!r}")
    rng = np.random.default_rng([cfg.seed, int(index)])
    size, n_frames, scale = cfg.image_size, cfg.frames, cfg.image_size / 64.0

    action = cfg.actions[rng.integers(len(cfg.actions))]
    color = cfg.colors[rng.integers(len(cfg.colors))]
    background = _sample_background(rng, cfg.backgrounds, color, size)
    world_joints, height = _animate(rng, action, n_frames, size, cfg.figure_height)
    drift = _camera_path(rng, n_frames, cfg.drift_px * scale)
    has_occluder = rng.random() < cfg.occluder_prob
    occluder = _sample_occluder(rng, size) if has_occluder else None

    # Joints in image coordinates; float32 first so rendering and visibility use the stored values.
    joints = (world_joints - drift[:, None, :]).astype(np.float32)
    xs = np.arange(size) + 0.5 + drift[:, :1]  # [T, S] world x of each pixel column centre
    ys = np.arange(size) + 0.5 + drift[:, 1:]  # [T, S] world y of each pixel row centre

    frames = _render_background(background, xs, ys)
    half_width = max(1.25, cfg.limb_width * scale / 2)  # >= 1.25: a joint's own pixel is fully covered
    window, alpha = _figure_alpha(joints.astype(np.float64), size, half_width, HEAD_RADIUS * height)
    if window is not None:  # blend the figure colour into the window around it
        under = frames[window].astype(np.float32)
        rgb = np.array(PALETTE[color], np.float32)
        frames[window] = (under + (rgb - under) * alpha[..., None] + 0.5).astype(np.uint8)

    inside = np.all((joints >= 0) & (joints < size), axis=-1)
    visible = inside
    occluder_color = None
    if occluder is not None:
        x0, y0, x1, y1 = occluder
        covered = ((ys >= y0) & (ys < y1))[:, :, None] & ((xs >= x0) & (xs < x1))[:, None, :]  # [T,S,S]
        occluder_color = _occluder_color(color, background["colors"])
        frames[covered] = occluder_color
        cols = np.clip(np.floor(joints[..., 0]).astype(int), 0, size - 1)
        rows = np.clip(np.floor(joints[..., 1]).astype(int), 0, size - 1)
        hidden = covered[np.arange(n_frames)[:, None], rows, cols]
        visible = inside & ~hidden

    detail = _place_detail(cfg, index, joints, drift, max(half_width, HEAD_RADIUS * height), background)
    if detail is not None:
        covered = _draw_detail(frames, detail)
        cols = np.clip(np.floor(joints[..., 0]).astype(int), 0, size - 1)
        rows = np.clip(np.floor(joints[..., 1]).astype(int), 0, size - 1)
        visible = visible & ~covered[np.arange(n_frames)[:, None], rows, cols]

    colors = background["colors"]
    attributes = {
        "color": color,
        "background": background["kind"],
        "background_color": colors[0],
        "background_color2": colors[1] if len(colors) > 1 else None,
        "action": action,
        "occluder_color": list(occluder_color) if occluder_color is not None else None,
    }
    if detail is not None:  # only with cfg.detail: default attributes keep their keys
        attributes.update(
            detail_color=detail["color"],
            detail_shape=detail["shape"],
            detail_size=detail["size"],
            detail_topleft=detail["topleft"].tolist(),  # [T, 2] (row, col) of its size x size box in each frame
        )
    return Clip(
        index=int(index),
        frames=frames,
        joints=joints,
        visible=visible,
        actions=np.full(n_frames, ACTIONS.index(action), np.int64),
        caption=caption(attributes),
        attributes=attributes,
    )


def iter_clips(cfg: ToyWorldConfig, start: int, count: int) -> Iterator[Clip]:
    """Clips ``start, start + 1, ..., start + count - 1``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    for index in range(start, start + count):
        yield make_clip(cfg, index)


def caption(attributes: dict) -> str:
    """E.g. "a red figure waving its left arm on a blue and white striped background"."""
    color, c0, c1 = attributes["color"], attributes["background_color"], attributes["background_color2"]
    scene = {
        "plain": f"plain {c0}",
        "stripes": f"{c0} and {c1} striped",
        "checker": f"{c0} and {c1} checkered",
        "noise": f"noisy {c0}",
    }[attributes["background"]]
    article = "an" if color[0] in "aeiou" else "a"
    text = f"{article} {color} figure {ACTION_PHRASES[attributes['action']]} on a {scene} background"
    if attributes.get("detail_color") is not None:
        text += f" with a small {attributes['detail_color']} {attributes['detail_shape']}"
    return text


_DETAIL_PHRASE = re.compile(r"\bwith a small (\w+) (\w+)")
_SCENE_PHRASE = re.compile(r"\bon an? (?:(plain|noisy) (\w+)|(\w+) and (\w+) (striped|checkered)) background\b")
_SCENE_KINDS = {"plain": "plain", "noisy": "noise", "striped": "stripes", "checkered": "checker"}


def caption_attributes(
    text: str, colors: Sequence[str] = FIGURE_COLORS, actions: Sequence[str] = ACTIONS
) -> dict[str, str | None]:
    """The figure colour and action a (possibly generated) caption states (None where it states none).

    Colour: the word directly before the first "figure", if it is one of ``colors``; action: of ``actions``, the one
    whose phrase (:data:`ACTION_PHRASES`) starts earliest in the text, as whole words."""
    words = text.split()
    color = None
    if "figure" in words:
        i = words.index("figure")
        color = words[i - 1] if i > 0 and words[i - 1] in colors else None
    padded = f" {' '.join(words)} "
    found = [(padded.find(f" {ACTION_PHRASES[a]} "), a) for a in actions]
    found = [(pos, a) for pos, a in found if pos >= 0]
    return {"color": color, "action": min(found)[1] if found else None}


def caption_scene(text: str) -> dict[str, str | None]:
    """The background a caption states: ``{"background": plain|stripes|checker|noise, "background_color": its first
    colour}``, each None unless the text has "on a <scene> background" with a known colour."""
    m = _SCENE_PHRASE.search(text)
    if m is None:
        return {"background": None, "background_color": None}
    kind = _SCENE_KINDS[m.group(1) or m.group(5)]
    first = m.group(2) or m.group(3)
    return {"background": kind, "background_color": first if first in PALETTE else None}


def read_caption(text: str) -> dict[str, str | None]:
    """Every attribute a toy-world caption can state, read back from (possibly generated) text: ``color``, ``action``,
    ``background``, ``background_color``, ``detail_color``, ``detail_shape`` (None where it states none)."""
    detail = caption_detail(text)
    return {
        **caption_attributes(text),
        **caption_scene(text),
        "detail_color": detail["color"],
        "detail_shape": detail["shape"],
    }


def caption_detail(text: str) -> dict[str, str | None]:
    """The small detail a (possibly generated) caption names: ``{"color", "shape"}``, each None unless the text
    has "with a small <colour> <shape>" with a known colour / shape (scored separately from the figure)."""
    m = _DETAIL_PHRASE.search(text)
    color, shape = (m.group(1), m.group(2)) if m else (None, None)
    return {"color": color if color in DETAIL_COLORS else None, "shape": shape if shape in DETAIL_SHAPES else None}


def detail_mask(shape: str, side: int) -> np.ndarray:
    """bool ``[side, side]`` pixels of a detail ``shape`` (odd ``side``): a filled square, a diamond or a cross."""
    r = side // 2
    dy, dx = np.abs(np.arange(side) - r)[:, None], np.abs(np.arange(side) - r)[None, :]
    if shape == "square":
        return np.ones((side, side), bool)
    if shape == "diamond":
        return dy + dx <= r
    if shape == "cross":
        arm = side // 6  # half thickness of the bars: 1 px bars up to side 5, 3 px up to 11
        return (dy <= arm) | (dx <= arm)
    raise ValueError(f"unknown detail shape {shape!r}; choose one of {DETAIL_SHAPES}")


def draw_skeleton(
    image: np.ndarray, joints: np.ndarray, visible: np.ndarray, color: Sequence[int] = (255, 255, 255)
) -> np.ndarray:
    """A copy of uint8 ``image`` [H, W, 3] with the visible joints (dots) and bones (lines) drawn."""
    image = np.asarray(image)
    joints = np.asarray(joints, np.float64)
    visible = np.asarray(visible, bool)
    n = len(JOINTS)
    if image.ndim != 3 or image.shape[2] != 3 or joints.shape != (n, 2) or visible.shape != (n,):
        raise ValueError(
            f"draw_skeleton wants image [H,W,3], joints [13,2], visible [13]; "
            f"got {image.shape}, {joints.shape}, {visible.shape}"
        )
    if not visible.any():
        return image.copy()
    height, width = image.shape[:2]
    half_width = max(0.5, max(height, width) / 128)  # 1 px lines at S=64
    px = np.arange(width, dtype=np.float64)[None] + 0.5
    py = np.arange(height, dtype=np.float64)[None] + 0.5
    dots = joints[visible][None]
    dist = _segment_distance(px, py, dots, dots) - 3 * half_width
    bones = [(a, b) for a, b in SKELETON if visible[a] and visible[b]]
    if bones:
        a, b = (joints[[e[i] for e in bones]][None] for i in (0, 1))
        dist = np.minimum(dist, _segment_distance(px, py, a, b) - half_width)
    alpha = np.clip(0.5 - dist[0], 0.0, 1.0)[..., None]
    blended = image + (np.asarray(color, np.float32) - image) * alpha
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def contact_sheet(clips: Sequence[Clip], frames: int = 8, skeleton: bool = False, gap: int = 2) -> np.ndarray:
    """One row per clip of ``frames`` evenly spaced frames, uint8 [rows, cols, 3] (for quick looks)."""
    rows = []
    for clip in clips:
        n_frames = len(clip.frames)
        tiles = []
        for t in np.linspace(0, n_frames - 1, min(frames, n_frames)).round().astype(int):
            tile = clip.frames[t]
            if skeleton:
                tile = draw_skeleton(tile, clip.joints[t], clip.visible[t])
            tiles.append(np.pad(tile, ((gap, gap), (gap, gap), (0, 0)), constant_values=255))
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


# -- scene sampling -----------------------------------------------------------------------------------


def _rgb_distance(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def _contrast(figure: str, background: str, swing: float) -> float:
    """Smallest distance between the figure colour and the background colour shifted by +-``swing`` grey."""
    base = np.array(PALETTE[background], np.float64)
    return min(_rgb_distance(PALETTE[figure], np.clip(base + s, 0, 255)) for s in (-swing, 0.0, swing))


@cache
def background_colors(figure: str, kind: str, first: str | None = None) -> tuple[str, ...]:
    """Palette names allowed behind a ``figure``-coloured figure (as 2nd pattern colour, after ``first``)."""
    swing = NOISE_AMPLITUDE if kind == "noise" else 0.0
    allowed = tuple(name for name in PALETTE if _contrast(figure, name, swing) >= MIN_CONTRAST)
    if first is None:
        return allowed
    return tuple(n for n in allowed if _rgb_distance(PALETTE[n], PALETTE[first]) >= PATTERN_CONTRAST)


def _sample_background(rng, kinds: tuple[str, ...], figure: str, size: int) -> dict:
    kind = kinds[rng.integers(len(kinds))]
    allowed = background_colors(figure, kind)
    first = allowed[rng.integers(len(allowed))]
    bg = {"kind": kind, "colors": (first,)}
    scale = size / 64.0
    if kind in ("stripes", "checker"):
        second = background_colors(figure, kind, first)
        bg["colors"] = (first, second[rng.integers(len(second))])
    if kind == "stripes":
        bg["vertical"] = bool(rng.integers(2))
        bg["period"] = rng.uniform(*STRIPE_PERIOD_PX) * scale
        bg["offset"] = rng.uniform(0.0, bg["period"])
    elif kind == "checker":
        bg["cell"] = rng.uniform(*CHECKER_CELL_PX) * scale
        bg["offset"] = rng.uniform(0.0, 2 * bg["cell"], size=2)
    elif kind == "noise":
        cell = size / rng.uniform(2.5, 5.0)
        bg["cell"] = cell
        bg["origin"] = -(MAX_DRIFT * size / 64 + 2 * cell)  # the grid size must not depend on drift_px
        n = int(np.ceil((size - 2 * bg["origin"]) / cell)) + 2
        bg["grid"] = rng.uniform(-1.0, 1.0, size=(n, n))
    return bg


def _sample_occluder(rng, size: int) -> tuple[float, float, float, float]:
    """A rectangle ``(x0, y0, x1, y1)`` in world pixels, inside the frame."""
    w, h = rng.uniform(0.2, 0.4) * size, rng.uniform(0.2, 0.45) * size
    x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
    return x0, y0, x0 + w, y0 + h


def _occluder_color(figure: str, background: tuple[str, ...]) -> tuple[int, int, int]:
    """The grey that stands out most from the figure and the background colours."""
    others = [PALETTE[figure]] + [PALETTE[c] for c in background]
    greys = [(g, g, g) for g in OCCLUDER_GREYS]
    return max(greys, key=lambda grey: min(_rgb_distance(grey, c) for c in others))


def _place_detail(cfg: ToyWorldConfig, index: int, joints, drift, reach: float, background: dict) -> dict | None:
    """Colour, shape, side and per-frame top-left pixel ``[T, 2]`` (row, col) of the small detail, or None when
    ``cfg.detail`` is off. The detail is fixed in the world (it moves with the camera pan, snapped to whole
    pixels), at least 1 px inside the frame, and kept off the figure's box (its joints widened by ``reach`` + 2 px)
    in every frame; when 64 tries find no such place, the try that meets the figure in fewest frames is taken."""
    if not cfg.detail:
        return None
    rng = np.random.default_rng([cfg.seed, int(index), DETAIL_STREAM])
    size = cfg.image_size
    side = max(3, 2 * int(round((cfg.detail_size * size / 64.0 - 1) / 2)) + 1)
    swing = NOISE_AMPLITUDE if background["kind"] == "noise" else 0.0
    contrast = {c: min(_contrast(c, b, swing) for b in background["colors"]) for c in cfg.detail_colors}
    allowed = [c for c in cfg.detail_colors if contrast[c] >= MIN_CONTRAST] or [max(contrast, key=contrast.get)]
    color = allowed[rng.integers(len(allowed))]
    shape = cfg.detail_shapes[rng.integers(len(cfg.detail_shapes))]

    gap = reach + 2.0  # the figure's box widened by its thickness, plus 1 px of background around the detail
    fig_lo, fig_hi = joints.min(axis=1) - gap, joints.max(axis=1) + gap  # [T, 2] (x, y)
    lo = np.ceil(1 + drift.max(axis=0)).astype(int)  # world (x, y) top-left range keeping the box inside
    hi = np.floor(size - 1 - side + drift.min(axis=0)).astype(int)
    hi = np.maximum(hi, lo)
    best, best_hits = None, None
    for _ in range(64):
        world = np.array([rng.integers(lo[0], hi[0] + 1), rng.integers(lo[1], hi[1] + 1)])
        topleft = np.floor(world - drift + 0.5).astype(int)  # [T, 2] (x, y)
        topleft = np.clip(topleft, 0, size - side)
        apart = (topleft + side <= fig_lo) | (topleft >= fig_hi)  # [T, 2]: separated along x / y
        hits = int((~apart.any(axis=1)).sum())
        if best_hits is None or hits < best_hits:
            best, best_hits = topleft, hits
        if hits == 0:
            break
    return {"color": color, "shape": shape, "size": side, "topleft": best[:, ::-1].copy()}


def _draw_detail(frames: np.ndarray, detail: dict) -> np.ndarray:
    """Paint the detail into ``frames`` in place; returns the bool ``[T, S, S]`` pixels it covers."""
    n_frames, size = frames.shape[:2]
    side, topleft = detail["size"], detail["topleft"]
    dr, dc = np.nonzero(detail_mask(detail["shape"], side))
    rows = topleft[:, :1] + dr[None]  # [T, n]
    cols = topleft[:, 1:] + dc[None]
    t = np.broadcast_to(np.arange(n_frames)[:, None], rows.shape)
    frames[t, rows, cols] = PALETTE[detail["color"]]
    covered = np.zeros((n_frames, size, size), bool)
    covered[t, rows, cols] = True
    return covered


def _camera_path(rng, n_frames: int, max_drift: float) -> np.ndarray:
    """Smooth pan [T, 2] (x, y) in pixels: an eased straight move plus a gentle sideways bow."""
    tau = np.linspace(0.0, 1.0, n_frames) if n_frames > 1 else np.zeros(1)
    magnitude = rng.uniform(0.3, 1.0) * max_drift
    angle = rng.uniform(0.0, 2 * np.pi)
    bow = rng.uniform(-0.25, 0.25) * magnitude
    along = magnitude * (tau * tau * (3 - 2 * tau) - 0.5)
    across = bow * np.sin(np.pi * tau)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([along * c - across * s, along * s + across * c], axis=-1)


# -- motion -------------------------------------------------------------------------------------------


def _direction(angle: np.ndarray) -> np.ndarray:
    """Unit vectors for angles measured from straight down, positive towards the image right."""
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1)


def _animate(rng, action: str, n_frames: int, size: int, height_range) -> tuple[np.ndarray, float]:
    """World joint positions [T, 13, 2] for one clip of ``action``, and the figure height in pixels."""
    height = rng.uniform(*height_range) * size
    t = np.arange(n_frames, dtype=np.float64)
    period = rng.uniform(*PERIODS[action])
    phase = rng.uniform(0.0, 2 * np.pi) + 2 * np.pi * t / period
    x = np.full(n_frames, rng.uniform(0.3, 0.7) * size)
    ground = rng.uniform(0.82, 0.94) * size
    lean, lift, torso = np.zeros(n_frames), np.zeros(n_frames), np.ones(n_frames)
    # Limb angles [T, 2] (columns: left, right), from straight down, positive towards the image right.
    upper = np.tile(_SIDE * 0.2, (n_frames, 1))
    fore = upper + _SIDE * 0.1
    thigh = np.tile(_SIDE * 0.08, (n_frames, 1))
    shin = thigh - _SIDE * 0.04

    if action in ("walk_left", "walk_right"):
        d = -1.0 if action == "walk_left" else 1.0
        swing = rng.uniform(0.35, 0.55)
        legs = phase[:, None] + np.array([0.0, np.pi])  # the two legs in antiphase
        thigh = _SIDE * 0.04 + d * swing * np.sin(legs)
        shin = thigh - d * rng.uniform(0.5, 0.9) * np.maximum(0.0, np.cos(legs))  # knee bends on the swing
        upper = _SIDE * 0.15 - d * 0.7 * swing * np.sin(legs)  # arms swing against the same-side leg
        fore = upper + d * 0.3
        lean[:] = d * 0.06
        speed = 1.6 * (THIGH + SHIN) * height * np.sin(swing) / period
        speed = min(speed, 0.7 * size / max(n_frames - 1, 1))
        x = rng.uniform(0.15, 0.85) * size + d * speed * (t - (n_frames - 1) / 2)
    elif action in ("wave_left_arm", "wave_right_arm"):
        k = 0 if action == "wave_left_arm" else 1
        upper[:, k] = _SIDE[k] * (np.pi - rng.uniform(0.5, 0.9)) + 0.08 * np.sin(phase)
        fore[:, k] = _SIDE[k] * (np.pi - 0.15) + rng.uniform(0.4, 0.7) * np.sin(phase)
    elif action == "jump":
        air = np.maximum(np.sin(phase), 0.0)[:, None]
        crouch = np.maximum(-np.sin(phase), 0.0)[:, None]  # knees bent on the ground, before take-off
        lift = rng.uniform(0.12, 0.2) * height * air[:, 0]
        bend = np.maximum(crouch, 0.3 * air)
        thigh = _SIDE * (0.08 + 0.7 * bend)
        shin = _SIDE * (0.04 - 0.5 * bend)
        upper = _SIDE * (0.2 + 1.6 * air)
        fore = upper + _SIDE * 0.2
    elif action == "squat":
        depth = ((1 - np.cos(phase)) / 2 * rng.uniform(0.7, 1.0))[:, None]
        thigh = _SIDE * (0.08 + 1.1 * depth)
        shin = _SIDE * (0.04 - 0.6 * depth)
        upper = _SIDE * (0.2 + 1.1 * depth)
        fore = upper + _SIDE * 0.15 * depth
    else:  # idle: breathing and a slight sway
        lean = 0.04 * np.sin(phase)
        torso = 1.0 + 0.03 * np.sin(2 * phase)
        upper = upper + _SIDE * 0.06 * np.sin(phase)[:, None]
        fore = upper + _SIDE * 0.1
        x = x + 0.01 * size * np.sin(phase)

    return _skeleton(x, ground, height, lean, lift, torso, upper, fore, thigh, shin), height


def _skeleton(x, ground, height: float, lean, lift, torso, upper, fore, thigh, shin) -> np.ndarray:
    """Joint positions [T, 13, 2] from per-frame pelvis x, ground line (the lowest foot stands on it), spine lean,
    lift off the ground, torso stretch ([T] each) and limb angles ([T, 2]: left, right)."""
    up = np.stack([np.sin(lean), -np.cos(lean)], axis=-1)[:, None]  # [T, 1, 2] spine direction
    across = np.stack([np.cos(lean), np.sin(lean)], axis=-1)[:, None]  # [T, 1, 2] towards the image right
    side = _SIDE[None, :, None]
    hip = side * HIP_HALF_WIDTH * height * across  # [T, 2, 2] relative to the pelvis centre
    knee = hip + THIGH * height * _direction(thigh)
    ankle = knee + SHIN * height * _direction(shin)
    pelvis_y = ground - ankle[..., 1].max(axis=1) - lift  # the lowest foot stands on the ground
    pelvis = np.stack([x, pelvis_y], axis=-1)[:, None]
    neck = pelvis + TORSO * height * torso[:, None, None] * up
    head = neck + NECK * height * up
    shoulder = neck + side * SHOULDER_HALF_WIDTH * height * across
    elbow = shoulder + UPPER_ARM * height * _direction(upper)
    wrist = elbow + FOREARM * height * _direction(fore)
    limbs = [head, shoulder, elbow, wrist, pelvis + hip, pelvis + knee, pelvis + ankle]
    return np.concatenate(limbs, axis=1)


# -- rendering ----------------------------------------------------------------------------------------


def _render_background(bg: dict, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """uint8 RGB background [T, S, S, 3], sampled at the world pixel centres xs, ys [T, S]."""
    colors = np.array([PALETTE[c] for c in bg["colors"]], np.uint8)
    kind = bg["kind"]
    shape = (*xs.shape, xs.shape[1], 3)
    if kind == "plain":
        return np.broadcast_to(colors[0], shape).copy()
    if kind == "stripes":  # box-filtered (anti-aliased): each pixel shows the share of colour 1 it covers
        coord = (xs if bg["vertical"] else ys) + bg["offset"]
        cover = _band_coverage(coord, bg["period"])  # [T, S]
        cover = cover[:, None, :, None] if bg["vertical"] else cover[:, :, None, None]
        return _blend(colors, np.broadcast_to(cover, shape))
    if kind == "checker":  # the product of two +-1 square waves, box-filtered per axis (separable)
        mx = 1.0 - 2.0 * _band_coverage(xs + bg["offset"][0], 2 * bg["cell"])
        my = 1.0 - 2.0 * _band_coverage(ys + bg["offset"][1], 2 * bg["cell"])
        cover = 0.5 * (1.0 - my[:, :, None] * mx[:, None, :])  # [T, S, S]
        return _blend(colors, cover[..., None])
    # noise: value noise on a coarse grid, smoothstep-interpolated (separable, so two small matmuls)
    grid = bg["grid"].astype(np.float32)
    wy, wx = (_interp_weights((c - bg["origin"]) / bg["cell"], len(grid)) for c in (ys, xs))
    noise = wy @ grid @ wx.transpose(0, 2, 1)  # [T, S, S]
    noisy = colors[0].astype(np.float32) + (NOISE_AMPLITUDE * noise[..., None] + 0.5)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _band_coverage(coord: np.ndarray, period: float) -> np.ndarray:
    """Share of the unit pixel centred at ``coord`` that lies in the odd half of a square wave of ``period``."""
    half = period / 2

    def odd_length(u):  # measure of odd half-periods in [0, u]
        return np.floor(u / period) * half + np.clip(np.mod(u, period) - half, 0.0, half)

    return (odd_length(coord + 0.5) - odd_length(coord - 0.5)).astype(np.float32)


def _blend(colors: np.ndarray, cover: np.ndarray) -> np.ndarray:
    """uint8 mix of ``colors[0]`` and ``colors[1]`` with weight ``cover`` of the second."""
    c0, c1 = colors[0].astype(np.float32), colors[1].astype(np.float32)
    return (c0 + (c1 - c0) * cover + 0.5).astype(np.uint8)


def _interp_weights(u: np.ndarray, n: int) -> np.ndarray:
    """Smoothstep interpolation weights [T, S, n] for fractional grid positions ``u`` [T, S]."""
    i = np.floor(u).astype(np.int64)
    f = (u - i).astype(np.float32)
    f = f * f * (3 - 2 * f)
    w = np.zeros((*u.shape, n), np.float32)
    np.put_along_axis(w, i[..., None], (1 - f)[..., None], axis=-1)
    np.put_along_axis(w, i[..., None] + 1, f[..., None], axis=-1)
    return w


def _segment_distance(px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance [n, H, W] from pixel centres (px [n, W], py [n, H]) to the nearest segment a->b [n, E, 2]."""
    f32 = np.float32
    ab = (b - a)[..., None, None]  # [n, E, 2, 1, 1]
    abx, aby = ab[..., 0, :, :].astype(f32), ab[..., 1, :, :].astype(f32)  # [n, E, 1, 1]
    inv = (1.0 / np.maximum(abx * abx + aby * aby, 1e-9)).astype(f32)
    dx = (px[:, None, None, :] - a[..., 0, None, None]).astype(f32)  # [n, E, 1, W]
    dy = (py[:, None, :, None] - a[..., 1, None, None]).astype(f32)  # [n, E, H, 1]
    t = dx * (abx * inv) + dy * (aby * inv)  # [n, E, H, W], position along the segment
    np.clip(t, 0.0, 1.0, out=t)
    ex = t * abx
    np.subtract(dx, ex, out=ex)
    ey = np.multiply(t, aby, out=t)
    np.subtract(dy, ey, out=ey)
    ex *= ex
    ey *= ey
    ex += ey
    return np.sqrt(ex.min(axis=1))


def _figure_alpha(joints: np.ndarray, size: int, half_width: float, head_radius: float):
    """Anti-aliased coverage of the figure (thick bones plus a filled head disc) in a window around it.

    Returns ``(window, alpha)``: ``frames[window]`` is the [T, H, W, 3] window and ``alpha`` [T, H, W] its
    coverage in [0, 1], or ``(None, None)`` when the figure is out of view. The window has the same size in
    every frame, so the whole clip is one vectorised computation (in chunks of frames, to bound memory).
    """
    n_frames = len(joints)
    pad = max(half_width, head_radius) + 1.0
    lo = np.clip(np.floor(joints.min(axis=1) - pad), 0, size).astype(np.int64)  # [T, 2] (x, y)
    hi = np.clip(np.ceil(joints.max(axis=1) + pad), 0, size).astype(np.int64)
    extent = (hi - lo).max(axis=0)  # window (width, height)
    if extent.min() <= 0:
        return None, None
    lo = np.minimum(lo, size - extent)  # keep the window inside the frame
    cols = lo[:, :1] + np.arange(extent[0])  # [T, W]
    rows = lo[:, 1:] + np.arange(extent[1])  # [T, H]
    alpha = np.empty((n_frames, extent[1], extent[0]), np.float32)
    chunk = max(1, int(3e6 // (len(SKELETON) * extent[0] * extent[1])))
    for s in range(0, n_frames, chunk):
        j = joints[s : s + chunk]
        px, py = cols[s : s + chunk] + 0.5, rows[s : s + chunk] + 0.5
        bones = _segment_distance(px, py, j[:, _EDGE_A], j[:, _EDGE_B]) - half_width
        head = j[:, :1]
        dist = np.minimum(bones, _segment_distance(px, py, head, head) - head_radius)
        alpha[s : s + chunk] = np.clip(0.5 - dist, 0, 1)
    window = np.arange(n_frames)[:, None, None], rows[:, :, None], cols[:, None, :]
    return window, alpha
