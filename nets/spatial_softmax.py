"""Spatial softmax: a feature map becomes the positions of what it responds to.

``SpatialSoftmax()`` turns ``[N, C, h, w]`` into ``[N, 2C]``: for each channel, a softmax over the
h*w positions and the expected (x, y) under it, both in [-1, 1] (Levine et al. 2016, "End-to-End
Training of Deep Visuomotor Policies"). ``SpatialSoftmax(channels, keypoints=K)`` first maps the C
channels to K heat maps with a 1x1 conv and divides them by a learned temperature, as robomimic's and
Diffusion Policy's image encoders do; its output is ``[N, 2K]``.

Manipulation needs *where* things are; average pooling throws that away, and a flattened grid leaves
a few demos to learn positions from scratch. Keypoints are coordinates: a linear function of an
object's position in the image, which a policy trained on ten layouts can map to actions.

Output layout: all x coordinates, then all y coordinates (``[x_1..x_K, y_1..y_K]``).
"""

from __future__ import annotations

import torch
from torch import nn


class SpatialSoftmax(nn.Module):
    def __init__(self, channels: int = 0, keypoints: int = 0):
        super().__init__()
        if keypoints < 0 or (keypoints and channels <= 0):
            raise ValueError(f"SpatialSoftmax needs channels > 0 for keypoints > 0, got {channels}, {keypoints}")
        self.heat = nn.Conv2d(channels, keypoints, 1) if keypoints else None
        self.log_temperature = nn.Parameter(torch.zeros(())) if keypoints else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.heat is not None:
            x = self.heat(x) / self.log_temperature.exp()
        n, c, h, w = x.shape
        attn = x.flatten(2).softmax(dim=-1).view(n, c, h, w)
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=attn.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=attn.dtype)
        ex = (attn.sum(dim=2) * xs).sum(dim=-1)  # marginal over rows, then E[x]
        ey = (attn.sum(dim=3) * ys).sum(dim=-1)
        return torch.cat([ex, ey], dim=-1)
