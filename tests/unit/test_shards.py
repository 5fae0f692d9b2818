"""Shard writer/reader: no pickle, manifests, corrupt shards, rank-disjoint equal streams, exact resume."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from mmsuite.datamodules import shards as shards_module
from mmsuite.datamodules.shards import (
    CHECKSUM_CACHE,
    WRITER_VERSION,
    DatasetWriter,
    Shard,
    ShardError,
    ShardStream,
    check_shard,
    deal_shards,
    decode_sample,
    healthy_shards,
    iter_raw_samples,
    read_manifest,
    split_shards,
)
from mmsuite.tokenizers.token_space import TokenSpace, file_sha256


def write_dataset(root, n=40, per_shard=4, items=1):
    with DatasetWriter(root, per_shard, info={"source": "test"}, token_space=TokenSpace([("x", 10)])) as w:
        for i in range(n):
            w.write("train", f"s{i:04d}", {"x.npy": np.full((items,), i, np.int64), "meta.json": {"i": i}})
        for i in range(n, n + 7):
            w.write("val", f"s{i:04d}", {"x.npy": np.full((items,), i, np.int64), "meta.json": {"i": i}})
    return root


def stream(root, split="train", items=1, **kw):
    args = dict(
        batch_size=3,
        expand=lambda s: [int(v) for v in s["x"]],
        collate=lambda xs: {"x": torch.tensor(xs)},
        items_per_sample=items,
        seed=7,
        train=split == "train",
    )
    args.update(kw)
    return ShardStream(split_shards(root, split), **args)


def ids(batches):
    return [b["x"].tolist() for b in batches]


def test_writer_manifest_and_members(tmp_path):
    root = write_dataset(tmp_path / "ds")
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 40 and len(manifest["splits"]["train"]["shards"]) == 10
    assert manifest["token_space_sha256"] == TokenSpace([("x", 10)]).sha256
    names = tarfile.open(root / "train-000000.tar").getnames()
    assert names == ["s0000.meta.json", "s0000.x.npy", "s0001.meta.json", "s0001.x.npy"] + names[4:]
    assert all(n.endswith((".npy", ".json")) for n in names)


def test_webdataset_reads_our_shards(tmp_path):
    root = write_dataset(tmp_path / "ds")
    ds = wds.WebDataset(str(root / "train-000000.tar"), shardshuffle=False).decode()
    got = [(s["__key__"], int(s["x.npy"][0]), s["meta.json"]["i"]) for s in ds]
    assert got == [(f"s{i:04d}", i, i) for i in range(4)]


def test_writer_refuses_pickle_and_bad_keys(tmp_path):
    w = DatasetWriter(tmp_path / "ds", 4)
    with pytest.raises(ValueError, match="object arrays"):
        w.write("train", "a", {"x.npy": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="not allowed"):
        w.write("train", "b", {"x.pyd": {"a": 1}})
    with pytest.raises(ValueError, match="no '.'"):
        w.write("train", "a.b", {"x.npy": np.zeros(1)})
    w.abort()
    assert not (tmp_path / "ds").exists() and not list(tmp_path.iterdir())


def test_failed_build_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path / "ds", 4) as w:
            w.write("train", "a", {"x.npy": np.zeros(1)})
            raise RuntimeError("crash mid-build")
    assert list(tmp_path.iterdir()) == []


def test_truncated_shard_is_named(tmp_path):
    root = write_dataset(tmp_path / "ds")
    bad = root / "train-000003.tar"
    bad.write_bytes(bad.read_bytes()[:700])
    shards = split_shards(root, "train")
    with pytest.raises(ShardError, match="train-000003.tar"):
        check_shard(shards[3])
    with pytest.raises(ShardError, match="train-000003.tar"):
        healthy_shards(shards, "raise")
    good, skipped = healthy_shards(shards, "skip")
    assert len(good) == 9 and skipped == [str(bad)]


def test_deal_shards_disjoint_and_shared_across_ranks(tmp_path):
    shards = split_shards(write_dataset(tmp_path / "ds"), "train")
    plan = deal_shards(shards, seed=1, epoch=0, world_size=2, num_roles=2)
    flat = [s.path for rank in plan for role in rank for s in role]
    assert len(flat) == len(set(flat)) == 10
    assert deal_shards(shards, 1, 1, 2, 2) != plan  # a new permutation each epoch
    with pytest.raises(ShardError, match="cannot feed"):
        deal_shards(shards[:3], 1, 0, 2, 2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_get_disjoint_items_and_equal_batch_counts(tmp_path, num_workers):
    root = write_dataset(tmp_path / "ds")
    seen = []
    for rank in range(2):
        s = stream(root, rank=rank, world_size=2, num_workers=num_workers)
        loader = torch.utils.data.DataLoader(s, batch_size=None, num_workers=num_workers)
        batches = ids(loader)
        assert len(batches) == len(s) > 0
        seen.append({x for b in batches for x in b})
    assert not seen[0] & seen[1]


def test_train_stream_is_deterministic_and_epoch_dependent(tmp_path):
    root = write_dataset(tmp_path / "ds")
    a, b = stream(root), stream(root)
    assert ids(a) == ids(b)
    b.epoch = 1
    assert ids(a) != ids(b)


@pytest.mark.parametrize("num_workers", [0, 2, 3])
@pytest.mark.parametrize("items", [1, 4])
def test_resume_at_any_batch_replays_the_same_stream(tmp_path, num_workers, items):
    root = write_dataset(tmp_path / "ds", n=48, items=items)
    full_stream = stream(root, items=items, num_workers=num_workers)
    full = ids(torch.utils.data.DataLoader(full_stream, batch_size=None, num_workers=num_workers))
    assert len(full) == len(full_stream)
    for k in (1, 2, 5, len(full) - 1):
        s = stream(root, items=items, num_workers=num_workers)
        s.skip_batches = k
        rest = list(torch.utils.data.DataLoader(s, batch_size=None, num_workers=num_workers))
        assert ids(rest) == full[k:]
        assert [int(b["stream_pos"][1]) for b in rest] == list(range(k, len(full)))


def test_eval_stream_covers_every_item_once_per_rank_pair(tmp_path):
    root = write_dataset(tmp_path / "ds")
    single = [x for b in ids(stream(root, "val")) for x in b]
    assert sorted(single) == list(range(40, 47))
    per_rank = [ids(stream(root, "val", rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])  # equal batch counts: no DDP hang
    union = {x for r in per_rank for b in r for x in b}
    assert union == set(range(40, 47))
    two = ids(torch.utils.data.DataLoader(stream(root, "val", num_workers=2), batch_size=None, num_workers=2))
    assert two == ids(stream(root, "val"))  # worker count does not change evaluation order


def test_shard_shorter_than_manifest_is_an_error(tmp_path):
    root = write_dataset(tmp_path / "ds")
    manifest = json.loads((root / "manifest.json").read_text())
    for s in manifest["splits"]["train"]["shards"]:
        s["count"] = 40
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError):
        check_shard(split_shards(root, "train")[0])


def test_forbidden_member_in_a_foreign_tar_is_refused(tmp_path):
    root = write_dataset(tmp_path / "ds")
    path = root / "train-000000.tar"
    with tarfile.open(path, "w") as tar:
        data = b"\x80\x04K\x01."  # a pickle
        info = tarfile.TarInfo("s0000.x.pyd")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match="forbidden"):
        list(stream(root))


def test_two_builders_of_one_folder_keep_the_first_and_leave_no_temp(tmp_path):
    """Parallel sweep jobs may build the same (content-named) data set at once: the second to finish keeps the
    first's folder instead of failing, and leaves no temporary folder behind."""
    first, second = DatasetWriter(tmp_path / "ds", 4), DatasetWriter(tmp_path / "ds", 4)
    second.tmp_dir = tmp_path / ".ds.tmp-other"  # a second process (distinct pid)
    second.tmp_dir.mkdir()
    for w, v in ((first, 1.0), (second, 2.0)):
        w.write("train", "a", {"x.npy": np.full(1, v)})
    assert first.close() == tmp_path / "ds"
    assert second.close() == tmp_path / "ds"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    x = next(iter(wds.WebDataset(str(tmp_path / "ds" / "train-000000.tar"), shardshuffle=False).decode()))["x.npy"]
    assert x.tolist() == [1.0]


# -- webdataset both ways ---------------------------------------------------------------------------------
def _png(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((4, 5, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_stock_webdataset_reads_every_shard_we_write_sample_for_sample(tmp_path):
    with DatasetWriter(tmp_path / "ds", 3) as w:
        for i in range(8):
            members = {"x.npy": np.arange(i, i + 3, dtype=np.float32), "meta.json": {"i": i}, "caption.txt": f"c{i}"}
            w.write("train", f"s{i:04d}", {**members, "image.png": _png(i)})
    paths = [s.path for s in split_shards(tmp_path / "ds", "train")]
    stock = list(wds.WebDataset(paths, shardshuffle=False).decode("rgb8"))
    ours = [decode_sample(raw) for p in paths for raw in iter_raw_samples(p)]
    assert [s["__key__"] for s in stock] == [s["__key__"] for s in ours] == [f"s{i:04d}" for i in range(8)]
    for a, b in zip(stock, ours, strict=True):
        assert np.array_equal(a["x.npy"], b["x"]) and a["x.npy"].dtype == b["x"].dtype == np.float32
        assert a["meta.json"] == b["meta"] and a["caption.txt"] == b["caption"]
        assert np.array_equal(a["image.png"], b["image"]) and b["image"].shape == (4, 5, 3)


def test_we_read_shards_written_by_stock_webdataset_sample_for_sample(tmp_path):
    written, paths = [], []
    for k in range(2):  # webdataset's own writer and its own (npy/json/txt) encoders
        paths.append(str(tmp_path / f"train-{k:06d}.tar"))
        with wds.TarWriter(paths[-1]) as sink:
            for i in range(4 * k, 4 * k + 4):
                sample = {"__key__": f"k{i:03d}", "x.npy": np.full((2,), i, np.int64), "meta.json": {"i": i}}
                sink.write({**sample, "caption.txt": f"caption {i}"})
                written.append(sample | {"caption.txt": f"caption {i}"})
    fields = ("caption.txt", "meta.json", "x.npy")
    shards = [Shard(p, 4, file_sha256(p), fields) for p in paths]
    assert healthy_shards(shards, "raise") == (shards, [])  # the setup check accepts them as they are
    ours = [decode_sample(raw) for s in shards for raw in iter_raw_samples(s.path)]
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in written]
    for got, want in zip(ours, written, strict=True):
        assert np.array_equal(got["x"], want["x.npy"]) and got["meta"] == want["meta.json"]
        assert got["caption"] == want["caption.txt"]
    args = dict(expand=lambda s: [int(s["x"][0])], collate=lambda xs: {"x": torch.tensor(xs)}, items_per_sample=1)
    val = ShardStream(shards, batch_size=3, seed=0, train=False, **args)
    assert [x for b in ids(val) for x in b] == list(range(8))
    train = ShardStream(shards, batch_size=2, seed=0, train=True, num_workers=2, **args)
    batches = ids(torch.utils.data.DataLoader(train, batch_size=None, num_workers=2))
    assert sorted(x for b in batches for x in b) == list(range(8))


def test_writer_records_fields_and_checksums_and_writes_the_same_bytes_twice(tmp_path):
    a, b = write_dataset(tmp_path / "a"), write_dataset(tmp_path / "b")
    ma, mb = (json.loads((r / "manifest.json").read_text()) for r in (a, b))
    assert ma["writer_version"] == WRITER_VERSION == 2
    assert ma["splits"]["train"]["fields"] == ma["splits"]["val"]["fields"] == ["meta.json", "x.npy"]
    assert ma["splits"] == mb["splits"]  # fixed tar headers: the sha256 depends on the samples only
    assert all(s["sha256"] == file_sha256(a / s["name"]) for s in ma["splits"]["train"]["shards"])
    with pytest.raises(ValueError, match=r"split's samples hold \['meta.json', 'x.npy'\]"):
        with DatasetWriter(tmp_path / "c", 4) as w:
            w.write("train", "a", {"x.npy": np.zeros(1), "meta.json": {}})
            w.write("train", "b", {"x.npy": np.zeros(1)})
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="lower case"):
        DatasetWriter(tmp_path / "d", 4).write("train", "a", {"X.npy": np.zeros(1)})


def test_an_old_manifest_asks_for_a_rebuild(tmp_path):
    root = write_dataset(tmp_path / "ds")
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "writer_version": 1}))
    with pytest.raises(ShardError, match="writer_version 1 != 2; rebuild"):
        read_manifest(root)


# -- integrity: what the setup check finds ------------------------------------------------------------------
def write_frames(root, n=16, per_shard=4):
    with DatasetWriter(root, per_shard) as w:
        for i in range(n):
            w.write("train", f"c{i:04d}", {"caption.txt": f"clip {i}", "frames.npy": np.full((2, 3), i, np.uint8)})
    return root


def frame_stream(root, shards=None, **kw):
    args = dict(batch_size=2, items_per_sample=2, seed=0, train=True)
    args.update(kw)
    expand = lambda s: [int(f[0]) for f in s["frames"]]
    return ShardStream(shards or split_shards(root, "train"), expand=expand, collate=lambda xs: {"x": xs}, **args)


def test_a_shard_cut_at_a_member_boundary_is_found_at_setup_and_skipped(tmp_path):
    root = write_frames(tmp_path / "ds")
    bad = root / "train-000002.tar"
    last = tarfile.open(bad).getmembers()[-1]
    assert last.name == "c0011.frames.npy"
    bad.write_bytes(bad.read_bytes()[: last.offset])  # sample c0011 keeps its caption, loses its frames
    shards = split_shards(root, "train")
    with pytest.raises(ShardError, match=r"train-000002\.tar: lacks member c0011\.frames\.npy"):
        healthy_shards(shards, "raise")
    good, skipped = healthy_shards(shards, "skip")
    assert skipped == [str(bad)] and len(good) == 3
    assert len(list(frame_stream(root, good, batch_size=1))) == len(frame_stream(root, good, batch_size=1))
    # a stream that was never checked names the shard, the sample and what it lacks, not a bare KeyError
    with pytest.raises(ShardError, match=r"train-000002\.tar: sample c0011 \(members \['caption.txt'\]\).*'frames'"):
        list(frame_stream(root, shuffle_buffer=0, train=False))


def test_a_forbidden_member_is_found_at_setup(tmp_path):
    root = write_frames(tmp_path / "ds")
    path = root / "train-000001.tar"
    with tarfile.open(path, "a") as tar:  # same sample count, one extra pickle member
        data = b"\x80\x04K\x01."
        info = tarfile.TarInfo("c0007.extra.pyd")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"train-000001\.tar: member c0007\.extra\.pyd has a forbidden extension"):
        check_shard(split_shards(root, "train")[1])


def _flip_inside(path, member_name):
    """Invert one data byte of ``member_name`` in place (same size): a silent bit flip."""
    member = tarfile.open(path).getmember(member_name)
    data = bytearray(path.read_bytes())
    data[member.offset_data + member.size - 1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_fail_the_checksum_before_anything_trains(tmp_path):
    root = write_frames(tmp_path / "ds")
    bad = root / "train-000003.tar"
    _flip_inside(bad, "c0013.frames.npy")
    shards = split_shards(root, "train")
    with pytest.raises(ShardError, match=r"train-000003\.tar: sha256 [0-9a-f]{64} differs from the manifest's"):
        healthy_shards(shards, "raise")
    assert healthy_shards(shards, "skip")[1] == [str(bad)]


def test_verified_checksums_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    root = write_frames(tmp_path / "ds")
    shards = split_shards(root, "train")
    hashed = []
    real = shards_module.file_sha256
    monkeypatch.setattr(shards_module, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    healthy_shards(shards, "raise")  # files written just now: their mtime may not be final, so no cache yet
    assert len(hashed) == 4 and not (root / CHECKSUM_CACHE).exists()
    for s in shards:
        os.utime(s.path, ns=(10**18, 10**18))  # long settled
    hashed.clear()
    healthy_shards(shards, "raise")
    assert len(hashed) == 4 and len(json.loads((root / CHECKSUM_CACHE).read_text())) == 4
    hashed.clear()
    healthy_shards(shards, "raise")  # a rerun, a resume, another rank: nothing to hash
    assert hashed == []
    _flip_inside(root / "train-000000.tar", "c0001.frames.npy")
    os.utime(root / "train-000000.tar", ns=(10**18 + 1, 10**18 + 1))
    with pytest.raises(ShardError, match="sha256"):
        healthy_shards(shards, "raise")
    assert hashed == ["train-000000.tar"]


def test_a_bad_npy_header_names_the_shard_sample_and_member(tmp_path):
    root = write_dataset(tmp_path / "ds")
    path = root / "train-000001.tar"
    member = tarfile.open(path).getmember("s0005.x.npy")
    data = bytearray(path.read_bytes())
    data[member.offset_data : member.offset_data + 6] = b"NOTNPY"  # the magic of the .npy header
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000001\.tar: sample s0005, member x\.npy: cannot decode"):
        list(stream(root, train=False))
