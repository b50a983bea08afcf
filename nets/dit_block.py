"""The AdaLN-Zero DiT block (Peebles & Xie, "Scalable Diffusion Models with Transformers").

``AdaLNStream`` holds what a transformer block keeps per token stream: LayerNorms without affine,
qkv and output projections, a GELU MLP and the AdaLN projection (shift, scale, gate for attention and
MLP; zero-initialised so every block starts as the identity). ``Block`` has one stream for all tokens
(the action decoder's velocity network, UWM); DUST's block (``worldmodel.dust.DualStreamBlock``) has one
per modality and joins them only inside attention. ``FinalLayer``: LayerNorm + AdaLN shift / scale
(zero init) before an output projection.

The condition ``c [B, D]`` reaches the AdaLN projections as given: callers pass it through SiLU first
(DiT's ``adaLN_modulation = SiLU -> Linear``), once for all blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from nets.attention import attention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: ``x [B, L, D]`` shifted and scaled by per-sample ``[B, 1, D]`` vectors."""
    return x * (1 + scale) + shift


class AdaLNStream(nn.Module):
    """The weights of one token stream in an AdaLN transformer block.

    A block uses it in two halves around a (possibly joint) attention call:
    ``q, k, v, mod = stream.pre_attention(x, c)`` then ``x = stream.post_attention(x, o, mod)``.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        # shift/scale/gate for attention and for the MLP; zero init -> the block starts as identity
        self.adaln = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.adaln.weight)
        nn.init.zeros_(self.adaln.bias)

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """x ``[B, L, D]``, c ``[B, D]`` (already SiLU'd) -> q, k, v ``[B, heads, L, D/heads]`` and modulation."""
        mod = self.adaln(c).unsqueeze(1).chunk(6, dim=-1)
        h = modulate(self.norm1(x), mod[0], mod[1])
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v, mod

    def post_attention(self, x: torch.Tensor, o: torch.Tensor, mod) -> torch.Tensor:
        """o ``[B, heads, L, head_dim]`` (this stream's slice of the attention output) -> new x ``[B, L, D]``."""
        b, _, n, _ = o.shape
        x = x + mod[2] * self.proj(o.transpose(1, 2).reshape(b, n, -1))
        return x + mod[5] * self.mlp(modulate(self.norm2(x), mod[3], mod[4]))


class Block(nn.Module):
    """Single-stream DiT block: one set of weights for all tokens, bidirectional attention."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.stream = AdaLNStream(width, heads, mlp_ratio)

    def forward(self, x: torch.Tensor, c: torch.Tensor, n_action: int | None = None) -> torch.Tensor:
        """x ``[B, L, D]``, c ``[B, D]`` (SiLU'd); ``n_action`` is unused (the dual-stream block's signature)."""
        q, k, v, mod = self.stream.pre_attention(x, c)
        return self.stream.post_attention(x, attention(q, k, v), mod)


class FinalLayer(nn.Module):
    """LayerNorm + AdaLN shift/scale (zero init) before a modality's output projection."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaln = nn.Linear(width, 2 * width)
        nn.init.zeros_(self.adaln.weight)
        nn.init.zeros_(self.adaln.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln(c).unsqueeze(1).chunk(2, dim=-1)
        return modulate(self.norm(x), shift, scale)
