"""`wm train lam`: the latent-action model (latent_actions/lam.py) on action-free video.

    wm train lam --data VIDEO --out RUN [--preset tiny|small|base] [model.frame_gap=2] [data.stride=1]

``prepare`` fixes what the frames decide: the image size (``data.resize`` when set, else the
data's own square resolution) and the camera (the dataset's first one when unset, so the run
config records which camera the labeller was trained on); it refuses a window too short for one
transition. The model never reads actions, so any dataset (demos or video-only) trains it.
The trained run labels corpora with ``wm label --labeller RUN`` (wm_pipeline/jobs/labelling.py).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from latent_actions.lam import LAMConfig, LatentActionModel
from shards.dataset_info import DatasetInfo
from wm_pipeline.training.registry import ModelDataMismatch

log = logging.getLogger(__name__)


def image_size_from_data(cfg, info: DatasetInfo, patch_size: int) -> int:
    """The square frame size a frames-only model sees: ``data.resize`` or the data's resolution.

    Shared by the LAM, IDM and world-model recipes; ModelDataMismatch when it is not square, the data
    folders disagree, or it is not a multiple of ``patch_size``."""
    paths = list(cfg.data.paths)
    if cfg.data.resize:
        size = tuple(int(v) for v in cfg.data.resize)
        where = f"data.resize={list(size)}"
    else:
        sizes = info.resolutions()
        if len(sizes) != 1:
            raise ModelDataMismatch(f"the data folders {paths} have resolutions {sorted(sizes)}: set data.resize=H,W")
        size = sizes.pop()
        where = f"the data in {paths} ({size[0]}x{size[1]})"
    if size[0] != size[1]:
        raise ModelDataMismatch(f"{where} is not square; this model needs square frames: set data.resize=S,S")
    if size[0] % patch_size:
        raise ModelDataMismatch(
            f"{where}: {size[0]} px is not a multiple of the model's patch size {patch_size}; "
            f"set data.resize=S,S with S a multiple of {patch_size}"
        )
    return int(size[0])


def camera_from_data(cfg, info: DatasetInfo) -> str | None:
    """``data.camera``, or the cameras' first when unset; ModelDataMismatch when a dataset lacks it."""
    camera = cfg.data.camera
    for folder in info.folders:
        cams = folder.cameras
        if camera is None and cams:
            camera = cams[0]
        if camera not in cams:
            raise ModelDataMismatch(f"data.camera={camera!r} but {folder.path} has cameras {cams}")
    return camera


def prepare(cfg, info: DatasetInfo):
    """The run config with the image size and camera the data decides (a new config; ``cfg`` is not changed)."""
    m: LAMConfig = cfg.model
    image_size = image_size_from_data(cfg, info, m.patch_size)
    camera = camera_from_data(cfg, info)
    if cfg.data.window <= m.frame_gap:
        raise ModelDataMismatch(
            f"data.window={cfg.data.window} holds no transition at model.frame_gap={m.frame_gap}: "
            f"use data.window >= {m.frame_gap + 1}"
        )
    fps = info.fps()
    if fps:
        gap = m.frame_gap * cfg.data.stride
        log.info("LAM frame gap: %d frames = %s", gap, ", ".join(f"{1000 * gap / f:.0f} ms at {f:g} fps" for f in fps))
    return replace(cfg, model=replace(m, image_size=image_size), data=replace(cfg.data, camera=camera))


RUN_PRESETS = {
    "tiny": {"data": {"window": 3, "batch_size": 8}},
    "small": {
        "data": {"window": 6, "batch_size": 16, "windows_per_episode": 8, "shuffle_buffer": 128},
        "optim": {"lr": 5e-4, "warmup_steps": 100},
        "train": {"eval_every": 0},
    },
}


# ---------------------------------------------------------------- labeller kind "lam" (wm label / wm probe)


def load_labeller(folder, run_config: dict):
    """RUN/final -> a Labeller writing ``latent`` [n, n_tokens * latent_dim] (+ ``codes`` [n, n_tokens] for VQ)."""
    import dataclasses

    from wm_pipeline.jobs.labelling import Labeller, training_fps

    model = LatentActionModel.from_pretrained(str(folder)).eval()
    cfg, data = model.config, run_config.get("data") or {}
    k = cfg.frame_gap
    fields = {"latent": ((cfg.action_dim,), "float32")}
    if cfg.bottleneck == "vq":
        fields["codes"] = ((cfg.n_tokens,), "int64")
    # each pair (t, t+k) is encoded on its own, so the window only sets how many pairs share a
    # frame embedding: 16 transitions per window whatever the training window was
    return Labeller(
        kind="lam",
        model=model,
        folder=folder,
        window=k + 16,
        tail=k,
        fields=fields,
        image_size=(cfg.image_size, cfg.image_size),
        resize=bool(data.get("resize")),
        stride=int(data.get("stride") or 1),
        camera=data.get("camera"),
        fps=training_fps(run_config),
        config=dataclasses.asdict(cfg),
        run_config=run_config,
    )


def label_windows(lab, frames, embodiments):
    """frames uint8 [B, T, C, H, W] -> latent [B, T-k, D] (+ codes [B, T-k, n_tokens])."""
    out = lab.model.encode_latent_actions(frames)
    return {"latent": out["latent"], **({"codes": out["codes"]} if out["codes"] is not None else {})}
