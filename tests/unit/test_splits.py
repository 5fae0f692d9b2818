"""The suite's one split: every source item (clip index or video name) goes to exactly one split."""

import numpy as np
import pytest

from mmsuite.sources.splits import split_by_item

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def test_split_by_item_is_a_seeded_proportional_partition_of_distinct_items():
    # clip indices: a partition in the given proportions, the same for the same seed, another for another seed
    split = split_by_item(range(1000), FRACTIONS, seed=7)
    assert sorted(split) == list(range(1000))
    assert [list(split.values()).count(s) for s in FRACTIONS] == [800, 100, 100]
    assert split_by_item(range(1000), FRACTIONS, seed=7) == split
    assert sum(split[i] != s for i, s in split_by_item(range(1000), FRACTIONS, seed=8).items()) > 100
    # the toy world's clips keep the splits their data sets were built with (pinned: 48 clips, seed 0)
    toy = split_by_item(range(48), FRACTIONS, seed=0)
    assert [i for i in range(48) if toy[i] == "val"] == [11, 14, 41, 45, 47]
    assert [i for i in range(48) if toy[i] == "test"] == [12, 17, 18, 34, 38]
    # video names: order and duplicates do not matter; frames and pairs inherit their video's split
    videos = [f"{i:04d}" for i in range(40)]
    by_name = split_by_item(videos, FRACTIONS, seed=1)
    assert split_by_item(list(np.random.default_rng(0).permutation(videos)) + videos[:5], FRACTIONS, seed=1) == by_name
    # small sets: every split with a positive fraction keeps an item, taken from the largest
    small = split_by_item([f"v{i}" for i in range(6)], FRACTIONS, seed=1)
    assert sorted(small.values()) == ["test", "train", "train", "train", "train", "val"]
    with pytest.raises(ValueError, match="at least one"):
        split_by_item(range(2), FRACTIONS, seed=0)
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_item(["a", "b"], {"train": 0.8, "val": 0.1}, seed=0)
    with pytest.raises(TypeError, match="all ints or all strings"):
        split_by_item(["a", 3], {"train": 1.0}, seed=0)
    with pytest.raises(TypeError, match="not one string"):
        split_by_item("abc", {"train": 1.0}, seed=0)
