"""Batched iterative generation for :class:`~mmsuite.lightning_modules.fourm.model.FourM` (4M's MaskGIT and ROAR).

State is a pair ``(tokens [B, S] local ids, known bool [B, S])`` in the model's concatenated layout: ``known`` marks
the positions whose tokens are given or already generated; the tokens at the other positions are never read.
:func:`generate` fills every still-unknown position of one target modality in ``steps`` steps. Each step

* the encoder reads every currently known token of every modality (re-encoded each step, no cache);
* the decoder queries the still-unknown target positions: all of them (``maskgit``) or only a random subset of
  this step's size (``roar``, random-order autoregressive);
* logits -> optional per-slot constraint -> temperature -> top-k / top-p -> sample;
* MaskGIT writes the ``k`` sampled tokens with the highest probability of their sampled id (4M's confidence, no
  Gumbel noise) and re-masks the rest; ROAR writes all of its chosen positions.

Given tokens are never re-predicted or changed, and only ids below the target's vocabulary can be emitted. Every
row of the batch has its own token schedule (rows may have different numbers of unknown target tokens, e.g. a
partially given pose). Nothing is modified in place: the caller's tensors are cloned, and the sampling helpers
return new tensors (4M's ``top_k_top_p_filtering`` writes into its input, see research note d.13).

:func:`generate_chain` runs :func:`generate` for several targets in order; each finished modality is input to
the next (current frame -> pose -> next pose -> next frame). Classifier-free guidance is not implemented.

The net's train/eval mode is left as it is (FourM has no dropout or batch norm); everything runs under
``torch.no_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from mmsuite.lightning_modules.fourm.masking import MaskPlan

SCHEMES = ("maskgit", "roar")
TOKEN_SCHEDULES = ("cosine", "linear")
TEMPERATURE_SCHEDULES = ("linear", "constant")

# constrain(logits [n, V], slot [n] position within the target modality) -> logits [n, V] (a new tensor)
Constraint = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# on_step(step, tokens [B, S], known [B, S]) after each step
StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]


# -- plans --------------------------------------------------------------------------------------------------
def _positions(mask: torch.Tensor, min_width: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending positions of the True entries of each row of ``mask [B, S]``, padded (index 0, valid False) to the
    batch maximum, at least ``min_width`` wide (so a batch without any entry still gives a well-formed plan)."""
    count = mask.sum(1)
    width = max(int(count.max()) if mask.numel() else 0, min_width)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # True entries first, in ascending order
    if order.shape[1] < width:
        order = torch.cat([order, order.new_zeros(order.shape[0], width - order.shape[1])], 1)
    valid = torch.arange(width, device=mask.device)[None, :] < count[:, None]
    return torch.where(valid, order[:, :width], 0), valid


def plan_from_known(
    known: torch.Tensor, targets: torch.Tensor, segment: torch.Tensor, num_modalities: int | None = None
) -> MaskPlan:
    """A :class:`MaskPlan` whose encoder reads the ``known`` positions and whose decoder queries the ``targets``
    (both bool ``[B, S]``, disjoint), in masking.py's format. ``segment [S]`` is the modality id of each position
    (``net.segment``); it gives the per-modality budgets ``b_in`` / ``b_tg`` ``[B, K]``."""
    if known.dtype != torch.bool or targets.dtype != torch.bool:
        raise TypeError(f"known and targets must be bool tensors, got {known.dtype} and {targets.dtype}")
    if known.ndim != 2 or known.shape != targets.shape:
        raise ValueError(f"known and targets must both be [B, S], got {tuple(known.shape)} and {tuple(targets.shape)}")
    if segment.shape != known.shape[1:]:
        raise ValueError(f"segment must be [S] = [{known.shape[1]}], got {tuple(segment.shape)}")
    if bool((known & targets).any()):
        raise ValueError("known and targets overlap: a known position cannot also be a decoder target")
    segment = segment.to(known.device)
    k = int(segment.max()) + 1 if num_modalities is None else int(num_modalities)
    seg = segment[None, :].expand_as(known)

    def budget(mask):
        return torch.zeros(known.shape[0], k, dtype=torch.long, device=known.device).scatter_add_(1, seg, mask.long())

    enc_index, enc_valid = _positions(known)
    dec_index, dec_valid = _positions(targets)
    return MaskPlan(
        enc_index, enc_valid, dec_index, dec_valid, budget(known), budget(targets), int(known.sum()), int(targets.sum())
    )


# -- sampling helpers -----------------------------------------------------------------------------------------
def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering over the last dim; filtered entries become -inf. Returns a NEW tensor
    (the input is never modified). ``top_k``: keep the ``k`` largest (ties at the k-th value are kept too);
    ``top_p`` in (0, 1]: keep the smallest prefix of the sorted distribution whose mass reaches ``p`` (the most
    likely id is always kept). ``None`` / 0 (top_k) / 1.0 (top_p) disable a filter."""
    out = logits.clone()
    neg = torch.tensor(float("-inf"), dtype=out.dtype, device=out.device)
    if top_k is not None and top_k != 0:
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        k = min(int(top_k), out.shape[-1])
        kth = out.topk(k, dim=-1).values[..., -1:]
        out = torch.where(out < kth, neg, out)
    if top_p is not None and top_p < 1.0:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        srt, idx = out.sort(dim=-1, descending=True)
        probs = srt.float().softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # the mass before this id already reaches p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        out = torch.where(drop, neg, out)
    return out


def sample(
    logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one id per row of ``logits [..., V]`` -> ``(ids [...] long, prob [...] float)``, ``prob`` being the
    probability of the sampled id under the tempered distribution (MaskGIT's confidence). ``temperature`` 0 is
    argmax (``prob`` then under the untempered distribution). Rows need at least one finite logit."""
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
    flat = logits.reshape(-1, logits.shape[-1]).float()
    if flat.shape[0] and not bool(torch.isfinite(flat).any(-1).all()):
        raise ValueError("sample: a row has no finite logit (every id filtered out or constrained away)")
    if temperature == 0:
        probs = flat.softmax(-1)
        ids = flat.argmax(-1)
    else:
        probs = (flat / temperature).softmax(-1)
        ids = torch.multinomial(probs, 1, generator=generator)[:, 0] if flat.shape[0] else flat.new_zeros(0).long()
    prob = probs.gather(1, ids[:, None])[:, 0]
    return ids.reshape(logits.shape[:-1]), prob.reshape(logits.shape[:-1])


def tokens_per_step(n_tokens: int, steps: int, schedule: str = "cosine") -> list[int]:
    """How many tokens each of ``steps`` steps decodes: ints summing exactly to ``n_tokens``, each >= 1 when
    ``steps <= n_tokens`` (with more steps than tokens some steps decode none).

    ``cosine`` (4M): differences of the cosine curve ``(1 - cos(pi t / steps)) / 2``, few tokens in the first and
    last steps and most in the middle; ``linear``: an equal split (the larger parts first, as 4M). When every step
    gets at least one token, the curve splits only the tokens beyond that one per step."""
    if int(n_tokens) != n_tokens or n_tokens < 0:
        raise ValueError(f"n_tokens must be an integer >= 0, got {n_tokens!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if schedule not in TOKEN_SCHEDULES:
        raise ValueError(f"token schedule must be one of {TOKEN_SCHEDULES}, got {schedule!r}")
    n_tokens, steps = int(n_tokens), int(steps)
    base = 1 if steps <= n_tokens else 0
    rest = n_tokens - base * steps
    if schedule == "linear":
        q, r = divmod(rest, steps)
        return [base + q + (1 if i < r else 0) for i in range(steps)]
    cum = [round(rest * (1.0 - math.cos(math.pi * t / steps)) / 2.0) for t in range(steps + 1)]
    cum[-1] = rest
    return [base + b - a for a, b in zip(cum[:-1], cum[1:])]


def temperature_at(step: int, steps: int, start: float, end: float | None = None, schedule: str = "linear") -> float:
    """Temperature of step ``step`` (0-based) of ``steps``: ``linear`` goes from ``start`` (first step) to ``end``
    (last step); ``constant`` (or ``end`` None) is ``start`` throughout."""
    if schedule not in TEMPERATURE_SCHEDULES:
        raise ValueError(f"temperature schedule must be one of {TEMPERATURE_SCHEDULES}, got {schedule!r}")
    if not 0 <= step < steps:
        raise ValueError(f"step must be in [0, {steps}), got {step!r}")
    if schedule == "constant" or end is None or steps == 1:
        return float(start)
    return float(start + (end - start) * step / (steps - 1))


def slot_constraint(allowed: torch.Tensor) -> Constraint:
    """A ``constrain`` hook from a bool table ``allowed [L, V]`` (which ids slot ``i`` of the modality may hold)."""

    def constrain(logits: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        mask = allowed.to(logits.device)[slot]
        if mask.shape[-1] != logits.shape[-1]:
            raise ValueError(f"constraint table has {mask.shape[-1]} ids but the target vocab is {logits.shape[-1]}")
        return logits.masked_fill(~mask, float("-inf"))

    return constrain


def pose_constraint(quantizer) -> Constraint:
    """The ``constrain`` hook of a :class:`~mmsuite.tokenizers.pose.PoseQuantizer` (x/y slots: a bin or NA; v slots:
    INVISIBLE or VISIBLE), for a pose modality of ``3 * n_joints`` tokens and vocab ``quantizer.vocab_size``."""
    return slot_constraint(quantizer.slot_mask())


# -- generation -----------------------------------------------------------------------------------------------
def _check_state(net, tokens: torch.Tensor, known: torch.Tensor) -> None:
    s = net.seq_len
    if tokens.ndim != 2 or tokens.shape[1] != s:
        raise ValueError(
            f"tokens must be [B, S] = [B, {s}] (the model's concatenated layout), got {tuple(tokens.shape)}"
        )
    if known.shape != tokens.shape or known.dtype != torch.bool:
        raise ValueError(
            f"known must be a bool tensor shaped like tokens {tuple(tokens.shape)}, got {known.dtype} "
            f"{tuple(known.shape)}"
        )


def _schedule_table(remaining: torch.Tensor, steps: int, schedule: str) -> torch.Tensor:
    """Per-row tokens per step ``[B, steps]`` for rows with ``remaining [B]`` unknown target tokens."""
    table = torch.zeros(remaining.shape[0], steps, dtype=torch.long)
    rem = remaining.cpu()
    for n in rem.unique().tolist():
        table[rem == n] = torch.tensor(tokens_per_step(int(n), steps, schedule))
    return table.to(remaining.device)


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry of each row of ``scores`` in descending order (0 = largest)."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    return rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order).contiguous())


@torch.no_grad()
def generate(
    net,
    tokens: torch.Tensor,
    known: torch.Tensor,
    target: str,
    steps: int = 8,
    scheme: str = "maskgit",
    temperature: float = 1.0,
    temperature_end: float | None = None,
    temperature_schedule: str = "linear",
    top_k: int | None = None,
    top_p: float | None = None,
    schedule: str = "cosine",
    generator: torch.Generator | None = None,
    constrain: Constraint | None = None,
    on_step: StepHook | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill every unknown position of modality ``target`` -> new ``(tokens, known)``; see the module docstring.

    ``tokens [B, S]`` local ids, ``known [B, S]`` bool (given positions, any modality, the target included).
    ``temperature`` .. ``temperature_end`` over the steps (``temperature_schedule`` linear / constant; end None =
    constant); ``top_k`` / ``top_p``: :func:`filter_logits`; ``schedule``: :func:`tokens_per_step` (per row, over
    that row's unknown target tokens); ``generator``: the torch RNG for sampling and ROAR's order (on the tokens'
    device); ``constrain(logits [n, V], slot [n]) -> logits``: optional per-slot mask, ``slot`` being positions
    within the target modality (e.g. :func:`pose_constraint`); ``on_step(step, tokens, known)`` after each step.
    """
    _check_state(net, tokens, known)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    k = net.index(target)
    vocab, offset = net.vocabs[k], net.offsets[k]
    segment = net.segment.to(tokens.device)
    tokens, known = tokens.clone(), known.clone()
    in_target = (segment == k)[None, :].expand_as(known)
    table = _schedule_table((in_target & ~known).sum(1), steps, schedule)

    for step in range(steps):
        unknown = in_target & ~known
        n_step = torch.minimum(table[:, step], unknown.sum(1))  # [B]
        if not bool((n_step > 0).any()):
            continue
        if scheme == "roar":  # a random subset of n_step unknown target positions per row
            scores = torch.rand(unknown.shape, generator=generator, device=tokens.device)
            scores = torch.where(unknown, scores, -1.0)
            query = unknown & (_rank(scores) < n_step[:, None])
        else:  # every unknown target position of the rows that decode this step
            query = unknown & (n_step > 0)[:, None]
        plan = plan_from_known(known, query, segment, len(net.names))
        logits = net.predict_logits(tokens, plan)[..., :vocab]  # [B, M, V]
        valid = plan.dec_valid
        flat = logits[valid]  # [n, V], rows in (batch, ascending position) order
        if constrain is not None:
            flat = constrain(flat, plan.dec_index[valid] - offset)
        t = temperature_at(step, steps, temperature, temperature_end, temperature_schedule)
        ids, prob = sample(filter_logits(flat, top_k, top_p), t, generator)
        if bool((ids >= vocab).any()):  # unreachable for well-formed logits; guards a bad constrain hook
            raise RuntimeError(f"sampled an id >= the vocab {vocab} of {target!r}")
        dec_ids = torch.zeros(valid.shape, dtype=tokens.dtype, device=tokens.device)
        dec_ids[valid] = ids.to(tokens.dtype)
        write = valid.clone()
        if scheme == "maskgit":  # keep the n_step most confident samples of each row
            conf = torch.full(valid.shape, float("-inf"), device=tokens.device)
            conf[valid] = prob
            write = valid & (_rank(conf) < n_step[:, None])
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(write)
        pos = plan.dec_index[write]
        tokens[rows[write], pos] = dec_ids[write]
        known[rows[write], pos] = True
        if on_step is not None:
            on_step(step, tokens.clone(), known.clone())
    return tokens, known


def generate_chain(
    net,
    tokens: torch.Tensor,
    known: torch.Tensor,
    targets: Sequence[str | dict],
    on_target: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
    **defaults,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :func:`generate` for each target in order; each finished modality is input to the next ones.

    ``targets``: modality names, or dicts ``{"target": name, **settings}`` overriding ``defaults`` (any keyword of
    :func:`generate`: steps, scheme, temperature, constrain, ...) for that target. ``on_target(name, tokens, known)``
    is called after each target. Returns new ``(tokens, known)``."""
    _check_state(net, tokens, known)
    for i, spec in enumerate(targets):
        if isinstance(spec, str):
            settings = dict(defaults, target=spec)
        elif isinstance(spec, dict) and "target" in spec:
            settings = {**defaults, **spec}
        else:
            raise ValueError(f"targets[{i}] must be a modality name or a dict with a 'target' key, got {spec!r}")
        tokens, known = generate(net, tokens, known, **settings)
        if on_target is not None:
            on_target(settings["target"], tokens.clone(), known.clone())
    return tokens, known
