"""FrameDecoder: a feature vector becomes a small image (the reconstruction head of an auxiliary loss).

``FrameDecoder(in_dim, size, channels)`` maps ``[N, in_dim]`` to ``[N, channels, size, size]``: a linear
layer to a 4x4 map of ``width`` channels, then stride-2 transposed convolutions (GroupNorm, SiLU; the
channels halve at each, down to 8) up to ``size``, then a 3x3 convolution to the image channels. The
output is unbounded; targets are frames scaled to [-1, 1]. Used by the action decoder's
reconstruction loss (decoders/decoder.py ``aux_recon_weight``): a per-frame feature that must redraw
its frame has to carry what changes between frames, the arm and the objects.
"""

from __future__ import annotations

import torch
from torch import nn

BASE = 4  # the map the linear layer produces is BASE x BASE


class FrameDecoder(nn.Module):
    def __init__(self, in_dim: int, size: int, channels: int = 3, width: int = 64):
        super().__init__()
        ups = (size // BASE).bit_length() - 1
        if size < BASE or BASE * 2**ups != size:
            raise ValueError(f"FrameDecoder size must be {BASE} times a power of two, got {size}")
        self.width = width
        self.inp = nn.Linear(in_dim, width * BASE * BASE)
        layers, c = [], width
        for _ in range(ups):
            c_next = max(8, c // 2)
            layers += [nn.ConvTranspose2d(c, c_next, 4, stride=2, padding=1), nn.GroupNorm(1, c_next), nn.SiLU()]
            c = c_next
        layers.append(nn.Conv2d(c, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.inp(features).view(features.shape[0], self.width, BASE, BASE)
        return self.body(torch.nn.functional.silu(x))
