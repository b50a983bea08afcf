"""Inverse-dynamics model (VPT style): a window of frames -> the real action at every frame.

Trained on the few samples that carry actions, then used to label the many that do not with
pseudo-actions (VPT: ~2k hours labelled, ~70k hours pseudo-labelled).

    frames [B, T, C, H, W] uint8 -> pixels in [-1, 1]
      Conv3d stem (kernel 3 in time: each frame sees its neighbours, i.e. the motion)
      -> per-frame conv stages (GroupNorm: samples never mix) -> pooled map -> [B, T, width]
      -> temporal transformer WITHOUT a causal mask (frame t also sees t+1, ..., T-1)
      -> per-frame head -> normalised action [B, T, A] -> raw units with the embodiment's stats

Timing convention (the shard format's): ``action[t]`` is the action taken after seeing frame
``t``; its effect first shows in frame ``t + 1``. The last frame of a window has no future
inside the window, so step ``T - 1`` is excluded from the loss, and its prediction is an
extrapolation. When labelling, use overlapping windows and keep each step's prediction from
a window in which it is not the last frame (the centre is best); the last frame of an episode
has no future at all: give it no label (mask it) rather than trusting the extrapolation.

Normalisation: per embodiment, ``(a - mean) / std`` with the stats kept in the config as
plain lists (``config.stats`` is ``shards.stats.embodiment_stats(...)``'s output, filled in by
the runtime from the manifest), so they are saved in ``config.json`` beside the weights.
Samples whose ``action_mask`` is False contribute exactly nothing to the loss or gradients.

Presets (parameter counts, 3 channels, action_dim 4):
    tiny:  32 px, channels (16, 32),               width 64,  2 layers ->  0.17 M
    small: 64 px, channels (32, 64, 128),          width 256, 4 layers ->  4.3 M
    base:  128 px, channels (64, 128, 256, 256),   width 512, 6 layers -> 25.5 M
"""

# no `from __future__ import annotations` here: PyTorchModelHubMixin finds the config class from
# the real annotation of __init__'s `config` (a string would load config.json back as a dict)
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin

from nets.augment import random_shift
from nets.conv import ResConvBlock
from nets.normalize import Normalizer
from nets.state_dict import rename_on_load, sequential_renames
from shards.model_folder import ModelFolderMixin

from .lam import frames_to_pixels


def _plain(x: Any) -> Any:
    """numpy arrays / tensors inside nested dicts -> plain lists (config.json must hold them)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


@dataclass
class IDMConfig:
    image_size: int = 64
    in_channels: int = 3
    action_dim: int = 4
    # {embodiment: {"action": {"mean": [A], "std": [A], ...}}}: shards.stats.embodiment_stats
    stats: dict = field(default_factory=dict)
    channels: tuple[int, ...] = (32, 64, 128)  # conv stages; each after the first halves the resolution
    conv3d_stem: bool = True  # motion features from neighbouring frames (VPT)
    pool_size: int = 4  # final feature map pooled to pool x pool (keeps coarse position)
    width: int = 256
    depth: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    max_frames: int = 64  # longest window (learned temporal position embedding)
    loss: str = "mse"  # "mse" | "l1" | "smooth_l1" on normalised actions
    # training-time random shift of up to this many pixels (nets.augment; one offset per window, so the
    # motion between its frames is kept); 0 = none. Labelling and predict_actions see the plain frames.
    augment_shift: int = 0
    min_std: float = 1e-3  # floor on std: constant action dims do not blow up

    def __post_init__(self):
        self.stats = _plain(self.stats)
        self.channels = tuple(self.channels)
        if any(c % 8 for c in self.channels):
            raise ValueError(f"channels {self.channels} must be multiples of 8 (GroupNorm with 8 groups)")
        if self.loss not in ("mse", "l1", "smooth_l1"):
            raise ValueError(f"loss must be 'mse', 'l1' or 'smooth_l1', got {self.loss!r}")
        if self.augment_shift < 0:
            raise ValueError(f"augment_shift must be >= 0, got {self.augment_shift}")
        if self.width % self.n_heads:
            raise ValueError(f"width {self.width} is not a multiple of n_heads {self.n_heads}")
        for emb, fields in self.stats.items():
            act = fields.get("action") if isinstance(fields, dict) else None
            if act is None:
                continue  # an action-free embodiment ("video"): nothing to normalise
            for key in ("mean", "std"):
                if len(act.get(key, [])) != self.action_dim:
                    raise ValueError(
                        f"IDM stats for embodiment {emb!r}: action {key} has "
                        f"{len(act.get(key, []))} values, action_dim is {self.action_dim}"
                    )


PRESETS: dict[str, IDMConfig] = {
    "tiny": IDMConfig(image_size=32, channels=(16, 32), width=64, depth=2, n_heads=4),
    "small": IDMConfig(image_size=64, channels=(32, 64, 128), width=256, depth=4, n_heads=4),
    "base": IDMConfig(image_size=128, channels=(64, 128, 256, 256), width=512, depth=6, n_heads=8),
}


# Checkpoints saved before the IDM used nets.conv (a pre-activation residual block of its own, ``net`` =
# GroupNorm, SiLU, conv, GroupNorm, SiLU, conv) load under the new names.
OLD_FEATURE_KEYS = sequential_renames("stages", "net", {0: "norm1", 2: "conv1", 3: "norm2", 5: "conv2"})


def _residual(ch: int) -> ResConvBlock:
    return ResConvBlock(ch, ch, groups=8, bias=True, preact=True)


class FrameFeatures(nn.Module):
    """pixels ``[B, T, C, H, W]`` -> per-frame features ``[B, T, width]``."""

    def __init__(self, cfg: IDMConfig):
        super().__init__()
        c0 = cfg.channels[0]
        if cfg.conv3d_stem:
            self.stem = nn.Conv3d(cfg.in_channels, c0, (3, 3, 3), padding=1)
        else:
            self.stem = nn.Conv2d(cfg.in_channels, c0, 3, padding=1)
        stages: list[nn.Module] = [_residual(c0)]
        for c_in, c_out in zip(cfg.channels[:-1], cfg.channels[1:]):
            stages += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), _residual(c_out)]
        stages += [nn.GroupNorm(8, cfg.channels[-1]), nn.SiLU(), nn.AdaptiveAvgPool2d(cfg.pool_size)]
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(cfg.channels[-1] * cfg.pool_size**2, cfg.width)
        rename_on_load(self, OLD_FEATURE_KEYS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        if isinstance(self.stem, nn.Conv3d):
            h = self.stem(x.transpose(1, 2)).transpose(1, 2).flatten(0, 1)  # [B*T, c0, H, W]
        else:
            h = self.stem(x.flatten(0, 1))
        return self.proj(self.stages(h).flatten(1)).unflatten(0, (b, t))


class InverseDynamicsModel(nn.Module, ModelFolderMixin, PyTorchModelHubMixin):
    """Non-causal window of frames -> per-frame actions. See the module docstring."""

    FORMAT_VERSION = 1  # config.json's _format_version: raise it (and convert older folders) when the layout changes

    def __init__(self, config: IDMConfig):
        super().__init__()
        self.config = config
        self.features = FrameFeatures(config)
        self.pos = nn.Parameter(torch.randn(1, config.max_frames, config.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            config.width,
            config.n_heads,
            int(config.width * config.mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.temporal = nn.TransformerEncoder(
            layer, config.depth, norm=nn.LayerNorm(config.width), enable_nested_tensor=False
        )
        self.head = nn.Linear(config.width, config.action_dim)
        # nets.normalize's mean_std map with the IDM's std floor; buffers only, nothing in the weights file
        self.action_embodiments = [e for e, f in config.stats.items() if isinstance(f, dict) and f.get("action")]
        self.action_normalizer = Normalizer(
            config.stats, self.action_embodiments, "action", config.action_dim, "mean_std", min_scale=config.min_std
        )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "InverseDynamicsModel":
        if name not in PRESETS:
            raise ValueError(f"unknown IDM preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(replace(PRESETS[name], **overrides))

    # -- normalisation ------------------------------------------------------------------
    def _stats(self, embodiments: Sequence[str], needed: Sequence[bool], device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean, std ``[B, A]`` per sample; samples not ``needed`` get (0, 1)."""
        norm, known = self.action_normalizer, self.action_embodiments
        for emb, need in zip(embodiments, needed):
            if need and emb not in known:
                raise ValueError(
                    f"IDM has no action stats for embodiment {emb!r} (known: "
                    f"{sorted(self.config.stats)}): fill config.stats from the manifest "
                    f"(shards.stats.embodiment_stats)"
                )
        a = self.config.action_dim
        if not any(needed):
            return torch.zeros(len(embodiments), a, device=device), torch.ones(len(embodiments), a, device=device)
        rows = torch.tensor(
            [known.index(e) if n else 0 for e, n in zip(embodiments, needed)], device=norm.center.device
        )
        need = torch.tensor(list(needed), dtype=torch.bool, device=norm.center.device)[:, None]
        mean = torch.where(need, norm.center[rows], torch.zeros_like(norm.center[rows]))
        std = torch.where(need, norm.scale[rows], torch.ones_like(norm.scale[rows]))
        return mean.to(device), std.to(device)

    # -- model --------------------------------------------------------------------------
    def _predict_normalised(self, frames: torch.Tensor) -> torch.Tensor:
        """frames uint8 ``[B, T, C, H, W]`` -> normalised actions ``[B, T, A]``."""
        if frames.ndim != 5:
            raise ValueError(f"frames must be [B, T, C, H, W], got shape {tuple(frames.shape)}")
        t = frames.shape[1]
        if t > self.config.max_frames:
            raise ValueError(f"window of {t} frames is longer than max_frames={self.config.max_frames}")
        x = frames_to_pixels(frames, self.config.image_size, self.config.in_channels)
        h = self.temporal(self.features(x) + self.pos[:, :t])
        return self.head(h).float()

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Masked regression of normalised actions on labelled samples, steps ``0 .. T-2``."""
        frames, action = batch["frames"], batch["action"]
        b, t = frames.shape[:2]
        if action.shape[:2] != (b, t) or action.shape[-1] != self.config.action_dim:
            raise ValueError(
                f"batch['action'] is {tuple(action.shape)}, expected "
                f"[{b}, {t}, {self.config.action_dim}] for frames {tuple(frames.shape)}"
            )
        sample_mask = batch["action_mask"].to(frames.device, torch.bool)
        if self.training and self.config.augment_shift:
            frames = random_shift(frames, self.config.augment_shift)
        pred = self._predict_normalised(frames)
        mean, std = self._stats(batch["embodiment"], sample_mask.tolist(), pred.device)
        # zero the targets of unlabelled samples BEFORE any arithmetic: NaN * 0 is NaN
        raw = torch.where(sample_mask[:, None, None], action.float(), torch.zeros_like(action, dtype=torch.float))
        target = (raw - mean[:, None]) / std[:, None]
        step_mask = torch.ones(b, t, dtype=torch.bool, device=pred.device)
        step_mask[:, -1] = False  # action[T-1] shows its effect after the window
        mask = (sample_mask[:, None] & step_mask)[..., None].float()  # [B, T, 1]
        if self.config.loss == "mse":
            err = (pred - target).pow(2)
        elif self.config.loss == "l1":
            err = (pred - target).abs()
        else:
            err = F.smooth_l1_loss(pred, target, reduction="none")
        n = mask.sum() * self.config.action_dim
        # multiplying by the mask gives masked entries an exactly-zero gradient; an all-unlabelled
        # batch still returns a graph-connected zero (DDP expects every parameter to get a grad)
        loss = (err * mask).sum() / n.clamp_min(1.0)

        metrics = {"loss": loss.detach(), "labelled_fraction": sample_mask.float().mean()}
        if n > 0:
            with torch.no_grad():
                sel = mask[..., 0].bool()
                p, y = pred[sel], target[sel]  # [N, A]
                sst = (y - y.mean(0)).pow(2).sum(0)
                r2 = 1 - (p - y).pow(2).sum(0) / sst.clamp_min(1e-8)
                metrics["r2"] = r2[sst > 1e-8].mean() if (sst > 1e-8).any() else torch.zeros(())
                metrics["mae_raw"] = ((p - y) * std[:, None].expand_as(pred)[sel]).abs().mean()
        values = torch.stack([v.float().to(pred.device) for v in metrics.values()]).tolist()  # one sync
        return loss, dict(zip(metrics, values))

    @torch.no_grad()
    def predict_actions(self, frames: torch.Tensor, embodiment: str | Sequence[str] | None = None) -> torch.Tensor:
        """frames uint8 ``[B, T, C, H, W]`` -> actions in raw units ``[B, T, A]``.

        ``embodiment`` names whose stats denormalise the output (one name, or one per sample);
        it may be left out when the config knows exactly one embodiment with actions. Step
        ``T - 1`` is an extrapolation (see the module docstring on edges).
        """
        b = frames.shape[0]
        if embodiment is None:
            known = [e for e, f in self.config.stats.items() if isinstance(f, dict) and "action" in f]
            if len(known) != 1:
                raise ValueError(f"predict_actions needs embodiment=...: the config has action stats for {known}")
            embodiment = known[0]
        names = [embodiment] * b if isinstance(embodiment, str) else list(embodiment)
        if len(names) != b:
            raise ValueError(f"got {len(names)} embodiment names for a batch of {b}")
        was_training = self.training
        self.eval()
        try:
            pred = self._predict_normalised(frames)
        finally:
            self.train(was_training)
        mean, std = self._stats(names, [True] * b, pred.device)
        return pred * std[:, None] + mean[:, None]


__all__ = ["IDMConfig", "PRESETS", "InverseDynamicsModel"]
