"""Toy-world sound as shards, and the DataModule the audio tokenizer trains on.

A sample holds ``audio.wav`` (16-bit PCM mono at the source's sample rate, :mod:`mmsuite.sources.wav`),
``caption.txt`` and ``attributes.json`` (kind, pitch, count, loudness, length, onsets, ...). Splits are made by
clip. Batches are ``{"audio": float32 [B, 1, S] in [-1, 1], "caption": [B strings]}``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmsuite.datamodules.base import ShardDataModule, ShardSettings
from mmsuite.datamodules.shards import WRITER_VERSION, DatasetWriter, ShardError
from mmsuite.settings import fail, setting
from mmsuite.sources import toysound
from mmsuite.sources.splits import split_by_item
from mmsuite.sources.wav import decode_wav, encode_wav
from mmsuite.tokenizers.token_space import settings_hash


def build_toysound(out_dir: Path, sound: dict, n_clips: int, splits: dict, samples_per_shard: int) -> Path:
    """Generate ``n_clips`` toy sounds and write them as shards, split by clip, with a progress bar."""
    cfg = toysound.ToySoundConfig(**sound)
    split_of = split_by_item(range(n_clips), splits, seed=cfg.seed)
    info = {
        "source": {
            "kind": "toysound",
            "sound": dataclasses.asdict(cfg),
            "n_clips": n_clips,
            "splits": dict(splits),
            "audio": {"format": "wav", "sample_width_bits": 16, "channels": 1, "sample_rate": cfg.sample_rate},
        },
        "sample_fields": ["audio.wav", "caption.txt", "attributes.json"],
    }
    with DatasetWriter(out_dir, samples_per_shard, info=info) as writer:
        for clip in tqdm(toysound.iter_sounds(cfg, n_clips), total=n_clips, desc=f"toy sound -> {out_dir.name}"):
            members = {
                "audio.wav": encode_wav(clip.audio, clip.sample_rate),
                "caption.txt": clip.caption,
                "attributes.json": clip.attributes,
            }
            writer.write(split_of[clip.index], f"sound{clip.index:07d}", members)
    return out_dir


@dataclass
class ToySoundSettings(ShardSettings):
    """``data`` of ``data=toysound``: 1600 train, 200 val, 200 test clips (~100 MB of 16-bit WAV, built in seconds)."""

    sound: dict[str, Any] = setting({})  # the source's settings (mmsuite.sources.toysound.ToySoundConfig)
    n_clips: int = setting(2000, ge=1)
    splits: dict[str, float] = setting({"train": 0.8, "val": 0.1, "test": 0.1}, ge=0.0)
    batch_size: int = setting(8, ge=1)
    val_batch_size: int | None = setting(50, ge=1)
    shuffle_buffer: int = setting(64, ge=0)
    samples_per_shard: int = setting(50, ge=1)

    def check(self, key: str) -> None:
        try:
            toysound.ToySoundConfig(**self.sound)  # with the source's own messages
        except (TypeError, ValueError) as e:
            fail(f"{key}.sound", f"is invalid: {e}")


class ToySoundDataModule(ShardDataModule):
    """Toy-world sound clips (:mod:`mmsuite.sources.toysound`) as shards: whole clips, one per item."""

    Settings = ToySoundSettings

    def __init__(self, token_space=None, **settings):
        super().__init__(token_space, **settings)
        s = self.settings
        self.sound = dict(s.sound)
        self.n_clips = s.n_clips
        self.splits = dict(s.splits)
        cfg = toysound.ToySoundConfig(**self.sound)
        self.sample_rate = cfg.sample_rate
        self.n_samples = cfg.n_samples

    @property
    def dataset_name(self) -> str:
        settings = {
            "sound": dataclasses.asdict(toysound.ToySoundConfig(**self.sound)),
            "n_clips": self.n_clips,
            "splits": self.splits,
            "samples_per_shard": self.samples_per_shard,
            "writer": WRITER_VERSION,
        }
        return f"toysound-{self.sample_rate // 1000}khz-{settings_hash(settings)}"

    def build(self, out_dir: Path) -> None:
        build_toysound(out_dir, self.sound, self.n_clips, self.splits, self.samples_per_shard)

    def expand(self, sample: dict) -> list:
        key = sample["__key__"]
        audio, rate = decode_wav(sample["audio"], name=f"{self.root} sample {key} audio.wav")
        if rate != self.sample_rate or audio.shape != (1, self.n_samples):
            raise ShardError(
                f"{self.root} sample {key}: audio is {audio.shape} at {rate} Hz, expected (1, {self.n_samples}) at "
                f"{self.sample_rate} Hz (data.sound settings)"
            )
        return [(audio, sample["caption"])]

    def collate(self, items: list) -> dict:
        audio = torch.from_numpy(np.stack([a for a, _ in items]))
        return {"audio": audio, "caption": [c for _, c in items]}
