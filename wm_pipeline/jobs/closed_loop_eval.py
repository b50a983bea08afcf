"""Closed-loop evaluation: run seeded episodes of a policy in Meta-World and report what happened.

    results = evaluate(load_policy("expert", env_info("metaworld")), tasks=["reach-v3"], episodes=10,
                       seed=0, out_dir="runs/eval")

For each task, episode ``i`` uses seed ``eval_seed(seed, i) = seed + EVAL_SEED_OFFSET + i``; demos
from ``wm collect --seed S`` use ``S + i``, so evaluation layouts never coincide with collected demos
for the same base seed (as long as a task has fewer than EVAL_SEED_OFFSET demos). An episode stops at
its first success (success = reached at any step) or after ``max_steps`` actions.

Reported per task: success rate, mean episode length (actions taken), and for policies that record
``latencies`` the per-model-call latency (median and p95, ms). ``results.json`` holds everything;
rollout videos go to ``<out>/videos/<task>_<episode>.mp4`` with ``video=True``.

``results.json`` also carries LeRobot's ``eval_info`` fields (``lerobot-eval``'s ``eval_policy``):
per task ``aggregated`` (``pc_success`` in percent, ``avg_sum_reward``, ``avg_max_reward`` of
Meta-World's dense reward over the actions taken, ``n_episodes``, ``eval_s``, ``eval_ep_s``,
``video_paths``) and ``per_episode`` rows (``episode_ix``, ``sum_reward``, ``max_reward``,
``success``, ``seed``); ``overall`` holds the same aggregated fields over all tasks.

Policies are resolved by ``load_policy(spec, env_info)``: ``expert`` and ``random`` are built in;
other specs (e.g. a run directory) are handled by loaders added with ``register_policy_loader``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from wm_pipeline.exit_codes import UsageError
from wm_pipeline.jobs.policy import ExpertPolicy, Policy, RandomPolicy, reset_policy

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 100_000
ENVS = ("metaworld",)

PolicyLoader = Callable[[str, dict[str, Any]], "Policy | None"]
_LOADERS: list[PolicyLoader] = []


# ---------------------------------------------------------------- policies


def register_policy_loader(fn: PolicyLoader) -> PolicyLoader:
    """Add a loader ``fn(spec, env_info) -> Policy | None`` (None: not mine). Usable as a decorator.

    Loaders are tried in registration order after the built-in ``expert`` and ``random`` and the
    registered models' own (``ModelSpec.load_policy``).
    """
    if fn not in _LOADERS:
        _LOADERS.append(fn)
    return fn


def env_info(env: str = "metaworld", resolution: int = 64, camera: str = "corner") -> dict[str, Any]:
    """What a policy loader may need to know about the environment it will be driven in."""
    if env not in ENVS:
        raise UsageError(f"unknown --env {env!r}; available: {', '.join(ENVS)}")
    from wm_pipeline.sim.metaworld_env import ACTION_DIM, EMBODIMENT, STATE_DIM

    return {
        "env": env,
        "embodiment": EMBODIMENT,
        "action_dim": ACTION_DIM,
        "state_dim": STATE_DIM,
        "image_size": (resolution, resolution),
        "camera": camera,
    }


def load_policy(spec: str, info: dict[str, Any]) -> Policy:
    """Build the policy named by ``spec`` ("expert", "random", or whatever a registered loader accepts)."""
    if spec == "expert":
        if info.get("env") != "metaworld":
            raise UsageError(f"--policy expert needs the Meta-World scripted experts, not env {info.get('env')!r}")
        return ExpertPolicy(action_dim=info["action_dim"])
    if spec == "random":
        return RandomPolicy(action_dim=info["action_dim"])
    loaders = policy_loaders()
    for loader in loaders:
        policy = loader(spec, info)
        if policy is not None:
            return policy
    where = "" if Path(spec).exists() else " (no such file or directory)"
    raise UsageError(
        f"cannot load policy {spec!r}{where}: expected 'expert', 'random', or a run directory "
        f"a registered policy loader accepts ({len(loaders)} registered)"
    )


def policy_loaders() -> list[PolicyLoader]:
    """The registered models' policy faces (wm_pipeline.training.registry: the built-in table first),
    then the loaders added with ``register_policy_loader``."""
    from wm_pipeline.training.registry import builtin, specs

    builtin()
    return [s.load_policy for s in specs() if s.load_policy is not None] + list(_LOADERS)


def check_compatible(policy: Policy, info: dict[str, Any]) -> None:
    """Fail (UsageError naming both sides) if the policy's declared ``embodiment``, ``action_dim`` or
    ``image_size`` does not match the environment described by ``info`` (see ``env_info``).
    Undeclared attributes are not checked."""
    name = type(policy).__name__
    embodiment = getattr(policy, "embodiment", None)
    if embodiment is not None and embodiment != info["embodiment"]:
        raise UsageError(
            f"policy {name} acts for embodiment '{embodiment}' but {info['env']} is '{info['embodiment']}'"
        )
    action_dim = getattr(policy, "action_dim", None)
    if action_dim is not None and int(action_dim) != info["action_dim"]:
        raise UsageError(
            f"policy {name} outputs {action_dim}-dim actions but {info['env']} "
            f"({info['embodiment']}) takes {info['action_dim']}-dim actions"
        )
    size = getattr(policy, "image_size", None)
    if size is not None:
        size = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
        env_size = tuple(info["image_size"])
        if size != env_size:
            raise UsageError(
                f"policy {name} expects {size[0]}x{size[1]} images but {info['env']} renders "
                f"{env_size[0]}x{env_size[1]} (set --resolution {size[0]})"
            )


def check_policy_fits(
    spec: str, info: dict[str, Any], embodiments: list[str], state_dim: int, horizon: int, hint: str = ""
) -> None:
    """Before any rollout: the environment's embodiment is one the policy knows, its state size is the one
    the policy reads (0: reads none), and ``info["action_steps"]`` fits the chunk horizon (UsageError)."""
    env = f"{info['env']} ({info['embodiment']})"
    if info["embodiment"] not in embodiments:
        raise UsageError(
            f"policy {spec} acts for embodiment(s) {sorted(embodiments)} but {env} is '{info['embodiment']}'{hint}"
        )
    if state_dim and state_dim != info.get("state_dim", state_dim):
        raise UsageError(f"policy {spec} reads {state_dim}-dim states but {env} gives {info['state_dim']}-dim states")
    steps = info.get("action_steps")
    if steps is not None and not 1 <= steps <= horizon:
        raise UsageError(f"--action-steps {steps}: must be in 1..{horizon} (the policy's chunk horizon)")


# ---------------------------------------------------------------- rollouts


def eval_seed(seed: int, episode: int) -> int:
    """Seed of evaluation episode ``episode`` (never one of ``wm collect --seed seed``'s demo seeds)."""
    return seed + EVAL_SEED_OFFSET + episode


@dataclasses.dataclass
class EpisodeResult:
    task: str
    episode: int
    seed: int
    success: bool
    length: int  # actions taken
    video: str | None = None  # path relative to the results folder
    sum_reward: float = 0.0  # Meta-World's dense reward summed over the actions taken
    max_reward: float = 0.0  # ... and its largest value (LeRobot's eval_info fields)


@dataclasses.dataclass
class Rollout:
    """What one episode did: success (reached at any step), actions taken, rewards per action and,
    when recorded, the frames uint8 [T+1, H, W, 3]."""

    success: bool
    length: int
    rewards: list[float]
    frames: np.ndarray | None = None


def run_episode(env, policy: Policy, seed: int, record: bool = False) -> Rollout:
    """One episode of ``policy`` in ``env`` from ``seed`` (see ``Rollout``)."""
    obs = env.reset(seed=seed)
    reset_policy(policy, seed)
    frames = [env.render_video()] if record else None
    success, done, steps, rewards = False, False, 0, []
    while not (success or done):
        action = np.asarray(policy.act(obs), dtype=np.float32).reshape(-1)
        if action.shape != (env.action_dim,) or not np.isfinite(action).all():
            raise ValueError(
                f"policy {type(policy).__name__} returned action {action.tolist()} "
                f"(expected {env.action_dim} finite numbers)"
            )
        obs, reward, done, info = env.step(action)
        success, steps = info["success"], info["steps"]
        rewards.append(float(reward))
        if record:
            frames.append(env.render_video())
    return Rollout(bool(success), int(steps), rewards, np.stack(frames) if record else None)


def run_episodes_batched(envs: list, policy: Policy, seeds: list[int], record: bool = False) -> list[Rollout]:
    """Episodes ``seeds`` (in order) on ``len(envs)`` environments of one task, stepped in lockstep: each
    env runs the next episode not yet started when its own ends, and every step makes ONE
    ``policy.act_batch`` call for all running episodes (policies without ``act_batch`` get one copy per
    env). Each episode is the one ``run_episode`` gives for its seed. Returns rollouts in ``seeds`` order."""
    batched = hasattr(policy, "act_batch")
    copies = None if batched else [copy.deepcopy(policy) for _ in envs]
    results: dict[int, Rollout] = {}
    running: dict[int, dict[str, Any]] = {}  # env slot -> {"episode", "obs", "rewards", "frames", "success", ...}
    pending = iter(range(len(seeds)))

    def start(slot: int) -> None:
        i = next(pending, None)
        if i is None:
            running.pop(slot, None)
            return
        env = envs[slot]
        obs = env.reset(seed=seeds[i])
        if batched:
            try:
                policy.reset_slot(slot, seeds[i])
            except ValueError as e:  # a policy that cannot run episodes side by side says why
                raise UsageError(f"--num-envs {len(envs)}: {e}") from None
        else:
            reset_policy(copies[slot], seeds[i])
        running[slot] = {"episode": i, "obs": obs, "rewards": [], "frames": [env.render_video()] if record else None}

    for slot in range(min(len(envs), len(seeds))):
        start(slot)
    while running:
        slots = sorted(running)
        observations = [running[k]["obs"] for k in slots]
        actions = (
            policy.act_batch(observations, slots)
            if batched
            else [copies[k].act(o) for k, o in zip(slots, observations)]
        )
        for slot, action in zip(slots, actions):
            env, ep = envs[slot], running[slot]
            action = np.asarray(action, dtype=np.float32).reshape(-1)
            if action.shape != (env.action_dim,) or not np.isfinite(action).all():
                raise ValueError(
                    f"policy {type(policy).__name__} returned action {action.tolist()} "
                    f"(expected {env.action_dim} finite numbers)"
                )
            obs, reward, done, info = env.step(action)
            ep["obs"] = obs
            ep["rewards"].append(float(reward))
            if record:
                ep["frames"].append(env.render_video())
            if info["success"] or done:
                results[ep["episode"]] = Rollout(
                    bool(info["success"]), int(info["steps"]), ep["rewards"], np.stack(ep["frames"]) if record else None
                )
                start(slot)
    if copies is not None and hasattr(policy, "latencies"):
        for c in copies:
            policy.latencies.extend(getattr(c, "latencies", []))
    return [results[i] for i in range(len(seeds))]


def _latency_summary(seconds: list[float]) -> dict[str, float] | None:
    if not seconds:
        return None
    ms = np.asarray(seconds) * 1e3
    return {
        "calls": len(ms),
        "median_ms": float(np.median(ms)),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": float(ms.mean()),
    }


def _aggregated(rows: list[EpisodeResult], seconds: float) -> dict[str, Any]:
    """LeRobot's aggregated eval_info fields over ``rows``: ``pc_success`` (percent), ``avg_sum_reward``,
    ``avg_max_reward``, ``n_episodes``, ``eval_s`` (wall seconds), ``eval_ep_s`` (seconds per episode)."""
    return {
        "avg_sum_reward": float(np.mean([r.sum_reward for r in rows])),
        "avg_max_reward": float(np.mean([r.max_reward for r in rows])),
        "pc_success": float(np.mean([r.success for r in rows]) * 100),
        "n_episodes": len(rows),
        "eval_s": round(seconds, 3),
        "eval_ep_s": round(seconds / len(rows), 3),
        "video_paths": [r.video for r in rows if r.video],
    }


def _per_episode(rows: list[EpisodeResult]) -> list[dict[str, Any]]:
    """LeRobot's per-episode eval_info rows (``episode_ix`` counts within the task)."""
    return [
        {
            "episode_ix": r.episode,
            "sum_reward": r.sum_reward,
            "max_reward": r.max_reward,
            "success": r.success,
            "seed": r.seed,
        }
        for r in rows
    ]


def evaluate(
    policy: Policy,
    tasks: list[str],
    episodes: int,
    seed: int,
    out_dir: str | Path | None = None,
    video: bool = False,
    resolution: int = 64,
    camera: str = "corner",
    max_steps: int = 200,
    policy_name: str = "",
    video_size: int | None = 256,
    num_envs: int = 1,
) -> dict[str, Any]:
    """Run ``episodes`` seeded episodes per task; returns (and writes ``results.json``) the results.

    ``video_size``: pixel size of the rollout videos (rendered apart from the policy's ``resolution``
    images, only with ``video``); None: the policy's images themselves. ``num_envs``: environments per
    task stepped at once with batched policy calls (``run_episodes_batched``); 1 runs the episodes one
    after the other. Per-episode results do not depend on it (seeds are per episode)."""
    from shards.encode import encode_video
    from wm_pipeline.sim.metaworld_env import MetaWorldEnv, check_task

    if episodes < 1:
        raise UsageError(f"--episodes must be >= 1, got {episodes}")
    if num_envs < 1:
        raise UsageError(f"--num-envs must be >= 1, got {num_envs}")
    tasks = [check_task(t) for t in tasks]
    out = Path(out_dir) if out_dir is not None else None
    if video and out is None:
        raise UsageError("video=True needs an output folder")
    check_compatible(policy, env_info("metaworld", resolution=resolution, camera=camera))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    latencies = getattr(policy, "latencies", None)
    n_latencies_before = len(latencies) if latencies is not None else 0
    rows: list[EpisodeResult] = []
    per_task: dict[str, Any] = {}
    fps = None
    started = time.perf_counter()
    bar = tqdm(total=len(tasks) * episodes, desc="eval", unit="episode")
    for task in tasks:
        envs = [
            MetaWorldEnv(
                task,
                seed=seed,
                resolution=resolution,
                camera=camera,
                max_steps=max_steps,
                video_size=video_size if video else None,
            )
            for _ in range(min(num_envs, episodes))
        ]
        env = envs[0]
        try:
            fps = env.fps
            task_latency_start = len(latencies) if latencies is not None else 0
            task_rows = []
            task_started = time.perf_counter()
            seeds = [eval_seed(seed, i) for i in range(episodes)]
            batch = run_episodes_batched(envs, policy, seeds, record=video) if len(envs) > 1 else None
            for i in range(episodes):
                s = seeds[i]
                ep = batch[i] if batch is not None else run_episode(env, policy, s, record=video)
                row = EpisodeResult(
                    task,
                    i,
                    s,
                    ep.success,
                    ep.length,
                    sum_reward=float(np.sum(ep.rewards)),
                    max_reward=float(np.max(ep.rewards)),
                )
                if video:
                    row.video = f"videos/{task}_{i:04d}.mp4"
                    (out / "videos").mkdir(exist_ok=True)
                    (out / row.video).write_bytes(encode_video(ep.frames, env.fps))
                task_rows.append(row)
                bar.update()
                bar.set_postfix(task=task, success=f"{sum(r.success for r in task_rows)}/{len(task_rows)}")
            task_seconds = time.perf_counter() - task_started
        finally:
            for e in envs:
                e.close()
        rows += task_rows
        per_task[task] = {
            "episodes": len(task_rows),
            "successes": sum(r.success for r in task_rows),
            "success_rate": sum(r.success for r in task_rows) / len(task_rows),
            "mean_length": float(np.mean([r.length for r in task_rows])),
            "latency": _latency_summary(latencies[task_latency_start:]) if latencies is not None else None,
            # LeRobot's eval_policy() shape: aggregated numbers and one row per episode
            "aggregated": _aggregated(task_rows, task_seconds),
            "per_episode": _per_episode(task_rows),
        }
    bar.close()
    results = {
        "policy": policy_name or type(policy).__name__,
        "env": "metaworld",
        "seed": seed,
        "seed_scheme": f"episode i of every task uses seed {seed} + {EVAL_SEED_OFFSET} + i",
        "episodes_per_task": episodes,
        "resolution": resolution,
        "camera": camera,
        "max_steps": max_steps,
        "fps": fps,
        "video_size": (video_size or resolution) if video else None,
        "num_envs": num_envs,
        "tasks": per_task,
        "overall": {
            "episodes": len(rows),
            "successes": sum(r.success for r in rows),
            "success_rate": sum(r.success for r in rows) / len(rows),
            "mean_length": float(np.mean([r.length for r in rows])),
            **_aggregated(rows, time.perf_counter() - started),  # LeRobot's eval_info "overall" fields
        },
        "latency": _latency_summary(latencies[n_latencies_before:]) if latencies is not None else None,
        "episodes": [dataclasses.asdict(r) for r in rows],
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    if out is not None:
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        log.info("wrote %s", out / "results.json")
    return results


def format_table(results: dict[str, Any]) -> str:
    """A readable per-task table of ``results`` (success rate, mean length, latency)."""
    lines = [f"{'task':<28} {'success':>10} {'rate':>6} {'length':>7} {'lat. median':>12} {'lat. p95':>9}"]

    def row(name: str, r: dict[str, Any], lat: dict | None) -> str:
        succ = f"{r['successes']}/{r['episodes']}"
        med = f"{lat['median_ms']:.1f} ms" if lat else "-"
        p95 = f"{lat['p95_ms']:.1f} ms" if lat else "-"
        return f"{name:<28} {succ:>10} {r['success_rate']:>6.2f} {r['mean_length']:>7.1f} {med:>12} {p95:>9}"

    for task, r in results["tasks"].items():
        lines.append(row(task, r, r.get("latency")))
    lines.append(row("overall", results["overall"], results.get("latency")))
    return "\n".join(lines)
