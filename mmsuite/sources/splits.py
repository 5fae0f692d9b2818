"""Train/val/test splits by source item (a clip, a video), never by frame: the one split of the suite."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


def split_by_item(items: Iterable[int] | Iterable[str], fractions: Mapping[str, float], seed: int) -> dict:
    """Assign every distinct item id (a clip index or a video name; never a frame) to one split: ``{id: split}``.

    The distinct ids, sorted, are put in the order of a permutation seeded by ``seed`` and cut into consecutive
    blocks at ``round(cumulative fraction * n)``; a split with a positive fraction that would be empty takes one
    item from the largest. The result depends only on the set of ids, the fractions and the seed: not on the
    order of the ids, duplicates, or Python's hash seed. Frames, windows and pairs inherit their item's split,
    so near-identical frames of one clip never land in two splits.
    """
    if isinstance(items, str | bytes):
        raise TypeError("items must be a sequence of ids (ints or strings), not one string")
    ids = list(items)
    kinds = {str if isinstance(i, str) else int if _is_int(i) else None for i in ids}
    if None in kinds or len(kinds) > 1:
        bad = next((i for i in ids if not (isinstance(i, str) or _is_int(i))), ids[0] if ids else None)
        raise TypeError(f"item ids must be all ints or all strings, got {bad!r} ({type(bad).__name__}) among them")
    names = [str(k) for k in fractions]
    values = np.array([float(fractions[k]) for k in fractions], np.float64)
    if not names or not np.all(np.isfinite(values)) or np.any(values < 0) or abs(values.sum() - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {dict(fractions)}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    ids = sorted({int(i) if kinds == {int} else i for i in ids})
    n, wanted = len(ids), int((values > 0).sum())
    if n < wanted:
        raise ValueError(f"{n} item(s) cannot give each of the {wanted} split(s) {dict(fractions)} at least one")

    stops, acc = [], 0.0
    for i, f in enumerate(values):
        acc += f
        stops.append(n if i == len(values) - 1 else min(n, int(round(acc * n))))
    counts = np.diff([0, *stops])
    for k in np.flatnonzero((values > 0) & (counts == 0)):  # keep every wanted split non-empty
        counts[int(np.argmax(counts))] -= 1
        counts[k] += 1

    order = np.random.default_rng([int(seed), 0x5B1F]).permutation(n)
    out, start = {}, 0
    for name, count in zip(names, counts):
        for j in order[start : start + count]:
            out[ids[j]] = name
        start += count
    return out


def _is_int(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)
