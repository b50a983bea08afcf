"""`wm eval`: closed-loop evaluation of a policy in a simulator (see pipeline/evaluate.py).

    wm eval --policy expert --env metaworld --tasks reach-v3,push-v3 --episodes 10 --seed 0 --out runs/eval
"""

from __future__ import annotations

import argparse

from pipeline import exit_codes


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="run seeded closed-loop episodes of a policy and report success rates",
        description="Run N seeded episodes per task, report success rate, episode length and inference "
                    "latency, write results.json (and rollout MP4s with --video).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policy", required=True, help="'expert', 'random', or a run directory")
    p.add_argument("--env", default="metaworld", help="simulator")
    p.add_argument("--tasks", required=True, help="comma-separated task names (e.g. reach-v3,push-v3) or 'all'")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task")
    p.add_argument("--seed", type=int, default=0, help="base seed; episode i uses seed + 100000 + i")
    p.add_argument("--out", required=True, help="output folder for results.json and videos/")
    p.add_argument("--video", action="store_true", help="write one rollout MP4 per episode")
    p.add_argument("--resolution", type=int, default=64, help="rendered image size (square)")
    p.add_argument("--camera", default="corner", help="camera name")
    p.add_argument("--max-steps", type=int, default=200, help="actions per episode at most")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.evaluate import env_info, evaluate, format_table, load_policy
    from pipeline.sim.metaworld_env import parse_tasks

    tasks = parse_tasks(args.tasks)
    info = env_info(args.env, resolution=args.resolution, camera=args.camera)
    policy = load_policy(args.policy, info)
    results = evaluate(policy, tasks, episodes=args.episodes, seed=args.seed, out_dir=args.out,
                       video=args.video, resolution=args.resolution, camera=args.camera,
                       max_steps=args.max_steps, policy_name=args.policy)
    print(format_table(results))
    print(f"results: {args.out}/results.json")
    return exit_codes.OK
