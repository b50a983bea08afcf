"""DUST: dual-stream diffusion for world-model-augmented control (arXiv 2510.27607).

What DUST changes relative to UWM, and where it lives:

- **Dual-stream blocks** (here): the action tokens and the future-vision tokens (with the registers)
  keep separate weights (norms, qkv, output projection, MLP, AdaLN), as in MM-DiT; the two streams
  meet only in one joint attention over the concatenated tokens.
- **Decoupled flow-matching loss**: each modality has its own noise and its own timestep, and its own
  loss term. The shared model (``worldmodel.uwm.WorldModel``) already trains both variants this way;
  ``variant="dust"`` only swaps the blocks and the default sampling schedule.
- **Asynchronous joint sampling** (``joint_schedule`` here): in joint sampling the video stream can take
  more denoising steps than the action stream (e.g. ``video_steps = 2 * action_steps``); each stream
  steps on its own uniform grid from t = 1 to t = 0 while the model sees both streams' current times.

Select it with ``WorldModelConfig(variant="dust")``; everything else (tokens, conditioning, modes,
checkpoints) is shared with UWM, so there is one model class.
"""

from __future__ import annotations

import torch
from torch import nn

from nets.attention import attention
from nets.dit_block import AdaLNStream


class DualStreamBlock(nn.Module):
    """Tokens ``[B, n_action + n_video, D]`` -> same shape; separate weights per modality, joint attention."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.action = AdaLNStream(width, heads, mlp_ratio)
        self.video = AdaLNStream(width, heads, mlp_ratio)

    def forward(self, x: torch.Tensor, c: torch.Tensor, n_action: int) -> torch.Tensor:
        """x ``[B, L, D]`` whose first ``n_action`` tokens are actions; c ``[B, D]`` (SiLU'd condition)."""
        xa, xv = x[:, :n_action], x[:, n_action:]
        qa, ka, va, mod_a = self.action.pre_attention(xa, c)
        qv, kv, vv, mod_v = self.video.pre_attention(xv, c)
        o = attention(torch.cat([qa, qv], dim=2), torch.cat([ka, kv], dim=2), torch.cat([va, vv], dim=2))
        xa = self.action.post_attention(xa, o[:, :, :n_action], mod_a)
        xv = self.video.post_attention(xv, o[:, :, n_action:], mod_v)
        return torch.cat([xa, xv], dim=1)


def joint_schedule(action_steps: int, video_steps: int) -> list[tuple[bool, bool]]:
    """Which stream takes an Euler step at each model call of an asynchronous joint sampler.

    There are ``max(action_steps, video_steps)`` calls; a stream with ``m`` steps steps at call ``k``
    when ``floor((k+1) m / n) > floor(k m / n)``, so it steps exactly ``m`` times, evenly spread, and the
    slower stream steps *after* the faster one has moved (actions are denoised against a cleaner
    video). Returns ``[(action_steps_now, video_steps_now), ...]``.
    """
    if action_steps < 1 or video_steps < 1:
        raise ValueError(f"step counts must be >= 1, got action_steps={action_steps}, video_steps={video_steps}")
    n = max(action_steps, video_steps)

    def steps_now(m: int, k: int) -> bool:
        return (k + 1) * m // n > k * m // n

    return [(steps_now(action_steps, k), steps_now(video_steps, k)) for k in range(n)]
