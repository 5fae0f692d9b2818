"""Evaluation metrics every family shares: the one PSNR of the suite and codebook usage, as torchmetrics objects.

The LightningModules hold torchmetrics objects (``MeanMetric`` of :func:`psnr` for PSNR, ``SumMetric``,
``ScaleInvariantSignalNoiseRatio``, :class:`CodebookUsage`, ...) as submodules, update them per batch and log them,
so that reduction over ranks and reset between epochs are the library's. Their states are not saved in checkpoints.

* PSNR (dB) of one image: ``10 log10(range² / MSE)`` over all of its values, with the MSE floored at
  ``1e-10·range²``, so a perfect image scores 100 dB rather than inf and an epoch's mean stays finite. The suite
  reports the mean over images (not the PSNR of the pooled MSE): a ``MeanMetric`` of :func:`psnr`, not torchmetrics'
  ``PeakSignalNoiseRatio(dim=...)``, which keeps every image's error in a gathered list and scores a perfect image inf.
* Codebook usage: the fraction of a codebook's codes used at least once over the evaluated data, and the
  perplexity ``exp(H)`` of its code distribution.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.functional.image import peak_signal_noise_ratio

PSNR_CAP_DB = 100.0  # = 10 log10(1 / 1e-10): the MSE floor of 1e-10·range²


def psnr(preds: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR (dB, at most :data:`PSNR_CAP_DB`) over the last three axes (``[..., C, H, W]`` or
    ``[..., H, W, C]``) -> ``[...]``. Integer images (uint8) are read as they are: give ``data_range=255``."""
    if preds.shape != target.shape or preds.ndim < 3:
        raise ValueError(
            f"psnr: needs two images [..., 3 axes] of one shape, got {tuple(preds.shape)} and {tuple(target.shape)}"
        )
    values = peak_signal_noise_ratio(
        preds.float(), target.float(), data_range=float(data_range), reduction="none", dim=(-3, -2, -1)
    )
    return values.clamp(max=PSNR_CAP_DB)


class CodebookUsage(Metric):
    """Per codebook, from a histogram of its codes: the fraction used at least once and the perplexity.

    Hand-written: torchmetrics has no codebook metric; the histogram is a sum-reduced state, so ranks merge exactly.
    ``update(codes)``: long ``[B, num_codebooks, ...]`` in ``[0, codebook_size)``. ``compute()``: ``{"usage": [n],
    "perplexity": [n]}`` (float64; both 0 for a codebook that saw no codes; 0-d for one codebook, as torchmetrics
    squeezes single values).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_codebooks: int, codebook_size: int, **kwargs):
        super().__init__(**kwargs)
        if num_codebooks < 1 or codebook_size < 1:
            raise ValueError(
                f"CodebookUsage needs num_codebooks, codebook_size >= 1, got {num_codebooks}, {codebook_size}"
            )
        self.num_codebooks, self.codebook_size = int(num_codebooks), int(codebook_size)
        self.add_state("counts", torch.zeros(self.num_codebooks, self.codebook_size, dtype=torch.long), "sum")

    def update(self, codes: torch.Tensor) -> None:
        n, k = self.num_codebooks, self.codebook_size
        if codes.ndim < 2 or codes.shape[1] != n:
            raise ValueError(f"CodebookUsage: codes must be [B, {n}, ...], got {tuple(codes.shape)}")
        offsets = torch.arange(n, device=codes.device)[None, :, None] * k
        flat = (codes.long().flatten(2) + offsets).flatten()
        self.counts += torch.bincount(flat, minlength=n * k).view(n, k)

    def compute(self) -> dict[str, torch.Tensor]:
        counts = self.counts.double()
        total = counts.sum(1, keepdim=True)
        p = counts / total.clamp_min(1)
        perplexity = torch.exp(-torch.special.xlogy(p, p).sum(1))
        seen = total[:, 0] > 0
        return {
            "usage": (counts > 0).double().mean(1),
            "perplexity": torch.where(seen, perplexity, torch.zeros_like(perplexity)),
        }
