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
