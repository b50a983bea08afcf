"""The demo's report: `DIR/report.md` with a results table, plots, rollout videos and the exact commands.

Reads only what the stages wrote: `runs/*/metrics.jsonl`, `runs/*/config.yaml`, `evals/*/results.json`,
`evals/probe-*/probe.json` (+ PNG), `evals/worldmodel/eval.json` (+ PNG) and `demo_state.json`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from wm_pipeline.run_folder import CONFIG, METRICS  # noqa: E402


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _metrics(run: Path) -> list[dict[str, Any]]:
    path = run / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s" if m else f"{sec} s"


def plot_training_curves(runs_dir: Path, path: Path) -> list[str]:
    runs = [r for r in sorted(runs_dir.iterdir()) if r.is_dir() and _metrics(r)] if runs_dir.exists() else []
    if not runs:
        return []
    cols = min(3, len(runs))
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, run in zip(axes.flat, runs):
        rows_ = _metrics(run)
        keys = [
            k for k in ("loss", "loss_action", "loss_video", "recon_loss", "copy_loss") if any(k in r for r in rows_)
        ]
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows_ if k in r and r[k] is not None]
            if pts:
                ax.plot(*zip(*pts), label=k, lw=1.2)
        ax.set_title(run.name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [r.name for r in runs]


def plot_success(results: dict[str, dict], tasks: list[str], path: Path) -> None:
    policies = list(results)
    width = 0.8 / max(1, len(policies))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks) * max(1, len(policies)) / 2, 3.4))
    for i, policy in enumerate(policies):
        rates = [results[policy]["tasks"].get(t, {}).get("success_rate", 0.0) for t in tasks]
        xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(tasks))]
        bars = ax.bar(xs, rates, width, label=policy)
        for b, r in zip(bars, rates):
            ax.text(b.get_x() + b.get_width() / 2, r + 0.01, f"{r:.2f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("success rate")
    ax.legend(fontsize=8, ncol=min(5, len(policies)))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _latency(r: dict) -> str:
    lat = r.get("latency")
    return f"{lat['median_ms']:.1f} / {lat['p95_ms']:.1f}" if lat else "-"


def write_report(out: Path, profile, stages) -> Path:
    out = Path(out)
    state = _read_json(out / "demo_state.json") or {}
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    evals = out / "evals"
    tasks = list(profile.tasks)
    lines: list[str] = []
    add = lines.append

    add(f"# wm demo report: profile `{profile.name}`\n")
    total = sum(v.get("seconds", 0) for v in state.get("stages", {}).values())
    add(
        f"Tasks: {', '.join(tasks)}. {profile.demos_per_task} demos per task (seeds {0}..), "
        f"{profile.video_per_task} action-free episodes per task, {profile.eval_episodes} evaluation episodes "
        f"per task and policy on unseen seeds (100000..), {profile.max_steps} steps at most, "
        f"{profile.resolution} px corner camera, `{profile.preset}` models"
        + "".join(f", `{v}` {k}" for k, v in profile.presets.items())
        + ".  "
    )
    add(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}; "
        f"stages took {_fmt_seconds(total)} in all. Written {time.strftime('%Y-%m-%d %H:%M')}.\n"
    )

    # ---- closed-loop results
    results = {p: _read_json(evals / p / "results.json") for p in ["expert", *profile.policies]}
    results = {k: v for k, v in results.items() if v}
    if results:
        add("## Closed-loop success (final checkpoints)\n")
        add(
            "| policy | "
            + " | ".join(tasks)
            + " | overall | mean length | latency per chunk, median / p95 (ms) | training time |"
        )
        add("|---" * (len(tasks) + 5) + "|")
        for policy, r in results.items():
            cells = [f"{r['tasks'][t]['success_rate']:.2f}" if t in r["tasks"] else "-" for t in tasks]
            train_time = state.get("stages", {}).get(f"train policy {policy}", {}).get("seconds")
            add(
                f"| {policy} | " + " | ".join(cells) + f" | **{r['overall']['success_rate']:.2f}** | "
                f"{r['overall']['mean_length']:.0f} | {_latency(r)} | {_fmt_seconds(train_time)} |"
            )
        plot_success(results, tasks, plots / "success.png")
        add("\n![success rate per task and policy](plots/success.png)\n")
        add("Rollout videos (first episodes of each task):\n")
        for policy in results:
            vids = [v for t in tasks for v in sorted((evals / policy / "videos").glob(f"{t}_*.mp4"))[:2]]
            if vids:
                add(f"- {policy}: " + ", ".join(f"[{v.stem}]({v.relative_to(out)})" for v in vids))
        add("")

    # ---- labellers
    for name, title in (("probe-lam", "Latent-action model"), ("probe-idm", "Inverse-dynamics model")):
        probe = _read_json(evals / name / "probe.json")
        if not probe:
            continue
        add(f"## {title}: label quality (`wm probe`)\n")
        add("| metric | value |\n|---|---|")
        for k, v in _flatten(probe).items():
            if isinstance(v, (int, float)):
                add(f"| {k} | {v:.4g} |")
        for png in sorted((evals / name).glob("*.png")):
            add(f"\n![{name}]({png.relative_to(out)})")
        add("")

    # ---- world model
    wm = _read_json(evals / "worldmodel" / "metrics.json")
    if wm:
        add("## World model (`wm worldmodel eval`, held-out episodes)\n")
        add("| metric | value |\n|---|---|")
        for k, v in _flatten(wm).items():
            if isinstance(v, (int, float)):
                add(f"| {k} | {v:.4g} |")
        for png in sorted((evals / "worldmodel").glob("*.png")):
            add(f"\n![world model: context | predicted | true]({png.relative_to(out)})")
        add("")

    # ---- training
    names = plot_training_curves(out / "runs", plots / "training_curves.png")
    if names:
        add("## Training curves\n")
        add("![training curves](plots/training_curves.png)\n")

    add("## Stages and the commands that reproduce them\n")
    add("| stage | time |\n|---|---|")
    for stage in stages:
        add(f"| {stage.name} | {_fmt_seconds(state.get('stages', {}).get(stage.name, {}).get('seconds'))} |")
    add("\n```bash")
    for stage in stages:
        add(f"# {stage.name}")
        for cmd in state.get("stages", {}).get(stage.name, {}).get("commands", []):
            add(cmd)
    add("```\n")
    configs = sorted((out / "runs").glob(f"*/{CONFIG}"))
    if configs:
        add("Resolved configs: " + ", ".join(f"[{c.parent.name}]({c.relative_to(out)})" for c in configs) + ".\n")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            flat.update(
                _flatten(
                    v,
                    f"{prefix}{k}." if not isinstance(v, (int, float, str, bool)) and v is not None else f"{prefix}{k}",
                )
            )
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        flat[prefix.rstrip(".")] = d
    return flat
