"""The closed-loop policy contract, the receding-horizon chunk queue, and two reference policies.

A policy is anything with ``reset(seed=None)`` and ``act(obs) -> action``::

    obs = {"image": uint8 [H, W, 3], "state": float32 [S], "task": str}
    action = float32 [A]

Optional attributes the evaluation harness checks against the environment before any rollout:
``action_dim: int`` and ``image_size: int | (H, W)``. A policy that records ``latencies`` (seconds
per model call) gets its inference latency reported.

Chunked policies (diffusion / flow-matching decoders, world-model policies) predict ``H`` future
actions at once. ``ChunkedPolicy`` owns the timeline so that models only implement
``predict_chunk``::

    step t:    0   1   2   3   4   5   6   7   8 ...
    predict:   P(history up to t=0) -> a0..a{H-1}     P(history up to t=4) -> ...
    execute:   a0  a1  a2  a3 | b0  b1  b2  b3 | ...            (n_action_steps = 4 of H)

With ``temporal_ensemble`` set (ACT's scheme), a chunk is predicted at EVERY step and the action
executed at step t is the average of every chunk's prediction for t, weighted ``exp(-k * i)``
where ``i = 0`` is the oldest prediction (older predictions weigh more: smoother motion).
"""

from __future__ import annotations

import collections
import inspect
import time
from typing import Any, Protocol, runtime_checkable

import numpy as np


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


class ChunkedPolicy:
    """Receding-horizon execution of action chunks; subclasses implement ``predict_chunk``.

    Args:
        n_obs_steps: observations the model sees; the first observation of an episode is repeated
            to fill the history.
        n_action_steps: actions executed from each chunk before predicting the next one
            (ignored with ``temporal_ensemble``, which re-predicts every step).
        temporal_ensemble: ``k`` of the exponential weights, or None for plain chunk execution.

    ``latencies`` holds the wall time (seconds) of every ``predict_chunk`` call since construction.
    """

    action_dim: int | None = None
    image_size: int | tuple[int, int] | None = None

    def __init__(self, n_obs_steps: int = 1, n_action_steps: int = 8, temporal_ensemble: float | None = None):
        if n_obs_steps < 1 or n_action_steps < 1:
            raise ValueError(f"n_obs_steps and n_action_steps must be >= 1, got {n_obs_steps}, {n_action_steps}")
        self.n_obs_steps, self.n_action_steps = n_obs_steps, n_action_steps
        self.temporal_ensemble = temporal_ensemble
        self.latencies: list[float] = []
        self.reset()

    # ---------------------------------------------------------------- for subclasses

    def predict_chunk(self, obs_history: dict[str, Any]) -> np.ndarray:
        """Predict an action chunk float [H, A] from the observation history.

        ``obs_history``: ``{"image": uint8 [n_obs_steps, H, W, 3], "state": float32 [n_obs_steps, S],
        "task": str}``, oldest first, the current observation last. ``self.episode_seed`` is the
        episode's seed (or None) for deterministic sampling.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- the timeline

    def reset(self, seed: int | None = None) -> None:
        self.episode_seed = seed
        self._history: collections.deque = collections.deque(maxlen=self.n_obs_steps)
        self._queue: collections.deque = collections.deque()
        self._step = 0
        self._ensemble: list[tuple[int, np.ndarray]] = []   # (step the chunk was predicted at, chunk)

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """One action float32 [A] for the current observation."""
        if not self._history:
            self._history.extend([obs] * self.n_obs_steps)
        else:
            self._history.append(obs)
        if self.temporal_ensemble is not None:
            action = self._ensembled_action()
        else:
            if not self._queue:
                chunk = self._timed_predict()
                if len(chunk) < self.n_action_steps:
                    raise ValueError(f"{type(self).__name__}.predict_chunk returned {len(chunk)} actions, "
                                     f"fewer than n_action_steps={self.n_action_steps}")
                self._queue.extend(chunk[: self.n_action_steps])
            action = self._queue.popleft()
        self._step += 1
        return action

    def _stacked_history(self) -> dict[str, Any]:
        frames = list(self._history)
        stacked = {k: np.stack([f[k] for f in frames]) for k in frames[-1]
                   if isinstance(frames[-1][k], np.ndarray)}
        stacked.update({k: v for k, v in frames[-1].items() if not isinstance(v, np.ndarray)})
        return stacked

    def _timed_predict(self) -> np.ndarray:
        history = self._stacked_history()
        start = time.perf_counter()
        chunk = self.predict_chunk(history)
        self.latencies.append(time.perf_counter() - start)
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or len(chunk) == 0:
            raise ValueError(f"{type(self).__name__}.predict_chunk must return [H, A], got shape {list(chunk.shape)}")
        if self.action_dim is not None and chunk.shape[1] != self.action_dim:
            raise ValueError(f"{type(self).__name__}.predict_chunk returned {chunk.shape[1]}-dim actions, "
                             f"declared action_dim={self.action_dim}")
        if not np.isfinite(chunk).all():
            raise ValueError(f"{type(self).__name__}.predict_chunk returned NaN/inf actions")
        return chunk

    def _ensembled_action(self) -> np.ndarray:
        chunk = self._timed_predict()
        self._ensemble.append((self._step, chunk))
        # keep only chunks that still cover this step (a chunk from step s covers s .. s+H-1)
        self._ensemble = [(s, c) for s, c in self._ensemble if s + len(c) > self._step]
        preds = np.stack([c[self._step - s] for s, c in self._ensemble])          # [n, A], oldest first
        weights = np.exp(-self.temporal_ensemble * np.arange(len(preds)))
        return (weights[:, None] * preds).sum(0).astype(np.float32) / weights.sum()


class ExpertPolicy:
    """Meta-World's scripted expert of whatever task the observation names (uses ``obs["state"]``)."""

    def __init__(self, action_dim: int = 4):
        self.action_dim = action_dim
        self._experts: dict[str, Any] = {}

    def reset(self, seed: int | None = None) -> None:
        pass  # the experts are stateless functions of the state

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        from pipeline.sim.metaworld_env import expert_policy

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
