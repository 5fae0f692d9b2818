"""MMPT training sequences: the four task builders, drop counts, batching, and the prompt ablation.

Every task's sequence is ``<open src> SRC <close src> <gen tgt> <open tgt> TGT <close tgt>``
(``mmsuite.tokenizers.mmpt_space.TASKS``). Labels equal the ids on the target span, opening and closing tag
included (the model must learn to stop), and are -100 everywhere else; they are not shifted (the model's loss
shifts: the logit at ``<gen tgt>`` predicts ``<open tgt>``). A target is never truncated: a sequence longer than
``max_seq_len`` has its source text shortened if that makes it fit (T2A, T2I), else it is dropped, and every drop
is counted by task and reason (:class:`DropCounter`). No two samples share a row (no packing).

The prompt ablation keeps each target fixed and changes only its source: the correct one, another item's
(a seeded derangement) or none (``<text_start><text_end>``); :func:`ablation_summary` gives per condition the
mean target NLL, the paired gaps with bootstrap 95 % intervals and the share of items where the correct
source does not have the lower NLL.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmsuite.settings import setting
from mmsuite.tokenizers.mmpt_space import TASK_NAMES, TASKS, DecodeError, FormatSettings, MMPTLayout, task_index

N_TAGS = 5  # <open src> <close src> <gen tgt> <open tgt> <close tgt>
IGNORE = -100  # label of every position outside the target span (torch's cross-entropy default)
DROP_REASONS = ("too_long", "empty_text", "bad_text", "bad_image", "bad_audio")


@dataclass
class SequenceSettings:
    max_seq_len: int = setting(1024, ge=8)  # longest sequence, source + tags + target
    min_prompt_tokens: int = setting(1, ge=1)  # a text source is shortened to no fewer tokens than this; else dropped


@dataclass
class TaskItem:
    """One captioned record: global text ids (no specials) and its image ids or audio ids (frame-major)."""

    key: str
    text: Sequence[int]
    image: Sequence[int] | None = None
    audio: Sequence[int] | None = None
    source: str = ""  # where the record comes from (data set name), for stratified golden sets

    def body(self, modality: str):
        body = {"text": self.text, "image": self.image, "audio": self.audio}[modality]
        if body is None:
            raise ValueError(f"item {self.key!r} has no {modality} for this task")
        return body


@dataclass
class TaskSequence:
    """A built sequence: ``input_ids`` and ``labels`` (int64 ``[L]``), the target span ``[target_start, L)``."""

    task: str
    key: str
    input_ids: np.ndarray
    labels: np.ndarray
    target_start: int
    shortened: int = 0  # source text tokens cut to fit max_seq_len

    @property
    def prompt(self) -> np.ndarray:
        """What generation starts from: the source and ``<gen tgt>`` (the target's opening tag is generated)."""
        return self.input_ids[: self.target_start]

    @property
    def target(self) -> np.ndarray:
        return self.input_ids[self.target_start :]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def assemble(layout: MMPTLayout, task: str, source, target) -> tuple[np.ndarray, np.ndarray, int]:
    """``(input_ids, labels, target_start)`` of ``task`` from bodies as they are (no checks; an empty ``source``
    gives the ablation's empty condition)."""
    fmt = TASKS[task]
    s_open, s_close, _ = layout.tags(fmt.source)
    t_open, t_close, t_gen = layout.tags(fmt.target)
    source = np.asarray(source, dtype=np.int64).reshape(-1)
    target = np.asarray(target, dtype=np.int64).reshape(-1)
    head = np.concatenate([[s_open], source, [s_close, t_gen]]).astype(np.int64)
    tail = np.concatenate([[t_open], target, [t_close]]).astype(np.int64)
    ids = np.concatenate([head, tail])
    labels = np.full_like(ids, IGNORE)
    labels[head.size :] = tail
    return ids, labels, int(head.size)


def assemble_text(layout: MMPTLayout, text) -> tuple[np.ndarray, np.ndarray]:
    """A text-only sequence ``<text_start> TEXT <text_end>`` with every token after the opening tag labelled: the
    language-model task of the Stage 3 base and the text-only prompt set of the no-regression check (C3)."""
    t_open, t_close, _ = layout.tags("text")
    ids = np.concatenate([[t_open], np.asarray(text, dtype=np.int64).reshape(-1), [t_close]]).astype(np.int64)
    labels = ids.copy()
    labels[0] = IGNORE
    return ids, labels


def collate_rows(rows: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ``[B, L]`` of ``(ids, labels)`` pairs."""
    if not rows:
        raise ValueError("collate_rows: no rows")
    length = max(len(ids) for ids, _ in rows)
    ids_t = torch.full((len(rows), length), int(pad_id), dtype=torch.long)
    labels_t = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        n = len(ids)
        ids_t[i, :n] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        labels_t[i, :n] = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        mask[i, :n] = 1
    return {"input_ids": ids_t, "attention_mask": mask, "labels": labels_t}


class DropCounter:
    """Dropped samples by task and reason, with the first message of each (merged across workers/ranks)."""

    def __init__(self):
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.examples: dict[tuple[str, str], str] = {}
        self.shortened: dict[str, int] = defaultdict(int)  # samples whose source text was shortened

    def add(self, task: str, reason: str, message: str) -> None:
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; reasons are {DROP_REASONS}")
        self.counts[task][reason] += 1
        self.examples.setdefault((task, reason), message)

    def total(self, task: str | None = None) -> int:
        tasks = [task] if task is not None else list(self.counts)
        return sum(sum(self.counts[t].values()) for t in tasks if t in self.counts)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {t: dict(r) for t, r in self.counts.items() if r}

    def state_dict(self) -> dict:
        return {"counts": self.as_dict(), "shortened": dict(self.shortened)}

    def load_state_dict(self, state: Mapping) -> None:
        self.__init__()
        self.merge(state)

    def merge(self, state: Mapping) -> None:
        for task, reasons in state.get("counts", {}).items():
            for reason, n in reasons.items():
                self.counts[task][reason] += int(n)
        for task, n in state.get("shortened", {}).items():
            self.shortened[task] += int(n)


class SequenceBuilder:
    """Builds the sequences of the four tasks from :class:`TaskItem` bodies, checked, counting drops."""

    def __init__(self, layout: MMPTLayout, fmt: FormatSettings, settings: SequenceSettings | None = None):
        self.layout = layout
        self.fmt = fmt
        self.settings = settings or SequenceSettings()
        self.drops = DropCounter()

    def build(self, task: str, item: TaskItem) -> TaskSequence | None:
        """The ``task`` sequence of ``item``, or None when it is dropped (counted in :attr:`drops`)."""
        fmt = TASKS[TASK_NAMES[task_index(task)]]
        try:
            source = self._checked(fmt.source, item.body(fmt.source), role="source")
            target = self._checked(fmt.target, item.body(fmt.target), role="target")
        except _Drop as d:
            self.drops.add(task, d.reason, f"{item.key}: {d.message}")
            return None
        length = source.size + target.size + N_TAGS
        shortened = 0
        if length > self.settings.max_seq_len:
            excess = length - self.settings.max_seq_len
            if fmt.source == "text" and source.size - excess >= self.settings.min_prompt_tokens:
                source, shortened = source[: source.size - excess], excess
                self.drops.shortened[task] += 1
            else:
                why = (
                    f"{length} tokens > max_seq_len {self.settings.max_seq_len} "
                    f"(source {source.size}, target {target.size}; a target is never truncated)"
                )
                self.drops.add(task, "too_long", f"{item.key}: {why}")
                return None
        ids, labels, start = assemble(self.layout, task, source, target)
        return TaskSequence(task, item.key, ids, labels, start, shortened)

    def prompt(self, task: str, source) -> np.ndarray:
        """The generation prompt ``<open src> SRC <close src> <gen tgt>`` of a source body alone (generate.py): the
        source is checked like a training source, a text source shortened so that the longest target still fits
        ``max_seq_len``; a source that cannot fit raises ValueError."""
        fmt = TASKS[TASK_NAMES[task_index(task)]]
        try:
            body = self._checked(fmt.source, source, role="source")
        except _Drop as d:
            raise ValueError(f"{task} prompt: {d.message}") from None
        room = self.settings.max_seq_len - N_TAGS - self.layout.max_body(fmt.target, self.fmt)
        if body.size > room:
            if fmt.source != "text" or room < self.settings.min_prompt_tokens:
                raise ValueError(
                    f"{task} prompt: a source of {body.size} tokens leaves no room for a {fmt.target} target of up "
                    f"to {self.layout.max_body(fmt.target, self.fmt)} tokens within max_seq_len "
                    f"{self.settings.max_seq_len}"
                )
            body = body[:room]
        ids, _, start = assemble(self.layout, task, body, [])
        return ids[:start]

    def _checked(self, modality: str, body, role: str) -> np.ndarray:
        # a text source is a prompt: only its ids are checked (its length is bounded by max_seq_len, not by the
        # caption generation limit); targets and media sources obey every rule of the format
        limits = not (modality == "text" and role == "source")
        try:
            return self.layout.check_body(modality, body, self.fmt, limits=limits)
        except DecodeError as e:
            reason = "empty_text" if (modality == "text" and e.kind == "empty") else f"bad_{modality}"
            raise _Drop(reason, f"{role} {modality}: {e}") from None


class _Drop(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def verify_sequence(layout: MMPTLayout, seq: TaskSequence, fmt: FormatSettings) -> None:
    """Gate A3: the sequence has the task's tag order, labels on exactly the target span (equal to the ids
    there) and a target that the strict decoder accepts. Raises ValueError naming the first problem."""
    fmt_task = TASKS[seq.task]
    ids, labels, start = seq.input_ids, seq.labels, seq.target_start
    name = f"{seq.task} sequence {seq.key!r}"
    if ids.shape != labels.shape or ids.ndim != 1:
        raise ValueError(f"{name}: input_ids {ids.shape} and labels {labels.shape} differ")
    s_open, s_close, _ = layout.tags(fmt_task.source)
    _, _, t_gen = layout.tags(fmt_task.target)
    if ids[0] != s_open or ids[start - 2] != s_close or ids[start - 1] != t_gen:
        raise ValueError(f"{name}: source tags are not <open src> ... <close src> <gen tgt>")
    if (labels[:start] != IGNORE).any():
        raise ValueError(f"{name}: a label outside the target span is not {IGNORE}")
    if (labels[start:] != ids[start:]).any():
        raise ValueError(f"{name}: a target label differs from its id (or is {IGNORE})")
    layout.check_body(fmt_task.source, ids[1 : start - 2], fmt, limits=fmt_task.source != "text")
    layout.decode_target(fmt_task.target, ids[start:], fmt)


# -- batching ----------------------------------------------------------------------------------------------
def collate(seqs: Sequence[TaskSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training batch: ``input_ids``, ``attention_mask``, ``labels`` ``[B, L]`` (L = batch maximum)
    and ``task`` ``[B]`` (index into ``TASK_NAMES``)."""
    if not seqs:
        raise ValueError("collate: no sequences")
    batch = collate_rows([(s.input_ids, s.labels) for s in seqs], pad_id)
    batch["task"] = torch.tensor([task_index(s.task) for s in seqs], dtype=torch.long)
    return batch


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for batched generation (every row's next token at the same column)."""
    if not prompts:
        raise ValueError("collate_prompts: no prompts")
    arrs = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    length = max(a.size for a in arrs)
    ids = torch.full((len(arrs), length), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(arrs), length), dtype=torch.long)
    for i, a in enumerate(arrs):
        ids[i, length - a.size :] = torch.from_numpy(a)
        mask[i, length - a.size :] = 1
    return {"input_ids": ids, "attention_mask": mask}


# -- prompt ablation ---------------------------------------------------------------------------------------
ABLATION_CONDITIONS = ("correct", "shuffled", "empty")


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` with no fixed point (n >= 2): item i takes the source of item p[i]."""
    if n < 2:
        raise ValueError(f"a shuffled-source ablation needs at least 2 items, got {n}")
    rng = np.random.default_rng(seed)
    while True:  # rejection: ~e tries on average
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


def ablation_sequences(
    builder: SequenceBuilder, task: str, items: Sequence[TaskItem], seed: int = 0
) -> tuple[list[str], dict[str, list[TaskSequence]]]:
    """The three conditions of ``task`` over ``items``, item-aligned: ``(keys, {condition: sequences})``.

    Every condition has the same target for item i; items whose correct sequence is dropped are left out of
    every condition (a shuffled source that does not fit is shortened like any text source, or the item is
    left out too). The shuffled sources follow :func:`derangement` of the usable items.
    """
    fmt = TASKS[task]
    built = [(it, builder.build(task, it)) for it in items]
    usable = [(it, s) for it, s in built if s is not None]
    perm = derangement(len(usable), seed)
    keys: list[str] = []
    out: dict[str, list[TaskSequence]] = {c: [] for c in ABLATION_CONDITIONS}
    for i, (it, correct) in enumerate(usable):
        donor = usable[int(perm[i])][0]
        swapped = TaskItem(it.key, it.text, it.image, it.audio, it.source)
        setattr(swapped, fmt.source, donor.body(fmt.source))
        shuffled = builder.build(task, swapped)
        if shuffled is None:
            continue
        ids, labels, start = assemble(builder.layout, task, [], correct.target[1:-1])
        keys.append(it.key)
        out["correct"].append(correct)
        out["shuffled"].append(shuffled)
        out["empty"].append(TaskSequence(task, it.key, ids, labels, start))
    return keys, out


def bootstrap_mean_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile bootstrap interval at ``level`` (resampling items)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("bootstrap of no values")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


def ablation_summary(nll: Mapping[str, Sequence[float]], n_boot: int = 2000, seed: int = 0) -> dict:
    """From per-item target NLLs (nats/token) of each condition, item-aligned: means, the gaps
    ``shuffled - correct`` and ``empty - correct`` with bootstrap 95 % intervals, and the share of items where
    the correct source loses (NLL not lower)."""
    correct = np.asarray(nll["correct"], dtype=np.float64)
    out: dict = {"n": int(correct.size), "nll": {"correct": float(correct.mean())}}
    for cond in ABLATION_CONDITIONS[1:]:
        other = np.asarray(nll[cond], dtype=np.float64)
        if other.shape != correct.shape:
            raise ValueError(f"ablation: {cond} has {other.size} items, correct has {correct.size}")
        out["nll"][cond] = float(other.mean())
        mean, lo, hi = bootstrap_mean_ci(other - correct, n_boot, seed)
        out[f"gap_{cond}"] = {"mean": mean, "ci95": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0)}
        out[f"correct_loses_{cond}"] = float((correct >= other).mean())
    return out


def run_prompt_ablation(
    nll_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    builder: SequenceBuilder,
    task: str,
    items: Sequence[TaskItem],
    batch_size: int = 16,
    seed: int = 0,
    n_boot: int = 2000,
) -> dict:
    """The teacher-forced prompt ablation of ``task``: ``nll_fn(batch) -> [B]`` per-row mean target NLL (e.g.
    the MMPT module's ``sequence_nll``) on every condition; returns :func:`ablation_summary` plus ``keys`` and the
    per-item values."""
    keys, conds = ablation_sequences(builder, task, items, seed)
    per_item: dict[str, list[float]] = {}
    for cond, seqs in conds.items():
        vals: list[float] = []
        for i in range(0, len(seqs), batch_size):
            batch = collate(seqs[i : i + batch_size], builder.layout.pad_id)
            vals.extend(float(x) for x in nll_fn(batch).detach().float().cpu())
        per_item[cond] = vals
    summary = ablation_summary(per_item, n_boot=n_boot, seed=seed)
    return {"task": task, **summary, "keys": keys, "per_item": per_item}
