"""Milliseconds per action chunk for ActionDecoder.predict_action_chunk.

Flow matching at 1, 2, 5 and 10 Euler steps and MeanFlow at 1 and 2 steps, on a Meta-World-shaped
decoder (action 4, state 39, 2 observation frames). Random weights: latency does not depend on
them. Every call includes the image encoder and the condition, i.e. what a policy pays per chunk.

    .venv/bin/python benchmarks/decoder_latency.py [--preset small] [--image-size 64] [--batch 1]

Prints one JSON object (and writes it to --out if given) with the median and p90 per setting, the
ratio of each median to 10-step flow matching, ``meanflow_over_fm`` (1-step MeanFlow over 10-step
flow matching, issue 18's figure) and the split of a chunk into a fixed part (image encoder,
condition, noise, unnormalisation: paid once per chunk) and a per-step part (one velocity-network
call), from the flow-matching medians: ``per_step = (fm_10 - fm_1) / 9``, ``fixed = fm_1 - per_step``.
With the condition computed once per chunk, 1-step over 10-step is ``(fixed + step) / (fixed + 10 step)``:
``meanflow_floor`` is that value, the ratio a sampler with no overhead of its own would reach.
"""

import argparse
import logging
import os
import platform
import statistics
import time

import torch
from json_report import emit

from decoders.decoder import ActionDecoder, DecoderConfig
from nets.normalize import stats_of

log = logging.getLogger("decoder_latency")
SETTINGS = [("fm", 1), ("fm", 2), ("fm", 5), ("fm", 10), ("meanflow", 1), ("meanflow", 2)]


def build(objective: str, args) -> ActionDecoder:
    g = torch.Generator().manual_seed(0)
    stats = {
        "sawyer": {
            "action": stats_of(torch.rand(100, 4, generator=g) * 2 - 1),
            "state": stats_of(torch.randn(100, 39, generator=g)),
        }
    }
    cfg = DecoderConfig.from_preset(
        args.preset,
        action_dim=4,
        state_dim=39,
        image_size=[args.image_size] * 2,
        tasks=["reach-v3"],
        stats=stats,
        objective=objective,
    )
    torch.manual_seed(0)
    return ActionDecoder(cfg).eval()


def time_all(models: dict[str, ActionDecoder], args) -> dict[str, dict[str, list[float]]]:
    """Round-robin over the settings, one call each per repetition, so that load from other
    processes on a shared machine spreads evenly over the settings instead of hitting one.
    Each call is timed twice: wall clock, and this thread's CPU time (``time.thread_time``), which
    on one torch thread is the work itself without the time the scheduler gave to other processes
    (a niced benchmark beside a training job waits most of its wall time)."""
    cfg = models["fm"].config
    shape = (args.batch, cfg.n_obs_steps, 3, args.image_size, args.image_size)
    frames = torch.randint(0, 256, shape, dtype=torch.uint8)
    state = torch.randn(args.batch, 39)
    gen = torch.Generator().manual_seed(0)
    times = {f"{o}_{n}": {"wall": [], "cpu": []} for o, n in SETTINGS}
    for rep in range(args.warmup + args.reps):
        for objective, n_steps in SETTINGS:
            start, start_cpu = time.perf_counter(), time.thread_time()
            models[objective].predict_action_chunk(frames, state, "reach-v3", generator=gen, n_steps=n_steps)
            if rep >= args.warmup:
                times[f"{objective}_{n_steps}"]["wall"].append((time.perf_counter() - start) * 1000)
                times[f"{objective}_{n_steps}"]["cpu"].append((time.thread_time() - start_cpu) * 1000)
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
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="",
        help="clock of the ratios: cpu (this thread's CPU time; the default with one "
        "thread) or wall (the default with more)",
    )
    args = parser.parse_args()
    args.clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {objective: build(objective, args) for objective in ("fm", "meanflow")}
    results = {}
    for name, times in time_all(models, args).items():
        wall, cpu = times["wall"], times["cpu"]
        results[name] = {
            "median_ms": round(statistics.median(wall), 3),
            "p90_ms": round(sorted(wall)[int(0.9 * (len(wall) - 1))], 3),
            "cpu_median_ms": round(statistics.median(cpu), 3),
        }
        log.info("%s: %.2f ms wall, %.2f ms cpu", name, results[name]["median_ms"], results[name]["cpu_median_ms"])
    # ratios on the clock asked for; with one thread, CPU time is the default (robust to load)
    key = "cpu_median_ms" if args.clock == "cpu" else "median_ms"
    ref = results["fm_10"][key]
    for row in results.values():
        row["ratio_to_fm_10"] = round(row[key] / ref, 3)
    cfg = models["fm"].config
    per_step = (results["fm_10"][key] - results["fm_1"][key]) / 9
    fixed = results["fm_1"][key] - per_step
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
        "clock": args.clock,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "results": results,
        "meanflow_over_fm": results["meanflow_1"]["ratio_to_fm_10"],
        "fixed_ms": round(fixed, 3),
        "per_step_ms": round(per_step, 3),
        "meanflow_floor": round((fixed + per_step) / (fixed + 10 * per_step), 3),
    }
    emit(report, args.out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
