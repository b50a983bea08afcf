"""Frames to tokens and back.

Two frame spaces, one patch stem:

- ``"pixels"`` (default): the model denoises frames in pixel space, scaled to [-1, 1]. Needs no
  pretrained weights.
- ``"vae"``: the model denoises latents of a frozen diffusers ``AutoencoderKL`` loaded from a local
  folder. Latents are meant to be computed once by a labelling pass (``encode_frames``) into a sidecar
  ``labels/<vae>/`` and streamed under a batch key (default ``"vae.latent"``, ``[B, T, c, h, w]``); the
  UWM reference re-encodes every step, which is 91 % of its step time.

Either way ``PatchTokenizer`` (trained with the model) cuts each frame ``[c, h, w]`` into ``p x p``
patches with a strided conv (``(h/p) * (w/p)`` tokens per frame) and maps tokens back to patches with a
linear layer (zero-initialised: the model starts by predicting zero velocity).

Latent convention: ``encode_frames`` returns ``(mean - shift_factor) * scaling_factor`` of the VAE's
posterior (the mean, not a sample, so a sidecar is deterministic); ``decode_latents`` inverts it.
Frames convention: uint8 0..255 in, float [-1, 1] out.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def frames_to_unit(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (0..255) -> float in [-1, 1]; float frames are assumed to be in [-1, 1] already."""
    if frames.dtype == torch.uint8:
        return frames.float() / 127.5 - 1.0
    return frames.float()


def unit_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """float frames in [-1, 1] -> uint8 0..255 (clamped, rounded)."""
    return ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class PatchTokenizer(nn.Module):
    """Patch stem for ``n_frames`` frames of ``[channels, size, size]``.

    ``patchify``: ``[B, F, c, h, w]`` -> ``[B, F * N, width]`` with ``N = (h/p) * (w/p)``;
    ``unpatchify``: ``[B, F * N, width]`` -> ``[B, F, c, h, w]``.
    """

    def __init__(self, channels: int, size: int, patch: int, width: int):
        super().__init__()
        if size % patch:
            raise ValueError(f"frame size {size} is not divisible by patch size {patch}")
        self.channels, self.size, self.patch = channels, size, patch
        self.grid = size // patch
        self.tokens_per_frame = self.grid * self.grid
        self.embed = nn.Conv2d(channels, width, patch, patch)
        self.out = nn.Linear(width, channels * patch * patch)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, f, c, h, w = x.shape
        if (c, h, w) != (self.channels, self.size, self.size):
            raise ValueError(
                f"tokenizer expects frames [B, F, {self.channels}, {self.size}, {self.size}], got {tuple(x.shape)}"
            )
        tokens = self.embed(x.reshape(b * f, c, h, w))  # [B*F, D, g, g]
        return tokens.flatten(2).transpose(1, 2).reshape(b, f * self.tokens_per_frame, -1)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, _ = tokens.shape
        f, g, p, c = n // self.tokens_per_frame, self.grid, self.patch, self.channels
        x = self.out(tokens).view(b, f, g, g, c, p, p)
        return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, f, c, g * p, g * p)


def load_vae(path: str | Path):
    """A frozen diffusers ``AutoencoderKL`` from a local folder (``config.json`` + weights), in eval mode."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError(
            f"a VAE (frame_space=vae, the VAE labeller) needs diffusers: pip install 'wm-pipeline[vae]' ({e})"
        ) from None

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a diffusers AutoencoderKL folder")
    vae = AutoencoderKL.from_pretrained(path)
    vae.requires_grad_(False)
    return vae.eval()


def vae_downsample(vae) -> int:
    """Spatial downsampling factor of an ``AutoencoderKL`` (one halving per encoder block but the last)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _shift_scale(vae) -> tuple[float, float]:
    shift = vae.config.shift_factor
    return (0.0 if shift is None else float(shift)), float(vae.config.scaling_factor)


@torch.no_grad()
def encode_frames(vae, frames: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """frames uint8 ``[N, 3, H, W]`` (or float in [-1, 1]) -> latents ``[N, c, H/f, W/f]`` (scaled, float32)."""
    shift, scale = _shift_scale(vae)
    param = next(vae.parameters())
    out = []
    for i in range(0, frames.shape[0], batch_size):
        x = frames_to_unit(frames[i : i + batch_size]).to(param.device, param.dtype)
        mean = vae.encode(x).latent_dist.mean
        out.append(((mean - shift) * scale).float())
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """latents ``[N, c, h, w]`` (scaled as by ``encode_frames``) -> frames float ``[N, 3, h*f, w*f]`` in [-1, 1]."""
    shift, scale = _shift_scale(vae)
    param = next(vae.parameters())
    out = []
    for i in range(0, latents.shape[0], batch_size):
        z = latents[i : i + batch_size].to(param.device, param.dtype) / scale + shift
        out.append(vae.decode(z).sample.float().clamp(-1, 1))
    return torch.cat(out)
