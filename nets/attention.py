"""Bidirectional multi-head attention, dispatched to the fastest kernel that fits.

``attention(q, k, v)`` uses flash-attn when it is installed and the tensors are half precision on
CUDA, and torch's ``scaled_dot_product_attention`` everywhere else (CPU, fp32, no flash-attn).

``math_attention()`` is a context in which every call takes torch's math SDPA kernel instead (no
flash-attn, no fused kernel): forward-mode AD (``torch.func.jvp``, the MeanFlow target) is not
implemented for the fused kernels, the math one supports it.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # optional GPU extra: pip install wm-pipeline[gpu]
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # no flash-attn here (it needs CUDA to build)
    _flash_attn_func = None

_MATH_ONLY = contextvars.ContextVar("math_attention", default=False)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional multi-head attention.

    q, k, v: ``[B, heads, L, head_dim]`` -> ``[B, heads, L, head_dim]``.
    """
    if (
        _flash_attn_func is not None
        and not _MATH_ONLY.get()
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    ):
        # flash-attn wants [B, L, heads, head_dim]
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


@contextlib.contextmanager
def math_attention():
    """Within it ``attention`` (and any direct SDPA call) uses torch's math kernel: what ``torch.func.jvp`` needs."""
    token = _MATH_ONLY.set(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        _MATH_ONLY.reset(token)
