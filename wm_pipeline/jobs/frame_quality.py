"""PSNR and SSIM of predicted frames, per window, with torchmetrics (the metrics library of the PyTorch
Lightning project).

Frames are compared in [0, 1] (``data_range=1``; the world model's [-1, 1] pixels are mapped by
``(x + 1) / 2``). Both are computed per frame and averaged over a window's frames (the video-prediction
convention): PSNR ``10 log10(1 / MSE)`` in dB, capped at 100 dB for a frame predicted exactly; SSIM
with torchmetrics' defaults (Gaussian window 11 px, sigma 1.5, K1 0.01, K2 0.03); frames smaller than
11 px use a uniform window of the largest odd size that fits.
"""

from __future__ import annotations

import torch

MAX_PSNR = 100.0


def psnr_ssim(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pred``, ``target`` float ``[B, F, C, H, W]`` in [-1, 1] -> (PSNR dB ``[B]``, SSIM ``[B]``), each the
    mean over the window's ``F`` frames."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if pred.shape != target.shape or pred.ndim != 5:
        raise ValueError(
            f"expected two [B, F, C, H, W] tensors of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    b, f = pred.shape[:2]
    # float64: SSIM's local variances are differences of means, which float32 rounds visibly on flat regions
    x = ((pred.double().clamp(-1, 1) + 1) / 2).flatten(0, 1)
    y = ((target.double().clamp(-1, 1) + 1) / 2).flatten(0, 1)
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3))
    psnr = (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-MAX_PSNR / 10)))).view(b, f).mean(1)
    side = min(x.shape[-2:])
    window = {} if side >= 11 else {"gaussian_kernel": False, "kernel_size": side if side % 2 else side - 1}
    ssim = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none", **window)
    return psnr.float(), ssim.view(b, f).mean(1).float()
