"""`wm worldmodel eval --model RUN --data DIR [--out DIR] [--windows N] [--every K] [--steps K] [--seed S]`

Offline evaluation of a `wm train worldmodel` run on held-out episodes (wm_pipeline/jobs/worldmodel_offline_eval.py):
forward-dynamics frame error against the copy-last-frame baseline, video-mode error, inverse-dynamics
action R², policy-mode action error. Writes OUT/metrics.json, OUT/grid.png and OUT/grid.mp4
(OUT defaults to RUN/eval) and prints the metrics as JSON.

Exit codes: 0 done, 2 bad arguments, a folder that is not a world model run, or data without actions.
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "worldmodel", help="world model tools (eval)", description="World model tools; see `wm worldmodel eval -h`."
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = sub.add_parser(
        "eval",
        help="score a world model run on held-out episodes",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Forward dynamics vs copy-last-frame, video mode, inverse-dynamics R², policy "
        "MSE on held-out windows; JSON + PNG/MP4 grid.",
    )
    e.add_argument("--model", required=True, metavar="RUN", help="world model run folder (or its final/)")
    e.add_argument(
        "--data",
        required=True,
        metavar="DIR|URL",
        help="held-out dataset with actions (a folder or an s3:// gs:// http(s):// pipe: location)",
    )
    e.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN/eval)")
    e.add_argument("--windows", type=int, default=64, metavar="N", help="windows to score (in data order; 0: all)")
    e.add_argument(
        "--every",
        type=int,
        default=None,
        metavar="K",
        help="a window at every K-th frame of each episode (overlapping; default: episodes tiled "
        "into non-overlapping windows)",
    )
    e.add_argument("--batch-size", type=int, default=16, metavar="B")
    e.add_argument("--steps", type=int, default=None, metavar="K", help="sampling steps (default: the model's)")
    e.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    e.add_argument("--examples", type=int, default=4, help="rows in grid.png / grid.mp4")
    e.add_argument("--backend", default="auto", help="video decoder: auto | torchcodec | decord | pyav")
    e.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from wm_pipeline.exit_codes import UsageError
    from wm_pipeline.jobs.worldmodel_offline_eval import evaluate_world_model

    if args.windows < 0 or args.batch_size < 1 or any(v is not None and v < 1 for v in (args.steps, args.every)):
        raise UsageError("--windows must be >= 0, --batch-size, --steps and --every >= 1")
    metrics = evaluate_world_model(
        args.model,
        args.data,
        args.out,
        max_windows=args.windows,
        batch_size=args.batch_size,
        steps=args.steps,
        seed=args.seed,
        examples=args.examples,
        backend=args.backend,
        every=args.every,
    )
    print(json.dumps(metrics, indent=2))
    return 0
