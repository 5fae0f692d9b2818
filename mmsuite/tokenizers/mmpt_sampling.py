"""Which MMPT items and tasks are drawn: stratified golden sets and the task mixture with its ramp.

Golden sets: a fixed number of items per task, stratified by caption length (equal-count bins within each
source) and by source, chosen by a seed alone (the same items whatever order they arrive in).

Mixture: the probability of each task is a function of the global step. Until ``ramp_start`` only the reading
tasks (A2T, I2T) are drawn; over the next ``ramp_steps`` steps the probabilities move linearly to the final
weights (25 % each by default). Draws are seeded by ``(seed, step, stream)``, so a resumed run draws what the
uninterrupted one would have; :class:`TaskMixture` keeps the counts drawn and refuses a checkpoint made with
other settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mmsuite.settings import fail, setting
from mmsuite.tokenizers.mmpt_space import READ_TASKS, TASK_NAMES

# -- golden sets --------------------------------------------------------------------------------------------


@dataclass
class GoldenSettings:
    per_task: int = setting(64, ge=1)  # items per task
    length_bins: int = setting(4, ge=1)  # equal-count caption-length bins within each source
    seed: int = setting(0, ge=0)


def select_golden(
    keys: Sequence[str], caption_lengths: Sequence[int], sources: Sequence[str] | None, settings: GoldenSettings
) -> list[int]:
    """Indices (ascending) of ``settings.per_task`` items, stratified by source and caption-length bin.

    Each source gets its share of the items, and each length bin its share of the source's, by largest remainder
    (ties to the first); within a bin the items are drawn by a seeded permutation of their keys. Keys must be
    unique.
    """
    n_items = len(keys)
    sources = list(sources) if sources is not None else [""] * n_items
    if len(caption_lengths) != n_items or len(sources) != n_items:
        raise ValueError(f"select_golden: {n_items} keys, {len(caption_lengths)} lengths, {len(sources)} sources")
    if len(set(keys)) != n_items:
        raise ValueError("select_golden: keys are not unique")
    n = int(settings.per_task)
    if n > n_items:
        raise ValueError(f"a golden set of {n} items needs at least {n} candidates, got {n_items}")
    by_source = {src: [i for i in range(n_items) if sources[i] == src] for src in sorted(set(sources))}
    strata: list[list[int]] = []
    quota: list[int] = []
    for members, q_src in zip(by_source.values(), _largest_remainder(n, [len(m) for m in by_source.values()])):
        ranked = sorted(members, key=lambda i: (caption_lengths[i], keys[i]))
        bins = [b.tolist() for b in np.array_split(np.asarray(ranked), min(int(settings.length_bins), len(ranked)))]
        strata.extend(bins)
        quota.extend(_largest_remainder(q_src, [len(b) for b in bins]))
    rng = np.random.default_rng(settings.seed)
    chosen: list[int] = []
    for members, q in zip(strata, quota):
        ordered = sorted(members, key=lambda i: keys[i])
        chosen.extend(ordered[j] for j in rng.permutation(len(ordered))[:q])
    return sorted(int(i) for i in chosen)


def _largest_remainder(n: int, sizes: Sequence[int]) -> list[int]:
    """``n`` split in proportion to ``sizes`` in whole numbers (Hamilton's method; ties to the first)."""
    share = n * np.asarray(sizes, dtype=np.float64) / sum(sizes)
    quota = np.floor(share).astype(int)
    for j in np.argsort(-(share - quota), kind="stable")[: n - int(quota.sum())]:
        quota[j] += 1
    return quota.tolist()


# -- task mixture ---------------------------------------------------------------------------------------------


def _default_weights() -> dict[str, float]:
    return {t: 0.25 for t in TASK_NAMES}


@dataclass
class MixtureSettings:
    weights: dict[str, float] = setting(_default_weights(), ge=0.0)  # the final mixture (task -> weight)
    ramp_start: int = setting(0, ge=0)  # N_ramp: global steps with the reading tasks (A2T, I2T) only
    ramp_steps: int = setting(0, ge=0)  # steps over which the writing tasks are mixed in (0: at once)
    seed: int = setting(0, ge=0)

    def check(self, key: str) -> None:
        unknown = sorted(set(self.weights) - set(TASK_NAMES))
        if unknown:
            fail(f"{key}.weights", f"has unknown task(s) {unknown}; tasks are {list(TASK_NAMES)}")
        if sum(float(self.weights.get(t, 0.0)) for t in TASK_NAMES) <= 0:
            fail(f"{key}.weights", f"must have a positive sum, got {dict(self.weights)}")
        if sum(float(self.weights.get(t, 0.0)) for t in READ_TASKS) <= 0:
            fail(f"{key}.weights", f"needs a positive weight on a reading task {READ_TASKS} (before the ramp)")


class TaskMixture:
    """Task probabilities as a function of the global step, seeded draws, and a checkpointable count of draws."""

    def __init__(self, settings: MixtureSettings | None = None):
        self.settings = settings or MixtureSettings()
        w = np.array([float(self.settings.weights.get(t, 0.0)) for t in TASK_NAMES])
        self.final = w / w.sum()
        read = np.array([w[i] if t in READ_TASKS else 0.0 for i, t in enumerate(TASK_NAMES)])
        self.initial = read / read.sum()
        self.drawn = np.zeros(len(TASK_NAMES), dtype=np.int64)
        self.step = 0

    def probabilities(self, step: int) -> np.ndarray:
        """``[len(TASK_NAMES)]`` task probabilities at global step ``step``."""
        s = self.settings
        if step < s.ramp_start:
            return self.initial.copy()
        if s.ramp_steps == 0 or step >= s.ramp_start + s.ramp_steps:
            return self.final.copy()
        a = (step - s.ramp_start) / s.ramp_steps
        return (1 - a) * self.initial + a * self.final

    def draw(self, step: int, n: int, stream: int = 0) -> np.ndarray:
        """``n`` task indices for global step ``step``; ``stream`` separates draws within a step (rank, worker,
        micro-batch). A pure function of ``(seed, step, stream, n)``; the counts are kept for logging."""
        if step < 0 or stream < 0:
            raise ValueError(f"draw: step and stream must be >= 0, got {step}, {stream}")
        rng = np.random.default_rng([int(self.settings.seed), int(step), int(stream)])
        tasks = rng.choice(len(TASK_NAMES), size=int(n), p=self.probabilities(step))
        self.drawn += np.bincount(tasks, minlength=len(TASK_NAMES))
        self.step = max(self.step, int(step))
        return tasks

    def draw_among(self, step: int, allowed: np.ndarray, stream: int = 0) -> np.ndarray:
        """One task index per row for global step ``step``, among the tasks ``allowed [n, len(TASK_NAMES)]`` marks
        for the row (e.g. the two tasks a captioned image can make): the step's probabilities renormalised over
        them. A pure function of ``(seed, step, stream, allowed)``; counted like :meth:`draw`."""
        if step < 0 or stream < 0:
            raise ValueError(f"draw_among: step and stream must be >= 0, got {step}, {stream}")
        allowed = np.asarray(allowed, dtype=bool)
        p = self.probabilities(step)[None] * allowed
        total = p.sum(axis=1, keepdims=True)
        if (total <= 0).any():
            row = int(np.flatnonzero(total[:, 0] <= 0)[0])
            names = [t for t, ok in zip(TASK_NAMES, allowed[row]) if ok]
            raise ValueError(f"step {step}: the mixture gives no weight to any task row {row} can make ({names})")
        rng = np.random.default_rng([int(self.settings.seed), int(step), int(stream), 1])
        u = rng.random(len(p))[:, None]
        tasks = np.minimum((np.cumsum(p / total, axis=1) < u).sum(axis=1), len(TASK_NAMES) - 1)
        tasks = np.where(allowed[np.arange(len(p)), tasks], tasks, np.argmax(p, axis=1))  # u ~ 1 rounding
        self.drawn += np.bincount(tasks, minlength=len(TASK_NAMES))
        self.step = max(self.step, int(step))
        return tasks

    def state_dict(self) -> dict:
        return {
            "settings": dataclasses.asdict(self.settings),
            "drawn": {t: int(c) for t, c in zip(TASK_NAMES, self.drawn)},
            "step": int(self.step),
        }

    def load_state_dict(self, state: Mapping) -> None:
        mine = dataclasses.asdict(self.settings)
        theirs = dict(state["settings"])
        if theirs != mine:
            diff = {
                k: (theirs.get(k), mine.get(k)) for k in sorted(set(mine) | set(theirs)) if theirs.get(k) != mine.get(k)
            }
            raise ValueError(f"the checkpoint's task mixture differs from this run's (checkpoint, now): {diff}")
        self.drawn = np.array([int(state["drawn"].get(t, 0)) for t in TASK_NAMES], dtype=np.int64)
        self.step = int(state["step"])
