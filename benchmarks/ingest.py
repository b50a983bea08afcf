"""Ingest throughput: frames/s through ``run_sharded_job`` vs a plain PyAV encode of the same frames.

    python benchmarks/ingest.py [--episodes 40] [--frames 100] [--size 64] [--repeats 3]

Prints one JSON object. The baseline encodes every episode to an in-memory MP4 with the same
libx264 options as the writer (``shards.encode.codec_options``), so the ratio measures what the
writer adds on top of encoding: validation, npy/json members, tar, sha256, stats and manifest.
Target: ratio >= 0.7. Both run in one process (workers=1).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import tempfile
import time
from fractions import Fraction

import av
import numpy as np

from shards.encode import CODEC, PIX_FMT, codec_options
from shards.writer import Episode, run_sharded_job


def moving_pattern(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 [n, size, size, 3]: bars and a blob drifting at a per-episode speed."""
    t = np.arange(n, dtype=np.float32)[:, None, None]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    speed = 0.5 + seed % 5 * 0.3
    bars = 127 + 100 * np.sin((x[None] + speed * t) / 5.0)
    blob = 120 * np.exp(-(((x[None] - (t * speed) % size) ** 2 + (y[None] - size / 2) ** 2) / 40.0))
    r, g, b = bars, np.clip(bars * 0.5 + blob, 0, 255), np.broadcast_to(blob + 30, bars.shape)
    return np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)


def plain_pyav(frames: np.ndarray, fps: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(CODEC, rate=Fraction(fps), options=codec_options())
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], PIX_FMT
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    videos = [moving_pattern(args.frames, args.size, i) for i in range(args.episodes)]
    rng = np.random.default_rng(0)
    actions = [rng.normal(size=(args.frames, 4)).astype(np.float32) for _ in videos]
    states = [rng.normal(size=(args.frames, 39)).astype(np.float32) for _ in videos]
    total = args.episodes * args.frames

    def make_episodes(i: int):
        yield Episode(
            key=f"ep{i:05d}",
            frames={"corner": videos[i]},
            fps=80.0,
            embodiment="sawyer",
            task="push-v3",
            action=actions[i],
            state=states[i],
        )

    plain, job = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        size = sum(len(plain_pyav(v, 80)) for v in videos)
        plain.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            result = run_sharded_job(
                out,
                list(range(args.episodes)),
                make_episodes,
                samples_per_shard=10,
                workers=1,
                created_by="benchmarks/ingest.py",
                desc="bench",
            )
            job.append(time.perf_counter() - t0)
            assert result.ok and result.manifest["totals"]["frames"] == total
            dataset_bytes = result.manifest["totals"]["bytes"]
    plain_fps, job_fps = total / statistics.median(plain), total / statistics.median(job)
    print(
        json.dumps(
            {
                "episodes": args.episodes,
                "frames_per_episode": args.frames,
                "size": args.size,
                "repeats": args.repeats,
                "plain_pyav_fps": round(plain_fps, 1),
                "run_sharded_job_fps": round(job_fps, 1),
                "ratio": round(job_fps / plain_fps, 3),
                "target_ratio": 0.7,
                "mp4_bytes": size,
                "dataset_bytes": dataset_bytes,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
