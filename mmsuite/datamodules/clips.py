"""Clip datasets (toy world today; real video folders later) and the frames DataModule built on them.

A clip sample holds ``frames.npy`` (uint8 [T,S,S,3]), ``joints.npy`` (float32 [T,13,2]), ``visible.npy``
(bool [T,13]), ``actions.npy`` (int64 [T]), ``caption.txt`` and ``attributes.json``. Splits are made by
clip, so no two splits share frames of one clip.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmsuite.datamodules.base import ShardDataModule, ShardSettings
from mmsuite.datamodules.shards import (
    WRITER_VERSION,
    DatasetWriter,
    decode_sample,
    iter_raw_samples,
    read_manifest,
    split_shards,
)
from mmsuite.settings import fail, setting
from mmsuite.sources import controllable
from mmsuite.sources.splits import split_by_item
from mmsuite.tokenizers.token_space import settings_hash


def _clip_members(args) -> tuple[int, dict]:
    cfg, index = args
    clip = controllable.render_clip(cfg, index)
    return index, {
        "frames.npy": clip.frames,
        "joints.npy": clip.joints,
        "visible.npy": clip.visible,
        "actions.npy": clip.actions,
        "caption.txt": clip.caption,
        "attributes.json": clip.attributes,
    }


def build_toyworld(
    out_dir: Path, world: dict, n_clips: int, splits: dict, samples_per_shard: int, workers: int = 2
) -> Path:
    """Render ``n_clips`` clips of either toy world (:func:`mmsuite.sources.controllable.world_config`) and write
    them as shards, split by clip, with a progress bar."""
    cfg = controllable.world_config(world)
    split_of = split_by_item(range(n_clips), splits, seed=cfg.seed)
    info = {
        "source": {"kind": "toyworld", "world": dataclasses.asdict(cfg), "n_clips": n_clips, "splits": dict(splits)},
        "sample_fields": ["frames.npy", "joints.npy", "visible.npy", "actions.npy", "caption.txt", "attributes.json"],
    }
    jobs = [(cfg, i) for i in range(n_clips)]
    with DatasetWriter(out_dir, samples_per_shard, info=info) as writer:
        ctx = mp.get_context("fork")
        with ctx.Pool(workers) if workers > 1 else _Serial() as pool:
            it = pool.imap(_clip_members, jobs, chunksize=8)
            for index, members in tqdm(it, total=n_clips, desc=f"toy world -> {out_dir.name}", unit="clip"):
                writer.write(split_of[index], f"clip{index:07d}", members)
    return out_dir


class _Serial:
    imap = staticmethod(lambda f, xs, chunksize=1: map(f, xs))

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False


@dataclass
class ClipSettings(ShardSettings):
    """What every data set made from toy-world clips states: the world, the number of clips and the split."""

    # the toy world's settings (mmsuite.sources.toyworld.ToyWorldConfig; with kind: control the controllable world's,
    # mmsuite.sources.controllable); the data configs state the ones they change or interpolate (image_size, frames,
    # seed), and the data set's name hashes them as stated
    world: dict[str, Any] = setting({})
    n_clips: int = setting(1200, ge=1)
    splits: dict[str, float] = setting({"train": 0.8, "val": 0.1, "test": 0.1}, ge=0.0)  # by clip, never by frame

    def check(self, key: str) -> None:
        try:
            controllable.world_config(self.world)  # with the toy world's own messages
        except (TypeError, ValueError) as e:
            fail(f"{key}.world", f"is invalid: {e}")


@dataclass
class ToyWorldSettings(ClipSettings):
    build_workers: int = setting(2, ge=1)  # processes rendering clips when the data set is built


class ToyWorldDataModule(ShardDataModule):
    """Toy-world clips as shards; the base for frame- and clip-level DataModules."""

    Settings = ToyWorldSettings

    def __init__(self, token_space=None, **settings):
        super().__init__(token_space, **settings)
        s = self.settings
        self.world = dict(s.world)
        self.n_clips = s.n_clips
        self.splits = dict(s.splits)
        self.build_workers = s.build_workers

    @property
    def dataset_name(self) -> str:
        settings = {
            "world": self.world,
            "n_clips": self.n_clips,
            "splits": self.splits,
            "samples_per_shard": self.samples_per_shard,
            "writer": WRITER_VERSION,
            "render": controllable.render_version(self.world),
        }
        return f"toyworld-{self.world.get('image_size', 64)}px-{settings_hash(settings)}"

    def build(self, out_dir: Path) -> None:
        build_toyworld(out_dir, self.world, self.n_clips, self.splits, self.samples_per_shard, self.build_workers)


@dataclass
class FramesSettings(ToyWorldSettings):
    """``data`` of ``data=toyworld_frames``."""

    frames_per_clip: int | None = setting(None, ge=1)  # null: every frame
    batch_size: int = setting(32, ge=1)
    val_batch_size: int | None = setting(64, ge=1)
    shuffle_buffer: int = setting(64, ge=0)  # clips in the sample buffer (x frames_per_clip items in the item buffer)
    samples_per_shard: int = setting(24, ge=1)

    def check(self, key: str) -> None:
        super().check(key)
        frames = controllable.world_config(self.world).frames
        if self.frames_per_clip is not None and self.frames_per_clip > frames:
            fail(f"{key}.frames_per_clip", f"must be in [1, {frames}] (the clip's frames), got {self.frames_per_clip}")


class FramesDataModule(ToyWorldDataModule):
    """Single frames from toy-world clips: ``{"image": uint8 [B,3,S,S]}`` batches."""

    Settings = FramesSettings

    def __init__(self, token_space=None, **settings):
        super().__init__(token_space, **settings)
        n_frames = controllable.world_config(self.world).frames
        frames_per_clip = self.settings.frames_per_clip
        k = n_frames if frames_per_clip is None else frames_per_clip
        self.frame_index = np.linspace(0, n_frames - 1, k).round().astype(int)
        self.items_per_sample = k

    def expand(self, sample: dict) -> list:
        return [sample["frames"][t] for t in self.frame_index]

    def collate(self, items: list) -> dict:
        return {"image": torch.from_numpy(np.stack(items)).permute(0, 3, 1, 2).contiguous()}


def source_clips(dm) -> ToyWorldDataModule:
    """The toy-world clip data set a derived data module (m4 pairs, nano4m samples) is built from: its ``world``,
    ``n_clips``, ``splits``, ``data_dir`` and ``clip_samples_per_shard``."""
    return ToyWorldDataModule(
        world=dm.world,
        n_clips=dm.n_clips,
        splits=dm.splits,
        data_dir=str(dm.data_dir),
        batch_size=1,
        samples_per_shard=dm.clip_samples_per_shard,
    )


def iter_clip_shards(clips: ToyWorldDataModule, desc: str):
    """``(split, clip)`` over a toy-world clip data set (built first if missing), split by split in manifest order;
    ``clip`` is the decoded sample (frames, joints, visible, actions, attributes, ...) plus its ``key``. For data
    sets derived from the clips (m4 pairs, nano4m samples), which keep each clip's split."""
    clips.prepare_data()
    manifest = read_manifest(clips.root)
    for split in ("train", "val", "test"):
        if split not in manifest["splits"]:
            continue
        n = manifest["splits"][split]["samples"]
        raw = (r for shard in split_shards(clips.root, split, manifest) for r in iter_raw_samples(shard.path))
        for clip in tqdm(map(decode_sample, raw), total=n, desc=f"{desc} {split}", unit="clip"):
            yield split, {**clip, "key": clip["__key__"]}
