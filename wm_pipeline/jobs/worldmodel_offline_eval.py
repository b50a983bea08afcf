"""Offline evaluation of a trained world model on held-out episodes (`wm worldmodel eval`).

For every window of the held-out data that has real actions (``shards.stream.WindowStream`` in label
mode: one exact, ordered pass, so two evaluations see the same windows; episodes tiled into
non-overlapping windows, or with ``every=K`` a window at every K-th frame), with the model's own timeline
(``n_obs`` current frames, an ``H``-step action chunk, ``n_future`` future frames):

| metric | mode | compared with |
|---|---|---|
| ``forward_dynamics_mse`` | current frames + true actions -> future frames | true future frames |
| ``copy_last_frame_mse`` | (baseline) the last current frame repeated | true future frames |
| ``video_mse`` | current frames only, actions at full noise (null tokens) | true future frames |
| ``*_mean_mse`` | the same two modes in one step from full noise: the model's estimate of the mean future | true future frames |
| ``*_psnr`` / ``*_ssim`` | beside every ``*_mse`` of frames: PSNR (dB) and SSIM (``jobs/frame_quality.py``, torchmetrics) | true future frames |
| ``inverse_dynamics_r2`` | current + true future frames -> action chunk | true actions |
| ``inverse_dynamics_no_future_r2`` | the same, future frames replaced by the last current frame | true actions |
| ``policy_mse`` / ``policy_r2`` | current frames only (video at full noise) -> action chunk | true actions |
| ``*_mean_r2`` | the three action calls in one step from full noise: the estimate of the mean chunk | true actions |

Frame errors are mean squared errors of pixels scaled to [-1, 1]; PSNR and SSIM compare the same frames in
[0, 1], per frame, averaged over frames and windows. A sample carries the spread of the
predicted distribution, which the squared error counts twice (E|x - y|² = bias² + var(x) + var(y));
copying the last frame is a point forecast, and the fair comparison for it is the model's point
forecast: one Euler step from t = 1 lands on the network's estimate of the clean future given the
context (for a velocity head, noise minus the predicted velocity; for an x0 head, its output).
Action errors are in raw action units; the ``*_mean_r2`` rows are the same point forecast for actions
(R² and MSE reward the conditional mean, and a sampled chunk adds its spread; the one-step calls draw
their noise from a second generator, so the sampled metrics do not change with them).
The ``no_future`` variant is the same call with a deterministic input that holds no future information:
it separates what the future frames contribute from what a clean (noise-free) video input does. R² is
pooled over action dims: ``1 - sum (a - â)² / sum (a - mean a)²`` over every (window, chunk
step, dim), with the mean per dim over the evaluation set (``*_r2_per_dim`` gives each dim's own).
Sampling noise comes from one seeded generator, so a rerun gives the same numbers.

Artefacts: ``metrics.json``, ``grid.png`` (one row per example: context | predicted | true frames) and
``grid.mp4`` (the same examples over time: true video left, context + prediction right).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.model_folder import CLASS_KEY, class_name
from wm_pipeline.exit_codes import UsageError
from wm_pipeline.run_folder import FINAL, MODEL_CONFIG, has_weights, recipe_of, run_config_of
from wm_pipeline.weights import from_pretrained, read_json

log = logging.getLogger(__name__)


def load_world_model(run: str | Path):
    """RUN (or RUN/final, or a save_pretrained folder) -> (WorldModel in eval mode, run config dict)."""
    from worldmodel.uwm import WorldModel

    run = Path(run)
    for folder in (run / FINAL, run):
        if has_weights(folder):
            break
    else:
        raise UsageError(f"{run}: no world model (final/config.json + model.safetensors); has training finished?")
    config = read_json(folder / MODEL_CONFIG)
    named = config.get(CLASS_KEY) if isinstance(config, dict) else None
    legacy = isinstance(config, dict) and "action_horizon" in config and "variant" in config  # saved before _class
    if named != class_name(WorldModel) if named is not None else not legacy:
        raise UsageError(f"{folder}: config.json is not a world model's")
    model = from_pretrained(WorldModel, folder, what="world model", strict=True).eval()
    return model, run_config_of(folder)


def _windows(
    model, run_config: dict, data_dir: Path, max_windows: int, batch_size: int, backend: str, every: int | None = None
):
    """Batches of held-out windows with real actions, in data order (``max_windows`` 0: all); ``every``:
    a window at every ``every``-th frame of each episode instead of the non-overlapping tiling."""
    from shards.stream import WindowStream, collate_windows

    cfg, data = model.config, run_config.get("data") or {}
    stream = WindowStream(
        str(data_dir),
        window=cfg.window,
        stride=int(data.get("stride") or 1),
        camera=data.get("camera"),
        resize=data.get("resize"),
        backend=backend,
        mode="label",
        label_every=every,
    )
    taken, pending = 0, []
    for w in stream:
        if not w["action_mask"] or w["embodiment"] not in model.adapters:
            continue
        pending.append(w)
        taken += 1
        if len(pending) == batch_size or taken == max_windows:
            yield collate_windows(pending)
            pending = []
        if taken == max_windows:
            return
    if pending:
        yield collate_windows(pending)


def _r2(true: np.ndarray, pred: np.ndarray) -> tuple[float, list[float]]:
    """Pooled and per-dim R² of ``[N, A]`` rows."""
    err = ((true - pred) ** 2).sum(0)
    var = ((true - true.mean(0)) ** 2).sum(0)
    per_dim = [float(1 - e / v) if v > 0 else float("nan") for e, v in zip(err, var)]
    return float(1 - err.sum() / max(var.sum(), 1e-12)), per_dim


@torch.no_grad()
def evaluate_world_model(
    run: str | Path,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    max_windows: int = 64,
    batch_size: int = 16,
    steps: int | None = None,
    seed: int = 0,
    examples: int = 4,
    backend: str = "auto",
    every: int | None = None,
) -> dict[str, Any]:
    """Score ``run`` on ``data_dir`` (see the module docstring); writes the artefacts to ``out_dir``
    (default ``RUN/eval``) and returns the metrics."""
    from shards.location import locate, missing_folder
    from wm_pipeline.jobs.frame_quality import psnr_ssim
    from worldmodel.tokenizer import frames_to_unit

    data_dir = locate(data_dir)  # a folder or a URL (shards.location)
    if missing_folder(data_dir):
        raise UsageError(f"data folder {data_dir} does not exist")
    model, run_config = load_world_model(run)
    cfg = model.config
    if cfg.frame_space == "vae" and not cfg.vae_path:  # from_pretrained loaded the VAE when the path is set
        raise UsageError(
            f"{run}: a VAE-latent model needs its VAE (model.vae_path) to score frames; "
            f"this one was trained from latents alone"
        )
    out_dir = Path(out_dir) if out_dir else Path(run) / "eval"
    gen = torch.Generator().manual_seed(seed)
    gen_mean = torch.Generator().manual_seed(seed + 1)  # the one-step action calls: the other draws stay put
    t0, fut, h = cfg.n_obs - 1, cfg.future_indices(), cfg.action_horizon
    sums = {
        "forward_dynamics_mse": 0.0,
        "forward_dynamics_mean_mse": 0.0,
        "copy_last_frame_mse": 0.0,
        "video_mse": 0.0,
        "video_mean_mse": 0.0,
    }
    actions: dict[str, list[np.ndarray]] = {
        k: [] for k in ("true", "inverse", "no_future", "policy", "inverse_mean", "no_future_mean", "policy_mean")
    }
    shown: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    n = 0
    for batch in _windows(model, run_config, data_dir, max_windows, batch_size, backend, every):
        for emb in sorted(set(batch["embodiment"])):
            idx = [i for i, e in enumerate(batch["embodiment"]) if e == emb]
            adapter = model.adapters[emb]
            frames = batch["frames"][idx]
            obs, true_next = frames[:, : cfg.n_obs], frames[:, fut]
            act = batch["action"][idx, t0 : t0 + h, : adapter.action_dim]
            kw = {"task": [batch["task"][i] for i in idx], "generator": gen}
            if adapter.state_dim and bool(batch["state_mask"][idx].all()):
                kw["state"] = batch["state"][idx, : cfg.n_obs, : adapter.state_dim]
            target = frames_to_unit(true_next)
            pred = model.sample_forward_dynamics(obs, act, emb, steps=steps, **kw)
            video = model.sample_video(obs, None, steps=steps, **kw)
            pred_mean = model.sample_forward_dynamics(obs, act, emb, steps=1, **kw)
            video_mean = model.sample_video(obs, None, steps=1, **kw)
            copy = frames_to_unit(obs[:, -1:]).expand_as(target)
            m = len(idx)
            for name, x in (
                ("forward_dynamics", pred),
                ("copy_last_frame", copy),
                ("video", video),
                ("forward_dynamics_mean", pred_mean),
                ("video_mean", video_mean),
            ):
                psnr, ssim = psnr_ssim(x, target)
                sums[f"{name}_psnr"] = sums.get(f"{name}_psnr", 0.0) + float(psnr.sum())
                sums[f"{name}_ssim"] = sums.get(f"{name}_ssim", 0.0) + float(ssim.sum())
            sums["forward_dynamics_mse"] += float(((pred - target) ** 2).mean()) * m
            sums["copy_last_frame_mse"] += float(((copy - target) ** 2).mean()) * m
            sums["video_mse"] += float(((video - target) ** 2).mean()) * m
            sums["forward_dynamics_mean_mse"] += float(((pred_mean - target) ** 2).mean()) * m
            sums["video_mean_mse"] += float(((video_mean - target) ** 2).mean()) * m
            actions["inverse"].append(model.sample_inverse_dynamics(obs, true_next, emb, steps=steps, **kw).numpy())
            still = obs[:, -1:].expand_as(true_next)  # the last current frame, repeated: no future information
            actions["no_future"].append(model.sample_inverse_dynamics(obs, still, emb, steps=steps, **kw).numpy())
            actions["policy"].append(model.sample_policy(obs, emb, steps=steps, **kw).numpy())
            one = {**kw, "generator": gen_mean, "steps": 1}
            actions["inverse_mean"].append(model.sample_inverse_dynamics(obs, true_next, emb, **one).numpy())
            actions["no_future_mean"].append(model.sample_inverse_dynamics(obs, still, emb, **one).numpy())
            actions["policy_mean"].append(model.sample_policy(obs, emb, **one).numpy())
            actions["true"].append(act.numpy())
            n += m
            for j in range(min(m, examples - len(shown))):
                shown.append((obs[j], pred[j], true_next[j]))
    if n == 0:
        raise UsageError(
            f"{data_dir}: no windows of {cfg.window} frames with actions of the model's embodiments "
            f"{sorted(k for k in model.adapters if k != 'latent')}"
        )
    dims = min(a.shape[-1] for a in actions["true"])
    flat = {k: np.concatenate([a[..., :dims] for a in v]).reshape(-1, dims) for k, v in actions.items()}
    inv_r2, inv_dims = _r2(flat["true"], flat["inverse"])
    pol_r2, pol_dims = _r2(flat["true"], flat["policy"])
    still_r2, still_dims = _r2(flat["true"], flat["no_future"])
    metrics = {k: v / n for k, v in sums.items()}
    metrics.update(
        {
            "forward_dynamics_vs_copy": metrics["forward_dynamics_mse"] / max(metrics["copy_last_frame_mse"], 1e-12),
            "forward_dynamics_mean_vs_copy": metrics["forward_dynamics_mean_mse"]
            / max(metrics["copy_last_frame_mse"], 1e-12),
            "inverse_dynamics_r2": inv_r2,
            "inverse_dynamics_r2_per_dim": inv_dims,
            "inverse_dynamics_mse": float(((flat["true"] - flat["inverse"]) ** 2).mean()),
            "inverse_dynamics_no_future_r2": still_r2,
            "inverse_dynamics_no_future_r2_per_dim": still_dims,
            "policy_r2": pol_r2,
            "policy_r2_per_dim": pol_dims,
            "policy_mse": float(((flat["true"] - flat["policy"]) ** 2).mean()),
            "inverse_dynamics_mean_r2": _r2(flat["true"], flat["inverse_mean"])[0],
            "inverse_dynamics_no_future_mean_r2": _r2(flat["true"], flat["no_future_mean"])[0],
            "policy_mean_r2": _r2(flat["true"], flat["policy_mean"])[0],
            "windows": n,
            "window_every": every,
            "variant": cfg.variant,
            "trained_as": recipe_of(run_config) or "uwm",
            "frame_space": cfg.frame_space,
            "sampling_steps": steps or {"action": cfg.action_steps, "video": cfg.video_steps},
            "seed": seed,
            "data": str(data_dir),
            "model": str(run),
        }
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_grid(shown, out_dir, fps=2.0)
    log.info(
        "world model eval on %d windows: PSNR / SSIM forward dynamics %.2f dB / %.3f, copy-last %.2f dB / %.3f",
        n,
        metrics["forward_dynamics_psnr"],
        metrics["forward_dynamics_ssim"],
        metrics["copy_last_frame_psnr"],
        metrics["copy_last_frame_ssim"],
    )
    log.info(
        "world model eval on %d windows: forward dynamics %.4g (mean forecast %.4g) vs copy-last %.4g, video %.4g, "
        "inverse R² %.3f (%.3f without future frames), policy R² %.3f (MSE %.4g); mean chunks: inverse R² %.3f "
        "(%.3f without future frames), policy R² %.3f -> %s",
        n,
        metrics["forward_dynamics_mse"],
        metrics["forward_dynamics_mean_mse"],
        metrics["copy_last_frame_mse"],
        metrics["video_mse"],
        inv_r2,
        still_r2,
        pol_r2,
        metrics["policy_mse"],
        metrics["inverse_dynamics_mean_r2"],
        metrics["inverse_dynamics_no_future_mean_r2"],
        metrics["policy_mean_r2"],
        out_dir,
    )
    return metrics


def _uint8(x: torch.Tensor) -> np.ndarray:
    """[F, 3, S, S] uint8 or float in [-1, 1] -> [F, S, S, 3] uint8."""
    from worldmodel.tokenizer import unit_to_uint8

    x = x if x.dtype == torch.uint8 else unit_to_uint8(x)
    return x.permute(0, 2, 3, 1).numpy()


def write_grid(shown: list, out_dir: Path, fps: float = 2.0, gap: int = 2) -> None:
    """``grid.png`` (rows: context | predicted | true) and ``grid.mp4`` (true | context + predicted)."""
    from PIL import Image

    from shards.encode import encode_video

    if not shown:
        return
    rows, clips = [], []
    for obs, pred, true in shown:
        parts = [_uint8(obs), _uint8(pred), _uint8(true)]
        s = parts[0].shape[1]
        pad = np.full((s, gap * 3, 3), 255, np.uint8)  # white bars between the three groups
        row = []
        for k, p in enumerate(parts):
            row.extend([*p] + ([pad] if k < 2 else []))
        rows.append(np.concatenate(row, axis=1))
        truth = np.concatenate([parts[0], parts[2]])
        guess = np.concatenate([parts[0], parts[1]])
        clips.append(np.concatenate([truth, np.full((len(truth), s, gap * 2, 3), 255, np.uint8), guess], axis=2))
    sep = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([x for r in rows for x in (r, sep)][:-1])
    Image.fromarray(grid).save(out_dir / "grid.png")
    video = np.concatenate(clips, axis=1)  # examples stacked vertically, [T, H*k, W', 3]
    video = video[:, : video.shape[1] // 2 * 2, : video.shape[2] // 2 * 2]  # H.264 needs even sizes
    (out_dir / "grid.mp4").write_bytes(encode_video(np.ascontiguousarray(video), fps))
