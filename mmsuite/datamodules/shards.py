"""WebDataset shards: writing, checking and reading, DDP-safe and resumable.

A dataset folder holds ``{split}-NNNNNN.tar`` shards and ``manifest.json``. Shards are written with webdataset's
``TarWriter`` and read with its tar expander and key grouping, so a stock ``webdataset.WebDataset`` reads ours and
tars that webdataset writes read here. A sample is the group of members ``<key>.<field>.<ext>`` with ``ext`` in
:data:`ALLOWED_EXT`; members are encoded here (arrays as ``.npy`` without pickle, loaded with
``allow_pickle=False``) and handed to the writer as bytes, never through its pickle-capable encoders. Nothing that
can run code is ever written or read.

The manifest lists each split's fields (the member names every sample holds) and each shard's sample count and
sha256. Before a shard trains anything, :func:`healthy_shards` checks it against that: a complete tar, only allowed
members, every sample holding exactly the split's fields, the count, and the checksum.

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
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from mmsuite.tokenizers.token_space import file_sha256

WRITER_VERSION = 2
MANIFEST = "manifest.json"
CHECKSUM_CACHE = "checksum_cache.json"
ALLOWED_EXT = (".npy", ".json", ".txt", ".png", ".wav", ".flac")
SPLITS = ("train", "val", "test")
_SETTLED_NS = 2_000_000_000  # a file unchanged this long has a final mtime: a later write would change it


class ShardError(RuntimeError):
    """A shard or dataset folder is missing, truncated, corrupt or not what its manifest says."""


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


def encode_sample(key: str, members: Mapping[str, object]) -> dict:
    """``{"__key__": key, "<field>.<ext>": bytes}``: what :class:`webdataset.TarWriter` writes verbatim.

    Member names are lower case (webdataset's reader lower-cases them) and never start with ``_`` (the writer
    would drop them as metadata); ``field`` holds no ``.`` so the key/field split is unambiguous.
    """
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
    out = {"__key__": key}
    for name, value in members.items():
        stem, dot, ext = name.partition(".")
        if not dot or not stem or "/" in name or stem.startswith("_") or name != name.lower():
            raise ValueError(f"member name {name!r} must look like '<field>.<ext>' (lower case, not starting with '_')")
        out[name] = encode_member("." + ext, value)
    return out


def decode_member(ext: str, data: bytes):
    if ext == ".npy":
        if not data.startswith(b"\x93NUMPY"):  # np.load would try pickle on it, and refuse with a misleading message
            raise ValueError(f"not a .npy array (it starts with {bytes(data[:8])!r})")
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == ".json":
        return json.loads(data)
    if ext == ".txt":
        return data.decode()
    if ext == ".png":
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if ext in (".wav", ".flac"):
        return data  # audio stays encoded; the audio reader decodes it
    raise ValueError(f"member extension {ext!r} is not one of {ALLOWED_EXT}")


def decode_sample(raw: Mapping[str, bytes]) -> dict:
    """``{"frames.npy": b"..."}`` -> ``{"frames": array}``; the key is kept as ``__key__``, other ``__meta__``
    entries (webdataset's ``__url__``: the shard) are dropped. A member that does not decode is a
    :class:`ShardError` naming the shard, the sample and the member."""
    key = raw["__key__"]
    out = {"__key__": key}
    for name, data in raw.items():
        if name.startswith("__"):
            continue
        stem, _, ext = name.partition(".")
        try:
            out[stem] = decode_member("." + ext, data)
        except Exception as e:
            where = f"shard {raw.get('__url__', '?')}: sample {key}, member {name}"
            raise ShardError(f"{where}: cannot decode ({e})") from e
    return out


def members_of(raw: Mapping) -> list[str]:
    """The member names of a raw sample (no ``__key__``/``__url__``), for error messages."""
    return sorted(k for k in raw if not k.startswith("__"))


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------
class DatasetWriter:
    """Write a dataset folder atomically: shards and manifest go to a temp folder renamed at the end.

    >>> with DatasetWriter(out_dir, samples_per_shard=64, info={...}) as w:
    ...     w.write("train", "clip000001", {"frames.npy": frames, "caption.txt": "a red figure"})

    Every sample of a split holds the same members (the split's ``fields`` in the manifest). Tar headers are
    fixed (mtime 0), so a shard's bytes and sha256 depend on its samples only. A crash leaves no half-written
    dataset behind: the final folder appears only after ``close``.
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
        self._open: dict[str, tuple[TarWriter, io.BufferedWriter]] = {}
        self._shards: dict[str, list[dict]] = {}
        self._fields: dict[str, list[str]] = {}

    def write(self, split: str, key: str, members: Mapping[str, object]) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        sample = encode_sample(key, members)  # everything is checked before a byte is written
        fields = self._fields.setdefault(split, sorted(members))
        if sorted(members) != fields:
            raise ValueError(
                f"sample {key} of split {split} has members {sorted(members)}, but the split's samples hold {fields}"
            )
        shards = self._shards.setdefault(split, [])
        if not shards or shards[-1]["count"] >= self.samples_per_shard:
            self._roll(split)
        self._open[split][0].write(sample)
        shards[-1]["count"] += 1

    def _roll(self, split: str) -> None:
        """Start the split's next shard. Rolled here rather than by ``ShardWriter``: the splits are written
        interleaved, and each finished shard is hashed into the manifest."""
        self._finish(split)
        shards = self._shards[split]
        name = f"{split}-{len(shards):06d}.tar"
        stream = open(self.tmp_dir / name, "wb")  # closed in _finish / abort
        self._open[split] = (TarWriter(stream, encoder=False, mtime=0), stream)
        shards.append({"name": name, "count": 0})

    def _finish(self, split: str) -> None:
        """Close the split's open shard and record its sha256."""
        if split not in self._open:
            return
        writer, stream = self._open.pop(split)
        writer.close()
        stream.close()
        shard = self._shards[split][-1]
        shard["sha256"] = file_sha256(self.tmp_dir / shard["name"])

    def close(self) -> Path:
        for split in list(self._open):
            self._finish(split)
        manifest = {
            "writer_version": WRITER_VERSION,
            "splits": {
                s: {"shards": sh, "samples": sum(x["count"] for x in sh), "fields": self._fields[s]}
                for s, sh in self._shards.items()
            },
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
        for writer, stream in self._open.values():
            writer.close()
            stream.close()
        self._open.clear()
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
    """One shard as its manifest describes it: path, sample count, sha256 and its split's fields."""

    path: str
    count: int
    sha256: str
    fields: tuple[str, ...]


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
    entry = manifest["splits"][split]
    try:
        fields = tuple(entry["fields"])
        return [Shard(str(Path(root) / s["name"]), int(s["count"]), s["sha256"], fields) for s in entry["shards"]]
    except KeyError as e:
        raise ShardError(f"{Path(root) / MANIFEST}: split {split!r} lacks {e}; rebuild the data set") from None


def check_shard(shard: Shard, checksums: dict | None = None) -> None:
    """Everything a shard must be before it trains anything; a :class:`ShardError` naming the shard otherwise.

    The tar headers (no data is read): a complete tar; only members with an allowed extension; each sample's
    members, grouped like webdataset's reader groups them, exactly the split's fields; ``shard.count`` samples.
    Then the file's sha256 against the manifest's. ``checksums`` (see :func:`healthy_shards`) maps shard names
    to a ``[size, mtime_ns, sha256]`` already verified, so unchanged files are not hashed again.
    """
    _check_members(shard)
    _check_sha256(shard, checksums)


def _check_members(shard: Shard) -> None:
    path, fields = shard.path, set(shard.fields)
    seen: set[str] = set()  # sample keys
    last, current = None, set()  # the sample being read and its members

    def complete(key: str, members: set[str]) -> None:
        if members != fields:
            lacks = ", ".join(f"{key}.{f}" for f in sorted(fields - members))
            extra = ", ".join(f"{key}.{f}" for f in sorted(members - fields))
            what = f"lacks member {lacks}" if lacks else f"has member {extra} that other samples lack"
            raise ShardError(f"incomplete sample in shard {path}: {what} (the split's fields: {sorted(fields)})")

    try:
        size = os.path.getsize(path)
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.offset_data + m.size > size:
                    raise ShardError(f"truncated shard {path}: member {m.name} runs past the end")
                if not m.isreg():
                    continue
                _check_ext(path, m.name)
                key, field = base_plus_ext(m.name)  # webdataset's own key/field split
                if key is None:
                    raise ShardError(f"shard {path}: member {m.name} is not named <key>.<field>.<ext>")
                if key != last:
                    if last is not None:
                        complete(last, current)
                    if key in seen:
                        raise ShardError(f"shard {path}: the members of sample {key} are not contiguous")
                    seen.add(key)
                    last, current = key, set()
                current.add(field.lower())
    except FileNotFoundError:
        raise ShardError(f"missing shard {path}") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"corrupt or truncated shard {path}: {e}") from None
    if last is not None:
        complete(last, current)
    if len(seen) != shard.count:
        raise ShardError(f"corrupt or truncated shard {path}: {len(seen)} samples, manifest says {shard.count}")


def _check_ext(path: str, name: str) -> None:
    if "." not in name or "." + name.rsplit(".", 1)[-1] not in ALLOWED_EXT:
        raise ShardError(f"shard {path}: member {name} has a forbidden extension (allowed: {ALLOWED_EXT})")


def _check_sha256(shard: Shard, checksums: dict | None) -> None:
    stat = os.stat(shard.path)
    name, known = Path(shard.path).name, [stat.st_size, stat.st_mtime_ns, shard.sha256]
    if checksums is not None and checksums.get(name) == known:
        return
    digest = file_sha256(shard.path)
    if digest != shard.sha256:
        raise ShardError(
            f"shard {shard.path}: sha256 {digest} differs from the manifest's {shard.sha256}; the file changed "
            "after it was written (rebuild the data set)"
        )
    if checksums is not None and time.time_ns() - stat.st_mtime_ns > _SETTLED_NS:
        checksums[name] = known


def _load_checksums(folder: Path) -> dict:
    try:
        found = json.loads((folder / CHECKSUM_CACHE).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _save_checksums(folder: Path, checksums: dict) -> None:
    """Atomic (temp file + rename), so concurrent ranks never read half a file; a read-only folder keeps none."""
    tmp = folder / f".{CHECKSUM_CACHE}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(checksums, sort_keys=True) + "\n")
        os.replace(tmp, folder / CHECKSUM_CACHE)
    except OSError:
        tmp.unlink(missing_ok=True)


def healthy_shards(shards: list[Shard], on_corrupt: str) -> tuple[list[Shard], list[str]]:
    """Check every shard (:func:`check_shard`); ``raise`` stops at the first bad one, ``skip`` drops it and
    reports it.

    Verified checksums are remembered in ``checksum_cache.json`` beside the manifest, keyed by the file's size
    and mtime: it lives with the data, so every later process (a resume, eval, each DDP rank) skips rehashing
    unchanged shards, where a per-process cache would rehash the whole data set at every start.
    """
    if on_corrupt not in ("raise", "skip"):
        raise ValueError(f"data.on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
    good, bad = [], []
    caches: dict[Path, tuple[dict, dict]] = {}  # dataset folder -> (checksums as read, as updated)
    for s in shards:
        folder = Path(s.path).parent
        if folder not in caches:
            found = _load_checksums(folder)
            caches[folder] = (found, dict(found))
        try:
            check_shard(s, caches[folder][1])
            good.append(s)
        except ShardError as e:
            if on_corrupt == "raise":
                raise
            warnings.warn(f"skipping {e}", stacklevel=2)
            bad.append(s.path)
    for folder, (found, checksums) in caches.items():
        if checksums != found:
            _save_checksums(folder, checksums)
    return good, bad


def iter_raw_samples(path: str, on_corrupt: str = "raise") -> Iterator[dict]:
    """``{"__key__": key, "__url__": path, "<field>.<ext>": bytes, ...}`` per sample of one tar, in file order.

    The tar goes through webdataset's tar expander and key grouping; a sample holding a member whose extension is
    not allowed is refused before anything decodes it. A read error names the shard and the last sample read.
    """
    key = None
    try:
        with open(path, "rb", buffering=0) as stream:  # tarfile reads whole records: a second buffer only copies
            for sample in group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])):
                key = sample["__key__"]
                for name in sample:
                    if not name.startswith("__"):
                        _check_ext(path, f"{key}.{name}")
                yield sample
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        reason = str(e.args[0]).split(" @ ")[0] if e.args else type(e).__name__  # webdataset appends its stream
        after = f" after sample {key}" if key else ""
        if on_corrupt == "raise":
            raise ShardError(f"corrupt or truncated shard {path}{after}: {reason}") from None
        warnings.warn(f"skipping the rest of corrupt shard {path}{after}: {reason}", stacklevel=2)


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
                where = f"shard {shard.path}: sample {raw['__key__']}"
                raise ShardError(f"{where} has no {member} (it has {members_of(raw)})")
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

    def _items(self, raw: dict) -> list:
        """``expand`` of the decoded sample; any failure is a :class:`ShardError` naming the shard and the key."""
        sample = decode_sample(raw)
        try:
            return self.expand(sample)
        except Exception as e:
            raise ShardError(
                f"shard {raw['__url__']}: sample {raw['__key__']} (members {members_of(raw)}) does not expand: "
                f"{type(e).__name__}: {e}"
            ) from e

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
                    entry[0] = self._items(raw)
                    if len(entry[0]) != self.items_per_sample:
                        raise ShardError(
                            f"shard {raw['__url__']}: sample {key} expands to {len(entry[0])} items, "
                            f"expected {self.items_per_sample}"
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
        items = (it for raw in _chain_raw(self.shards, self.on_corrupt) for it in self._items(raw))
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
