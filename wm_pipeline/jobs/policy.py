"""The closed-loop policy contract and two reference policies (the chunk queue is re-exported).

A policy is anything with ``reset(seed=None)`` and ``act(obs) -> action``::

    obs = {"image": uint8 [H, W, 3], "state": float32 [S], "task": str}
    action = float32 [A]

Optional attributes the evaluation harness checks against the environment before any rollout:
``action_dim: int`` and ``image_size: int | (H, W)``. A policy that records ``latencies`` (seconds
per model call) gets its inference latency reported.

Chunked policies (flow-matching decoders, world-model policies) build on ``ChunkedPolicy``, the
receding-horizon chunk queue, which lives in ``decoders.policy`` (models may not import
``pipeline``) and is re-exported here, as is ``DecoderPolicy``.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

import numpy as np

from decoders.policy import ChunkedPolicy, DecoderPolicy  # noqa: F401  (re-exported)


@runtime_checkable
class Policy(Protocol):
    """What the evaluation harness drives. ``reset`` starts an episode (``seed``: the episode's
    seed, for policies that sample); ``act`` maps one observation to one action float32 [A]."""

    def reset(self, seed: int | None = None) -> None: ...

    def act(self, obs: dict[str, Any]) -> np.ndarray: ...


def reset_policy(policy: Policy, seed: int | None) -> None:
    """Call ``policy.reset``, passing the episode seed only if the policy's ``reset`` accepts one."""
    params = inspect.signature(policy.reset).parameters
    takes_seed = "seed" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    policy.reset(seed=seed) if takes_seed else policy.reset()


class ExpertPolicy:
    """Meta-World's scripted expert of whatever task the observation names (uses ``obs["state"]``)."""

    def __init__(self, action_dim: int = 4):
        self.action_dim = action_dim
        self._experts: dict[str, Any] = {}

    def reset(self, seed: int | None = None) -> None:
        pass  # the experts are stateless functions of the state

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        from wm_pipeline.sim.metaworld_env import expert_policy

        task = obs["task"]
        if task not in self._experts:
            self._experts[task] = expert_policy(task)
        action = np.asarray(self._experts[task](np.asarray(obs["state"], dtype=np.float64)), dtype=np.float32)
        return np.clip(action, -1.0, 1.0)


class RandomPolicy:
    """Uniform random actions in [-1, 1]^A; reseeded by ``reset(seed)`` so episodes are reproducible."""

    def __init__(self, action_dim: int = 4, seed: int = 0):
        self.action_dim = action_dim
        self._rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self._rng = np.random.default_rng(seed)

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        return self._rng.uniform(-1.0, 1.0, size=self.action_dim).astype(np.float32)
