"""A small real model and dataset for the training-runtime tests.

``ToyPolicy`` predicts the action taken at each frame from that frame (a small conv net) and the
robot state. ``make_dataset`` writes real H.264 shards in which the action is a function of what
the frame shows (a bright square: action = its position and brightness), so the model can learn
it and the tests can watch the loss fall.

Registered as model ``toy`` on import, so a subprocess gets it with ``--plugin tests/toy_models.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from shards.writer import Episode, run_sharded_job
from wm_pipeline.training.registry import ModelDataMismatch, register_model

ACTION_DIM, STATE_DIM = 3, 2


@dataclass
class ToyConfig:
    action_dim: int = 0  # 0: taken from the data
    state_dim: int = 0
    image_size: list[int] | None = None  # [H, W]; None: taken from the data
    channels: int = 8
    hidden: int = 64
    action_mean: list[float] = field(default_factory=list)  # normalisation, filled from the manifest
    action_std: list[float] = field(default_factory=list)
    record_keys_to: str = ""  # test hook: per rank, append each training batch's keys,
    # the pid and the sum of the weights (JSON lines)


class ToyPolicy(nn.Module, PyTorchModelHubMixin):
    """frames uint8 [B, T, C, H, W] + state [B, T, S] -> action [B, T, A]; masked MSE in normalised units."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        if isinstance(config, dict):  # from_pretrained: the mixin passes config.json as a dict
            config = ToyConfig(**config)
        self.config = config
        h, w = config.image_size
        c = config.channels
        self.conv = nn.Sequential(
            nn.Conv2d(3, c, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ReLU()
        )
        feat = c * ((h + 3) // 4) * ((w + 3) // 4)
        self.head = nn.Sequential(
            nn.Linear(feat + config.state_dim, config.hidden), nn.ReLU(), nn.Linear(config.hidden, config.action_dim)
        )
        self.register_buffer("mean", torch.tensor(config.action_mean or [0.0] * config.action_dim))
        self.register_buffer("std", torch.tensor(config.action_std or [1.0] * config.action_dim).clamp_min(1e-3))

    def predict(self, frames: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Normalised action [B, T, A]."""
        b, t = frames.shape[:2]
        x = frames.flatten(0, 1).float() / 127.5 - 1.0
        x = self.conv(x).flatten(1)
        x = torch.cat([x, state.flatten(0, 1)[:, : self.config.state_dim]], dim=1)
        return self.head(x).view(b, t, -1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        if self.training and self.config.record_keys_to:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            row = {
                "pid": os.getpid(),
                "keys": [f"{k}@{int(s)}" for k, s in zip(batch["key"], batch["start"])],
                "param_sum": float(sum(p.detach().double().sum() for p in self.parameters())),
            }
            with open(f"{self.config.record_keys_to}.rank{rank}", "a") as f:
                f.write(json.dumps(row) + "\n")
        target = (batch["action"][..., : self.config.action_dim] - self.mean) / self.std
        err = (self.predict(batch["frames"], batch["state"]) - target).pow(2).mean(dim=(1, 2))
        mask = batch["action_mask"].float()
        loss = (err * mask).sum() / mask.sum().clamp_min(1.0)
        return loss, {"action_mse": float(loss.detach())}


def prepare(cfg, manifests: list[dict]) -> None:
    """Fill dims, image size and stats from the manifests; refuse data the model cannot use."""
    m = cfg.model
    embodied = [(name, e) for man in manifests for name, e in man["embodiments"].items() if e["action_dim"] > 0]
    if not embodied:
        raise ModelDataMismatch(f"model 'toy' needs actions, but {cfg.data.paths} holds action-free video only")
    name, emb = embodied[0]
    for key, have in (("action_dim", emb["action_dim"]), ("state_dim", emb["state_dim"])):
        if getattr(m, key) and getattr(m, key) != have:
            raise ModelDataMismatch(f"model.{key}={getattr(m, key)} but embodiment '{name}' in the data has {have}")
        setattr(m, key, have)
    size = list(cfg.data.resize or manifests[0]["resolution"])
    if m.image_size and list(m.image_size) != size:
        raise ModelDataMismatch(
            f"model.image_size={list(m.image_size)} but the data gives {size} frames "
            f"(set data.resize or model.image_size)"
        )
    m.image_size = size
    stats = emb["stats"]["action"]
    m.action_mean, m.action_std = list(stats["mean"]), list(stats["std"])


PRESETS = {
    "tiny": ToyConfig(channels=8, hidden=64),
    "small": ToyConfig(channels=16, hidden=128),
    "base": ToyConfig(channels=32, hidden=256),
}
register_model("toy", ToyConfig, ToyPolicy, PRESETS, prepare=prepare, required_keys=("frames", "action", "state"))


# ---------------------------------------------------------------- data


def _episode(index: int, n_frames: int, size: int, seed: int) -> Episode:
    """A bright square at a random place per frame; action = (x, y, brightness) of the square."""
    rng = np.random.default_rng([seed, index])
    frames = np.zeros((n_frames, size, size, 3), np.uint8)
    action = np.zeros((n_frames, ACTION_DIM), np.float32)
    side = size // 4
    for t in range(n_frames):
        x, y = rng.integers(0, size - side, 2)
        level = rng.uniform(0.4, 1.0)
        frames[t, y : y + side, x : x + side] = int(255 * level)
        action[t] = [x / (size - side) * 2 - 1, y / (size - side) * 2 - 1, level]
    state = np.stack([np.linspace(0, 1, n_frames), np.full(n_frames, index % 2)], 1).astype(np.float32)
    return Episode(
        key=f"ep{index:04d}",
        frames={"corner": frames},
        fps=10.0,
        embodiment="toybot",
        task="square",
        action=action,
        state=state,
        episode_index=index,
    )


def make_episodes(job: tuple[int, int, int, int]):
    index, n_frames, size, seed = job
    yield _episode(index, n_frames, size, seed)


def make_dataset(
    out_dir: str | Path, episodes: int = 8, frames: int = 12, size: int = 32, per_shard: int = 4, seed: int = 0
) -> Path:
    """Write a toy shard dataset (real H.264) into ``out_dir``; returns it."""
    result = run_sharded_job(
        out_dir,
        [(i, frames, size, seed) for i in range(episodes)],
        make_episodes,
        samples_per_shard=per_shard,
        workers=1,
        created_by="tests/toy_models.py",
        desc="toy data",
    )
    assert result.exit_code == 0, result.failures
    return Path(out_dir)


def plugin_env() -> dict[str, str]:
    """Environment for a subprocess `wm train toy ...`: the plugin and a quiet, offline, single-thread setup."""
    here = Path(__file__).resolve()
    env = dict(
        os.environ,
        WM_PLUGINS=str(here),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(here.parent.parent), os.environ.get("PYTHONPATH", "")]),
    )
    return env
