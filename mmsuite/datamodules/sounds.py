"""Toy-world sound as shards, and the DataModule the audio tokenizer trains on.

A sample holds ``audio.wav`` (16-bit PCM mono at the source's sample rate, :mod:`mmsuite.sources.wav`),
``caption.txt`` and ``attributes.json`` (kind, pitch, count, loudness, length, onsets, ...). Splits are made by
clip. Batches are ``{"audio": float32 [B, 1, S] in [-1, 1], "caption": [B strings]}``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mmsuite.datamodules.base import ShardDataModule
from mmsuite.datamodules.shards import WRITER_VERSION, DatasetWriter, ShardError
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


class ToySoundDataModule(ShardDataModule):
    """Toy-world sound clips (:mod:`mmsuite.sources.toysound`) as shards: whole clips, one per item."""

    def __init__(self, sound: dict, n_clips: int, splits: dict, **kwargs):
        super().__init__(**kwargs)
        self.sound = dict(sound)
        self.n_clips = int(n_clips)
        self.splits = dict(splits)
        cfg = toysound.ToySoundConfig(**self.sound)  # validate early, with the source's own messages
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
