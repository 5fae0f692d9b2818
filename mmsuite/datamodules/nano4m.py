"""Token shards for ``nano4m``: toy-world clips as image, caption and audio tokens.

One sample per clip (``clip0000123``), in the clip's split (80/10/10 by clip, never by frame):

* ``tok_rgb.npy``  int32 ``[K, grid*grid]``: the image tokens of ``frames_per_clip`` evenly spaced frames (exactly
  ``grid*grid`` per frame, asserted);
* ``caption.npy``  int32 ``[caption_length]``: the caption as text BPE ids, padded with the token space's ``<pad>``;
  a caption longer than ``caption_length`` stops the build (never truncated);
* ``audio.npy``    int32 ``[frames * n_q]``: the clip's action sound track (:func:`mmsuite.sources.toysound.
  action_sound`, ``n_frames / fps`` seconds) as audio tokens, codebooks flattened frame-major; the count must
  equal the modality length exactly;
* ``caption_text.txt`` and ``attributes.json`` (the clip's colour, action, background; the evaluation scores them).

All ids are GLOBAL ids of the run's token space; batches carry LOCAL ids (``id - start`` of the modality's range) in
the modality layout of :class:`~mmsuite.lightning_modules.fourm.model.FourM`, plus the attribute labels
(``attr_color``, ``attr_action``: indices into :attr:`Nano4MDataModule.attribute_values`). Each clip gives
``frames_per_clip`` training items (one frame each, with the clip's caption and sound).

Tokenizers: the image and audio tokenizers are trained first (``train.py experiment=image_tokenizer`` /
``experiment=audio_tokenizer`` in a subprocess, same ``paths``) when their checkpoints are missing; the text BPE
is trained on the captions of the clips' TRAIN split only (:func:`~mmsuite.datamodules.base.prepare_text_tokenizer`,
stored beside the clip shards). The data set's name hashes both checkpoints and the BPE settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmsuite.datamodules.base import ShardDataModule, TokenizerRunSettings, ensure_tokenizer, prepare_text_tokenizer
from mmsuite.datamodules.clips import ClipSettings, ToyWorldDataModule, iter_clip_shards, source_clips
from mmsuite.datamodules.shards import (
    WRITER_VERSION,
    DatasetWriter,
    decode_sample,
    iter_raw_samples,
    read_manifest,
    split_shards,
)
from mmsuite.settings import as_dict, fail, setting
from mmsuite.sources import toysound, toyworld
from mmsuite.tokenizers.token_space import checkpoint_sha256, settings_hash

FIELDS = ("tok_rgb", "caption", "audio")
ATTRIBUTES = ("color", "action")  # scored by the evaluation (lightning_modules/fourm/attributes.py)
NANO4M_VERSION = 1  # bump when build() would write different shards for the same settings


@dataclass
class ClipSoundSettings:
    """The clip's action sound (mmsuite.sources.toysound.action_sound): a clip of T frames sounds T / fps seconds."""

    fps: float = setting(16.0, gt=0.0)
    seed: int = setting(0, ge=0)
    noise_floor: float = setting(0.0, ge=0.0)


@dataclass
class Nano4MSettings(ClipSettings):
    """``data`` of ``data=nano4m`` (conf/data/nano4m.yaml states only what differs)."""

    modalities: list[Any] = setting()  # = ${modalities.list}: distinct names from tok_rgb, caption, audio
    image_tokenizer: TokenizerRunSettings = setting()  # trained first when missing
    audio_tokenizer: TokenizerRunSettings | None = None  # needed by the audio modality
    text_tokenizer: Any = setting()  # = ${text_tokenizer}: conf/tokenizer/text_bpe.yaml, trained on the train split
    log_dir: str = setting()  # = ${paths.log_dir}: where the tokenizer runs live
    sound: ClipSoundSettings = setting(ClipSoundSettings())
    frames_per_clip: int = setting(4, ge=1)  # evenly spaced frames; each is one training item with the caption, sound
    clip_samples_per_shard: int = setting(24, ge=1)  # the clip data set's shards
    batch_size: int = setting(64, ge=1)
    val_batch_size: int | None = setting(128, ge=1)
    shuffle_buffer: int = setting(256, ge=0)  # clips; x frames_per_clip items
    samples_per_shard: int = setting(64, ge=1)

    def check(self, key: str) -> None:
        super().check(key)
        names = [m.get("name") if isinstance(m, dict) else m for m in self.modalities]
        if len(set(names)) != len(names) or set(names) - set(FIELDS) or "tok_rgb" not in names:
            fail(f"{key}.modalities", f"must be distinct names from {list(FIELDS)} with tok_rgb, got {names}")
        if "audio" in names and self.audio_tokenizer is None:
            fail(f"{key}.audio_tokenizer", "is needed by modality 'audio' (a checkpoint of experiment=audio_tokenizer)")
        frames = toyworld.ToyWorldConfig(**self.world).frames
        if self.frames_per_clip > frames:
            fail(f"{key}.frames_per_clip", f"must be in [1, {frames}] (the clip's frames), got {self.frames_per_clip}")


class Nano4MDataModule(ShardDataModule):
    Settings = Nano4MSettings

    def __init__(self, token_space=None, **settings):
        super().__init__(token_space, **settings)
        s = self.settings
        self.world, self.n_clips, self.splits = dict(s.world), s.n_clips, dict(s.splits)
        cfg = toyworld.ToyWorldConfig(**self.world)
        self.modalities = [dict(m) for m in s.modalities]
        self.names = [m["name"] for m in self.modalities]
        k = s.frames_per_clip
        self.frame_index = [int(t) for t in np.linspace(0, cfg.frames - 1, k).round()]
        self.items_per_sample = k
        self.image_tokenizer = as_dict(s.image_tokenizer)
        self.audio_tokenizer = as_dict(s.audio_tokenizer) if s.audio_tokenizer is not None else {}
        self.text_cfg = dict(s.text_tokenizer)
        self.sound = as_dict(s.sound)
        self.log_dir = s.log_dir
        self.clip_samples_per_shard = s.clip_samples_per_shard
        # colour and action names, in the order of the batch's attr_* indices
        self.attribute_values = {"color": list(cfg.colors), "action": list(cfg.actions)}
        self.attribute_counts: dict | None = None  # train split: {attribute: {value: clips}} (from the manifest)
        self.text_tokenizer = None  # the trained BPE (decodes generated captions), set by setup()
        self._starts: list[int] | None = None

    # -- what it is built from ------------------------------------------------------------------------
    def modality(self, name: str) -> dict:
        return self.modalities[self.names.index(name)]

    def _clips(self) -> ToyWorldDataModule:
        return source_clips(self)

    def _text_settings(self) -> dict:
        from mmsuite.tokenizers.text import bpe_settings

        return bpe_settings(self.text_cfg, self._clips().root)

    @property
    def dataset_name(self) -> str:
        settings = {
            "clips": self._clips().dataset_name,
            "frames": self.frame_index,
            "image_tokenizer": checkpoint_sha256(Path(self.image_tokenizer["ckpt"])),
            "audio_tokenizer": checkpoint_sha256(Path(self.audio_tokenizer["ckpt"])) if "audio" in self.names else None,
            "text_tokenizer": self._text_settings(),
            "sound": self.sound if "audio" in self.names else None,
            "modalities": self.modalities,
            "token_space": None if self.token_space is None else self.token_space.sha256,
            "samples_per_shard": self.samples_per_shard,
            "writer": WRITER_VERSION,
            "version": NANO4M_VERSION,
        }
        return f"nano4m-{settings_hash(settings)}"

    def _ensure_tokenizers(self) -> None:
        """Train what is missing (image / audio tokenizer runs, the text BPE on the clips' train split)."""
        ensure_tokenizer(self.image_tokenizer, "image_tokenizer", self.log_dir, str(self.data_dir))
        if "audio" in self.names:
            ensure_tokenizer(self.audio_tokenizer, "audio_tokenizer", self.log_dir, str(self.data_dir))
        clips = self._clips()
        clips.prepare_data()
        prepare_text_tokenizer(self.text_cfg, clips.root)

    def prepare_data(self) -> None:
        self._ensure_tokenizers()  # first: the checkpoints' sha256 name the data set
        super().prepare_data()

    def _load_text(self):
        from mmsuite.tokenizers.text import text_tokenizer_from_config

        return text_tokenizer_from_config(self.text_cfg, self.token_space, self._clips().root)

    # -- building -------------------------------------------------------------------------------------
    def build(self, out_dir: Path) -> None:
        from mmsuite.tokenizers.image import ImageTokenizer

        if self.token_space is None:
            raise ValueError("nano4m shards hold global token ids: the DataModule needs the run's token space")
        self._check_ranges()
        size = int(self.world.get("image_size", 64))
        image_ckpt = Path(self.image_tokenizer["ckpt"])
        image = ImageTokenizer.from_checkpoint(image_ckpt, token_space=self.token_space, image_size=size)
        rgb_len = int(self.modality("tok_rgb")["length"])
        if image.tokens_per_image != rgb_len:
            raise ValueError(
                f"the image tokenizer {image_ckpt} gives {image.tokens_per_image} tokens per {size}px frame but "
                f"modality tok_rgb has length {rgb_len}; set modalities.grid to the tokenizer's grid (never truncated)"
            )
        text = self._load_text()
        cap_len = int(self.modality("caption")["length"]) if "caption" in self.names else None
        audio, track = None, None
        info = {
            "source": {"kind": "toyworld", "clips": self._clips().dataset_name, "frames": self.frame_index},
            "image_tokenizer": {"ckpt": str(image_ckpt), "sha256": checkpoint_sha256(image_ckpt), "tokens": rgb_len},
            "text_tokenizer": {"path": str(text.source), "settings": self._text_settings(), "length": cap_len},
            "sample_fields": [f"{n}.npy" for n in self.names] + ["caption_text.txt", "attributes.json"],
        }
        if "audio" in self.names:
            audio = self._audio_tokenizer()
            track = self._sound_track_settings(audio.sample_rate)
            ckpt = Path(self.audio_tokenizer["ckpt"])
            info["audio_tokenizer"] = {"ckpt": str(ckpt), "sha256": checkpoint_sha256(ckpt), **audio.describe()}
            info["sound"] = {**self.sound, "samples": track["samples"], "sample_rate": audio.sample_rate}
        counts = {a: dict.fromkeys(self.attribute_values[a], 0) for a in ATTRIBUTES}
        longest = 0
        with DatasetWriter(out_dir, self.samples_per_shard, info=info, token_space=self.token_space) as writer:
            for split, clip in self._iter_clips():
                attrs = clip["attributes"]
                members = {"caption_text.txt": clip["caption"], "attributes.json": self._attribute_record(clip)}
                frames = clip["frames"][self.frame_index]
                ids = image.encode(frames).reshape(len(frames), -1).numpy().astype(np.int32)
                members["tok_rgb.npy"] = ids
                if cap_len is not None:
                    ids = text.encode(clip["caption"])
                    longest = max(longest, len(ids))
                    if len(ids) > cap_len:
                        raise ValueError(
                            f"clip {clip['key']}: the caption {clip['caption']!r} is {len(ids)} BPE tokens, more than "
                            f"modality caption's length {cap_len} (modalities.caption_length); captions are never "
                            "truncated: raise the length"
                        )
                    members["caption.npy"] = np.asarray(ids + [text.pad_id] * (cap_len - len(ids)), dtype=np.int32)
                if audio is not None:
                    members["audio.npy"] = self._audio_ids(audio, track, clip)
                if split == "train":
                    for a in ATTRIBUTES:
                        counts[a][attrs[a]] += 1
                writer.write(split, clip["key"], members)
            writer.info["train_attribute_counts"] = counts
            writer.info["longest_caption_tokens"] = longest

    def _check_ranges(self) -> None:
        """Every modality's local ids ``[0, vocab)`` map into the token space from its range's start; the audio
        codebooks' ranges lie back to back (one modality holds all of them, frame-major)."""
        space = self.token_space
        for m in self.modalities:
            start = space[m["range"]].start
            if start + int(m["vocab"]) > space.vocab_size:
                raise ValueError(
                    f"modality {m['name']}: vocab {m['vocab']} from range {m['range']!r} (start {start}) runs past the "
                    f"token space ({space.vocab_size} ids)"
                )
        if "audio" in self.names:
            m = self.modality("audio")
            first = space[m["range"]]
            n_q = int(m["vocab"]) // first.size
            for k in range(n_q):
                rng = space[f"{self.audio_prefix}_q{k}"]
                if rng.start != first.start + k * first.size or rng.size != first.size:
                    raise ValueError(
                        f"modality audio (vocab {m['vocab']} = {n_q} codebooks x {first.size}) needs the ranges "
                        f"{self.audio_prefix}_q0..q{n_q - 1} back to back in the token space; {rng.name} is "
                        f"[{rng.start}, {rng.stop})"
                    )

    @property
    def audio_prefix(self) -> str:
        return str(self.modality("audio")["range"]).rsplit("_q", 1)[0]

    def _audio_tokenizer(self):
        from mmsuite.tokenizers.audio import audio_tokenizer_from_checkpoint

        ckpt = Path(self.audio_tokenizer["ckpt"])
        tok = audio_tokenizer_from_checkpoint(ckpt, token_space=self.token_space)
        m = self.modality("audio")
        if tok.n_q * tok.bins != int(m["vocab"]):
            raise ValueError(
                f"the audio tokenizer {ckpt} has {tok.n_q} codebooks x {tok.bins} codes = {tok.n_q * tok.bins} ids, "
                f"modality audio has vocab {m['vocab']} (the experiment's audio.n_q / audio.bins)"
            )
        return tok

    def _sound_track_settings(self, sr: int) -> dict:
        n_frames = toyworld.ToyWorldConfig(**self.world).frames
        fps = self.sound["fps"]
        return {"n_frames": n_frames, "fps": fps, "samples": round(n_frames / fps * sr)}

    def _audio_ids(self, tok, track: dict, clip: dict) -> np.ndarray:
        cfg = toysound.ToySoundConfig(
            sample_rate=tok.sample_rate, seed=self.sound["seed"], noise_floor=self.sound["noise_floor"]
        )
        index = int(clip["key"].removeprefix("clip"))
        wav = toysound.action_sound(clip["attributes"]["action"], track["n_frames"], track["fps"], cfg, index)
        ids = tok.encode(torch.from_numpy(wav)[None, None], sample_rate=tok.sample_rate)[0].numpy()
        length = int(self.modality("audio")["length"])
        if ids.shape != (length,):
            raise ValueError(
                f"clip {clip['key']}: {len(wav)} samples ({track['n_frames']} frames at {track['fps']} fps) encode to "
                f"{ids.shape[0]} audio tokens ({tok.num_frames(len(wav))} frames x {tok.n_q} codebooks), but modality "
                f"audio has length {length}; set the experiment's audio.frames to {tok.num_frames(len(wav))} "
                "(never truncated)"
            )
        return ids.astype(np.int32)

    @staticmethod
    def _attribute_record(clip: dict) -> dict:
        a = clip["attributes"]
        return {"color": a["color"], "action": a["action"], "background": a["background"], "clip": clip["key"]}

    def _iter_clips(self):
        """``(split, clip)`` over the toy-world clip shards, every split, in manifest order."""
        yield from iter_clip_shards(self._clips(), "nano4m")

    # -- reading --------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        manifest = read_manifest(self.root)
        self.attribute_counts = manifest["train_attribute_counts"]
        self._starts = [self.token_space[m["range"]].start for m in self.modalities]
        if "caption" in self.names:
            self.text_tokenizer = self._load_text()

    def start(self, name: str) -> int:
        """Global id of local id 0 of modality ``name``."""
        return self.token_space[self.modality(name)["range"]].start

    def expand(self, sample: dict) -> list:
        rgb = sample["tok_rgb"]
        if rgb.shape[0] != self.items_per_sample:
            raise ValueError(
                f"{self.root} sample {sample['__key__']}: {rgb.shape[0]} frames, expected {self.items_per_sample} "
                "(data.frames_per_clip)"
            )
        attrs = sample["attributes"]
        labels = {a: self.attribute_values[a].index(attrs[a]) for a in ATTRIBUTES}
        rest = {n: sample[n] for n in self.names if n != "tok_rgb"}
        return [{"tok_rgb": rgb[j], **rest, "labels": labels} for j in range(rgb.shape[0])]

    def _local(self, items: list, k: int) -> torch.Tensor:
        m, start = self.modalities[k], self._starts[k]
        ids = torch.from_numpy(np.stack([it[m["name"]] for it in items]).astype(np.int64)) - start
        if ids.shape[1] != m["length"]:
            raise ValueError(f"{self.root}: modality {m['name']} has {ids.shape[1]} tokens, expected {m['length']}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= m["vocab"]):
            raise ValueError(
                f"{self.root}: modality {m['name']} holds ids outside [{start}, {start + m['vocab']}) "
                f"(local min {int(ids.min())}, max {int(ids.max())})"
            )
        return ids

    def collate(self, items: list) -> dict:
        tokens = torch.cat([self._local(items, k) for k in range(len(self.modalities))], dim=1)
        labels = {f"attr_{a}": torch.tensor([it["labels"][a] for it in items]) for a in ATTRIBUTES}
        return {"tokens": tokens, **labels}

    def probe_data(self, split: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every stored frame of ``split`` as local image ids ``[N, grid*grid]`` with its clip's attribute labels
        ``{attribute: [N]}`` (indices into :attr:`attribute_values`): what the caption -> image probe trains on."""
        k = self.names.index("tok_rgb")
        start = self._starts[k] if self._starts else self.start("tok_rgb")
        frames, labels = [], {a: [] for a in ATTRIBUTES}
        for shard in split_shards(self.root, split):
            for raw in iter_raw_samples(shard.path, self.on_corrupt):
                sample = decode_sample(raw)
                frames.append(sample["tok_rgb"].astype(np.int64) - start)
                for a in ATTRIBUTES:
                    labels[a] += [self.attribute_values[a].index(sample["attributes"][a])] * len(sample["tok_rgb"])
        tokens = torch.from_numpy(np.concatenate(frames))
        return tokens, {a: torch.tensor(v) for a, v in labels.items()}
