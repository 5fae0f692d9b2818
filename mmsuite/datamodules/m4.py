"""Frame-pair token shards for the 4M family (``m4_pose``): a reference frame, its pose, the first visually
distinct successor frame and its pose, and the clip's caption.

``build`` reads clips (the toy world's clip shards, or a Penn Action folder), picks for every frame ``t`` the
first successor ``t'`` (``t' - t <= max_gap``) whose mean absolute pixel difference reaches ``threshold``,
tokenises both frames with the trained image tokenizer (exactly ``grid x grid`` tokens, asserted) and both
poses with :class:`~mmsuite.tokenizers.pose.PoseQuantizer`, and writes one sample per pair:
``tok_rgb.npy``, ``coords.npy``, ``tok_rgb_next.npy``, ``coords_next.npy`` (int32 GLOBAL ids),
``caption.txt`` and ``pair.json``. Pairs inherit the split of their clip (splits are by clip, never by frame).

If the image tokenizer's checkpoint is missing, it is trained first by running ``train.py
experiment=image_tokenizer`` (same ``paths``) in a subprocess: the run manager's resume and finished marker
apply, so a finished tokenizer is never retrained. The data set's name hashes the tokenizer checkpoint's
sha256, so a retrained tokenizer gives new shards instead of stale tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmsuite.datamodules.base import ShardDataModule, TokenizerRunSettings, ensure_tokenizer
from mmsuite.datamodules.clips import ClipSettings, ToyWorldDataModule, iter_clip_shards, source_clips
from mmsuite.datamodules.shards import (
    WRITER_VERSION,
    DatasetWriter,
    read_manifest,
)
from mmsuite.settings import as_dict, fail, setting
from mmsuite.sources.pairs import successor_indices
from mmsuite.tokenizers.pose import PoseQuantizer, PoseSettings
from mmsuite.tokenizers.token_space import checkpoint_sha256, settings_hash

MODALITY_FIELDS = ("tok_rgb", "coords", "tok_rgb_next", "coords_next")


def ensure_image_tokenizer(cfg: dict, log_dir: str, data_dir: str) -> Path:
    """The image tokenizer checkpoint ``cfg["ckpt"]``, trained first when missing and allowed (ensure_tokenizer)."""
    return ensure_tokenizer(cfg, "image_tokenizer", log_dir, data_dir, key="data.image_tokenizer")


@dataclass
class SuccessorSettings:
    threshold: float = setting(4.0, ge=0.0)  # mean |frame t' - frame t| (0..255) for t' to count as visually distinct
    max_gap: int = setting(4, ge=1)  # frames; no successor within the gap -> frame t gives no pair


@dataclass
class PoseSourceSettings:
    kind: str = setting("toyworld", choices=["toyworld", "penn_action"])
    root: str | None = None  # penn_action: a Penn Action folder (frames/NNNN/*.jpg + labels/NNNN.mat)

    def check(self, key: str) -> None:
        if self.kind == "penn_action" and not Path(str(self.root)).is_dir():
            raise FileNotFoundError(
                f"{key}.root must be a Penn Action folder (frames/NNNN/*.jpg, labels/NNNN.mat), got {self.root!r}"
            )


@dataclass
class M4PoseSettings(ClipSettings):
    """``data`` of ``data=m4_pose`` (conf/data/m4_pose.yaml states only what differs)."""

    source: PoseSourceSettings = setting(PoseSourceSettings())
    modalities: list[Any] = setting()  # = ${modalities.list}: tok_rgb, coords, tok_rgb_next, coords_next
    image_tokenizer: TokenizerRunSettings = setting()  # trained first when missing
    pose: Any = setting(schema=PoseSettings)  # = the experiment's pose block
    successor: SuccessorSettings = setting(SuccessorSettings())
    log_dir: str = setting()  # = ${paths.log_dir}: where the tokenizer runs live
    clip_samples_per_shard: int = setting(24, ge=1)  # the clip data set's shards
    batch_size: int = setting(64, ge=1)
    val_batch_size: int | None = setting(128, ge=1)
    # pairs are written clip by clip; a buffer that holds the whole train split (~9.4k toy pairs, ~2 KB each) makes
    # every epoch a uniform permutation. With 2048 the batches drift through the shards and frame -> pose stayed at
    # the mean pose (experiments/m4_pose/LOG.md)
    shuffle_buffer: int = setting(16384, ge=0)
    samples_per_shard: int = setting(256, ge=1)

    def check(self, key: str) -> None:
        super().check(key)
        names = [m.get("name") if isinstance(m, dict) else m for m in self.modalities]
        if tuple(names) != MODALITY_FIELDS:
            fail(f"{key}.modalities", f"must be {list(MODALITY_FIELDS)} in this order, got {names}")


class M4PoseDataModule(ShardDataModule):
    Settings = M4PoseSettings

    def __init__(self, token_space=None, **settings):
        super().__init__(token_space, **settings)
        s = self.settings
        self.source = as_dict(s.source)
        self.world, self.n_clips, self.splits = dict(s.world), s.n_clips, dict(s.splits)
        self.modalities = [dict(m) for m in s.modalities]
        self.image_tokenizer = as_dict(s.image_tokenizer)
        self.pose_cfg = as_dict(s.pose)
        self.successor = as_dict(s.successor)
        self.log_dir = s.log_dir
        self.clip_samples_per_shard = s.clip_samples_per_shard
        self.mean_pose: np.ndarray | None = None
        self._starts: list[int] | None = None

    # -- the clips this is built from ---------------------------------------------------------------------
    def _clips(self) -> ToyWorldDataModule:
        return source_clips(self)

    def _tokenizer_ckpt(self) -> Path:
        return ensure_image_tokenizer(self.image_tokenizer, self.log_dir, str(self.data_dir))

    @property
    def dataset_name(self) -> str:
        ckpt = Path(self.image_tokenizer["ckpt"])
        if self.source["kind"] == "toyworld":
            clips = self._clips().dataset_name
        else:  # a real folder: its videos, labels and their sizes (a changed folder gives a new data set)
            root = Path(self.source["root"])
            files = sorted(p for p in root.rglob("*") if p.is_file())
            listing = [[str(f.relative_to(root)), f.stat().st_size] for f in files]
            clips = {"root": str(root.resolve()), "files": listing}
        settings = {
            "clips": clips,
            "world_size": self.world.get("image_size", 64),
            "tokenizer_sha256": checkpoint_sha256(ckpt),
            "pose": self.pose_cfg,
            "successor": self.successor,
            "modalities": self.modalities,
            "token_space": None if self.token_space is None else self.token_space.sha256,
            "samples_per_shard": self.samples_per_shard,
            "writer": WRITER_VERSION,
        }
        return f"m4pairs-{settings_hash(settings)}"

    def prepare_data(self) -> None:
        self._tokenizer_ckpt()  # train it first if needed: its sha256 names the data set
        super().prepare_data()

    def build(self, out_dir: Path) -> None:
        from mmsuite.tokenizers.image import ImageTokenizer

        if self.token_space is None:
            raise ValueError("m4_pose shards hold global token ids: the DataModule needs the run's token space")
        size = int(self.world.get("image_size", 64))
        ckpt = self._tokenizer_ckpt()
        tok = ImageTokenizer.from_checkpoint(ckpt, token_space=self.token_space, image_size=size)
        quant = PoseQuantizer(bins=int(self.pose_cfg["bins"]), canvas=int(self.pose_cfg["canvas"]))
        rgb_len = self.modalities[0]["length"]
        if tok.tokens_per_image != rgb_len:
            raise ValueError(
                f"the image tokenizer gives {tok.tokens_per_image} tokens per {size}px frame but modality tok_rgb has "
                f"length {rgb_len}; set the modality length to the tokenizer's grid (never truncate)"
            )
        pose_start = self.token_space["pose_bins"].start
        info = {
            "source": {k: str(v) for k, v in self.source.items()},
            "image_tokenizer": {"ckpt": str(ckpt), "sha256": checkpoint_sha256(ckpt), "tokens_per_image": rgb_len},
            "pose": {**self.pose_cfg, "image_size": size},
            "successor": self.successor,
            "sample_fields": [f"{m}.npy" for m in MODALITY_FIELDS] + ["caption.txt", "pair.json"],
        }
        pose_sum, pose_n = np.zeros((13, 2)), 0
        with DatasetWriter(out_dir, self.samples_per_shard, info=info, token_space=self.token_space) as writer:
            for split, clip in self._iter_clips(size):
                frames = clip["frames"]
                succ = successor_indices(frames, self.successor["threshold"], self.successor["max_gap"])
                if not (succ >= 0).any():
                    continue
                ids = tok.encode(frames).reshape(len(frames), -1).numpy().astype(np.int32)
                joints = quant.scale_to_canvas(clip["joints"].astype(np.float32), size)
                coords = quant.encode(joints, clip["visible"], clip.get("available"))
                coords = (coords + pose_start).astype(np.int32)
                if split == "train":
                    ok = clip["visible"] if clip.get("available") is None else clip["available"]
                    pose_sum += np.where(ok[..., None], joints, 0).sum(0)
                    pose_n += ok.sum(0)[:, None]
                for t in np.flatnonzero(succ >= 0):
                    t2 = int(succ[t])
                    members = {
                        "tok_rgb.npy": ids[t],
                        "coords.npy": coords[t],
                        "tok_rgb_next.npy": ids[t2],
                        "coords_next.npy": coords[t2],
                        "caption.txt": clip["caption"],
                        "pair.json": {"clip": clip["key"], "t": int(t), "t_next": t2},
                    }
                    writer.write(split, f"{clip['key']}_t{t:03d}", members)
            writer.info["mean_pose_canvas_px"] = (pose_sum / np.maximum(pose_n, 1)).round(4).tolist()

    def _iter_clips(self, size: int):
        """``(split, clip)`` with clip = frames uint8 [T,size,size,3], joints [T,13,2] px, visible [T,13],
        available [T,13] or None, caption, key; the split is the clip's (video's) own."""
        if self.source["kind"] == "toyworld":
            for split, clip in iter_clip_shards(self._clips(), "m4 pairs"):
                yield split, {**clip, "visible": clip["visible"].astype(bool)}
            return
        from mmsuite.sources import penn_action
        from mmsuite.sources.pairs import resize_center_crop_with_pose
        from mmsuite.sources.splits import split_by_item

        root = self.source["root"]
        videos = penn_action.list_videos(root)
        split_of = split_by_item(videos, self.splits, seed=int(self.world.get("seed", 0)))
        for vid in tqdm(videos, desc="m4 pairs (Penn Action)", unit="video"):
            v = penn_action.load_video(root, vid)
            frames = zip(v["frames"], v["joints"], v["visible"])
            out = [resize_center_crop_with_pose(f, j, vis, size) for f, j, vis in frames]
            yield (
                split_of[vid],
                {
                    "frames": np.stack([o[0] for o in out]),
                    "joints": np.stack([o[1] for o in out]),
                    "visible": np.stack([o[2] for o in out]),
                    "available": np.stack([o[3] for o in out]),
                    "caption": f"a person: {v['action']}",
                    "key": f"video{vid}",
                },
            )

    # -- reading ----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        manifest = read_manifest(self.root)
        self.mean_pose = np.asarray(manifest["mean_pose_canvas_px"], dtype=np.float32)
        self._starts = [self.token_space[m["range"]].start for m in self.modalities]

    def collate(self, items: list) -> dict:
        cols = []
        for m, start in zip(self.modalities, self._starts):
            ids = torch.from_numpy(np.stack([it[m["name"]] for it in items]).astype(np.int64)) - start
            if ids.shape[1] != m["length"]:
                raise ValueError(f"{self.root}: modality {m['name']} has {ids.shape[1]} tokens, expected {m['length']}")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= m["vocab"]):
                raise ValueError(
                    f"{self.root}: modality {m['name']} holds ids outside its range {m['range']!r} "
                    f"(local min {int(ids.min())}, max {int(ids.max())}, vocab {m['vocab']})"
                )
            cols.append(ids)
        return {"tokens": torch.cat(cols, dim=1), "caption": [it["caption"] for it in items]}
