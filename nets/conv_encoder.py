"""The small image encoder of the action decoders and of the frame autoencoder (its pretraining).

``conv_stages`` is the backbone: stride-2 conv stages with GroupNorm and a residual conv block each
(``nets.conv.ResConvBlock``), so a 64x64 image with 3 channel entries ends as an 8x8 map. Both
``ConvEncoder`` (``[N, C, H, W]`` uint8 -> ``[N, out_dim]``) and the frame autoencoder
(latent_actions/frame_autoencoder.py) build it, so pretrained stages load into a decoder's encoder
one to one (``stages.*`` keys).
"""

from __future__ import annotations

import torch
from torch import nn

from nets.conv import ResConvBlock
from nets.spatial_softmax import SpatialSoftmax
from nets.state_dict import rename_on_load, sequential_renames


def _groups(c: int) -> int:
    return 8 if c % 8 == 0 else 1


POOLS = ("grid", "spatial_softmax")


# Checkpoints saved before the encoder used nets.conv (a residual conv of its own, ``body`` = conv,
# GroupNorm, SiLU, conv, GroupNorm) load under the new names.
OLD_ENCODER_KEYS = sequential_renames("stages", "body", {0: "conv1", 1: "norm1", 3: "conv2", 4: "norm2"})


def conv_stages(in_channels: int, channels: list[int]) -> nn.Sequential:
    """One stage per entry of ``channels``: stride-2 conv, GroupNorm, SiLU, residual conv block."""
    layers, c_in = [], in_channels
    for c in channels:
        layers += [
            nn.Conv2d(c_in, c, 3, stride=2, padding=1),
            nn.GroupNorm(_groups(c), c),
            nn.SiLU(),
            ResConvBlock(c, c, groups=_groups(c), bias=True),
        ]
        c_in = c
    return nn.Sequential(*layers)


class ConvEncoder(nn.Module):
    """uint8 ``[N, C, H, W]`` -> ``[N, out_dim]``: stride-2 conv stages with GroupNorm and a residual
    conv block each (``nets.conv.ResConvBlock``), then ``pool``: "grid" averages the map to 4x4 and flattens it (coarse positions);
    "spatial_softmax" reads ``keypoints`` soft-argmax positions off it (``nets.SpatialSoftmax``)."""

    def __init__(self, in_channels: int, channels: list[int], out_dim: int, pool: str = "grid", keypoints: int = 32):
        super().__init__()
        self.stages = conv_stages(in_channels, channels)
        c_in = channels[-1]
        if pool == "grid":
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(1))
            pooled = c_in * 16
        elif pool == "spatial_softmax":
            self.pool = SpatialSoftmax(c_in, keypoints)
            pooled = 2 * keypoints
        else:
            raise ValueError(f"encoder pool {pool!r} is not one of {POOLS}")
        self.proj = nn.Linear(pooled, out_dim)
        rename_on_load(self, OLD_ENCODER_KEYS)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` -> the pooled map ``[N, pooled]`` (before the projection)."""
        return self.pool(self.stages(images.float() / 127.5 - 1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(images))
