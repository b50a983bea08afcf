"""Per-embodiment normalisation of actions and states, from the manifest's stats.

The stats travel inside the model's config (plain lists, so they land in ``config.json`` beside
the weights) in the same nested form ``shards.stats.embodiment_stats`` returns::

    {"sawyer": {"action": {"mean": [...], "std": [...], "min": [...], "max": [...],
                           "q01": [...], "q99": [...]},
                "state":  {...}}}

Modes (one per key):

- ``"min_max"`` (default for actions): ``[min, max] -> [-1, 1]``. The flow target then lives on the
  same scale as the unit-Gaussian noise, and bounded robot actions stay bounded.
- ``"mean_std"`` (default for states): zero mean, unit variance; states are only inputs, and a
  single outlier in min/max would squash every other value.
- ``"quantile"``: ``[q01, q99] -> [-1, 1]`` (robust to outliers; values outside exceed 1).

Every mode is an affine map ``x -> (x - center) / scale``, so the round trip is exact to float
precision. A degenerate dimension (zero range or zero std: a gripper that never moves) gets
``scale = 1`` instead of a division by ~0: the round trip stays exact even for values never seen.
``min_scale`` replaces that rule by a floor, ``scale = max(scale, min_scale)``: the world model and
the inverse-dynamics model normalise ``mean_std`` with a floor of 1e-3 (``MIN_STD``).

This is the one stats encoding of every model package: ``{"mean": [...], "std": [...], ...}`` per key
(``"action"``, ``"state"``), per embodiment, as above.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("min_max", "mean_std", "quantile")
DEFAULT_MODES = {"action": "min_max", "state": "mean_std"}
_EPS = 1e-6
MIN_STD = 1e-3  # the world model's and the IDM's floor on a std (``min_scale``)
_NEEDS = {"min_max": ("min", "max"), "mean_std": ("mean", "std"), "quantile": ("q01", "q99")}


def stats_of(x: torch.Tensor) -> dict[str, list[float]]:
    """Stats of samples ``x [N, D]`` as plain lists (mean, std, min, max, q01, q99).

    The data layer computes the real stats from shards; this is for tests and small in-memory data.
    """
    x = x.detach().double().reshape(-1, x.shape[-1])
    q = torch.quantile(x, torch.tensor([0.01, 0.99], dtype=x.dtype), dim=0)
    return {
        "mean": x.mean(0).tolist(),
        "std": x.std(0, unbiased=False).tolist(),
        "min": x.min(0).values.tolist(),
        "max": x.max(0).values.tolist(),
        "q01": q[0].tolist(),
        "q99": q[1].tolist(),
    }


def plain_stats(stats: dict) -> dict:
    """Nested stats with arrays / tensors / numpy scalars -> the same nesting with plain float lists,
    so they serialise into ``config.json`` (``shards.stats.embodiment_stats`` returns float32 arrays)."""
    if isinstance(stats, dict):
        return {str(k): plain_stats(v) for k, v in stats.items()}
    if hasattr(stats, "tolist"):  # numpy array / scalar, torch tensor
        stats = stats.tolist()
    if isinstance(stats, (list, tuple)):
        return [plain_stats(v) for v in stats]
    return float(stats) if isinstance(stats, (int, float)) else stats


def affine_params(
    stats: dict, mode: str, *, where: str = "stats", min_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(center, scale)`` float64 ``[D]`` for one key's stats; ``where`` names it in errors.
    ``min_scale``: None, a degenerate dim gets scale 1; a number, scales are floored at it."""
    if mode not in MODES:
        raise ValueError(f"{where}: unknown normalisation mode {mode!r} (expected one of {MODES})")
    lo_name, hi_name = _NEEDS[mode]
    missing = [k for k in (lo_name, hi_name) if k not in stats]
    if missing:
        raise ValueError(f"{where}: mode {mode!r} needs stats {missing}, found {sorted(stats)}")
    lo = torch.as_tensor(stats[lo_name], dtype=torch.float64).flatten()
    hi = torch.as_tensor(stats[hi_name], dtype=torch.float64).flatten()
    if lo.shape != hi.shape:
        raise ValueError(f"{where}: {lo_name} has {lo.numel()} dims but {hi_name} has {hi.numel()}")
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError(f"{where}: stats hold non-finite values")
    if mode == "mean_std":
        center, scale = lo, hi
    else:
        center, scale = (lo + hi) / 2, (hi - lo) / 2
    if min_scale is not None:
        return center, scale.clamp_min(min_scale)
    scale = torch.where(scale.abs() < _EPS, torch.ones_like(scale), scale)
    return center, scale


class Normalizer(nn.Module):
    """Normalises one key (``"action"`` or ``"state"``) per embodiment.

    stats: ``{embodiment: {key: {...}}}``; embodiments: the ordered names (their index is the
    row of the ``center`` / ``scale`` tables ``[E, D]``, kept as non-persistent buffers so they
    follow ``.to(device)`` but never enter the weights file: the config is their one home).
    """

    def __init__(
        self,
        stats: dict,
        embodiments: list[str],
        key: str,
        dim: int,
        mode: str | None = None,
        min_scale: float | None = None,
    ):
        super().__init__()
        self.key, self.dim = key, dim
        self.mode = mode or DEFAULT_MODES.get(key, "mean_std")
        centers, scales = [], []
        for emb in embodiments:
            where = f"stats[{emb!r}][{key!r}]"
            if key not in stats.get(emb, {}):
                raise ValueError(f"{where}: missing (the model needs {key} stats for every embodiment it trains on)")
            c, s = affine_params(stats[emb][key], self.mode, where=where, min_scale=min_scale)
            if c.numel() != dim:
                raise ValueError(f"{where}: stats have {c.numel()} dims but the model expects {key}_dim={dim}")
            centers.append(c)
            scales.append(s)
        shape = (len(embodiments), dim)
        center = torch.stack(centers).float() if centers else torch.zeros(shape)
        scale = torch.stack(scales).float() if scales else torch.ones(shape)
        self.register_buffer("center", center, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def _rows(self, x: torch.Tensor, emb_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample ``center`` / ``scale`` shaped to broadcast over ``x [B, ..., D]``."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (self.dim,)
        return self.center[emb_index].view(shape), self.scale[emb_index].view(shape)

    def normalize(self, x: torch.Tensor, emb_index: torch.Tensor) -> torch.Tensor:
        """x: raw ``[B, ..., D]``; emb_index: long ``[B]`` -> normalised, same shape."""
        c, s = self._rows(x, emb_index)
        return (x - c) / s

    def unnormalize(self, x: torch.Tensor, emb_index: torch.Tensor) -> torch.Tensor:
        """Inverse of ``normalize``."""
        c, s = self._rows(x, emb_index)
        return x * s + c

    def extra_repr(self) -> str:
        return f"key={self.key!r}, dim={self.dim}, mode={self.mode!r}, embodiments={self.center.shape[0]}"
