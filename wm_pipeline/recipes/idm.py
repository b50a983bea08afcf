"""`wm train idm`: the inverse-dynamics model (latent_actions/idm.py) on the few labelled demos.

    wm train idm --data DEMOS --out RUN [--preset tiny|small|base] [data.window=8]

``prepare`` fills the data-dependent fields: the image size (``data.resize`` or the data's square
resolution), the camera (recorded for labelling), ``action_dim`` and the per-embodiment
normalisation stats of every embodiment that has actions. Action-free samples may be mixed in:
the model's loss ignores them (``action_mask``). The trained run labels action-free corpora with
pseudo-actions through ``wm label --labeller RUN`` (wm_pipeline/jobs/labelling.py).
"""

from __future__ import annotations

from dataclasses import replace

from latent_actions.idm import IDMConfig, InverseDynamicsModel
from shards.batch_keys import PSEUDO_ACTION
from shards.dataset_info import DatasetInfo
from wm_pipeline.recipes.lam import camera_from_data, image_size_from_data
from wm_pipeline.training.registry import ModelDataMismatch


def prepare(cfg, info: DatasetInfo):
    """The run config with the IDM's data-dependent fields filled (a new config; ``cfg`` is not changed)."""
    m: IDMConfig = cfg.model
    paths = list(cfg.data.paths)
    image_size = image_size_from_data(cfg, info, 1)
    camera = camera_from_data(cfg, info)
    robots = info.robots()
    if not robots:
        raise ModelDataMismatch(f"no episodes with actions in {paths}: the IDM learns from labelled demos")
    dims = {e.action_dim for e in robots.values()}
    if len(dims) > 1:
        raise ModelDataMismatch(
            f"the IDM predicts one action size, but the demos mix {sorted(dims)} "
            f"({', '.join(f'{n}: {e.action_dim}' for n, e in robots.items())})"
        )
    stats = {name: e.stats_f32(["action"]) for name, e in robots.items()}
    if cfg.data.window < 2:
        raise ModelDataMismatch(
            f"data.window={cfg.data.window}: the IDM needs windows of >= 2 frames (an action shows in the next frame)"
        )
    if cfg.data.window > m.max_frames:
        raise ModelDataMismatch(f"data.window={cfg.data.window} exceeds model.max_frames={m.max_frames}")
    # the new model config checks the stats against action_dim (IDMConfig.__post_init__)
    model = replace(m, image_size=image_size, action_dim=dims.pop(), stats=stats)
    return replace(cfg, model=model, data=replace(cfg.data, camera=camera))


RUN_PRESETS = {
    "tiny": {"data": {"window": 4, "batch_size": 8}},
    "small": {
        "data": {"window": 8, "batch_size": 16, "windows_per_episode": 8, "shuffle_buffer": 128},
        "optim": {"lr": 5e-4, "warmup_steps": 100},
        "train": {"eval_every": 0},
    },
}


# ---------------------------------------------------------------- labeller kind "idm" (wm label / wm probe)


def load_labeller(folder, run_config: dict):
    """RUN/final -> a Labeller writing ``pseudo_action`` [n, A] in raw action units."""
    import dataclasses

    from wm_pipeline.jobs.labelling import Labeller, training_fps

    model = InverseDynamicsModel.from_pretrained(str(folder)).eval()
    cfg, data = model.config, run_config.get("data") or {}
    window = min(int(data.get("window") or 8), cfg.max_frames)
    robots = sorted(e for e, f in cfg.stats.items() if isinstance(f, dict) and "action" in f)
    # windows overlap by half: every step is read near a window's centre, never as the last frame
    return Labeller(
        kind="idm",
        model=model,
        folder=folder,
        window=window,
        tail=1,
        hop=max(1, (window - 1) // 2),
        fields={PSEUDO_ACTION: ((cfg.action_dim,), "float32")},
        image_size=(cfg.image_size, cfg.image_size),
        resize=bool(data.get("resize")),
        stride=int(data.get("stride") or 1),
        camera=data.get("camera"),
        fps=training_fps(run_config),
        embodiments=robots,
        config=dataclasses.asdict(cfg),
        run_config=run_config,
    )


def label_windows(lab, frames, embodiments):
    """frames uint8 [B, T, C, H, W] -> pseudo_action [B, T-1, A]. Action-free clips ("video", or a robot
    the IDM has no stats for) get the actions of the IDM's robot when it knows exactly one."""
    known = lab.embodiments
    names = [e if e in known else (known[0] if len(known) == 1 else e) for e in embodiments]
    return {PSEUDO_ACTION: lab.model.predict_actions(frames, names)[:, :-1]}
