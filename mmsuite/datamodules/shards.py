"""WebDataset shards: writing, checking and reading, DDP-safe and resumable.

A dataset folder holds ``{split}-NNNNNN.tar`` shards and ``manifest.json``. Each sample is a group of tar
members ``<key>.<ext>`` with ``ext`` in :data:`ALLOWED_EXT`; arrays are ``.npy`` saved without pickle and
loaded with ``allow_pickle=False``. Nothing that can run code is ever written or read.

Reading (:class:`ShardStream`) is a deterministic function of ``(seed, epoch, rank, role)``:

* every epoch the split's shards are permuted with a seed shared by all ranks, then dealt out so that
  each rank gets disjoint shards and, inside a rank, each dataloader worker ("role") gets disjoint shards;
* each role shuffles samples in a seeded buffer, expands them to items (e.g. clip -> frames), shuffles
  items, and emits exactly the same number of batches as every other role and rank (no DDP hang);
* batch ``i`` of the epoch is emitted by role ``i % num_workers``, which matches the order in which a
  ``DataLoader`` collects batches from its workers, so the stream seen by the trainer is one fixed
  sequence, and it can be restarted at any batch (``skip_batches``) for exact resume.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

WRITER_VERSION = 1
MANIFEST = "manifest.json"
ALLOWED_EXT = (".npy", ".json", ".txt", ".png", ".wav", ".flac")
SPLITS = ("train", "val", "test")


class ShardError(RuntimeError):
    """A shard or dataset folder is missing, truncated, corrupt or not what its manifest says."""


# ---------------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------------
def split_by_item(n_items: int, fractions: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """Assign whole source items (clips, videos) to splits: a seeded permutation cut by ``fractions``.

    Splitting by item, never by frame, keeps near-identical frames of one clip out of two splits.
    """
    total = sum(fractions.values())
    if n_items < len(fractions) or abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions {dict(fractions)} must sum to 1 over >= {len(fractions)} items")
    perm = np.random.default_rng([seed, 0x5B1F]).permutation(n_items)
    out, start, acc = {}, 0, 0.0
    names = list(fractions)
    for i, name in enumerate(names):
        acc += fractions[name]
        stop = n_items if i == len(names) - 1 else int(round(acc * n_items))
        stop = max(stop, start + 1)  # every split gets at least one item
        out[name] = np.sort(perm[start:stop])
        start = stop
    return out


# ---------------------------------------------------------------------------------------------------
# encoding of members
# ---------------------------------------------------------------------------------------------------
def encode_member(ext: str, value) -> bytes:
    """Bytes of one member; refuses anything that could carry pickle."""
    if ext not in ALLOWED_EXT:
        raise ValueError(f"member extension {ext!r} not allowed in shards (allowed: {ALLOWED_EXT})")
    if ext == ".npy":
        arr = np.asarray(value)
        if arr.dtype == object:
            raise ValueError("object arrays cannot be stored in shards (they would need pickle)")
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        return buf.getvalue()
    if ext == ".json":
        return json.dumps(value, sort_keys=True).encode()
    if ext == ".txt":
        return str(value).encode()
    if not isinstance(value, bytes | bytearray):  # .png / .wav / .flac arrive already encoded
        raise TypeError(f"{ext} members must be pre-encoded bytes, got {type(value).__name__}")
    return bytes(value)


def decode_member(ext: str, data: bytes):
    if ext == ".npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == ".json":
        return json.loads(data)
    if ext == ".txt":
        return data.decode()
    if ext == ".png":
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return data  # audio stays encoded; the audio reader decodes it


def decode_sample(raw: Mapping[str, bytes]) -> dict:
    """``{"frames.npy": b"..."}`` -> ``{"frames": array}``; the key is kept as ``__key__``."""
    out = {"__key__": raw["__key__"]}
    for name, data in raw.items():
        if name == "__key__":
            continue
        stem, ext = name.split(".", 1)
        out[stem] = decode_member("." + ext, data)
    return out


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------
class DatasetWriter:
    """Write a dataset folder atomically: shards and manifest go to a temp folder renamed at the end.

    >>> with DatasetWriter(out_dir, samples_per_shard=64, info={...}) as w:
    ...     w.write("train", "clip000001", {"frames.npy": frames, "caption.txt": "a red figure"})

    A crash leaves no half-written dataset behind: the final folder appears only after ``close``.
    """

    def __init__(
        self, out_dir: str | os.PathLike, samples_per_shard: int, info: Mapping | None = None, token_space=None
    ):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists():
            raise FileExistsError(f"dataset folder already exists: {self.out_dir}")
        self.tmp_dir = self.out_dir.with_name(f".{self.out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        self.samples_per_shard = samples_per_shard
        self.info = dict(info or {})
        self.token_space = token_space
        self._open: dict[str, tarfile.TarFile] = {}
        self._shards: dict[str, list[dict]] = {}

    def write(self, split: str, key: str, members: Mapping[str, object]) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
        shards = self._shards.setdefault(split, [])
        if not shards or shards[-1]["count"] >= self.samples_per_shard:
            self._roll(split)
        tar = self._open[split]
        for name in sorted(members):
            stem, dot, ext = name.partition(".")
            if not dot or not stem:
                raise ValueError(f"member name {name!r} must look like '<field>.<ext>'")
            data = encode_member("." + ext, members[name])
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
        shards[-1]["count"] += 1

    def _roll(self, split: str) -> None:
        if split in self._open:
            self._open[split].close()
        shards = self._shards[split]
        name = f"{split}-{len(shards):06d}.tar"
        self._open[split] = tarfile.open(self.tmp_dir / name, "w", format=tarfile.USTAR_FORMAT)
        shards.append({"name": name, "count": 0})

    def close(self) -> Path:
        for tar in self._open.values():
            tar.close()
        self._open.clear()
        manifest = {
            "writer_version": WRITER_VERSION,
            "splits": {s: {"shards": sh, "samples": sum(x["count"] for x in sh)} for s, sh in self._shards.items()},
            "token_space": None if self.token_space is None else self.token_space.to_dict(),
            "token_space_sha256": None if self.token_space is None else self.token_space.sha256,
            **self.info,
        }
        (self.tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(self.tmp_dir, self.out_dir)
        except OSError:
            # another process (a parallel sweep job) finished the same folder first: data set names hash
            # their inputs, so its copy is the same data; keep it and drop ours
            if not (self.out_dir / MANIFEST).is_file():
                raise
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        return self.out_dir

    def abort(self) -> None:
        for tar in self._open.values():
            tar.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------------
# manifest and integrity
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    path: str
    count: int


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"no {MANIFEST} in dataset folder {root}; build it with prepare.py") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("writer_version") != WRITER_VERSION:
        raise ShardError(f"{path}: writer_version {manifest.get('writer_version')} != {WRITER_VERSION}; rebuild")
    return manifest


def split_shards(root: str | os.PathLike, split: str, manifest: Mapping | None = None) -> list[Shard]:
    manifest = manifest or read_manifest(root)
    if split not in manifest["splits"]:
        raise ShardError(f"{Path(root) / MANIFEST}: no split {split!r} (has {sorted(manifest['splits'])})")
    return [Shard(str(Path(root) / s["name"]), int(s["count"])) for s in manifest["splits"][split]["shards"]]


def check_shard(shard: Shard) -> None:
    """Walk the tar headers: the file must be a complete tar holding exactly ``shard.count`` samples."""
    try:
        with tarfile.open(shard.path, "r:") as tar:
            keys = []
            for m in tar:
                key = m.name.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
                if m.offset_data + m.size > os.path.getsize(shard.path):
                    raise ShardError(f"truncated shard {shard.path}: member {m.name} runs past the end")
    except FileNotFoundError:
        raise ShardError(f"missing shard {shard.path}") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"corrupt or truncated shard {shard.path}: {e}") from None
    if len(keys) != shard.count:
        raise ShardError(f"corrupt or truncated shard {shard.path}: {len(keys)} samples, manifest says {shard.count}")


def healthy_shards(shards: list[Shard], on_corrupt: str) -> tuple[list[Shard], list[str]]:
    """Check every shard; ``raise`` stops at the first bad one, ``skip`` drops it and reports it."""
    if on_corrupt not in ("raise", "skip"):
        raise ValueError(f"data.on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
    good, bad = [], []
    for s in shards:
        try:
            check_shard(s)
            good.append(s)
        except ShardError as e:
            if on_corrupt == "raise":
                raise
            warnings.warn(f"skipping {e}", stacklevel=2)
            bad.append(s.path)
    return good, bad


def iter_raw_samples(path: str, on_corrupt: str = "raise") -> Iterator[dict]:
    """Yield ``{"__key__": key, "<field>.<ext>": bytes, ...}`` groups from one tar, in file order."""
    current: dict | None = None
    try:
        with tarfile.open(path, "r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, name = m.name.partition(".")
                if "." + name.rsplit(".", 1)[-1] not in ALLOWED_EXT:
                    raise ShardError(f"shard {path}: member {m.name} has a forbidden extension")
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                current[name] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        if on_corrupt == "raise":
            raise ShardError(f"corrupt or truncated shard {path}: {e}") from None
        warnings.warn(f"skipping the rest of corrupt shard {path}: {e}", stacklevel=2)
        return
    if current is not None:
        yield current


def read_texts(root: str | os.PathLike, split: str, member: str) -> Iterator[str]:
    """The text member ``member`` (e.g. ``caption.txt``) of every sample of ``split``, in manifest order.

    Only the shards that ``manifest.json`` lists for ``split`` are opened, so no other split's text is seen
    (a tokenizer trained on it cannot leak val/test). A sample without the member is an error naming it.
    """
    if not member.endswith(".txt"):
        raise ValueError(f"read_texts reads .txt members, got {member!r}")
    for shard in split_shards(root, split):
        for raw in iter_raw_samples(shard.path):
            if member not in raw:
                have = sorted(k for k in raw if k != "__key__")
                raise ShardError(f"shard {shard.path}: sample {raw['__key__']} has no {member} (it has {have})")
            yield decode_member(".txt", raw[member])


# ---------------------------------------------------------------------------------------------------
# the deterministic stream
# ---------------------------------------------------------------------------------------------------
def deal_shards(
    shards: list[Shard], seed: int, epoch: int, world_size: int, num_roles: int, shuffle: bool = True
) -> list[list[list[Shard]]]:
    """``plan[rank][role]`` -> disjoint shard lists; the permutation is shared by all ranks."""
    n_slots = world_size * num_roles
    if len(shards) < n_slots:
        raise ShardError(
            f"{len(shards)} shard(s) cannot feed {world_size} rank(s) x {num_roles} worker(s); "
            "write more, smaller shards (data.samples_per_shard) or use fewer workers"
        )
    order = np.random.default_rng([seed, epoch, 0xD1CE]).permutation(len(shards)) if shuffle else range(len(shards))
    ordered = [shards[i] for i in order]
    return [[ordered[rank * num_roles + role :: n_slots] for role in range(num_roles)] for rank in range(world_size)]


def guaranteed_items(shards: list[Shard], n_slots: int, items_per_sample: int) -> int:
    """Fewest items any slot can get under any dealing: the smallest ``len // n_slots`` shards."""
    counts = sorted(s.count for s in shards)
    return sum(counts[: len(shards) // n_slots]) * items_per_sample


class ShardStream(IterableDataset):
    """Batches from a split's shards for one rank; see the module docstring for the contract.

    ``expand`` maps one decoded sample to a list of items (e.g. the frames of a clip); ``collate`` stacks
    a list of items into a batch dict. Training streams shuffle and drop partial batches; evaluation
    streams (``train=False``) read in a fixed order, keep every item and pad the rank's share by wrapping
    around so every rank gets the same number of batches.
    """

    def __init__(
        self,
        shards: list[Shard],
        *,
        batch_size: int,
        expand: Callable[[dict], list],
        collate: Callable[[list], dict],
        items_per_sample: int,
        seed: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 256,
        on_corrupt: str = "raise",
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shards, self.batch_size, self.expand, self.collate = shards, batch_size, expand, collate
        self.items_per_sample, self.seed, self.train = items_per_sample, seed, train
        self.rank, self.world_size = rank, world_size
        self.num_roles = max(1, num_workers)
        self.shuffle_buffer, self.on_corrupt = shuffle_buffer, on_corrupt
        self.epoch = 0
        self.skip_batches = 0
        if train:
            per_role = guaranteed_items(shards, world_size * self.num_roles, items_per_sample) // batch_size
            if per_role < 1:
                raise ShardError(
                    f"training split too small: each of {world_size * self.num_roles} rank-worker slots is "
                    f"guaranteed fewer than batch_size={batch_size} items; make more data or smaller batches"
                )
            self.batches_per_role = per_role
        else:
            deal_shards(shards, seed, 0, world_size, 1, shuffle=False)  # validates shard count
            total = sum(s.count for s in shards) * items_per_sample
            self.items_per_rank = -(-total // world_size)
            self.batches_per_role = None

    def __len__(self) -> int:
        if self.train:
            return self.batches_per_role * self.num_roles
        return -(-self.items_per_rank // self.batch_size)

    def plan(self, epoch: int) -> list[list[str]]:
        """This rank's shard paths per role for ``epoch`` (written to the run dir for inspection)."""
        if not self.train:
            return [[s.path for s in deal_shards(self.shards, self.seed, 0, self.world_size, 1, False)[self.rank][0]]]
        dealt = deal_shards(self.shards, self.seed, epoch, self.world_size, self.num_roles)
        return [[s.path for s in role] for role in dealt[self.rank]]

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        slot, n_slots = (0, 1) if info is None else (info.id, info.num_workers)
        if n_slots != self.num_roles:
            raise RuntimeError(f"ShardStream built for {self.num_roles} workers but runs under {n_slots}")
        yield from (self._train_batches(slot) if self.train else self._eval_batches(slot))

    # -- training -------------------------------------------------------------------------------
    def _train_batches(self, slot: int) -> Iterator[dict]:
        W, k, B = self.num_roles, self.skip_batches, self.batch_size
        role = (slot + k) % W  # after skipping k batches, the loader's first worker serves batch k
        first = k // W + (1 if role < k % W else 0)  # this role's batches already consumed
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, role])
        shards = deal_shards(self.shards, self.seed, self.epoch, self.world_size, W)[self.rank][role]
        # Shuffle references (raw sample, item index): the permutation does not depend on the values,
        # so a resumed stream replays it exactly and decodes only what it will emit.
        samples = _shuffled(_chain_raw(shards, self.on_corrupt), self.shuffle_buffer, rng)
        refs = ((raw, j) for raw in samples for j in range(self.items_per_sample))
        refs = _shuffled(refs, self.shuffle_buffer * self.items_per_sample, rng)
        cache: dict[str, list] = {}  # key -> [items or None, references still to come]
        batch: list = []
        n_items = 0
        for raw, j in refs:
            key = raw["__key__"]
            entry = cache.setdefault(key, [None, self.items_per_sample])
            entry[1] -= 1
            if n_items >= first * B:
                if entry[0] is None:
                    entry[0] = self.expand(decode_sample(raw))
                    if len(entry[0]) != self.items_per_sample:
                        raise ShardError(
                            f"sample {key} expands to {len(entry[0])} items, expected {self.items_per_sample}"
                        )
                batch.append(entry[0][j])
            if entry[1] == 0:
                del cache[key]
            n_items += 1
            if n_items % B == 0:
                index = n_items // B - 1
                if batch:
                    out = self.collate(batch)
                    out["stream_pos"] = torch.tensor([self.epoch, index * W + role], dtype=torch.long)
                    yield out
                    batch = []
                if index + 1 >= self.batches_per_role:
                    return
        raise ShardError(
            f"rank {self.rank} worker {role} ran out of data after {n_items // B} batches "
            f"(expected {self.batches_per_role}); a shard is shorter than its manifest says"
        )

    # -- evaluation -----------------------------------------------------------------------------
    def _eval_batches(self, slot: int) -> Iterator[dict]:
        items = (it for raw in _chain_raw(self.shards, self.on_corrupt) for it in self.expand(decode_sample(raw)))
        mine = self._rank_share(items)
        batch, index = [], 0
        for item in mine:
            batch.append(item)
            if len(batch) == self.batch_size:
                if index % self.num_roles == slot:
                    yield self.collate(batch)
                index, batch = index + 1, []
        if batch and index % self.num_roles == slot:
            yield self.collate(batch)

    def _rank_share(self, items: Iterable) -> Iterator:
        """Items ``rank, rank + world, ...``; ranks short of ``items_per_rank`` wrap around to the start."""
        first_items, n = [], 0
        for i, item in enumerate(items):
            if i < self.world_size:
                first_items.append(item)
            if i % self.world_size == self.rank:
                n += 1
                yield item
        while n < self.items_per_rank:  # pad like DistributedSampler: reuse the first items
            yield first_items[n % len(first_items)]
            n += 1


def _chain_raw(shards: list[Shard], on_corrupt: str) -> Iterator[dict]:
    for s in shards:
        yield from iter_raw_samples(s.path, on_corrupt)


def _shuffled(it: Iterable, buffer: int, rng: np.random.Generator) -> Iterator:
    """Seeded reservoir shuffle: fill a buffer, emit a random element for each new one, drain at the end."""
    if buffer <= 1:
        yield from it
        return
    buf: list = []
    for x in it:
        if len(buf) < buffer:
            buf.append(x)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], x = x, buf[j]
        yield x
    rng.shuffle(buf)
    yield from buf
