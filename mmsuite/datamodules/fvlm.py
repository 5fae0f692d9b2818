"""Clip shards for the foveated VLM: frozen patch features, next-frame latents and a caption per clip.

Build (``prepare.py experiment=fvlm_joint``, or the first ``train.py`` that lacks it): clips of ``clip_frames``
frames, from the toy world (``source.kind=toyworld``, with its small detail named in the caption) or from a folder
of videos (``source.kind=video``: decoded with PyAV at ``source.fps`` from ``source.start_s`` for ``source.span_s``
seconds, cut into consecutive clips; each video's caption is the text file beside it, ``<name>.txt``), each written
ONCE as one sample:

* ``features.npy`` float16 ``[T, N, D]``: a frozen patch feature extractor (``data.features``: ``pixel_patches``
  for the toy world, DINOv2 from a local folder for real data; :mod:`mmsuite.tokenizers.patch_features`);
* ``latents.npy`` float16 ``[T, C, h, w]``: the frozen frame encoder of the dynamics family (``data.encoder``: the
  continuous image tokenizer, trained first when missing, or an AutoencoderKL from a local folder);
* ``caption.txt`` and ``attributes.json`` (the toy world's attributes: what greedy captions are scored against);
* ``frames.npy`` uint8 ``[T, S, S, 3]`` in the val and test splits only (attention maps are drawn over them).

Splits are by clip for the toy world and by video for a folder. The manifest holds the per-channel mean and std of
the train latents; batches carry normalised latents. Captions are encoded at load time with the run's text tokenizer
(``text_tokenizer``: a BPE trained on this data set's train captions, or a pretrained one) as global token ids, EOS
appended, never truncated (a caption over ``max_caption_tokens`` stops the run naming the clip).

Batches: ``features`` float16 ``[B, T, N, D]`` (``frames`` of each clip's ``clip_frames``, evenly spaced),
``latents`` float32 ``[B, T, C, h, w]``, ``text_ids`` long ``[B, L]`` (right-padded with ``<pad>``), ``text_mask``
bool ``[B, L]``, ``caption`` (list of str), ``attributes`` (list of dict), and in val/test ``frames`` uint8
``[B, T, S, S, 3]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmsuite.datamodules.base import ShardDataModule, ShardSettings, ensure_tokenizer, prepare_text_tokenizer
from mmsuite.datamodules.dynamics import EncoderSettings, LatentSourceSettings
from mmsuite.datamodules.shards import WRITER_VERSION, DatasetWriter, read_manifest
from mmsuite.settings import SettingsError, as_dict, fail, setting
from mmsuite.sources import toyworld
from mmsuite.sources.splits import split_by_item
from mmsuite.tokenizers.image import PRETRAINED_FRAME_KINDS, load_frame_tokenizer
from mmsuite.tokenizers.patch_features import feature_settings, patch_features_from_config
from mmsuite.tokenizers.token_space import checkpoint_sha256, settings_hash, weights_sha256

FVLM_DATA_VERSION = 1  # bump when the same settings would write different samples
EVAL_SPLITS = ("val", "test")  # the splits that also store the frames


@dataclass
class FVLMDataSettings(ShardSettings):
    """``data`` of ``data=fvlm_clips`` (conf/data/fvlm_clips.yaml states only what differs)."""

    source: LatentSourceSettings = setting(LatentSourceSettings())
    world: dict[str, Any] = setting({})  # toy-world settings; frames and image_size are clip_frames and image_size
    n_clips: int = setting(1200, ge=1)
    splits: dict[str, float] = setting({"train": 0.8, "val": 0.1, "test": 0.1}, ge=0.0)
    clip_frames: int = setting(16, ge=1)  # frames stored per clip (videos are cut into clips of this many)
    frames: int = setting(16, ge=1)  # frames a sample reads: evenly spaced over the stored ones
    image_size: int = setting(64, ge=1)  # frames are rendered / decoded at this size
    features: dict[str, Any] = setting({"kind": "pixel_patches"})  # {kind, **settings} of the patch features
    encoder: EncoderSettings = setting()  # the frozen frame encoder of the next-frame latents
    log_dir: str = setting()  # = ${paths.log_dir}: where the encoder's run lives
    encode_batch_size: int = setting(64, ge=1)
    text_tokenizer: Any = setting()  # = ${text_tokenizer}: text_bpe (trained on the train captions) or hf_text
    max_caption_tokens: int = setting(64, ge=2)  # EOS included; a longer caption stops the run
    batch_size: int = setting(16, ge=1)
    val_batch_size: int | None = setting(32, ge=1)
    shuffle_buffer: int = setting(64, ge=0)
    samples_per_shard: int = setting(64, ge=1)

    def check(self, key: str) -> None:
        if self.source.kind == "toyworld":
            try:
                toyworld.ToyWorldConfig(**{**self.world, "frames": self.clip_frames, "image_size": self.image_size})
            except (TypeError, ValueError) as e:
                fail(f"{key}.world", f"is invalid: {e}")
        if self.frames > self.clip_frames:
            fail(f"{key}.frames", f"must be <= clip_frames ({self.clip_frames}), got {self.frames}")
        feature_settings(self.features, f"{key}.features")
        if not isinstance(self.text_tokenizer, dict) or "name" not in self.text_tokenizer:
            fail(f"{key}.text_tokenizer", "must be a text tokenizer config (conf/tokenizer/text_bpe.yaml or hf_text)")


class ChannelStats:
    """Per-channel mean and std of ``[T, C, h, w]`` arrays, accumulated in float64."""

    def __init__(self):
        self.total, self.total_sq, self.count = None, None, 0

    def add(self, z: np.ndarray) -> None:
        zz = z.astype(np.float64)
        s, sq = zz.sum(axis=(0, 2, 3)), (zz**2).sum(axis=(0, 2, 3))
        self.total = s if self.total is None else self.total + s
        self.total_sq = sq if self.total_sq is None else self.total_sq + sq
        self.count += z.shape[0] * z.shape[2] * z.shape[3]

    def result(self) -> dict:
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.total_sq / self.count - mean**2, 1e-12))
        return {"mean": mean.round(6).tolist(), "std": std.round(6).tolist()}


class FVLMDataModule(ShardDataModule):
    """See the module docstring."""

    Settings = FVLMDataSettings

    def __init__(self, token_space=None, **settings):
        super().__init__(token_space, **settings)
        s = self.settings
        self.source = as_dict(s.source)
        self.world = {**dict(s.world), "frames": s.clip_frames, "image_size": s.image_size}
        self.n_clips, self.splits = s.n_clips, dict(s.splits)
        self.clip_frames, self.image_size = s.clip_frames, s.image_size
        self.frame_index = np.linspace(0, s.clip_frames - 1, s.frames).round().astype(int)
        self.features = dict(s.features)
        self.encoder = as_dict(s.encoder)
        self.log_dir = s.log_dir
        self.text_cfg = dict(s.text_tokenizer)
        self.max_caption_tokens = s.max_caption_tokens
        self.text_tokenizer = None  # set by setup()
        self.latent_mean: torch.Tensor | None = None
        self.latent_std: torch.Tensor | None = None
        self._name: str | None = None

    # -- what the data set is made with ---------------------------------------------------------------------
    @property
    def pretrained_encoder(self) -> bool:
        return dict(self.encoder.get("tokenizer") or {}).get("kind") in PRETRAINED_FRAME_KINDS

    def _encoder_ckpt(self) -> Path:
        return ensure_tokenizer(self.encoder, "image_tokenizer", self.log_dir, str(self.data_dir), key="data.encoder")

    def _identity(self) -> dict:
        """Everything that decides the samples: clips, frames, feature extractor and its weights, encoder."""
        if self.source["kind"] == "toyworld":
            clips = {"world": self.world, "n_clips": self.n_clips, "render": toyworld.RENDER_VERSION}
        else:
            root = Path(self.source["root"])
            files = sorted(p for p in root.rglob("*") if p.is_file())
            clips = {
                "root": str(root.resolve()),
                "files": [[str(f.relative_to(root)), f.stat().st_size] for f in files],
                **{k: self.source.get(k) for k in ("fps", "start_s", "span_s")},
            }
        feats = feature_settings(self.features, "data.features")
        feature_id = {k: v for k, v in as_dict(feats).items() if k not in ("path", "device", "batch_size")}
        feature_id["kind"] = self.features["kind"]
        if getattr(feats, "path", ""):
            feature_id["weights_sha256"] = weights_sha256(Path(feats.path).expanduser())
        if self.pretrained_encoder:
            encoder = {"tokenizer": dict(self.encoder["tokenizer"])}
        else:
            encoder = {"ckpt_sha256": checkpoint_sha256(self.encoder["ckpt"])}
        return {
            "clips": clips,
            "splits": self.splits,
            "clip_frames": self.clip_frames,
            "image_size": self.image_size,
            "features": feature_id,
            "encoder": encoder,
            "samples_per_shard": self.samples_per_shard,
            "writer": WRITER_VERSION,
            "version": FVLM_DATA_VERSION,
        }

    @property
    def dataset_name(self) -> str:
        if self._name is None:
            self._name = f"fvlm-{self.source['kind']}-{self.image_size}px-{settings_hash(self._identity())}"
        return self._name

    # -- building ---------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if not self.pretrained_encoder:
            self._encoder_ckpt()  # trained first when missing: its sha256 names the data set
        super().prepare_data()
        if self.text_cfg.get("name") == "text_bpe":
            prepare_text_tokenizer(self.text_cfg, self.root)  # on this data set's train captions only

    def build(self, out_dir: Path) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        enc = load_frame_tokenizer(
            self.encoder, self.image_size, device, ckpt=None if self.pretrained_encoder else self._encoder_ckpt()
        )
        extractor = patch_features_from_config(self.features, "data.features")
        info = {
            "source": {
                k: (v if isinstance(v, int | float | bool) or v is None else str(v)) for k, v in self.source.items()
            },
            "world": self.world if self.source["kind"] == "toyworld" else None,
            "clip_frames": self.clip_frames,
            "image_size": self.image_size,
            "features": {**extractor.describe(), "weights_sha256": extractor.weights_sha256()},
            "encoder": {k: str(v) for k, v in self._identity()["encoder"].items()},
            "sample_fields": ["features.npy", "latents.npy", "caption.txt", "attributes.json", "frames.npy (val/test)"],
        }
        stats, latent_shape, skipped = ChannelStats(), None, []
        with DatasetWriter(out_dir, self.samples_per_shard, info=info) as writer:
            for split, key, frames, caption, attributes in self._iter_clips(skipped):
                feats = extractor(frames).numpy()
                z = torch.cat(
                    [
                        enc.encode_latents(frames[i : i + self.settings.encode_batch_size])
                        for i in range(0, len(frames), self.settings.encode_batch_size)
                    ]
                ).numpy()
                if not (np.isfinite(z).all() and np.isfinite(feats).all()):
                    raise ValueError(f"clip {key}: the frame encoder or the patch features gave non-finite values")
                latent_shape = list(z.shape[1:])
                if split == "train":
                    stats.add(z)
                members = {
                    "features.npy": feats,
                    "latents.npy": z.astype(np.float16),
                    "caption.txt": caption,
                    "attributes.json": attributes,
                }
                if split in EVAL_SPLITS:
                    members["frames.npy"] = np.ascontiguousarray(frames, dtype=np.uint8)
                writer.write(split, key, members)
            if not stats.count:
                raise ValueError(
                    f"no training clips of {self.clip_frames} frames were made (data.source={self.source})"
                )
            writer.info.update(
                latent_stats=stats.result(),
                latent_shape=latent_shape,
                feature_shape=[extractor.num_tokens, extractor.dim],
                skipped_videos=skipped,
            )

    def _iter_clips(self, skipped: list):
        """``(split, key, frames uint8 [L, S, S, 3], caption, attributes)`` for every clip."""
        if self.source["kind"] == "toyworld":
            cfg = toyworld.ToyWorldConfig(**self.world)
            split_of = split_by_item(range(self.n_clips), self.splits, seed=cfg.seed)
            for i in tqdm(range(self.n_clips), desc="fvlm clips (toy world)", unit="clip"):
                clip = toyworld.make_clip(cfg, i)
                yield split_of[i], f"clip{i:07d}", clip.frames, clip.caption, {"clip": i, **clip.attributes}
            return
        from mmsuite.sources import video

        root = Path(self.source["root"])
        videos = video.list_videos(root)
        captions = {}
        for name in videos:
            text_file = (root / name).with_suffix(".txt")
            if not text_file.is_file():
                raise FileNotFoundError(f"video {root / name} has no caption file {text_file} (data.source.root)")
            captions[name] = text_file.read_text().strip()
            if not captions[name]:
                raise ValueError(f"caption file {text_file} is empty")
        split_of = split_by_item(videos, self.splits, seed=int(self.world.get("seed", 0)))
        fps, start, span = self.source["fps"], self.source["start_s"], self.source["span_s"]
        for v, name in enumerate(tqdm(videos, desc="fvlm clips (videos)", unit="video")):
            frames = video.read_frames(root / name, fps, self.image_size, start, None if span is None else float(span))
            clips = video.cut_clips(frames, self.clip_frames)
            if not clips:
                skipped.append(name)
                continue
            for c, clip in enumerate(clips):
                meta = {"video": name, "first_frame": c * self.clip_frames, "fps": fps}
                yield split_of[name], f"video{v:05d}_clip{c:04d}", clip, captions[name], meta

    # -- reading ----------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        from mmsuite.tokenizers.text import text_tokenizer_from_config

        manifest = read_manifest(self.root)
        stats = manifest["latent_stats"]
        self.latent_mean = torch.tensor(stats["mean"], dtype=torch.float32)
        self.latent_std = torch.tensor(stats["std"], dtype=torch.float32)
        self.latent_shape = tuple(manifest["latent_shape"])
        self.feature_shape = tuple(manifest["feature_shape"])
        self.grid = tuple(manifest["features"]["grid"])
        self.has_cls = bool(manifest["features"]["cls"])
        if self.token_space is None:
            raise SettingsError("the fvlm data module needs the run's token space (token_space.ranges)")
        self.text_tokenizer = text_tokenizer_from_config(self.text_cfg, self.token_space, self.root)
        super().setup(stage)

    def expand(self, sample: dict) -> list:
        ids = self.text_tokenizer.encode(sample["caption"], add_eos=True)
        if len(ids) > self.max_caption_tokens:
            raise ValueError(
                f"the caption {sample['caption']!r} is {len(ids)} tokens with EOS, more than data.max_caption_tokens="
                f"{self.max_caption_tokens}; captions are never truncated"
            )
        if sample["features"].shape[0] != self.clip_frames:
            raise ValueError(f"{sample['features'].shape[0]} frames stored, data.clip_frames is {self.clip_frames}")
        item = {
            "features": sample["features"][self.frame_index],
            "latents": sample["latents"][self.frame_index],
            "ids": ids,
            "caption": sample["caption"],
            "attributes": sample["attributes"],
        }
        if "frames" in sample:
            item["frames"] = sample["frames"][self.frame_index]
        return [item]

    def collate(self, items: list) -> dict:
        length = max(len(it["ids"]) for it in items)
        pad = self.text_tokenizer.pad_id
        ids = torch.full((len(items), length), pad, dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, : len(it["ids"])] = torch.tensor(it["ids"], dtype=torch.long)
        z = torch.from_numpy(np.stack([it["latents"] for it in items]).astype(np.float32))
        mean, std = self.latent_mean.view(1, 1, -1, 1, 1), self.latent_std.view(1, 1, -1, 1, 1)
        batch = {
            "features": torch.from_numpy(np.stack([it["features"] for it in items])),
            "latents": (z - mean) / std,
            "text_ids": ids,
            "text_mask": torch.arange(length)[None] < torch.tensor([len(it["ids"]) for it in items])[:, None],
            "caption": [it["caption"] for it in items],
            "attributes": [it["attributes"] for it in items],
        }
        if all("frames" in it for it in items):
            batch["frames"] = torch.from_numpy(np.stack([it["frames"] for it in items]))
        return batch
