"""Exponential moving average of a model's weights: the weights used for eval and export.

``ema.model`` is a frozen deep copy of the (unwrapped) model; after every optimizer step
``update`` pulls it towards the live weights::

    ema <- ema + (1 - decay_t) * (live - ema),   decay_t = min(decay, (1 + t) / (10 + t)) with warm-up

The warm-up keeps short runs from being dominated by the random initialisation. Buffers
(e.g. norm statistics) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay = float(decay)
        self.warmup = warmup
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        if self.warmup:
            return min(self.decay, (1 + updates) / (10 + updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model`` (the unwrapped live model)."""
        decay = self.decay_at(self.updates)
        ema_params = [p for p in self.model.parameters()]
        live = [p.detach() for p in model.parameters()]
        if decay == 0.0:
            torch._foreach_copy_(ema_params, live)
        else:
            torch._foreach_lerp_(ema_params, live, 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.updates += 1

    def state(self) -> dict:
        """Non-tensor state for the checkpoint's JSON (the weights go to ema.safetensors)."""
        return {"updates": self.updates, "decay": self.decay, "warmup": self.warmup}

    def load_state(self, state: dict) -> None:
        self.updates = int(state["updates"])
