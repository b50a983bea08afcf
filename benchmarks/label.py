"""Clips per second labelled by `wm label` vs the raw forward pass of the same model.

Builds a dataset of synthetic episodes (a square moving on a gradient, real H.264 shards) and a
labeller run (`wm train lam|idm` for a few steps: the weights do not change the cost), then
measures, alternating for ``--rounds`` rounds (medians reported, the machine may be shared):

- ``label``: ``wm_pipeline.jobs.labelling.label_dataset`` end to end into a fresh sidecar name: decode
  (prefetch thread), windowing, forward passes, sidecar tar + stats.json writes;
- ``windows``: ``label_episodes`` on episodes decoded beforehand (windowing + forward, no I/O);
- ``forward``: the model's labelling call alone on the same windows, stacked beforehand.

``decode_and_io_share`` = 1 - label / forward: the fraction of the job's time that is not the model.
Prints one JSON object.

    .venv/bin/python benchmarks/label.py [--kind lam --preset tiny --episodes 32 --frames 64 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shards.stream import iter_samples
from shards.writer import Episode, run_sharded_job
from wm_pipeline.cli.main import main as wm
from wm_pipeline.jobs.labelling import _starts, label_dataset, label_episodes, load_labeller


def episode(i: int, frames: int, size: int) -> list[Episode]:
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 60)], -1).astype(np.uint8)
    action = rng.integers(-2, 3, (frames, 2)).astype(np.float32)
    pos = np.clip(np.cumsum(np.vstack([[size // 2, size // 2], action[:-1]]), 0), 0, size - 8).astype(int)
    video = np.repeat(base[None], frames, 0)
    for t, (y, x) in enumerate(pos):
        video[t, y : y + 8, x : x + 8] = 255
    return [Episode(key=f"ep{i:04d}", frames={"front": video}, fps=20.0, embodiment="toybot", action=action)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="lam", choices=["lam", "idm"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--per-shard", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    size = {"tiny": 32, "small": 64, "base": 128}[args.preset]
    root = Path(tempfile.mkdtemp(prefix="bench-label-"))
    try:
        import functools

        run_sharded_job(
            root / "data",
            list(range(args.episodes)),
            functools.partial(episode, frames=args.frames, size=size),
            samples_per_shard=args.per_shard,
            workers=1,
            created_by="bench",
            desc="data",
        )
        assert (
            wm(
                [
                    "train",
                    args.kind,
                    "--data",
                    str(root / "data"),
                    "--out",
                    str(root / "run"),
                    "--preset",
                    args.preset,
                    "train.max_steps=2",
                    "train.ckpt_every=2",
                    "train.progress=false",
                    "data.num_workers=0",
                ]
            )
            == 0
        )
        spec, lab = load_labeller(root / "run")
        episodes = [(s.frames, s.meta.embodiment) for s in iter_samples(root / "data", split=False)]
        windows = []
        for frames, emb in episodes:
            t, starts = _starts(frames.shape[0], lab.window, lab.tail, lab.hop)
            windows += [(frames[s : s + t], emb) for s in starts]
        stacked = [
            (
                torch.stack([w for w, _ in windows[b : b + args.batch_size]]),
                [e for _, e in windows[b : b + args.batch_size]],
            )
            for b in range(0, len(windows), args.batch_size)
        ]
        clips = len(episodes)
        times: dict[str, list[float]] = {"label": [], "windows": [], "forward": []}
        for r in range(args.rounds):
            t0 = time.perf_counter()
            label_dataset(
                str(root / "run"), root / "data", name=f"bench{r}", batch_size=args.batch_size, progress=False
            )
            times["label"].append(time.perf_counter() - t0)
            with torch.inference_mode():
                t0 = time.perf_counter()
                label_episodes(spec, lab, episodes, args.batch_size)
                times["windows"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for frames, embs in stacked:
                    spec.label(lab, frames, embs)
                times["forward"].append(time.perf_counter() - t0)
        rate = {k: clips / statistics.median(v) for k, v in times.items()}
        print(
            json.dumps(
                {
                    "kind": args.kind,
                    "preset": args.preset,
                    "episodes": clips,
                    "frames": args.frames,
                    "size": size,
                    "window": lab.window,
                    "hop": lab.hop or lab.window - lab.tail,
                    "batch_size": args.batch_size,
                    "threads": args.threads,
                    "clips_per_s": {k: round(v, 2) for k, v in rate.items()},
                    "frames_per_s_label": round(rate["label"] * args.frames, 1),
                    "label_over_forward": round(rate["label"] / rate["forward"], 3),
                    "decode_and_io_share": round(1 - rate["label"] / rate["forward"], 3),
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
