"""FrameAutoencoder: an image encoder pretrained on action-free video by reconstructing its frames.

The encoder is the action decoder's own backbone (``nets.conv_encoder.conv_stages``: a 64x64 frame
becomes an 8x8 map), so its stages load one to one into a decoder (``model.encoder_init=RUN``,
``model.freeze_encoder=true``: decoders/decoder.py), the DynaMo-style recipe of a visual encoder
pretrained on in-domain video and frozen under a small policy head. The map goes through a 1x1
bottleneck (``code_channels``) and transposed convolutions back to the frame; the loss is the pixel
MSE in [-1, 1]. Reconstruction keeps *where* things are (the object and the hand), which is what a
policy trained on a few demos fails to learn on its own (docs/RESULTS.md, issue 14).

``features(frames)`` is what a decoder built on this encoder pools before its projection (the map
averaged to 4x4 and flattened), and what ``wm label --labeller RUN`` writes per frame as
``features`` (wm_pipeline/recipes/frame_autoencoder.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from nets.conv_encoder import conv_stages
from shards.model_folder import ModelFolderMixin, config_fields


@dataclass
class FrameAutoencoderConfig:
    image_size: int = 64  # square frames (filled from the data by the runtime)
    image_channels: int = 3
    encoder_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    code_channels: int = 16  # bottleneck channels of the map the decoder reconstructs from
    grid: int = 4  # features(): the map averaged to grid x grid and flattened


PRESETS = {
    "tiny": FrameAutoencoderConfig(),
    "small": FrameAutoencoderConfig(encoder_channels=[32, 64, 128, 256], code_channels=32),
}


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.GroupNorm(1, c_out), nn.SiLU())


class FrameAutoencoder(
    nn.Module, ModelFolderMixin, PyTorchModelHubMixin, library_name="wm-pipeline", tags=["robotics", "autoencoder"]
):
    """uint8 frames -> 8x8 map (for 3 stages at 64 px) -> reconstructed frames."""

    FORMAT_VERSION = 1  # config.json's _format_version: raise it (and convert older folders) when the layout changes

    def __init__(self, config: FrameAutoencoderConfig):
        super().__init__()
        if isinstance(config, dict):
            config = FrameAutoencoderConfig(**config_fields(config))
        channels = list(config.encoder_channels)
        if not channels or config.code_channels <= 0 or config.image_size % (2 ** len(channels)):
            raise ValueError(
                f"image_size {config.image_size} must be divisible by 2^{len(channels)} "
                f"(one halving per encoder stage) and code_channels > 0"
            )
        self.config = config
        self.encoder = conv_stages(config.image_channels, channels)
        self.bottleneck = nn.Conv2d(channels[-1], config.code_channels, 1)
        ups, c = [nn.Conv2d(config.code_channels, channels[-1], 3, padding=1), nn.SiLU()], channels[-1]
        for c_next in reversed(channels[:-1]):
            ups.append(_up(c, c_next))
            c = c_next
        ups.append(nn.ConvTranspose2d(c, config.image_channels, 4, stride=2, padding=1))
        self.decoder = nn.Sequential(*ups)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` -> the encoder's map ``[N, C_last, h, w]``."""
        if frames.ndim != 4 or frames.shape[1] != self.config.image_channels:
            raise ValueError(
                f"FrameAutoencoder expects [N, {self.config.image_channels}, H, W] frames, got {tuple(frames.shape)}"
            )
        return self.encoder(frames.float() / 127.5 - 1.0)

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` -> ``[N, C_last * grid * grid]``: what a decoder on this encoder pools."""
        return F.adaptive_avg_pool2d(self.encode(frames), self.config.grid).flatten(1)

    def reconstruct(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` -> float ``[N, C, H, W]`` in about [-1, 1]."""
        return self.decoder(self.bottleneck(self.encode(frames)))

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """batch: windows with ``frames`` uint8 ``[B, T, C, H, W]`` (actions, if any, are not read)."""
        frames = batch["frames"].flatten(0, 1)
        target = frames.float() / 127.5 - 1.0
        loss = F.mse_loss(self.reconstruct(frames), target)
        return loss, {"loss": loss.item(), "recon_mse": loss.item()}
