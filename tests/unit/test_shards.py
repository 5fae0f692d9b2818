"""Shard writer/reader: no pickle, manifests, corrupt shards, rank-disjoint equal streams, exact resume."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from mmsuite.datamodules.shards import (
    DatasetWriter,
    ShardError,
    ShardStream,
    check_shard,
    deal_shards,
    healthy_shards,
    split_by_item,
    split_shards,
)
from mmsuite.tokenizers.token_space import TokenSpace


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


def test_split_by_item_partitions_items():
    s = split_by_item(100, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)
    allidx = np.concatenate(list(s.values()))
    assert sorted(allidx.tolist()) == list(range(100))
    assert [len(s[k]) for k in ("train", "val", "test")] == [80, 10, 10]
    assert split_by_item(100, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)["val"].tolist() == s["val"].tolist()


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
