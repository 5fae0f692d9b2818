"""Foveated VLM pass metrics: attention entropy and peak, glimpse correlation, ratios, the bootstrap interval."""

from __future__ import annotations

import math

import pytest
import torch

from mmsuite.lightning_modules.fvlm.metrics import attention_stats, bootstrap_ratio, glimpse_correlation, pass_metrics
from mmsuite.lightning_modules.fvlm.model import PassOutput


def test_attention_stats_of_uniform_and_one_hot_weights():
    n = 50
    entropy, peak = attention_stats(torch.full((2, 3, 4, n), 1.0 / n))
    assert math.isclose(float(entropy), math.log(n), rel_tol=1e-5) and math.isclose(float(peak), 1 / n, rel_tol=1e-5)
    entropy, peak = attention_stats(torch.nn.functional.one_hot(torch.tensor([[3, 7]]), n).float())
    assert float(entropy) == pytest.approx(0.0, abs=1e-6) and float(peak) == 1.0


def test_glimpse_correlation():
    a = torch.randn(2, 5, 16)
    assert float(glimpse_correlation(a, a * 3 + 1)) == pytest.approx(1.0, abs=1e-5)
    assert float(glimpse_correlation(a, -a)) == pytest.approx(-1.0, abs=1e-5)
    assert abs(float(glimpse_correlation(torch.randn(64, 8, 256), torch.randn(64, 8, 256)))) < 0.02


def _pass(name: str, nll: list[float], rec: list[float] | None, peak: float) -> PassOutput:
    attn = torch.full((2, 3, 1, 4), (1 - peak) / 3)
    attn[..., 0] = peak
    return PassOutput(
        name,
        glimpses=torch.randn(2, 3, 8),
        attention=attn,
        frame_hidden=torch.zeros(2, 3, 4),
        caption_nll=torch.tensor(nll),
        caption_tokens=torch.tensor([4, 6]),
        rec=None if rec is None else torch.tensor(rec),
    )


def test_pass_metrics_name_every_pass_and_the_ratios():
    passes = [
        _pass("coarse", [8.0, 12.0], [0.4, 0.6], 0.25),
        _pass("fine_1", [6.0, 9.0], None, 0.5),
        _pass("fine_2", [4.0, 6.0], [0.2, 0.3], 0.7),
    ]
    passes[1].caption_nll = None  # an unscored pass: no caption or reconstruction figure
    m = pass_metrics(passes)
    assert float(m["cap_coarse"]) == pytest.approx(2.0) and float(m["cap_fine_2"]) == pytest.approx(1.0)
    assert float(m["cap_fine"]) == pytest.approx(1.0) and float(m["cap_ratio"]) == pytest.approx(2.0)
    assert float(m["cap_improvement_pct"]) == pytest.approx(100.0)
    assert float(m["rec_ratio"]) == pytest.approx(0.5 / 0.25)
    assert float(m["attn_max_fine_1"]) == pytest.approx(0.5)
    assert "cap_fine_1" not in m and "rec_fine_1" not in m and "glimpse_corr_coarse" not in m
    assert {"glimpse_corr_fine_1", "glimpse_corr_fine_2", "attn_entropy_coarse"} <= set(m)
    assert "cap_ratio" not in pass_metrics(passes[:1])


def test_bootstrap_ratio_is_paired_and_deterministic():
    g = torch.Generator().manual_seed(0)
    fine = torch.rand(200, generator=g) * 10 + 1
    ratio, lo, hi = bootstrap_ratio(fine * 1.1, fine)  # every clip 10 % worse coarse: no spread when paired
    assert ratio == pytest.approx(1.1) and lo == pytest.approx(1.1) and hi == pytest.approx(1.1)
    coarse = fine * 1.1 + torch.randn(200, generator=g)
    ratio, lo, hi = bootstrap_ratio(coarse, fine, seed=3)
    assert lo < ratio < hi and 1.0 < lo and hi < 1.2
    assert bootstrap_ratio(coarse, fine, seed=3) == (ratio, lo, hi)
    with pytest.raises(ValueError, match="equal 1-D"):
        bootstrap_ratio(coarse, fine[:10])
