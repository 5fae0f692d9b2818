"""ShardDataModule: the Lightning side of :mod:`mmsuite.datamodules.shards`.

A family's DataModule subclasses it and says how to build its dataset folder (``build``), how one decoded
sample becomes training items (``expand``) and how items become a batch (``collate``). This base class
builds what is missing (``prepare_data``), checks the manifest's token space and every shard (``setup``),
and serves seeded, rank-disjoint, equal-length streams whose position is saved in checkpoints, so a
resumed run continues with exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmsuite.datamodules.shards import ShardStream, healthy_shards, read_manifest, split_shards
from mmsuite.settings import fail, parse, setting
from mmsuite.tokenizers.token_space import TokenSpace, check_same

REPO = Path(__file__).resolve().parents[2]


@dataclass
class TokenizerRunSettings:
    """A tokenizer checkpoint a data set is built with, trained first by ``train.py experiment=<its experiment>
    run=<run>`` when missing (:func:`ensure_tokenizer`)."""

    run: str | None = None  # the tokenizer run's name under logs/<experiment>/ (trains it when missing)
    ckpt: str | None = None  # its checkpoint (the data configs point it at ${paths.log_dir}/<experiment>/<run>/...)
    train_if_missing: bool = True
    train_overrides: list[str] = setting([])  # extra overrides for that training run (e.g. [debug=smoke])

    def check(self, key: str) -> None:
        if self.ckpt is None:
            fail(f"{key}.ckpt", "is required: the tokenizer's checkpoint")
        if self.train_if_missing and self.run is None:
            fail(
                f"{key}.run", "is required to train the tokenizer when its checkpoint is missing (or train_if_missing)"
            )


def ensure_tokenizer(cfg: dict, experiment: str, log_dir: str, data_dir: str, key: str = "") -> Path:
    """The checkpoint ``cfg['ckpt']`` of a tokenizer run (:class:`TokenizerRunSettings` as a dict); trained first
    by ``train.py experiment=<experiment> run=<cfg['run']>`` (subprocess, the same ``paths``, plus
    ``cfg['train_overrides']``) when missing and ``cfg['train_if_missing']``. The run manager's resume and finished
    marker apply, so a finished run is never retrained. ``key`` names the config block in errors (e.g.
    ``data.image_tokenizer``)."""
    ckpt = Path(cfg["ckpt"])
    if ckpt.exists():
        return ckpt
    what = experiment.replace("_", " ")
    where = f" ({key}.ckpt)" if key else ""
    if not cfg["train_if_missing"]:
        raise FileNotFoundError(
            f"{what} checkpoint not found: {ckpt}{where}; train it with `python train.py experiment={experiment}` "
            f"or set {key + '.' if key else ''}train_if_missing=true"
        )
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        f"experiment={experiment}",
        f"run={cfg['run']}",
        f"paths.log_dir={log_dir}",
        f"paths.data_dir={data_dir}",
        "print_config=false",
        *[str(o) for o in cfg["train_overrides"]],
    ]
    print(f"[mmsuite] {what} missing ({ckpt}); training it first:\n  {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    if not ckpt.exists():
        raise FileNotFoundError(f"the {experiment} run finished but {ckpt}{where} does not exist")
    return ckpt


def prepare_text_tokenizer(cfg: Mapping, data_root: str | Path) -> Path:
    """Train the byte-level BPE of a ``text_bpe`` config on the captions of ``data_root``'s TRAIN split, once per
    settings (:func:`mmsuite.tokenizers.text.train_text_tokenizer`). The captions come from the train shards the
    manifest lists (``read_texts``), never from val/test, and are read only when there is something to train.
    Returns the tokenizer.json path."""
    from tqdm.auto import tqdm

    from mmsuite.datamodules import shards
    from mmsuite.tokenizers.text import TRAIN_SPLIT, bpe_settings, train_text_tokenizer

    field = bpe_settings(cfg, data_root)["text_field"]

    def texts():
        total = shards.read_manifest(data_root)["splits"].get(TRAIN_SPLIT, {}).get("samples")
        yield from tqdm(shards.read_texts(data_root, TRAIN_SPLIT, field), total=total, unit="caption")

    return train_text_tokenizer(cfg, data_root, texts())


class _EpochLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream` that tells the stream its epoch and resume offset."""

    def __init__(self, stream: ShardStream, datamodule: ShardDataModule, num_workers: int):
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(0),  # never draw from the global RNG
            multiprocessing_context="fork" if num_workers > 0 else None,
        )
        self._datamodule = datamodule

    def __iter__(self):
        if self.dataset.train:
            trainer = self._datamodule.trainer
            epoch = trainer.current_epoch if trainer is not None else 0
            self.dataset.epoch = epoch
            self.dataset.skip_batches = self._datamodule._take_resume_offset(epoch)
        return super().__iter__()


@dataclass
class ShardSettings:
    """The settings every DataModule has (``data`` of every data config); each family's settings class extends it
    and states its own defaults."""

    data_dir: str = setting()  # = ${paths.data_dir}: data sets live in <data_dir>/<dataset name>/
    batch_size: int = setting(ge=1)  # per process
    val_batch_size: int | None = setting(None, ge=1)  # null: batch_size
    num_workers: int = setting(0, ge=0)  # DataLoader workers per process (= ${hardware.num_workers})
    shuffle_buffer: int = setting(256, ge=0)  # training samples in the shuffle buffer
    samples_per_shard: int = setting(64, ge=1)  # when building the data set
    seed: int = setting(0, ge=0)  # = ${seed}: the training streams are a function of (seed, epoch, rank, worker)
    on_corrupt: str = setting("raise", choices=["raise", "skip"])  # a bad shard stops the run | is skipped and listed
    plan_dir: str | None = None  # where data_plan_rank<r>.json goes (= the run dir; null: not written)


class ShardDataModule(L.LightningDataModule):
    """Base for every family's DataModule; see the module docstring. ``settings``: the fields of the class's
    ``Settings`` (checked by :func:`mmsuite.settings.parse`, errors name ``data.<key>``)."""

    Settings = ShardSettings
    items_per_sample: int = 1

    def __init__(self, token_space: TokenSpace | None = None, **settings):
        super().__init__()
        s = self.settings = parse(type(self).Settings, settings, "data")
        self.data_dir = Path(s.data_dir)
        self.batch_size = s.batch_size
        self.val_batch_size = s.val_batch_size or s.batch_size
        self.num_workers = s.num_workers
        self.shuffle_buffer = s.shuffle_buffer
        self.samples_per_shard = s.samples_per_shard
        self.seed = s.seed
        self.on_corrupt = s.on_corrupt
        self.token_space = token_space
        self.plan_dir = s.plan_dir
        self.corrupt_shards: list[str] = []
        self._streams: dict[str, ShardStream] = {}
        self._position = (0, 0)  # (epoch, next batch index) of the training stream
        self._resume: dict | None = None

    # -- what a family provides ------------------------------------------------------------------
    @property
    def dataset_name(self) -> str:
        """Folder name under ``data_dir``; include a hash of every setting that changes the data."""
        raise NotImplementedError

    def build(self, out_dir: Path) -> None:
        """Write the dataset folder (shards + manifest) to ``out_dir`` with a DatasetWriter."""
        raise NotImplementedError

    def expand(self, sample: dict) -> list:
        return [sample]

    def collate(self, items: list) -> dict:
        raise NotImplementedError

    # -- Lightning hooks --------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.data_dir / self.dataset_name

    def prepare_data(self) -> None:
        if not (self.root / "manifest.json").exists():
            self.root.parent.mkdir(parents=True, exist_ok=True)
            self.build(self.root)

    def setup(self, stage: str | None = None) -> None:
        manifest = read_manifest(self.root)
        self._check_token_space(manifest)
        rank, world = (0, 1) if self.trainer is None else (self.trainer.global_rank, self.trainer.world_size)
        common = dict(
            expand=self.expand,
            collate=self.collate,
            items_per_sample=self.items_per_sample,
            seed=self.seed,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
            on_corrupt=self.on_corrupt,
        )
        for split in ("train", "val", "test"):
            if split not in manifest["splits"]:
                continue
            shards, bad = healthy_shards(split_shards(self.root, split, manifest), self.on_corrupt)
            self.corrupt_shards += bad
            train = split == "train"
            bs = self.batch_size if train else self.val_batch_size
            self._streams[split] = ShardStream(
                shards, batch_size=bs, train=train, shuffle_buffer=self.shuffle_buffer if train else 0, **common
            )
        if self.plan_dir is not None and "train" in self._streams:
            self._write_plan(rank)

    def _check_token_space(self, manifest: dict) -> None:
        if manifest.get("token_space_sha256") is None or self.token_space is None:
            return  # the shards hold no token ids (e.g. raw frames)
        check_same(
            self.token_space.sha256,
            "the run's token space (config token_space.ranges)",
            manifest["token_space_sha256"],
            f"the data's token space ({self.root / 'manifest.json'})",
        )

    def _write_plan(self, rank: int) -> None:
        stream = self._streams["train"]
        plan = {
            "rank": rank,
            "world_size": stream.world_size,
            "batches_per_epoch": len(stream),
            "epoch0_shards_by_worker": stream.plan(0),
            "corrupt_shards_skipped": self.corrupt_shards,
        }
        path = Path(self.plan_dir) / f"data_plan_rank{rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan, indent=2) + "\n")

    def _loader(self, split: str) -> DataLoader:
        if split not in self._streams:
            raise RuntimeError(f"dataset {self.root} has no '{split}' split")
        return _EpochLoader(self._streams[split], self, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    # -- the stream position: carried by each batch, saved in checkpoints -------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        pos = batch.pop("stream_pos", None) if isinstance(batch, dict) else None
        if pos is not None:
            self._position = (int(pos[0]), int(pos[1]) + 1)
        return batch

    def state_dict(self) -> dict:
        epoch, next_batch = self._position
        return {"epoch": epoch, "next_batch": next_batch, "num_workers": self.num_workers}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)
        self._position = (state["epoch"], state["next_batch"])

    def _take_resume_offset(self, epoch: int) -> int:
        state, self._resume = self._resume, None
        if state is None or state["epoch"] != epoch:
            return 0
        if state["num_workers"] != self.num_workers:
            warnings.warn(
                f"resuming with data.num_workers={self.num_workers} but the checkpoint used "
                f"{state['num_workers']}: the rest of this epoch will see a different sample order",
                stacklevel=2,
            )
        return state["next_batch"]
