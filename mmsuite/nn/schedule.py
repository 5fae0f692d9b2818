"""Learning-rate schedules: linear warm-up, then cosine decay to a floor, and the optimizer settings.

One function, used by every family. ``progress`` may count optimizer steps or real tokens. The settings of the
``schedule`` config group (``conf/schedule/cosine.yaml`` = :class:`StepSchedule`, ``tokens.yaml`` =
:class:`TokenSchedule`) and of every family's ``model.optim`` (:class:`AdamWSettings`) live here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmsuite.settings import fail, setting


@dataclass
class StepSchedule:
    """Linear warm-up, then cosine decay to ``floor_ratio`` x lr over ``trainer.max_steps`` optimizer steps."""

    warmup_steps: int = setting(100, ge=0)
    floor_ratio: float = setting(0.1, ge=0.0, le=1.0)


@dataclass
class TokenSchedule:
    """4M's token schedule: linear warm-up over ``warmup_tokens``, then cosine to ``floor_ratio`` x lr at
    ``total_tokens``. Both count REAL (non-padding) input + target tokens; training stops at ``total_tokens``."""

    total_tokens: float = setting(3.0e9, gt=0.0)
    warmup_tokens: float = setting(5.0e8, ge=0.0)
    floor_ratio: float = setting(5.0e-5, ge=0.0, le=1.0)  # the M4 notes: lr 0.002 cosine to 1e-7

    def check(self, key: str) -> None:
        if self.warmup_tokens >= self.total_tokens:
            fail(f"{key}.warmup_tokens", f"must be < total_tokens ({self.total_tokens}), got {self.warmup_tokens}")


@dataclass
class AdamWSettings:
    """AdamW's settings; every family states its own values (its ``optim`` default)."""

    lr: float = setting(gt=0.0)
    betas: list[float] = setting(ge=0.0, lt=1.0)
    weight_decay: float = setting(ge=0.0)
    fused: bool = False  # one fused kernel for the whole update (CPU / CUDA): the same AdamW up to rounding, faster

    def check(self, key: str) -> None:
        if len(self.betas) != 2:
            fail(f"{key}.betas", f"must be two numbers [beta1, beta2], got {self.betas}")


def warmup_cosine(progress: float, warmup: float, total: float, floor_ratio: float = 0.0) -> float:
    """LR multiplier in [floor_ratio, 1]: linear from 0 over ``warmup``, cosine to ``floor_ratio`` at ``total``."""
    if total <= 0:
        raise ValueError(f"schedule total must be positive, got {total}")
    if warmup > 0 and progress < warmup:
        return (progress + 1) / (warmup + 1)
    span = max(total - warmup, 1e-12)
    t = min(max((progress - warmup) / span, 0.0), 1.0)
    return floor_ratio + (1.0 - floor_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, floor_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR over :func:`warmup_cosine`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, floor_ratio)
    )


def adamw_warmup_cosine(
    params, optim: AdamWSettings, schedule: StepSchedule, total_steps: int | None, owner: str
) -> dict:
    """Lightning's ``configure_optimizers`` answer for the step-scheduled families: AdamW with
    :func:`warmup_cosine_scheduler` over ``total_steps`` (``trainer.max_steps``)."""
    opt = torch.optim.AdamW(
        params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, fused=optim.fused or None
    )
    if total_steps is None or total_steps <= 0:
        raise ValueError(
            f"{owner} needs trainer.max_steps > 0 for its warmup-cosine schedule, got {total_steps}; "
            "set trainer.max_steps"
        )
    sched = warmup_cosine_scheduler(opt, schedule.warmup_steps, int(total_steps), schedule.floor_ratio)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
