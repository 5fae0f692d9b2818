"""Penn Action reader (on a fake folder), aligned crop with pose, successor frames."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.io

from mmsuite.sources import penn_action as pa
from mmsuite.sources.pairs import resize_center_crop_with_pose, successor_indices
from mmsuite.sources.toyworld import JOINTS


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("penn")
    written = pa.write_fake_penn_action(root, n_videos=3, n_frames=5, size=(40, 56), seed=3)
    return root, written


def _copy(fake, tmp_path):
    root, _ = fake
    shutil.copytree(root, tmp_path / "penn")
    return tmp_path / "penn"


# -- reader -------------------------------------------------------------------------------------------


def test_joint_order_is_ours():
    assert pa.PENN_JOINTS == JOINTS
    assert pa.PENN_TO_OURS.tolist() == list(range(13))


def test_fake_folder_round_trip(fake):
    root, written = fake
    assert pa.list_videos(root) == ["0001", "0002", "0003"] == list(written)
    for vid, truth in written.items():
        video = pa.load_video(root, vid)
        assert video["frames"].dtype == np.uint8 and video["frames"].shape == (5, 40, 56, 3)
        assert np.abs(video["frames"].astype(int) - truth["frames"]).mean() < 3  # JPEG, quality 95
        np.testing.assert_allclose(video["joints"], truth["joints"], atol=1e-4)
        assert video["joints"].dtype == np.float32 and video["visible"].dtype == np.bool_
        inside = np.all((truth["joints"] >= 0) & (truth["joints"] < [56, 40]), axis=-1)
        assert np.array_equal(video["visible"], truth["visible"] & inside)
        assert video["action"] == truth["action"] and video["action"] in pa.ACTIONS
        assert video["train_flag"] == truth["train_flag"]
    assert [written[v]["train_flag"] for v in written] == [1, -1, 1]


def test_label_offset_is_matlab_one_based(fake):
    root, written = fake
    mat = scipy.io.loadmat(root / "labels" / "0001.mat", squeeze_me=True)
    np.testing.assert_allclose(mat["x"] - 0.5, written["0001"]["joints"][..., 0], atol=1e-4)


def test_single_frame_video(tmp_path):
    written = pa.write_fake_penn_action(tmp_path, n_videos=1, n_frames=1, size=(16, 16), seed=0)
    video = pa.load_video(tmp_path, "0001")
    assert video["frames"].shape == (1, 16, 16, 3) and video["joints"].shape == (1, 13, 2)
    np.testing.assert_allclose(video["joints"], written["0001"]["joints"], atol=1e-4)


def test_list_videos_errors_and_pairing(fake, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no Penn Action videos under {tmp_path}"):
        pa.list_videos(tmp_path)
    root = _copy(fake, tmp_path)
    (root / "labels" / "0002.mat").unlink()
    (root / "frames" / "0009").mkdir()
    assert pa.list_videos(root) == ["0001", "0003"]


def test_frame_count_mismatch_names_the_files(fake, tmp_path):
    root = _copy(fake, tmp_path)
    (root / "frames" / "0001" / "000005.jpg").unlink()
    with pytest.raises(ValueError, match=r"4 frame files but .*0001\.mat has 5 label rows.*000005\.jpg"):
        pa.load_video(root, "0001")


def _rewrite(root, vid, **changes):
    path = root / "labels" / f"{vid}.mat"
    mat = {k: v for k, v in scipy.io.loadmat(path, squeeze_me=True).items() if not k.startswith("_")}
    for k, v in changes.items():
        if v is None:
            del mat[k]
        else:
            mat[k] = v
    scipy.io.savemat(path, mat)
    return path


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"visibility": None}, r"missing field\(s\) \['visibility'\]"),
        ({"x": np.zeros((5, 12))}, r"field 'x' must be \[T, 13\], got shape \(5, 12\)"),
        ({"y": np.zeros((4, 13))}, "field 'y' has 4 rows but nframes is 5"),
        ({"visibility": np.full((5, 13), 2.0)}, "must hold only 0/1"),
        ({"train": 0.0}, "must be 1 \\(train\\) or -1 \\(test\\)"),
        ({"nframes": 2.5}, "'nframes' must be an integer scalar"),
    ],
)
def test_bad_labels_name_the_file(fake, tmp_path, changes, match):
    root = _copy(fake, tmp_path)
    path = _rewrite(root, "0002", **changes)
    with pytest.raises(ValueError, match=match) as info:
        pa.load_video(root, "0002")
    assert str(path) in str(info.value)


def test_missing_label_file(fake, tmp_path):
    root, _ = fake
    with pytest.raises(FileNotFoundError, match="0042.mat"):
        pa.load_video(root, "0042")


# -- crop with pose -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, size", [((120, 200), 64), ((90, 60), 64), ((30, 50), 96), ((64, 64), 64)])
def test_crop_moves_joints_with_pixels(shape, size):
    height, width = shape
    rng = np.random.default_rng(height * width)
    scale = size / min(height, width)
    new_w, new_h = round(width * scale), round(height * scale)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    for _ in range(4):
        # a bright 2x2 block whose centre is the joint, placed where it survives the crop
        cx = rng.integers(int((left + 4) / scale) + 2, int((left + size - 4) / scale) - 2)
        cy = rng.integers(int((top + 4) / scale) + 2, int((top + size - 4) / scale) - 2)
        image = np.zeros((height, width, 3), np.uint8)
        image[cy - 1 : cy + 1, cx - 1 : cx + 1] = 255
        joints = np.zeros((13, 2))
        joints[0] = [cx, cy]  # the corner shared by the four pixels = the block's centre
        joints[1] = [-5.0, 3.0]  # outside before and after
        joints[2] = [width - 0.5, height / 2]  # at the right edge: cropped away when the image is wide
        visible = np.ones(13, bool)
        out, j, vis, avail = resize_center_crop_with_pose(image, joints, visible, size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8 and j.dtype == np.float32
        w = out.astype(np.float64).sum(-1)
        assert w.sum() > 0
        rows, cols = np.mgrid[0:size, 0:size] + 0.5
        centroid = np.array([(cols * w).sum(), (rows * w).sum()]) / w.sum()
        assert np.abs(centroid - j[0]).max() < 0.25, (centroid, j[0])  # exact transform: tight
        top_rows, top_cols = np.nonzero(w >= 0.9 * w.max())  # the brightest pixel(s); a plateau when upscaled
        peak = np.array([top_cols.mean(), top_rows.mean()]) + 0.5
        assert np.abs(peak - j[0]).max() <= 1.0, (peak, j[0])
        assert avail[0] and vis[0] and not avail[1] and not vis[1]
        assert avail[2] == (width <= height) and vis[2] == avail[2]


def test_crop_validates_input():
    image = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        resize_center_crop_with_pose(image.astype(float), np.zeros((13, 2)), np.ones(13, bool), 8)
    with pytest.raises(ValueError, match="visible bool"):
        resize_center_crop_with_pose(image, np.zeros((13, 2)), np.ones(13), 8)


# -- successor frames ---------------------------------------------------------------------------------


def test_successor_indices_on_known_change_points():
    # Frames 0-2 grey 10, 3-5 grey 30, 6 grey 32, 7-9 grey 100: change points at 3 and 7 (and 6 a small step).
    levels = [10, 10, 10, 30, 30, 30, 32, 100, 100, 100]
    frames = np.stack([np.full((6, 8, 3), v, np.uint8) for v in levels])
    got = successor_indices(frames, threshold=15.0, max_gap=3)
    assert got.dtype == np.int64
    assert got.tolist() == [3, 3, 3, -1, 7, 7, 7, -1, -1, -1]
    assert successor_indices(frames, threshold=15.0, max_gap=10).tolist() == [3, 3, 3, 7, 7, 7, 7, -1, -1, -1]
    assert successor_indices(frames, threshold=0.0, max_gap=1).tolist() == list(range(1, 10)) + [-1]
    assert successor_indices(frames[:1], threshold=1.0, max_gap=4).tolist() == [-1]


def test_successor_mean_is_over_all_pixels_and_channels():
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    frames[1, 0, 0, 0] = 240  # mean abs difference = 240 / 48 = 5
    assert successor_indices(frames, threshold=5.0, max_gap=1).tolist() == [1, -1]
    assert successor_indices(frames, threshold=5.01, max_gap=1).tolist() == [-1, -1]
    frames[0, 0, 0, 0], frames[1, 0, 0, 0] = 240, 0  # the difference is absolute
    assert successor_indices(frames, threshold=5.0, max_gap=1).tolist() == [1, -1]
    with pytest.raises(ValueError, match="max_gap"):
        successor_indices(frames, threshold=1.0, max_gap=0)
    with pytest.raises(ValueError, match="uint8"):
        successor_indices(frames.astype(np.float32), threshold=1.0, max_gap=1)
