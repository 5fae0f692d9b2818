"""4M input/target masking: Dirichlet token budgets and the per-batch plan of which tokens the encoder reads and
which the decoder predicts.

Modalities are fixed-length token sequences of lengths ``L_0 .. L_{K-1}``, laid out concatenated: modality ``k``
occupies positions ``[off_k, off_k + L_k)`` of a sequence of length ``S = sum(L)``. For each sample:

1. a mixture component ``c ~ Categorical(weights)`` (one shared by inputs and targets, like 4M's alpha columns);
2. ``n_in ~ UniformInt[input_tokens_range]`` (inclusive), ``p ~ Dirichlet(input_alphas[c])``,
   ``b_in = floor(p * n_in)``; each of the ``n_in - sum(b_in)`` leftover tokens goes to the argmax of a fresh
   ``Dirichlet(input_alphas[c])`` draw (4M), so the budgets sum to ``n_in`` exactly; then ``b_in = min(b_in, L)``
   (the overflow is dropped, as in 4M, not redistributed);
3. the same for targets with ``n_tg ~ UniformInt[target_tokens_range]``, ``target_alphas[c]`` and the cap
   ``L - b_in``, so inputs and targets never overlap;
4. within each modality a uniformly random subset: the first ``b_in[k]`` tokens of a random order are inputs, the
   next ``b_tg[k]`` targets.

Alpha 0 means "never": the Gamma draws use ``max(alpha, 1e-9)`` like 4M, and zero-alpha modalities are also
excluded outright from the floor split and the leftover argmax, so they get no token, not even with probability
1e-9. A modality missing from a sample (``available[b, k] = False``) gets cap 0 for that sample, inputs and
targets; its budget is dropped like any overflow.

Everything is vectorised over the batch (loops only over modalities and leftover slots) and runs on the CPU
(FourMModule draws a plan per step from a generator seeded by the step). All randomness comes from one
``numpy.random.Generator`` (``rng``), so a plan is a
deterministic function of the generator state. Dirichlet draws are normalised Gamma draws computed in log space
(``Gamma(a) = Gamma(a + 1) * U**(1/a)``), which stays finite for tiny alphas where plain Gamma draws underflow to 0.

Index convention: ``*_valid`` is True for a real token (the nano4M convention, not 4M's "True = ignore").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

MIN_ALPHA = 1e-9  # 4M's clamp; alpha 0 means "never"


@dataclass
class MaskPlan:
    """Which tokens of the concatenated ``[B, S]`` layout the encoder reads and the decoder predicts.

    ``enc_index[b, i]`` is the concatenated position of sample ``b``'s ``i``-th input token, ascending (so ordered by
    modality, then position), padded with index 0 / ``enc_valid`` False up to the batch maximum ``N`` of real input
    tokens. ``dec_index`` / ``dec_valid`` [B, M] are the same for targets. ``b_in`` / ``b_tg`` [B, K] are the
    per-modality budgets; ``n_real_input`` / ``n_real_target`` the real token totals of the batch (python ints).
    """

    enc_index: torch.Tensor
    enc_valid: torch.Tensor
    dec_index: torch.Tensor
    dec_valid: torch.Tensor
    b_in: torch.Tensor
    b_tg: torch.Tensor
    n_real_input: int
    n_real_target: int


@dataclass
class Budgets:
    """One draw of token budgets, numpy arrays over the batch. ``req_*`` are before clamping (they sum to ``n_*``
    per sample); ``b_*`` after clamping to the caps."""

    component: np.ndarray  # [B] mixture component
    n_in: np.ndarray  # [B] requested input tokens
    n_tg: np.ndarray  # [B] requested target tokens
    req_in: np.ndarray  # [B, K]
    req_tg: np.ndarray  # [B, K]
    b_in: np.ndarray  # [B, K]
    b_tg: np.ndarray  # [B, K]


def _check_lengths(lengths: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(int(n) for n in lengths)
    except TypeError as e:
        raise ValueError(f"lengths must be a list of modality lengths, got {lengths!r}") from e
    if not out:
        raise ValueError("lengths is empty: at least one modality is needed")
    if any(n != m for n, m in zip(out, lengths)) or any(n <= 0 for n in out):
        raise ValueError(f"lengths must be positive integers, got {list(lengths)}")
    return out


def _check_alphas(name: str, alphas, k: int) -> np.ndarray:
    """One list of K alphas or a list of K-lists (mixture) -> float array [C, K]."""
    rows = list(alphas) if alphas is not None else []
    if not rows:
        raise ValueError(f"{name} is empty: give {k} alphas or a list of rows of {k} alphas")
    if all(np.isscalar(a) for a in rows):
        rows = [rows]
    elif any(np.isscalar(a) for a in rows):
        raise ValueError(f"{name} mixes numbers and lists: give {k} alphas or a list of rows of {k} alphas")
    out = []
    for i, row in enumerate(rows):
        row = list(row)
        if len(row) != k:
            raise ValueError(f"{name} row {i} has {len(row)} entries but there are {k} modalities")
        try:
            row = np.asarray(row, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} row {i} is not a list of numbers: {list(row)!r}") from e
        if not np.all(np.isfinite(row)) or np.any(row < 0):
            raise ValueError(f"{name} row {i} must be finite and >= 0 (0 means never), got {row.tolist()}")
        if not np.any(row > 0):
            raise ValueError(f"{name} row {i} is all zeros: at least one modality needs a positive alpha")
        out.append(row)
    return np.stack(out)


def _check_range(name: str, rng_: Sequence[int]) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in rng_)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be [min, max] token counts, got {rng_!r}") from e
    if lo < 0 or lo > hi:
        raise ValueError(f"{name} must satisfy 0 <= min <= max, got [{lo}, {hi}]")
    return lo, hi


def _log_dirichlet(alpha: np.ndarray, zero: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unnormalised log of Dirichlet(alpha) draws, one per leading index of ``alpha`` [..., K]; ``-inf`` where
    ``zero`` (alpha 0). Uses Gamma(a) = Gamma(a + 1) * U**(1/a), exact and finite for tiny a."""
    a = np.maximum(alpha, MIN_ALPHA)
    g = rng.standard_gamma(a + 1.0)
    u = 1.0 - rng.random(a.shape)  # (0, 1], so log(u) is finite
    logs = np.log(g) + np.log(u) / a
    return np.where(zero, -np.inf, logs)


def split_budget(alpha: np.ndarray, n: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split ``n[b]`` tokens over K modalities with per-sample alphas ``alpha`` [B, K], 4M style: floor of
    ``Dirichlet(alpha) * n`` plus one leftover token per fresh Dirichlet draw's argmax. Sums to ``n`` exactly."""
    zero = alpha <= 0
    logs = _log_dirichlet(alpha, zero, rng)
    p = np.exp(logs - logs.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    b = np.floor(p * n[:, None]).astype(np.int64)
    left = n - b.sum(axis=1)  # in [0, K-1]: each floor loses < 1
    n_slots = int(left.max()) if left.size else 0
    if n_slots > 0:
        fresh = _log_dirichlet(np.repeat(alpha[:, None, :], n_slots, 1), np.repeat(zero[:, None, :], n_slots, 1), rng)
        winner = fresh.argmax(axis=2)  # [B, R]
        used = np.arange(n_slots)[None, :] < left[:, None]
        for k in range(alpha.shape[1]):
            b[:, k] += ((winner == k) & used).sum(axis=1)
    return b


class DirichletMasking:
    """4M input/target masking sampler for modalities of fixed lengths ``lengths`` (see the module docstring).

    ``input_alphas`` / ``target_alphas``: one list of K alphas, or a mixture (list of rows); a single row is shared
    by every component of the other setting. ``weights``: sampling weights of the components (default uniform).
    ``input_tokens_range`` / ``target_tokens_range``: inclusive [min, max] of the requested token counts; a maximum
    above ``sum(lengths)`` is allowed, its overflow is simply dropped by the clamping. ``token_loss_cap``: optional
    upper bound on the requested target (loss) tokens per sample, ``n_tg = min(n_tg, token_loss_cap)``, which bounds
    the decoder length and logit memory whatever the range.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        input_alphas,
        target_alphas,
        input_tokens_range: Sequence[int],
        target_tokens_range: Sequence[int],
        weights: Sequence[float] | None = None,
        token_loss_cap: int | None = None,
    ):
        self.lengths = _check_lengths(lengths)
        k = len(self.lengths)
        a_in = _check_alphas("input_alphas", input_alphas, k)
        a_tg = _check_alphas("target_alphas", target_alphas, k)
        if len(a_in) != len(a_tg):
            if len(a_in) == 1:
                a_in = np.repeat(a_in, len(a_tg), 0)
            elif len(a_tg) == 1:
                a_tg = np.repeat(a_tg, len(a_in), 0)
            else:
                raise ValueError(
                    f"input_alphas has {len(a_in)} mixture rows but target_alphas has {len(a_tg)}: "
                    "they must match (or one of them be a single row)"
                )
        self.input_alphas, self.target_alphas = a_in, a_tg
        n_comp = len(a_in)
        if weights is None:
            w = np.full(n_comp, 1.0 / n_comp)
        else:
            w = np.asarray(list(weights), dtype=np.float64)
            if w.shape != (n_comp,):
                raise ValueError(f"weights has {w.size} entries but there are {n_comp} mixture components")
            if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w.tolist()}")
            w = w / w.sum()
        self.weights = w
        cdf = np.cumsum(w)
        cdf[np.flatnonzero(w > 0)[-1] :] = 1.0  # u in [0, 1) never lands on a trailing zero-weight component
        self._cdf = cdf
        self.input_tokens_range = _check_range("input_tokens_range", input_tokens_range)
        self.target_tokens_range = _check_range("target_tokens_range", target_tokens_range)
        if token_loss_cap is not None and (int(token_loss_cap) != token_loss_cap or token_loss_cap < 1):
            raise ValueError(f"token_loss_cap must be a positive integer or None, got {token_loss_cap!r}")
        self.token_loss_cap = None if token_loss_cap is None else int(token_loss_cap)

        self._lengths_np = np.asarray(self.lengths, dtype=np.int64)
        self._offsets_np = np.concatenate([[0], np.cumsum(self._lengths_np)[:-1]]).astype(np.int64)
        self._segment_np = np.repeat(np.arange(k), self._lengths_np)

    # layout -------------------------------------------------------------------------------------------------
    @property
    def num_modalities(self) -> int:
        return len(self.lengths)

    @property
    def seq_len(self) -> int:
        return int(self._lengths_np.sum())

    @property
    def offsets(self) -> torch.Tensor:
        """[K] long: start of each modality in the concatenated layout (exclusive cumsum of the lengths)."""
        return torch.from_numpy(self._offsets_np.copy())

    @property
    def segment_ids(self) -> torch.Tensor:
        """[S] long: modality id of each concatenated position."""
        return torch.from_numpy(self._segment_np.copy())

    @property
    def positions(self) -> torch.Tensor:
        """[S] long: position of each concatenated position within its modality."""
        return torch.from_numpy(np.arange(self.seq_len) - self._offsets_np[self._segment_np])

    # budgets ------------------------------------------------------------------------------------------------
    def _check_available(self, available, batch_size: int) -> np.ndarray:
        if available is None:
            return np.ones((batch_size, self.num_modalities), dtype=bool)
        if isinstance(available, torch.Tensor):
            available = available.detach().cpu().numpy()
        available = np.asarray(available, dtype=bool)
        if available.shape != (batch_size, self.num_modalities):
            raise ValueError(
                f"available has shape {tuple(available.shape)}, expected [batch_size, modalities] = "
                f"[{batch_size}, {self.num_modalities}]"
            )
        return available

    def draw_budgets(self, batch_size: int, rng: np.random.Generator, available=None) -> Budgets:
        """Budgets for a batch, with the requested (pre-clamp) split kept for inspection."""
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng)}")
        avail = self._check_available(available, batch_size)
        comp = np.searchsorted(self._cdf, rng.random(batch_size), side="right")
        comp = np.minimum(comp, len(self._cdf) - 1)
        lo, hi = self.input_tokens_range
        n_in = rng.integers(lo, hi + 1, size=batch_size)
        req_in = split_budget(self.input_alphas[comp], n_in, rng)
        b_in = np.minimum(req_in, self._lengths_np * avail)
        lo, hi = self.target_tokens_range
        n_tg = rng.integers(lo, hi + 1, size=batch_size)
        if self.token_loss_cap is not None:
            n_tg = np.minimum(n_tg, self.token_loss_cap)
        req_tg = split_budget(self.target_alphas[comp], n_tg, rng)
        b_tg = np.minimum(req_tg, (self._lengths_np - b_in) * avail)
        return Budgets(comp, n_in, n_tg, req_in, req_tg, b_in, b_tg)

    def sample_budgets(self, batch_size: int, rng: np.random.Generator, available=None):
        """``(b_in, b_tg)``, long tensors [B, K], clamped to the caps."""
        b = self.draw_budgets(batch_size, rng, available)
        return torch.from_numpy(b.b_in), torch.from_numpy(b.b_tg)

    # plan ---------------------------------------------------------------------------------------------------
    def __call__(self, batch_size: int, rng: np.random.Generator, available=None) -> MaskPlan:
        b = self.draw_budgets(batch_size, rng, available)
        seg = self._segment_np
        # rank of each token within its modality under a uniform random order: scores + 2*segment sort by
        # modality first, so sorted slot j belongs to modality seg[j] and has rank j - off[seg[j]]
        order = np.argsort(rng.random((batch_size, self.seq_len)) + 2.0 * seg, axis=1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(self.seq_len) - self._offsets_np[seg], order.shape), 1)
        first_tg = b.b_in[:, seg]
        is_in = rank < first_tg
        is_tg = (rank >= first_tg) & (rank < first_tg + b.b_tg[:, seg])
        enc_index, enc_valid = _gather_positions(is_in)
        dec_index, dec_valid = _gather_positions(is_tg)
        return MaskPlan(
            enc_index,
            enc_valid,
            dec_index,
            dec_valid,
            torch.from_numpy(b.b_in),
            torch.from_numpy(b.b_tg),
            int(b.b_in.sum()),
            int(b.b_tg.sum()),
        )

    def fixed_plan(self, batch_size: int, input_modalities: Sequence[int], target_modalities: Sequence[int]):
        """See :func:`fixed_plan`."""
        return fixed_plan(self.lengths, batch_size, input_modalities, target_modalities)


def _gather_positions(mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending positions of the True entries of each row of ``mask`` [B, S], padded to the batch maximum."""
    count = mask.sum(axis=1)
    width = int(count.max())
    index = np.argsort(~mask, axis=1, kind="stable")[:, :width]  # True entries first, in ascending order
    valid = np.arange(width)[None, :] < count[:, None]
    return torch.from_numpy(np.where(valid, index, 0).astype(np.int64)), torch.from_numpy(valid)


def fixed_plan(
    lengths: Sequence[int], batch_size: int, input_modalities: Sequence[int], target_modalities: Sequence[int]
) -> MaskPlan:
    """Evaluation plan: every token of ``input_modalities`` is an input, every token of ``target_modalities`` a
    target (modality indices into ``lengths``; e.g. tok_rgb -> coords is ``([0], [1])``)."""
    lengths = _check_lengths(lengths)
    k = len(lengths)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    for name, mods in (("input_modalities", input_modalities), ("target_modalities", target_modalities)):
        bad = [m for m in mods if int(m) != m or not 0 <= m < k]
        if bad:
            raise ValueError(f"{name} has modality indices {bad} outside [0, {k})")
        if len(set(mods)) != len(mods):
            raise ValueError(f"{name} repeats a modality: {list(mods)}")
    both = sorted(set(input_modalities) & set(target_modalities))
    if both:
        raise ValueError(f"modalities {both} are both input and target")
    length = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(length)[:-1]])

    def side(mods):
        pos = [np.arange(offsets[m], offsets[m] + length[m]) for m in sorted(int(m) for m in mods)]
        pos = np.concatenate(pos) if pos else np.zeros(0, dtype=np.int64)
        budget = np.zeros(k, dtype=np.int64)
        budget[list(int(m) for m in mods)] = length[list(int(m) for m in mods)]
        index = torch.from_numpy(np.tile(pos, (batch_size, 1)))
        return index, torch.ones_like(index, dtype=torch.bool), torch.from_numpy(np.tile(budget, (batch_size, 1)))

    enc_index, enc_valid, b_in = side(input_modalities)
    dec_index, dec_valid, b_tg = side(target_modalities)
    return MaskPlan(enc_index, enc_valid, dec_index, dec_valid, b_in, b_tg, int(b_in.sum()), int(b_tg.sum()))
