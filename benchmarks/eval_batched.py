"""Episodes per second of `wm eval` with N environments stepped at once (batched policy calls) vs one.

A tiny flow-matching decoder policy (random weights: speed does not depend on them; 10 sampling steps,
8 of 16 actions per chunk) on Meta-World reach-v3 at 64 px, ``--episodes`` episodes of
``--max-steps`` actions (an untrained policy never succeeds, so every episode runs to the limit and
both settings do the same simulator work). One torch thread. Settings alternate over ``--rounds``
rounds so load from other processes spreads over both. Per setting: wall seconds and this process's
CPU seconds (``time.process_time``: simulation, rendering and inference, without the time other
processes took the cores); the ratios N / 1 of episodes per second are the result.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_batched.py [--num-envs 1,4] [--out eval_batched.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from json_report import emit

from decoders.decoder import ActionDecoder, DecoderConfig
from decoders.policy import DecoderPolicy
from nets.normalize import stats_of
from wm_pipeline.jobs.closed_loop_eval import evaluate


def build_policy(preset: str, size: int) -> DecoderPolicy:
    g = torch.Generator().manual_seed(0)
    stats = {
        "sawyer": {
            "action": stats_of(torch.rand(100, 4, generator=g) * 2 - 1),
            "state": stats_of(torch.randn(100, 39, generator=g)),
        }
    }
    cfg = DecoderConfig.from_preset(
        preset, action_dim=4, state_dim=39, image_size=[size, size], tasks=["reach-v3"], stats=stats, objective="fm"
    )
    torch.manual_seed(0)
    return DecoderPolicy(ActionDecoder(cfg).eval())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-envs", default="1,4")
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    ns = [int(n) for n in args.num_envs.split(",")]
    runs: dict[int, dict[str, list[float]]] = {n: {"wall": [], "cpu": [], "calls": []} for n in ns}
    successes = {}
    for _ in range(args.rounds):
        for n in ns:
            policy = build_policy(args.preset, args.resolution)
            wall, cpu = time.perf_counter(), time.process_time()
            r = evaluate(
                policy,
                ["reach-v3"],
                episodes=args.episodes,
                seed=0,
                resolution=args.resolution,
                max_steps=args.max_steps,
                num_envs=n,
            )
            runs[n]["wall"].append(time.perf_counter() - wall)
            runs[n]["cpu"].append(time.process_time() - cpu)
            runs[n]["calls"].append(len(policy.latencies))
            successes[n] = [e["success"] for e in r["episodes"]]
    base = ns[0]
    out = {
        "benchmark": "eval_batched",
        "policy": f"DecoderPolicy({args.preset}, fm 10 steps, 8 of 16 actions)",
        "task": "reach-v3",
        "resolution": args.resolution,
        "episodes": args.episodes,
        "max_steps": args.max_steps,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "loadavg_at_end": os.getloadavg(),
        },
        "settings": {
            str(n): {
                "wall_s_median": statistics.median(r["wall"]),
                "cpu_s_median": statistics.median(r["cpu"]),
                "episodes_per_s_wall": args.episodes / statistics.median(r["wall"]),
                "episodes_per_s_cpu": args.episodes / statistics.median(r["cpu"]),
                "policy_calls": r["calls"][0],
                "wall_s": r["wall"],
                "cpu_s": r["cpu"],
            }
            for n, r in runs.items()
        },
        "same_successes": len({tuple(v) for v in successes.values()}) == 1,
    }
    for n in ns[1:]:
        out[f"speedup_{n}_over_{base}_wall"] = statistics.median(runs[base]["wall"]) / statistics.median(
            runs[n]["wall"]
        )
        out[f"speedup_{n}_over_{base}_cpu"] = statistics.median(runs[base]["cpu"]) / statistics.median(runs[n]["cpu"])
    emit(out, args.out, indent=1)


if __name__ == "__main__":
    main()
