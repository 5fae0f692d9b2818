"""MMPT task shards: captioned images and captioned audio as token ids, and the task mixture that draws from them.

One sample per record, in its source item's split:

* ``text.npy``  int64 ``[n]``: the caption as global text ids (no specials, no padding);
* ``media.npy`` int64: the image's global ids ``[format.image_tokens]`` or the sound's audio ids, frame-major;
* ``caption.txt`` and ``attributes.json`` (``modality``: image | audio, ``source``, and the attributes the
  caption states: colour / action / background of a toy-world frame, kind / pitch / count / loudness / length of
  a toy sound).

Records come from toy-world clips (``frames_per_clip`` evenly spaced frames through the image tokenizer, each with
the clip's caption) and from toy sounds (:mod:`mmsuite.sources.toysound` through the audio tokenizer). Each record
makes two sequences (:mod:`mmsuite.tokenizers.mmpt_sequences`): image -> I2T and T2I, audio -> A2T and T2A; drops
are counted per task and reason. Validation batches hold both; a training batch keeps one per record, drawn by
:class:`~mmsuite.tokenizers.mmpt_sampling.TaskMixture` at the batch's global step (the ramp), so a resumed run
draws what the uninterrupted one would have. The mixture's and the drops' counts travel in checkpoints.

The golden sets (``golden.per_task`` val records per task, stratified by caption length and source) are chosen
once when the data set is built and stored in its manifest.

Tokenizers: the image and audio tokenizer runs are trained first when their checkpoints are missing; the text
BPE is trained on the TRAIN captions of both sources, stored in ``<data_dir>/mmpt-text-<hash>/``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmsuite.datamodules.base import ShardDataModule, TokenizerRunSettings, ensure_tokenizer
from mmsuite.datamodules.clips import ClipSettings, iter_clip_shards, source_clips
from mmsuite.datamodules.shards import (
    WRITER_VERSION,
    DatasetWriter,
    decode_sample,
    iter_raw_samples,
    read_manifest,
    read_texts,
    split_shards,
)
from mmsuite.datamodules.sounds import ToySoundDataModule
from mmsuite.settings import as_dict, fail, setting
from mmsuite.sources import toysound, toyworld
from mmsuite.sources.wav import decode_wav
from mmsuite.tokenizers.mmpt_sampling import GoldenSettings, MixtureSettings, TaskMixture, select_golden
from mmsuite.tokenizers.mmpt_sequences import (
    DROP_REASONS,
    DropCounter,
    SequenceBuilder,
    SequenceSettings,
    TaskItem,
    assemble_text,
    collate,
    verify_sequence,
)
from mmsuite.tokenizers.mmpt_space import TASK_NAMES, FormatSettings, MMPTLayout
from mmsuite.tokenizers.token_space import checkpoint_sha256, settings_hash

MMPT_VERSION = 1  # bump when build() would write different shards for the same settings
IMAGE_TASKS, AUDIO_TASKS = ("i2t", "t2i"), ("a2t", "t2a")
TASKS_OF = {"image": IMAGE_TASKS, "audio": AUDIO_TASKS}


@dataclass
class MMPTSoundSettings:
    """The toy sounds (mmsuite.sources.toysound) at the audio tokenizer's rate."""

    n_clips: int = setting(2000, ge=1)
    duration_s: float = setting(1.0, ge=0.5)
    seed: int = setting(0, ge=0)
    samples_per_shard: int = setting(50, ge=1)  # the raw sound data set's shards


@dataclass
class CaptionFolderSettings:
    """Real captioned data added to the toy records (mmsuite.sources.captioned): a LLaVA-pretrain style JSON +
    image folder, and an AudioCaps / Clotho style CSV + audio folder. Each is split by its own items."""

    images_json: str | None = None
    images_dir: str | None = None
    audio_csv: str | None = None
    audio_dir: str | None = None
    audio_file_column: str | None = None  # null: file_name, else youtube_id

    def check(self, key: str) -> None:
        for a, b in (("images_json", "images_dir"), ("audio_csv", "audio_dir")):
            if (getattr(self, a) is None) != (getattr(self, b) is None):
                fail(f"{key}.{a}", f"and {key}.{b} go together")


@dataclass
class MMPTDataSettings(ClipSettings):
    """``data`` of ``data=mmpt`` (conf/data/mmpt.yaml states only what differs)."""

    image_tokenizer: TokenizerRunSettings = setting()  # trained first when missing
    audio_tokenizer: TokenizerRunSettings = setting()
    text_tokenizer: Any = setting()  # = ${text_tokenizer}: conf/tokenizer/text_bpe.yaml
    log_dir: str = setting()  # = ${paths.log_dir}: where the tokenizer runs live
    format: Any = setting({}, schema=FormatSettings)  # = ${mmpt_format}: what a well-formed body is
    sequence: SequenceSettings = setting(SequenceSettings())
    golden: GoldenSettings = setting(GoldenSettings())
    mixture: MixtureSettings = setting(MixtureSettings())
    sound: MMPTSoundSettings = setting(MMPTSoundSettings())
    real: CaptionFolderSettings = setting(CaptionFolderSettings())  # optional real captioned images / audio
    frames_per_clip: int = setting(2, ge=1)  # evenly spaced frames per clip, each a captioned image record
    clip_samples_per_shard: int = setting(24, ge=1)  # the clip data set's shards
    accumulate_grad_batches: int = setting(1, ge=1)  # = ${trainer.accumulate_grad_batches}: micro-batches per step
    check_records: int = setting(64, ge=1)  # gate A3/A4: records of each split checked before training
    batch_size: int = setting(16, ge=1)  # records (each gives one training sequence, two validation sequences)
    val_batch_size: int | None = setting(16, ge=1)
    shuffle_buffer: int = setting(256, ge=0)
    samples_per_shard: int = setting(128, ge=1)

    def check(self, key: str) -> None:
        super().check(key)
        frames = toyworld.ToyWorldConfig(**self.world).frames
        if self.frames_per_clip > frames:
            fail(f"{key}.frames_per_clip", f"must be in [1, {frames}] (the clip's frames), got {self.frames_per_clip}")


class MMPTDataModule(ShardDataModule):
    Settings = MMPTDataSettings

    def __init__(self, token_space=None, **settings):
        super().__init__(token_space, **settings)
        s = self.settings
        self.world, self.n_clips, self.splits = dict(s.world), s.n_clips, dict(s.splits)
        self.clip_samples_per_shard = s.clip_samples_per_shard
        cfg = toyworld.ToyWorldConfig(**self.world)
        self.frame_index = [int(t) for t in np.linspace(0, cfg.frames - 1, s.frames_per_clip).round()]
        self.image_tokenizer_cfg = as_dict(s.image_tokenizer)
        self.audio_tokenizer_cfg = as_dict(s.audio_tokenizer)
        self.text_cfg = dict(s.text_tokenizer)
        self.log_dir = s.log_dir
        self.fmt = s.format
        self.layout = MMPTLayout(token_space) if token_space is not None else None
        self.builder = SequenceBuilder(self.layout, self.fmt, s.sequence) if self.layout is not None else None
        self.mixture = TaskMixture(s.mixture)
        self.drops = DropCounter()  # training drops, counted as batches are served
        self.text_tokenizer = None  # set by setup()
        self.manifest: dict | None = None
        self.golden_attributes: dict[str, dict] = {}
        self._rate: int | None = None

    # -- what it is built from ------------------------------------------------------------------------
    def _clips(self):
        return source_clips(self)

    def _sounds(self) -> ToySoundDataModule:
        snd = self.settings.sound
        rate = self._audio_rate()
        return ToySoundDataModule(
            sound={"sample_rate": rate, "duration_s": snd.duration_s, "seed": snd.seed},
            n_clips=snd.n_clips,
            splits=self.splits,
            data_dir=str(self.data_dir),
            batch_size=1,
            samples_per_shard=snd.samples_per_shard,
        )

    def _audio_rate(self) -> int:
        """The audio tokenizer's sample rate (from its checkpoint, trained first if missing)."""
        if self._rate is None:
            ensure_tokenizer(self.audio_tokenizer_cfg, "audio_tokenizer", self.log_dir, str(self.data_dir))
            ckpt = torch.load(self.audio_tokenizer_cfg["ckpt"], map_location="cpu", weights_only=True)
            self._rate = int(ckpt["hyper_parameters"]["codec"]["sample_rate"])
        return self._rate

    @property
    def text_root(self) -> Path:
        """Where the text BPE of both caption sources lives (named by the two raw data sets)."""
        names = {"clips": self._clips().dataset_name, "sounds": self._sounds().dataset_name}
        return self.data_dir / f"mmpt-text-{settings_hash(names)}"

    @property
    def dataset_name(self) -> str:
        s = self.settings
        settings = {
            "clips": self._clips().dataset_name,
            "sounds": self._sounds().dataset_name,
            "frames": self.frame_index,
            "image_tokenizer": checkpoint_sha256(Path(self.image_tokenizer_cfg["ckpt"])),
            "audio_tokenizer": checkpoint_sha256(Path(self.audio_tokenizer_cfg["ckpt"])),
            "text_tokenizer": self.text_cfg,
            "format": dataclasses.asdict(self.fmt),
            "golden": dataclasses.asdict(s.golden),
            "real": dataclasses.asdict(s.real),
            "token_space": None if self.token_space is None else self.token_space.sha256,
            "samples_per_shard": self.samples_per_shard,
            "writer": WRITER_VERSION,
            "version": MMPT_VERSION,
        }
        return f"mmpt-{settings_hash(settings)}"

    def prepare_data(self) -> None:
        """Train what is missing (tokenizer runs, the text BPE), then build the task shards. The run's random
        streams are left as they were (building tokenizers draws from torch's), so a run that builds the data and
        one that finds it built train alike."""
        import random

        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            self._prepare_data()
        np.random.set_state(np_state)
        random.setstate(py_state)

    def _prepare_data(self) -> None:
        from mmsuite.tokenizers.text import train_text_tokenizer

        for kind, cfg in (("image", self.image_tokenizer_cfg), ("audio", self.audio_tokenizer_cfg)):
            ensure_tokenizer(cfg, f"{kind}_tokenizer", self.log_dir, str(self.data_dir), f"data.{kind}_tokenizer")
        clips, sounds = self._clips(), self._sounds()
        clips.prepare_data()
        sounds.prepare_data()
        root = self.text_root
        root.mkdir(parents=True, exist_ok=True)

        def captions():
            yield from read_texts(clips.root, "train", "caption.txt")
            yield from read_texts(sounds.root, "train", "caption.txt")

        train_text_tokenizer(self.text_cfg, root, captions())
        super().prepare_data()

    def load_text(self):
        from mmsuite.tokenizers.text import text_tokenizer_from_config

        return text_tokenizer_from_config(self.text_cfg, self.token_space, self.text_root)

    # -- building -------------------------------------------------------------------------------------
    def build(self, out_dir: Path) -> None:
        from mmsuite.tokenizers.audio import audio_tokenizer_from_checkpoint
        from mmsuite.tokenizers.image import ImageTokenizer

        if self.layout is None:
            raise ValueError("MMPT shards hold global token ids: the DataModule needs the run's token space")
        size = int(self.world.get("image_size", 64))
        image_ckpt, audio_ckpt = Path(self.image_tokenizer_cfg["ckpt"]), Path(self.audio_tokenizer_cfg["ckpt"])
        image = ImageTokenizer.from_checkpoint(image_ckpt, token_space=self.token_space, image_size=size)
        if image.tokens_per_image != self.fmt.image_tokens:
            raise ValueError(
                f"the image tokenizer {image_ckpt} gives {image.tokens_per_image} tokens per {size}px frame but "
                f"data.format.image_tokens is {self.fmt.image_tokens} (mmpt_format.image_tokens)"
            )
        audio = audio_tokenizer_from_checkpoint(audio_ckpt, token_space=self.token_space)
        text = self.load_text()
        records: dict[str, list[tuple[str, dict]]] = {}
        for split, clip in iter_clip_shards(self._clips(), "mmpt images"):
            ids = image.encode(clip["frames"][self.frame_index]).reshape(len(self.frame_index), -1).numpy()
            a = clip["attributes"]
            attrs = {"modality": "image", "source": "toyworld", "item": clip["key"]}
            attrs |= {"color": a["color"], "action": a["action"], "background": a["background"]}
            for t, frame_ids in zip(self.frame_index, ids):
                members = record_members(text, clip["caption"], frame_ids, attrs)
                records.setdefault(split, []).append((f"{clip['key']}-f{t:02d}", members))
        sounds = self._sounds()
        manifest = read_manifest(sounds.root)
        for split in manifest["splits"]:
            for shard in split_shards(sounds.root, split, manifest):
                for raw in iter_raw_samples(shard.path):
                    snd = decode_sample(raw)
                    wav, rate = decode_wav(snd["audio"], f"{shard.path} {snd['__key__']}")
                    ids = audio.encode(torch.from_numpy(wav)[None], sample_rate=rate)[0].numpy()
                    attrs = {"modality": "audio", "source": "toysound", "item": snd["__key__"]}
                    attrs |= {a: snd["attributes"][a] for a in toysound.SOUND_ATTRIBUTES}
                    records.setdefault(split, []).append(
                        (snd["__key__"], record_members(text, snd["caption"], ids, attrs))
                    )
        seconds = self.settings.sound.duration_s
        for split, key, members in real_records(
            self.settings.real, self.splits, self.seed, image, audio, text, seconds
        ):
            records.setdefault(split, []).append((key, members))
        info = {
            "source": {"clips": self._clips().dataset_name, "sounds": sounds.dataset_name, "frames": self.frame_index},
            "image_tokenizer": {"ckpt": str(image_ckpt), "sha256": checkpoint_sha256(image_ckpt)},
            "audio_tokenizer": {"ckpt": str(audio_ckpt), "sha256": checkpoint_sha256(audio_ckpt), **audio.describe()},
            "text_tokenizer": {"path": str(text.source)},
            "format": dataclasses.asdict(self.fmt),
            "golden": self._select_golden(records.get("val", [])),
        }
        with DatasetWriter(out_dir, self.samples_per_shard, info=info, token_space=self.token_space) as writer:
            for split, recs in records.items():
                # images and sounds interleaved, so that every shard (and batch) holds both
                images = [r for r in recs if r[1]["attributes.json"]["modality"] == "image"]
                sounds_ = [r for r in recs if r[1]["attributes.json"]["modality"] == "audio"]
                for key, members in _interleave(images, sounds_):
                    writer.write(split, key, members)

    def _select_golden(self, val: list[tuple[str, dict]]) -> dict[str, list[str]]:
        """Keys of each task's golden set among the val records (stratified by caption length and source)."""
        out: dict[str, list[str]] = {}
        for modality, tasks in TASKS_OF.items():
            recs = [(k, m) for k, m in val if m["attributes.json"]["modality"] == modality]
            keys = [k for k, _ in recs]
            lengths = [len(m["text.npy"]) for _, m in recs]
            sources = [m["attributes.json"]["source"] for _, m in recs]
            for task in tasks:
                try:
                    chosen = select_golden(keys, lengths, sources, self.settings.golden)
                except ValueError as e:
                    raise ValueError(f"golden set of {task} (data.golden): {e} (val records)") from None
                out[task] = [keys[i] for i in chosen]
        return out

    # -- reading --------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.manifest = read_manifest(self.root)
        self.text_tokenizer = self.load_text()

    def expand(self, sample: dict) -> list:
        attrs = sample["attributes"]
        modality = attrs["modality"]
        media = sample["media"]
        item = TaskItem(
            key=sample["__key__"],
            text=sample["text"],
            image=media if modality == "image" else None,
            audio=media if modality == "audio" else None,
            source=attrs["source"],
        )
        return [item]

    def collate(self, items: list) -> dict:
        """Both task sequences of every record: the batch plus ``record [N]`` (which record a row is),
        ``allowed [B, T]`` (the tasks each record made) and ``drops [T, R]`` (this batch's drops)."""
        counter = DropCounter()
        self.builder.drops = counter
        seqs, record = [], []
        allowed = np.zeros((len(items), len(TASK_NAMES)), dtype=bool)
        for i, it in enumerate(items):
            for task in TASKS_OF["image" if it.image is not None else "audio"]:
                seq = self.builder.build(task, it)
                if seq is not None:
                    seqs.append(seq)
                    record.append(i)
                    allowed[i, TASK_NAMES.index(task)] = True
        if not seqs:
            raise ValueError(f"{self.root}: every sequence of a batch was dropped: {counter.as_dict()}")
        batch = collate(seqs, self.layout.pad_id)
        batch["record"] = torch.tensor(record, dtype=torch.long)
        batch["allowed"] = torch.from_numpy(allowed)
        drops = torch.zeros(len(TASK_NAMES), len(DROP_REASONS), dtype=torch.long)
        for task, reasons in counter.as_dict().items():
            for reason, n in reasons.items():
                drops[TASK_NAMES.index(task), DROP_REASONS.index(reason)] += n
        batch["drops"] = drops
        return batch

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        drops = batch.pop("drops")
        allowed = batch.pop("allowed")
        record = batch.pop("record")
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return batch
        for t, task in enumerate(TASK_NAMES):
            for r, reason in enumerate(DROP_REASONS):
                for _ in range(int(drops[t, r])):
                    self.drops.add(task, reason, "counted in collate")
        return select_rows(batch, self.mixture, allowed, record, trainer.global_step, self._stream(trainer))

    def _stream(self, trainer) -> int:
        acc = int(self.settings.accumulate_grad_batches)
        return trainer.global_rank * acc + (self._position[1] - 1) % acc

    # -- golden sets and checks -----------------------------------------------------------------------
    def golden_items(self) -> dict[str, list[TaskItem]]:
        """Each task's golden items (val records chosen at build time), in the stored order."""
        manifest = self.manifest or read_manifest(self.root)
        wanted = {k for keys in manifest["golden"].values() for k in keys}
        found: dict[str, TaskItem] = {}
        attributes: dict[str, dict] = {}
        for shard in split_shards(self.root, "val", manifest):
            for raw in iter_raw_samples(shard.path, self.on_corrupt):
                if raw["__key__"] in wanted:
                    sample = decode_sample(raw)
                    found[sample["__key__"]] = self.expand(sample)[0]
                    attributes[sample["__key__"]] = {**sample["attributes"], "caption": sample["caption"]}
        missing = sorted(wanted - set(found))
        if missing:
            raise ValueError(f"{self.root}: golden records {missing[:3]} are not in the val split")
        self.golden_attributes = attributes
        return {task: [found[k] for k in keys] for task, keys in manifest["golden"].items()}

    def check_records(self, split: str = "val") -> dict:
        """Gates A3 and A4 on the first ``check_records`` records of ``split``: every built sequence passes
        :func:`~mmsuite.tokenizers.mmpt_sequences.verify_sequence` (tag order, labels on exactly the target,
        strict decode of the target), and no record is dropped. Raises ValueError naming the first problem."""
        n, built = 0, 0
        builder = SequenceBuilder(self.layout, self.fmt, self.settings.sequence)
        for item in self.stored_items(split):
            for task in TASKS_OF["image" if item.image is not None else "audio"]:
                seq = builder.build(task, item)
                if seq is None:
                    (t, reason), msg = next(iter(builder.drops.examples.items()))
                    raise ValueError(f"gate A3: {t} record dropped ({reason}): {msg}")
                verify_sequence(self.layout, seq, self.fmt)
                built += 1
            n += 1
            if n >= self.settings.check_records:
                return {"records": n, "sequences": built}
        return {"records": n, "sequences": built}

    def stored_items(self, split: str):
        """The records of ``split`` as :class:`TaskItem` s, in stored order."""
        for shard in split_shards(self.root, split, self.manifest or read_manifest(self.root)):
            for raw in iter_raw_samples(shard.path, self.on_corrupt):
                yield self.expand(decode_sample(raw))[0]

    def stage3_rows(self, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """What a Stage 3 base is pretrained on (train) and scored on (val), as ``(input_ids, labels)`` pairs: each
        record's reading sequence (A2T or I2T, labels on the caption) and its caption alone (text-only, labelled)."""
        builder = SequenceBuilder(self.layout, self.fmt, self.settings.sequence)
        rows = []
        for item in self.stored_items(split):
            seq = builder.build("i2t" if item.image is not None else "a2t", item)
            if seq is not None:
                rows.append((seq.input_ids, seq.labels))
            rows.append(assemble_text(self.layout, item.text))
        return rows

    # -- checkpointed state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "mixture": self.mixture.state_dict(), "drops": self.drops.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "mixture" in state:
            self.mixture.load_state_dict(state["mixture"])
            self.drops.load_state_dict(state["drops"])


def record_members(text, caption: str, media_ids, attrs: dict) -> dict:
    """The shard members of one record."""
    return {
        "text.npy": np.asarray(text.encode(caption), dtype=np.int64),
        "media.npy": np.asarray(media_ids, dtype=np.int64).reshape(-1),
        "caption.txt": caption,
        "attributes.json": attrs,
    }


def real_records(real: CaptionFolderSettings, splits: dict, seed: int, image, audio, text, max_seconds: float):
    """``(split, key, members)`` of the real caption folders ``real`` names: images through ``image`` (an
    ImageTokenizer at its own size), audio through ``audio`` cut to ``max_seconds``; split by source item."""
    from mmsuite.sources import captioned
    from mmsuite.sources.splits import split_by_item

    sources = []
    if real.images_json is not None:
        sources.append(("llava", "image", list(captioned.read_llava_pretrain(real.images_json, real.images_dir))))
    if real.audio_csv is not None:
        recs = captioned.read_audio_captions(real.audio_csv, real.audio_dir, real.audio_file_column)
        sources.append(("audiocaps", "audio", list(recs)))
    for name, modality, recs in sources:
        split_of = split_by_item([r.item for r in recs], splits, seed)
        for r in recs:
            if modality == "image":
                pixels = captioned.load_image(r.path, image.image_size[0])
                ids = image.encode(pixels[None]).reshape(-1).numpy()
            else:
                wav = captioned.load_audio(r.path, audio.sample_rate, max_seconds)
                ids = audio.encode(torch.from_numpy(wav)[None, None], sample_rate=audio.sample_rate)[0].numpy()
            attrs = {"modality": modality, "source": name, "item": r.item}
            yield split_of[r.item], f"{name}-{r.key}", record_members(text, r.caption, ids, attrs)


def select_rows(batch: dict, mixture: TaskMixture, allowed, record, step: int, stream: int) -> dict:
    """The rows of ``batch`` whose task the mixture draws for their record at ``step`` (one row per record),
    trimmed to the longest kept row."""
    tasks = mixture.draw_among(step, allowed.numpy(), stream)
    keep = batch["task"] == torch.from_numpy(tasks)[record]
    out = {k: v[keep] for k, v in batch.items()}
    length = int(out["attention_mask"].sum(1).max())
    for k in ("input_ids", "attention_mask", "labels"):
        out[k] = out[k][:, :length]
    return out


def _interleave(a: list, b: list) -> list:
    """``a`` and ``b`` merged in proportion (a's i-th item where it falls in the combined order)."""
    if not a or not b:
        return a + b
    pos = [(i / len(a), 0, i) for i in range(len(a))] + [(j / len(b), 1, j) for j in range(len(b))]
    return [(a if w == 0 else b)[i] for _, w, i in sorted(pos)]
