"""``WorldModelConfig`` (the window, the transformer, frames -> tokens, conditioning, objective and
sampling) and its ``PRESETS``; the model is ``worldmodel.uwm.WorldModel``."""

from __future__ import annotations

import dataclasses

from worldmodel.embodiment import LATENT, _upgrade_spec, embodiment_spec


@dataclasses.dataclass
class WorldModelConfig:
    variant: str = "uwm"  # "uwm" (single-stream blocks) | "dust" (dual-stream blocks)
    # window (see the module docstring for the timeline)
    image_size: int = 64
    n_obs: int = 2
    n_future: int = 2
    action_horizon: int = 16
    frame_gap: int | None = None  # None -> action_horizon // n_future
    # transformer
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    registers: int = 8
    # frames -> tokens
    frame_space: str = "pixels"  # "pixels" | "vae"
    patch_size: int = 8
    vae_path: str | None = None  # local diffusers AutoencoderKL folder (frozen, not saved with the model)
    vae_latent_key: str = "vae.latent"  # batch key of precomputed latents [B, T, c, h, w]
    vae_latent_channels: int | None = None  # None -> read from the VAE
    vae_downsample: int | None = None
    # conditioning
    encoder_channels: list = dataclasses.field(default_factory=lambda: [32, 64, 128, 256])
    encoder_blocks: int = 1
    encoder_pool: str = "spatial_softmax"
    embodiments: dict = dataclasses.field(default_factory=dict)  # name -> embodiment_spec(...)
    # condition on the robot state where an embodiment has one; False: frames and task only (the state
    # dims are dropped from the embodiment specs, and policies built on the model read no state)
    use_state: bool = True
    latent_action_dim: int = 0  # > 0 adds the "latent" embodiment
    latent_action_key: str = "lam.latent"  # batch key of latent actions [B, T, latent_action_dim]
    tasks: list = dataclasses.field(default_factory=list)  # learned task embedding vocabulary
    text_encoder_path: str | None = None  # local transformers folder; replaces the task embedding
    # objective and sampling
    p_marginal: float = 0.1  # per sample and modality: probability of pinning t = 1 in training
    # per sample with actions: probability of pinning the video at t = 0 (the clean future frames, the
    # inverse-dynamics conditional; those samples add nothing to the video loss). Under the uniform t the
    # future is seldom clear: the pixel residual (Meta-World, 64 px: std 0.09, 6 % of pixels move by more
    # than 0.1) is small next to the unit noise at most t
    p_inverse: float = 0.0
    action_loss_weight: float = 1.0
    video_loss_weight: float = 1.0
    action_steps: int = 10
    video_steps: int = 10  # DUST: more video than action steps in sample_joint
    # "frames" | "residual" (future minus last observed frame). The dataclass default keeps configs saved
    # before this field meaning what they meant; the presets use "residual".
    video_target: str = "frames"
    # the video stream denoises target * video_scale (and divides samples by it). With velocity prediction
    # x = z - v is a difference of two O(1) numbers, and a target with std ~0.2 (the pixel residual) is
    # rebuilt with errors as large as itself; scaling it up (the role of Stable Diffusion's latent scaling
    # factor) helped (docs/RESULTS.md). The presets predict x0 instead, where the scale is not needed
    video_scale: float = 1.0
    # what the network's video head outputs: "velocity" (e - x) or "x0" (the clean target, turned into the
    # velocity (z - x0) / max(t, 0.05) for the sampler; the loss is then the MSE of x0). With x0 a region
    # that does not move is an output of zero instead of an exact copy of the input noise (Li & He 2025,
    # "Back to Basics: let denoising generative models denoise", for pixel patches)
    video_prediction: str = "velocity"
    # the same choice for the action head. "x0": the head regresses the clean chunk at every noise level,
    # at t = 1 directly its conditional mean given the context (a velocity head must also carry the input
    # noise through the network there). "velocity": configs saved before this field mean the same
    action_prediction: str = "velocity"
    # "last_frame": the last observed frame (in the denoised space) is patch-embedded and added to every
    # future frame's tokens, so the video stream sees where things are, not only the pooled condition
    # vector (the frame-concatenation conditioning of image-to-video diffusion models). "none" keeps
    # configs saved before this field meaning the same; the presets use "last_frame"
    video_context: str = "none"

    def __post_init__(self):
        if self.variant not in ("uwm", "dust"):
            raise ValueError(f"variant must be 'uwm' or 'dust', got {self.variant!r}")
        if self.frame_space not in ("pixels", "vae"):
            raise ValueError(f"frame_space must be 'pixels' or 'vae', got {self.frame_space!r}")
        if not (0.0 <= self.p_marginal <= 1.0 and 0.0 <= self.p_inverse <= 1.0):
            raise ValueError(f"p_marginal and p_inverse are probabilities, got {self.p_marginal}, {self.p_inverse}")
        if self.video_scale <= 0:
            raise ValueError(f"video_scale must be > 0, got {self.video_scale}")
        if self.video_prediction not in ("velocity", "x0"):
            raise ValueError(f"video_prediction must be 'velocity' or 'x0', got {self.video_prediction!r}")
        if self.action_prediction not in ("velocity", "x0"):
            raise ValueError(f"action_prediction must be 'velocity' or 'x0', got {self.action_prediction!r}")
        if self.video_context not in ("none", "last_frame"):
            raise ValueError(f"video_context must be 'none' or 'last_frame', got {self.video_context!r}")
        if self.video_target not in ("frames", "residual"):
            raise ValueError(f"video_target must be 'frames' or 'residual', got {self.video_target!r}")
        if self.n_obs < 1 or self.n_future < 1 or self.action_horizon < 1:
            raise ValueError("n_obs, n_future and action_horizon must be >= 1")
        if self.frame_gap is None:
            self.frame_gap = max(1, self.action_horizon // self.n_future)
        self.embodiments = {name: _upgrade_spec(spec) for name, spec in self.embodiments.items()}
        if self.latent_action_dim and LATENT not in self.embodiments:
            self.embodiments = {**self.embodiments, LATENT: embodiment_spec(action_dim=self.latent_action_dim)}
        if not self.use_state:
            self.embodiments = {
                name: {
                    **spec,
                    "state_dim": 0,
                    "stats": {k: v for k, v in (spec.get("stats") or {}).items() if k != "state"},
                }
                for name, spec in self.embodiments.items()
            }
        for name, spec in self.embodiments.items():
            if "." in name or not spec.get("action_dim"):
                raise ValueError(f"embodiment {name!r}: names have no dots and need action_dim > 0")

    @property
    def window(self) -> int:
        return self.n_obs + max(self.action_horizon - 1, self.n_future * self.frame_gap)

    def future_indices(self) -> list[int]:
        return [self.n_obs - 1 + self.frame_gap * (j + 1) for j in range(self.n_future)]


# Parameter counts without embodiment adapters (each adds ~2 x (A + 1) x width, plus state); tokens per sample.
PRESETS = {
    # 32 px, 44 tokens per sample (8 action + 2 x 16 frame + 4 registers), 0.34 M parameters (dust: 0.49 M)
    "tiny": WorldModelConfig(
        image_size=32,
        action_horizon=8,
        width=64,
        depth=2,
        heads=2,
        registers=4,
        encoder_channels=[16, 32, 64],
        action_steps=4,
        video_steps=4,
        video_target="residual",
        video_prediction="x0",
        video_context="last_frame",
    ),
    # 64 px, 152 tokens (16 + 2 x 64 + 8), 6.9 M parameters (dust: 11.7 M); window 18
    "small": WorldModelConfig(video_target="residual", video_prediction="x0", video_context="last_frame"),
    # 128 px, 160 tokens (16 + 2 x 64 + 16), patch 16, 12 x 768: 146 M parameters (dust: 273 M)
    "base": WorldModelConfig(
        image_size=128,
        patch_size=16,
        width=768,
        depth=12,
        heads=12,
        registers=16,
        encoder_channels=[64, 128, 256, 512],
        encoder_blocks=2,
        video_target="residual",
        video_prediction="x0",
        video_context="last_frame",
    ),
}
