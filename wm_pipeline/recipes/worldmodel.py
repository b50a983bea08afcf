"""`wm train worldmodel`: the UWM / DUST world model (worldmodel/uwm.py) on demos and action-free video.

    wm train worldmodel --data DEMOS [--data VIDEO ...] --out RUN [--preset tiny|small|base]
                        [--labels NAME ...] [model.variant=uwm|dust] [data.weights=0.5,0.5]

``prepare`` fills the data-dependent fields of ``WorldModelConfig`` from the manifests:

- ``image_size``: ``data.resize`` or the data's square resolution; ``data.camera``: the first camera;
- ``embodiments``: every embodiment that has actions, with its action / state dims and mean / std from
  the manifest stats (so the normalisation is saved with the weights); ``tasks``: the union of tasks;
- ``data.window = model.window`` (current frames + action chunk + future frames).

Mixing sources: every ``--data`` folder joins one stream, drawn with ``data.weights`` (default: by
size). Robot demos train both losses; action-free clips (``action_mask`` False) train the video loss
with the action loss masked, or, with LAM labels, with latent actions as an action stream.

Sidecars (``--labels NAME`` = ``data.labels``), recognised from ``labels/NAME/labeller.json``:

- a LAM (field ``latent`` [n, D]): ``model.latent_action_key = "NAME.latent"``, ``latent_action_dim = D``
  (the ``"latent"`` embodiment). Every ``--data`` folder needs the sidecar (label the demos too).
- a frozen VAE (kind ``vae``, wm_pipeline/jobs/vae_labeller.py; field ``latent`` [n, c, h, w]):
  ``frame_space = "vae"``, ``vae_latent_key = "NAME.latent"``, latent channels / downsampling from the
  labeller; the latents are streamed, never recomputed per step. ``vae_path`` (for decoding frames in
  evaluation) is taken from the labeller when that folder still exists.

The control for the inverse-dynamics comparison (docs/RESULTS.md): ``policy=no-future`` trains the
same network on the same data with the future frames replaced by the last current frame in every
batch and the video loss off. It never sees a future frame, so it is a behaviour-cloning policy with
UWM's architecture. ``wm worldmodel eval`` reports, for every run, inverse dynamics with the true
future frames, with the future replaced by the last current frame, and the policy mode (video at
full noise); docs/RESULTS.md compares the world model's inverse dynamics with the control's best.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from shards.batch_keys import FRAMES
from shards.dataset_info import DatasetInfo
from shards.model_folder import CONFIG as MODEL_CONFIG
from wm_pipeline.recipes.lam import camera_from_data, image_size_from_data
from wm_pipeline.training.registry import ModelDataMismatch, default_stream
from worldmodel.uwm import WorldModelConfig, embodiment_spec

log = logging.getLogger(__name__)

POLICIES = ("", "uwm", "no-future")  # what the run trains: the world model, or the no-future control


def _embodiments(info: DatasetInfo) -> dict[str, dict]:
    """{name: embodiment_spec} for every embodiment with actions; dims must agree across folders."""
    found: dict[str, tuple[dict, str]] = {}
    for e in info.embodiments_with_actions():
        stats = dict(e.stats)
        if not e.state_dim:
            stats.pop("state", None)
        spec = embodiment_spec(stats, action_dim=e.action_dim, state_dim=e.state_dim)
        if e.name in found:
            old, where = found[e.name]
            if (old["action_dim"], old["state_dim"]) != (spec["action_dim"], spec["state_dim"]):
                raise ModelDataMismatch(
                    f"embodiment {e.name!r} has action/state dims {old['action_dim']}/{old['state_dim']} in {where} "
                    f"but {spec['action_dim']}/{spec['state_dim']} in {e.path}"
                )
            continue
        found[e.name] = (spec, e.path)
    return {name: spec for name, (spec, _) in found.items()}


def _labels(cfg, image_size: int, patch_size: int) -> dict:
    """The model fields that point at the sidecars named in ``data.labels`` (see the module docstring)."""
    from shards.sidecar import sidecar_dir

    fields_of: dict = {}
    for name in cfg.data.labels:
        info_path = sidecar_dir(cfg.data.paths[0], name) / "labeller.json"
        if not info_path.is_file():
            raise ModelDataMismatch(f"{info_path}: no labels '{name}' (run `wm label ... --name {name}` first)")
        info = json.loads(info_path.read_text())
        fields = info.get("fields") or {}
        if "latent" not in fields:
            log.warning(
                "labels '%s' have no 'latent' field (%s): streamed but not read by the world model",
                name,
                sorted(fields),
            )
            continue
        shape = fields["latent"]["shape"][1:]
        if info.get("kind") == "vae":
            c, h, _ = (int(v) for v in shape)
            downsample = image_size // h
            vae = info.get("checkpoint")
            fields_of.update(
                frame_space="vae",
                vae_latent_key=f"{name}.latent",
                vae_latent_channels=c,
                vae_downsample=downsample,
                vae_path=vae if vae and (Path(vae) / MODEL_CONFIG).is_file() else None,
            )
            if downsample * h != image_size or image_size // downsample % patch_size:
                raise ModelDataMismatch(
                    f"labels '{name}': {h}x{h} latents of {image_size} px frames do not fit "
                    f"model.patch_size={patch_size}"
                )
        else:
            if len(shape) != 1:
                raise ModelDataMismatch(f"labels '{name}': latent actions must be [n_frames, D], got {shape}")
            fields_of.update(latent_action_key=f"{name}.latent", latent_action_dim=int(shape[0]))
    return fields_of


def prepare(cfg, info: DatasetInfo):
    """The run config with the world model's data-dependent fields filled (a new config; ``cfg`` is not changed)."""
    m: WorldModelConfig = cfg.model
    if cfg.recipe not in POLICIES:
        raise ModelDataMismatch(f"policy={cfg.recipe!r}: the world model trains as one of {[p for p in POLICIES if p]}")
    unit = m.patch_size * (m.vae_downsample or 1)
    image_size = image_size_from_data(cfg, info, unit)
    camera = camera_from_data(cfg, info)
    embodiments = {k: v for k, v in m.embodiments.items() if k == "latent"} | _embodiments(info)
    labels = _labels(cfg, image_size, m.patch_size)
    if not labels.get("latent_action_dim", m.latent_action_dim):
        embodiments.pop("latent", None)
    changes = dict(image_size=image_size, embodiments=embodiments, tasks=info.tasks(), **labels)
    if cfg.recipe == "no-future":
        changes["video_loss_weight"] = 0.0
    m = replace(m, **changes)  # WorldModelConfig.__post_init__ adds the "latent" embodiment and checks the specs
    if not [k for k in m.embodiments if k != "latent"]:
        log.warning(
            "no episodes with actions in %s: the world model learns video only (no policy modes)", cfg.data.paths
        )
    log.info(
        "world model %s: %d px, window %d frames (%d current, chunk %d, future at %s), embodiments %s%s",
        m.variant,
        m.image_size,
        m.window,
        m.n_obs,
        m.action_horizon,
        m.future_indices(),
        sorted(m.embodiments),
        ", future frames hidden (no-future control)" if cfg.recipe == "no-future" else "",
    )
    return replace(cfg, model=m, data=replace(cfg.data, camera=camera, window=m.window))


def hide_future(batch: dict, config: WorldModelConfig) -> dict:
    """The no-future control: frames after the current ones become copies of the last current frame
    (and VAE latents likewise), so no future information reaches the model."""
    t0 = config.n_obs - 1
    frames = batch[FRAMES].clone()
    frames[:, t0 + 1 :] = frames[:, t0 : t0 + 1]
    batch[FRAMES] = frames
    if config.vae_latent_key in batch:
        lat = batch[config.vae_latent_key].clone()
        lat[:, t0 + 1 :] = lat[:, t0 : t0 + 1]
        batch[config.vae_latent_key] = lat
    return batch


def build_stream(cfg, seed: int):
    """The default window stream; for ``policy=no-future`` with the future frames hidden."""
    loader = default_stream(cfg, seed=seed)
    if cfg.recipe != "no-future":
        return loader
    return (hide_future(batch, cfg.model) for batch in loader)


RUN_PRESETS = {
    "tiny": {
        "data": {"batch_size": 8, "windows_per_episode": 4, "shuffle_buffer": 16},
        "optim": {"lr": 2e-3, "warmup_steps": 10},
        "train": {"max_steps": 60},
    },
    "small": {
        "data": {"batch_size": 8, "windows_per_episode": 8, "shuffle_buffer": 128, "num_workers": 1},
        "optim": {"lr": 5e-4, "warmup_steps": 100},
        "train": {"max_steps": 1000, "eval_every": 0},
    },
}
