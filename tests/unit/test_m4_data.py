"""m4_pose frame-pair shards: built from toy-world clips with a (tiny, saved) image tokenizer checkpoint."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsuite.datamodules.m4 import M4PoseDataModule
from mmsuite.datamodules.shards import read_manifest
from mmsuite.sources import toyworld
from mmsuite.sources.pairs import successor_indices
from mmsuite.tokenizers.image import AutoencoderSettings
from mmsuite.tokenizers.pose import PoseQuantizer
from mmsuite.tokenizers.token_space import TokenSpace

BINS = 256
NET = dict(levels=[4, 4], downsample=8, patch_size=4, channels=8, channel_mult=[1, 2], num_res_blocks=[1, 1])


def _tokenizer_ckpt(path: Path) -> Path:
    """A checkpoint in the format ImageTokenizerModule writes (hyper_parameters + net.* state)."""
    torch.manual_seed(0)
    net = AutoencoderSettings(**NET).build()
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"hyper_parameters": {"net": NET, "image_size": 32}, "state_dict": state}, path)
    return path


def _space() -> TokenSpace:
    return TokenSpace.from_config(
        [
            {"name": "image", "size": 16},
            {"name": "pose_bins", "size": BINS},
            {"name": "pose_flags", "tokens": ["<pose_invisible>", "<pose_visible>", "<pose_na>"]},
        ]
    )


def _dm(tmp_path: Path, ckpt: Path, **kw) -> M4PoseDataModule:
    mods = [
        {"name": "tok_rgb", "kind": "image", "range": "image", "vocab": 16, "length": 16, "grid": [4, 4]},
        {"name": "coords", "kind": "pose", "range": "pose_bins", "vocab": BINS + 3, "length": 39},
        {"name": "tok_rgb_next", "kind": "image", "range": "image", "vocab": 16, "length": 16, "grid": [4, 4]},
        {"name": "coords_next", "kind": "pose", "range": "pose_bins", "vocab": BINS + 3, "length": 39},
    ]
    args = dict(
        world={"image_size": 32, "frames": 8, "seed": 0},
        n_clips=20,
        splits={"train": 0.8, "val": 0.1, "test": 0.1},
        modalities=mods,
        image_tokenizer={"run": "x", "ckpt": str(ckpt), "train_if_missing": False},
        pose={"bins": BINS, "canvas": 256},
        successor={"threshold": 2.0, "max_gap": 3},
        log_dir=str(tmp_path / "logs"),
        clip_samples_per_shard=4,
        data_dir=str(tmp_path / "data"),
        batch_size=4,
        samples_per_shard=16,
        token_space=_space(),
    )
    args.update(kw)
    return M4PoseDataModule(**args)


def _samples(root: Path, split: str) -> list[dict]:
    out = []
    for shard in sorted(root.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".pair.json"):
                    out.append(json.loads(tar.extractfile(m).read()))
    return out


def test_pairs_are_built_split_by_clip_with_tokens_in_their_ranges(tmp_path):
    dm = _dm(tmp_path, _tokenizer_ckpt(tmp_path / "tok.ckpt"))
    dm.prepare_data()
    dm.setup()
    manifest = read_manifest(dm.root)
    assert manifest["token_space_sha256"] == _space().sha256
    assert manifest["image_tokenizer"]["tokens_per_image"] == 16
    clips_by_split = {s: {p["clip"] for p in _samples(dm.root, s)} for s in ("train", "val", "test")}
    assert all(clips_by_split.values())
    assert not (clips_by_split["train"] & clips_by_split["val"]) and not (
        clips_by_split["train"] & clips_by_split["test"]
    )
    for p in _samples(dm.root, "train"):
        assert 1 <= p["t_next"] - p["t"] <= 3
    batch = next(iter(dm.train_dataloader()))
    tokens = batch["tokens"]
    assert tokens.shape == (4, 16 + 39 + 16 + 39)
    assert int(tokens[:, :16].max()) < 16 and int(tokens[:, 16:55].max()) < BINS + 3
    assert dm.mean_pose.shape == (13, 2) and np.isfinite(dm.mean_pose).all()


def test_pair_poses_are_the_clips_poses_within_half_a_bin(tmp_path):
    dm = _dm(tmp_path, _tokenizer_ckpt(tmp_path / "tok.ckpt"))
    dm.prepare_data()
    dm.setup()
    quant = PoseQuantizer(bins=BINS, canvas=256)
    pose_start = _space()["pose_bins"].start
    cfg = toyworld.ToyWorldConfig(image_size=32, frames=8, seed=0)
    checked = 0
    for shard in sorted(dm.root.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, raw in members.items():
            if not name.endswith(".pair.json"):
                continue
            pair = json.loads(raw)
            key = name.removesuffix(".pair.json")
            coords = np.load(__import__("io").BytesIO(members[f"{key}.coords_next.npy"]), allow_pickle=False)
            clip = toyworld.make_clip(cfg, int(pair["clip"].removeprefix("clip")))
            xy, vis, ok = quant.decode(coords[None].astype(np.int64) - pose_start)
            truth = quant.scale_to_canvas(clip.joints[pair["t_next"]], 32)
            assert np.array_equal(vis[0], clip.visible[pair["t_next"]] & ok[0])
            assert np.abs(xy[0][ok[0]] - truth[ok[0]]).max() <= quant.bin_width / 2 + 1e-4
            assert successor_indices(clip.frames, 2.0, 3)[pair["t"]] == pair["t_next"]
            checked += 1
    assert checked > 0


def test_missing_tokenizer_and_wrong_token_count_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image tokenizer checkpoint not found: .*nope\.ckpt"):
        _dm(tmp_path, tmp_path / "nope.ckpt").prepare_data()
    dm = _dm(tmp_path, _tokenizer_ckpt(tmp_path / "tok.ckpt"), world={"image_size": 64, "frames": 8, "seed": 0})
    with pytest.raises(ValueError, match=r"gives 64 tokens per 64px frame but modality tok_rgb has length 16"):
        dm.prepare_data()
    with pytest.raises(ValueError, match="modalities"):
        _dm(tmp_path, tmp_path / "tok.ckpt", modalities=[{"name": "tok_rgb"}])


def test_a_retrained_tokenizer_gives_a_new_data_set(tmp_path):
    ckpt = _tokenizer_ckpt(tmp_path / "tok.ckpt")
    name = _dm(tmp_path, ckpt).dataset_name
    state = torch.load(ckpt, weights_only=True)
    first = next(k for k in state["state_dict"] if k.endswith("weight"))
    state["state_dict"][first] = state["state_dict"][first] + 1
    torch.save(state, ckpt)
    assert _dm(tmp_path, ckpt).dataset_name != name
