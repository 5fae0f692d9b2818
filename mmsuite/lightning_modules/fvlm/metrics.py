"""What the foveated VLM's passes are measured by: caption and reconstruction losses per pass, their coarse/fine
ratios, glimpse attention entropy and peak weight, and how alike the coarse and fine glimpses are.

``cap_ratio = cap_coarse / cap_fine`` (> 1: the fine pass captions better). Inside one jointly trained model it
overstates what foveation buys (the coarse path is a handicapped path of a model trained for the fine one), so it
is reported with a paired bootstrap interval over held-out clips (:func:`bootstrap_ratio`) beside the controls.
"""

from __future__ import annotations

import torch

from mmsuite.lightning_modules.fvlm.model import PassOutput


def attention_stats(attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean entropy (nats; uniform over N tokens = log N) and mean largest weight of glimpse weights
    ``[..., N]`` (every query row of every head and frame counts once)."""
    a = attention.float()
    entropy = -(a * a.clamp_min(1e-12).log()).sum(dim=-1)
    return entropy.mean(), a.amax(dim=-1).mean()


def glimpse_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean Pearson correlation over the feature axis between two passes' glimpses ``[B, T, Dz]`` of the same frames
    (near 1: the queries select alike, e.g. near-uniform attention)."""
    a = a.float() - a.float().mean(dim=-1, keepdim=True)
    b = b.float() - b.float().mean(dim=-1, keepdim=True)
    corr = (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
    return corr.mean()


def pass_metrics(passes: list[PassOutput]) -> dict[str, torch.Tensor]:
    """Batch figures of a forward: ``cap_<pass>``, ``rec_<pass>``, ``cap_fine`` / ``rec_fine`` (the last pass),
    ``cap_ratio``, ``rec_ratio``, ``cap_improvement_pct``, ``attn_entropy_<pass>``, ``attn_max_<pass>`` and
    ``glimpse_corr_<fine pass>`` (against the coarse pass); scores of passes that were not scored are left out."""
    out: dict[str, torch.Tensor] = {}
    coarse = passes[0]
    for p in passes:
        if p.caption_nll is not None:
            out[f"cap_{p.name}"] = p.cap
        if p.rec is not None:
            out[f"rec_{p.name}"] = p.rec.mean()
        out[f"attn_entropy_{p.name}"], out[f"attn_max_{p.name}"] = attention_stats(p.attention)
        if p is not coarse:
            out[f"glimpse_corr_{p.name}"] = glimpse_correlation(coarse.glimpses, p.glimpses)
    last = passes[-1]
    if last is not coarse:
        for kind in ("cap", "rec"):
            if f"{kind}_{last.name}" in out:
                out[f"{kind}_fine"] = out[f"{kind}_{last.name}"]
            if f"{kind}_fine" in out and f"{kind}_coarse" in out:
                out[f"{kind}_ratio"] = out[f"{kind}_coarse"] / out[f"{kind}_fine"]
        if "cap_ratio" in out:
            out["cap_improvement_pct"] = (out["cap_ratio"] - 1) * 100
    return out


def bootstrap_ratio(
    numerator: torch.Tensor, denominator: torch.Tensor, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(ratio, low, high)``: the ratio of two per-sample sums ``[n]`` over a set, with a paired percentile bootstrap
    over samples. For ``cap_ratio`` pass the summed caption NLL of the coarse and the fine pass per clip: both
    cover the same caption tokens, so the ratio of sums is the ratio of token means."""
    num, den = numerator.double().cpu(), denominator.double().cpu()
    if num.shape != den.shape or num.ndim != 1 or len(num) == 0:
        raise ValueError(f"bootstrap_ratio wants two equal 1-D non-empty tensors, got {num.shape}, {den.shape}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(num), (n_boot, len(num)), generator=gen)
    ratios = num[idx].sum(dim=1) / den[idx].sum(dim=1)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(ratios, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(num.sum() / den.sum()), lo, hi
