"""Latent-sequence shards for the dynamics world model, read as strided windows of alternating lengths.

Build (``prepare.py experiment=dynamics``, or the first ``train.py`` that lacks it): clips of ``clip_frames``
frames, from a toy world (``source.kind=toyworld``, either world of :func:`mmsuite.sources.controllable.world_config`:
rendered here, with their per-frame action ids) or from a folder of real videos (``source.kind=video``: decoded with
PyAV at ``source.fps`` from ``source.start_s`` for ``source.span_s`` seconds, cut into consecutive clips,
unlabelled), are encoded ONCE by a frozen frame encoder and
written as one sample per clip: ``latents.npy`` (float16 ``[L, C, h, w]``), ``actions.npy`` (int64 ``[L]``, -1 =
no label) and ``clip.json``. Splits are by clip for the toy world and by video for a folder. The encoder is the
image tokenizer's continuous variant (``tokenizer=continuous``: its checkpoint, trained first by a subprocess
``train.py experiment=image_tokenizer tokenizer=continuous`` when missing) or a diffusers AutoencoderKL from a local
folder (``tokenizer=sd_vae tokenizer.path=DIR``). The manifest holds the per-channel mean and std of the train
latents; batches are normalised with them (the model sees unit-scale latents; the decoder undoes it).

Read: windows are cut at load time, ``seq_len`` frames every ``stride`` frames of a clip (never across clips);
validation and test read whole clips. Training alternates between the short stream and a long one
(``long_seq_len``, ``long_batch_size``): before each batch a generator seeded with ``(seed, epoch)`` alone — the
same on every rank — says short or long (long with probability ``long_ratio``), so every rank takes the same
sequence of lengths (DDP never waits on a rank with a different shape or step count) and gradient accumulation
is the same for both. A row is a "T=1 row" with probability ``single_fraction`` (a fixed hash of its clip key,
window start and seed): the model treats its frames as independent single frames, which teaches start-frame
generation (DreamerV4 trains 30 % of batch elements as images).

Batches: ``latents`` float32 ``[B, T, C, h, w]`` (normalised), ``actions`` int64 ``[B, T]``, ``single`` (list of
bool, one per row), ``length`` (``"S"`` or ``"L"``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmsuite.datamodules.base import ShardDataModule, ShardSettings, TokenizerRunSettings, ensure_tokenizer
from mmsuite.datamodules.shards import (
    WRITER_VERSION,
    DatasetWriter,
    ShardStream,
    healthy_shards,
    read_manifest,
    split_shards,
)
from mmsuite.settings import as_dict, fail, setting
from mmsuite.sources import controllable
from mmsuite.sources.splits import split_by_item
from mmsuite.tokenizers.image import PRETRAINED_FRAME_KINDS, load_frame_tokenizer
from mmsuite.tokenizers.token_space import checkpoint_sha256, settings_hash

SOURCE_KINDS = ("toyworld", "video")


# ---------------------------------------------------------------------------------------------------------
# windows and rows
# ---------------------------------------------------------------------------------------------------------


def window_starts(length: int, seq_len: int, stride: int) -> list[int]:
    """Start frames of the windows of ``seq_len`` frames every ``stride`` frames inside one clip of ``length``."""
    if seq_len < 1 or stride < 1:
        raise ValueError(f"seq_len and stride must be >= 1, got {seq_len}, {stride}")
    if seq_len > length:
        raise ValueError(f"windows of {seq_len} frames do not fit in clips of {length} frames (data.clip_frames)")
    return list(range(0, length - seq_len + 1, stride))


def is_single_row(key: str, start: int, seed: int, fraction: float) -> bool:
    """Whether the window ``(key, start)`` is a T=1 row: a fixed hash of (seed, key, start) below ``fraction``."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{key}:{start}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64 < fraction


def length_choices(seed: int, epoch: int, long_ratio: float):
    """The shared short/long sequence of one epoch: an endless iterator of bools (True = long batch).

    A pure function of ``(seed, epoch, long_ratio)``: every rank draws exactly the same sequence.
    """
    rng = np.random.default_rng([int(seed), int(epoch), 0x10E6])
    while True:
        yield bool(long_ratio > 0 and rng.random() < long_ratio)


# ---------------------------------------------------------------------------------------------------------
# the alternating training loader
# ---------------------------------------------------------------------------------------------------------


def _plain_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
        multiprocessing_context="fork" if num_workers > 0 else None,
    )


class AlternatingLoader:
    """Short and long training batches in the order :func:`length_choices` gives.

    An epoch is one pass over the short stream (its epoch ``e``) with long batches drawn in between; the long
    stream cycles through its own epochs ``e·10⁴ + q`` as needed. Each batch carries ``stream_pos = (e, i)``
    (``i`` counts both kinds), so a resumed run replays the choices up to ``i`` and restarts both streams at
    the batch they had reached.
    """

    def __init__(self, short: ShardStream, long: ShardStream | None, long_ratio: float, seed: int, datamodule):
        self.short, self.long = short, long
        self.long_ratio = float(long_ratio) if long is not None else 0.0
        self.seed, self.datamodule = int(seed), datamodule

    def _epoch(self) -> int:
        trainer = getattr(self.datamodule, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def __iter__(self):
        epoch = self._epoch()
        skip = self.datamodule._take_resume_offset(epoch)
        choices = length_choices(self.seed, epoch, self.long_ratio)
        n_short, n_long, index = 0, 0, 0
        while index < skip:  # replay the choices of the batches already trained on
            if next(choices):
                n_long += 1
            else:
                n_short += 1
            index += 1
        self.short.epoch, self.short.skip_batches = epoch, n_short
        short_iter = iter(_plain_loader(self.short, self.datamodule.num_workers)) if n_short < len(self.short) else None
        long_iter = None
        while n_short < len(self.short):
            if next(choices):
                if long_iter is None or n_long % len(self.long) == 0:
                    self.long.epoch = epoch * 10_000 + n_long // len(self.long)
                    self.long.skip_batches = n_long % len(self.long)
                    long_iter = iter(_plain_loader(self.long, self.datamodule.num_workers))
                batch, kind = next(long_iter), "L"
                n_long += 1
            else:
                batch, kind = next(short_iter), "S"
                n_short += 1
            batch["stream_pos"] = torch.tensor([epoch, index], dtype=torch.long)
            batch["length"] = kind
            index += 1
            yield batch


# ---------------------------------------------------------------------------------------------------------
# the DataModule
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LatentSourceSettings:
    kind: str = setting("toyworld", choices=list(SOURCE_KINDS))  # toyworld | video (a folder, decoded with PyAV)
    root: str | None = None  # video: the folder
    fps: float = setting(10.0, gt=0.0)  # video: frames kept per second of presentation time
    start_s: float = setting(0.0, ge=0.0)  # video: where each video's span starts
    span_s: float | None = setting(None, gt=0.0)  # video: seconds used per video (null: to the end)

    def check(self, key: str) -> None:
        if self.kind == "video" and not Path(str(self.root)).is_dir():
            raise FileNotFoundError(f"{key}.root must be a folder of videos, got {self.root!r}")


@dataclass
class EncoderSettings(TokenizerRunSettings):
    """The frozen frame encoder: the continuous image tokenizer run (trained first when missing) or a pretrained
    AutoencoderKL (``tokenizer.kind: autoencoder_kl``)."""

    tokenizer: Any = setting({})  # = ${tokenizer}: continuous (levels: null) or sd_vae (checked when loaded)

    def check(self, key: str) -> None:
        if dict(self.tokenizer or {}).get("kind") not in PRETRAINED_FRAME_KINDS:  # a local folder needs no run
            super().check(key)


@dataclass
class DynamicsDataSettings(ShardSettings):
    """``data`` of ``data=dynamics_latents`` (conf/data/dynamics_latents.yaml states only what differs)."""

    source: LatentSourceSettings = setting(LatentSourceSettings())
    world: dict[str, Any] = setting({})  # toy-world settings; frames and image_size are clip_frames and image_size
    n_clips: int = setting(600, ge=1)
    splits: dict[str, float] = setting({"train": 0.8, "val": 0.1, "test": 0.1}, ge=0.0)
    clip_frames: int = setting(32, ge=1)  # every sample is one clip of this many frames (videos are cut into clips)
    image_size: int = setting(64, ge=1)
    encoder: EncoderSettings = setting()
    log_dir: str = setting()  # = ${paths.log_dir}: where the encoder's run lives
    encode_batch_size: int = setting(64, ge=1)
    seq_len: int = setting(16, ge=1)  # short training windows ...
    stride: int = setting(8, ge=1)  # ... every this many frames of a clip
    long_seq_len: int | None = setting(32, ge=1)  # long windows (null: short only)
    long_batch_size: int | None = setting(2, ge=1)  # null: batch_size
    long_ratio: float = setting(0.1, ge=0.0, lt=1.0)  # chance that a batch is long (same draw on every rank)
    single_fraction: float = setting(0.1, ge=0.0, le=1.0)  # rows trained as independent T=1 frames
    batch_size: int = setting(4, ge=1)
    val_batch_size: int | None = setting(8, ge=1)
    shuffle_buffer: int = setting(64, ge=0)
    samples_per_shard: int = setting(16, ge=1)

    def check(self, key: str) -> None:
        if self.source.kind == "toyworld":
            try:
                controllable.world_config({**self.world, "frames": self.clip_frames, "image_size": self.image_size})
            except (TypeError, ValueError) as e:
                fail(f"{key}.world", f"is invalid: {e}")
        for what, n in (("seq_len", self.seq_len), ("long_seq_len", self.long_seq_len)):
            if n is not None:
                try:
                    window_starts(self.clip_frames, n, self.stride)  # the windows must fit: fail before building
                except ValueError as e:
                    fail(f"{key}.{what}", str(e))


class DynamicsLatentDataModule(ShardDataModule):
    """See the module docstring."""

    Settings = DynamicsDataSettings

    def __init__(self, token_space=None, **settings):
        super().__init__(token_space, **settings)
        s = self.settings
        self.source = as_dict(s.source)
        self.world = {**dict(s.world), "frames": s.clip_frames, "image_size": s.image_size}
        self.n_clips, self.splits = s.n_clips, dict(s.splits)
        self.clip_frames, self.image_size = s.clip_frames, s.image_size
        self.encoder = as_dict(s.encoder)
        self.log_dir = s.log_dir
        self.seq_len, self.stride = s.seq_len, s.stride
        self.long_seq_len = s.long_seq_len
        self.long_batch_size = s.long_batch_size or self.batch_size
        self.long_ratio = s.long_ratio if self.long_seq_len else 0.0
        self.single_fraction = s.single_fraction
        self.encode_batch_size = s.encode_batch_size
        self.latent_mean: torch.Tensor | None = None
        self.latent_std: torch.Tensor | None = None

    # -- the encoder ----------------------------------------------------------------------------------------
    @property
    def pretrained(self) -> bool:
        return dict(self.encoder.get("tokenizer") or {}).get("kind") in PRETRAINED_FRAME_KINDS

    def _ckpt(self) -> Path:
        return ensure_tokenizer(self.encoder, "image_tokenizer", self.log_dir, str(self.data_dir), key="data.encoder")

    def _encoder_identity(self):
        if self.pretrained:
            tok = dict(self.encoder["tokenizer"])
            return {"tokenizer": tok}
        sha = checkpoint_sha256(self.encoder["ckpt"])
        return {"ckpt": None} if sha is None else {"ckpt_sha256": sha}

    def load_encoder(self, device: str | torch.device = "cpu"):
        """The frozen frame encoder/decoder: ``encode_latents(uint8 [N,S,S,3])`` / ``decode_latents``."""
        return load_frame_tokenizer(
            self.encoder, self.image_size, device, ckpt=None if self.pretrained else self._ckpt()
        )

    # -- naming and building --------------------------------------------------------------------------------
    @property
    def dataset_name(self) -> str:
        if self.source["kind"] == "toyworld":
            clips = {"world": self.world, "n_clips": self.n_clips, "render": controllable.render_version(self.world)}
        else:
            root = Path(self.source["root"])
            files = sorted(p for p in root.rglob("*") if p.is_file())
            clips = {
                "root": str(root.resolve()),
                "files": [[str(f.relative_to(root)), f.stat().st_size] for f in files],
                **{k: self.source.get(k) for k in ("fps", "start_s", "span_s")},
            }
        settings = {
            "clips": clips,
            "splits": self.splits,
            "clip_frames": self.clip_frames,
            "image_size": self.image_size,
            "encoder": self._encoder_identity(),
            "samples_per_shard": self.samples_per_shard,
            "writer": WRITER_VERSION,
        }
        return f"dynlatents-{self.source['kind']}-{self.image_size}px-{settings_hash(settings)}"

    def prepare_data(self) -> None:
        if not self.pretrained:
            self._ckpt()  # train it first if needed: its sha256 names the data set
        super().prepare_data()

    def build(self, out_dir: Path) -> None:
        enc = self.load_encoder("cuda" if torch.cuda.is_available() else "cpu")
        info = {
            "source": {
                k: (v if isinstance(v, int | float | bool) or v is None else str(v)) for k, v in self.source.items()
            },
            "world": self.world if self.source["kind"] == "toyworld" else None,
            "clip_frames": self.clip_frames,
            "image_size": self.image_size,
            "encoder": {k: str(v) for k, v in self._encoder_identity().items()},
            "sample_fields": ["latents.npy", "actions.npy", "clip.json"],
        }
        total, total_sq, count, shape = None, None, 0, None
        skipped: list[str] = []
        with DatasetWriter(out_dir, self.samples_per_shard, info=info) as writer:
            for split, key, frames, actions, meta in self._iter_clips(skipped):
                z = torch.cat(
                    [
                        enc.encode_latents(frames[i : i + self.encode_batch_size])
                        for i in range(0, len(frames), self.encode_batch_size)
                    ]
                ).numpy()
                if not np.isfinite(z).all():
                    raise ValueError(f"the frame encoder gave non-finite latents for clip {key}")
                if shape is None:
                    shape = list(z.shape[1:])
                if split == "train":
                    zz = z.astype(np.float64)
                    s, sq = zz.sum(axis=(0, 2, 3)), (zz**2).sum(axis=(0, 2, 3))
                    total = s if total is None else total + s
                    total_sq = sq if total_sq is None else total_sq + sq
                    count += z.shape[0] * z.shape[2] * z.shape[3]
                members = {
                    "latents.npy": z.astype(np.float16),
                    "actions.npy": actions.astype(np.int64),
                    "clip.json": meta,
                }
                writer.write(split, key, members)
            if not count:
                raise ValueError(
                    f"no training clips of {self.clip_frames} frames were made (data.source={self.source})"
                )
            mean = total / count
            std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
            writer.info["latent_stats"] = {"mean": mean.round(6).tolist(), "std": std.round(6).tolist()}
            writer.info["latent_shape"] = shape
            writer.info["skipped_videos"] = skipped

    def _iter_clips(self, skipped: list):
        """``(split, key, frames uint8 [L,S,S,3], actions int64 [L], meta)`` for every clip."""
        if self.source["kind"] == "toyworld":
            cfg = controllable.world_config(self.world)
            split_of = split_by_item(range(self.n_clips), self.splits, seed=cfg.seed)
            names = controllable.action_names(cfg)
            for i in tqdm(range(self.n_clips), desc="dynamics latents (toy world)", unit="clip"):
                clip = controllable.render_clip(cfg, i)
                meta = {"clip": i, "action": names[int(clip.actions[0])], "caption": clip.caption}
                yield split_of[i], f"clip{i:07d}", clip.frames, clip.actions, meta
            return
        from mmsuite.sources import video

        root = Path(self.source["root"])
        videos = video.list_videos(root)
        split_of = split_by_item(videos, self.splits, seed=int(self.world.get("seed", 0)))
        fps, start, span = self.source["fps"], self.source["start_s"], self.source["span_s"]
        for v, name in enumerate(tqdm(videos, desc="dynamics latents (videos)", unit="video")):
            frames = video.read_frames(root / name, fps, self.image_size, start, None if span is None else float(span))
            clips = video.cut_clips(frames, self.clip_frames)
            if not clips:
                skipped.append(name)
                continue
            for c, clip in enumerate(clips):
                meta = {"video": name, "first_frame": c * self.clip_frames, "fps": fps}
                actions = np.full(self.clip_frames, -1, np.int64)
                yield split_of[name], f"video{v:05d}_clip{c:04d}", clip, actions, meta

    # -- reading ----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        manifest = read_manifest(self.root)
        self._check_token_space(manifest)
        stats = manifest["latent_stats"]
        self.latent_mean = torch.tensor(stats["mean"], dtype=torch.float32)
        self.latent_std = torch.tensor(stats["std"], dtype=torch.float32)
        self.latent_shape = tuple(manifest["latent_shape"])
        rank, world = (0, 1) if self.trainer is None else (self.trainer.global_rank, self.trainer.world_size)
        common = dict(
            collate=self.collate,
            seed=self.seed,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
            on_corrupt=self.on_corrupt,
        )
        self._streams = {}
        for split in ("train", "val", "test"):
            if split not in manifest["splits"]:
                continue
            shards, bad = healthy_shards(split_shards(self.root, split, manifest), self.on_corrupt)
            self.corrupt_shards += bad
            if split == "train":
                self._streams["train"] = self._window_stream(shards, self.seq_len, self.batch_size, common)
                if self.long_seq_len and self.long_ratio > 0:
                    self._streams["train_long"] = self._window_stream(
                        shards, self.long_seq_len, self.long_batch_size, common
                    )
            else:
                self._streams[split] = ShardStream(
                    shards,
                    batch_size=self.val_batch_size,
                    expand=self._whole_clip,
                    items_per_sample=1,
                    train=False,
                    shuffle_buffer=0,
                    **common,
                )
        if self.plan_dir is not None and "train" in self._streams:
            self._write_plan(rank)
            long = self._streams.get("train_long")
            path = Path(self.plan_dir) / f"data_plan_rank{rank}.json"
            plan = json.loads(path.read_text())
            plan["long_batches_per_epoch"] = len(long) if long is not None else 0
            plan["lengths"] = {"short": self.seq_len, "long": self.long_seq_len, "long_ratio": self.long_ratio}
            path.write_text(json.dumps(plan, indent=2) + "\n")

    def _window_stream(self, shards, seq_len: int, batch_size: int, common: dict) -> ShardStream:
        starts = window_starts(self.clip_frames, seq_len, self.stride)
        return ShardStream(
            shards,
            batch_size=batch_size,
            expand=lambda sample: self._windows(sample, seq_len, starts),
            items_per_sample=len(starts),
            train=True,
            shuffle_buffer=self.shuffle_buffer,
            **common,
        )

    def _windows(self, sample: dict, seq_len: int, starts: list[int]) -> list[dict]:
        z, actions, key = sample["latents"], sample["actions"], sample["__key__"]
        if z.shape[0] != self.clip_frames:
            raise ValueError(f"{self.root}: clip {key} has {z.shape[0]} frames, data.clip_frames is {self.clip_frames}")
        return [
            {
                "latents": z[s : s + seq_len],
                "actions": actions[s : s + seq_len],
                "single": is_single_row(key, s, self.seed, self.single_fraction),
            }
            for s in starts
        ]

    def _whole_clip(self, sample: dict) -> list[dict]:
        return [{"latents": sample["latents"], "actions": sample["actions"], "single": False}]

    def collate(self, items: list) -> dict:
        z = torch.from_numpy(np.stack([it["latents"] for it in items]).astype(np.float32))
        mean, std = self.latent_mean.view(1, 1, -1, 1, 1), self.latent_std.view(1, 1, -1, 1, 1)
        return {
            "latents": (z - mean) / std,
            "actions": torch.from_numpy(np.stack([it["actions"] for it in items]).astype(np.int64)),
            "single": [bool(it["single"]) for it in items],
        }

    def train_dataloader(self):
        return AlternatingLoader(
            self._streams["train"], self._streams.get("train_long"), self.long_ratio, self.seed, self
        )
