"""Pose quantiser: layout, round trip, error bounds, NA handling, bad input, token-space placement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmsuite.tokenizers.pose import PoseQuantizer
from mmsuite.tokenizers.token_space import TokenSpace


def _random_pose(rng, n, canvas=256):
    joints = rng.uniform(0, canvas, (n, 13, 2)).astype(np.float32)
    visible = rng.random((n, 13)) < 0.7
    return joints, visible


def test_layout_and_flags_after_bins():
    q = PoseQuantizer(bins=8192, canvas=256)
    assert (q.INVISIBLE, q.VISIBLE, q.NA, q.vocab_size, q.tokens_per_skeleton) == (8192, 8193, 8194, 8195, 39)
    small = PoseQuantizer(bins=16, canvas=256)
    assert (small.INVISIBLE, small.VISIBLE, small.NA, small.vocab_size) == (16, 17, 18, 19)


def test_round_trip_error_is_at_most_half_a_bin_with_no_offset():
    rng = np.random.default_rng(0)
    for bins in (8192, 256, 37):
        q = PoseQuantizer(bins=bins, canvas=256)
        joints, visible = _random_pose(rng, 2000)
        ids = q.encode(joints, visible)
        assert ids.dtype == np.int64 and ids.shape == (2000, 39)
        back, vis, avail = q.decode(ids)
        err = back.astype(np.float64) - joints
        half = q.bin_width / 2
        assert np.abs(err).max() <= half * (1 + 1e-4)
        assert abs(err.mean()) < 0.02 * half  # no systematic offset (the pose fork's bug)
        assert avail.all() and np.array_equal(vis, visible)
        assert np.array_equal(q.encode(back, vis), ids)  # bin centres re-encode to the same ids


def test_bin_edges_and_centres():
    q = PoseQuantizer(bins=256, canvas=256)
    x = np.array([0.0, 0.999, 1.0, 128.5, 255.999])
    assert q.quantize(x).tolist() == [0, 0, 1, 128, 255]
    np.testing.assert_allclose(q.dequantize([0, 255]), [0.5, 255.5])


def test_flags_never_collide_with_bins():
    q = PoseQuantizer(bins=64, canvas=256)
    rng = np.random.default_rng(1)
    joints, visible = _random_pose(rng, 500)
    joints[:, 0] = [255.9999, 255.9999]  # the last bin, never a flag
    joints[:, 1] = [np.nan, 3.0]
    ids = q.encode(joints, visible).reshape(500, 13, 3)
    xy, v = ids[..., :2], ids[..., 2]
    assert np.all((xy < q.bins) | (xy == q.NA))
    assert np.all((v == q.VISIBLE) | (v == q.INVISIBLE))
    assert np.all(ids[:, 0, :2] == q.bins - 1)


def test_na_for_nan_outside_and_unavailable_joints():
    q = PoseQuantizer(bins=128, canvas=256)
    joints = np.full((1, 13, 2), 100.0, np.float32)
    joints[0, 1] = [np.nan, 10.0]
    joints[0, 2] = [-0.01, 10.0]
    joints[0, 3] = [10.0, 256.0]
    available = np.ones((1, 13), bool)
    available[0, 4] = False
    visible = np.ones((1, 13), bool)
    visible[0, 5] = False  # occluded but known: keeps its coordinates
    ids = q.encode(joints, visible, available).reshape(13, 3)
    for j in (1, 2, 3, 4):
        assert ids[j].tolist() == [q.NA, q.NA, q.INVISIBLE]
    assert ids[5, 2] == q.INVISIBLE and ids[5, 0] < q.bins
    assert ids[0, 2] == q.VISIBLE
    back, vis, avail = q.decode(ids.reshape(1, 39))
    assert avail[0].tolist() == [j not in (1, 2, 3, 4) for j in range(13)]
    assert np.isnan(back[0, [1, 2, 3, 4]]).all() and np.isfinite(back[0, [0, 5, 6]]).all()
    assert not vis[0, [1, 2, 3, 4, 5]].any() and vis[0, 0]
    np.testing.assert_allclose(back[0, 5], [101.0, 101.0])  # bin 50 of width 2: centre 101


def test_encode_rejects_integer_and_bad_shapes():
    q = PoseQuantizer()
    visible = np.ones((2, 13), bool)
    with pytest.raises(TypeError, match="float array of canvas pixels"):
        q.encode(np.zeros((2, 13, 2), np.int64), visible)
    with pytest.raises(ValueError, match=r"shape \[N, 13, 2\]"):
        q.encode(np.zeros((2, 12, 2)), visible)
    with pytest.raises(TypeError, match="visible must be a bool array"):
        q.encode(np.zeros((2, 13, 2)), visible.astype(np.int64))
    with pytest.raises(ValueError, match="available must have shape"):
        q.encode(np.zeros((2, 13, 2)), visible, np.ones((1, 13), bool))


def test_decode_rejects_bad_ids_with_position_and_value():
    q = PoseQuantizer(bins=32, canvas=256)
    ids = q.encode(np.full((2, 13, 2), 5.0), np.ones((2, 13), bool))
    with pytest.raises(TypeError, match="integer array"):
        q.decode(ids.astype(np.float32))
    with pytest.raises(ValueError, match=r"shape \[N, 39\]"):
        q.decode(ids[:, :38])
    for col, value, match in (
        (7, 35, r"ids\[1, 7\] = 35 is outside"),
        (4, -1, r"ids\[1, 4\] = -1 is outside"),
        (3, q.VISIBLE, rf"x/y slot holds a flag other than NA: ids\[1, 3\] = {q.VISIBLE}"),
        (5, 3, r"v slot holds a bin or NA: ids\[1, 5\] = 3"),
        (8, q.NA, rf"v slot holds a bin or NA: ids\[1, 8\] = {q.NA}"),
    ):
        bad = ids.copy()
        bad[1, col] = value
        with pytest.raises(ValueError, match=match):
            q.decode(bad)


def test_decode_inconsistent_joints_strict_and_lenient():
    q = PoseQuantizer(bins=32, canvas=256)
    ids = q.encode(np.full((1, 13, 2), 5.0), np.ones((1, 13), bool))
    half_na = ids.copy()
    half_na[0, 3] = q.NA  # joint 1: x NA, y a bin
    na_vis = ids.copy()
    na_vis[0, 6:8] = q.NA  # joint 2: NA but v VISIBLE
    with pytest.raises(ValueError, match="joint 1 in row 0: only one of x/y is NA"):
        q.decode(half_na)
    with pytest.raises(ValueError, match="joint 2 in row 0: x/y are NA but v is VISIBLE"):
        q.decode(na_vis)
    for bad, j in ((half_na, 1), (na_vis, 2)):
        joints, vis, avail = q.decode(bad, strict=False)
        assert not avail[0, j] and not vis[0, j] and np.isnan(joints[0, j]).all()
        assert avail[0, [k for k in range(13) if k != j]].all()


def test_scale_to_and_from_canvas():
    q = PoseQuantizer(bins=1024, canvas=256)
    joints = np.array([[[0.0, 63.9], [32.0, np.nan]]])
    canvas = q.scale_to_canvas(joints, 64)
    np.testing.assert_allclose(canvas[0, 0], [0.0, 255.6])
    assert canvas[0, 1, 0] == 128.0 and np.isnan(canvas[0, 1, 1])
    np.testing.assert_allclose(q.scale_from_canvas(canvas, 64), joints)
    with pytest.raises(ValueError, match="positive integer"):
        q.scale_to_canvas(joints, 0)


def _space_with_pose(q, prefix="pose"):
    ranges = [{"name": "specials", "tokens": ["<pad>", "<bos>"]}, {"name": "image", "size": 1000}]
    return TokenSpace.from_config(ranges + q.token_ranges(prefix) + [{"name": "text", "size": 50}])


def test_token_ranges_in_a_token_space_and_global_local_round_trip():
    q = PoseQuantizer(bins=64, canvas=256)
    assert q.token_ranges() == [
        {"name": "pose_bins", "size": 64},
        {"name": "pose_flags", "tokens": ["<pose_invisible>", "<pose_visible>", "<pose_na>"]},
    ]
    space = _space_with_pose(q)
    start = space["pose_bins"].start
    assert start == 1002 and space["pose_flags"].start == start + 64
    assert space.special("<pose_invisible>") == start + q.INVISIBLE
    assert space.special("<pose_visible>") == start + q.VISIBLE
    assert space.special("<pose_na>") == start + q.NA

    rng = np.random.default_rng(2)
    joints, visible = _random_pose(rng, 20)
    joints[0, 0] = np.nan
    local = q.encode(joints, visible)
    glob = q.to_global(local, space)
    assert glob.min() >= start and glob.max() < start + q.vocab_size
    assert {space.range_of(int(g)).name for g in np.unique(glob)} == {"pose_bins", "pose_flags"}
    assert np.array_equal(q.to_local(glob, space), local)

    with pytest.raises(ValueError, match="not a pose id.*'image'"):
        q.to_local(np.array([5]), space)
    with pytest.raises(ValueError, match="outside \\[0, 67\\)"):
        q.to_global(glob, space)  # already global
    with pytest.raises(TypeError, match="integer array"):
        q.to_local(glob.astype(float), space)


def test_token_space_checks():
    q = PoseQuantizer(bins=64, canvas=256)
    ranges = q.token_ranges()
    split = TokenSpace.from_config([ranges[0], {"name": "image", "size": 10}, ranges[1]])
    with pytest.raises(ValueError, match="must start right after 'pose_bins'"):
        q.to_global(np.array([0]), split)
    with pytest.raises(ValueError, match="has 64 ids but the quantiser has 32 bins"):
        PoseQuantizer(bins=32).to_global(np.array([0]), _space_with_pose(q))
    with pytest.raises(ValueError, match="no 'pose_bins'"):
        q.to_global(np.array([0]), TokenSpace([("image", 10)]))
    wrong = TokenSpace.from_config([ranges[0], {"name": "pose_flags", "tokens": ["<a>", "<b>", "<c>"]}])
    with pytest.raises(ValueError, match="must name the specials"):
        q.to_global(np.array([0]), wrong)
    # a second pose modality with its own prefix
    two = TokenSpace.from_config(q.token_ranges("pose") + q.token_ranges("pose_next"))
    assert q.to_global(np.array([0]), two, prefix="pose_next")[0] == q.vocab_size


def test_constructor_validation():
    with pytest.raises(ValueError, match="bins must be an integer"):
        PoseQuantizer(bins=0)
    with pytest.raises(ValueError, match="canvas must be an integer"):
        PoseQuantizer(canvas=256.0)


def test_pick_mean_takes_the_probability_weighted_bin_and_keeps_slots_in_their_kind():
    q = PoseQuantizer(bins=64, canvas=256)
    logits = torch.full((1, 39, q.vocab_size), -30.0)
    logits[0, 0, [20, 30]] = 5.0  # x of joint 0: two equal modes -> the mean bin 25 (argmax would pick 20)
    logits[0, 1, 40] = 5.0
    logits[0, 1, q.VISIBLE] = 9.0  # a flag in an x/y slot is not allowed there
    logits[0, 2, q.VISIBLE] = 5.0
    logits[0, 3, q.NA] = 5.0  # NA more likely than all bins together -> NA
    picked = q.pick(logits, "mean")
    assert picked[0, 0] == 25 and picked[0, 1] == 40 and picked[0, 2] == q.VISIBLE and picked[0, 3] == q.NA
    assert q.pick(logits, "argmax")[0, 0] == 20
    allowed = q.slot_mask()
    assert allowed[torch.arange(39), picked[0]].all()
    with pytest.raises(ValueError, match="argmax"):
        q.pick(logits, "median")
