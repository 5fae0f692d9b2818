"""Unit tests for the suite's shared metrics (mmsuite.nn.metrics): the one PSNR and the codebook-usage Metric."""

from __future__ import annotations

import math

import pytest
import torch

from mmsuite.nn.metrics import PSNR_CAP_DB, CodebookUsage, psnr


def test_psnr_is_per_image_and_capped_at_100_db():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = (x + 0.1).clamp(0, 1)
    mse = (x - y).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(y, x), 10 * torch.log10(1 / mse), atol=1e-4)  # one value per image, [0, 1] range
    assert torch.equal(psnr(x, x), torch.full((4,), PSNR_CAP_DB))  # a perfect image: 100 dB, not inf
    # uint8 frames [..., H, W, 3] on their own scale give the same values as the frames scaled to [0, 1]
    a = torch.randint(0, 256, (2, 5, 8, 8, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 5, 8, 8, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    got = psnr(a, b, data_range=255)
    assert got.shape == (2, 5)
    assert torch.allclose(got, psnr(a.float() / 255, b.float() / 255), atol=1e-4)
    with pytest.raises(ValueError, match="one shape"):
        psnr(x, x[:, :, :4])


def test_codebook_usage_update_compute_reset():
    metric = CodebookUsage(num_codebooks=2, codebook_size=4)
    metric.update(torch.tensor([[[0, 1, 1, 3], [2, 2, 2, 2]]]))  # [B=1, n_q=2, T=4]
    assert metric.counts.tolist() == [[1, 2, 0, 1], [0, 0, 4, 0]]
    out = metric.compute()
    assert out["usage"].tolist() == [0.75, 0.25]
    p = torch.tensor([0.25, 0.5, 0.25])
    assert out["perplexity"][0] == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert out["perplexity"][1] == pytest.approx(1.0)
    metric.reset()
    assert metric.counts.sum() == 0
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' note on an empty metric
        out = metric.compute()  # no codes seen: both 0
    assert out["usage"].tolist() == [0.0, 0.0] and out["perplexity"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"\[B, 2, \.\.\.\]"):
        metric.update(torch.zeros(3, 4, dtype=torch.long))


def test_codebook_usage_of_one_codebook_over_image_codes():
    metric = CodebookUsage(1, 4)
    metric.update(torch.tensor([[[0, 0], [2, 2]]]).flatten(1)[:, None])  # image codes [B, h, w] -> [B, 1, h*w]
    out = metric.compute()
    assert float(out["usage"]) == 0.5 and float(out["perplexity"]) == pytest.approx(2.0)


def test_codebook_usage_merged_states_equal_one_state_over_all_data():
    g = torch.Generator().manual_seed(0)
    # ranks see different halves of each codebook (codes 0-3 / 4-7, in the other order for codebook 1)
    low, high = (torch.randint(0, 4, (4, 1, 3), generator=g) for _ in range(2))
    batches = [torch.cat([low[i : i + 1], high[i : i + 1] + 4], 1) for i in range(4)]
    batches = [b if i % 2 == 0 else 7 - b for i, b in enumerate(batches)]
    whole, rank0, rank1 = (CodebookUsage(2, 8) for _ in range(3))
    for i, codes in enumerate(batches):
        whole.update(codes)
        (rank0 if i % 2 == 0 else rank1).update(codes)
    assert (rank0.counts > 0).sum() < (whole.counts > 0).sum()  # each rank alone sees fewer of the codes
    rank0.merge_state(rank1)  # what the sum reduction over ranks does
    assert torch.equal(rank0.counts, whole.counts)
    for key in ("usage", "perplexity"):
        assert torch.equal(rank0.compute()[key], whole.compute()[key]), key
