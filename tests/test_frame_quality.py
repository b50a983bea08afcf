"""PSNR / SSIM of the world-model eval (wm_pipeline/jobs/frame_quality.py) against closed-form values."""

from __future__ import annotations

import math

import pytest
import torch

from wm_pipeline.jobs.frame_quality import MAX_PSNR, psnr_ssim


def unit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the model's [-1, 1]."""
    return x * 2 - 1


def test_psnr_and_ssim_match_closed_forms():
    flat = lambda v: torch.full((1, 2, 3, 32, 32), v)  # noqa: E731
    # PSNR: an offset of 0.1 in [0, 1] is MSE 0.01 -> 20 dB; an exact prediction is capped
    psnr, ssim = psnr_ssim(unit(flat(0.6)), unit(flat(0.5)))
    assert psnr.item() == pytest.approx(20.0, abs=1e-4)
    # SSIM of two flat images a, b (no variance): (2ab + C1) / (a² + b² + C1), C1 = (0.01 * 1)²
    c1 = 0.01**2
    assert ssim.item() == pytest.approx((2 * 0.6 * 0.5 + c1) / (0.6**2 + 0.5**2 + c1), abs=1e-5)
    x = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    psnr, ssim = psnr_ssim(unit(x), unit(x))
    assert torch.allclose(ssim, torch.ones(2)) and torch.allclose(psnr, torch.full((2,), MAX_PSNR))
    # per window: window 0 exact, window 1 noisy -> lower SSIM and PSNR only there; more noise is worse
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    noisy = x.clone()
    noisy[1] = (x[1] + 0.1 * noise[1]).clamp(0, 1)
    worse = (x + 0.3 * noise).clamp(0, 1)
    psnr, ssim = psnr_ssim(unit(noisy), unit(x))
    psnr_w, ssim_w = psnr_ssim(unit(worse), unit(x))
    assert ssim[0].item() == pytest.approx(1.0) and ssim[1] < 0.99 and ssim_w[1] < ssim[1]
    mse = ((noisy[1] - x[1]) ** 2).mean(dim=(1, 2, 3))
    assert psnr[1].item() == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5) and psnr_w[1] < psnr[1]
    # tiny frames (smaller than the 11 px window) still score; shapes are checked
    p8, s8 = psnr_ssim(unit(flat(0.6)[..., :8, :8]), unit(flat(0.5)[..., :8, :8]))
    assert math.isfinite(p8.item()) and s8.item() == pytest.approx(0.98361, abs=1e-4)
    with pytest.raises(ValueError, match="B, F, C, H, W"):
        psnr_ssim(x[0], x[0])
