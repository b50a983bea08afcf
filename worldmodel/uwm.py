"""UWM: a unified world model (Zhu et al., "Unified World Models", WEIRDLabUW) trained by flow matching.

One diffusion transformer denoises an action chunk and the future frames together, each with its own
timestep; pinning one timestep gives the modes (policy, forward / inverse dynamics, video, joint).
``variant="dust"`` swaps in DUST's dual-stream blocks (``worldmodel.dust``); everything else is shared.

Network and wrapper are split as in the UWM reference: ``worldmodel.network.VideoActionTransformer``
(``WorldModel.net``) is the transformer over action and future-frame tokens; ``WorldModel`` here holds
the tokenizer choice (pixels / VAE latents), the frozen VAE and text encoder, the embodiment adapters
(``worldmodel.embodiment``), the conditioning, the flow-matching objective, the sampler and the modes.
The config and presets are ``worldmodel.config``.

Timeline of one training window (``frames [B, T, C, H, W]``, ``action [B, T, A]``; ``action[t]`` is the
action taken after seeing frame ``t``; ``t0 = n_obs - 1`` is the last observation)::

    frame index   0 .. t0           t0+g   t0+2g ... t0+n_future*g        (g = frame_gap)
                  current frames    future frames (denoised)
    action index  t0, t0+1, ..., t0+H-1                                   (H = action_horizon)

With the default ``frame_gap = H // n_future`` the last future frame is the one the chunk's last action
leads to. ``config.window`` is the window length the stream must deliver (``n_obs + max(H - 1,
n_future * g)``; 18 for 2 + 2 frames and a 16-step chunk); longer windows are cut, shorter ones refused.

Tokens: ``[H action tokens | n_future * (S/p)^2 future-frame tokens | registers]``. The current frames do
not become tokens: each goes through ``ImageEncoder``; with robot state, task and both timestep
embeddings they form one condition vector injected in every block by AdaLN (shift, scale, gate;
zero-initialised). With ``video_context="last_frame"`` (the presets) the last current frame is also
patch-embedded and added to each future frame's tokens, so the video stream knows where things are.

Flow matching (t = 1 noise, t = 0 data): ``z_t = (1 - t) x + t e``, the network predicts ``e - x``
(or, per modality with ``video_prediction`` / ``action_prediction="x0"``, the clean ``x``, turned into
that velocity for the sampler); Euler from 1 to 0. Actions enter through per-embodiment linear
adapters (normalised with the stats in the config); the LAM's latent actions are one more embodiment,
``"latent"``. Action-free samples train with latent actions when the batch carries them
(``config.latent_action_key``), otherwise with the action timestep at full noise, learned null action
tokens and the action loss masked out (exactly zero).

Outputs of the ``sample_*`` modes: actions in raw units ``[B, H, A]``; frames float ``[B, n_future, 3,
S, S]`` in [-1, 1] (``tokenizer.unit_to_uint8`` converts); with ``frame_space="vae"`` frames are decoded
by the VAE, or returned as latents ``[B, n_future, c, h, w]`` when no VAE is loaded.

Video target (``video_target``): ``"residual"`` (the presets) denoises the future frames minus the last
observed frame, in the same space (pixels or VAE latents), and adds that frame back after sampling;
``"frames"`` denoises the frames themselves. In robot video most of the picture does not move, so the
residual is near zero almost everywhere and copying the last frame is where the model starts rather
than a baseline it has to learn its way past (measured: docs/RESULTS.md, world model).
"""

from __future__ import annotations

import logging

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from nets.flow import interpolate, sample_uniform_time
from nets.image_encoder import ImageEncoder
from nets.state_dict import rename_on_load
from shards.model_folder import ModelFolderMixin, config_fields
from worldmodel.config import PRESETS, WorldModelConfig
from worldmodel.dust import joint_schedule
from worldmodel.embodiment import LATENT, EmbodimentAdapter, embodiment_spec
from worldmodel.network import VideoActionTransformer
from worldmodel.tokenizer import PatchTokenizer, decode_latents, encode_frames, frames_to_unit, load_vae, vae_downsample

# callers import the config, presets and embodiment helpers from here too
__all__ = [
    "LATENT",
    "PRESETS",
    "WorldModel",
    "WorldModelConfig",
    "embodiment_spec",
    "velocity_from_clean",
    "clean_from_velocity",
]

log = logging.getLogger(__name__)

X0_MIN_T = 0.05  # video_prediction / action_prediction="x0": the velocity divides by t, floored here


def _t_floor(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` timesteps, floored at ``X0_MIN_T``, shaped to broadcast over ``like`` ``[B, ...]``."""
    return t.float().clamp_min(X0_MIN_T).view(-1, *[1] * (like.ndim - 1))


def velocity_from_clean(z: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An x0 head's output as the velocity the sampler integrates: ``(z - x0) / max(t, X0_MIN_T)``."""
    return (z.float() - x0.float()) / _t_floor(t, z)


def clean_from_velocity(z: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The inverse of ``velocity_from_clean``: the clean estimate ``z - max(t, X0_MIN_T) v``."""
    return z - _t_floor(t, z) * v.float()


# state-dict keys of folders saved before the network moved into ``WorldModel.net`` (format 0 / 1)
NETWORK_RENAMES = [
    (r"(t_action|t_video|context_embed|blocks|final_action|final_video)\.(.*)", r"net.\1.\2"),
    (r"(null_action|action_pos|video_pos|register_tokens)", r"net.\1"),
]


def _groups(names: list) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name is not None:
            out.setdefault(name, []).append(i)
    return out


class WorldModel(nn.Module, ModelFolderMixin, PyTorchModelHubMixin):
    """UWM / DUST world model. ``forward(batch) -> (loss, metrics)``; ``sample_*`` modes; see module doc."""

    # config.json's _format_version: raise it (and convert older folders) when the layout changes.
    # 2: the transformer's parameters under net. (VideoActionTransformer); 1 and 0 load through NETWORK_RENAMES
    FORMAT_VERSION = 2

    def __init__(self, config: WorldModelConfig):
        super().__init__()
        if isinstance(config, dict):  # from_pretrained hands back the JSON dict
            config = WorldModelConfig(**config_fields(config))
        self.config = cfg = config
        d = cfg.width
        self._frozen: dict = {}  # VAE / text encoder: loaded from local paths, never saved with the weights
        if cfg.frame_space == "vae":
            if cfg.vae_path:
                self._frozen["vae"] = vae = load_vae(cfg.vae_path)
                cfg.vae_latent_channels = cfg.vae_latent_channels or vae.config.latent_channels
                cfg.vae_downsample = cfg.vae_downsample or vae_downsample(vae)
            if not (cfg.vae_latent_channels and cfg.vae_downsample):
                raise ValueError("frame_space='vae' needs vae_path, or vae_latent_channels and vae_downsample")
            self.tokenizer = PatchTokenizer(
                cfg.vae_latent_channels, cfg.image_size // cfg.vae_downsample, cfg.patch_size, d
            )
        else:
            self.tokenizer = PatchTokenizer(3, cfg.image_size, cfg.patch_size, d)
        n_video = cfg.n_future * self.tokenizer.tokens_per_frame

        self.image_encoder = ImageEncoder(d, cfg.encoder_channels, cfg.encoder_blocks, pool=cfg.encoder_pool)
        self.obs_proj = nn.Linear(cfg.n_obs * d, d)
        self.adapters = nn.ModuleDict({n: EmbodimentAdapter(n, s, d, cfg.n_obs) for n, s in cfg.embodiments.items()})
        if cfg.text_encoder_path:
            try:
                from transformers import AutoModel, AutoTokenizer
            except ImportError as e:
                raise ImportError(
                    f"text_encoder_path needs transformers: pip install 'wm-pipeline[text]' ({e})"
                ) from None

            text_model = AutoModel.from_pretrained(cfg.text_encoder_path).eval().requires_grad_(False)
            self._frozen["text"] = (AutoTokenizer.from_pretrained(cfg.text_encoder_path), text_model, {})
            self.text_proj = nn.Linear(text_model.config.hidden_size, d)
        else:
            self.task_embedding = nn.Embedding(len(cfg.tasks) + 1, d)  # index 0: unknown / no task
        self.net = VideoActionTransformer(
            width=d,
            depth=cfg.depth,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            action_tokens=cfg.action_horizon,
            video_tokens=n_video,
            registers=cfg.registers,
            n_future=cfg.n_future,
            variant=cfg.variant,
            context=(self.tokenizer.channels, self.tokenizer.patch) if cfg.video_context == "last_frame" else None,
        )
        rename_on_load(self, NETWORK_RENAMES)  # format 1: the network's parameters sat on the model itself
        self.num_tokens = self.net.num_tokens

    # ----------------------------------------------------------------------------------- conditioning
    def _task_features(self, task: list[str] | None, batch_size: int, device) -> torch.Tensor:
        task = list(task) if task is not None else [""] * batch_size
        if "text" in self._frozen:
            tokenizer, model, cache = self._frozen["text"]
            missing = sorted({s for s in task if s not in cache})
            if missing:
                with torch.no_grad():
                    enc = tokenizer(missing, return_tensors="pt", padding=True)
                    hidden = model.to(device)(**enc.to(device)).last_hidden_state
                    m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    for s, f in zip(missing, (hidden * m).sum(1) / m.sum(1).clamp_min(1)):
                        cache[s] = f.float()
            return self.text_proj(torch.stack([cache[s].to(device) for s in task]))
        vocab = {name: i + 1 for i, name in enumerate(self.config.tasks)}
        idx = torch.tensor([vocab.get(s, 0) for s in task], device=device)
        return self.task_embedding(idx)

    def _condition(self, obs: torch.Tensor, names: list, state, state_mask, task) -> torch.Tensor:
        """obs ``[B, n_obs, 3, S, S]``, state raw ``[B, n_obs, S_max]`` or None -> condition ``[B, D]``
        (without the timestep embeddings, so sampling computes it once)."""
        b, n = obs.shape[:2]
        if n != self.config.n_obs or obs.shape[-1] != self.config.image_size:
            raise ValueError(
                f"expected current frames [B, {self.config.n_obs}, 3, {self.config.image_size}, "
                f"{self.config.image_size}], got {tuple(obs.shape)}"
            )
        cond = self.obs_proj(self.image_encoder(obs.flatten(0, 1)).view(b, -1))
        cond = cond + self._task_features(task, b, cond.device)
        if state is not None:
            extra = torch.zeros_like(cond)
            for name, idx in _groups(names).items():
                adapter = self.adapters[name]
                idx = [i for i in idx if state_mask is None or bool(state_mask[i])]
                if adapter.state_in is not None and idx:
                    extra[idx] = adapter.state_features(state[idx, :, : adapter.state_dim].to(cond)).to(extra.dtype)
            cond = cond + extra
        return cond

    def _last_frame(self, frames: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor | None:
        """The last observed frame in the denoised space ``[B, 1, c, h, w]``, when the residual target or the
        frame context needs it (else None). ``latents``: precomputed VAE latents of the window."""
        cfg = self.config
        if cfg.video_target != "residual" and cfg.video_context == "none":
            return None
        last = cfg.n_obs - 1
        if latents is not None:
            return latents[:, last : last + 1].float()
        return self._video_data(frames[:, last : last + 1])

    # ----------------------------------------------------------------------------------- network I/O
    def _velocity(self, cond, t_a, t_v, z_a, z_v, names, last=None):
        """Predicted velocities (actions and frames to tokens, ``self.net``, tokens back, x0 heads turned
        into velocities). cond ``[B, D]``; t_a, t_v ``[B]``; z_a noisy normalised actions
        ``[B, H, A_max]``; z_v noisy frames ``[B, F, c, h, w]``; names: embodiment per sample (None: no
        action stream, null tokens); last: the last observed frame in the denoised space (needed with
        ``video_context="last_frame"``). -> v_a ``[B, H, A_max]`` (zero outside each sample's dims), v_v."""
        cfg, b = self.config, z_a.shape[0]
        groups = _groups(names)
        embedded = {
            name: self.adapters[name].action_in(z_a[idx, :, : self.adapters[name].action_dim])
            for name, idx in groups.items()
        }
        # under autocast the adapters give bf16: the null tokens take the same dtype before the scatter
        tok_a = self.net.null_tokens(b, next(iter(embedded.values())).dtype if embedded else None)
        for name, idx in groups.items():
            tok_a[idx] = embedded[name]
        h_a, h_v = self.net(tok_a, self.tokenizer.patchify(z_v), cond, t_a, t_v, last)
        v_v = self.tokenizer.unpatchify(h_v)
        if cfg.video_prediction == "x0":
            v_v = velocity_from_clean(z_v, v_v, t_v)
        v_a = z_a.new_zeros(z_a.shape, dtype=torch.float32)
        for name, idx in groups.items():
            adapter = self.adapters[name]
            v_a[idx, :, : adapter.action_dim] = adapter.action_out(h_a[idx]).float()
        if cfg.action_prediction == "x0":  # v_a holds the clean chunk (zero outside each sample's dims)
            v_a = velocity_from_clean(z_a, v_a, t_a)
        return v_a, v_v

    # ----------------------------------------------------------------------------------- training
    def _video_data(self, frames: torch.Tensor) -> torch.Tensor:
        """frames uint8 ``[B, F, 3, S, S]`` -> the denoised space: [-1, 1] pixels, or VAE latents."""
        if self.config.frame_space == "pixels":
            return frames_to_unit(frames)
        if "vae" not in self._frozen:
            raise ValueError(
                f"frame_space='vae' without a VAE: put precomputed latents under "
                f"{self.config.vae_latent_key!r} in the batch, or set vae_path"
            )
        vae = self._frozen["vae"].to(frames.device)
        return encode_frames(vae, frames.flatten(0, 1)).view(*frames.shape[:2], *self.tokenizer_shape)

    @property
    def tokenizer_shape(self) -> tuple[int, int, int]:
        t = self.tokenizer
        return (t.channels, t.size, t.size)

    def _action_data(self, batch: dict, b: int, device):
        """Normalised action chunks ``[B, H, A_max]``, embodiment per sample (None: action-free without
        latent actions) and a dims mask ``[B, A_max]``."""
        cfg, t0 = self.config, self.config.n_obs - 1
        mask = batch.get("action_mask")
        latent = batch.get(cfg.latent_action_key)
        names = []
        for i, emb in enumerate(batch["embodiment"]):
            if mask is None or bool(mask[i]):
                if emb not in self.adapters:
                    raise ValueError(
                        f"sample {i} has actions of embodiment {emb!r}, which the config does not "
                        f"know (known: {sorted(self.adapters)}); add it to config.embodiments"
                    )
                names.append(emb)
            else:
                names.append(LATENT if latent is not None and LATENT in self.adapters else None)
        a_max = max([self.adapters[n].action_dim for n in names if n is not None] or [1])
        x = torch.zeros(b, cfg.action_horizon, a_max, device=device)
        dims = torch.zeros(b, a_max, device=device)
        for name, idx in _groups(names).items():
            adapter = self.adapters[name]
            src = latent if name == LATENT else batch["action"]
            chunk = src[idx, t0 : t0 + cfg.action_horizon].to(device).float().flatten(2)
            if chunk.shape[-1] < adapter.action_dim:
                key = cfg.latent_action_key if name == LATENT else "action"
                raise ValueError(
                    f"batch[{key!r}] has {chunk.shape[-1]} dims, embodiment {name!r} needs {adapter.action_dim}"
                )
            x[idx, :, : adapter.action_dim] = adapter.normalize_action(chunk[..., : adapter.action_dim])
            dims[idx, : adapter.action_dim] = 1.0
        return x, names, dims

    def losses(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The two flow-matching losses (and their weighted sum ``loss``) on one training batch."""
        cfg = self.config
        device = self.net.null_action.device
        frames = batch["frames"].to(device)
        b, t = frames.shape[:2]
        if t < cfg.window:
            raise ValueError(
                f"batch frames have T={t}, the world model needs windows of {cfg.window} frames "
                f"(n_obs={cfg.n_obs}, n_future={cfg.n_future}, frame_gap={cfg.frame_gap}, "
                f"action_horizon={cfg.action_horizon})"
            )
        fut = cfg.future_indices()
        last = cfg.n_obs - 1
        if cfg.frame_space == "vae" and cfg.vae_latent_key in batch:
            latents = batch[cfg.vae_latent_key].to(device)
            x_v, base = latents[:, fut].float(), self._last_frame(frames, latents)
        else:
            if cfg.frame_space == "vae" and not self._frozen.get("warned"):
                self._frozen["warned"] = True
                log.warning(
                    "no %r in the batch: encoding future frames with the VAE at every step (slow); "
                    "precompute the latents once with a labelling pass",
                    cfg.vae_latent_key,
                )
            need_last = cfg.video_target == "residual" or cfg.video_context != "none"
            both = self._video_data(frames[:, [last, *fut] if need_last else fut])  # one VAE pass at most
            base, x_v = (both[:, :1], both[:, 1:]) if need_last else (None, both)
        if cfg.video_target == "residual":
            x_v = x_v - base
        x_v = x_v * cfg.video_scale
        x_a, names, dims = self._action_data(batch, b, device)
        has_actions = torch.tensor([n is not None for n in names], device=device)
        state = batch.get("state")
        cond = self._condition(
            frames[:, : cfg.n_obs],
            names,
            None if state is None else state[:, : cfg.n_obs].to(device),
            batch.get("state_mask"),
            batch.get("task"),
        )

        def draw_t():
            return sample_uniform_time(b, p_noise=cfg.p_marginal, device=device, generator=generator)

        t_a = torch.where(has_actions, draw_t(), torch.ones(b, device=device))
        t_v = draw_t()
        if cfg.p_inverse > 0:
            pin = has_actions & (torch.rand(b, device=device, generator=generator) < cfg.p_inverse)
            t_v = torch.where(pin, torch.zeros_like(t_v), t_v)
        e_a = torch.randn(x_a.shape, device=device, generator=generator) * dims[:, None]
        e_v = torch.randn(x_v.shape, device=device, generator=generator)
        z_a, z_v = interpolate(x_a, e_a, t_a), interpolate(x_v, e_v, t_v)
        v_a, v_v = self._velocity(cond, t_a, t_v, z_a, z_v, names, base)

        if cfg.action_prediction == "x0":  # the error of the predicted clean chunk, as for the video
            sq_a = (clean_from_velocity(z_a, v_a, t_a) - x_a) ** 2
        else:
            sq_a = (v_a.float() - (e_a - x_a)) ** 2
        err_a = (sq_a * dims[:, None]).sum((1, 2)) / (cfg.action_horizon * dims.sum(1)).clamp_min(1)
        # torch.where, not a product: action-free samples contribute exactly zero (even if err were inf)
        loss_a = torch.where(has_actions, err_a, torch.zeros_like(err_a)).sum() / has_actions.sum().clamp_min(1)
        if cfg.video_prediction == "x0":
            # the error of the predicted clean target: bounded, unlike the velocity error's 1 / t^2 weighting
            err_v = ((clean_from_velocity(z_v, v_v, t_v) - x_v) ** 2).flatten(1).mean(1)
        else:
            err_v = ((v_v.float() - (e_v - x_v)) ** 2).flatten(1).mean(1)
        scored = t_v > 0  # a clean (pinned) video input is the answer: nothing to learn there
        loss_v = torch.where(scored, err_v, torch.zeros_like(err_v)).sum() / scored.sum().clamp_min(1)
        loss = cfg.action_loss_weight * loss_a + cfg.video_loss_weight * loss_v
        # the batch-dependent parameters (adapters, null token) join the graph with weight 0 whether or not
        # this batch used them, so DDP needs no unused-parameter search
        loss = loss + 0.0 * sum(
            p.sum() for p in [self.net.null_action, *self.adapters.parameters(), *self.net.final_action.parameters()]
        )
        return {
            "loss": loss,
            "loss_action": loss_a,
            "loss_video": loss_v,
            "action_fraction": has_actions.float().mean(),
        }

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.losses(batch, generator)
        return out["loss"], {k: float(v.detach()) for k, v in out.items()}

    # ----------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def _sample(
        self,
        obs,
        embodiment,
        *,
        actions=None,
        next_frames=None,
        gen_actions=True,
        gen_video=True,
        task=None,
        state=None,
        action_steps=None,
        video_steps=None,
        generator=None,
    ):
        """Shared sampler. A modality is generated (Euler 1 -> 0), given clean (t = 0), or left at full
        noise (t = 1). Returns (actions raw ``[B, H, A]`` or None, frames or None)."""
        cfg = self.config
        device = self.net.null_action.device
        obs = obs.to(device)
        b = obs.shape[0]
        if embodiment is not None and embodiment not in self.adapters:
            raise ValueError(f"unknown embodiment {embodiment!r} (known: {sorted(self.adapters)})")
        if embodiment is None and (gen_actions or actions is not None):
            raise ValueError("this mode needs an embodiment (the action adapter to use)")
        names = [embodiment] * b
        adapter = self.adapters[embodiment] if embodiment is not None else None
        cond = self._condition(obs, names, None if state is None else state.to(device), None, task)
        a_dim = adapter.action_dim if adapter is not None else 1
        x_a = torch.randn(b, cfg.action_horizon, a_dim, device=device, generator=generator)
        x_v = torch.randn(b, cfg.n_future, *self.tokenizer_shape, device=device, generator=generator)
        t_a = torch.ones(b, device=device)
        t_v = torch.ones(b, device=device)
        if actions is not None:
            x_a, t_a = adapter.normalize_action(actions.to(device).float()), torch.zeros_like(t_a)
        base = None  # the last observed frame in the denoised space, where the target or the context needs it
        if cfg.video_context != "none" or gen_video or next_frames is not None:
            base = self._last_frame(obs)
        if next_frames is not None:
            x_v, t_v = self._video_data(next_frames.to(device)), torch.zeros_like(t_v)
            if cfg.video_target == "residual":
                x_v = x_v - base
            x_v = x_v * cfg.video_scale
        n_a = action_steps or cfg.action_steps
        n_v = video_steps or cfg.video_steps
        if gen_actions and gen_video:
            schedule = joint_schedule(n_a, n_v)
        else:
            schedule = [(True, False)] * n_a if gen_actions else [(False, True)] * n_v
        k_a = k_v = 0
        for step_a, step_v in schedule:
            v_a, v_v = self._velocity(cond, t_a, t_v, x_a, x_v, names, base)
            if step_a:  # each stream on its own uniform grid; times set from the index, so they end at 0
                k_a += 1
                x_a, t_a = x_a - v_a.float() / n_a, torch.full_like(t_a, 1 - k_a / n_a)
            if step_v:
                k_v += 1
                x_v, t_v = x_v - v_v.float() / n_v, torch.full_like(t_v, 1 - k_v / n_v)
        out_a = adapter.denormalize_action(x_a) if gen_actions else None
        if gen_video:
            x_v = x_v / cfg.video_scale
            if cfg.video_target == "residual":
                x_v = x_v + base
        out_v = self._frames_out(x_v) if gen_video else None
        return out_a, out_v

    def _frames_out(self, x_v: torch.Tensor) -> torch.Tensor:
        if self.config.frame_space == "pixels":
            return x_v.clamp(-1, 1)
        if "vae" not in self._frozen:
            return x_v  # latents; the caller decodes them
        vae = self._frozen["vae"].to(x_v.device)
        return decode_latents(vae, x_v.flatten(0, 1)).view(
            *x_v.shape[:2], 3, self.config.image_size, self.config.image_size
        )

    def sample_policy(self, obs_frames, embodiment: str, *, task=None, state=None, steps=None, generator=None):
        """Actions given current frames (video at full noise). obs_frames uint8 ``[B, n_obs, 3, S, S]``,
        state raw ``[B, n_obs, S]`` -> actions raw ``[B, H, A]``."""
        return self._sample(
            obs_frames, embodiment, gen_video=False, task=task, state=state, action_steps=steps, generator=generator
        )[0]

    def sample_forward_dynamics(
        self, obs_frames, actions, embodiment: str, *, task=None, state=None, steps=None, generator=None
    ):
        """Future frames given current frames and actions raw ``[B, H, A]`` -> frames ``[B, n_future, 3, S, S]``."""
        return self._sample(
            obs_frames,
            embodiment,
            actions=actions,
            gen_actions=False,
            task=task,
            state=state,
            video_steps=steps,
            generator=generator,
        )[1]

    def sample_inverse_dynamics(
        self, obs_frames, next_frames, embodiment: str, *, task=None, state=None, steps=None, generator=None
    ):
        """Actions given current and future frames (uint8 ``[B, n_future, 3, S, S]``) -> actions raw ``[B, H, A]``."""
        return self._sample(
            obs_frames,
            embodiment,
            next_frames=next_frames,
            gen_video=False,
            task=task,
            state=state,
            action_steps=steps,
            generator=generator,
        )[0]

    def sample_video(
        self, obs_frames, embodiment: str | None = None, *, task=None, state=None, steps=None, generator=None
    ):
        """Future frames, actions at full noise (embodiment None: null action tokens, as action-free video
        trains) -> frames ``[B, n_future, 3, S, S]``."""
        return self._sample(
            obs_frames, embodiment, gen_actions=False, task=task, state=state, video_steps=steps, generator=generator
        )[1]

    def sample_joint(
        self, obs_frames, embodiment: str, *, task=None, state=None, action_steps=None, video_steps=None, generator=None
    ):
        """Actions and future frames together; each stream on its own step count (DUST's asynchronous
        sampling when ``video_steps > action_steps``) -> (actions ``[B, H, A]``, frames)."""
        return self._sample(
            obs_frames,
            embodiment,
            task=task,
            state=state,
            action_steps=action_steps,
            video_steps=video_steps,
            generator=generator,
        )
