"""The policy grid: train decoder policies (arms x K demos per task x training seeds), score every
checkpoint on validation data, evaluate the final checkpoint in closed loop, write one table and the plots.

    python scripts/policy_grid.py --out grid --demos data/demos --val-demos data/valdemos \\
        --tasks drawer-close-v3,door-open-v3 --ks 2,5,10 --seeds 0,1,2 \\
        --arm "scratch=policy=scratch model.objective=meanflow model.augment_shift=4" \\
        --arm "idm-bc=policy=idm-bc model.objective=meanflow model.augment_shift=4" \\
        --video data/video --idm-steps 3000 \\
        --steps 12000 --ckpt-every 2000 --eval-episodes 50 --val-episodes 5 --lanes 2

Everything that shapes an experiment is an argument: tasks, K, seeds, arms (a name and the extra
arguments of ``wm train decoder``), step budget, checkpoint spacing, episodes, seeds of validation and
evaluation, episode length, camera / resolution of the evaluation. A person with a GPU node reruns it
bigger by changing arguments only (``--lanes`` jobs run at once; each job is one ``wm`` process).

Arms with ``policy=idm-bc`` learn from the action-free corpus ``--video``: for each (K, seed) the grid
first trains an inverse-dynamics model on the same K demos per task (``runs/idm-k<K>-s<seed>``,
``--idm-steps``), scores it on ``--val-demos`` (``wm probe``: R² to the true actions), labels the video
with it into the sidecar ``labels/<grid>-idm-k<K>-s<seed>`` (``<grid>``: the ``--out`` folder's name, so
grids with other IDM settings share one corpus) and trains the arm on demos + video with those labels:
the video's only supervision comes from the K demos. An idm-bc arm whose arguments name a sidecar
itself (``--data VIDEO --labels NAME``, e.g. ``scripts/oracle_labels.py``'s true actions) trains on
that one, and no IDM is trained for it.

Seeds, kept apart:
- demos: whatever ``--demos`` holds (``wm collect --seed 0``: seeds 0..N-1); the first K successful
  episodes of each task are a policy's demos (``--episodes-per-task K``);
- validation: ``--val-demos`` (e.g. ``wm collect --seed 50000``) for the held-out action error, and
  closed-loop validation episodes on ``wm eval --seed VAL_SEED`` (VAL_SEED + 100000 + i);
- evaluation: ``wm eval --seed EVAL_SEED`` (EVAL_SEED + 100000 + i), the FINAL checkpoint only; no
  setting is chosen on these seeds.

Layout under ``--out`` (every stage is skipped when its output is there, so a rerun resumes)::

    runs/<arm>-k<K>-s<seed>/                  wm train output (checkpoints every --ckpt-every, final/)
    runs/<arm>-k<K>-s<seed>/<task>/           with --per-task: one policy per task (evals/<job>/<task>/ each,
                                              merged into evals/<job>/results.json)
    runs/idm-k<K>-s<seed>/                    the IDM of idm-bc arms (probe/ beside it: wm probe output)
    val/<arm>-k<K>-s<seed>/step-<N>/          policy/ (that checkpoint's EMA weights), action_error.json,
                                              eval/results.json (closed loop on validation seeds)
    val/<arm>-k<K>-s<seed>/<task>/step-<N>/   with --per-task: the same per task's policy, on that task's
                                              validation demos and episodes (merged per step one level up)
    evals/<arm>-k<K>-s<seed>/results.json     the final checkpoint on the evaluation seeds
    results.md, results.json                  the table (per task: mean over seeds +- standard error)
    learning_curves.png, success_vs_k.png     validation curves per arm; final success against K
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("policy_grid")


@dataclass(frozen=True)
class Job:
    arm: str
    args: tuple[str, ...]
    k: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}-k{self.k}-s{self.seed}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", required=True, type=Path, help="grid folder (resumable)")
    p.add_argument("--demos", required=True, help="demo dataset folder (wm collect output)")
    p.add_argument("--val-demos", default=None, help="validation demos for the held-out action error")
    p.add_argument("--tasks", required=True, help="comma-separated Meta-World tasks to evaluate")
    p.add_argument("--ks", default="10", help="demos per task, comma-separated")
    p.add_argument("--seeds", default="0,1", help="training seeds, comma-separated")
    p.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="a policy recipe: a name and the extra arguments of `wm train decoder` (repeatable)",
    )
    p.add_argument("--preset", default="tiny", help="decoder preset")
    p.add_argument("--steps", type=int, default=12000, help="training steps (the final checkpoint is evaluated)")
    p.add_argument("--ckpt-every", type=int, default=2000, help="checkpoint spacing (each is validated)")
    p.add_argument("--eval-episodes", type=int, default=50, help="evaluation episodes per task")
    p.add_argument("--eval-seed", type=int, default=0, help="wm eval --seed of the evaluation")
    p.add_argument("--val-episodes", type=int, default=5, help="validation episodes per task per checkpoint (0: none)")
    p.add_argument("--val-seed", type=int, default=50000, help="wm eval --seed of the validation")
    p.add_argument("--max-steps", type=int, default=200, help="actions per episode at most")
    p.add_argument("--resolution", type=int, default=64, help="rendered image size (the demos')")
    p.add_argument("--camera", default="corner", help="camera (the demos')")
    p.add_argument("--lanes", type=int, default=2, help="jobs at once (one torch thread each)")
    p.add_argument("--stages", default="train,eval,val,report", help="stages to run")
    p.add_argument("--video", default=None, help="action-free corpus for idm-bc arms (labelled per K / seed)")
    p.add_argument("--idm-steps", type=int, default=3000, help="training steps of each idm-bc arm's IDM")
    p.add_argument("--idm-args", default="", help="extra arguments of `wm train idm`")
    p.add_argument(
        "--per-task",
        action="store_true",
        help="one policy per task (data.tasks=TASK, --steps each) instead of one for all --tasks",
    )
    p.add_argument("--wm", default=str(Path(sys.executable).with_name("wm")), help="the wm executable")
    args = p.parse_args(argv)
    if not args.arm:
        args.arm = ["scratch=policy=scratch model.objective=meanflow model.augment_shift=4"]
    return args


def jobs_of(args) -> list[Job]:
    arms = []
    for spec in args.arm:
        name, _, rest = spec.partition("=")
        if not name or not rest:
            raise SystemExit(f"policy_grid: --arm {spec!r} is not NAME=ARGS")
        arms.append((name, tuple(rest.split())))
    ks = [int(k) for k in args.ks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    return [Job(a, extra, k, s) for a, extra in arms for k in ks for s in seeds]


def run(cmd: list[str], log_path: Path) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    started = time.time()
    with open(log_path, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise RuntimeError(f"exit {code} after {time.time() - started:.0f} s: {' '.join(cmd)} (log: {log_path})")
    log.info("done in %.0f s: %s", time.time() - started, " ".join(cmd[1:4]))


_idm_locks: dict[tuple[int, int], threading.Lock] = {}
_idm_locks_guard = threading.Lock()


def idm_labels(args, job: Job) -> list[str]:
    """For an idm-bc arm: the IDM of (K, seed) trained, probed and run over ``--video`` (once, whichever
    lane gets there first); returns the extra training arguments that read its labels."""
    if "policy=idm-bc" not in job.args or "--labels" in job.args:
        return []  # not idm-bc, or an arm that names its own sidecar (and --data) itself
    if not args.video:
        raise SystemExit(f"policy_grid: arm {job.arm} is idm-bc: give the action-free corpus with --video")
    name = f"idm-k{job.k}-s{job.seed}"
    # the sidecar is named after the grid too: grids with other IDM settings share one video corpus
    label_name = f"{args.out.name}-{name}"
    with _idm_locks_guard:
        lock = _idm_locks.setdefault((job.k, job.seed), threading.Lock())
    with lock:
        run_dir, logs = args.out / "runs" / name, args.out / "logs"
        if not finished(run_dir):
            run(
                [
                    args.wm,
                    "train",
                    "idm",
                    "--data",
                    args.demos,
                    "--out",
                    str(run_dir),
                    "--preset",
                    args.preset,
                    "--episodes-per-task",
                    str(job.k),
                    *args.idm_args.split(),
                    f"train.max_steps={args.idm_steps}",
                    f"train.seed={job.seed}",
                    "train.progress=false",
                    "data.num_workers=1",
                ],
                logs / f"train-{name}.log",
            )
        if args.val_demos and not (run_dir / "probe" / "probe.json").is_file():
            run(
                [
                    args.wm,
                    "probe",
                    "--labeller",
                    str(run_dir),
                    "--data",
                    args.val_demos,
                    "--out",
                    str(run_dir / "probe"),
                ],
                logs / f"probe-{name}.log",
            )
        done = run_dir / "labelled.json"  # the grid's marker: this IDM has labelled --video
        if not done.is_file():
            run(
                [
                    args.wm,
                    "label",
                    "--labeller",
                    str(run_dir),
                    "--data",
                    args.video,
                    "--name",
                    label_name,
                    "--no-progress",
                ],
                logs / f"label-{name}.log",
            )
            done.write_text(json.dumps({"video": str(args.video), "labels": label_name}) + "\n")
    # the name the labels were written under (a grid labelled before the grid prefix keeps its own)
    return ["--data", args.video, "--labels", json.loads(done.read_text())["labels"]]


def finished(run_dir: Path) -> bool:
    status = run_dir / "status.json"
    return (
        (run_dir / "final" / "model.safetensors").is_file()
        and status.is_file()
        and json.loads(status.read_text()).get("state") == "finished"
    )


def eval_cmd(args, policy: Path, episodes: int, seed: int, out: Path, tasks: str | None = None) -> list[str]:
    return [
        args.wm,
        "eval",
        "--policy",
        str(policy),
        "--env",
        "metaworld",
        "--tasks",
        tasks or args.tasks,
        "--episodes",
        str(episodes),
        "--seed",
        str(seed),
        "--max-steps",
        str(args.max_steps),
        "--resolution",
        str(args.resolution),
        "--camera",
        args.camera,
        "--out",
        str(out),
    ]


def checkpoint_policies(run_dir: Path, val_dir: Path) -> list[tuple[int, Path]]:
    """Each checkpoint's EMA weights as a loadable decoder folder (config.json of final/, the weights
    hard-linked where the file system allows)."""
    out = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
        step = int(ckpt.name.split("-")[1])
        policy = val_dir / f"step-{step:07d}" / "policy"
        if not (policy / "model.safetensors").is_file():
            policy.mkdir(parents=True, exist_ok=True)
            shutil.copy(run_dir / "final" / "config.json", policy / "config.json")
            try:  # a hard link: the checkpoint's EMA weights are not read or written again
                os.link(ckpt / "ema.safetensors", policy / "model.safetensors")
            except OSError:  # another file system (or no hard links): copy
                shutil.copy(ckpt / "ema.safetensors", policy / "model.safetensors.tmp")
                os.replace(policy / "model.safetensors.tmp", policy / "model.safetensors")
        out.append((step, policy))
    return out


def train_cmd(args, job: Job, run_dir: Path, extra: list[str]) -> list[str]:
    return [
        args.wm,
        "train",
        "decoder",
        "--data",
        args.demos,
        "--out",
        str(run_dir),
        "--preset",
        args.preset,
        "--episodes-per-task",
        str(job.k),
        *job.args,
        *extra,
        f"train.max_steps={args.steps}",
        f"train.ckpt_every={args.ckpt_every}",
        "train.keep_last=1000",
        f"train.seed={job.seed}",
        "train.progress=false",
        "data.num_workers=1",
    ]


def do_per_task_job(args, job: Job, stages: set[str]) -> None:
    """``--per-task``: one policy per task (``data.tasks=TASK``, ``--steps`` each) under runs/<job>/<task>,
    each evaluated on its own task; the evaluations merge into evals/<job>/results.json, so the table
    reads as for one policy. Each checkpoint is validated on its own task's validation demos and
    episodes (val/<job>/<task>/step-N), merged per step into val/<job>/step-N (action error weighted by
    windows, validation success over all the episodes) for the learning curves."""
    logs, evals = args.out / "logs", args.out / "evals" / job.name
    tasks = args.tasks.split(",")
    for task in tasks:
        run_dir, name = args.out / "runs" / job.name / task, f"{job.name}-{task}"
        if "train" in stages and not finished(run_dir):
            run(
                train_cmd(args, job, run_dir, [f"data.tasks={task}", *idm_labels(args, job)]),
                logs / f"train-{name}.log",
            )
        if not finished(run_dir):
            return
        if "eval" in stages and not (evals / task / "results.json").is_file():
            run(
                eval_cmd(args, run_dir, args.eval_episodes, args.eval_seed, evals / task, tasks=task),
                logs / f"eval-{name}.log",
            )
        if "val" in stages:
            validate(args, run_dir, args.out / "val" / job.name / task, f"val-{name}", task)
    if "val" in stages:
        merge_per_task_val(args.out / "val" / job.name, tasks)
    parts = {
        t: json.loads((evals / t / "results.json").read_text()) for t in tasks if (evals / t / "results.json").is_file()
    }
    if len(parts) == len(tasks) and not (evals / "results.json").is_file():
        merged = {
            **parts[tasks[0]],
            "policy": str(args.out / "runs" / job.name),
            "per_task": True,
            "tasks": {t: parts[t]["tasks"][t] for t in tasks},
            "episodes": [e for t in tasks for e in parts[t].get("episodes", [])],
            "wall_seconds": sum(p.get("wall_seconds", 0) for p in parts.values()),
        }
        merged["overall"] = {**parts[tasks[0]]["overall"], **pooled(merged["tasks"].values())}
        merged.pop("latency", None)
        (evals / "results.json").write_text(json.dumps(merged, indent=1) + "\n")


def do_job(args, job: Job, stages: set[str]) -> None:
    if args.per_task:
        return do_per_task_job(args, job, stages)
    run_dir = args.out / "runs" / job.name
    logs = args.out / "logs"
    if "train" in stages and not finished(run_dir):
        run(train_cmd(args, job, run_dir, idm_labels(args, job)), logs / f"train-{job.name}.log")
    if not finished(run_dir):
        return
    evals = args.out / "evals" / job.name
    if "eval" in stages and not (evals / "results.json").is_file():
        run(eval_cmd(args, run_dir, args.eval_episodes, args.eval_seed, evals), logs / f"eval-{job.name}.log")
    if "val" in stages:
        validate(args, run_dir, args.out / "val" / job.name, f"val-{job.name}")


def validate(args, run_dir: Path, val_dir: Path, log_name: str, task: str | None = None) -> None:
    """Every checkpoint of ``run_dir`` scored on the validation data (of ``task`` only, when given):
    val_dir/step-N/action_error.json and, with --val-episodes, step-N/eval/results.json."""
    from wm_pipeline.jobs.action_error import held_out_action_error

    for _step, policy in checkpoint_policies(run_dir, val_dir):
        folder = policy.parent
        if args.val_demos and not (folder / "action_error.json").is_file():
            metrics = held_out_action_error(policy, args.val_demos, tasks=[task] if task else ())
            (folder / "action_error.json").write_text(json.dumps(metrics, indent=1) + "\n")
        if args.val_episodes and not (folder / "eval" / "results.json").is_file():
            run(
                eval_cmd(args, policy, args.val_episodes, args.val_seed, folder / "eval", tasks=task),
                args.out / "logs" / f"{log_name}.log",
            )


def pooled(counts) -> dict:
    """Episodes and successes summed over evaluations (``{"episodes", "successes", ...}`` each)."""
    counts = list(counts)
    done, total = sum(c["successes"] for c in counts), sum(c["episodes"] for c in counts)
    return {"episodes": total, "successes": done, "success_rate": done / total}


def merge_per_task_val(val_dir: Path, tasks: list[str]) -> None:
    """--per-task: each step that every task's policy validated, merged into val_dir/step-N (what
    collect() reads for one policy): the action errors weighted by windows, the validation episodes
    pooled."""
    steps = [{f.name for f in (val_dir / t).glob("step-*")} if (val_dir / t).is_dir() else set() for t in tasks]
    for step in sorted(set.intersection(*steps)) if steps else []:
        parts = [val_dir / t / step for t in tasks]
        out = val_dir / step
        errors = [
            json.loads((p / "action_error.json").read_text()) for p in parts if (p / "action_error.json").is_file()
        ]
        if len(errors) == len(parts) and not (out / "action_error.json").is_file():
            windows = sum(e["windows"] for e in errors)
            merged = {k: sum(e[k] * e["windows"] for e in errors) / windows for k in ("action_mse", "first_action_mse")}
            out.mkdir(parents=True, exist_ok=True)
            (out / "action_error.json").write_text(json.dumps({**merged, "windows": windows}, indent=1) + "\n")
        evals = [p / "eval" / "results.json" for p in parts]
        if all(e.is_file() for e in evals) and not (out / "eval" / "results.json").is_file():
            (out / "eval").mkdir(parents=True, exist_ok=True)
            summary = {"per_task": True, "overall": pooled(json.loads(e.read_text())["overall"] for e in evals)}
            (out / "eval" / "results.json").write_text(json.dumps(summary, indent=1) + "\n")


# ---------------------------------------------------------------- report


def mean_se(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def fmt(m: float, se: float, digits: int = 2) -> str:
    return f"{m:.{digits}f}" if math.isnan(se) else f"{m:.{digits}f} ± {se:.{digits}f}"


def collect(args, jobs: list[Job]) -> dict:
    tasks = args.tasks.split(",")
    rows, curves = {}, {}
    for job in jobs:
        res = args.out / "evals" / job.name / "results.json"
        key = (job.arm, job.k)
        if res.is_file():
            r = json.loads(res.read_text())
            rows.setdefault(key, []).append(
                {
                    "seed": job.seed,
                    "overall": r["overall"]["success_rate"],
                    "tasks": {t: r["tasks"][t]["success_rate"] for t in tasks},
                    "latency": r.get("latency"),
                    "train_s": _train_seconds(args.out / "runs" / job.name),
                }
            )
        for folder in sorted((args.out / "val" / job.name).glob("step-*")):
            step = int(folder.name.split("-")[1])
            point = {"seed": job.seed, "step": step}
            if (folder / "action_error.json").is_file():
                point.update(json.loads((folder / "action_error.json").read_text()))
            if (folder / "eval" / "results.json").is_file():
                point["val_success"] = json.loads((folder / "eval" / "results.json").read_text())["overall"][
                    "success_rate"
                ]
            curves.setdefault(key, []).append(point)
    return {"tasks": tasks, "rows": rows, "curves": curves}


def _train_seconds(run_dir: Path) -> float | None:
    per_task = [d for d in sorted(run_dir.iterdir()) if (d / "metrics.jsonl").is_file()] if run_dir.is_dir() else []
    if per_task and not (run_dir / "metrics.jsonl").is_file():  # --per-task: the policies' sum
        seconds = [_train_seconds(d) for d in per_task]
        return round(sum(s for s in seconds if s), 1) if any(seconds) else None
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    times = [json.loads(x).get("time") for x in lines if x.strip()]
    times = [t for t in times if t]
    return round(times[-1] - times[0], 1) if len(times) > 1 else None


def report(args, jobs: list[Job]) -> None:
    data = collect(args, jobs)
    tasks, rows, curves = data["tasks"], data["rows"], data["curves"]
    lines = [
        f"# Policy grid: {args.out}",
        "",
        f"Final checkpoints ({args.steps} steps, preset {args.preset}"
        f"{', one policy per task' if args.per_task else ''}), {args.eval_episodes} evaluation "
        f"episodes per task on `wm eval --seed {args.eval_seed}`, at most {args.max_steps} steps, "
        f"{args.camera} camera {args.resolution} px. Rates: mean over training seeds ± standard error "
        f"of that mean (seed to seed).",
        "",
        "| arm | K | seeds | " + " | ".join(t.removesuffix("-v3") for t in tasks) + " | mean | per seed | train min |",
        "|---|---|---|" + "---|" * (len(tasks) + 3),
    ]
    table = {}
    for (arm, k), rs in sorted(rows.items()):
        cells = [fmt(*mean_se([r["tasks"][t] for r in rs])) for t in tasks]
        overall = mean_se([r["overall"] for r in rs])
        per_seed = ", ".join(f"s{r['seed']} {r['overall']:.2f}" for r in sorted(rs, key=lambda r: r["seed"]))
        minutes = [r["train_s"] / 60 for r in rs if r["train_s"]]
        train = f"{sum(minutes) / len(minutes):.0f}" if minutes else "-"
        lines.append(
            f"| {arm} | {k} | {len(rs)} | " + " | ".join(cells) + f" | **{fmt(*overall)}** | {per_seed} | {train} |"
        )
        table[f"{arm}-k{k}"] = {"arm": arm, "k": k, "runs": rs, "mean": overall[0], "se": overall[1]}
    lines += [
        "",
        "Validation (every checkpoint; seeds of neither training nor evaluation): mean over seeds.",
        "",
        "| arm | K | step | held-out action MSE (normalised) | first-action MSE | validation success |",
        "|---|---|---|---|---|---|",
    ]
    for (arm, k), pts in sorted(curves.items()):
        for step in sorted({p["step"] for p in pts}):
            at = [p for p in pts if p["step"] == step]
            mse = [p["action_mse"] for p in at if "action_mse" in p]
            first = [p["first_action_mse"] for p in at if "first_action_mse" in p]
            succ = [p["val_success"] for p in at if "val_success" in p]
            lines.append(
                f"| {arm} | {k} | {step} | {fmt(*mean_se(mse), 4) if mse else '-'} | "
                f"{fmt(*mean_se(first), 4) if first else '-'} | {fmt(*mean_se(succ)) if succ else '-'} |"
            )
    idms = sorted((args.out / "runs").glob("idm-k*-s*/probe/probe.json"))
    if idms:
        lines += [
            "",
            "IDMs of the idm-bc arms (trained on the K demos; `wm probe` on the validation demos):",
            "",
            "| IDM | R² to the true actions (mean over dims) | MSE |",
            "|---|---|---|",
        ]
        for path in idms:
            probe = json.loads(path.read_text())
            r2, mse = probe.get("idm_r2_mean"), probe.get("idm_mse_mean")
            lines.append(
                f"| {path.parent.parent.name} | {'-' if r2 is None else f'{r2:.3f}'} | "
                f"{'-' if mse is None else f'{mse:.4f}'} |"
            )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "table": table,
                "curves": {f"{a}-k{k}": v for (a, k), v in curves.items()},
            },
            indent=1,
        )
        + "\n"
    )
    _plots(args.out, rows, curves)
    print("\n".join(lines))


def _plots(out: Path, rows: dict, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for (arm, k), pts in sorted(curves.items()):
            steps = sorted({p["step"] for p in pts})
            for ax, key in zip(axes, ("action_mse", "val_success")):
                stats = [mean_se([p[key] for p in pts if p["step"] == s and key in p] or [math.nan]) for s in steps]
                ax.errorbar(
                    steps,
                    [m for m, _ in stats],
                    yerr=[0 if math.isnan(e) else e for _, e in stats],
                    marker="o",
                    capsize=3,
                    label=f"{arm} K={k}",
                )
        axes[0].set(xlabel="training step", ylabel="held-out action MSE (normalised)", yscale="log")
        axes[1].set(xlabel="training step", ylabel="validation success", ylim=(0, 1.02))
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "learning_curves.png", dpi=120)
        plt.close(fig)
    if rows:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for arm in sorted({a for a, _ in rows}):
            ks = sorted(k for a, k in rows if a == arm)
            stats = [mean_se([r["overall"] for r in rows[(arm, k)]]) for k in ks]
            ax.errorbar(
                ks,
                [m for m, _ in stats],
                yerr=[0 if math.isnan(e) else e for _, e in stats],
                marker="o",
                capsize=3,
                label=arm,
            )
        ax.set(xlabel="demos per task (K)", ylabel="success (final checkpoint)", ylim=(0, 1.02))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "success_vs_k.png", dpi=120)
        plt.close(fig)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = jobs_of(args)
    stages = set(args.stages.split(","))
    failed = []
    with ThreadPoolExecutor(max_workers=max(args.lanes, 1)) as pool:
        futures = {pool.submit(do_job, args, job, stages): job for job in jobs}
        for future, job in futures.items():
            try:
                future.result()
            except Exception as e:  # one failed job costs that job; the others and the report go on
                failed.append(job.name)
                log.error("%s failed: %s", job.name, e)
    if "report" in stages:
        report(args, jobs)
    if failed:
        log.error("failed jobs: %s", ", ".join(failed))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
