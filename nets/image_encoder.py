"""A small GroupNorm ResNet that turns an image into one feature vector.

Used for the current-frame conditioning of the world model (UWM runs a GroupNorm ResNet-18 per view
and frame); trained in-domain with the model, so no pretrained weights are needed. GroupNorm instead
of BatchNorm because batches are small and split over ranks, and because EMA weights work better
without running statistics.

Input: uint8 ``[N, C, H, W]`` in 0..255, or float ``[N, C, H, W]`` already in [-1, 1] (the world
model's frame convention). Output: ``[N, out_dim]``.

Pooling: ``"spatial_softmax"`` (default) returns the expected (x, y) position of every channel of the
last feature map (Diffusion Policy's choice: manipulation needs *where* things are, which average
pooling throws away); ``"avg"`` is global average pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from nets.conv import ResConvBlock
from nets.spatial_softmax import SpatialSoftmax


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class ImageEncoder(nn.Module):
    """GroupNorm ResNet: a stride-2 stem, then one stage per entry of ``channels`` (each stage after the
    first halves the resolution), then pooling and a linear projection to ``out_dim``.

    With the defaults a 64x64 image ends as a 4x4 map of 256 channels (~1.2 M parameters at
    ``blocks_per_stage=1``).
    """

    def __init__(
        self,
        out_dim: int = 256,
        channels: tuple[int, ...] | list[int] = (32, 64, 128, 256),
        blocks_per_stage: int = 1,
        in_channels: int = 3,
        pool: str = "spatial_softmax",
        groups: int = 8,
    ):
        super().__init__()
        if pool not in ("spatial_softmax", "avg"):
            raise ValueError(f"pool must be 'spatial_softmax' or 'avg', got {pool!r}")
        channels = list(channels)
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, 2, 1, bias=False), _norm(channels[0], groups), nn.SiLU()
        )
        layers, c_prev = [], channels[0]
        for i, c in enumerate(channels):
            for j in range(blocks_per_stage):
                layers.append(ResConvBlock(c_prev, c, 2 if (i > 0 and j == 0) else 1, min(groups, c)))
                c_prev = c
        self.stages = nn.Sequential(*layers)
        self.pool = SpatialSoftmax() if pool == "spatial_softmax" else nn.AdaptiveAvgPool2d(1)
        self.out = nn.Linear(2 * c_prev if pool == "spatial_softmax" else c_prev, out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 ``[N, C, H, W]`` (0..255) or float in [-1, 1] -> ``[N, out_dim]``."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"ImageEncoder expects [N, {self.in_channels}, H, W], got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        x = self.stages(self.stem(images.to(self.out.weight.dtype)))
        return self.out(self.pool(x).flatten(1))
