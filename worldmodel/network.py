"""The world model's network: one transformer over action tokens and future-frame tokens.

The counterpart of the UWM reference's noise-prediction network (its ``DualNoisePredictionNet``):
it knows tokens, timesteps and a condition vector, nothing of embodiments, pixels, VAEs, tasks or the
objective. ``worldmodel.uwm.WorldModel`` (the wrapper) turns actions and frames into tokens and back
(embodiment adapters, ``PatchTokenizer``), builds the condition, and holds the objective, the samplers
and the modes.

Sequence: ``[H action tokens + action_pos | video tokens + video_pos (+ context) | registers]``; every
block is modulated by ``silu(cond + emb(t_action) + emb(t_video))`` (AdaLN-Zero). ``variant="dust"``
uses DUST's dual-stream blocks (``worldmodel.dust``), ``"uwm"`` the shared single-stream ``Block``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nets.dit_block import Block, FinalLayer
from nets.timestep import TimestepEmbedding
from worldmodel.dust import DualStreamBlock


class VideoActionTransformer(nn.Module):
    """``(action tokens [B, H, D], video tokens [B, N, D], cond [B, D], t_action [B], t_video [B])`` ->
    the final layer's outputs ``(h_action [B, H, D], h_video [B, N, D])``.

    ``context``: ``(channels, patch)`` of the denoised frame space when the last observed frame is
    patch-embedded and added to each of the ``n_future`` frames' tokens (``video_context="last_frame"``),
    else None. ``null_tokens`` are the learned action tokens of samples without an action stream.
    """

    def __init__(
        self,
        *,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        action_tokens: int,
        video_tokens: int,
        registers: int,
        n_future: int,
        variant: str = "uwm",
        context: tuple[int, int] | None = None,
    ):
        super().__init__()
        d = width
        self.n_action, self.n_video, self.n_future = action_tokens, video_tokens, n_future
        self.t_action = TimestepEmbedding(d)
        self.t_video = TimestepEmbedding(d)
        self.null_action = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.action_pos = nn.Parameter(torch.randn(1, action_tokens, d) * 0.02)
        self.video_pos = nn.Parameter(torch.randn(1, video_tokens, d) * 0.02)
        self.context_embed = None
        if context is not None:  # same patch grid as the frame tokenizer, its own weights
            channels, patch = context
            self.context_embed = nn.Conv2d(channels, d, patch, patch)
        self.register_tokens = nn.Parameter(torch.randn(1, registers, d) * 0.02)
        block = Block if variant == "uwm" else DualStreamBlock
        self.blocks = nn.ModuleList([block(d, heads, mlp_ratio) for _ in range(depth)])
        self.final_action = FinalLayer(d)
        self.final_video = FinalLayer(d)

    @property
    def num_tokens(self) -> int:
        return self.n_action + self.n_video + self.register_tokens.shape[1]

    def null_tokens(self, batch_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[B, H, D]`` null action tokens (a fresh tensor: rows are overwritten with real action tokens)."""
        return self.null_action.expand(batch_size, self.n_action, -1).to(dtype or self.null_action.dtype).clone()

    def context_tokens(self, last: torch.Tensor) -> torch.Tensor:
        """The last observed frame in the denoised space ``[B, 1, c, h, w]`` -> tokens added to each future
        frame's ``[B, n_future * N, D]``."""
        tok = self.context_embed(last[:, 0].to(self.context_embed.weight.dtype))  # [B, D, g, g]
        return tok.flatten(2).transpose(1, 2).repeat(1, self.n_future, 1)

    def forward(
        self,
        action_tokens: torch.Tensor,
        video_tokens: torch.Tensor,
        cond: torch.Tensor,
        t_action: torch.Tensor,
        t_video: torch.Tensor,
        last: torch.Tensor | None = None,
    ):
        """``last``: the last observed frame in the denoised space, needed when built with ``context``."""
        b = action_tokens.shape[0]
        c = F.silu(cond + self.t_action(t_action) + self.t_video(t_video))
        tok_v = video_tokens + self.video_pos
        if self.context_embed is not None:
            if last is None:
                raise ValueError("video_context='last_frame' needs the last observed frame")
            tok_v = tok_v + self.context_tokens(last)
        x = torch.cat([action_tokens + self.action_pos, tok_v, self.register_tokens.expand(b, -1, -1)], dim=1)
        for blk in self.blocks:
            x = blk(x, c, self.n_action)
        h_a = self.final_action(x[:, : self.n_action], c)
        h_v = self.final_video(x[:, self.n_action : self.n_action + tok_v.shape[1]], c)
        return h_a, h_v
