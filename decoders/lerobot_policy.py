"""An ``ActionDecoder`` behind LeRobot's policy contract, so LeRobot's evaluation and robot loops can drive it.

LeRobot's contract (``lerobot.policies.pretrained.PreTrainedPolicy``) is::

    policy.reset()                              # start of an episode: clear the queues
    action = policy.select_action(batch)        # [B, A], one step, from an internal action queue
    chunk = policy.predict_action_chunk(batch)  # [B, H, A], the whole chunk

with a batch as LeRobot builds it from an environment or a dataset::

    {"observation.images.<camera>": float [B, C, H, W] in [0, 1],
     "observation.state": float [B, S],
     "task": list[str] (or one str)}

Normalisation stays inside (the decoder's own stats). As LeRobot's Diffusion Policy does, the wrapper
keeps the last ``n_obs_steps`` observations in a queue (the first one of an episode repeated) and
executes ``n_action_steps`` actions of each chunk before predicting the next. Images become the
decoder's uint8 frames (``round(255 x)``); ``camera`` picks the key when the batch holds several.
"""

from __future__ import annotations

import collections

import torch

from decoders.decoder import ActionDecoder

IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"


class LeRobotPolicy:
    def __init__(
        self,
        decoder: ActionDecoder,
        n_action_steps: int | None = None,
        camera: str | None = None,
        generator: torch.Generator | None = None,
    ):
        self.decoder = decoder.eval()
        cfg = decoder.config
        self.n_obs_steps = cfg.n_obs_steps
        self.n_action_steps = n_action_steps or max(cfg.horizon // 2, 1)
        if not 1 <= self.n_action_steps <= cfg.horizon:
            raise ValueError(
                f"n_action_steps must be in 1..{cfg.horizon} (the decoder's horizon), got {n_action_steps}"
            )
        self.camera, self.generator = camera, generator
        self.reset()

    def reset(self) -> None:
        self._frames: collections.deque = collections.deque(maxlen=self.n_obs_steps)
        self._actions: collections.deque = collections.deque()

    def _image_key(self, batch: dict) -> str:
        keys = sorted(k for k in batch if k.startswith(IMAGE_PREFIX))
        if self.camera is not None:
            key = IMAGE_PREFIX + self.camera
            if key not in batch:
                raise KeyError(f"batch has no {key!r} (image keys: {keys})")
            return key
        if len(keys) != 1:
            raise KeyError(f"the decoder reads one camera; the batch has image keys {keys}: pass camera=")
        return keys[0]

    def _push(self, batch: dict) -> None:
        images = batch[self._image_key(batch)]
        if images.dim() != 4 or images.shape[1] != self.decoder.config.image_channels:
            raise ValueError(
                f"images must be [B, {self.decoder.config.image_channels}, H, W] floats in [0, 1], "
                f"got {tuple(images.shape)}"
            )
        frames = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        if not self._frames:  # the first observation of an episode fills the history
            self._frames.extend([frames] * self.n_obs_steps)
        else:
            self._frames.append(frames)

    def _predict(self, batch: dict) -> torch.Tensor:
        state = batch.get(STATE_KEY)
        if self.decoder.config.state_dim and state is None:
            raise KeyError(f"the decoder needs {STATE_KEY!r} [B, {self.decoder.config.state_dim}]")
        frames = torch.stack(list(self._frames), dim=1)  # [B, n_obs, C, H, W]
        return self.decoder.predict_action_chunk(frames, state, batch.get("task"), generator=self.generator)

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict) -> torch.Tensor:
        """The whole chunk ``[B, H, A]`` (raw action units) for the current observation."""
        self._push(batch)
        return self._predict(batch)

    @torch.no_grad()
    def select_action(self, batch: dict) -> torch.Tensor:
        """One action ``[B, A]``; a new chunk is predicted when the queue of ``n_action_steps`` runs out."""
        self._push(batch)
        if not self._actions:
            chunk = self._predict(batch)
            self._actions.extend(chunk[:, : self.n_action_steps].transpose(0, 1))
        return self._actions.popleft()
