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
from pathlib import Path

from wm_pipeline.recipes.lam import camera_from_data, image_size_from_data
from wm_pipeline.training.registry import ModelDataMismatch, default_stream, register_model
from worldmodel.uwm import PRESETS, WorldModel, WorldModelConfig, embodiment_spec

log = logging.getLogger(__name__)

POLICIES = ("", "uwm", "no-future")   # what the run trains: the world model, or the no-future control


def _embodiments(cfg, manifests: list[dict]) -> dict[str, dict]:
    """{name: embodiment_spec} for every embodiment with actions; dims must agree across folders."""
    found: dict[str, tuple[dict, str]] = {}
    for path, man in zip(cfg.data.paths, manifests):
        for name, e in man["embodiments"].items():
            if not e.get("action_dim"):
                continue
            stats = dict(e.get("stats") or {})
            if not e.get("state_dim"):
                stats.pop("state", None)
            spec = embodiment_spec(stats, action_dim=e["action_dim"], state_dim=e.get("state_dim") or 0)
            if name in found:
                old, where = found[name]
                if (old["action_dim"], old["state_dim"]) != (spec["action_dim"], spec["state_dim"]):
                    raise ModelDataMismatch(
                        f"embodiment {name!r} has action/state dims {old['action_dim']}/{old['state_dim']} in {where} "
                        f"but {spec['action_dim']}/{spec['state_dim']} in {path}")
                continue
            found[name] = (spec, path)
    return {name: spec for name, (spec, _) in found.items()}


def _labels(cfg, m: WorldModelConfig) -> None:
    """Point the model at the sidecars named in ``data.labels`` (see the module docstring)."""
    from shards.sidecar import sidecar_dir

    for name in cfg.data.labels:
        info_path = sidecar_dir(cfg.data.paths[0], name) / "labeller.json"
        if not info_path.is_file():
            raise ModelDataMismatch(f"{info_path}: no labels '{name}' (run `wm label ... --name {name}` first)")
        info = json.loads(info_path.read_text())
        fields = info.get("fields") or {}
        if "latent" not in fields:
            log.warning("labels '%s' have no 'latent' field (%s): streamed but not read by the world model",
                        name, sorted(fields))
            continue
        shape = fields["latent"]["shape"][1:]
        if info.get("kind") == "vae":
            c, h, _ = (int(v) for v in shape)
            m.frame_space, m.vae_latent_key, m.vae_latent_channels = "vae", f"{name}.latent", c
            m.vae_downsample = m.image_size // h
            vae = info.get("checkpoint")
            m.vae_path = vae if vae and (Path(vae) / "config.json").is_file() else None
            if m.vae_downsample * h != m.image_size or m.image_size // m.vae_downsample % m.patch_size:
                raise ModelDataMismatch(f"labels '{name}': {h}x{h} latents of {m.image_size} px frames do not fit "
                                        f"model.patch_size={m.patch_size}")
        else:
            if len(shape) != 1:
                raise ModelDataMismatch(f"labels '{name}': latent actions must be [n_frames, D], got {shape}")
            m.latent_action_key, m.latent_action_dim = f"{name}.latent", int(shape[0])


def prepare(cfg, manifests: list[dict]) -> None:
    m: WorldModelConfig = cfg.model
    if cfg.policy not in POLICIES:
        raise ModelDataMismatch(f"policy={cfg.policy!r}: the world model trains as one of {[p for p in POLICIES if p]}")
    unit = m.patch_size * (m.vae_downsample or 1)
    m.image_size = image_size_from_data(cfg, manifests, unit)
    camera_from_data(cfg, manifests)
    m.embodiments = {k: v for k, v in m.embodiments.items() if k == "latent"} | _embodiments(cfg, manifests)
    m.tasks = sorted({t for man in manifests for t in (man.get("tasks") or {}) if t})
    _labels(cfg, m)
    if m.latent_action_dim == 0:
        m.embodiments.pop("latent", None)
    m.__post_init__()   # adds the "latent" embodiment and re-checks the specs
    if not [k for k in m.embodiments if k != "latent"]:
        log.warning("no episodes with actions in %s: the world model learns video only (no policy modes)",
                    cfg.data.paths)
    if cfg.policy == "no-future":
        m.video_loss_weight = 0.0
    cfg.data.window = m.window
    log.info("world model %s: %d px, window %d frames (%d current, chunk %d, future at %s), embodiments %s%s",
             m.variant, m.image_size, m.window, m.n_obs, m.action_horizon, m.future_indices(), sorted(m.embodiments),
             ", future frames hidden (no-future control)" if cfg.policy == "no-future" else "")


def hide_future(batch: dict, config: WorldModelConfig) -> dict:
    """The no-future control: frames after the current ones become copies of the last current frame
    (and VAE latents likewise), so no future information reaches the model."""
    t0 = config.n_obs - 1
    frames = batch["frames"].clone()
    frames[:, t0 + 1:] = frames[:, t0: t0 + 1]
    batch["frames"] = frames
    if config.vae_latent_key in batch:
        lat = batch[config.vae_latent_key].clone()
        lat[:, t0 + 1:] = lat[:, t0: t0 + 1]
        batch[config.vae_latent_key] = lat
    return batch


def build_stream(cfg, seed: int):
    """The default window stream; for ``policy=no-future`` with the future frames hidden."""
    loader = default_stream(cfg, seed=seed)
    if cfg.policy != "no-future":
        return loader
    return (hide_future(batch, cfg.model) for batch in loader)


RUN_PRESETS = {
    "tiny": {"data": {"batch_size": 8, "windows_per_episode": 4, "shuffle_buffer": 16},
             "optim": {"lr": 2e-3, "warmup_steps": 10}, "train": {"max_steps": 60}},
    "small": {"data": {"batch_size": 8, "windows_per_episode": 8, "shuffle_buffer": 128, "num_workers": 1},
              "optim": {"lr": 5e-4, "warmup_steps": 100}, "train": {"max_steps": 1000, "eval_every": 0}},
}

register_model("worldmodel", WorldModelConfig, WorldModel, PRESETS, prepare=prepare, build_stream=build_stream,
               run_presets=RUN_PRESETS, required_keys=("frames", "action", "action_mask", "embodiment"),
               warm_start=True)   # `--init PRETRAINED` fine-tunes (the uwm policy)


def _register_vae_labeller() -> None:
    try:
        import wm_pipeline.jobs.vae_labeller  # noqa: F401  (registers the labeller kind "vae")
    except ImportError as e:   # wm label without the VAE kind; training is unaffected
        log.debug("VAE labeller unavailable: %s", e)


_register_vae_labeller()
