"""Milliseconds per action chunk for ActionDecoder.predict_action_chunk.

Flow matching at 1, 2, 5 and 10 Euler steps and MeanFlow at 1 and 2 steps, on a Meta-World-shaped
decoder (action 4, state 39, 2 observation frames). Random weights: latency does not depend on
them. Every call includes the image encoder and the condition, i.e. what a policy pays per chunk.

    .venv/bin/python benchmarks/decoder_latency.py [--preset small] [--image-size 64] [--batch 1]

Prints one JSON object (and writes it to --out if given) with the median and p90 per setting and
the ratio of each median to 10-step flow matching.
"""

import argparse
import json
import logging
import platform
import statistics
import time

import torch

from decoders.decoder import ActionDecoder, DecoderConfig
from nets.normalize import stats_of

log = logging.getLogger("decoder_latency")
SETTINGS = [("fm", 1), ("fm", 2), ("fm", 5), ("fm", 10), ("meanflow", 1), ("meanflow", 2)]


def build(objective: str, args) -> ActionDecoder:
    g = torch.Generator().manual_seed(0)
    stats = {"sawyer": {"action": stats_of(torch.rand(100, 4, generator=g) * 2 - 1),
                        "state": stats_of(torch.randn(100, 39, generator=g))}}
    cfg = DecoderConfig.from_preset(
        args.preset, action_dim=4, state_dim=39, image_size=[args.image_size] * 2, tasks=["reach-v3"], stats=stats,
        objective=objective,
    )
    torch.manual_seed(0)
    return ActionDecoder(cfg).eval()


def time_all(models: dict[str, ActionDecoder], args) -> dict[str, list[float]]:
    """Round-robin over the settings, one call each per repetition, so that load from other
    processes on a shared machine spreads evenly over the settings instead of hitting one."""
    cfg = models["fm"].config
    shape = (args.batch, cfg.n_obs_steps, 3, args.image_size, args.image_size)
    frames = torch.randint(0, 256, shape, dtype=torch.uint8)
    state = torch.randn(args.batch, 39)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {f"{o}_{n}": [] for o, n in SETTINGS}
    for rep in range(args.warmup + args.reps):
        for objective, n_steps in SETTINGS:
            start = time.perf_counter()
            models[objective].predict_action_chunk(frames, state, "reach-v3", generator=gen, n_steps=n_steps)
            if rep >= args.warmup:
                times[f"{objective}_{n_steps}"].append((time.perf_counter() - start) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    # One thread by default: batch-1 inference of a small model gains little from more, and on a
    # shared machine extra threads mostly measure the neighbours.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {objective: build(objective, args) for objective in ("fm", "meanflow")}
    results = {}
    for name, times in time_all(models, args).items():
        results[name] = {
            "median_ms": round(statistics.median(times), 3),
            "p90_ms": round(sorted(times)[int(0.9 * (len(times) - 1))], 3),
        }
        log.info("%s: %.2f ms", name, results[name]["median_ms"])
    ref = results["fm_10"]["median_ms"]
    for row in results.values():
        row["ratio_to_fm_10"] = round(row["median_ms"] / ref, 3)
    cfg = models["fm"].config
    report = {
        "benchmark": "decoder_latency",
        "preset": args.preset,
        "image_size": args.image_size,
        "batch": args.batch,
        "horizon": cfg.horizon,
        "n_obs_steps": cfg.n_obs_steps,
        "params": sum(p.numel() for p in models["fm"].parameters()),
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "reps": args.reps,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
