"""The residual conv block of every image encoder here: two 3x3 convs with GroupNorm and SiLU.

``ResConvBlock(c_in, c_out, stride, groups)``:

- ``preact=False`` (ResNet's basic block, post-activation):
  ``silu(norm2(conv2(silu(norm1(conv1(x))))) + skip(x))``; ``stride=2`` halves the resolution and a
  1x1 conv + GroupNorm on the skip matches it (also when ``c_in != c_out``).
- ``preact=True`` (pre-activation, as in diffusion U-Nets): ``x + conv2(silu(norm2(conv1(silu(norm1(x))))))``;
  same channels, stride 1.

``groups`` is the number of GroupNorm groups (callers pick it for their channel counts); ``bias``
whether the convs have one (a conv followed by GroupNorm does not need it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResConvBlock(nn.Module):
    def __init__(
        self,
        c_in: int,
        c_out: int | None = None,
        stride: int = 1,
        groups: int = 8,
        *,
        bias: bool = False,
        preact: bool = False,
    ):
        super().__init__()
        c_out = c_in if c_out is None else c_out
        self.preact = preact
        if preact:
            if stride != 1 or c_in != c_out:
                raise ValueError("a pre-activation block keeps its channels and resolution")
            self.norm1 = nn.GroupNorm(groups, c_in)
            self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=bias)
            self.norm2 = nn.GroupNorm(groups, c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=bias)
        else:
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=bias)
            self.norm1 = nn.GroupNorm(groups, c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=bias)
            self.norm2 = nn.GroupNorm(groups, c_out)
        self.skip = None
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(groups, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.silu(h + (x if self.skip is None else self.skip(x)))
