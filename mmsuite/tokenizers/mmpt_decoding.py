"""Constrained decoding of MMPT targets: one grammar, used for generation and for teacher-forced diagnostics.

A target is ``<open> BODY <close>``; at body position ``p`` (``p = -1``: the opening tag) the grammar allows:

- audio: codebook ``p mod K`` mid-frame; at a frame boundary codebook 0, or ``<aud_end>`` once ``audio_min_frames``
  frames are written; only ``<aud_end>`` at ``audio_max_frames`` frames;
- image: image ids for exactly ``image_tokens`` positions, then ``<img_end>``;
- text: allowed text ids (the ``text`` range minus banned ids; never the base's padding rows or the reserved tail),
  ``<text_end>`` from ``text_min_tokens`` on, only ``<text_end>`` at ``text_max_tokens``;
- a row that has closed: only ``<pad>`` (one finite logit, so sampling never sees an all ``-inf`` row).

The allowed sets are one boolean table ``[states, vocab]`` (:class:`TaskGrammar`); a step is one gather and one
``masked_fill`` for the whole batch (:class:`ConstrainedLogitsProcessor`, a ``transformers.LogitsProcessor``;
``PrefixConstrainedLogitsProcessor`` loops over rows in Python, and no stock processor knows codebook order).
Unconstrained decoding (``constrained=False``) only bans the never-emitted ids, so its decode rate is the model's
own. :func:`illegal_mass` is the probability the model puts outside the allowed set at teacher-forced target
positions: what the constraint hides.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from mmsuite.tokenizers.mmpt_space import TASK_NAMES, TASKS, DecodeError, FormatSettings, MMPTLayout, task_index

_FINITE = 1e30  # NaN / inf scores become +-_FINITE before masking, so an allowed id always stays finite


class TaskGrammar:
    """The allowed-id table of every decoding state of an MMPT layout and format, and the state at each step."""

    def __init__(self, layout: MMPTLayout, fmt: FormatSettings):
        self.layout, self.fmt = layout, fmt
        k = layout.n_codebooks
        names = [f"audio_q{i}" for i in range(k)]
        names += ["audio_q0_or_end", "audio_end", "image", "image_end", "text", "text_or_end", "text_end"]
        names += ["open_text", "open_image", "open_audio", "done", "free"]
        self.state_names: tuple[str, ...] = tuple(names)
        self.state = {n: i for i, n in enumerate(names)}
        table = torch.zeros(len(names), layout.vocab_size, dtype=torch.bool)
        row = lambda name: table[self.state[name]]  # noqa: E731
        for i, r in enumerate(layout.audio):
            row(f"audio_q{i}")[r.start : r.stop] = True
        a_open, a_close, _ = layout.tags("audio")
        i_open, i_close, _ = layout.tags("image")
        t_open, t_close, _ = layout.tags("text")
        row("audio_q0_or_end")[layout.audio[0].start : layout.audio[0].stop] = True
        row("audio_q0_or_end")[a_close] = True
        row("audio_end")[a_close] = True
        row("image")[layout.image.start : layout.image.stop] = True
        row("image_end")[i_close] = True
        text = row("text")
        text[layout.text.start : layout.text.stop] = True
        text[list(layout.banned_text_ids)] = False
        row("text_or_end")[:] = text
        row("text_or_end")[t_close] = True
        row("text_end")[t_close] = True
        row("open_text")[t_open] = True
        row("open_image")[i_open] = True
        row("open_audio")[a_open] = True
        row("done")[layout.pad_id] = True
        row("free")[:] = True
        row("free")[layout.never_emitted_ids()] = False
        if not table.any(dim=1).all():
            empty = [n for n, ok in zip(names, table.any(dim=1).tolist()) if not ok]
            raise ValueError(f"decoding states {empty} allow no id (banned every text id?)")
        self.allowed = table
        self._on: dict[torch.device, torch.Tensor] = {}

    def table(self, device: torch.device) -> torch.Tensor:
        """The allowed table on ``device`` (cached)."""
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = self.allowed.to(device)
        return self._on[device]

    # -- states ---------------------------------------------------------------------------------------------
    def body_limit(self, task: str) -> int:
        """Most body tokens of ``task``'s target."""
        return self.layout.max_body(TASKS[task].target, self.fmt)

    def states(self, task: str, p: torch.Tensor) -> torch.Tensor:
        """State at body position ``p`` (any shape; -1 = the opening tag, past the close tag = done)."""
        target = TASKS[task].target
        s = self.state
        p = torch.as_tensor(p, dtype=torch.long)
        out = torch.full_like(p, s["done"])
        out = torch.where(p == -1, s[f"open_{target}"], out)
        limit = self.body_limit(task)
        body = (p >= 0) & (p < limit)
        if target == "audio":
            k = self.layout.n_codebooks
            cb = p.remainder(k)
            st = torch.where((cb == 0) & (p >= k * self.fmt.audio_min_frames), s["audio_q0_or_end"], cb)
            out = torch.where(body, st, out)
            out = torch.where(p == limit, s["audio_end"], out)
        elif target == "image":
            out = torch.where(body, s["image"], out)
            out = torch.where(p == limit, s["image_end"], out)
        else:
            st = torch.where(p < self.fmt.text_min_tokens, s["text"], s["text_or_end"])
            out = torch.where(body, st, out)
            out = torch.where(p == limit, s["text_end"], out)
        return out

    def target_states(self, labels: torch.Tensor, task: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """State of every labelled position of a batch (``labels [B, L]``, ``task [B]``), in the row-major order
        of ``(labels != ignore_index).nonzero()``: the target's first label is its opening tag (p = -1)."""
        labelled = labels != ignore_index
        rows, cols = labelled.nonzero(as_tuple=True)
        first = labelled.int().argmax(dim=1)
        p = cols - first[rows] - 1
        task_of = task[rows]
        out = torch.full_like(p, self.state["done"])
        for name in TASK_NAMES:
            out = torch.where(task_of == task_index(name), self.states(name, p), out)
        return out

    # -- generation -----------------------------------------------------------------------------------------
    def processor(self, task: str, constrained: bool = True) -> ConstrainedLogitsProcessor:
        return ConstrainedLogitsProcessor(self, task, constrained)

    def generate_kwargs(self, task: str, constrained: bool = True, prompt_ends_open: bool = False) -> dict:
        """Keyword arguments for ``model.generate`` on prompts ending with ``<gen tgt>`` (or its opening tag):
        the processor, the target's close tag as eos, ``<pad>``, and room for the longest target (+1 so that a
        row that reaches the limit still writes its forced close tag). Greedy or sampling only: beams would
        break the shared step count."""
        _, close, _ = self.layout.tags(TASKS[task].target)
        return {
            "logits_processor": LogitsProcessorList([self.processor(task, constrained)]),
            "eos_token_id": close,
            "pad_token_id": self.layout.pad_id,
            "max_new_tokens": (0 if prompt_ends_open else 1) + self.body_limit(task) + 1,
            "num_beams": 1,
        }


class ConstrainedLogitsProcessor(LogitsProcessor):
    """Masks every id the grammar does not allow at this step, for all rows at once.

    One instance per ``generate`` call (it remembers the prompt length and which rows have closed). Prompts are
    left-padded so that all rows are at the same step; they end with ``<gen tgt>`` or all with the opening tag.
    """

    def __init__(self, grammar: TaskGrammar, task: str, constrained: bool = True):
        if task not in TASKS:
            raise ValueError(f"unknown MMPT task {task!r}; tasks are {list(TASKS)}")
        self.grammar, self.task, self.constrained = grammar, task, constrained
        target = TASKS[task].target
        self.open_id, self.close_id, _ = grammar.layout.tags(target)
        self.prompt_len: int | None = None
        self.offset = 1  # body position = generated tokens - offset (1: the opening tag is generated)
        self.closed: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] != self.grammar.layout.vocab_size:
            raise ValueError(
                f"the model scores {scores.shape[-1]} ids but the token space has {self.grammar.layout.vocab_size}"
            )
        s = self.grammar.state
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
            ends_open = input_ids[:, -1] == self.open_id
            n_open = int(ends_open.sum())  # one sync per generate call
            if 0 < n_open < ends_open.numel():
                raise ValueError("prompts must all end with <gen tgt>, or all with the opening tag, not a mix")
            self.offset = 0 if n_open else 1
            self.closed = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            # the state of every body position once per call (-1 = the opening tag .. limit + 1 = done), so that a
            # step indexes it instead of evaluating the grammar: a few tiny ops per token were ~10 % of a step
            if self.constrained:
                positions = torch.arange(-1, self.grammar.body_limit(self.task) + 2, device=scores.device)
                self.steps = self.grammar.states(self.task, positions)
            else:
                self.steps = torch.tensor([s["free"]], device=scores.device)
        t = input_ids.shape[1] - self.prompt_len
        if t > 0:
            self.closed = self.closed | (input_ids[:, -1] == self.close_id)
        step = self.steps[min(t - self.offset + 1, len(self.steps) - 1)] if self.constrained else self.steps[0]
        state = torch.where(self.closed, s["done"], step)
        allowed = self.grammar.table(scores.device)[state]
        scores = torch.nan_to_num(scores, nan=-_FINITE, posinf=_FINITE, neginf=-_FINITE)
        return scores.masked_fill(~allowed, float("-inf"))


def decode_generated(
    layout: MMPTLayout, task: str, generated, fmt: FormatSettings, prompt_ends_open: bool = False
) -> np.ndarray:
    """The checked body of one generated continuation (the ids after the prompt), or :class:`DecodeError`."""
    target = TASKS[task].target
    ids = generated.detach().cpu().numpy() if isinstance(generated, torch.Tensor) else np.asarray(generated)
    if prompt_ends_open:
        ids = np.concatenate([[layout.tags(target)[0]], ids])
    return layout.decode_target(target, ids, fmt)


def decode_batch(
    layout: MMPTLayout, task: str, generated: torch.Tensor, fmt: FormatSettings, prompt_ends_open: bool = False
) -> list[np.ndarray | DecodeError]:
    """:func:`decode_generated` of each row of ``generated [B, T]``: its body, or the error it failed with."""
    out: list[np.ndarray | DecodeError] = []
    for row in generated.detach().cpu():
        try:
            out.append(decode_generated(layout, task, row, fmt, prompt_ends_open))
        except DecodeError as e:
            out.append(e)
    return out


def decode_report(results: Iterable[np.ndarray | DecodeError]) -> dict:
    """Success rate and failures by kind (``codebook_mismatch``, ``missing_end``, ...)."""
    results = list(results)
    errors = Counter(r.kind for r in results if isinstance(r, DecodeError))
    n = len(results)
    return {"n": n, "success_rate": (n - sum(errors.values())) / n if n else float("nan"), "errors": dict(errors)}


def illegal_mass(logits: torch.Tensor, states: torch.Tensor, grammar: TaskGrammar) -> torch.Tensor:
    """Probability outside the allowed set at each position: ``logits [N, V]`` (the model's, teacher-forced),
    ``states [N]`` (:meth:`TaskGrammar.target_states`) -> ``[N]`` in [0, 1], computed in fp32."""
    logits = logits.float()
    allowed = grammar.table(logits.device)[states]
    lse_all = torch.logsumexp(logits, dim=-1)
    lse_ok = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return (-torch.expm1(lse_ok - lse_all)).clamp(min=0.0, max=1.0)


def illegal_mass_by_state(mass: torch.Tensor, states: torch.Tensor, grammar: TaskGrammar) -> dict[str, float]:
    """Mean illegal mass per decoding state present (per audio codebook, image, text, tags)."""
    out: dict[str, float] = {}
    for i, name in enumerate(grammar.state_names):
        sel = states == i
        if bool(sel.any()):
            out[name] = float(mass[sel].mean())
    return out
