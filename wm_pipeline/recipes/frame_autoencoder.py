"""`wm train autoencoder`: a frame autoencoder (latent_actions/frame_autoencoder.py) on action-free video,
the pretrained image encoder a decoder can start from and keep frozen.

    wm train autoencoder --data VIDEO --out RUN_AE [--preset tiny|small]
    wm train decoder --data DEMOS --out RUN model.encoder_init=RUN_AE model.freeze_encoder=true

``prepare`` fixes what the frames decide (square image size, camera), as for the LAM. The model
never reads actions, so any dataset (demos or video-only) trains it. ``encoder_init`` (below) is what
the decoder recipe calls to resolve ``model.encoder_init`` and copy the encoder's layout into the
decoder's config. ``wm label --labeller RUN_AE`` writes each frame's pooled encoder map as
``features`` (what the decoder's frozen encoder computes before its projection).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from latent_actions.frame_autoencoder import FrameAutoencoder, FrameAutoencoderConfig
from shards.dataset_info import DatasetInfo
from shards.model_folder import CLASS_KEY, class_name
from wm_pipeline.exit_codes import UsageError
from wm_pipeline.recipes.lam import camera_from_data, image_size_from_data
from wm_pipeline.run_folder import MODEL_CONFIG, weights_folder
from wm_pipeline.weights import read_json


def prepare(cfg, info: DatasetInfo):
    """The run config with the image size and camera the data decides (a new config)."""
    m: FrameAutoencoderConfig = cfg.model
    image_size = image_size_from_data(cfg, info, 2 ** len(m.encoder_channels))
    return replace(
        cfg, model=replace(m, image_size=image_size), data=replace(cfg.data, camera=camera_from_data(cfg, info))
    )


RUN_PRESETS = {
    "tiny": {"data": {"window": 4, "batch_size": 16}},
    "small": {
        "data": {"window": 4, "batch_size": 32, "windows_per_episode": 8, "shuffle_buffer": 128},
        "optim": {"lr": 5e-4, "warmup_steps": 100},
        "train": {"eval_every": 0},
    },
}


def encoder_init(path: str, image_size: list[int], image_channels: int) -> tuple[str, dict]:
    """``model.encoder_init`` (RUN, RUN/final or a saved folder) -> (the weights folder, its config.json),
    checked: it exists, holds a FrameAutoencoder, and its frames are the decoder's. A one-line
    UsageError naming the folder otherwise."""
    folder = Path(weights_folder(path))
    config_path = folder / MODEL_CONFIG
    if not config_path.is_file():
        raise UsageError(
            f"model.encoder_init={path}: no {MODEL_CONFIG} in {folder} (expected a `wm train autoencoder` run)"
        )
    config = read_json(config_path)
    if config.get(CLASS_KEY) != class_name(FrameAutoencoder):
        raise UsageError(
            f"model.encoder_init={path}: {config_path} is a {config.get(CLASS_KEY) or 'model of no named class'}, "
            f"not a FrameAutoencoder (`wm train autoencoder`)"
        )
    size = [int(config.get("image_size", 0))] * 2
    if size != [int(s) for s in image_size] or int(config.get("image_channels", 3)) != image_channels:
        raise UsageError(
            f"model.encoder_init={path}: the autoencoder takes {size[0]}x{size[1]}x"
            f"{config.get('image_channels', 3)} frames, the decoder {image_size[0]}x{image_size[1]}x"
            f"{image_channels}"
        )
    return str(folder), config


# ---------------------------------------------------------------- labeller kind "autoencoder" (wm label)


def load_labeller(folder, run_config: dict):
    """RUN/final -> a Labeller writing ``features`` [n, C_last * grid²] float32 per frame."""
    import dataclasses

    from wm_pipeline.jobs.labelling import Labeller, training_fps

    model = FrameAutoencoder.from_pretrained(str(folder)).eval()
    cfg, data = model.config, run_config.get("data") or {}
    dim = cfg.encoder_channels[-1] * cfg.grid * cfg.grid
    return Labeller(
        kind="autoencoder",
        model=model,
        folder=folder,
        window=16,
        tail=0,
        fields={"features": ((dim,), "float32")},
        image_size=(cfg.image_size, cfg.image_size),
        resize=bool(data.get("resize")),
        stride=int(data.get("stride") or 1),
        camera=data.get("camera"),
        fps=training_fps(run_config),
        config=dataclasses.asdict(cfg),
        run_config=run_config,
    )


def label_windows(lab, frames, embodiments):
    """frames uint8 [B, T, C, H, W] -> features [B, T, D]."""
    b, t = frames.shape[:2]
    return {"features": lab.model.features(frames.flatten(0, 1)).view(b, t, -1)}
