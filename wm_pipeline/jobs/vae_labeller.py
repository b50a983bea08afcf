"""Frozen-VAE latents as a label sidecar: encode every frame once, stream the latents in training.

    label_vae(DATA, VAE_DIR, name="vae")    # -> DATA/labels/vae/shard-*.tar, field `latent` [n, c, h, w]
    wm train worldmodel --data DATA --labels vae ...   # frame_space="vae", latents read from the batch

The UWM reference re-encodes the future frames with the VAE at every training step (91 % of its step
time); here a labelling pass computes ``worldmodel.tokenizer.encode_frames`` (the posterior mean,
shifted and scaled: deterministic) for every frame once. ``VAE_DIR`` is a local diffusers
``AutoencoderKL`` folder (``config.json`` + weights); frames are encoded at the data's resolution,
or at ``resize`` when given.

The kind ``"vae"`` (loader + per-window encoder + a ``detect`` that recognises an ``AutoencoderKL``
folder) is listed in the built-in table, ``wm_pipeline.recipes.LABELLERS``. ``label_vae`` drives the same
per-shard machinery (``wm_pipeline.jobs.labelling.label_shards``: atomic, idempotent, resumable, locked per shard)
directly, because ``wm label --labeller`` looks for a ``model.safetensors`` that a diffusers folder
does not have (it holds ``diffusion_pytorch_model.safetensors``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from wm_pipeline.exit_codes import UsageError
from wm_pipeline.jobs.labelling import Labeller, LabellerKind, check_fits, code_version, label_shards
from wm_pipeline.weights import loading, read_json

log = logging.getLogger(__name__)

KIND = "vae"
WINDOW = 16  # frames encoded per window (per-frame model: no overlap needed, tail 0)


def is_vae_folder(folder: Path) -> bool:
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("_class_name") == "AutoencoderKL"
    except (OSError, json.JSONDecodeError):
        return False


def load_vae_labeller(
    folder: Path, run_config: dict | None = None, image_size: tuple[int, int] | None = None, resize: bool = False
) -> Labeller:
    """A ``Labeller`` writing ``latent`` [n, c, H/f, W/f] float32 for ``image_size`` frames (default: the
    VAE config's ``sample_size``)."""
    from worldmodel.tokenizer import load_vae, vae_downsample

    folder = Path(folder)
    with loading([folder], required=("config.json",), what="VAE"):
        vae = load_vae(folder)
    if image_size is None:
        s = vae.config.sample_size
        image_size = tuple(s) if isinstance(s, (list, tuple)) else (int(s), int(s))
    f = vae_downsample(vae)
    h, w = image_size
    if h % f or w % f:
        raise UsageError(f"VAE {folder} downsamples by {f}: frames of {h}x{w} px do not divide (use resize)")
    c = vae.config.latent_channels
    config = {
        "latent_channels": c,
        "downsample": f,
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": vae.config.shift_factor,
        "block_out_channels": list(vae.config.block_out_channels),
    }
    return Labeller(
        kind=KIND,
        model=vae,
        folder=folder,
        window=WINDOW,
        tail=0,
        fields={"latent": ((c, h // f, w // f), "float32")},
        image_size=(h, w),
        resize=resize,
        config=config,
        run_config=dict(run_config or {}),
    )


def encode_windows(lab: Labeller, frames: torch.Tensor, embodiments: list[str]) -> dict[str, torch.Tensor]:
    """frames uint8 [B, T, 3, H, W] -> latent [B, T, c, H/f, W/f]."""
    from worldmodel.tokenizer import encode_frames

    b, t = frames.shape[:2]
    latent = encode_frames(lab.model, frames.flatten(0, 1))
    return {"latent": latent.view(b, t, *latent.shape[1:])}


SPEC = LabellerKind(
    KIND, load_vae_labeller, encode_windows, detect=is_vae_folder
)  # listed in wm_pipeline.recipes.LABELLERS


def _weights_sha256(folder: Path) -> str | None:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        path = folder / name
        if path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()
    return None


def label_vae(
    data_dir: str | Path,
    vae_path: str | Path,
    name: str = KIND,
    *,
    resize: tuple[int, int] | None = None,
    batch_size: int = 4,
    backend: str = "auto",
    progress: bool = True,
) -> dict:
    """Write ``data_dir/labels/<name>/`` with the VAE latents of every frame; shards already done are
    skipped. Returns ``{"shards", "skipped", "failures", "name"}``."""
    from tqdm import tqdm

    from shards.dataset_info import FolderInfo
    from shards.format import read_manifest
    from shards.sidecar import (
        labeller_info_lock,
        read_labeller_info,
        sidecar_complete,
        sidecar_dir,
        write_labeller_info,
    )

    data_dir, vae_path = Path(data_dir), Path(vae_path)
    if not data_dir.is_dir():
        raise UsageError(f"data folder {data_dir} does not exist")
    if (vae_path / "config.json").is_file():
        read_json(vae_path / "config.json")  # a truncated config is named, not "not a VAE folder"
    if not is_vae_folder(vae_path):
        raise UsageError(
            f"{vae_path}: not a diffusers AutoencoderKL folder (config.json with _class_name AutoencoderKL)"
        )
    manifest = read_manifest(data_dir)  # the shard list below; the rest from its dataset info
    data = FolderInfo(str(data_dir), manifest)
    size = tuple(resize) if resize else data.resolution
    if size is None:
        raise UsageError(f"{data_dir}: its manifest records no frame size; pass resize=(H, W)")
    lab = load_vae_labeller(vae_path, image_size=size, resize=bool(resize))
    camera = check_fits(lab, data_dir, data, str(vae_path))
    info = {
        "kind": KIND,
        "run": str(vae_path.resolve()),
        "checkpoint": str(vae_path.resolve()),
        "checkpoint_sha256": _weights_sha256(vae_path),
        "config": lab.config,
        "camera": camera,
        "image_size": list(size),
        "window": lab.window,
        "stride": 1,
        "tail": 0,
        "batch_size": batch_size,
        "fields": {f: {"shape": ["n_frames", *s], "dtype": d} for f, (s, d) in lab.fields.items()},
        "rows": "row t is the latent of frame t",
        "code_version": code_version(),
    }
    with labeller_info_lock(data_dir, name):
        if (sidecar_dir(data_dir, name) / "labeller.json").is_file():
            old = read_labeller_info(data_dir, name)
            if old.get("checkpoint_sha256") != info["checkpoint_sha256"]:
                raise UsageError(
                    f"{sidecar_dir(data_dir, name)}: labels of another checkpoint "
                    f"({old.get('checkpoint')}); use another name or delete the folder"
                )
        else:
            write_labeller_info(data_dir, name, info)
    shards = manifest["shards"]
    todo = [i for i, s in enumerate(shards) if not sidecar_complete(data_dir, name, s["name"])]
    with (
        torch.inference_mode(),
        tqdm(
            total=sum(len(shards[i]["keys"]) for i in todo), unit="clip", desc=f"label {name}", disable=not progress
        ) as bar,
    ):
        failures = label_shards(SPEC, lab, data_dir, todo, name, camera, batch_size, backend, bar)
    log.info(
        "VAE latents of %s -> labels/%s: %d shards written, %d already done, %d failures",
        data_dir,
        name,
        len(todo),
        len(shards) - len(todo),
        failures,
    )
    return {"shards": len(todo), "skipped": len(shards) - len(todo), "failures": failures, "name": name}
