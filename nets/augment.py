"""Image augmentation for training on few demos: the random shift of DrQ / Diffusion Policy's crop.

``random_shift(frames, pad)`` pads every image by ``pad`` pixels (edge replicated) and crops it back
to its size at a random offset in ``[0, 2 * pad]``: a translation of up to ``pad`` pixels. One offset
is drawn per SAMPLE and applied to all its frames, so the motion between the frames of a window (what
a policy reads from its observation history) is unchanged; actions and states are not touched.

Used in training only by ``ActionDecoder.forward`` (``DecoderConfig.augment_shift``) and
``InverseDynamicsModel.forward`` (``IDMConfig.augment_shift``); evaluation and labelling see the plain
frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(frames: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``frames [B, T, C, H, W]`` (any dtype) -> the same shape and dtype, each sample shifted by an
    integer offset of at most ``pad`` pixels in each direction (the same for its T frames)."""
    if pad <= 0:
        return frames
    if frames.dim() != 5:
        raise ValueError(f"random_shift wants frames [B, T, C, H, W], got {tuple(frames.shape)}")
    b, t, c, h, w = frames.shape
    x = frames.reshape(b, t * c, h, w)
    dtype = x.dtype
    padded = F.pad(x.float() if not x.is_floating_point() else x, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator, device=frames.device)
    rows = offsets[:, 0, None] + torch.arange(h, device=frames.device)[None]  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(w, device=frames.device)[None]  # [B, W]
    batch = torch.arange(b, device=frames.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, T*C]
    return out.permute(0, 3, 1, 2).to(dtype).reshape(b, t, c, h, w)
