"""Pose quantiser: a 13-joint skeleton as 39 tokens ``(x, y, v)`` per joint.

Local ids (before the token-space offset):

* ``0 .. bins-1``: coordinate bins. A coordinate ``c`` in canvas pixels ``[0, canvas)`` goes to bin
  ``floor(c / canvas * bins)`` and comes back at the bin centre ``(bin + 0.5) * canvas / bins``, so the
  round-trip error is at most half a bin and has no systematic offset.
* ``bins`` = :attr:`PoseQuantizer.INVISIBLE`, ``bins + 1`` = :attr:`PoseQuantizer.VISIBLE`: the ``v`` token.
* ``bins + 2`` = :attr:`PoseQuantizer.NA`: the ``x`` and ``y`` of a joint that is not available (NaN, outside
  the canvas, or marked so by the caller); such a joint's ``v`` token is ``INVISIBLE``.

Flags lie after every bin, so they can never collide with a coordinate. Joints are ``(x, y) = (column, row)``
positions in the toy world's pixel convention (pixel centres at integer + 0.5; inside iff ``0 <= c < size``).

In the token space the quantiser takes two adjacent ranges (:meth:`PoseQuantizer.token_ranges`):
``<prefix>_bins`` (``bins`` ids) and right after it ``<prefix>_flags`` (the three named flag tokens), so that
``local id = global id - start of <prefix>_bins`` for bins and flags alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmsuite.settings import setting
from mmsuite.tokenizers.token_space import TokenSpace

N_JOINTS = 13
FLAG_NAMES = ("invisible", "visible", "na")  # in local-id order after the bins


@dataclass
class PoseSettings:
    """The config's ``pose`` block (an experiment's, read by its model and data): bins per axis over the canvas."""

    bins: int = setting(ge=1)
    canvas: int = setting(ge=1)

    def build(self) -> PoseQuantizer:
        return PoseQuantizer(bins=self.bins, canvas=self.canvas)


class PoseQuantizer:
    """Quantise ``[N, n_joints, 2]`` pixel joints on a ``canvas``-pixel square into ``[N, 3 * n_joints]`` ids."""

    def __init__(self, bins: int = 8192, canvas: int = 256, n_joints: int = N_JOINTS):
        for name, value, lo in (("bins", bins, 1), ("canvas", canvas, 1), ("n_joints", n_joints, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise ValueError(f"PoseQuantizer.{name} must be an integer >= {lo}, got {value!r}")
        self.bins = int(bins)
        self.canvas = int(canvas)
        self.n_joints = int(n_joints)

    # -- layout ---------------------------------------------------------------------------------
    @property
    def INVISIBLE(self) -> int:
        return self.bins

    @property
    def VISIBLE(self) -> int:
        return self.bins + 1

    @property
    def NA(self) -> int:
        return self.bins + 2

    @property
    def vocab_size(self) -> int:
        """Local vocabulary size: the bins and the three flags."""
        return self.bins + 3

    @property
    def tokens_per_skeleton(self) -> int:
        return 3 * self.n_joints

    @property
    def bin_width(self) -> float:
        """Width of one bin in canvas pixels; the round-trip error is at most half of it."""
        return self.canvas / self.bins

    def __repr__(self) -> str:
        return f"PoseQuantizer(bins={self.bins}, canvas={self.canvas}, n_joints={self.n_joints})"

    # -- coordinates <-> bins -------------------------------------------------------------------
    def quantize(self, coords: np.ndarray) -> np.ndarray:
        """Bins (int64) of finite canvas-pixel coordinates; values outside ``[0, canvas)`` are clipped."""
        coords = np.asarray(coords, np.float64)
        return np.clip(np.floor(coords * (self.bins / self.canvas)), 0, self.bins - 1).astype(np.int64)

    def dequantize(self, bins: np.ndarray) -> np.ndarray:
        """Canvas-pixel coordinates (float32) at the centres of ``bins``."""
        return ((np.asarray(bins, np.float64) + 0.5) * (self.canvas / self.bins)).astype(np.float32)

    # -- skeletons <-> ids ----------------------------------------------------------------------
    def encode(self, joints, visible, available=None) -> np.ndarray:
        """Local ids int64 ``[N, 3 * n_joints]`` of ``joints`` float ``[N, n_joints, 2]`` in canvas pixels.

        ``visible`` is bool ``[N, n_joints]``; ``available`` (bool, same shape, default all True) marks joints
        whose position is known. A joint is encoded as NA (``x = y = NA``, ``v = INVISIBLE``) when it is not
        available, not finite, or outside the canvas; otherwise ``v`` is ``VISIBLE`` iff ``visible``.
        """
        joints = np.asarray(joints)
        if not np.issubdtype(joints.dtype, np.floating):
            raise TypeError(
                f"PoseQuantizer.encode: joints must be a float array of canvas pixels, got dtype {joints.dtype} "
                "(integer input looks like token ids or truncated pixels; cast explicitly if you mean pixels)"
            )
        n = self.n_joints
        if joints.ndim != 3 or joints.shape[1:] != (n, 2):
            raise ValueError(f"PoseQuantizer.encode: joints must have shape [N, {n}, 2], got {joints.shape}")
        visible = self._mask("visible", visible, joints.shape[0])
        available = (
            np.ones(joints.shape[:2], bool) if available is None else self._mask("available", available, len(joints))
        )
        inside = np.all(np.isfinite(joints) & (joints >= 0) & (joints < self.canvas), axis=-1)
        ok = available & inside
        xy = np.where(ok[..., None], self.quantize(np.where(ok[..., None], joints, 0.0)), self.NA)
        v = np.where(ok & visible, self.VISIBLE, self.INVISIBLE)
        return np.concatenate([xy, v[..., None]], axis=-1).reshape(len(joints), 3 * n).astype(np.int64)

    def decode(self, ids, strict: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(joints float32 [N, n_joints, 2] with NaN where NA, visible bool [N, n_joints], available bool)``.

        Ids outside ``[0, vocab_size)``, flags in x/y slots other than NA, and bins or NA in v slots raise a
        ``ValueError`` naming the position and value. With ``strict`` (default) an inconsistent joint (only one
        of x/y NA, or NA with ``v = VISIBLE``) raises too; otherwise such a joint decodes as not available and
        not visible (useful for sampled sequences).
        """
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"PoseQuantizer.decode: ids must be an integer array, got dtype {ids.dtype}")
        width = self.tokens_per_skeleton
        if ids.ndim != 2 or ids.shape[1] != width:
            raise ValueError(f"PoseQuantizer.decode: ids must have shape [N, {width}], got {ids.shape}")
        ids = ids.astype(np.int64)
        self._check_ids(ids)
        tri = ids.reshape(len(ids), self.n_joints, 3)
        xy, v = tri[..., :2], tri[..., 2]
        bad_xy = (xy >= self.bins) & (xy != self.NA)
        bad_v = v < self.bins
        bad_v |= v == self.NA
        for bad, what in ((bad_xy, "an x/y slot holds a flag other than NA"), (bad_v, "a v slot holds a bin or NA")):
            if bad.any():
                row, joint, *comp = np.argwhere(bad)[0]
                col = 3 * joint + (comp[0] if comp else 2)
                raise ValueError(
                    f"PoseQuantizer.decode: {what}: ids[{row}, {col}] = {ids[row, col]} "
                    f"(bins are [0, {self.bins}), flags {self.INVISIBLE}=invisible {self.VISIBLE}=visible "
                    f"{self.NA}=na; slots per joint are x, y, v)"
                )
        na = xy == self.NA
        half = na[..., 0] != na[..., 1]
        na_visible = na.any(-1) & (v == self.VISIBLE)
        if strict and (half.any() or na_visible.any()):
            row, joint = np.argwhere(half | na_visible)[0]
            why = "only one of x/y is NA" if half[row, joint] else "x/y are NA but v is VISIBLE"
            raise ValueError(
                f"PoseQuantizer.decode: inconsistent joint {joint} in row {row}: {why} "
                f"(ids[{row}, {3 * joint}:{3 * joint + 3}] = {ids[row, 3 * joint : 3 * joint + 3].tolist()}); "
                "pass strict=False to decode it as not available"
            )
        available = ~na.any(-1)
        joints = np.where(available[..., None], self.dequantize(np.where(na, 0, xy)), np.float32(np.nan))
        visible = available & (v == self.VISIBLE)
        return joints.astype(np.float32), visible, available

    # -- model side ---------------------------------------------------------------------------------
    def slot_mask(self) -> torch.Tensor:
        """Which local ids each of the 39 slots may take ``[39, vocab_size]``: x/y slots a bin or NA, v slots
        INVISIBLE or VISIBLE. For decoding model outputs into well-formed skeletons."""
        allowed = torch.zeros(self.tokens_per_skeleton, self.vocab_size, dtype=torch.bool)
        xy = torch.arange(self.tokens_per_skeleton) % 3 != 2
        allowed[xy, : self.bins] = True
        allowed[xy, self.NA] = True
        allowed[~xy, self.INVISIBLE] = True
        allowed[~xy, self.VISIBLE] = True
        return allowed

    def constrain_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [..., 39, vocab_size]`` with the ids a slot cannot hold set to -inf (a new tensor)."""
        mask = self.slot_mask().to(logits.device)
        return logits.masked_fill(~mask, float("-inf"))

    def pick(self, logits: torch.Tensor, mode: str = "argmax") -> torch.Tensor:
        """Local ids ``[..., 39]`` from ``logits [..., 39, vocab_size]``, each slot within its kind.

        ``argmax``: the most likely allowed id. ``mean``: x/y slots take the bin nearest the probability-weighted
        mean bin (the estimate with the least expected squared error), unless NA is more likely than all bins
        together; visibility slots take their most likely flag."""
        logits = self.constrain_logits(logits)
        best = logits.argmax(-1)
        if mode == "argmax":
            return best
        if mode != "mean":
            raise ValueError(f"pose decoding mode must be 'argmax' or 'mean', got {mode!r}")
        p = logits.float().softmax(-1)
        p_bins = p[..., : self.bins]
        mass = p_bins.sum(-1)
        centre = torch.arange(self.bins, device=logits.device, dtype=torch.float32)
        mean = ((p_bins * centre).sum(-1) / mass.clamp_min(1e-12)).round().long().clamp(0, self.bins - 1)
        xy = (torch.arange(self.tokens_per_skeleton, device=logits.device) % 3 != 2).expand_as(best)
        na = p[..., self.NA] > mass
        return torch.where(xy & ~na, mean, torch.where(xy, torch.full_like(best, self.NA), best))

    def decode_torch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`decode` (non-strict) of a LongTensor ``[N, 39]``; tensors on ``ids``' device."""
        joints, visible, available = self.decode(ids.detach().cpu().numpy(), strict=False)
        dev = ids.device
        return torch.from_numpy(joints).to(dev), torch.from_numpy(visible).to(dev), torch.from_numpy(available).to(dev)

    def _mask(self, name: str, mask, n: int) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"PoseQuantizer.encode: {name} must be a bool array, got dtype {mask.dtype}")
        if mask.shape != (n, self.n_joints):
            raise ValueError(f"PoseQuantizer.encode: {name} must have shape [{n}, {self.n_joints}], got {mask.shape}")
        return mask

    def _check_ids(self, ids: np.ndarray) -> None:
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(
                f"PoseQuantizer.decode: ids[{row}, {col}] = {ids[row, col]} is outside the local pose vocabulary "
                f"[0, {self.vocab_size}) (global ids? convert with to_local)"
            )

    # -- pixels <-> canvas ----------------------------------------------------------------------
    def scale_to_canvas(self, joints, image_size: int) -> np.ndarray:
        """Joints in pixels of a square ``image_size`` image -> canvas pixels (float64; NaN stays NaN)."""
        return np.asarray(joints, np.float64) * (self.canvas / _positive_int("image_size", image_size))

    def scale_from_canvas(self, joints, image_size: int) -> np.ndarray:
        """Canvas pixels -> pixels of a square ``image_size`` image (float64; NaN stays NaN)."""
        return np.asarray(joints, np.float64) * (_positive_int("image_size", image_size) / self.canvas)

    # -- token space ----------------------------------------------------------------------------
    def token_ranges(self, prefix: str = "pose") -> list[dict]:
        """Token-space config entries: ``<prefix>_bins`` then ``<prefix>_flags`` (keep them adjacent, in order)."""
        return [
            {"name": f"{prefix}_bins", "size": self.bins},
            {"name": f"{prefix}_flags", "tokens": [f"<{prefix}_{f}>" for f in FLAG_NAMES]},
        ]

    def offset(self, space: TokenSpace, prefix: str = "pose") -> int:
        """Global id of local id 0, after checking that ``space`` lays out this quantiser's ranges."""
        bins_name, flags_name = f"{prefix}_bins", f"{prefix}_flags"
        if bins_name not in space or flags_name not in space:
            raise ValueError(
                f"token space has no {bins_name!r} / {flags_name!r} ranges (add PoseQuantizer.token_ranges"
                f"(prefix={prefix!r}) to its config); known ranges: {[r.name for r in space]}"
            )
        bins_rng, flags_rng = space[bins_name], space[flags_name]
        if bins_rng.size != self.bins:
            raise ValueError(
                f"token range {bins_name!r} has {bins_rng.size} ids but the quantiser has {self.bins} bins"
            )
        if flags_rng.start != bins_rng.stop:
            raise ValueError(
                f"token range {flags_name!r} starts at {flags_rng.start} but must start right after {bins_name!r} "
                f"(at {bins_rng.stop}); list the two ranges next to each other"
            )
        want = tuple(f"<{prefix}_{f}>" for f in FLAG_NAMES)
        got = space.special_tokens(flags_name)
        if got[:3] != want:
            raise ValueError(f"token range {flags_name!r} must name the specials {list(want)} first, got {list(got)}")
        return bins_rng.start

    def to_global(self, local, space: TokenSpace, prefix: str = "pose") -> np.ndarray:
        """Local ids -> global ids of ``space`` (int64)."""
        local = _int_array("to_global", local)
        bad = (local < 0) | (local >= self.vocab_size)
        if bad.any():
            raise ValueError(
                f"to_global: local pose id {local[bad].flat[0]} is outside [0, {self.vocab_size}) (already global?)"
            )
        return local + self.offset(space, prefix)

    def to_local(self, global_ids, space: TokenSpace, prefix: str = "pose") -> np.ndarray:
        """Global ids of ``space`` -> local ids (int64); ids outside the pose ranges raise."""
        global_ids = _int_array("to_local", global_ids)
        start = self.offset(space, prefix)
        local = global_ids - start
        bad = (local < 0) | (local >= self.vocab_size)
        if bad.any():
            gid = int(global_ids[bad].flat[0])
            where = space.range_of(gid).name if 0 <= gid < space.vocab_size else "no range"
            raise ValueError(
                f"to_local: global id {gid} is not a pose id (pose ids are [{start}, {start + self.vocab_size}); "
                f"it lies in {where!r})"
            )
        return local


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer (the side of a square image), got {value!r}")
    return int(value)


def _int_array(fn: str, ids) -> np.ndarray:
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{fn}: ids must be an integer array, got dtype {ids.dtype}")
    return ids.astype(np.int64)
