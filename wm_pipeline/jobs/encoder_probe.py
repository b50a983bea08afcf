"""`wm probe --encoder RUN`: what a decoder policy's image encoder sees of the scene.

A linear probe (ridge, cross-validated by episode: ``wm_pipeline.jobs.probe.linear_probe``) from the
encoder's per-frame feature vector to slices of the robot / scene state recorded in the episodes
(Meta-World's 39-dim observation: ``hand`` = dims 0:3, ``object`` = 4:7; other layouts name their own
slices with ``targets``). The ridge is 100 on standardised features (the ``ridge`` argument): near-constant
features (an encoder that learned to ignore the frames) otherwise blow up under standardisation and
give large negative R² on small probe sets. R² is **within task**: each task's mean is removed from the target and the
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
        return torch.cat([model.image_encoder(frames[i : i + batch_size])
                          for i in range(0, len(frames), batch_size)]).numpy()


def encoder_probe(run: str, data_dir: str | Path, out_dir: str | Path | None = None,
                  targets: dict[str, tuple[int, int]] | None = None, every: int = 2,
                  max_episodes: int | None = None, folds: int = 5, batch_size: int = 64,
                  seed: int = 0, ridge: float = 100.0, backend: str = "auto") -> dict[str, Any]:
    """Probe the image encoder of the decoder ``run`` (RUN, RUN/final or a saved folder) on ``data_dir``."""
    from decoders.decoder import ActionDecoder
    from shards.location import locate, missing_folder
    from shards.stream import iter_samples
    from wm_pipeline.run_folder import weights_folder
    from wm_pipeline.weights import from_pretrained

    targets = targets or dict(METAWORLD_TARGETS)
    data_dir = locate(data_dir)
    if missing_folder(data_dir):
        raise UsageError(f"data folder {data_dir} does not exist")
    folder = weights_folder(run)
    trained = from_pretrained(ActionDecoder, folder, what="decoder").eval()
    torch.manual_seed(seed)
    untrained = ActionDecoder(trained.config).eval()
    size = tuple(trained.config.image_size)

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
    frames_t, state = torch.cat(frames), np.concatenate(states)
    for name, (a, b) in targets.items():
        if b > state.shape[1]:
            raise UsageError(f"--targets {name}={a}:{b}: the episodes in {data_dir} have {state.shape[1]} state dims")
    names = sorted(set(tasks))
    task_ix = np.array([names.index(t) for t in tasks])
    onehot = np.eye(len(names))[task_ix]
    groups = np.array(episodes)

    def within_task(y: np.ndarray) -> np.ndarray:
        y = y.copy()
        for k in range(len(names)):
            y[task_ix == k] -= y[task_ix == k].mean(0)
        return y

    result: dict[str, Any] = {"decoder": str(run), "data": str(data_dir), "frames": int(len(frames_t)),
                              "ridge": ridge, "episodes": int(len(set(episodes))), "tasks": names, "targets": {}}
    for label, model in (("trained", trained), ("untrained", untrained)):
        x = np.hstack([_features(model, frames_t, batch_size), onehot])
        for name, (a, b) in targets.items():
            per_dim = linear_probe(x, within_task(state[:, a:b]), groups, folds=folds, ridge=ridge)
            result["targets"].setdefault(name, {})[label] = {"r2": mean_r2(per_dim), "r2_per_dim": per_dim}
    out = Path(out_dir) if out_dir else Path(folder) / "encoder_probe" / (Path(str(data_dir)).name or "data")
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder_probe.json").write_text(json.dumps(result, indent=2))
    result["json"] = str(out / "encoder_probe.json")
    return result


def format_table(result: dict[str, Any]) -> str:
    def fmt(v):
        return "  n/a" if v is None else f"{v:5.3f}"
    lines = [f"encoder probe: {result['decoder']} on {result['data']} "
             f"({result['episodes']} episodes, {result['frames']} frames, R² within task)",
             f"{'target':<12} {'trained':>8} {'untrained':>10}"]
    for name, row in result["targets"].items():
        lines.append(f"{name:<12} {fmt(row['trained']['r2']):>8} {fmt(row['untrained']['r2']):>10}")
    return "\n".join(lines)
