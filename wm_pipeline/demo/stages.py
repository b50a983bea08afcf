"""`wm demo`: every stage of the pipeline, in order, on the built-in Meta-World default.

collect (action-free corpus + K demos per task) -> latent-action model -> label -> inverse-dynamics
model -> label -> world-model pretraining (video + latent actions) -> decoders fine-tuned on the demos
(the `scratch` baseline, `idm-bc`, `uwm`, ...) -> closed-loop evaluation -> report.

Each stage is a list of `wm` commands run as subprocesses (so the report can print the exact commands
that reproduce it). A stage is done when its marker file exists; a rerun of `wm demo` skips done
stages and resumes at the first unfinished one (the commands themselves resume inside a stage:
collect skips complete shards, training resumes from its latest checkpoint, labelling skips complete
sidecars).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from wm_pipeline import exit_codes
from wm_pipeline.exit_codes import UsageError
from wm_pipeline.run_folder import FINAL, MODEL_CONFIG

log = logging.getLogger(__name__)

STATE = "demo_state.json"

# Seeds: demos use seeds 0.., the action-free corpus 1000.., evaluation 100000.. (see docs/SIMULATION.md),
# so no evaluation episode was ever seen in training.
DEMO_SEED = 0
VIDEO_SEED = 1000
HELDOUT_SEED = 2000  # episodes with actions that no model trains on: probes and world-model eval
EVAL_SEED = 0


@dataclasses.dataclass
class Profile:
    name: str
    tasks: list[str]
    demos_per_task: int  # K: the few labelled demos per task
    video_per_task: int  # action-free episodes per task (the unlabelled corpus)
    eval_episodes: int  # closed-loop episodes per task and policy
    heldout_per_task: int  # episodes with actions used only to score labels and the world model
    max_steps: int  # actions per episode (collect and eval)
    preset: str  # model size preset, unless `presets` names another for a run
    steps: dict[str, int]  # training steps per run
    policies: list[str]  # decoders trained and evaluated (besides the experts)
    presets: dict[str, str] = dataclasses.field(default_factory=dict)  # run -> preset
    resolution: int = 64
    workers: int = 2
    videos_per_policy: int = 2  # rollout MP4s kept per task and policy
    # the action-free corpus comes from the experts with Gaussian action noise: scripted experts are
    # deterministic given the scene, and a LAM learns nothing from their video (docs/RESULTS.md)
    video_action_noise: float = 0.5
    estimate_minutes: float = 0  # measured on 2 cores; drives the ETA


PROFILES = {
    "quick": Profile(
        name="quick",
        tasks=["reach-v3", "push-v3"],
        demos_per_task=4,
        video_per_task=6,
        eval_episodes=3,
        heldout_per_task=2,
        max_steps=80,
        preset="tiny",
        steps={
            "lam": 60,
            "idm": 60,
            "worldmodel": 60,
            "uwm": 40,
            "scratch-fm": 80,
            "scratch-meanflow": 80,
            "idm-bc": 80,
            "latent": 80,
        },
        policies=["scratch-fm", "scratch-meanflow", "idm-bc", "latent", "uwm"],
        estimate_minutes=4,
    ),
    # Sized from measured speeds on 2 cores (docs/RESULTS.md): small LAM ~4 steps/s, small world model
    # ~1.5 steps/s, tiny decoders / IDM several steps/s, ~20 ms per simulated + rendered step.
    "default": Profile(
        name="default",
        tasks=["reach-v3", "push-v3", "drawer-close-v3"],
        demos_per_task=10,
        video_per_task=30,
        eval_episodes=10,
        heldout_per_task=3,
        max_steps=150,
        preset="small",
        presets={"idm": "tiny", "scratch-fm": "tiny", "scratch-meanflow": "tiny", "idm-bc": "tiny", "latent": "tiny"},
        steps={
            "lam": 1000,
            "idm": 600,
            "worldmodel": 1000,
            "uwm": 300,
            "scratch-fm": 800,
            "scratch-meanflow": 800,
            "idm-bc": 800,
            "latent": 800,
        },
        policies=["scratch-fm", "scratch-meanflow", "idm-bc", "latent", "uwm"],
        estimate_minutes=39,
    ),
}

# How each decoder policy is trained: extra `wm train` arguments (besides --data/--out/--preset/steps).
POLICY_TRAINING = {
    "scratch-fm": ("decoder", ["policy=scratch", "model.objective=fm"], ["demos"], None),
    "scratch-meanflow": ("decoder", ["policy=scratch", "model.objective=meanflow"], ["demos"], None),
    "idm-bc": ("decoder", ["policy=idm-bc", "model.objective=fm"], ["demos", "video"], None),
    "latent": ("decoder", ["policy=latent", "model.objective=fm"], ["demos"], "worldmodel"),
    "uwm": ("worldmodel", [], ["demos"], "worldmodel"),
}


# Stage weights for the ETA: minutes each stage took in the measured `default` run (docs/RESULTS.md);
# policies sampling the world model once per chunk evaluate slowest.
TRAIN_WEIGHT = {"uwm": 1.7}
EVAL_WEIGHT = {"expert": 0.8, "latent": 5.8, "uwm": 3.0}


@dataclasses.dataclass
class Stage:
    name: str
    commands: list[list[str]]  # `wm` argv lists
    marker: Path  # exists when the stage is done
    weight: float = 1.0  # share of the profile's time estimate (for the ETA)


def build_stages(p: Profile, out: Path) -> list[Stage]:
    data, runs, evals = out / "data", out / "runs", out / "evals"
    tasks = ",".join(p.tasks)
    common_collect = [
        "--tasks",
        tasks,
        "--resolution",
        str(p.resolution),
        "--max-steps",
        str(p.max_steps),
        "--workers",
        str(p.workers),
    ]

    def train(model: str, run: str, sources: list[str], steps: int, extra: list[str] = ()) -> list[str]:
        argv = ["train", model]
        for s in sources:
            argv += ["--data", str(data / s)]
        preset = p.presets.get(run, p.preset)
        return argv + ["--out", str(runs / run), "--preset", preset, f"train.max_steps={steps}", *extra]

    stages = [
        Stage(
            "collect demos",
            [
                [
                    "collect",
                    "metaworld",
                    *common_collect,
                    "--episodes",
                    str(p.demos_per_task),
                    "--seed",
                    str(DEMO_SEED),
                    "--out",
                    str(data / "demos"),
                ]
            ],
            data / "demos" / "manifest.json",
            0.5,
        ),
        Stage(
            "collect held-out episodes",
            [
                [
                    "collect",
                    "metaworld",
                    *common_collect,
                    "--episodes",
                    str(p.heldout_per_task),
                    "--seed",
                    str(HELDOUT_SEED),
                    "--out",
                    str(data / "heldout"),
                ]
            ],
            data / "heldout" / "manifest.json",
            0.3,
        ),
        Stage(
            "collect action-free video",
            [
                [
                    "collect",
                    "metaworld",
                    *common_collect,
                    "--episodes",
                    str(p.video_per_task),
                    "--seed",
                    str(VIDEO_SEED),
                    "--drop-actions",
                    "--action-noise",
                    str(p.video_action_noise),
                    "--out",
                    str(data / "video"),
                ]
            ],
            data / "video" / "manifest.json",
            1.5,
        ),
        Stage(
            "train latent-action model",
            [train("lam", "lam", ["video"], p.steps["lam"])],
            runs / "lam" / FINAL / MODEL_CONFIG,
            7.0,
        ),
        Stage(
            "label with the LAM",
            [
                ["label", "--labeller", str(runs / "lam"), "--data", str(data / "video")],
                ["label", "--labeller", str(runs / "lam"), "--data", str(data / "demos")],
                [
                    "probe",
                    "--labeller",
                    str(runs / "lam"),
                    "--data",
                    str(data / "heldout"),
                    "--out",
                    str(evals / "probe-lam"),
                ],
            ],
            evals / "probe-lam" / "probe.json",
            0.8,
        ),
        Stage(
            "train inverse-dynamics model",
            [train("idm", "idm", ["demos"], p.steps["idm"])],
            runs / "idm" / FINAL / MODEL_CONFIG,
            1.4,
        ),
        Stage(
            "label with the IDM",
            [
                ["label", "--labeller", str(runs / "idm"), "--data", str(data / "video")],
                [
                    "probe",
                    "--labeller",
                    str(runs / "idm"),
                    "--data",
                    str(data / "heldout"),
                    "--out",
                    str(evals / "probe-idm"),
                ],
            ],
            evals / "probe-idm" / "probe.json",
            1.2,
        ),
        Stage(
            "pretrain the world model",
            [
                train("worldmodel", "worldmodel", ["demos", "video"], p.steps["worldmodel"], ["--labels", "lam"]),
                [
                    "worldmodel",
                    "eval",
                    "--model",
                    str(runs / "worldmodel"),
                    "--data",
                    str(data / "heldout"),
                    "--out",
                    str(evals / "worldmodel"),
                ],
            ],
            evals / "worldmodel" / "metrics.json",
            5.7,
        ),
    ]
    for policy in p.policies:
        model, extra, sources, init = POLICY_TRAINING[policy]
        extra = list(extra) + ["--episodes-per-task", str(p.demos_per_task)]
        if init:
            extra += ["--init", str(runs / init)]
        stages.append(
            Stage(
                f"train policy {policy}",
                [train(model, policy, sources, p.steps[policy], extra)],
                runs / policy / FINAL / MODEL_CONFIG,
                TRAIN_WEIGHT.get(policy, 1.0),
            )
        )
    for policy in ["expert", *p.policies]:
        spec = "expert" if policy == "expert" else str(runs / policy)
        stages.append(
            Stage(
                f"evaluate {policy}",
                [
                    [
                        "eval",
                        "--policy",
                        spec,
                        "--env",
                        "metaworld",
                        "--tasks",
                        tasks,
                        "--episodes",
                        str(p.eval_episodes),
                        "--seed",
                        str(EVAL_SEED),
                        "--max-steps",
                        str(p.max_steps),
                        "--resolution",
                        str(p.resolution),
                        "--out",
                        str(evals / policy),
                        "--video",
                    ]
                ],
                evals / policy / "results.json",
                EVAL_WEIGHT.get(policy, 1.7),
            )
        )
    return stages


def command_line(argv: list[str]) -> str:
    return "wm " + " ".join(shlex.quote(a) for a in argv)


def _run_streaming(argv: list[str], log_path: Path) -> int:
    """Run ``python -m wm_pipeline ARGV``; its output goes to the terminal (progress bars included) and
    to ``log_path``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n$ {command_line(argv)}\n".encode())
        proc = subprocess.Popen(
            [sys.executable, "-m", "wm_pipeline", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(4096):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            log_file.write(chunk)
        return proc.wait()


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def run_demo(profile: str, out: str | Path, tasks: list[str] | None = None) -> int:
    if profile not in PROFILES:
        raise UsageError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    p = dataclasses.replace(PROFILES[profile], tasks=tasks or PROFILES[profile].tasks)
    out = Path(out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    state_path = out / STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("profile", p.name) != p.name or state.get("tasks", p.tasks) != p.tasks:
        raise UsageError(
            f"{out} holds a demo with profile {state.get('profile')} and tasks {state.get('tasks')}; "
            f"use another --out or the same settings"
        )
    state.update(profile=p.name, tasks=p.tasks, profile_settings=dataclasses.asdict(p))
    state.setdefault("stages", {})
    stages = build_stages(p, out)
    total_weight = sum(s.weight for s in stages)
    budget = p.estimate_minutes * 60
    started = time.perf_counter()
    log.info(
        "wm demo --profile %s: %d stages, tasks %s, output %s (estimate ~%d min on 2 CPU cores)",
        p.name,
        len(stages),
        ",".join(p.tasks),
        out,
        p.estimate_minutes,
    )
    done_weight = spent_weight = 0.0
    for i, stage in enumerate(stages, 1):
        record = state["stages"].setdefault(stage.name, {})
        record["commands"] = [command_line(c) for c in stage.commands]
        if stage.marker.exists():
            log.info("[%d/%d] %s: done earlier, skipped", i, len(stages), stage.name)
            done_weight += stage.weight
            continue
        remaining = sum(s.weight for s in stages[i - 1 :] if not s.marker.exists()) / total_weight * budget
        elapsed = time.perf_counter() - started
        if spent_weight >= 0.2 * total_weight:  # rescale by this machine's pace once it means something
            remaining *= min(3.0, max(1 / 3, elapsed / (spent_weight / total_weight * budget)))
        log.info("[%d/%d] %s ... (elapsed %s, ETA %s)", i, len(stages), stage.name, _fmt(elapsed), _fmt(remaining))
        t0 = time.perf_counter()
        log_path = out / "logs" / f"{i:02d}-{stage.name.replace(' ', '-')}.log"
        for argv in stage.commands:
            code = _run_streaming(argv, log_path)
            if code != exit_codes.OK:
                record.update(exit_code=code, failed_command=command_line(argv))
                state_path.write_text(json.dumps(state, indent=1))
                log.error(
                    "stage %r failed (exit %d): %s\n  log: %s\n  rerun `wm demo` to resume here",
                    stage.name,
                    code,
                    command_line(argv),
                    log_path,
                )
                return code
        record.update(seconds=round(time.perf_counter() - t0, 1), exit_code=0, log=str(log_path.relative_to(out)))
        state_path.write_text(json.dumps(state, indent=1))
        spent_weight += stage.weight
        log.info("[%d/%d] %s: done in %s", i, len(stages), stage.name, _fmt(record["seconds"]))
    state_path.write_text(json.dumps(state, indent=1))
    from wm_pipeline.demo.report import write_report  # matplotlib is only needed here

    report = write_report(out, p, stages)
    log.info("all stages done in %s; report: %s", _fmt(time.perf_counter() - started), report)
    return exit_codes.OK
