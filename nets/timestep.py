"""Sinusoidal timestep embeddings for flow matching, t in [0, 1].

``timestep_embedding(t, dim, scale)``: ``t [B] -> [B, dim]``, cos and sin of ``scale * t`` at ``dim / 2``
geometric frequencies from 1 to 1 / 10000. ``TimestepEmbedding(width, scale=...)`` adds DiT's MLP.

The scale is the one knob: DiT and UWM use 1000 (the diffusion step count); the action decoder uses 20,
on purpose: the MeanFlow target contains ``d_t u``, high-frequency time features make it huge, and at
1000 MeanFlow training diverged in our runs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DIT_SCALE = 1000.0
MEANFLOW_SCALE = 20.0


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = DIT_SCALE) -> torch.Tensor:
    """Sinusoidal features of ``scale * t``: ``t [B]`` -> ``[B, 2 * (dim // 2)]`` (cos, then sin), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """t in [0, 1] ``[B]`` -> ``[B, width]``: sinusoidal features of ``scale * t``, then an MLP."""

    def __init__(self, width: int, freq_dim: int = 256, scale: float = DIT_SCALE):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim, self.scale).to(self.mlp[0].weight.dtype))
