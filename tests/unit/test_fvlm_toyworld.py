"""The toy world's small detail (for the foveated VLM): off by default, deterministic, where its metadata says."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mmsuite.sources import toyworld as tw

N_CLIPS = 48


@pytest.fixture(scope="module")
def pairs() -> list[tuple[tw.Clip, tw.Clip]]:
    """(without, with) the detail, for the same clips."""
    off = tw.ToyWorldConfig(occluder_prob=0.5)
    on = tw.ToyWorldConfig(occluder_prob=0.5, detail=True)
    return [(tw.make_clip(off, i), tw.make_clip(on, i)) for i in range(N_CLIPS)]


def _expected_mask(clip: tw.Clip) -> np.ndarray:
    """bool [T, S, S]: the detail's pixels, from its metadata alone."""
    a = clip.attributes
    side, shape = a["detail_size"], tw.detail_mask(a["detail_shape"], a["detail_size"])
    mask = np.zeros(clip.frames.shape[:3], bool)
    for t, (row, col) in enumerate(a["detail_topleft"]):
        mask[t, row : row + side, col : col + side] = shape
    return mask


def test_default_render_is_unchanged():
    """The detail is off by default and the default render is the one before it existed (bump this digest together
    with RENDER_VERSION)."""
    assert tw.ToyWorldConfig().detail is False
    digest = hashlib.sha256()
    for cfg in (tw.ToyWorldConfig(), tw.ToyWorldConfig(occluder_prob=0.5, image_size=32, frames=5, seed=3)):
        for clip in tw.iter_clips(cfg, 0, 6):
            for array in (clip.frames, clip.joints, clip.visible, clip.actions):
                digest.update(np.ascontiguousarray(array).tobytes())
            digest.update(clip.caption.encode())
            digest.update(json.dumps(clip.attributes, sort_keys=True).encode())
            assert not any(k.startswith("detail") for k in clip.attributes) and " small " not in clip.caption
    assert tw.RENDER_VERSION == 2
    assert digest.hexdigest() == "b8d75215c4337b5e570cbbcc50db241f84b75d2438098d31345962d102be2b3e"


def test_detail_is_deterministic_per_clip():
    cfg = tw.ToyWorldConfig(detail=True, seed=5)
    a, b = tw.make_clip(cfg, 7), tw.make_clip(cfg, 7)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert (a.caption, a.attributes) == (b.caption, b.attributes)
    other = tw.make_clip(cfg, 8).attributes
    assert (other["detail_topleft"], other["detail_color"], other["detail_shape"]) != (
        a.attributes["detail_topleft"],
        a.attributes["detail_color"],
        a.attributes["detail_shape"],
    )


def test_detail_is_drawn_exactly_where_its_metadata_says(pairs):
    """The rest of the clip is untouched; the detail's pixels are its colour; the caption names it last."""
    for off, on in pairs:
        mask = _expected_mask(on)
        assert mask.any(axis=(1, 2)).all()  # in every frame
        changed = (on.frames != off.frames).any(axis=-1)
        assert not (changed & ~mask).any(), on.caption
        assert (on.frames[mask] == tw.PALETTE[on.attributes["detail_color"]]).all()
        np.testing.assert_array_equal(on.joints, off.joints)
        a = on.attributes
        assert on.caption == f"{off.caption} with a small {a['detail_color']} {a['detail_shape']}"
        assert tw.caption_detail(on.caption) == {"color": a["detail_color"], "shape": a["detail_shape"]}
        assert json.loads(json.dumps(a)) == a


def test_detail_moves_with_the_camera_and_stays_in_the_frame():
    cfg = tw.ToyWorldConfig(detail=True, drift_px=12.0)
    for i in range(8):
        clip = tw.make_clip(cfg, i)
        tl = np.array(clip.attributes["detail_topleft"])
        side = clip.attributes["detail_size"]
        assert tl.min() >= 0 and tl.max() + side <= cfg.image_size
        steps = np.abs(np.diff(tl, axis=0))
        assert steps.max() <= 2  # a smooth pan: at most a pixel or two between frames
        if i == 0:
            assert len({tuple(p) for p in tl}) > 1  # it does move


def test_detail_keeps_off_the_figure_and_contrasts_with_the_background(pairs):
    for off, on in pairs:
        a = on.attributes
        figure = np.array(tw.PALETTE[a["color"]], np.float64)
        side = a["detail_size"]
        for t, (row, col) in enumerate(a["detail_topleft"]):
            around = off.frames[t, max(row - 1, 0) : row + side + 1, max(col - 1, 0) : col + side + 1]
            # no figure pixel (the background is >= MIN_CONTRAST away from the figure colour) around the detail
            assert np.linalg.norm(around - figure, axis=-1).min() > 60, on.caption
        swing = tw.NOISE_AMPLITUDE if a["background"] == "noise" else 0.0
        for name in (a["background_color"], a["background_color2"]):
            if name is not None:
                assert tw._contrast(a["detail_color"], name, swing) >= tw.MIN_CONTRAST


def test_every_detail_colour_and_shape_is_reachable(pairs):
    assert {on.attributes["detail_shape"] for _, on in pairs} == set(tw.DETAIL_SHAPES)
    assert {on.attributes["detail_color"] for _, on in pairs} == set(tw.DETAIL_COLORS)


@pytest.mark.parametrize(("size", "side"), [(32, 3), (64, 5), (128, 9)])
def test_detail_scales_with_the_image(size, side):
    clip = tw.make_clip(tw.ToyWorldConfig(image_size=size, frames=2, detail=True), 1)
    assert clip.attributes["detail_size"] == side
    assert _expected_mask(clip).sum(axis=(1, 2)).min() >= 5


def test_detail_subsets_and_shapes():
    clip = tw.make_clip(tw.ToyWorldConfig(detail=True, detail_shapes=("cross",), detail_colors=("white",)), 3)
    assert clip.caption.endswith(" with a small white cross")  # the only colour allowed, contrasting or not
    assert tw.detail_mask("square", 5).sum() == 25
    assert tw.detail_mask("diamond", 5).sum() == 13
    assert tw.detail_mask("cross", 5).sum() == 9
    with pytest.raises(ValueError, match="unknown detail shape"):
        tw.detail_mask("star", 5)


def test_caption_detail_reads_generated_text():
    assert tw.caption_detail("a red figure jumping on a plain blue background") == {"color": None, "shape": None}
    assert tw.caption_detail("x with a small teal cross") == {"color": None, "shape": "cross"}
    assert tw.caption_detail("x with a small green blob") == {"color": "green", "shape": None}


def test_read_caption_gives_back_every_attribute_of_every_clip(pairs):
    for _, clip in pairs:
        a = clip.attributes
        want = {k: a[k] for k in ("color", "action", "background", "background_color", "detail_color", "detail_shape")}
        assert tw.read_caption(clip.caption) == want, clip.caption
    assert {tw.read_caption(c.caption)["background"] for _, c in pairs} == set(tw.BACKGROUNDS)


def test_read_caption_of_generated_text_says_none_where_it_cannot_read():
    empty = dict.fromkeys(("color", "action", "background", "background_color", "detail_color", "detail_shape"))
    assert tw.read_caption("") == empty
    got = tw.read_caption("a red figure on a teal and white striped background with a small green blob")
    assert got == dict(empty, color="red", background="stripes", background_color=None, detail_color="green")
    assert tw.caption_scene("on a noisy grey background") == {"background": "noise", "background_color": "grey"}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"detail": "yes"}, "detail"),
        ({"detail_size": 2.0}, "detail_size"),
        ({"detail_shapes": ("star",)}, "detail_shapes"),
        ({"detail_colors": ("cyan",)}, "detail_colors"),
        ({"detail_colors": ()}, "detail_colors"),
    ],
)
def test_detail_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ToyWorldConfig.{field} "):
        tw.ToyWorldConfig(**kwargs)
