"""`wm probe --encoder RUN`: what a decoder policy's image encoder sees of the scene.

A linear probe (ridge, cross-validated by episode: ``wm_pipeline.jobs.probe.linear_probe``) from the
encoder's per-frame feature vector to slices of the robot / scene state recorded in the episodes
(Meta-World's 39-dim observation: ``hand`` = dims 0:3, ``object`` = 4:7; other layouts name their own
slices with ``targets``). Fitted on one dataset (``fit_dir``, e.g. the policy's training demos: the
encoder never saw the state, so the probe's own fit is what must not see the scored episodes) and
scored on another, or cross-validated by episode on one. Ridge 10 on standardised features: near-
constant features (an encoder that learned to ignore the frames) blow up under standardisation on
small fits and give large negative R² otherwise. R² is **within task**: each task's mean is removed from the target and the
task is one-hot in the features, so knowing the task alone scores 0 and the number says how well the
features place the object *inside* a task's randomisation, which is what a policy has to read off the
frames. The same probe runs on an untrained encoder of the same architecture (a random-feature
control): a trained encoder below it has learned to ignore where things are.

Used in docs/RESULTS.md to ask whether the proprio-only policies fail because their encoder does not
localise the objects (issue 14). Frames are the decoder's own camera and size; every ``every``-th frame
of each episode is probed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wm_pipeline.exit_codes import UsageError
from wm_pipeline.jobs.probe import linear_probe, mean_r2

log = logging.getLogger(__name__)

METAWORLD_TARGETS = {"hand": (0, 3), "object": (4, 7)}


def parse_targets(text: str | None) -> dict[str, tuple[int, int]]:
    """``"hand=0:3,object=4:7"`` -> {name: (start, stop)}; None -> Meta-World's hand and object."""
    if not text:
        return dict(METAWORLD_TARGETS)
    out = {}
    for part in text.split(","):
        name, _, span = part.partition("=")
        start, _, stop = span.partition(":")
        if not (name and start.isdigit() and stop.isdigit() and int(stop) > int(start)):
            raise UsageError(f"--targets: '{part}' is not NAME=START:STOP (state dims, e.g. object=4:7)")
        out[name.strip()] = (int(start), int(stop))
    return out


def _features(model, frames: torch.Tensor, batch_size: int) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat(
            [model.image_encoder(frames[i : i + batch_size]) for i in range(0, len(frames), batch_size)]
        ).numpy()


def _ridge_fit_score(x_fit, y_fit, x_test, y_test, ridge: float) -> list:
    """Ridge fitted on one set (features standardised with its statistics), R² per dim on the other."""
    from wm_pipeline.jobs.probe import r2_per_dim

    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    a = np.hstack([(x_fit - mu) / sd, np.ones((len(x_fit), 1))])
    b = np.hstack([(x_test - mu) / sd, np.ones((len(x_test), 1))])
    reg = ridge * np.eye(a.shape[1])
    reg[-1, -1] = 0.0
    w = np.linalg.solve(a.T @ a + reg, a.T @ y_fit)
    return r2_per_dim(b @ w, y_test)


def _episodes(data_dir, size, every: int, max_episodes: int | None, backend: str):
    """Every ``every``-th frame of each decodable episode with a state: frames, state, task, episode id."""
    from shards.stream import iter_samples

    frames, states, tasks, episodes = [], [], [], []
    for i, s in enumerate(iter_samples(data_dir, resize=size, backend=backend, errors="record", split=False)):
        if max_episodes and len(set(episodes)) >= max_episodes:
            break
        if s.error is not None or s.state is None:
            continue
        idx = np.arange(0, len(s.frames), every)
        frames.append(s.frames[idx])
        states.append(np.asarray(s.state, np.float64)[idx])
        tasks += [s.meta.task or ""] * len(idx)
        episodes += [i] * len(idx)
    if not frames:
        raise UsageError(f"{data_dir}: no decodable episodes with a recorded state to probe against")
    return torch.cat(frames), np.concatenate(states), tasks, np.array(episodes)


def encoder_probe(
    run: str,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    targets: dict[str, tuple[int, int]] | None = None,
    every: int = 2,
    max_episodes: int | None = None,
    folds: int = 5,
    batch_size: int = 64,
    seed: int = 0,
    ridge: float = 10.0,
    fit_dir: str | Path | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """Probe the image encoder of the decoder ``run`` (RUN, RUN/final or a saved folder) on ``data_dir``:
    fitted on ``fit_dir`` when given (e.g. the policy's training demos) and scored on ``data_dir``,
    else cross-validated by episode on ``data_dir`` alone."""
    from decoders.decoder import ActionDecoder
    from shards.location import locate, missing_folder
    from wm_pipeline.run_folder import weights_folder
    from wm_pipeline.weights import from_pretrained

    targets = targets or dict(METAWORLD_TARGETS)
    dirs = [locate(d) for d in ([data_dir] if fit_dir is None else [data_dir, fit_dir])]
    for d in dirs:
        if missing_folder(d):
            raise UsageError(f"data folder {d} does not exist")
    folder = weights_folder(run)
    trained = from_pretrained(ActionDecoder, folder, what="decoder").eval()
    torch.manual_seed(seed)
    untrained = ActionDecoder(trained.config).eval()
    size = tuple(trained.config.image_size)
    sets = [_episodes(d, size, every, max_episodes, backend) for d in dirs]
    for d, (_, state, _, _) in zip(dirs, sets):
        for name, (a, b) in targets.items():
            if b > state.shape[1]:
                raise UsageError(f"--targets {name}={a}:{b}: the episodes in {d} have {state.shape[1]} state dims")
    names = sorted({t for _, _, tasks, _ in sets for t in tasks})

    def task_parts(tasks):
        ix = np.array([names.index(t) for t in tasks])
        return ix, np.eye(len(names))[ix]

    def within_task(y: np.ndarray, ix: np.ndarray) -> np.ndarray:
        y = y.copy()
        for k in np.unique(ix):
            y[ix == k] -= y[ix == k].mean(0)
        return y

    frames_t, state, tasks, groups = sets[0]
    result: dict[str, Any] = {
        "decoder": str(run),
        "data": str(dirs[0]),
        "frames": int(len(frames_t)),
        "fit_data": None if fit_dir is None else str(dirs[1]),
        "ridge": ridge,
        "episodes": int(len(set(groups.tolist()))),
        "tasks": names,
        "targets": {},
    }
    for label, model in (("trained", trained), ("untrained", untrained)):
        feats = [_features(model, f, batch_size) for f, _, _, _ in sets]
        parts = [task_parts(t) for _, _, t, _ in sets]
        xs = [np.hstack([f, oh]) for f, (_, oh) in zip(feats, parts)]
        for name, (a, b) in targets.items():
            ys = [within_task(s[:, a:b], ix) for (_, s, _, _), (ix, _) in zip(sets, parts)]
            if fit_dir is None:
                per_dim = linear_probe(xs[0], ys[0], groups, folds=folds, ridge=ridge)
            else:
                per_dim = _ridge_fit_score(xs[1], ys[1], xs[0], ys[0], ridge)
            result["targets"].setdefault(name, {})[label] = {"r2": mean_r2(per_dim), "r2_per_dim": per_dim}
    out = Path(out_dir) if out_dir else Path(folder) / "encoder_probe" / (Path(str(dirs[0])).name or "data")
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder_probe.json").write_text(json.dumps(result, indent=2))
    result["json"] = str(out / "encoder_probe.json")
    return result


def format_table(result: dict[str, Any]) -> str:
    def fmt(v):
        return "  n/a" if v is None else f"{v:5.3f}"

    fit = f"fitted on {result['fit_data']}" if result.get("fit_data") else "cross-validated by episode"
    lines = [
        f"encoder probe: {result['decoder']} on {result['data']} "
        f"({result['episodes']} episodes, {result['frames']} frames, R² within task, {fit})",
        f"{'target':<12} {'trained':>8} {'untrained':>10}",
    ]
    for name, row in result["targets"].items():
        lines.append(f"{name:<12} {fmt(row['trained']['r2']):>8} {fmt(row['untrained']['r2']):>10}")
    return "\n".join(lines)
