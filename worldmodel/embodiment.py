"""Embodiments of the world model: the config entry of one (dims and normalisation stats) and its
adapters (a linear layer each way between its actions and the model width, a state projection).

``config.embodiments = {name: embodiment_spec(stats)}``; the LAM's latent actions are one more
embodiment, ``LATENT``, added by ``WorldModelConfig`` when ``latent_action_dim > 0``.
"""

from __future__ import annotations

import torch
from torch import nn

from nets.normalize import MIN_STD, affine_params

LATENT = "latent"  # the embodiment name of the LAM's latent actions


def embodiment_spec(stats: dict | None = None, action_dim: int | None = None, state_dim: int | None = None) -> dict:
    """A config entry for one embodiment from ``{"action": {"mean", "std"}, "state": {...}}`` stats
    (as in the manifest / ``shards.stats.embodiment_stats``); dims are read from the stats when not given.

    The entry is ``{"action_dim", "state_dim", "stats": {"action": {"mean", "std"}, "state": {...}}}``: the
    stats in ``nets.normalize``'s encoding, the decoder's and the IDM's. Configs saved before held flat
    ``action_mean`` / ``action_std`` / ``state_mean`` / ``state_std`` lists; ``WorldModelConfig`` reads them."""
    stats = stats or {}
    spec: dict = {"stats": {}}
    for key, dim in (("action", action_dim), ("state", state_dim)):
        s = stats.get(key) or {}
        dim = len(s["mean"]) if dim is None and "mean" in s else (dim or 0)
        spec[f"{key}_dim"] = int(dim)
        spec["stats"][key] = {
            "mean": [float(v) for v in s.get("mean", [0.0] * dim)],
            "std": [float(v) for v in s.get("std", [1.0] * dim)],
        }
    return spec


def _upgrade_spec(spec: dict) -> dict:
    """An embodiment entry saved before the stats moved under ``"stats"`` (flat ``{key}_mean`` /
    ``{key}_std`` lists) -> the current form; a current entry is returned as it is."""
    if not any(f"{key}_{f}" in spec for key in ("action", "state") for f in ("mean", "std")):
        return spec
    out = {k: v for k, v in spec.items() if not k.endswith(("_mean", "_std"))}
    stats = dict(out.get("stats") or {})
    for key in ("action", "state"):
        if f"{key}_mean" in spec or f"{key}_std" in spec:
            stats[key] = {"mean": list(spec.get(f"{key}_mean") or []), "std": list(spec.get(f"{key}_std") or [])}
    out["stats"] = stats
    return out


class EmbodimentAdapter(nn.Module):
    """Per-embodiment action adapters (one linear layer each way) and state projection, with the
    normalisation stats from the config (``nets.normalize``'s mean_std map) as (non-persistent) buffers."""

    def __init__(self, name: str, spec: dict, width: int, n_obs: int):
        super().__init__()
        self.action_dim, self.state_dim = int(spec["action_dim"]), int(spec.get("state_dim", 0))
        self.action_in = nn.Linear(self.action_dim, width)
        self.action_out = nn.Linear(width, self.action_dim)
        nn.init.zeros_(self.action_out.weight)
        nn.init.zeros_(self.action_out.bias)
        self.state_in = nn.Linear(n_obs * self.state_dim, width) if self.state_dim else None
        stats = spec.get("stats") or {}
        for key in ("action", "state"):
            dim = getattr(self, f"{key}_dim")
            s = stats.get(key) or {}
            s = {"mean": s.get("mean") or [0.0] * dim, "std": s.get("std") or [1.0] * dim}
            if len(s["mean"]) != dim or len(s["std"]) != dim:
                raise ValueError(
                    f"embodiment {name!r}: {key} mean / std have {len(s['mean'])} / {len(s['std'])} "
                    f"entries, {key}_dim is {dim}"
                )
            # nets.normalize's mean_std map, std floored (constant dims stay finite)
            mean, std = affine_params(s, "mean_std", where=f"embodiment {name!r} {key}", min_scale=MIN_STD)
            self.register_buffer(f"{key}_mean", mean.float(), persistent=False)
            self.register_buffer(f"{key}_std", std.float(), persistent=False)

    def normalize_action(self, a: torch.Tensor) -> torch.Tensor:
        return (a - self.action_mean) / self.action_std

    def denormalize_action(self, a: torch.Tensor) -> torch.Tensor:
        return a * self.action_std + self.action_mean

    def state_features(self, state: torch.Tensor) -> torch.Tensor:
        """state raw ``[N, n_obs, state_dim]`` -> ``[N, width]``."""
        return self.state_in(((state - self.state_mean) / self.state_std).flatten(1))
