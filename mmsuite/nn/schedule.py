"""Learning-rate schedules: linear warm-up, then cosine decay to a floor.

One function, used by every family. ``progress`` may count optimizer steps or real tokens.
"""

from __future__ import annotations

import math

import torch


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
    params, optim: dict, schedule: dict, total_steps: int | None, owner: str, default_betas=(0.9, 0.99)
) -> dict:
    """Lightning's ``configure_optimizers`` answer for the step-scheduled families: AdamW (``optim``: lr, betas,
    weight_decay) with :func:`warmup_cosine_scheduler` over ``total_steps`` (``trainer.max_steps``)."""
    opt = torch.optim.AdamW(
        params,
        lr=float(optim.get("lr", 1e-3)),
        betas=tuple(float(b) for b in optim.get("betas", default_betas)),
        weight_decay=float(optim.get("weight_decay", 0.0)),
    )
    if total_steps is None or total_steps <= 0:
        raise ValueError(
            f"{owner} needs trainer.max_steps > 0 for its warmup-cosine schedule, got {total_steps}; "
            "set trainer.max_steps"
        )
    sched = warmup_cosine_scheduler(
        opt, int(schedule.get("warmup_steps", 0)), int(total_steps), float(schedule.get("floor_ratio", 0.1))
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
