"""Frames per second delivered by WindowStream vs raw decode of the same shards.

Builds a small dataset (64x64 px episodes) in a temp dir, then measures:

- ``raw``: read every shard with the tar reader and decode every frame with the fastest backend,
  in this process (the ceiling for a one-worker label stream, which hands out the same frames);
- ``label``: ``WindowStream(mode="label")``, windows of 8 frames, batch 32, ``num_workers=1``;
- ``raw_windows``: decode, in this process, 4 random 8-frame windows per episode (the frames a
  train stream needs: seeks and partial GOPs make this slower per frame than decoding everything);
- ``train``: ``WindowStream(mode="train")`` with those windows (4 random windows per episode).

Each stream number counts frames handed out in batches (B x T), after one warm-up batch. The
machine may be shared: the measurements alternate for ``--rounds`` rounds and the medians are
reported. ``label_ratio`` = label / raw and ``train_ratio`` = train / raw_windows; target >= 0.8.

Wall-clock rates only mean something on cores the benchmark has to itself. So each measurement is
also taken in CPU time: raw decode per CPU-second of this process; a stream per CPU-second of its
worker plus this (consuming) process (``*_cpu_ratio``) and of its worker alone
(``*_worker_cpu_ratio``: per-worker throughput when the consumer runs on another core), read from
``/proc`` (Linux; absent elsewhere). On a machine busy with other work these are the figures to compare.
Prints one JSON object.

    .venv/bin/python benchmarks/stream.py [--episodes 24 --frames 128]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from decode import synthetic_clip  # benchmarks/decode.py, run from this folder's parent or here

from shards.decode import decode_video, resolve_backend
from shards.format import shard_paths
from shards.stream import WindowStream, make_loader, read_tar_samples
from shards.writer import Episode, run_sharded_job


def _episode(i: int, n_frames: int) -> list[Episode]:
    return [
        Episode(key=f"ep{i:04d}", frames={"front": synthetic_clip(n_frames, 64, seed=i)}, fps=30.0, embodiment="video")
    ]


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_decode_fps(root: Path, backend: str, windows: int = 0, seed: int = 0) -> tuple[float, float]:
    """(frames/s, frames per CPU-second) decoding every frame (``windows=0``) or ``windows`` random
    8-frame windows per episode."""
    rng = np.random.default_rng(seed)
    t0, c0, frames = time.perf_counter(), time.process_time(), 0
    for shard in shard_paths(root):
        for sample in read_tar_samples(shard):
            n = json.loads(sample["meta.json"])["n_frames"]
            idx = None
            if windows:
                starts = rng.integers(0, n - 7, windows)
                idx = np.unique(np.add.outer(starts, np.arange(8)))
                frames += windows * 8 - len(idx)  # overlapping windows are handed out twice by a stream
            frames += len(decode_video(sample["front.mp4"], idx, backend))
    return frames / (time.perf_counter() - t0), frames / (time.process_time() - c0)


def stream_fps(stream: WindowStream, batches: int | None) -> tuple[float, float | None, float | None]:
    """(frames/s, frames per CPU-second of worker + this process, frames per CPU-second of the worker
    alone) over ``batches`` batches after a warm-up batch (None: the rest of one label pass)."""
    loader = make_loader(stream, batch_size=32, num_workers=1)
    it = iter(loader)
    next(it)  # worker start-up and first shard open are not throughput
    pids = [w.pid for w in getattr(it, "_workers", [])]  # the DataLoader iterator's worker processes
    t0, c0, frames = time.perf_counter(), time.process_time(), 0
    w0 = [_cpu_seconds(p) for p in pids]
    for batch in itertools.islice(it, batches):
        frames += batch["frames"].shape[0] * batch["frames"].shape[1]
    w1 = [_cpu_seconds(p) for p in pids]  # before the workers exit (a label pass ends here)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if not pids or None in w0 + w1:
        return frames / wall, None, None
    worker = sum(w1) - sum(w0)
    return frames / wall, frames / (cpu + worker), frames / worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--train-batches", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    backend = resolve_backend("auto")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bench"
        make = functools.partial(_episode, n_frames=args.frames)
        run_sharded_job(
            root,
            list(range(args.episodes)),
            make,
            samples_per_shard=8,
            workers=1,
            created_by="benchmarks/stream.py",
            desc="build",
        )
        raw_decode_fps(root, backend)  # warm the page cache and the backend's imports
        runs = {"raw": [], "label": [], "raw_windows": [], "train": []}
        for r in range(args.rounds):
            runs["raw"].append(raw_decode_fps(root, backend))
            runs["label"].append(stream_fps(WindowStream(root, window=8, mode="label", backend=backend), None))
            runs["raw_windows"].append(raw_decode_fps(root, backend, windows=4, seed=r))
            runs["train"].append(
                stream_fps(
                    WindowStream(
                        root, window=8, mode="train", backend=backend, seed=r, windows_per_episode=4, shuffle_buffer=64
                    ),
                    args.train_batches,
                )
            )
        raw, label, raw_windows, train = (statistics.median(v[0] for v in runs[k]) for k in runs)
        cpu = {k: [v[1] for v in vs if v[1] is not None] for k, vs in runs.items()}
        cpu_med = {k: statistics.median(vs) if vs else None for k, vs in cpu.items()}
        worker = {k: [v[2] for v in runs[k] if v[2] is not None] for k in ("label", "train")}
        worker_med = {k: statistics.median(vs) if vs else None for k, vs in worker.items()}

    def ratio(a, b):
        return None if a is None or b is None else round(a / b, 2)

    print(
        json.dumps(
            {
                "backend": backend,
                "episodes": args.episodes,
                "frames_per_episode": args.frames,
                "size": 64,
                "window": 8,
                "batch": 32,
                "num_workers": 1,
                "rounds": args.rounds,
                "load_average": [round(v, 2) for v in os.getloadavg()],
                "raw_decode_fps": round(raw),
                "label_stream_fps": round(label),
                "raw_window_decode_fps": round(raw_windows),
                "train_stream_fps": round(train),
                "label_ratio": round(label / raw, 2),
                "train_ratio": round(train / raw_windows, 2),
                "label_cpu_ratio": ratio(cpu_med["label"], cpu_med["raw"]),
                "train_cpu_ratio": ratio(cpu_med["train"], cpu_med["raw_windows"]),
                "label_worker_cpu_ratio": ratio(worker_med["label"], cpu_med["raw"]),
                "train_worker_cpu_ratio": ratio(worker_med["train"], cpu_med["raw_windows"]),
                "all_runs_fps": {k: [round(v[0]) for v in vs] for k, vs in runs.items()},
                "all_runs_frames_per_cpu_s": {k: [round(v) for v in vs] for k, vs in cpu.items()},
                "all_runs_frames_per_worker_cpu_s": {k: [round(v) for v in vs] for k, vs in worker.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
