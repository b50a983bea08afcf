"""`wm demo [--profile quick|default] [--out DIR] [--tasks ...]`: the whole pipeline, resumable."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run every stage of the pipeline on Meta-World and write a report (resumes when rerun)",
        description="Collect -> latent-action model -> label -> world model -> decoders -> closed-loop "
        "evaluation -> DIR/report.md. Rerunning resumes at the first unfinished stage. "
        "'quick' is a smoke run of a few minutes on 2 CPU cores; 'default' is the configuration "
        "whose numbers are in docs/RESULTS.md.",
    )
    p.add_argument("--profile", default="default", choices=["quick", "default"], help="size of the run")
    p.add_argument("--out", default="demo", help="output folder (data, runs, evals, report.md)")
    p.add_argument("--tasks", help="comma-separated Meta-World tasks (default: the profile's)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from wm_pipeline.demo.stages import run_demo

    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    if tasks:
        from wm_pipeline.sim.metaworld_env import check_task

        for t in tasks:
            check_task(t)
    return run_demo(args.profile, args.out, tasks)
