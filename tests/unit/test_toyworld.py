"""The procedural toy world: determinism, shapes, joint/pixel consistency, motion, captions, config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmsuite.sources import toyworld as tw

N_CLIPS = 120  # clips scanned by the coverage tests (about half with an occluder)
BG_WORDS = {"plain": "plain", "stripes": "striped", "checker": "checkered", "noise": "noisy"}
ACTION_WORDS = {  # written out independently of the module's phrase table
    "walk_left": ("walking", "left"),
    "walk_right": ("walking", "right"),
    "wave_left_arm": ("waving", "left arm"),
    "wave_right_arm": ("waving", "right arm"),
    "jump": ("jumping",),
    "squat": ("squatting",),
    "idle": ("standing",),
}


@pytest.fixture(scope="module")
def clips() -> list[tw.Clip]:
    return list(tw.iter_clips(tw.ToyWorldConfig(occluder_prob=0.5), 0, N_CLIPS))


def _pixels_at(clip: tw.Clip, t: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Frame pixels [N, 3] under joints (t, j), via the documented pixel convention."""
    x, y = clip.joints[t, j, 0], clip.joints[t, j, 1]
    return clip.frames[t, np.floor(y).astype(int), np.floor(x).astype(int)]


def _one_action(action: str, index: int = 0, **kwargs) -> tw.Clip:
    cfg = tw.ToyWorldConfig(actions=(action,), drift_px=0.0, occluder_prob=0.0, **kwargs)
    return tw.make_clip(cfg, index)


# -- determinism --------------------------------------------------------------------------------------


def test_same_seed_and_index_give_identical_clips():
    a = tw.make_clip(tw.ToyWorldConfig(seed=3), 11)
    np.random.seed(0)  # the global RNG must play no part
    b = tw.make_clip(tw.ToyWorldConfig(seed=3), 11)
    for field in ("frames", "joints", "visible", "actions"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.caption, a.attributes, a.index) == (b.caption, b.attributes, 11)


def test_other_index_or_seed_gives_other_clips():
    base = tw.make_clip(tw.ToyWorldConfig(seed=3), 11)
    for other in (tw.make_clip(tw.ToyWorldConfig(seed=3), 12), tw.make_clip(tw.ToyWorldConfig(seed=4), 11)):
        assert not np.array_equal(base.frames, other.frames)
        assert not np.allclose(base.joints, other.joints)


def test_iter_clips_yields_the_same_clips_as_make_clip():
    cfg = tw.ToyWorldConfig(frames=4)
    got = list(tw.iter_clips(cfg, 5, 3))
    assert [c.index for c in got] == [5, 6, 7]
    np.testing.assert_array_equal(got[1].frames, tw.make_clip(cfg, 6).frames)
    assert list(tw.iter_clips(cfg, 5, 0)) == []
    with pytest.raises(ValueError, match="count"):
        list(tw.iter_clips(cfg, 0, -1))
    with pytest.raises(ValueError, match="index"):
        tw.make_clip(cfg, -1)


# -- shapes and pixel / joint consistency -------------------------------------------------------------


@pytest.mark.parametrize(("size", "frames"), [(32, 16), (64, 16), (256, 3)])
def test_shapes_dtypes_and_figure_under_visible_joints(size, frames):
    cfg = tw.ToyWorldConfig(image_size=size, frames=frames)
    for index in range(4):
        clip = tw.make_clip(cfg, index)
        assert clip.frames.shape == (frames, size, size, 3) and clip.frames.dtype == np.uint8
        assert clip.joints.shape == (frames, len(tw.JOINTS), 2) and clip.joints.dtype == np.float32
        assert clip.visible.shape == (frames, len(tw.JOINTS)) and clip.visible.dtype == np.bool_
        assert clip.actions.shape == (frames,) and clip.actions.dtype == np.int64
        assert (clip.actions == tw.ACTIONS.index(clip.attributes["action"])).all()
        assert json.loads(json.dumps(clip.attributes))["color"] == clip.attributes["color"]
        t, j = np.nonzero(clip.visible)
        assert len(t) > 0
        assert (_pixels_at(clip, t, j) == tw.PALETTE[clip.attributes["color"]]).all()


def test_figure_colour_under_every_visible_joint(clips):
    for clip in clips:
        t, j = np.nonzero(clip.visible)
        assert (_pixels_at(clip, t, j) == tw.PALETTE[clip.attributes["color"]]).all(), clip.caption


def test_visibility_means_inside_and_not_occluded(clips):
    n_occluded = n_outside = 0
    for clip in clips:
        size = clip.frames.shape[1]
        inside = ((clip.joints >= 0) & (clip.joints < size)).all(-1)
        assert not (clip.visible & ~inside).any()
        t, j = np.nonzero(inside & ~clip.visible)
        if len(t):  # hidden although inside the frame: the occluder must be over it
            assert clip.attributes["occluder_color"] is not None
            assert (_pixels_at(clip, t, j) == clip.attributes["occluder_color"]).all()
        n_occluded += len(t)
        n_outside += int((~inside).sum())
    assert n_occluded > 0 and n_outside > 0  # both kinds of invisibility actually occur


def test_figure_is_drawn_only_near_its_skeleton(clips):
    for clip in clips[:40]:
        size = clip.frames.shape[1]
        figure = np.array(tw.PALETTE[clip.attributes["color"]])
        rows, cols = np.mgrid[0:size, 0:size] + 0.5
        for t in range(0, len(clip.frames), 5):
            near = np.zeros((size, size), bool)  # within reach of any bone, generously
            for a, b in tw.SKELETON:
                pa, pb = clip.joints[t, a], clip.joints[t, b]
                for s in np.linspace(0, 1, 12):
                    x, y = pa + s * (pb - pa)
                    near |= (cols - x) ** 2 + (rows - y) ** 2 < (0.1 * size) ** 2
            dist = np.linalg.norm(clip.frames[t].astype(float) - figure, axis=-1)
            assert dist[~near].min() > 50, clip.caption
            assert (dist[near] == 0).sum() > 0.004 * size * size


def test_figure_colour_contrasts_with_the_background(clips):
    for clip in clips:
        a = clip.attributes
        for name in (a["background_color"], a["background_color2"]):
            if name is not None:
                dist = np.linalg.norm(np.subtract(tw.PALETTE[a["color"]], tw.PALETTE[name]))
                assert dist >= tw.MIN_CONTRAST, clip.caption
    for color in tw.FIGURE_COLORS:
        for kind in tw.BACKGROUNDS:
            first = tw.background_colors(color, kind)
            assert first and all(tw.background_colors(color, kind, c) for c in first)


# -- attributes, captions and coverage ----------------------------------------------------------------


def test_every_action_background_and_colour_is_reachable(clips):
    assert {c.attributes["action"] for c in clips} == set(tw.ACTIONS)
    assert {c.attributes["background"] for c in clips} == set(tw.BACKGROUNDS)
    assert {c.attributes["color"] for c in clips} == set(tw.FIGURE_COLORS)
    assert {c.attributes["occluder_color"] is None for c in clips} == {True, False}


def test_captions_name_colour_action_and_background(clips):
    for clip in clips:
        a, text = clip.attributes, clip.caption
        assert text.startswith(("a ", "an ")) and f" {a['color']} figure " in text
        assert tw.ACTION_PHRASES[a["action"]] in text
        assert all(word in text for word in ACTION_WORDS[a["action"]])
        others = {w for name, words in ACTION_WORDS.items() if name != a["action"] for w in words}
        assert not any(f"{w} " in text for w in others - set(ACTION_WORDS[a["action"]]) - {"left", "right"})
        assert ("left" in text) + ("right" in text) == ("left" in a["action"]) + ("right" in a["action"])
        assert f"{BG_WORDS[a['background']]}" in text and text.endswith(" background")
        assert a["background_color"] in text
        assert (a["background_color2"] is not None) == (a["background"] in ("stripes", "checker"))
        if a["background_color2"] is not None:
            assert a["background_color2"] in text
    assert tw.make_clip(tw.ToyWorldConfig(colors=("orange",)), 0).caption.startswith("an orange figure ")


def test_config_subsets_restrict_what_is_drawn():
    cfg = tw.ToyWorldConfig(actions=["jump"], backgrounds=["checker"], colors=["blue"], frames=2)
    assert cfg.actions == ("jump",)  # lists (from Hydra / JSON) become tuples
    for clip in tw.iter_clips(cfg, 0, 5):
        assert (clip.attributes["action"], clip.attributes["background"], clip.attributes["color"]) == (
            "jump",
            "checker",
            "blue",
        )
        assert (clip.actions == 4).all()  # ids index the global ACTIONS, not the configured subset


# -- motion and camera --------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2])
def test_actions_move_the_body_as_named(index):
    j = {name: i for i, name in enumerate(tw.JOINTS)}
    size = 64
    hips_x = lambda c: c.joints[:, [j["left_hip"], j["right_hip"]], 0].mean(1)

    assert (np.diff(hips_x(_one_action("walk_right", index))) > 0).all()
    assert (np.diff(hips_x(_one_action("walk_left", index))) < 0).all()
    for side, other in (("left", "right"), ("right", "left")):
        c = _one_action(f"wave_{side}_arm", index)
        assert (c.joints[:, j[f"{side}_wrist"], 1] < c.joints[:, j["head"], 1]).all()  # raised above head
        assert (c.joints[:, j[f"{other}_wrist"], 1] > c.joints[:, j[f"{other}_shoulder"], 1]).all()
        assert np.ptp(c.joints[:, j[f"{side}_wrist"], 0]) > 0.03 * size  # and waving
    # the figure faces the viewer: its left side is on the image's right
    assert (c.joints[:, j["left_shoulder"], 0] > c.joints[:, j["right_shoulder"], 0]).all()

    lowest_foot = lambda c: c.joints[:, [j["left_ankle"], j["right_ankle"]], 1].max(1)
    jump = _one_action("jump", index)
    assert np.ptp(lowest_foot(jump)) > 0.04 * size  # both feet leave the ground
    squat = _one_action("squat", index)
    assert np.ptp(lowest_foot(squat)) < 1e-3  # feet stay planted...
    assert np.ptp(squat.joints[:, j["left_hip"], 1]) > 0.05 * size  # ...while the hips go down and up
    idle = _one_action("idle", index)
    assert np.ptp(idle.joints, axis=0).max() < 0.06 * size and np.ptp(idle.joints, axis=0).max() > 0.1


def test_camera_drift_moves_figure_and_background_together():
    base = dict(actions=("idle",), backgrounds=("checker",), occluder_prob=0.0)
    still = tw.make_clip(tw.ToyWorldConfig(drift_px=0.0, **base), 4)
    moving = tw.make_clip(tw.ToyWorldConfig(drift_px=6.0, **base), 4)
    shift = (moving.joints - still.joints).astype(np.float64)  # [T, 13, 2]
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1], shift.shape), atol=1e-3)
    path = shift[:, 0]
    assert np.linalg.norm(path[-1] - path[0]) > 1.0  # it moves...
    assert np.linalg.norm(path[:, None] - path[None], axis=-1).max() <= 6.0 + 1e-3  # ...by at most drift_px
    # the background (top rows, well above the figure's head) is static without drift, moves with it
    top = slice(0, 6)
    assert (np.stack([still.joints[:, 0, 1], moving.joints[:, 0, 1]]) > 12).all()
    np.testing.assert_array_equal(still.frames[0, top], still.frames[-1, top])
    assert not np.array_equal(moving.frames[0, top], moving.frames[-1, top])


def test_background_moves_with_the_figure():
    """A drifted frame's background is the undrifted one shifted (found by image search) like the joints."""
    cfg = dict(actions=("idle",), backgrounds=("noise",), occluder_prob=0.0)
    m, size = 10, 64  # search radius; compare the central window only
    for index in range(4):
        still = tw.make_clip(tw.ToyWorldConfig(drift_px=0.0, **cfg), index)
        moving = tw.make_clip(tw.ToyWorldConfig(drift_px=16.0, **cfg), index)
        figure = np.array(tw.PALETTE[still.attributes["color"]])
        for t in (0, -1):
            want = (moving.joints - still.joints)[t, 0].astype(np.float64)  # (x, y) content shift
            a, b = still.frames[t].astype(np.float64), moving.frames[t].astype(np.float64)
            # background only: drop pixels within 3 px of anything figure-coloured, in either image
            near = [np.linalg.norm(img - figure, axis=-1) < 120 for img in (a, b)]
            for _ in range(3):
                near = [n | np.roll(n, 1, 0) | np.roll(n, -1, 0) for n in near]
                near = [n | np.roll(n, 1, 1) | np.roll(n, -1, 1) for n in near]
            errors = {}
            for dx in range(-m, m + 1):
                for dy in range(-m, m + 1):
                    src = (slice(m - dy, size - m - dy), slice(m - dx, size - m - dx))
                    keep = ~near[1][m:-m, m:-m] & ~near[0][src]
                    errors[dx, dy] = np.mean(((b[m:-m, m:-m] - a[src]) ** 2).sum(-1)[keep])
            found = np.array(min(errors, key=errors.get))
            assert np.linalg.norm(want) > 1.5 and np.abs(found - want).max() < 1.0, (found, want)


# -- config validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"image_size": 16}, "image_size"),
        ({"image_size": 300}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"frames": 0}, "frames"),
        ({"seed": -1}, "seed"),
        ({"occluder_prob": 1.5}, "occluder_prob"),
        ({"drift_px": -1.0}, "drift_px"),
        ({"limb_width": 0.5}, "limb_width"),
        ({"figure_height": (0.6, 0.5)}, "figure_height"),
        ({"actions": ("run",)}, "actions"),
        ({"actions": ()}, "actions"),
        ({"backgrounds": ("stars",)}, "backgrounds"),
        ({"colors": ("red", "red")}, "colors"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ToyWorldConfig.{field} "):
        tw.ToyWorldConfig(**kwargs)


def test_default_config_and_skeleton_are_sane():
    cfg = tw.ToyWorldConfig()
    assert (cfg.image_size, cfg.frames, cfg.seed, cfg.occluder_prob, cfg.drift_px) == (64, 16, 0, 0.2, 3.0)
    assert len(tw.JOINTS) == 13 and tw.JOINTS[0] == "head" and tw.JOINTS[-1] == "right_ankle"
    assert {i for edge in tw.SKELETON for i in edge} == set(range(13))
    assert all(0 <= a < 13 and 0 <= b < 13 and a != b for a, b in tw.SKELETON)


# -- draw_skeleton ------------------------------------------------------------------------------------


def test_draw_skeleton_draws_visible_bones_on_a_copy():
    clip = _one_action("idle", 2)
    assert clip.visible.all()
    image, joints = clip.frames[0], clip.joints[0]
    before = image.copy()
    color = (255, 0, 255)
    visible = np.zeros(13, bool)
    visible[[1, 3, 5]] = True  # left shoulder, elbow, wrist; the right arm stays hidden
    out = tw.draw_skeleton(image, joints, visible, color=color)
    np.testing.assert_array_equal(image, before)  # input untouched
    assert not np.shares_memory(out, image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out != image).any(-1).sum() > 10
    at = lambda img, p: img[int(p[1]), int(p[0])]
    for a, b in ((1, 3), (3, 5)):
        assert (at(out, joints[a]) == color).all()
        assert (at(out, (joints[a] + joints[b]) / 2) != at(image, (joints[a] + joints[b]) / 2)).any()
    assert (at(out, (joints[2] + joints[4]) / 2) == at(image, (joints[2] + joints[4]) / 2)).all()
    np.testing.assert_array_equal(tw.draw_skeleton(image, joints, np.zeros(13, bool)), image)
    with pytest.raises(ValueError):
        tw.draw_skeleton(image[..., 0], joints, visible)


# -- anti-aliased patterns ----------------------------------------------------------------------------


@pytest.mark.parametrize("period", [4.0, 16.0, 23.7])
def test_band_coverage_matches_supersampling(period):
    """Each pixel shows the share of its area inside the odd half-periods (box filter), not a point sample."""
    coord = np.linspace(-7.3, 41.9, 97)[None, :]
    fine = coord[..., None] + (np.arange(400) + 0.5) / 400 - 0.5  # 400 sub-samples across each pixel
    expected = (np.floor(fine / (period / 2)) % 2).mean(-1)
    np.testing.assert_allclose(tw._band_coverage(coord, period), expected, atol=2e-3)


def test_pattern_edges_are_blended_and_interiors_exact():
    cfg = tw.ToyWorldConfig(backgrounds=("stripes", "checker"), occluder_prob=0.0, frames=2)
    mixed = 0
    for index in range(6):
        clip = tw.make_clip(cfg, index)
        a = clip.attributes
        c0, c1 = (np.array(tw.PALETTE[n], np.int64) for n in (a["background_color"], a["background_color2"]))
        top = clip.frames[0, :6].reshape(-1, 3).astype(np.int64)  # rows above the figure's head
        exact = (top == c0).all(-1) | (top == c1).all(-1)
        assert exact.mean() > 0.6  # band interiors carry the two palette colours exactly
        # every other pixel is a mix of the two: on the segment between them (up to uint8 rounding)
        t = ((top - c0) @ (c1 - c0)) / float((c1 - c0) @ (c1 - c0))
        assert ((t > -0.01) & (t < 1.01)).all()
        assert np.abs(c0 + np.clip(t, 0, 1)[:, None] * (c1 - c0) - top).max() <= 1.0
        mixed += int((~exact).sum())
    assert mixed > 0  # edges at sub-pixel positions are blended, not point-sampled


def test_data_set_name_changes_with_the_render_version(monkeypatch):
    """Shards rendered by older toy-world code are never silently reused."""
    from mmsuite.datamodules.clips import FramesDataModule

    kw = dict(
        world={"image_size": 32},
        n_clips=10,
        splits={"train": 0.8, "val": 0.1, "test": 0.1},
        data_dir="/tmp",
        batch_size=4,
    )
    name = FramesDataModule(**kw).dataset_name
    assert name == FramesDataModule(**kw).dataset_name
    monkeypatch.setattr(tw, "RENDER_VERSION", tw.RENDER_VERSION + 1)
    assert FramesDataModule(**kw).dataset_name != name
