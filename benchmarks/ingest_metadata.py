"""Metadata time of `wm ingest episodes --format lerobot` against the number of episodes.

Builds LeRobot v3 datasets without images (``meta/info.json``, ``meta/episodes`` with LeRobot's
per-episode stats columns, data parquets of ``--episodes-per-file`` episodes each, action / state as
fixed-size float32 lists as LeRobot writes them), then times the metadata part of ingest:
``lerobot_inputs`` (the episode table) plus ``episode_data`` for every episode (its row, its data
rows, action / state / timestamps), in one process. ``--naive-up-to N`` also times, for the sizes
<= N, the per-episode re-read of the episode table and the data parquet that ingest did before.

Prints one JSON object: ``{"machine": .., "frames_per_episode": .., "runs": [{"episodes", "seconds",
"us_per_episode", "naive_seconds"?}]}``.

    .venv/bin/python benchmarks/ingest_metadata.py [--episodes 400,1600,10000] [--naive-up-to 1600]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards import ingest_lerobot
from shards.ingest_lerobot import episode_data, episode_table, lerobot_inputs

DIM = 6


def write_dataset(root: Path, n_episodes: int, frames: int, per_file: int) -> None:
    (root / "meta").mkdir(parents=True)
    info = {
        "codebase_version": "v3.0",
        "robot_type": "so100",
        "fps": 30,
        "chunks_size": 1000,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": None,
        "features": {
            "action": {"dtype": "float32", "shape": [DIM]},
            "observation.state": {"dtype": "float32", "shape": [DIM]},
            "timestamp": {"dtype": "float32", "shape": [1]},
            "frame_index": {"dtype": "int64", "shape": [1]},
            "episode_index": {"dtype": "int64", "shape": [1]},
            "index": {"dtype": "int64", "shape": [1]},
            "task_index": {"dtype": "int64", "shape": [1]},
        },
    }
    (root / "meta" / "info.json").write_text(json.dumps(info))
    rng = np.random.default_rng(0)
    vec = pa.list_(pa.float32(), DIM)
    for f, first in enumerate(range(0, n_episodes, per_file)):
        eps = np.arange(first, min(first + per_file, n_episodes))
        n = len(eps) * frames
        cols = {
            "action": pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=n * DIM).astype(np.float32)), DIM),
            "observation.state": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.normal(size=n * DIM).astype(np.float32)), DIM
            ),
            "timestamp": pa.array(np.tile(np.arange(frames) / 30, len(eps)).astype(np.float32)),
            "frame_index": pa.array(np.tile(np.arange(frames), len(eps))),
            "episode_index": pa.array(np.repeat(eps, frames)),
            "index": pa.array(np.arange(first * frames, first * frames + n)),
            "task_index": pa.array(np.zeros(n, np.int64)),
        }
        path = root / "data" / "chunk-000" / f"file-{f:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), path)
        stats = {
            f"stats/{k}/{s}": pa.array([rng.normal(size=DIM).astype(np.float32).tolist()] * len(eps), vec)
            for k in ("action", "observation.state")
            for s in ("min", "max", "mean", "std", "q01", "q99")
        }
        meta = {
            "episode_index": pa.array(eps),
            "tasks": pa.array([["pick up the cube"]] * len(eps)),
            "length": pa.array(np.full(len(eps), frames)),
            "data/chunk_index": pa.array(np.zeros(len(eps), np.int64)),
            "data/file_index": pa.array(np.full(len(eps), f, np.int64)),
            "dataset_from_index": pa.array(eps * frames),
            "dataset_to_index": pa.array((eps + 1) * frames),
            "meta/episodes/chunk_index": pa.array(np.zeros(len(eps), np.int64)),
            "meta/episodes/file_index": pa.array(np.full(len(eps), f, np.int64)),
            **stats,
        }
        path = root / "meta" / "episodes" / "chunk-000" / f"file-{f:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(meta), path)


def clear_caches() -> None:
    for fn in (ingest_lerobot.read_info, ingest_lerobot.episode_table, ingest_lerobot.data_file):
        fn.cache_clear()


def metadata_seconds(root: Path) -> float:
    clear_caches()
    t0 = time.perf_counter()
    inputs = lerobot_inputs([str(root)])
    for item in inputs:
        root_s, _, index = item.rpartition("::")
        ep = episode_data(root_s, int(index))
        assert len(ep.action) == len(ep.timestamps)
    return time.perf_counter() - t0


def naive_seconds(root: Path) -> float:
    """The earlier algorithm: per episode, read the whole episode table and the whole data parquet."""
    clear_caches()
    t0 = time.perf_counter()
    info = json.loads((root / "meta" / "info.json").read_text())
    indices = sorted(episode_table(str(root)))
    for index in indices:
        rows = {}
        for f in sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet")):
            for row in pq.read_table(f).to_pylist():
                rows[int(row["episode_index"])] = row
        ep = rows[index]
        table = pq.read_table(
            root / info["data_path"].format(chunk_index=ep["data/chunk_index"], file_index=ep["data/file_index"])
        )
        table = table.filter(pc.equal(table["episode_index"], index)).sort_by("frame_index")
        np.asarray(table["action"].to_pylist(), np.float32)
        np.asarray(table["observation.state"].to_pylist(), np.float32)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", default="400,1600,10000", help="comma-separated dataset sizes")
    parser.add_argument("--frames", type=int, default=50, help="frames per episode")
    parser.add_argument("--episodes-per-file", type=int, default=1000, help="episodes per data / meta parquet")
    parser.add_argument("--naive-up-to", type=int, default=0, help="also time the per-episode re-read up to this size")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.episodes.split(",")):
            root = Path(tmp) / f"ds{n}"
            write_dataset(root, n, args.frames, args.episodes_per_file)
            seconds = min(metadata_seconds(root) for _ in range(2))
            run = {"episodes": n, "seconds": round(seconds, 3), "us_per_episode": round(seconds / n * 1e6)}
            if n <= args.naive_up_to:
                run["naive_seconds"] = round(naive_seconds(root), 3)
            runs.append(run)
    print(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                f"Python {platform.python_version()}, pyarrow {pa.__version__}",
                "frames_per_episode": args.frames,
                "episodes_per_file": args.episodes_per_file,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
