"""The controllable toy world: deterministic given its actions, and an action changes the next frame."""

from __future__ import annotations

import numpy as np
import pytest

from mmsuite.sources import controllable as cw
from mmsuite.sources import toyworld

CFG = cw.ControlWorldConfig(image_size=64, frames=12, seed=3)
SCENE = {"color": "red", "height": 0.42 * 64, "background": {"kind": "plain", "colors": ("blue",)}}
START = cw.ControlState(x=32.0, y=50.0, style=0, phase=0.0)
STAY, LEFT, RIGHT, UP, DOWN, SWITCH = range(6)


def _scene(kind: str = "plain") -> dict:
    rng = np.random.default_rng(0)
    return {**SCENE, "background": toyworld._sample_background(rng, (kind,), "red", 64)}


def test_rendering_is_a_pure_function_of_start_and_actions():
    actions = np.array([STAY, LEFT, LEFT, UP, SWITCH, RIGHT, DOWN, STAY, STAY, RIGHT, RIGHT, SWITCH])
    a = cw.render_control(CFG, _scene("noise"), START, actions)
    b = cw.render_control(CFG, _scene("noise"), START, actions.copy())
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    clip1, clip2 = cw.make_control_clip(CFG, 5), cw.make_control_clip(CFG, 5)
    assert np.array_equal(clip1.frames, clip2.frames) and np.array_equal(clip1.actions, clip2.actions)
    assert clip1.actions.shape == (CFG.frames,) and clip1.frames.shape == (CFG.frames, 64, 64, 3)
    assert not np.array_equal(clip1.frames, cw.make_control_clip(CFG, 6).frames)


@pytest.mark.parametrize("action", [LEFT, RIGHT, UP, DOWN, SWITCH])
def test_an_action_changes_the_next_frame_and_nothing_before_it(action):
    base = np.full(CFG.frames, STAY)
    other = base.copy()
    other[6] = action
    f0, j0 = cw.render_control(CFG, _scene(), START, base)
    f1, j1 = cw.render_control(CFG, _scene(), START, other)
    assert np.array_equal(f0[:6], f1[:6])  # actions[t] acts on frame t, not before
    assert not np.array_equal(f0[6], f1[6])
    if action != SWITCH:  # a move shifts every joint by the step (no wall nearby), at least one 8-px latent cell
        shift = (j1[6] - j0[6]).mean(axis=0)
        expected = {LEFT: (-8, 0), RIGHT: (8, 0), UP: (0, -8), DOWN: (0, 8)}[action]
        np.testing.assert_allclose(shift, expected, atol=1e-4)


def test_moves_bounce_off_the_walls():
    height = SCENE["height"]
    (x_lo, x_hi), (y_lo, y_hi) = cw.control_walls(CFG, height)
    states = cw.control_states(CFG, START, np.array([STAY] + [LEFT] * 20 + [DOWN] * 20), height)
    xs, ys = np.array([s.x for s in states]), np.array([s.y for s in states])
    assert (xs >= x_lo).all() and (xs <= x_hi).all() and (ys >= y_lo).all() and (ys <= y_hi).all()
    assert np.diff(xs[1:21]).max() > 0  # it came back off the left wall
    assert cw.control_step(CFG, cw.ControlState(x_lo + 2, 40.0, 0, 0.0), LEFT, height).x == pytest.approx(x_lo + 6)


def test_actions_change_at_random_times_at_the_configured_rate():
    cfg = cw.ControlWorldConfig(frames=64, change_prob=0.25)
    actions = np.stack([cw.make_control_clip(cfg, i).actions for i in range(60)])
    changes = (np.diff(actions, axis=1) != 0).mean()
    assert 0.25 * 5 / 6 - 0.04 < changes < 0.25 * 5 / 6 + 0.04  # a new draw repeats the old action 1/6 of the time
    assert set(np.unique(actions)) == set(range(len(cw.CONTROL_ACTIONS)))


def test_world_config_picks_either_world_and_names_bad_settings():
    assert isinstance(cw.world_config({"seed": 1}), toyworld.ToyWorldConfig)
    assert isinstance(cw.world_config({"kind": "control", "seed": 1}), cw.ControlWorldConfig)
    assert cw.action_names(cw.world_config({})) == toyworld.ACTIONS
    assert cw.action_names(CFG) == cw.CONTROL_ACTIONS
    with pytest.raises(ValueError, match="world kind"):
        cw.world_config({"kind": "maze"})
    with pytest.raises(ValueError, match="step_px"):
        cw.world_config({"kind": "control", "step_px": 0.5})
    with pytest.raises(TypeError, match="drift_px"):
        cw.world_config({"kind": "control", "drift_px": 3.0})  # a scripted-world setting
    # the scripted world's data sets keep their names; the controllable world's are tagged
    assert cw.render_version({"seed": 0}) == toyworld.RENDER_VERSION
    assert cw.render_version({"kind": "control"}) != toyworld.RENDER_VERSION
