"""The controllable toy world: a figure that the clip's per-frame actions steer.

``actions[t]`` takes the state of frame ``t − 1`` to frame ``t`` (frame 0 shows the start state; ``actions[0]`` is
stored but acts on nothing): move left/right/up/down by ``step_px`` (one latent cell of an f8 tokenizer by default),
bouncing off the walls, stay, or switch the figure's limb movement to the next style. New actions come at random
times. No camera motion and no occluder, so what changes between frames is what the actions and the figure's own
limb movement do; a clip is a pure function of its scene, start state and actions (:func:`render_control`). The
figure, its colours and backgrounds are the scripted world's (:mod:`mmsuite.sources.toyworld`), which is kept as it
is for the other experiments; :func:`world_config` picks either from a data config's ``world`` dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmsuite.sources import toyworld
from mmsuite.sources.toyworld import (
    _SIDE,
    BACKGROUNDS,
    FIGURE_COLORS,
    HEAD_RADIUS,
    PALETTE,
    Clip,
    ToyWorldConfig,
    _check_int,
    _figure_alpha,
    _render_background,
    _sample_background,
    _skeleton,
)

# Bump when the rendering of a given (config, index) changes (it names the data sets made from this world).
RENDER_VERSION = 1

CONTROL_ACTIONS: tuple[str, ...] = ("stay", "left", "right", "up", "down", "switch")
_CONTROL_MOVES = {"stay": (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "switch": (0, 0)}
CONTROL_STYLES: tuple[str, ...] = ("idle", "wave", "march", "squat")  # what "switch" cycles through
CONTROL_STYLE_PHRASES = {"idle": "standing", "wave": "waving", "march": "marching", "squat": "squatting"}


@dataclass(frozen=True)
class ControlWorldConfig:
    """Settings of the controllable world (``world: {kind: control, ...}``); lengths are given at S=64.

    step_px: how far one move action takes the figure (8 = one latent cell of an f8 tokenizer at S=64).
    change_prob: the chance per frame that a new action is drawn (uniformly, so it may repeat the old one).
    period: frames per cycle of the figure's limb movement (its style).
    limb_width, figure_height: the figure's limb thickness (px at S=64) and height range (a fraction of S).
    """

    image_size: int = 64
    frames: int = 16
    seed: int = 0
    step_px: float = 8.0
    change_prob: float = 0.25
    period: float = 6.0
    limb_width: float = 7.0  # a larger, thicker figure than the scripted world's: the tokenizer reconstructs it
    figure_height: tuple[float, float] = (0.45, 0.55)  # ~28 dB, far above copy-last's ~20 dB at one frame
    backgrounds: tuple[str, ...] = ("plain", "noise")
    colors: tuple[str, ...] = FIGURE_COLORS

    def __post_init__(self):
        for name in ("figure_height", "backgrounds", "colors"):  # lists from Hydra / JSON
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_int("image_size", self.image_size, 32, 256)
        _check_int("frames", self.frames, 1, None)
        _check_int("seed", self.seed, 0, None)
        lo_hi = self.figure_height
        if len(lo_hi) != 2 or not 0.2 <= lo_hi[0] <= lo_hi[1] <= 0.6:
            raise ValueError(f"ControlWorldConfig.figure_height must be (lo, hi), 0.2 <= lo <= hi <= 0.6, got {lo_hi}")
        if not 1.0 <= self.step_px <= 64 * (1 - lo_hi[1]) / 2:
            raise ValueError(
                f"ControlWorldConfig.step_px must be in [1, {64 * (1 - lo_hi[1]) / 2:g}] (a move fits between the "
                f"walls), got {self.step_px!r}"
            )
        if not 0.0 <= self.change_prob <= 1.0:
            raise ValueError(f"ControlWorldConfig.change_prob must be in [0, 1], got {self.change_prob!r}")
        if not self.period >= 2.0:
            raise ValueError(f"ControlWorldConfig.period must be >= 2 frames, got {self.period!r}")
        if not 2.5 <= self.limb_width <= 8.0:
            raise ValueError(f"ControlWorldConfig.limb_width must be in [2.5, 8], got {self.limb_width!r}")
        for name, allowed in (("backgrounds", BACKGROUNDS), ("colors", FIGURE_COLORS)):
            values = getattr(self, name)
            if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
                raise ValueError(
                    f"ControlWorldConfig.{name} must be a non-empty list of distinct names from {allowed}, got {values}"
                )


@dataclass(frozen=True)
class ControlState:
    """The controllable figure's state: pelvis column ``x`` and ground line ``y`` (pixels), limb style and phase."""

    x: float
    y: float
    style: int
    phase: float


def world_config(world: dict) -> ToyWorldConfig | ControlWorldConfig:
    """The world a data config's ``world`` dict names: ``kind: control`` for the controllable one, else (no
    ``kind``, or ``scripted``) the scripted world of :class:`ToyWorldConfig`."""
    world = dict(world)
    kind = world.pop("kind", "scripted")
    if kind == "control":
        return ControlWorldConfig(**world)
    if kind != "scripted":
        raise ValueError(f"world kind must be 'scripted' or 'control', got {kind!r}")
    return ToyWorldConfig(**world)


def render_version(world: dict):
    """The render version of the world a ``world`` dict names, for data set names: the scripted world's number as it
    was, the controllable world's tagged."""
    return f"control-{RENDER_VERSION}" if dict(world).get("kind") == "control" else toyworld.RENDER_VERSION


def action_names(cfg: ToyWorldConfig | ControlWorldConfig) -> tuple[str, ...]:
    """The names of the action ids in clips of ``cfg``'s world."""
    return CONTROL_ACTIONS if isinstance(cfg, ControlWorldConfig) else toyworld.ACTIONS


def render_clip(cfg: ToyWorldConfig | ControlWorldConfig, index: int) -> Clip:
    """Clip ``index`` of either world."""
    return make_control_clip(cfg, index) if isinstance(cfg, ControlWorldConfig) else toyworld.make_clip(cfg, index)


def control_walls(cfg: ControlWorldConfig, height: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """``((x_lo, x_hi), (y_lo, y_hi))``: where the pelvis column and the ground line may be for a figure of
    ``height`` px; a move past a wall bounces back off it by the overshoot."""
    size = cfg.image_size
    margin = 0.03 * size
    half_width = 0.3 * height
    return (margin + half_width, size - margin - half_width), (margin + height, size - margin)


def control_step(cfg: ControlWorldConfig, state: ControlState, action: int, height: float) -> ControlState:
    """The state after one action: a move of ``step_px`` (scaled) bounced off the walls, or the next style."""
    name = CONTROL_ACTIONS[int(action)]
    dx, dy = _CONTROL_MOVES[name]
    step = cfg.step_px * cfg.image_size / 64.0
    (x_lo, x_hi), (y_lo, y_hi) = control_walls(cfg, height)
    style = (state.style + 1) % len(CONTROL_STYLES) if name == "switch" else state.style
    return ControlState(
        x=_bounce(state.x + dx * step, x_lo, x_hi),
        y=_bounce(state.y + dy * step, y_lo, y_hi),
        style=style,
        phase=state.phase + 2 * np.pi / cfg.period,
    )


def _bounce(v: float, lo: float, hi: float) -> float:
    return 2 * hi - v if v > hi else 2 * lo - v if v < lo else v


def control_states(cfg: ControlWorldConfig, start: ControlState, actions: np.ndarray, height: float):
    """The state of every frame: ``start`` for frame 0, then one :func:`control_step` per action ``actions[1:]``."""
    states = [start]
    for a in np.asarray(actions)[1:]:
        states.append(control_step(cfg, states[-1], int(a), height))
    return states


def _control_pose(states: Sequence[ControlState], height: float) -> np.ndarray:
    """Joints [T, 13, 2] of the figure in each state (the style sets the limb angles, the phase where they are)."""
    n = len(states)
    x = np.array([s.x for s in states], np.float64)
    ground = np.array([s.y for s in states], np.float64)
    style = np.array([s.style for s in states])
    wave = np.sin(np.array([s.phase for s in states], np.float64))
    lean, lift, torso = np.zeros(n), np.zeros(n), np.ones(n)
    upper = np.tile(_SIDE * 0.2, (n, 1))
    fore = upper + _SIDE * 0.1
    thigh = np.tile(_SIDE * 0.08, (n, 1))
    shin = thigh - _SIDE * 0.04
    idle, waving, march, squat = (style == i for i in range(4))
    upper[idle] = _SIDE * (0.2 + 0.15 * wave[idle, None])  # arms swing out and in
    fore[idle] = upper[idle] + _SIDE * 0.1
    upper[waving] = _SIDE * 2.4 + 0.1 * wave[waving, None]  # both arms up, forearms waving
    fore[waving] = _SIDE * 2.9 + 0.6 * wave[waving, None]
    legs = wave[march, None] * np.array([1.0, -1.0])  # knees up in turn
    thigh[march] = _SIDE * 0.08 - 0.9 * np.maximum(legs, 0.0) * _SIDE
    shin[march] = _SIDE * 0.04
    upper[march] = _SIDE * 0.2 + 0.5 * legs
    fore[march] = upper[march] + _SIDE * 0.2
    depth = (1 + wave[squat, None]) / 2  # down and up
    thigh[squat] = _SIDE * (0.08 + 1.1 * depth)
    shin[squat] = _SIDE * (0.04 - 0.6 * depth)
    upper[squat] = _SIDE * (0.3 + 1.2 * depth)
    fore[squat] = upper[squat] + _SIDE * 0.3
    return _skeleton(x, ground, height, lean, lift, torso, upper, fore, thigh, shin)


def render_control(
    cfg: ControlWorldConfig, scene: dict, start: ControlState, actions: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [T, S, S, 3] and joints float32 [T, 13, 2] of the figure in ``scene`` (its ``color``,
    ``height`` and ``background``) from ``start`` under ``actions`` [T]: a pure function of its arguments."""
    size = cfg.image_size
    states = control_states(cfg, start, actions, scene["height"])
    joints = _control_pose(states, scene["height"]).astype(np.float32)
    grid = np.broadcast_to(np.arange(size) + 0.5, (len(states), size))
    frames = _render_background(scene["background"], grid, grid)
    half_width = max(1.25, cfg.limb_width * size / 64.0 / 2)  # >= 1.25: a joint's own pixel is fully covered
    window, alpha = _figure_alpha(joints.astype(np.float64), size, half_width, HEAD_RADIUS * scene["height"])
    if window is not None:  # blend the figure colour into the window around it
        under = frames[window].astype(np.float32)
        rgb = np.array(PALETTE[scene["color"]], np.float32)
        frames[window] = (under + (rgb - under) * alpha[..., None] + 0.5).astype(np.uint8)
    return frames, joints


def make_control_clip(cfg: ControlWorldConfig, index: int) -> Clip:
    """Clip ``index`` of the controllable world: a random scene, start state and action sequence (a new action
    with probability ``change_prob`` per frame), rendered by :func:`render_control`; deterministic in
    ``(cfg.seed, index)``."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"clip index must be a non-negative integer, got {index!r}")
    rng = np.random.default_rng([cfg.seed, int(index), 0xC0])
    size = cfg.image_size
    color = cfg.colors[rng.integers(len(cfg.colors))]
    background = _sample_background(rng, cfg.backgrounds, color, size)
    height = rng.uniform(*cfg.figure_height) * size
    (x_lo, x_hi), (y_lo, y_hi) = control_walls(cfg, height)
    start = ControlState(
        x=rng.uniform(x_lo, x_hi),
        y=rng.uniform(y_lo, y_hi),
        style=int(rng.integers(len(CONTROL_STYLES))),
        phase=rng.uniform(0.0, 2 * np.pi),
    )
    actions = np.empty(cfg.frames, np.int64)
    actions[0] = rng.integers(len(CONTROL_ACTIONS))
    for t in range(1, cfg.frames):
        change = rng.random() < cfg.change_prob
        actions[t] = rng.integers(len(CONTROL_ACTIONS)) if change else actions[t - 1]
    scene = {"color": color, "height": height, "background": background}
    frames, joints = render_control(cfg, scene, start, actions)
    visible = np.all((joints >= 0) & (joints < size), axis=-1)
    colors = background["colors"]
    attributes = {
        "color": color,
        "background": background["kind"],
        "background_color": colors[0],
        "background_color2": colors[1] if len(colors) > 1 else None,
        "style": CONTROL_STYLES[start.style],
        "occluder_color": None,
    }
    scene_text = {"plain": f"plain {colors[0]}", "noise": f"noisy {colors[0]}"}.get(background["kind"], colors[0])
    article = "an" if color[0] in "aeiou" else "a"
    text = f"{article} {color} figure {CONTROL_STYLE_PHRASES[CONTROL_STYLES[start.style]]} on a {scene_text} background"
    return Clip(
        index=int(index),
        frames=frames,
        joints=joints,
        visible=visible,
        actions=actions,
        caption=text,
        attributes=attributes,
    )
