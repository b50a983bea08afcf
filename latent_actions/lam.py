"""Latent-action model (Genie / LAPA / ViPRA style): learn actions from video alone.

For every pair of frames ``(x_t, x_{t+k})`` (``k = frame_gap``) of a window, an encoder looks
at both frames and emits a small latent action (``n_tokens`` vectors of ``latent_dim``, through
a VQ codebook of a few codes or a Gaussian bottleneck); a decoder sees only ``x_t`` and the
latent and must predict ``x_{t+k}``. Whatever the decoder cannot infer from ``x_t`` (what
moved, and where) has to pass through the bottleneck, so the latent becomes an action.

    frames [B, T, C, H, W] uint8 -> pixels in [-1, 1]
      encoder: patches of x_t and x_{t+k} (+ frame embedding) + n_tokens queries
               -> transformer -> queries -> bottleneck -> latent [B*(T-k), n_tokens, latent_dim]
      decoder: patches of x_t, FiLM-modulated by the latent, + latent tokens
               -> transformer -> patch pixels -> x_t + residual  ~  x_{t+k}

A window of T frames gives T - k transitions, all used. The model never reads
``batch["action"]``: it trains on action-free video.

Failure modes and their guards:
- decoder copying ``x_t`` (latent ignored): ``copy_loss`` (the same loss between ``x_t`` and
  ``x_{t+k}``) is reported beside ``recon_loss``; ``recon_over_copy`` near 1 means the latent
  carries nothing. The
  decoder predicts a residual over ``x_t``, so copying is its starting point and every gain
  below it must come through the latent; the bottleneck (few codes / low dim + KL) keeps the
  latent from carrying the frame itself.
- decoder memorising ``x_t -> x_{t+k}`` (on small data each frame identifies its clip, and the
  decoder fits the batch with every latent equal: measured in tests/test_lam.py, recon/copy
  0.33 with one code for all clips): low ``recon_over_copy`` does not prove the latent is used.
  ``probe_latent_usage`` decodes with the latents of other clips; ``shuffled_over_own`` near 1
  means the latent is ignored. Run it on held-out windows now and then.
- codebook collapse: NSVQ (default; straight-through + EMA codebook is the other estimator),
  data initialisation, dead-code restart; ``perplexity`` and ``dead_codes`` are metrics. With
  straight-through + EMA the tiny test model's codes stayed nearly equal vectors (initialised
  from near-identical encoder outputs) and recon/copy stalled at 0.58 after 250 steps; NSVQ
  reached 0.34 with 7 distinct code pairs for 8 motions in ~100 steps.
- frame gap vs control rate: ``frame_gap`` is a config field; pick it so that ``k / fps``
  matches the interval at which the robot's actions change (LAPA uses ~0.6 s).

Presets (parameter counts, 3 channels, VQ):
    tiny:  32 px, patch 4, width 64,  enc 2 / dec 2 layers, 2 tokens x 8,  8 codes, k 1  ->  0.23 M
    small: 64 px, patch 8, width 128, enc 3 / dec 3 layers, 4 tokens x 16, 8 codes, k 4  ->  1.3 M
    base:  128 px, patch 8, width 512, enc 8 / dec 6 layers, 4 tokens x 32, 16 codes, k 4 -> 45.1 M
(small: ~0.25 s per step of 16 windows x 2 transitions on 2 CPU cores.)
"""

# no `from __future__ import annotations` here: PyTorchModelHubMixin finds the config class from
# the real annotation of __init__'s `config` (a string would load config.json back as a dict)
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin

from shards.model_folder import ModelFolderMixin

from .quantizer import BottleneckOutput, GaussianBottleneck, VectorQuantizer


@dataclass
class LAMConfig:
    image_size: int = 64  # frames must be image_size x image_size (resize in the stream)
    in_channels: int = 3
    patch_size: int = 8
    frame_gap: int = 1  # k: the latent explains x_t -> x_{t+k}
    width: int = 256
    enc_depth: int = 4
    dec_depth: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    n_tokens: int = 4  # latent-action tokens per transition
    latent_dim: int = 16  # size of each token (code dimension for VQ)
    bottleneck: str = "vq"  # "vq" | "continuous"
    num_codes: int = 8
    vq_estimator: str = "nsvq"  # "nsvq" | "straight_through" (see quantizer.py)
    commitment: float = 0.25
    ema_decay: float = 0.99  # straight_through only; 0 learns the codebook by gradient
    dead_after: int = 100  # training steps without use before a code is restarted
    kl_weight: float = 1e-3  # continuous bottleneck only
    # "mse" | "l1" on pixels in [-1, 1]. With small moving objects L1's optimum without a
    # useful latent is the median, i.e. a copy of x_t, and training stalls there; MSE's is the
    # blurred mean, whose gradient pulls information into the latent (measured on the test's
    # 8 directions, tiny preset, 250 steps: L1 recon/copy 0.93 with the latent unused, MSE 0.018)
    recon_loss: str = "mse"
    predict_residual: bool = True  # decoder outputs x_{t+k} - x_t (copying is the start point)
    # the encoder also embeds x_{t+k} - x_t (added to the x_{t+k} tokens): in robot video the two
    # frames differ in a few pixels, so without it the encoder's outputs vary with the scene, not
    # the motion, and every transition lands on the same code (measured: docs/RESULTS.md)
    encoder_motion: bool = True
    # divide the reconstruction loss by the copy loss of the batch (no gradient through it): the
    # loss reads as "share of the motion not explained" whatever the share of static pixels, and
    # the bottleneck terms (KL, commitment) are weighed against that instead of a ~1e-4 pixel MSE
    normalize_recon: bool = True
    # VQ only: standardise the encoder output per dimension (BatchNorm without affine, running
    # statistics at inference) before the nearest-code search. Transitions of one robot scene differ
    # little, so raw encoder outputs sit in a tiny cluster that drifts away from the codebook faster
    # than the codes follow; NSVQ's noise (as large as the distance to the code) then drowns the
    # differences and every transition maps to one code (measured: docs/RESULTS.md)
    standardize_latent: bool = True

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.n_heads:
            raise ValueError(f"width {self.width} is not a multiple of n_heads {self.n_heads}")
        if self.bottleneck not in ("vq", "continuous"):
            raise ValueError(f"bottleneck must be 'vq' or 'continuous', got {self.bottleneck!r}")
        if self.recon_loss not in ("l1", "mse"):
            raise ValueError(f"recon_loss must be 'l1' or 'mse', got {self.recon_loss!r}")
        if self.frame_gap < 1:
            raise ValueError(f"frame_gap must be >= 1, got {self.frame_gap}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def action_dim(self) -> int:
        """Size of one flattened latent action (``n_tokens * latent_dim``)."""
        return self.n_tokens * self.latent_dim


PRESETS: dict[str, LAMConfig] = {
    "tiny": LAMConfig(
        image_size=32,
        patch_size=4,
        width=64,
        enc_depth=2,
        dec_depth=2,
        n_heads=4,
        n_tokens=2,
        latent_dim=8,
        num_codes=8,
    ),
    "small": LAMConfig(
        image_size=64,
        patch_size=8,
        width=128,
        enc_depth=3,
        dec_depth=3,
        n_heads=4,
        n_tokens=4,
        latent_dim=16,
        num_codes=8,
        frame_gap=4,
    ),
    "base": LAMConfig(
        image_size=128,
        patch_size=8,
        width=512,
        enc_depth=8,
        dec_depth=6,
        n_heads=8,
        n_tokens=4,
        latent_dim=32,
        num_codes=16,
        frame_gap=4,
    ),
}


def frames_to_pixels(frames: torch.Tensor, config_size: int, channels: int, name: str = "frames") -> torch.Tensor:
    """uint8 ``[..., C, H, W]`` -> float ``[..., C, H, W]`` in [-1, 1], with a clear error on bad input."""
    if frames.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 [..., C, H, W], got dtype {frames.dtype}")
    c, h, w = frames.shape[-3:]
    if c != channels or h != config_size or w != config_size:
        raise ValueError(
            f"{name} are {c}x{h}x{w} (C x H x W) but the model was built for "
            f"{channels}x{config_size}x{config_size}: resize in the stream or change the config"
        )
    return frames.float() / 127.5 - 1.0


def _transformer(width: int, depth: int, heads: int, mlp_ratio: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        width, heads, int(width * mlp_ratio), dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False)


class PatchEmbed(nn.Module):
    """``[N, C, H, W]`` -> ``[N, P, width]`` with a learned position embedding per patch."""

    def __init__(self, cfg: LAMConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, cfg.n_patches, cfg.width) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class LatentActionEncoder(nn.Module):
    """Frames ``[B, T, C, H, W]`` (pixels) -> bottleneck input ``[B, T-k, n_tokens, D_in]``.

    Each frame is embedded once; pairs (t, t+k) are then formed from the embeddings and one
    transformer attends jointly over [queries | patches of x_t | patches of x_{t+k}].
    """

    def __init__(self, cfg: LAMConfig, out_dim: int):
        super().__init__()
        self.cfg = cfg
        self.patch = PatchEmbed(cfg)
        self.frame_emb = nn.Parameter(torch.randn(2, 1, cfg.width) * 0.02)  # "before" / "after"
        self.motion = PatchEmbed(cfg) if cfg.encoder_motion else None
        self.queries = nn.Parameter(torch.randn(1, cfg.n_tokens, cfg.width) * 0.02)
        self.blocks = _transformer(cfg.width, cfg.enc_depth, cfg.n_heads, cfg.mlp_ratio)
        self.out = nn.Linear(cfg.width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        k = self.cfg.frame_gap
        tok = self.patch(x.flatten(0, 1)).unflatten(0, (b, t))  # [B, T, P, W]
        before = tok[:, :-k].flatten(0, 1) + self.frame_emb[0]  # [B*(T-k), P, W]
        after = tok[:, k:].flatten(0, 1) + self.frame_emb[1]
        if self.motion is not None:
            after = after + self.motion((x[:, k:] - x[:, :-k]).flatten(0, 1))
        q = self.queries.expand(before.shape[0], -1, -1)
        h = self.blocks(torch.cat([q, before, after], dim=1))
        return self.out(h[:, : self.cfg.n_tokens]).unflatten(0, (b, t - k))


class LatentActionDecoder(nn.Module):
    """``x_t [N, C, H, W]`` + latent ``[N, n_tokens, latent_dim]`` -> prediction of ``x_{t+k}``."""

    def __init__(self, cfg: LAMConfig):
        super().__init__()
        self.cfg = cfg
        self.patch = PatchEmbed(cfg)
        self.latent_in = nn.Linear(cfg.latent_dim, cfg.width)
        # FiLM from the whole latent: every patch learns what the action means for it
        self.film = nn.Linear(cfg.n_tokens * cfg.latent_dim, 2 * cfg.width)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.blocks = _transformer(cfg.width, cfg.dec_depth, cfg.n_heads, cfg.mlp_ratio)
        self.head = nn.Linear(cfg.width, cfg.patch_size**2 * cfg.in_channels)
        if cfg.predict_residual:  # start exactly at the copy baseline
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x_t: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n, c, hgt, wid = x_t.shape
        scale, shift = self.film(latent.flatten(1)).unsqueeze(1).chunk(2, dim=-1)
        tok = self.patch(x_t) * (1 + scale) + shift
        h = self.blocks(torch.cat([self.latent_in(latent), tok], dim=1))[:, cfg.n_tokens :]
        p, g = cfg.patch_size, hgt // cfg.patch_size
        out = self.head(h).reshape(n, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, hgt, wid)
        return x_t + out if cfg.predict_residual else out


class LatentActionModel(nn.Module, ModelFolderMixin, PyTorchModelHubMixin):
    """Latent-action model trained on frames only. See the module docstring."""

    FORMAT_VERSION = 1  # config.json's _format_version: raise it (and convert older folders) when the layout changes

    def __init__(self, config: LAMConfig):
        super().__init__()
        self.config = config
        if config.bottleneck == "vq":
            self.bottleneck = VectorQuantizer(
                config.num_codes,
                config.latent_dim,
                config.commitment,
                config.ema_decay,
                config.dead_after,
                estimator=config.vq_estimator,
            )
            enc_out = config.latent_dim
        else:
            self.bottleneck = GaussianBottleneck(config.latent_dim, config.kl_weight)
            enc_out = 2 * config.latent_dim
        self.encoder = LatentActionEncoder(config, enc_out)
        self.decoder = LatentActionDecoder(config)
        self.standardize = None
        if config.bottleneck == "vq" and config.standardize_latent:
            self.standardize = nn.BatchNorm1d(config.latent_dim, affine=False, momentum=0.01)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LatentActionModel":
        if name not in PRESETS:
            raise ValueError(f"unknown LAM preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(replace(PRESETS[name], **overrides))

    def _pixels(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 5:
            raise ValueError(f"frames must be [B, T, C, H, W], got shape {tuple(frames.shape)}")
        if frames.shape[1] <= self.config.frame_gap:
            raise ValueError(
                f"a window of {frames.shape[1]} frames has no transition at "
                f"frame_gap={self.config.frame_gap}: use windows of > frame_gap frames"
            )
        return frames_to_pixels(frames, self.config.image_size, self.config.in_channels)

    def _encode(self, x: torch.Tensor) -> BottleneckOutput:
        """pixels ``[B, T, C, H, W]`` -> bottleneck output with latent ``[B, T-k, n_tokens, latent_dim]``."""
        z = self.encoder(x)
        if self.standardize is not None:
            z = self.standardize(z.reshape(-1, z.shape[-1]).float()).reshape(z.shape).to(z.dtype)
        return self.bottleneck(z)

    def _recon(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(pred, target) if self.config.recon_loss == "l1" else F.mse_loss(pred, target)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """batch["frames"] uint8 ``[B, T, C, H, W]`` -> (loss, metrics). Reads nothing else."""
        x = self._pixels(batch["frames"])
        k = self.config.frame_gap
        out = self._encode(x)
        x_t, x_next = x[:, :-k].flatten(0, 1), x[:, k:].flatten(0, 1)
        pred = self.decoder(x_t, out.latent.flatten(0, 1))
        recon = self._recon(pred.float(), x_next)
        copy = self._recon(x_t, x_next)  # inputs only: no gradient
        loss = (recon / copy.clamp_min(1e-6) if self.config.normalize_recon else recon) + out.loss
        with torch.no_grad():
            named = {
                "recon_loss": recon.detach(),
                "copy_loss": copy,
                "recon_over_copy": recon.detach() / copy.clamp_min(1e-8),
                "bottleneck_loss": out.loss.detach(),
                **out.metrics,
            }
            values = torch.stack([v.float() for v in named.values()]).tolist()  # one sync
        return loss, dict(zip(named, values))

    # -- inference ----------------------------------------------------------------------
    @torch.no_grad()
    def encode_latent_actions(self, frames: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """frames uint8 ``[B, T, C, H, W]`` -> ``latent`` float ``[B, T-k, n_tokens * latent_dim]``
        and ``codes`` int64 ``[B, T-k, n_tokens]`` (None for the continuous bottleneck).

        Entry ``i`` explains the transition from frame ``i`` to frame ``i + k``; the last ``k``
        frames of a window start no transition (overlap windows by ``k`` when labelling).
        Deterministic: evaluation mode (no codebook updates, Gaussian mean) whatever the model's mode.
        """
        was_training = self.training
        self.eval()
        try:
            out = self._encode(self._pixels(frames))
        finally:
            self.train(was_training)
        return {"latent": out.latent.flatten(2).float(), "codes": out.codes}

    @torch.no_grad()
    def probe_latent_usage(self, frames: torch.Tensor) -> dict[str, float]:
        """Does the decoder use the latent? frames uint8 ``[B, T, C, H, W]`` with B >= 2.

        Decodes every transition with its own latent and with the latent of the next clip in
        the batch (rolled along B). Returns ``own``, ``shuffled`` and ``copy`` reconstruction
        losses and ``shuffled_over_own``: ~1 means the latent carries nothing (clips in the
        batch should differ in their motion for this to be meaningful).
        """
        if frames.shape[0] < 2:
            raise ValueError("probe_latent_usage needs a batch of at least 2 clips")
        was_training = self.training
        self.eval()
        try:
            x = self._pixels(frames)
            k = self.config.frame_gap
            latent = self._encode(x).latent  # [B, T-k, n, d]
            x_t, x_next = x[:, :-k].flatten(0, 1), x[:, k:].flatten(0, 1)
            own = self._recon(self.decoder(x_t, latent.flatten(0, 1)), x_next)
            shuffled = self._recon(self.decoder(x_t, latent.roll(1, dims=0).flatten(0, 1)), x_next)
            copy = self._recon(x_t, x_next)
        finally:
            self.train(was_training)
        return {
            "own": own.item(),
            "shuffled": shuffled.item(),
            "copy": copy.item(),
            "shuffled_over_own": (shuffled / own.clamp_min(1e-8)).item(),
        }

    def latent_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ only: codes int64 ``[..., n_tokens]`` -> latent ``[..., n_tokens * latent_dim]``."""
        if not isinstance(self.bottleneck, VectorQuantizer):
            raise ValueError("latent_from_codes needs the VQ bottleneck (this model is continuous)")
        return self.bottleneck.lookup(codes).flatten(-2)

    @torch.no_grad()
    def predict_next_frame(self, frame_t: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """frame_t uint8 ``[..., C, H, W]`` + latent ``[..., n_tokens * latent_dim]`` -> uint8 ``[..., C, H, W]``."""
        cfg = self.config
        x = frames_to_pixels(frame_t, cfg.image_size, cfg.in_channels, name="frame_t")
        lead = x.shape[:-3]
        if latent.shape[:-1] != lead or latent.shape[-1] != cfg.action_dim:
            raise ValueError(
                f"latent must be {tuple(lead) + (cfg.action_dim,)} for frame_t "
                f"{tuple(frame_t.shape)}, got {tuple(latent.shape)}"
            )
        pred = self.decoder(x.reshape(-1, *x.shape[-3:]), latent.reshape(-1, cfg.n_tokens, cfg.latent_dim).to(x.dtype))
        pixels = ((pred.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.reshape(*lead, *pixels.shape[-3:])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "LAMConfig",
    "PRESETS",
    "LatentActionModel",
    "LatentActionEncoder",
    "LatentActionDecoder",
    "frames_to_pixels",
    "count_parameters",
]
