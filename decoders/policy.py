"""Closed-loop policies around action-chunk models: the receding-horizon queue and the decoder policy.

A policy is anything with ``reset(seed=None)`` and ``act(obs) -> action``::

    obs = {"image": uint8 [H, W, 3], "state": float32 [S], "task": str}
    action = float32 [A]

Optional attributes an evaluation harness checks against the environment before any rollout:
``action_dim: int``, ``image_size: int | (H, W)`` and ``embodiment: str``. A policy that records
``latencies`` (seconds per model call) gets its inference latency reported.

Chunked policies (diffusion / flow-matching decoders, world-model policies) predict ``H`` future
actions at once. ``ChunkedPolicy`` owns the timeline so that models only implement
``predict_chunk``::

    step t:    0   1   2   3   4   5   6   7   8 ...
    predict:   P(history up to t=0) -> a0..a{H-1}     P(history up to t=4) -> ...
    execute:   a0  a1  a2  a3 | b0  b1  b2  b3 | ...            (n_action_steps = 4 of H)

With ``temporal_ensemble`` set (ACT's scheme), a chunk is predicted at EVERY step and the action
executed at step t is the average of every chunk's prediction for t, weighted ``exp(-k * i)``
where ``i = 0`` is the oldest prediction (older predictions weigh more: smoother motion).

Batched (``act_batch``): several episodes at once, one per *slot* (an environment of a batched
evaluation). Each slot keeps its own timeline (history, queue, step, ensemble, seed and the
subclass's ``EPISODE_STATE``); per step, every slot that needs a chunk is predicted in ONE
``predict_chunks`` call (default: ``predict_chunk`` per slot, with that slot's state in place;
``DecoderPolicy`` runs one batched network call with each episode's own noise), so an episode's
actions are the same whatever else runs beside it.

``DecoderPolicy`` drives an ``ActionDecoder`` (decoders/decoder.py) on this timeline: one
``predict_action_chunk`` per chunk from the last ``n_obs_steps`` frames, the current state and the
task, with flow noise from a ``torch.Generator`` reseeded with the episode's seed, so an episode's
actions are a function of its seed. A ``latent_source`` (frames -> latent-action chunk) feeds
decoders that are conditioned on latent actions.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

# obs_history (see ChunkedPolicy.predict_chunk) -> latent-action chunk float [H_l, D_l]
LatentSource = Callable[[dict[str, Any]], "np.ndarray | torch.Tensor"]


def frames_tensor(images: np.ndarray) -> torch.Tensor:
    """History images uint8 ``[T, H, W, 3]`` -> a batch of one, uint8 ``[1, T, 3, H, W]``."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)[None]


def episode_generator(device: torch.device, seed: int) -> torch.Generator:
    """A fresh noise generator for one episode: sampled actions become a function of the seed."""
    return torch.Generator(device=device).manual_seed(seed)


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
    # attributes that belong to one episode: swapped in and out per slot by the batched path
    EPISODE_STATE: tuple[str, ...] = ("episode_seed", "_history", "_queue", "_step", "_ensemble")

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
        self._ensemble: list[tuple[int, np.ndarray]] = []  # (step the chunk was predicted at, chunk)

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
                self._enqueue(self._timed_predict())
            action = self._queue.popleft()
        self._step += 1
        return action

    def _enqueue(self, chunk: np.ndarray) -> None:
        if len(chunk) < self.n_action_steps:
            raise ValueError(
                f"{type(self).__name__}.predict_chunk returned {len(chunk)} actions, "
                f"fewer than n_action_steps={self.n_action_steps}"
            )
        self._queue.extend(chunk[: self.n_action_steps])

    # ---------------------------------------------------------------- batched: one slot per episode

    def _slot_state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._episode_names}

    def _enter(self, slot: int) -> None:
        for name, value in self._slots[slot].items():
            setattr(self, name, value)

    def _leave(self, slot: int) -> None:
        self._slots[slot] = self._slot_state()

    def reset_slot(self, slot: int, seed: int | None = None) -> None:
        """Start an episode (seed ``seed``) in ``slot``; the other slots keep theirs."""
        if not hasattr(self, "_slots"):
            self._slots: dict[int, dict[str, Any]] = {}
        before = {name: id(value) for name, value in vars(self).items()}
        self.reset(seed)
        # per-episode state: EPISODE_STATE and whatever reset() assigned anew (a subclass's generator, ...)
        self._episode_names = set(self.EPISODE_STATE) | {
            name for name, value in vars(self).items() if name not in before or id(value) != before[name]
        }
        self._leave(slot)

    def act_batch(self, observations: list[dict[str, Any]], slots: list[int]) -> list[np.ndarray]:
        """One action per ``slots[i]`` for ``observations[i]``; the slots needing a chunk this step are
        predicted together in one ``predict_chunks`` call. Equal to ``act`` per episode."""
        needing = []
        for slot, obs in zip(slots, observations):
            self._enter(slot)
            if not self._history:
                self._history.extend([obs] * self.n_obs_steps)
            else:
                self._history.append(obs)
            if self.temporal_ensemble is not None or not self._queue:
                needing.append(slot)
            self._leave(slot)
        chunks = {}
        if needing:
            histories = []
            for slot in needing:
                self._enter(slot)
                histories.append(self._stacked_history())
            start = time.perf_counter()
            predicted = self.predict_chunks(histories, needing)
            self.latencies.append(time.perf_counter() - start)
            chunks = {slot: self._checked(c) for slot, c in zip(needing, predicted)}
        actions = []
        for slot in slots:
            self._enter(slot)
            if self.temporal_ensemble is not None:
                action = self._ensemble_step(chunks[slot])
            else:
                if slot in chunks:
                    self._enqueue(chunks[slot])
                action = self._queue.popleft()
            self._step += 1
            self._leave(slot)
            actions.append(action)
        return actions

    def predict_chunks(self, histories: list[dict[str, Any]], slots: list[int]) -> list[np.ndarray]:
        """Chunks for several slots' histories (``histories[i]`` is slot ``slots[i]``'s). Default: one
        ``predict_chunk`` per slot with that slot's episode state in place; override for one batched call."""
        out = []
        for slot, history in zip(slots, histories):
            self._enter(slot)
            out.append(self.predict_chunk(history))
            self._leave(slot)
        return out

    def _stacked_history(self) -> dict[str, Any]:
        frames = list(self._history)
        stacked = {k: np.stack([f[k] for f in frames]) for k in frames[-1] if isinstance(frames[-1][k], np.ndarray)}
        stacked.update({k: v for k, v in frames[-1].items() if not isinstance(v, np.ndarray)})
        return stacked

    def _timed_predict(self) -> np.ndarray:
        history = self._stacked_history()
        start = time.perf_counter()
        chunk = self.predict_chunk(history)
        self.latencies.append(time.perf_counter() - start)
        return self._checked(chunk)

    def _checked(self, chunk) -> np.ndarray:
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or len(chunk) == 0:
            raise ValueError(f"{type(self).__name__}.predict_chunk must return [H, A], got shape {list(chunk.shape)}")
        if self.action_dim is not None and chunk.shape[1] != self.action_dim:
            raise ValueError(
                f"{type(self).__name__}.predict_chunk returned {chunk.shape[1]}-dim actions, "
                f"declared action_dim={self.action_dim}"
            )
        if not np.isfinite(chunk).all():
            raise ValueError(f"{type(self).__name__}.predict_chunk returned NaN/inf actions")
        return chunk

    def _ensembled_action(self) -> np.ndarray:
        return self._ensemble_step(self._timed_predict())

    def _ensemble_step(self, chunk: np.ndarray) -> np.ndarray:
        self._ensemble.append((self._step, chunk))
        # keep only chunks that still cover this step (a chunk from step s covers s .. s+H-1)
        self._ensemble = [(s, c) for s, c in self._ensemble if s + len(c) > self._step]
        preds = np.stack([c[self._step - s] for s, c in self._ensemble])  # [n, A], oldest first
        weights = np.exp(-self.temporal_ensemble * np.arange(len(preds)))
        return (weights[:, None] * preds).sum(0).astype(np.float32) / weights.sum()


class DecoderPolicy(ChunkedPolicy):
    """An ``ActionDecoder`` as a closed-loop policy.

    Args:
        decoder: a trained ``decoders.decoder.ActionDecoder`` (put in eval mode here).
        n_action_steps: actions executed per chunk; default ``horizon // 2`` (8 of 16).
        temporal_ensemble: see ``ChunkedPolicy``.
        n_steps: sampling steps (None: the decoder's config: 10 for fm, 1 for meanflow).
        embodiment: which of the decoder's embodiments (normalisation stats) to act as; None when
            the decoder knows exactly one.
        latent_source: ``fn(obs_history) -> [H_l, D_l]`` for decoders conditioned on latent
            actions (``config.latent_dim > 0``): e.g. a world model in policy mode. It sees only the
            current observation history, never the future.
        seed: noise seed for episodes reset without a seed.

    Declares ``action_dim``, ``image_size`` ((H, W)), ``state_dim`` and ``embodiment`` so that a
    harness can refuse a mismatching environment before any rollout.
    """

    EPISODE_STATE = ChunkedPolicy.EPISODE_STATE + ("generator",)

    def __init__(
        self,
        decoder,
        n_action_steps: int | None = None,
        temporal_ensemble: float | None = None,
        n_steps: int | None = None,
        embodiment: str | None = None,
        latent_source: LatentSource | None = None,
        seed: int = 0,
    ):
        cfg = decoder.config
        self.decoder = decoder.eval()
        self.device = next(decoder.parameters()).device
        self.action_dim, self.state_dim = cfg.action_dim, cfg.state_dim
        self.image_size = tuple(int(s) for s in cfg.image_size)
        self.horizon, self.n_steps, self.base_seed = cfg.horizon, n_steps, seed
        known = list(cfg.stats)
        if embodiment is None and len(known) == 1:
            embodiment = known[0]
        if embodiment is not None and embodiment not in known:
            raise ValueError(f"the decoder has no embodiment {embodiment!r} (it knows {known})")
        self.embodiment = embodiment
        if cfg.latent_dim and latent_source is None:
            raise ValueError(
                f"this decoder is conditioned on {cfg.latent_dim}-dim latent actions "
                f"({cfg.latent_key}): give a latent_source (frames -> latent chunk)"
            )
        self.latent_source = latent_source
        n_action_steps = n_action_steps or max(1, cfg.horizon // 2)
        if n_action_steps > cfg.horizon:
            raise ValueError(f"n_action_steps={n_action_steps} exceeds the decoder's horizon {cfg.horizon}")
        super().__init__(cfg.n_obs_steps, n_action_steps, temporal_ensemble)

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self.generator = episode_generator(self.device, self.base_seed if seed is None else seed)
        if hasattr(self.latent_source, "reset"):  # a sampling latent source reseeds its own noise
            self.latent_source.reset(self.base_seed if seed is None else seed)

    def predict_chunk(self, obs_history: dict[str, Any]) -> np.ndarray:
        latent = None
        if self.latent_source is not None:
            latent = torch.as_tensor(self.latent_source(obs_history)).float()[None]
        chunk = self.decoder.predict_action_chunk(
            frames_tensor(obs_history["image"]),
            self._state([obs_history]),
            obs_history.get("task"),
            latent,
            generator=self.generator,
            n_steps=self.n_steps,
            embodiment=self.embodiment,
        )
        return chunk[0].cpu().numpy()

    def _state(self, histories: list[dict[str, Any]]) -> torch.Tensor | None:
        """The current state of each history ``[B, S]`` (None when the decoder takes no state)."""
        if not self.state_dim:
            return None
        state = torch.as_tensor(np.stack([np.asarray(h["state"][-1], np.float32) for h in histories]))
        if state.shape[-1] != self.state_dim:
            raise ValueError(
                f"observation state has {state.shape[-1]} dims, the decoder was trained on {self.state_dim}"
            )
        return state

    def reset_slot(self, slot: int, seed: int | None = None) -> None:
        if self.latent_source is not None:
            # a latent source (e.g. a world model) keeps its own per-episode state, which slots cannot share
            raise ValueError("batched episodes (act_batch) are not supported with a latent_source; use one env")
        super().reset_slot(slot, seed)

    def predict_chunks(self, histories: list[dict[str, Any]], slots: list[int]) -> list[np.ndarray]:
        """One batched decoder call for all ``slots``; each episode's noise is drawn from its own
        generator exactly as ``predict_chunk`` draws it, so chunks equal the one-at-a-time ones (up to
        float rounding of batched kernels)."""
        if len(slots) == 1:
            return super().predict_chunks(histories, slots)
        cfg = self.decoder.config
        noise = []
        for slot in slots:
            self._enter(slot)
            noise.append(torch.randn((1, cfg.horizon, cfg.action_dim), generator=self.generator, device=self.device))
            self._leave(slot)
        chunk = self.decoder.predict_action_chunk(
            torch.cat([frames_tensor(h["image"]) for h in histories]),
            self._state(histories),
            [h.get("task") for h in histories],
            None,
            n_steps=self.n_steps,
            embodiment=self.embodiment,
            noise=torch.cat(noise),
        )
        return list(chunk.cpu().numpy())
