"""The 4M family's modality registry: what a modality of each kind means to the model and to the module.

A modality is one entry of ``model.modalities`` (``conf/modalities/*.yaml``): ``name``, ``kind``, ``range``,
``vocab`` (its local ids ``0..vocab-1``), ``length``, optionally ``share_with`` (use an earlier modality's token
table) and its kind's own keys. :func:`build` turns each entry into an instance of the class that :data:`KINDS`
names for its ``kind``; the model (:class:`~mmsuite.lightning_modules.fourm.model.FourM`) and the module loop over
these and ask each one, never a kind string:

=====================  ======================================  =============================================
                       model                                   module (training and evaluation)
=====================  ======================================  =============================================
:class:`Modality`      plain token table, no fixed positions   summed cross-entropy, argmax decoding
``image``              FSQ-factorised table (``levels``),      PSNR of the decoded frame (with an image
                       2-D sin-cos over ``grid``               tokenizer)
``pose``               learned joint + axis positions,         ordinal soft targets (``pose_sigma_bins``),
                       ordinal init of the bins' rows          decoding within each slot's kind, joint errors
``seq``                1-D sin-cos                             (base)
=====================  ======================================  =============================================

Adding a kind is one subclass of :class:`Modality` and one entry in :data:`KINDS`. Output heads are the same for
every kind (tied to the token table, or one linear layer per modality: the model's ``tie_heads``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmsuite.lightning_modules.fourm.generate import pose_constraint
from mmsuite.nn.transformer import sincos_1d, sincos_2d, sincos_at

POSE_COMPONENTS = 3  # x, y, visibility per joint
POSE_FLAGS = 3  # a pose vocabulary is its bins followed by <invisible> <visible> <na> (tokenizers/pose.py)


class FactorisedEmbedding(nn.Module):
    """Embedding of FSQ codes: the sum of one small table per FSQ channel, indexed by that channel's digit of
    the code, plus a per-code residual table that starts at zero.

    An FSQ code is a mixed-radix number (``code = sum_i digit_i * prod(levels[:i])``, as the image tokenizer's
    ``FSQ.codes_to_indices``), and codes with equal digits describe similar patches. A plain table of 4096 rows
    learns each code on its own, from ~1/4096 of the data; here each of the 8-row digit tables learns from all
    of it, so similar codes start alike. Tied logits then score a code as the sum of its digits' scores (and
    the residual). Duck-types :class:`torch.nn.Embedding`: ``weight`` is the full ``[codes, dim]`` table."""

    def __init__(self, levels: Sequence[int], dim: int):
        super().__init__()
        self.levels = [int(v) for v in levels]
        if not self.levels or any(v < 2 for v in self.levels):
            raise ValueError(f"FSQ levels must be integers >= 2, got {list(levels)}")
        self.num_embeddings = int(torch.tensor(self.levels).prod())
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1]), 0)
        codes = torch.arange(self.num_embeddings)
        digits = (codes[:, None] // basis[None]) % torch.tensor(self.levels)[None]
        self.register_buffer("digits", digits, persistent=False)  # [codes, channels]
        self.register_buffer("starts", torch.cumsum(torch.tensor([0] + self.levels[:-1]), 0), persistent=False)
        self.digit_emb = nn.Embedding(sum(self.levels), dim)
        self.residual = nn.Embedding(self.num_embeddings, dim)

    def reset_parameters(self) -> None:
        # the sum over channels has unit scale, like every other embedding of the model
        nn.init.normal_(self.digit_emb.weight, std=len(self.levels) ** -0.5)
        nn.init.zeros_(self.residual.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The full ``[codes, dim]`` table (:class:`_AssembleCodeTable`): O(codes x dim) work forward and backward,
        like reading a plain table, with one table-sized tensor each way. Equal to :meth:`forward` of every code
        (tested)."""
        return _AssembleCodeTable.apply(self.digit_emb.weight, self.residual.weight, tuple(self.levels))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.digit_emb(self.digits[ids] + self.starts).sum(-2) + self.residual(ids)


class _AssembleCodeTable(torch.autograd.Function):
    """Rows of every FSQ code: ``digit rows (one per channel, summed) + residual``. Hand-written (autograd of the
    broadcast sums allocates a table-sized tensor per stage and copies the residual's gradient); here channel 0
    varies fastest in a code, so the table is the last channel's rows broadcast-added to the (5x smaller) table of
    the channels before it, written once into one new tensor, and the backward hands the table's gradient to the
    residual as is and reduces it channel by channel (the last channel's rows sum over the others, and so on)."""

    @staticmethod
    def forward(ctx, digit_weight: torch.Tensor, residual: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
        ctx.levels = levels
        rows = digit_weight.split(levels)
        prefix = rows[0]
        for r in rows[1:-1]:
            prefix = (r[:, None] + prefix[None]).flatten(0, 1)
        if len(rows) == 1:
            return prefix + residual
        out = torch.add(residual.view(levels[-1], -1, residual.shape[-1]), rows[-1][:, None])
        return out.add_(prefix[None]).flatten(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_digits = None
        if ctx.needs_input_grad[0]:
            parts, g = [], grad
            for n in reversed(ctx.levels[1:]):
                g = g.view(n, -1, g.shape[-1])
                parts.append(g.sum(1))
                g = g.sum(0)
            grad_digits = torch.cat([g, *reversed(parts)])
        return grad_digits, grad if ctx.needs_input_grad[1] else None, None


class Modality:
    """One modality: its config entry checked, and what the model and the module do with it. The base class is a
    plain token sequence with no position embedding of its own (subclasses add them)."""

    kind = "base"
    grid: tuple[int, int] | None = None  # the token grid (rows, columns) of image-like kinds

    def __init__(self, spec: Mapping):
        self.spec = dict(spec)
        self.name = str(spec["name"])
        self.vocab, self.length = int(spec["vocab"]), int(spec["length"])
        self.share_with = spec.get("share_with")

    # -- the model ------------------------------------------------------------------------------------------
    def embedding(self, dim: int, image_embedding: str) -> nn.Module:
        """A new token table (a modality with ``share_with`` uses the named modality's instead)."""
        return nn.Embedding(self.vocab, dim)

    def fixed_positions(self, dim: int) -> torch.Tensor:
        """Fixed position embedding of each of its positions, ``[length, dim]``."""
        return torch.zeros(self.length, dim)

    def pose_slots(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(joint [length], component [length])`` ids into the model's learned joint and axis tables, or None."""
        return None

    def init_embedding(self, table: nn.Module, dim: int, scale: float, bin_frame: str, grid: int | None) -> None:
        """Start its (own, unshared) token table from a structured init; ``scale`` 0 keeps the random one."""

    # -- the module ----------------------------------------------------------------------------------------
    def cross_entropy(self, module, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of ``logits [n, vocab]`` against local ids ``target [n]``."""
        return F.cross_entropy(logits, target, reduction="sum")

    def pick(self, module, logits: torch.Tensor) -> torch.Tensor:
        """Local ids ``[B, length]`` from one-pass logits ``[B, length, vocab]``."""
        return logits.argmax(-1)

    def constraint(self, module):
        """The generation hook that restricts each slot's ids (:data:`.generate.Constraint`), or None."""
        return None

    def metric_names(self, task: dict) -> list[str]:
        """The metrics :meth:`evaluate` adds for ``task``, without the ``{split}/{task name}/`` prefix."""
        return []

    def evaluate(self, module, task: dict, pred: torch.Tensor, truth: torch.Tensor, tokens: torch.Tensor) -> None:
        """Accumulate its own metrics of a fixed-input task (``pred`` / ``truth``: local ids ``[B, length]``)."""


class ImageModality(Modality):
    """Image tokens on a ``grid: [rows, columns]`` (``length`` = rows x columns), raster order; FSQ ``levels`` (on
    the modality that owns the table) allow the factorised code embedding (``model.net.image_embedding``)."""

    kind = "image"

    def __init__(self, spec: Mapping):
        super().__init__(spec)
        self.grid = (int(spec["grid"][0]), int(spec["grid"][1]))
        if self.grid[0] * self.grid[1] != self.length:
            raise ValueError(f"modality {self.name!r}: grid {list(spec['grid'])} does not hold length {self.length}")
        self.levels = spec.get("levels")

    def embedding(self, dim: int, image_embedding: str) -> nn.Module:
        if image_embedding != "factorised" or not self.levels:
            return super().embedding(dim, image_embedding)
        table = FactorisedEmbedding(self.levels, dim)
        if table.num_embeddings != self.vocab:
            raise ValueError(
                f"modality {self.name!r}: FSQ levels {list(self.levels)} make {table.num_embeddings} codes, "
                f"but its vocab is {self.vocab}"
            )
        return table

    def fixed_positions(self, dim: int) -> torch.Tensor:
        return sincos_2d(*self.grid, dim)

    def metric_names(self, task) -> list[str]:
        return ["psnr_db"] + (["baseline_psnr_db"] if task.get("baseline") == "copy" else [])

    def evaluate(self, module, task, pred, truth, tokens) -> None:
        module._frame_psnr(task, self, pred, truth, tokens)


class PoseModality(Modality):
    """A pose: ``length / 3`` joints of ``(x, y, visibility)`` tokens; vocab = coordinate bins + 3 flags
    (:mod:`mmsuite.tokenizers.pose`). Positions are learned joint and axis embeddings (shared by every pose)."""

    kind = "pose"

    def __init__(self, spec: Mapping):
        super().__init__(spec)
        if self.length % POSE_COMPONENTS:
            raise ValueError(f"modality {self.name!r}: a pose has 3 tokens per joint, length {self.length}")

    def pose_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(self.length)
        return idx // POSE_COMPONENTS, idx % POSE_COMPONENTS

    def init_embedding(self, table, dim, scale, bin_frame, grid) -> None:
        """Bins start as ``scale`` x sin-cos of their value, so neighbouring bins start alike. ``bin_frame:
        image``: of the bin's canvas coordinate in image-grid cells (``grid`` columns), as the frame's 2-D sin-cos
        encodes a cell (rows in the first half of the channels, columns in the second): a bin serves x and y
        slots, so it takes the same features in both halves."""
        if scale <= 0:
            return
        n_bins = self.vocab - POSE_FLAGS
        if bin_frame == "image" and grid is not None and dim % 4 == 0:
            u = (torch.arange(n_bins, dtype=torch.float64) + 0.5) / n_bins * grid - 0.5
            half = sincos_at(u, dim // 2)
            rows = torch.cat([half, half], dim=1)
        else:
            rows = sincos_1d(n_bins, dim)
        with torch.no_grad():
            table.weight[:n_bins] = rows * scale

    def cross_entropy(self, module, logits, target) -> torch.Tensor:
        """Summed CE; with ``pose_sigma_bins`` > 0 the bins get ordinal soft targets: a Gaussian over the
        neighbouring bins (flags stay one-hot), so a near miss costs less than a far one."""
        sigma = module.pose_sigma
        if sigma <= 0:
            return super().cross_entropy(module, logits, target)
        bins = module.pose.bins
        is_bin = target < bins
        grid = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
        q = torch.exp(-0.5 * ((grid[None] - target[:, None].float()) / sigma) ** 2) * (grid[None] < bins)
        q = torch.where(is_bin[:, None], q / q.sum(-1, keepdim=True), F.one_hot(target, logits.shape[-1]).float())
        return -(q * logits.log_softmax(-1)).sum()

    def pick(self, module, logits) -> torch.Tensor:
        """Within each slot's kind: x/y -> a bin or NA, visibility -> a flag (``model.pose_decode``)."""
        return module.pose.pick(logits, module.pose_decode)

    def constraint(self, module):
        return pose_constraint(module.pose)

    def metric_names(self, task) -> list[str]:
        return ["joint_error_px", "pck@0.1"] + (["baseline_error_px"] if task.get("baseline") is not None else [])

    def evaluate(self, module, task, pred, truth, tokens) -> None:
        module._pose_task(task, pred, truth, tokens)


class SeqModality(Modality):
    """A fixed-length token sequence (a padded caption, flattened audio codes) with 1-D sin-cos positions."""

    kind = "seq"

    def fixed_positions(self, dim: int) -> torch.Tensor:
        return sincos_1d(self.length, dim)


KINDS: dict[str, type[Modality]] = {"image": ImageModality, "pose": PoseModality, "seq": SeqModality}


def build(specs: Sequence[Mapping]) -> list[Modality]:
    """The modalities of config entries ``specs``, in order (names unique, kinds known, shares checked later by
    the model)."""
    names = [spec["name"] for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"modality names must be unique, got {names}")
    out = []
    for spec in specs:
        kind = spec.get("kind")
        if kind not in KINDS:
            raise ValueError(f"modality {spec['name']!r}: kind must be one of {tuple(KINDS)}, got {kind!r}")
        out.append(KINDS[kind](spec))
    return out
