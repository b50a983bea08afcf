"""ActionDecoder: a chunked flow-matching / MeanFlow action decoder for one robot.

Chunk timeline (as in LeRobot's Diffusion Policy). With ``n_obs_steps = n`` and ``horizon = H``,
a training window of ``n - 1 + H`` frames starting at the stream's ``start`` is read as::

    window index:   0 ......... n-1 ......... n-1+H-1
    frames:        [t-n+1 ...... t]                        observation (the n latest frames)
    state:                       t                         current robot state
    action:                     [t ........... t+H-1]      the chunk to predict
    latent:                     [t ..... t+H_l-1]          optional latent actions (per frame)

``action[t]`` is the action taken after seeing frame ``t`` (the shard format's convention), so the
chunk starts at the current step. Extra frames at the end of a longer window are ignored. At
inference ``predict_action_chunk`` uses the LAST ``n`` frames it is given as ``t-n+1 .. t``.

Condition vector: per-frame image features (a small GroupNorm conv net, trained in-domain) of the
n frames, the normalised state, a learned task embedding (task vocabulary in the config; unknown
tasks share index 0) and the flattened latent-action chunk, mixed by an MLP. The velocity network
is a small DiT over the H action tokens: time embeddings of ``t`` and ``t - r`` are added to the
condition and injected into every block with AdaLN-Zero (shift, scale, gate).

Actions and states are normalised per embodiment inside the model (``nets.normalize``) with
stats stored in the config, so ``config.json`` carries them beside ``model.safetensors``. EMA,
optimisers and the loop belong to the runtime in ``wm_pipeline/``.
"""

import contextvars
import copy
import dataclasses
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from nets.augment import random_shift
from nets.conv_encoder import POOLS, ConvEncoder
from nets.dit_block import Block, FinalLayer
from nets.flow import dispersive_loss, flow_matching_loss, meanflow_loss, sample_flow_matching, sample_meanflow
from nets.frame_decoder import FrameDecoder
from nets.normalize import Normalizer, plain_stats
from nets.state_dict import rename_on_load
from nets.timestep import MEANFLOW_SCALE, timestep_embedding
from shards.model_folder import ModelFolderMixin, config_fields

log = logging.getLogger(__name__)
OBJECTIVES = ("fm", "meanflow")


@dataclass
class DecoderConfig:
    # Data-dependent: filled in by the runtime from the manifest before construction.
    action_dim: int = 0
    state_dim: int = 0
    image_size: list[int] = field(default_factory=lambda: [64, 64])  # [H, W]
    image_channels: int = 3
    tasks: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # {embodiment: {"action": {...}, "state": {...}}} plain lists
    latent_dim: int = 0  # D_l; 0 = no latent-action input
    latent_horizon: int = 0  # H_l; 0 = same as horizon
    latent_key: str = ""  # batch key of the per-frame latent label, e.g. "lam.latent"
    # policy=latent: the world-model folder that predicts the latent chunk from frames at run time
    latent_model: str = ""
    # Chunk timeline.
    n_obs_steps: int = 2
    horizon: int = 16
    # Architecture.
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    encoder_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    obs_dim: int = 256  # feature size per observation frame
    # How the image encoder turns its last feature map into a vector: "grid" (average-pooled to 4x4
    # and flattened) or "spatial_softmax" (``keypoints`` expected (x, y) positions, as robomimic and
    # Diffusion Policy do: object positions become coordinates a few demos can map to actions).
    encoder_pool: str = "grid"
    keypoints: int = 32
    task_dim: int = 64
    # Objective and sampling.
    objective: str = "fm"  # "fm" | "meanflow"
    n_steps: int = 0  # sampling steps; 0 = 10 for fm, 1 for meanflow
    meanflow_equal_fraction: float = 0.5  # share of the batch with r = t
    meanflow_adaptive_power: float = 0.5
    dispersive_weight: float = 0.0
    dispersive_tau: float = 1.0
    action_norm: str = "min_max"
    state_norm: str = "mean_std"
    # The state dims the decoder reads (indices into the robot state; empty = all). Meta-World's
    # 39-dim state holds object and goal poses; [0, 1, 2, 3] keeps the proprioception (hand xyz,
    # gripper opening), what an image policy such as Diffusion Policy gets beside its camera.
    state_indices: list[int] = field(default_factory=list)
    # Training-time image augmentation: random shift of up to this many pixels (0 = none).
    augment_shift: int = 0
    # Diagnostic auxiliary loss: a linear head predicts these state dims (normalised) from the current
    # frame's image feature, weighted by ``aux_state_weight`` (0 = off). Meta-World's [4, 5, 6] is the
    # object position: it asks whether an encoder that is made to place the object acts better. The
    # state is a training target only; the policy still reads ``state_indices`` alone at run time.
    aux_state_indices: list[int] = field(default_factory=list)
    aux_state_weight: float = 0.0
    # Auxiliary reconstruction loss, from pixels alone: a small head (``nets.FrameDecoder``) redraws
    # the current frame, downsampled to ``aux_recon_size`` px, from the same per-frame feature the
    # policy conditions on, weighted by ``aux_recon_weight`` (0 = off). In a fixed scene only the arm
    # and the objects change between frames, so the feature must carry where they are. Every sample
    # counts, also those without actions (action-free video in the batch trains the encoder).
    aux_recon_weight: float = 0.0
    aux_recon_size: int = 32
    # A pretrained image encoder: a frame-autoencoder folder (latent_actions/frame_autoencoder.py,
    # `wm train autoencoder` on action-free video) whose encoder stages (``encoder.*`` in its
    # model.safetensors) initialise this decoder's; with ``freeze_encoder`` they stay fixed (no
    # gradient, run without autograd) and only the projection after the pooling trains. The stages
    # are saved with the decoder, so the trained decoder folder loads without this folder.
    encoder_init: str = ""
    freeze_encoder: bool = False
    # With a frozen encoder: the batch key of its cached per-frame pooled features (``wm label
    # --labeller RUN_AE`` writes ``autoencoder.features``). Training then reads them instead of running
    # the stages on the frames (no image augmentation: the features were computed on unshifted
    # frames); at run time the policy computes the same features from its frames.
    feature_key: str = ""

    @property
    def window_length(self) -> int:
        """Frames per training window: ``n_obs_steps - 1 + max(horizon, latent_horizon)``."""
        return self.n_obs_steps - 1 + max(self.horizon, self.latent_horizon or 0)

    @property
    def sampling_steps(self) -> int:
        return self.n_steps or (10 if self.objective == "fm" else 1)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DecoderConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown decoder preset {name!r} (expected one of {sorted(PRESETS)})")
        return dataclasses.replace(copy.deepcopy(PRESETS[name]), **overrides)


PRESETS = {
    "tiny": DecoderConfig(
        width=64, depth=2, heads=4, encoder_channels=[16, 32, 64], obs_dim=64, task_dim=16, horizon=8
    ),
    "small": DecoderConfig(),
    "base": DecoderConfig(width=512, depth=8, heads=8, encoder_channels=[64, 128, 256, 512], obs_dim=512, task_dim=128),
}


# Checkpoints saved before the velocity network used nets.dit_block (decoder blocks of their own, with
# nn.Sequential(SiLU, Linear) AdaLN projections) load under the new names.
OLD_VELOCITY_KEYS = [
    (r"blocks\.(\d+)\.(qkv|mlp)\.(.*)", r"blocks.\1.stream.\2.\3"),
    (r"blocks\.(\d+)\.out\.(.*)", r"blocks.\1.stream.proj.\2"),
    (r"blocks\.(\d+)\.ada\.1\.(.*)", r"blocks.\1.stream.adaln.\2"),
    (r"ada\.1\.(.*)", r"final.adaln.\1"),
]


class ChunkTransformer(nn.Module):
    """The velocity network ``net(z, t, r, cond) -> (u [B, H, A], features [B, W])``.

    z: noisy normalised action chunk ``[B, H, A]``; t, r: ``[B]``; cond: condition ``[B, W]``.
    Features (for the dispersive loss) are the token mean after the middle block.
    """

    def __init__(self, action_dim: int, horizon: int, width: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.action_in = nn.Linear(action_dim, width)
        self.pos = nn.Parameter(torch.randn(1, horizon, width) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(width)
        self.action_out = nn.Linear(width, action_dim)
        nn.init.zeros_(self.action_out.weight)
        nn.init.zeros_(self.action_out.bias)
        self.width, self.feature_block = width, max(depth // 2 - 1, 0)
        rename_on_load(self, OLD_VELOCITY_KEYS)

    def forward(self, z, t, r, cond):
        half = self.width // 2
        time = torch.cat(
            [timestep_embedding(t, half, MEANFLOW_SCALE), timestep_embedding(t - r, self.width - half, MEANFLOW_SCALE)],
            -1,
        )
        c = F.silu(cond + self.time_mlp(time))  # DiT's AdaLN input: SiLU, then each block's projection
        x = self.action_in(z) + self.pos
        features = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if i == self.feature_block:
                features = x.mean(1)
        return self.action_out(self.final(x, c)), features


ENCODER_PREFIX = "encoder."  # the frame autoencoder's stage keys in its model.safetensors
# Set while ``from_pretrained`` builds a decoder whose saved weights (the stages included) load next.
_LOADING_SAVED_WEIGHTS: contextvars.ContextVar[bool] = contextvars.ContextVar("loading_saved_weights", default=False)


def load_encoder_stages(encoder: ConvEncoder, folder: str) -> None:
    """Copy a frame-autoencoder folder's encoder stages into ``encoder.stages`` (shapes must match).
    A folder that no longer exists is skipped with a log line: a saved decoder carries the stages
    in its own weights, which ``from_pretrained`` loads next (``wm train`` checks the folder exists)."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        log.info("encoder_init %s has no model.safetensors: the encoder stages come from the decoder's weights", folder)
        return
    weights = {k[len(ENCODER_PREFIX) :]: v for k, v in load_file(str(path)).items() if k.startswith(ENCODER_PREFIX)}
    mine = encoder.stages.state_dict()
    if set(weights) != set(mine) or any(weights[k].shape != mine[k].shape for k in mine):
        raise ValueError(
            f"{path}: its encoder stages do not match this decoder's encoder_channels "
            f"{[m.shape[0] for k, m in mine.items() if k.endswith('.weight') and m.ndim == 4]}"
        )
    encoder.stages.load_state_dict(weights)


class ActionDecoder(
    nn.Module, ModelFolderMixin, PyTorchModelHubMixin, library_name="wm-pipeline", tags=["robotics", "flow-matching"]
):
    """Observation (+ state, task, latent actions) -> action chunk ``[B, H, A]``; see the module docstring."""

    FORMAT_VERSION = 1  # config.json's _format_version: raise it (and convert older folders) when the layout changes

    @classmethod
    def _from_pretrained(cls, *args, **kwargs):
        """The hub mixin's load: the folder's own weights follow construction, so ``encoder_init`` is not read."""
        token = _LOADING_SAVED_WEIGHTS.set(True)
        try:
            return super()._from_pretrained(*args, **kwargs)
        finally:
            _LOADING_SAVED_WEIGHTS.reset(token)

    def __init__(self, config: DecoderConfig):
        super().__init__()
        if isinstance(config, dict):
            config = DecoderConfig(**config_fields(config))
        # In place, on the object the hub mixin will write to config.json: arrays (the runtime's
        # stats are numpy) become plain lists, an int image size becomes [H, W].
        config.stats = plain_stats(config.stats)
        if isinstance(config.image_size, int):
            config.image_size = [config.image_size, config.image_size]
        _validate(config)
        self.config = config
        self.embodiments = list(config.stats)
        self.action_normalizer = Normalizer(
            config.stats, self.embodiments, "action", config.action_dim, config.action_norm
        )
        self.state_normalizer = None
        if config.state_dim:
            self.state_normalizer = Normalizer(
                config.stats, self.embodiments, "state", config.state_dim, config.state_norm
            )
        self.task_ids = {task: i + 1 for i, task in enumerate(config.tasks)}  # 0 = unknown task
        self.image_encoder = ConvEncoder(
            config.image_channels, config.encoder_channels, config.obs_dim, config.encoder_pool, config.keypoints
        )
        if config.encoder_init and not _LOADING_SAVED_WEIGHTS.get():
            load_encoder_stages(self.image_encoder, config.encoder_init)
        if config.freeze_encoder:
            self.image_encoder.stages.requires_grad_(False)
        self.task_embedding = nn.Embedding(len(config.tasks) + 1, config.task_dim)
        self.aux_state_head = None
        if config.aux_state_weight > 0:
            self.aux_state_head = nn.Linear(config.obs_dim, len(config.aux_state_indices))
        self.aux_recon_head = None
        if config.aux_recon_weight > 0:
            self.aux_recon_head = FrameDecoder(
                config.obs_dim, config.aux_recon_size, config.image_channels, width=config.encoder_channels[-1]
            )
        self.state_index = list(config.state_indices) or list(range(config.state_dim))
        self.state_proj = nn.Linear(len(self.state_index), config.task_dim) if config.state_dim else None
        self.latent_horizon = config.latent_horizon or config.horizon
        self.latent_proj = None
        if config.latent_dim:
            self.latent_proj = nn.Linear(self.latent_horizon * config.latent_dim, config.width)
        cond_in = config.n_obs_steps * config.obs_dim + config.task_dim * (2 if config.state_dim else 1)
        cond_in += config.width if config.latent_dim else 0
        self.cond_mlp = nn.Sequential(
            nn.Linear(cond_in, config.width), nn.SiLU(), nn.Linear(config.width, config.width)
        )
        self.velocity = ChunkTransformer(
            config.action_dim, config.horizon, config.width, config.depth, config.heads, config.mlp_ratio
        )
        self._warned_tasks: set[str] = set()

    # ------------------------------------------------------------------ condition

    def _embodiment_index(self, embodiment, batch: int, required: torch.Tensor | None = None) -> torch.Tensor:
        """Names -> long ``[B]``. Unknown names are an error on samples whose actions are used."""
        if embodiment is None:
            if len(self.embodiments) != 1:
                raise ValueError(f"embodiment not given, and the decoder knows several: {self.embodiments}")
            embodiment = self.embodiments[0]
        names = [embodiment] * batch if isinstance(embodiment, str) else list(embodiment)
        index = []
        for i, name in enumerate(names):
            if name not in self.embodiments and (required is None or bool(required[i])):
                raise ValueError(
                    f"embodiment {name!r} has no normalisation stats in this decoder (known: {self.embodiments})"
                )
            index.append(self.embodiments.index(name) if name in self.embodiments else 0)
        return torch.tensor(index, dtype=torch.long, device=self.task_embedding.weight.device)

    def _task_index(self, task, batch: int) -> torch.Tensor:
        names = [task or ""] * batch if task is None or isinstance(task, str) else list(task)
        for name in set(names) - set(self.task_ids) - self._warned_tasks:
            log.warning("task %r is not in the decoder's task vocabulary; using the unknown-task embedding", name)
            self._warned_tasks.add(name)
        ids = [self.task_ids.get(name, 0) for name in names]
        return torch.tensor(ids, dtype=torch.long, device=self.task_embedding.weight.device)

    def image_features(self, obs_frames) -> torch.Tensor:
        """obs_frames uint8 ``[B, n_obs, C, H, W]`` -> per-frame features ``[B, n_obs, obs_dim]``."""
        b, n = obs_frames.shape[:2]
        if list(obs_frames.shape[-2:]) != list(self.config.image_size):
            raise ValueError(
                f"frames are {list(obs_frames.shape[-2:])} but the decoder was built for "
                f"image_size {list(self.config.image_size)}"
            )
        enc, flat = self.image_encoder, obs_frames.flatten(0, 1)
        if self.config.freeze_encoder:  # frozen stages: no graph kept, only the projection trains
            with torch.no_grad():
                pooled = enc.features(flat)
            return enc.proj(pooled).view(b, n, self.config.obs_dim)
        return enc(flat).view(b, n, self.config.obs_dim)

    def encode_condition(self, obs_frames, state, task, latent, emb_index, features=None) -> torch.Tensor:
        """obs_frames uint8 ``[B, n_obs, C, H, W]``, state raw ``[B, S]`` or None, task list[str],
        latent ``[B, H_l, D_l]`` or None, emb_index ``[B]`` -> condition ``[B, W]``. ``features``:
        ``image_features(obs_frames)`` when the caller already has them."""
        features = self.image_features(obs_frames) if features is None else features
        b = features.shape[0]
        parts = [features.flatten(1)]
        parts.append(self.task_embedding(self._task_index(task, b)))
        if self.state_proj is not None:
            state = self.state_normalizer.normalize(state.float(), emb_index)
            parts.append(self.state_proj(state[:, self.state_index]))
        if self.latent_proj is not None:
            want = (self.latent_horizon, self.config.latent_dim)
            if latent is None or tuple(latent.shape[1:]) != want:
                got = None if latent is None else tuple(latent.shape)
                raise ValueError(f"the decoder needs a latent-action chunk [B, {want[0]}, {want[1]}], got {got}")
            parts.append(self.latent_proj(latent.float().flatten(1)))
        return self.cond_mlp(torch.cat(parts, -1))

    # ------------------------------------------------------------------ training

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """batch: the contracted window batch (frames uint8 ``[B, T, C, H, W]``, action ``[B, T, A]``,
        action_mask ``[B]``, state ``[B, T, S]``, task / embodiment ``list[str]``, optional latent
        labels ``[B, T, D_l]`` under ``config.latent_key``) -> (loss, metrics).
        Samples without actions contribute nothing to the loss."""
        cfg = self.config
        frames, action = batch["frames"], batch["action"]
        b, t = frames.shape[:2]
        if t < cfg.window_length:
            raise ValueError(
                f"window of {t} frames is shorter than n_obs_steps - 1 + horizon = {cfg.window_length}: "
                f"set the stream's window to {cfg.window_length}"
            )
        if action.shape[-1] != cfg.action_dim:
            raise ValueError(
                f"batch actions have {action.shape[-1]} dims but the decoder was built for action_dim={cfg.action_dim}"
            )
        now = cfg.n_obs_steps - 1  # window index of the current step t
        mask = batch.get("action_mask")
        mask = torch.ones(b, dtype=torch.bool, device=frames.device) if mask is None else mask.to(frames.device).bool()
        emb_index = self._embodiment_index(batch.get("embodiment"), b, required=mask)
        state = None
        if cfg.state_dim:
            state = batch["state"][:, now]
            if "state_mask" in batch:  # a missing state becomes the stats' center: 0 after normalisation
                has_state = batch["state_mask"].to(state.device).bool()[:, None]
                state = torch.where(has_state, state, self.state_normalizer.center[emb_index])
        latent = None
        if cfg.latent_dim:
            if cfg.latent_key not in batch:
                raise ValueError(f"batch has no latent labels {cfg.latent_key!r} (keys: {sorted(batch)})")
            latent = batch[cfg.latent_key][:, now : now + self.latent_horizon]
        obs = frames[:, : cfg.n_obs_steps]
        if self.training and cfg.augment_shift:
            obs = random_shift(obs, cfg.augment_shift)
        if cfg.feature_key and cfg.feature_key in batch:  # cached features of the frozen stages
            cached = batch[cfg.feature_key][:, : cfg.n_obs_steps].to(self.image_encoder.proj.weight.dtype)
            features = self.image_encoder.proj(cached)
        else:
            features = self.image_features(obs)
        cond = self.encode_condition(obs, state, batch.get("task"), latent, emb_index, features)
        chunk = self.action_normalizer.normalize(action[:, now : now + cfg.horizon].float(), emb_index)
        if cfg.objective == "fm":
            out = flow_matching_loss(self.velocity, chunk, cond)
        else:
            out = meanflow_loss(
                self.velocity,
                chunk,
                cond,
                equal_fraction=cfg.meanflow_equal_fraction,
                adaptive_power=cfg.meanflow_adaptive_power,
            )
        weight = mask.float()
        kept = weight.sum().clamp_min(1.0)
        loss = (out.loss * weight).sum() / kept
        mse = (out.mse * weight).sum() / kept
        metrics = {"flow_loss": loss.item(), "mse": mse.item(), "action_samples": float(mask.sum())}
        if cfg.dispersive_weight > 0 and int(mask.sum()) >= 2:
            disp = dispersive_loss(out.features[mask], cfg.dispersive_tau)
            loss = loss + cfg.dispersive_weight * disp
            metrics["dispersive"] = disp.item()
        if self.aux_state_head is not None:
            target = self.state_normalizer.normalize(batch["state"][:, now].float(), emb_index)
            err = (self.aux_state_head(features[:, -1]) - target[:, cfg.aux_state_indices]).pow(2).mean(-1)
            aux_weight = weight
            if "state_mask" in batch:
                aux_weight = weight * batch["state_mask"].to(weight.device).float()
            aux = (err * aux_weight).sum() / aux_weight.sum().clamp_min(1.0)
            loss = loss + cfg.aux_state_weight * aux
            metrics["aux_state_mse"] = aux.item()
        if self.aux_recon_head is not None:
            target = F.adaptive_avg_pool2d(obs[:, -1].float() / 127.5 - 1.0, cfg.aux_recon_size)
            recon = F.mse_loss(self.aux_recon_head(features[:, -1]), target)
            loss = loss + cfg.aux_recon_weight * recon
            metrics["aux_recon_mse"] = recon.item()
        metrics["loss"] = loss.item()
        return loss, metrics

    # ------------------------------------------------------------------ inference

    def predict_action_chunk(
        self,
        frames,
        state=None,
        task=None,
        latent=None,
        generator: torch.Generator | None = None,
        n_steps: int | None = None,
        embodiment=None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """frames uint8 ``[B, T, C, H, W]`` (the last ``n_obs_steps`` are used; ``[B, C, H, W]`` when
        ``n_obs_steps == 1``), state ``[B, S]`` (or ``[B, T, S]``: the last is used), task ``str`` or
        ``list[str]``, latent ``[B, H_l, D_l]`` -> raw actions ``[B, H, A]`` (float32, unnormalised).
        ``generator`` (on the model's device) fixes the noise, or ``noise`` ``[B, H, A]`` is the noise
        itself (e.g. each row drawn from its own episode's generator); ``n_steps`` overrides the config.

        The condition (image encoder, state, task, latent) is computed once per chunk; each sampling
        step runs only the velocity network. Runs under ``torch.inference_mode`` (no autograd
        bookkeeping); the returned chunk is a clone made outside it, an ordinary tensor callers may
        modify in place."""
        with torch.inference_mode():
            chunk = self._sample_chunk(frames, state, task, latent, generator, n_steps, embodiment, noise)
        return chunk.clone()

    def _sample_chunk(self, frames, state, task, latent, generator, n_steps, embodiment, noise) -> torch.Tensor:
        cfg = self.config
        frames = torch.as_tensor(frames)
        if frames.dim() == 4:
            frames = frames[:, None]
        if frames.shape[1] < cfg.n_obs_steps:
            raise ValueError(f"got {frames.shape[1]} frames, the decoder needs n_obs_steps={cfg.n_obs_steps}")
        b, device = frames.shape[0], self.task_embedding.weight.device
        frames = frames[:, -cfg.n_obs_steps :].to(device)
        emb_index = self._embodiment_index(embodiment, b)
        if cfg.state_dim:
            if state is None:
                raise ValueError(f"the decoder needs the robot state [B, {cfg.state_dim}]")
            state = torch.as_tensor(state)
            state = (state[:, -1] if state.dim() == 3 else state).to(device)
        latent = None if latent is None else torch.as_tensor(latent).to(device)
        cond = self.encode_condition(frames, state, task, latent, emb_index)
        shape = (b, cfg.horizon, cfg.action_dim)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise is {list(noise.shape)}, the decoder needs {list(shape)}")
        noise = noise.to(device)
        steps = n_steps or cfg.sampling_steps
        sampler = sample_flow_matching if cfg.objective == "fm" else sample_meanflow
        chunk = sampler(self.velocity, noise, cond, n_steps=steps)
        return self.action_normalizer.unnormalize(chunk, emb_index).float()


def _validate(cfg: DecoderConfig) -> None:
    problems = []
    if cfg.action_dim <= 0:
        problems.append("action_dim must be > 0 (the runtime fills it from the manifest)")
    if not cfg.stats:
        problems.append("stats is empty (the runtime fills it with shards.stats.embodiment_stats)")
    if cfg.objective not in OBJECTIVES:
        problems.append(f"objective {cfg.objective!r} is not one of {OBJECTIVES}")
    if cfg.n_obs_steps < 1 or cfg.horizon < 1:
        problems.append("n_obs_steps and horizon must be >= 1")
    if cfg.width % cfg.heads or cfg.width % 2:
        problems.append(f"width {cfg.width} must be even and divisible by heads {cfg.heads}")
    if cfg.latent_dim and not cfg.latent_key:
        problems.append("latent_dim > 0 needs latent_key (the batch key of the latent labels)")
    if cfg.state_indices and not all(0 <= i < cfg.state_dim for i in cfg.state_indices):
        problems.append(f"state_indices {cfg.state_indices} must index the {cfg.state_dim}-dim state")
    if cfg.encoder_pool not in POOLS:
        problems.append(f"encoder_pool {cfg.encoder_pool!r} is not one of {POOLS}")
    if cfg.keypoints < 1:
        problems.append(f"keypoints must be >= 1, got {cfg.keypoints}")
    if cfg.feature_key and not cfg.freeze_encoder:
        problems.append(
            "feature_key (cached encoder features) needs freeze_encoder=true: a trained encoder "
            "would no longer compute them"
        )
    if cfg.feature_key and cfg.augment_shift:
        problems.append(
            "feature_key (cached encoder features) cannot be combined with augment_shift > 0: "
            "the features were computed on unshifted frames"
        )
    if cfg.aux_state_weight < 0:
        problems.append(f"aux_state_weight must be >= 0, got {cfg.aux_state_weight}")
    if cfg.aux_state_weight > 0:
        if not cfg.aux_state_indices:
            problems.append("aux_state_weight > 0 needs aux_state_indices (the state dims to predict)")
        if cfg.state_dim and any(not 0 <= i < cfg.state_dim for i in cfg.aux_state_indices):
            problems.append(f"aux_state_indices {cfg.aux_state_indices} must lie in 0..{cfg.state_dim - 1}")
        if not cfg.state_dim:
            problems.append("aux_state_weight > 0 needs a recorded state (state_dim > 0)")
    if cfg.aux_recon_weight < 0:
        problems.append(f"aux_recon_weight must be >= 0, got {cfg.aux_recon_weight}")
    if cfg.aux_recon_weight > 0:
        size, (h, w) = cfg.aux_recon_size, cfg.image_size
        if h != w or size > h or h % size or size < 4 or size & (size - 1):
            problems.append(
                f"aux_recon_size {size} must be a power of two >= 4 dividing the square image size {cfg.image_size}"
            )
    if cfg.augment_shift < 0:
        problems.append(f"augment_shift must be >= 0, got {cfg.augment_shift}")
    if len(cfg.image_size) != 2:
        problems.append(f"image_size must be [H, W], got {cfg.image_size}")
    if problems:
        raise ValueError("DecoderConfig: " + "; ".join(problems))
