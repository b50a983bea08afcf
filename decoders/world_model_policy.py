"""The world model at run time: as the policy itself (``policy=uwm``, ``WorldModelPolicy``) or as
the latent-action predictor in front of a decoder (``policy=latent``, ``WorldModelLatentSource``).

A ``worldmodel.uwm.WorldModel`` fine-tuned on a robot's actions (``wm train worldmodel --init
RUN_PRETRAINED --data DEMOS``) predicts an action chunk from its ``n_obs`` current frames with the
future frames left at full noise (``sample_policy``). ``WorldModelPolicy`` runs it on the
receding-horizon timeline of ``ChunkedPolicy``: per chunk one ``sample_policy`` call, batch 1::

    history  uint8 [n_obs, H, W, 3] (oldest first; the first frame repeated at the episode start)
      -> obs_frames uint8 [1, n_obs, 3, S, S], state raw [1, n_obs, S_dim] (when the model reads states)
      -> actions raw [1, H, A] -> chunk [H, A]

The flow noise comes from a ``torch.Generator`` reseeded with each episode's seed, so an episode's
actions are a function of its seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from decoders.policy import ChunkedPolicy, episode_generator, frames_tensor


class WorldModelPolicy(ChunkedPolicy):
    """A ``WorldModel`` in policy mode as a closed-loop policy.

    Args:
        model: a trained ``worldmodel.uwm.WorldModel`` (put in eval mode here).
        embodiment: which action adapter to act with; None when the model knows exactly one robot
            (the ``"latent"`` embodiment of LAM latent actions never counts).
        n_action_steps: actions executed per chunk; default ``action_horizon // 2``.
        temporal_ensemble: see ``ChunkedPolicy``.
        n_steps: Euler steps of the action stream (None: the model's ``config.action_steps``).
        seed: noise seed for episodes reset without a seed.

    Declares ``action_dim``, ``image_size`` ((S, S)), ``state_dim`` and ``embodiment`` for the
    harness checks. Images must already be ``S x S`` (the harness refuses other resolutions).
    """

    def __init__(
        self,
        model,
        embodiment: str | None = None,
        n_action_steps: int | None = None,
        temporal_ensemble: float | None = None,
        n_steps: int | None = None,
        seed: int = 0,
    ):
        cfg = model.config
        robots = [name for name in cfg.embodiments if name != "latent"]
        if embodiment is None and len(robots) == 1:
            embodiment = robots[0]
        if embodiment not in robots:
            raise ValueError(
                f"the world model has no robot embodiment {embodiment!r} (it knows {robots}; "
                f"fine-tune it on demos with actions first)"
            )
        spec = cfg.embodiments[embodiment]
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.embodiment = embodiment
        self.action_dim, self.state_dim = int(spec["action_dim"]), int(spec.get("state_dim") or 0)
        self.image_size = (int(cfg.image_size), int(cfg.image_size))
        self.horizon, self.n_steps, self.base_seed = cfg.action_horizon, n_steps, seed
        n_action_steps = n_action_steps or max(1, cfg.action_horizon // 2)
        if n_action_steps > cfg.action_horizon:
            raise ValueError(
                f"n_action_steps={n_action_steps} exceeds the world model's action horizon {cfg.action_horizon}"
            )
        super().__init__(cfg.n_obs, n_action_steps, temporal_ensemble)

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        self.generator = episode_generator(self.device, self.base_seed if seed is None else seed)

    def predict_chunk(self, obs_history: dict[str, Any]) -> np.ndarray:
        frames = frames_tensor(obs_history["image"])
        state = None
        if self.state_dim:
            state = torch.as_tensor(np.asarray(obs_history["state"], np.float32))[None]  # [1, n_obs, S]
            if state.shape[-1] != self.state_dim:
                raise ValueError(
                    f"observation state has {state.shape[-1]} dims, the world model was trained on {self.state_dim}"
                )
        task = obs_history.get("task")
        actions = self.model.sample_policy(
            frames,
            self.embodiment,
            task=[task] if task else None,
            state=state,
            steps=self.n_steps,
            generator=self.generator,
        )
        return actions[0].float().cpu().numpy()


class WorldModelLatentSource:
    """The latent-action predictor of ``policy=latent`` (ViPRA-style): a world model pretrained on
    video with LAM latent actions (its ``"latent"`` embodiment), sampled in policy mode, gives the
    latent-action chunk that conditions an ``ActionDecoder``.

    ``__call__(obs_history)`` -> float ``[horizon, latent_dim]``: the last ``n_obs`` frames of the
    history (the decoder may see more), video at full noise, only the current frames (never the
    future). ``reset(seed)`` reseeds the flow noise (``DecoderPolicy.reset`` calls it), so an
    episode's latents are a function of its seed.
    """

    def __init__(self, model, horizon: int | None = None, n_steps: int | None = None, seed: int = 0):
        cfg = model.config
        if "latent" not in cfg.embodiments:
            raise ValueError(
                "the world model has no 'latent' embodiment: pretrain it on LAM labels "
                "(`wm train worldmodel --labels lam`)"
            )
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.n_obs, self.latent_dim = cfg.n_obs, int(cfg.embodiments["latent"]["action_dim"])
        self.horizon = horizon or cfg.action_horizon
        if self.horizon > cfg.action_horizon:
            raise ValueError(
                f"latent horizon {self.horizon} exceeds the world model's action horizon {cfg.action_horizon}"
            )
        self.n_steps = n_steps
        self.reset(seed)

    def reset(self, seed: int) -> None:
        self.generator = episode_generator(self.device, seed)

    def __call__(self, obs_history: dict[str, Any]) -> torch.Tensor:
        images = obs_history["image"][-self.n_obs :]
        if len(images) < self.n_obs:
            raise ValueError(f"the world model needs {self.n_obs} frames, the history holds {len(images)}")
        frames = frames_tensor(images)
        task = obs_history.get("task")
        latent = self.model.sample_policy(
            frames, "latent", task=[task] if task else None, steps=self.n_steps, generator=self.generator
        )
        return latent[0, : self.horizon].float().cpu()
