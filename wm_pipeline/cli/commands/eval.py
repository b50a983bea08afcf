"""`wm eval`: closed-loop evaluation of a policy in a simulator (see wm_pipeline/jobs/closed_loop_eval.py).

wm eval --policy expert --env metaworld --tasks reach-v3,push-v3 --episodes 10 --seed 0 --out runs/eval
"""

from __future__ import annotations

import argparse

from wm_pipeline import exit_codes


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="run seeded closed-loop episodes of a policy and report success rates",
        description="Run N seeded episodes per task, report success rate, episode length and inference "
        "latency, write results.json (and rollout MP4s with --video); a run's model card "
        "(RUN/final/README.md) gets the success rates.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--policy", required=True, help="'expert', 'random', or a run directory")
    p.add_argument("--env", default="metaworld", help="simulator")
    p.add_argument("--tasks", required=True, help="comma-separated task names (e.g. reach-v3,push-v3) or 'all'")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task")
    p.add_argument("--seed", type=int, default=0, help="base seed; episode i uses seed + 100000 + i")
    p.add_argument("--out", required=True, help="output folder for results.json and videos/")
    p.add_argument("--video", action="store_true", help="write one rollout MP4 per episode")
    p.add_argument(
        "--num-envs",
        type=int,
        default=1,
        help="environments per task stepped at once, one batched policy call per step for all of them "
        "(per-episode results do not change: seeds are per episode)",
    )
    p.add_argument(
        "--video-size",
        type=int,
        default=256,
        help="pixel size of the --video rollouts, rendered apart from the policy's --resolution images",
    )
    p.add_argument("--resolution", type=int, default=64, help="rendered image size (square) the policy sees")
    p.add_argument("--camera", default="corner", help="camera name")
    p.add_argument("--max-steps", type=int, default=200, help="actions per episode at most")
    p.add_argument(
        "--action-steps",
        type=int,
        default=None,
        help="chunked policies: actions executed per predicted chunk (default: horizon / 2)",
    )
    p.add_argument(
        "--temporal-ensemble",
        type=float,
        default=None,
        metavar="K",
        help="chunked policies: predict every step and average chunks with weights exp(-K i)",
    )
    p.add_argument(
        "--sampling-steps",
        type=int,
        default=None,
        help="flow policies: integration steps (default: the model's, 10 for fm, 1 for meanflow)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch CPU threads for the policy: batch-1 inference gains little from more, and on a "
        "busy CPU extra threads spin (measured: 1.5 s vs 35 ms per chunk, tiny decoder)",
    )
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="module or .py file that registers models / policy loaders (also $WM_PLUGINS)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from wm_pipeline.jobs.closed_loop_eval import env_info, evaluate, format_table, load_policy
    from wm_pipeline.sim.metaworld_env import parse_tasks
    from wm_pipeline.training.registry import load_plugins

    tasks = parse_tasks(args.tasks)
    info = env_info(args.env, resolution=args.resolution, camera=args.camera)
    info.update(
        action_steps=args.action_steps, temporal_ensemble=args.temporal_ensemble, sampling_steps=args.sampling_steps
    )
    if args.policy not in ("expert", "random"):
        import torch

        torch.set_num_threads(max(1, args.torch_threads))
        load_plugins(args.plugin)  # the built-in model registrations add the run-folder loaders
    policy = load_policy(args.policy, info)
    results = evaluate(
        policy,
        tasks,
        episodes=args.episodes,
        seed=args.seed,
        out_dir=args.out,
        video=args.video,
        resolution=args.resolution,
        camera=args.camera,
        max_steps=args.max_steps,
        policy_name=args.policy,
        video_size=args.video_size,
        num_envs=args.num_envs,
    )
    print(format_table(results))
    print(f"results: {args.out}/results.json")
    if args.policy not in ("expert", "random"):  # a run: its model card gets the success rates
        from pathlib import Path

        from wm_pipeline.model_card import record_closed_loop_eval

        card = record_closed_loop_eval(args.policy, results, Path(args.out) / "results.json")
        if card is not None:
            print(f"model card: {card}")
    return exit_codes.OK
