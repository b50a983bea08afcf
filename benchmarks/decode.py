"""Decode speed of each backend on the same H.264 files: all frames, and every 4th frame.

Prints one JSON object: ``{"<clip>": {"<backend>": {"all_fps": .., "every4_fps": ..}}}`` (frames
delivered per second, median of ``--repeats`` runs, opening the decoder included).

    .venv/bin/python benchmarks/decode.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from shards.decode import BACKENDS, backend_available, decode_video
from shards.encode import encode_video


def synthetic_clip(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: moving gradients and squares with mild noise (compresses like a scene)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    frames = np.empty((n, size, size, 3), np.uint8)
    for t in range(n):
        img = np.stack([np.sin(6 * x + t / 9), np.cos(5 * y - t / 7), np.sin(4 * (x + y) + t / 5)], -1)
        img = (img * 0.5 + 0.5) * 200
        c = int((t * 2) % (size - size // 4))
        img[c : c + size // 4, c : c + size // 4] = 240
        frames[t] = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    return frames


def frames_per_second(data: bytes, indices, backend: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = decode_video(data, indices, backend)
        times.append(time.perf_counter() - t0)
    return len(out) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    clips = {"256x96px": (256, 96), "64x224px": (64, 224)}
    backends = [b for b in BACKENDS if backend_available(b)]
    results = {}
    for name, (n, size) in clips.items():
        data = encode_video(synthetic_clip(n, size), fps=30.0)
        every4 = list(range(0, n, 4))
        results[name] = {
            b: {
                "all_fps": round(frames_per_second(data, None, b, args.repeats)),
                "every4_fps": round(frames_per_second(data, every4, b, args.repeats)),
            }
            for b in backends
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
