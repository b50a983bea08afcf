"""`wm collect metaworld`: scripted-expert rollouts written as a shard dataset.

    wm collect metaworld --tasks reach-v3,push-v3 --episodes 10 --resolution 64 --out data/mw

One input of the sharded job is one (task, episode index) pair; episode ``i`` of a task uses seed
``--seed + i`` (``wm eval`` uses ``seed + 100000 + i``, so the two never meet). Frame ``t`` is the
observation the expert saw before taking ``action[t]``, so ``n_frames == len(action)``. An episode
ends ``EXTRA_STEPS_AFTER_SUCCESS`` actions after the first success (the clip shows the task
completed, then stops) or after ``--max-steps`` actions. ``--drop-actions`` writes the same videos
without ``action.npy`` / ``state.npy`` (an action-free corpus; embodiment stays "sawyer").
``--action-noise S`` adds Gaussian noise of std S to every expert action (clipped to [-1, 1]; the
noisy action is the one executed and recorded): scripted experts are deterministic given the
scene, so from their video alone the next frame follows from the current one, and a latent-action
model has nothing to learn; a noisy behaviour policy makes the motion carry information.
``--noise-hold K`` draws that noise once every K steps and holds it in between (a drifting operator
rather than jitter): a perturbation that lasts K steps moves the arm visibly, so frames K steps apart
show what was done (the regime where inverse dynamics has something to read), while i.i.d. noise
averages out between them. docs/SIMULATION.md has the details.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import logging

import numpy as np

from wm_pipeline import exit_codes

log = logging.getLogger(__name__)

EXTRA_STEPS_AFTER_SUCCESS = 10


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    """One input of the job. Its string names every setting, so a resume with other settings
    rewrites shards instead of mixing them (the writer compares inputs as strings)."""

    task: str
    episode: int
    seed: int
    resolution: int
    camera: str
    max_steps: int
    actions: bool
    action_noise: float = 0.0
    noise_hold: int = 1

    def __str__(self) -> str:
        noise = f":action_noise={self.action_noise:g}" if self.action_noise else ""
        noise += f":noise_hold={self.noise_hold}" if self.action_noise and self.noise_hold != 1 else ""
        return (
            f"metaworld:{self.task}:episode={self.episode}:seed={self.seed}:res={self.resolution}:"
            f"camera={self.camera}:max_steps={self.max_steps}:actions={int(self.actions)}{noise}"
        )


_ENV_CACHE: dict[tuple, object] = {}  # one live env per process: making one + its GL context takes ~2 s


def _env_for(spec: EpisodeSpec):
    from wm_pipeline.sim.metaworld_env import MetaWorldEnv

    key = (spec.task, spec.resolution, spec.camera, spec.max_steps)
    if key not in _ENV_CACHE:
        _close_envs()
        _ENV_CACHE[key] = MetaWorldEnv(
            spec.task, seed=spec.seed, resolution=spec.resolution, camera=spec.camera, max_steps=spec.max_steps
        )
    return _ENV_CACHE[key]


def _close_envs() -> None:
    while _ENV_CACHE:
        env = _ENV_CACHE.popitem()[1]
        try:
            env.close()
        except Exception as e:  # at a worker's exit the EGL display can be gone first; nothing is left to save
            log.debug("closing a Meta-World env: %s", e)


atexit.register(_close_envs)


def rollout(
    env, seed: int, extra_steps: int = EXTRA_STEPS_AFTER_SUCCESS, action_noise: float = 0.0, noise_hold: int = 1
) -> dict[str, np.ndarray | bool]:
    """One scripted-expert episode: frames uint8 [T, H, W, 3], action float32 [T, 4], state float32
    [T, 39] (frame/state t were observed before action t), success (reached at any step).
    ``action_noise`` > 0 executes (and records) expert action + N(0, action_noise²), clipped to
    [-1, 1], with noise drawn from ``seed`` (the same episode twice is the same episode), a new draw
    every ``noise_hold`` steps (1: every step)."""
    from wm_pipeline.jobs.policy import ExpertPolicy

    expert = ExpertPolicy()
    noise_rng = np.random.default_rng([seed, 1])
    obs = env.reset(seed=seed)
    frames, actions, states = [], [], []
    first_success, done = None, False
    while not done:
        action = expert.act(obs)
        if action_noise > 0:
            if len(actions) % noise_hold == 0:
                offset = noise_rng.normal(0.0, action_noise, action.shape)
            action = np.clip(action + offset, -1.0, 1.0).astype(np.float32)
        frames.append(obs["image"])
        states.append(obs["state"])
        actions.append(action)
        obs, _, done, info = env.step(action)
        if info["success"] and first_success is None:
            first_success = info["steps"]
        if first_success is not None and info["steps"] >= first_success + extra_steps:
            break
    return {
        "frames": np.stack(frames),
        "action": np.stack(actions).astype(np.float32),
        "state": np.stack(states).astype(np.float32),
        "success": first_success is not None,
        "first_success_step": first_success,
    }


def make_episodes(spec: EpisodeSpec):
    """The job's ``make_episodes``: one Episode per spec (module level, so spawned workers can run it)."""
    from shards.writer import Episode
    from wm_pipeline.sim.metaworld_env import EMBODIMENT, instruction

    env = _env_for(spec)
    r = rollout(env, spec.seed, action_noise=spec.action_noise, noise_hold=spec.noise_hold)
    log.debug("%s: %d steps, success=%s", spec, len(r["action"]), r["success"])
    yield Episode(
        key=f"{spec.task}_{spec.episode:06d}",
        frames={spec.camera: r["frames"]},
        fps=env.fps,
        embodiment=EMBODIMENT,
        task=spec.task,
        instruction=instruction(spec.task),
        source=str(spec),
        action=r["action"] if spec.actions else None,
        state=r["state"] if spec.actions else None,
        success=r["success"],
        episode_index=spec.episode,
        seed=spec.seed,
        extra={
            "simulator": "metaworld",
            "policy": _behaviour(spec),
            "first_success_step": r["first_success_step"],
            "max_steps": spec.max_steps,
        },
    )


def _behaviour(spec: EpisodeSpec) -> str:
    """The behaviour policy's name in the episode's metadata."""
    if not spec.action_noise:
        return "scripted-expert"
    hold = f", held {spec.noise_hold} steps" if spec.noise_hold != 1 else ""
    return f"scripted-expert+gaussian({spec.action_noise:g}{hold})"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "collect",
        help="record scripted demonstrations in a simulator as shards",
        description="Record scripted-expert episodes in a simulator as a shard dataset.",
    )
    sims = p.add_subparsers(dest="simulator", metavar="SIMULATOR", required=True)
    mw = sims.add_parser(
        "metaworld",
        help="Meta-World scripted experts (Sawyer arm, 50 tasks)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Scripted-expert rollouts of Meta-World tasks, written as shards "
        "(episode i of a task uses seed --seed + i).",
    )
    mw.add_argument("--tasks", required=True, help="comma-separated task names (e.g. reach-v3,push-v3) or 'all'")
    mw.add_argument("--episodes", type=int, required=True, help="episodes per task")
    mw.add_argument("--out", required=True, help="dataset folder (created; a rerun resumes)")
    mw.add_argument("--seed", type=int, default=0, help="base seed: episode i uses seed + i")
    mw.add_argument("--resolution", type=int, default=64, help="rendered image size (square, even)")
    mw.add_argument("--camera", default="corner", help="camera name")
    mw.add_argument("--max-steps", type=int, default=200, help="actions per episode at most")
    mw.add_argument(
        "--drop-actions", action="store_true", help="write video only (no action/state): an action-free corpus"
    )
    mw.add_argument(
        "--action-noise",
        type=float,
        default=0.0,
        help="std of Gaussian noise added to every expert action (a more varied behaviour "
        "policy for action-free corpora; 0 = the expert as is)",
    )
    mw.add_argument(
        "--noise-hold", type=int, default=1, help="steps each draw of --action-noise lasts (1: a new draw every step)"
    )
    mw.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    mw.add_argument("--samples-per-shard", type=int, default=16, help="episodes per shard")
    mw.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from shards.writer import run_sharded_job
    from wm_pipeline.sim.metaworld_env import CAMERAS, MAX_PATH_LENGTH, parse_tasks

    tasks = parse_tasks(args.tasks)
    if args.episodes < 1 or args.workers < 1 or args.samples_per_shard < 1:
        raise exit_codes.UsageError("--episodes, --workers and --samples-per-shard must be >= 1")
    if args.camera not in CAMERAS:
        raise exit_codes.UsageError(f"unknown Meta-World camera {args.camera!r}; valid cameras: {', '.join(CAMERAS)}")
    if args.resolution <= 0 or args.resolution % 2:
        raise exit_codes.UsageError(f"--resolution must be a positive even number, got {args.resolution}")
    if not 0 < args.max_steps <= MAX_PATH_LENGTH:
        raise exit_codes.UsageError(f"--max-steps must be in 1..{MAX_PATH_LENGTH}, got {args.max_steps}")
    if not 0 <= args.action_noise <= 2:
        raise exit_codes.UsageError(
            f"--action-noise must be in 0..2 (actions live in [-1, 1]), got {args.action_noise}"
        )
    if args.noise_hold < 1:
        raise exit_codes.UsageError(f"--noise-hold must be >= 1 (steps per noise draw), got {args.noise_hold}")
    specs = [
        EpisodeSpec(
            task,
            i,
            args.seed + i,
            args.resolution,
            args.camera,
            args.max_steps,
            not args.drop_actions,
            args.action_noise,
            args.noise_hold,
        )
        for task in tasks
        for i in range(args.episodes)
    ]
    try:
        result = run_sharded_job(
            args.out,
            specs,
            make_episodes,
            samples_per_shard=args.samples_per_shard,
            workers=args.workers,
            created_by="wm collect metaworld",
            desc="collect",
        )
    finally:  # also on a full disk (exit 74): an env left to the interpreter's exit prints EGL tracebacks
        _close_envs()
    m = result.manifest
    log.info(
        "collected %d episodes (%d successful), %d frames -> %s",
        m["totals"]["samples"],
        sum(_success_flags(args.out, m)),
        m["totals"]["frames"],
        args.out,
    )
    return result.exit_code


def _success_flags(out: str, manifest: dict) -> list[bool]:
    """Success flag of every sample in the dataset (read from the meta.json members of its tars)."""
    import json
    import tarfile
    from pathlib import Path

    flags = []
    for s in manifest["shards"]:
        with tarfile.open(Path(out) / s["name"]) as tar:
            for member in tar:
                if member.name.endswith(".meta.json"):
                    flags.append(bool(json.loads(tar.extractfile(member).read()).get("success")))
    return flags
