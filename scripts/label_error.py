"""How wrong a labeller's pseudo-actions are on the corpus it labelled: one sidecar against another of the
same dataset that holds the true actions (``scripts/oracle_labels.py``), per action dim, per task and
per phase of the episode (its first fifth, second fifth, ...) and per outcome: the last ``--tail`` actions
of a successful episode (``wm collect`` records that many after the first success; fewer when the step
limit came first), the rest of it, and failed episodes.

    python scripts/label_error.py --data video --labels grid-idm-k1-s0 --truth oracle --out err.json

``wm probe`` scores an IDM on held-out demos; this scores the labels a decoder actually trains on.
Rows count where both sidecars are valid. Errors in raw action units; R² per dim against the truth's
variance over the rows of that group.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.batch_keys import PSEUDO_ACTION  # noqa: E402
from shards.format import read_manifest  # noqa: E402
from shards.sidecar import read_sidecar  # noqa: E402
from wm_pipeline.cli.commands.collect import EXTRA_STEPS_AFTER_SUCCESS  # noqa: E402
from wm_pipeline.jobs.probe import mean_r2, r2_per_dim  # noqa: E402
from wm_pipeline.training.few_shot import episode_index  # noqa: E402

FIELD = PSEUDO_ACTION


def paired_rows(data: Path, labels: str, truth: str, tail: int = EXTRA_STEPS_AFTER_SUCCESS):
    """(labels [N, A], truth [N, A], task of each row, phase of each row in [0, 1), outcome of each row)
    over every row valid in both sidecars. Outcome: "success, last <tail>" for the last ``tail`` actions of
    a successful episode, "success, before" for its other rows, "failed" or "outcome unknown"."""
    episode = {key: (task, success) for key, task, _, success in episode_index(str(data))}
    pred, true, tasks, phase, outcome = [], [], [], [], []
    for shard in read_manifest(data)["shards"]:
        a, b = read_sidecar(data, labels, shard["name"]), read_sidecar(data, truth, shard["name"])
        for key in sorted(set(a) & set(b)):
            ok = a[key]["valid"] & b[key]["valid"]
            n = len(ok)
            pred.append(a[key][FIELD][ok])
            true.append(b[key][FIELD][ok])
            task, success = episode[key]
            tasks += [task] * int(ok.sum())
            phase.append(np.arange(n)[ok] / n)
            outcome += _outcomes(ok, success, tail)
    if not pred:
        raise SystemExit(f"{data}: sidecars {labels} and {truth} share no labelled samples")
    return np.concatenate(pred), np.concatenate(true), tasks, np.concatenate(phase), outcome


def _outcomes(ok: np.ndarray, success: bool | None, tail: int) -> list[str]:
    """The outcome group of each valid row of one episode (``ok``: its validity per frame; the last
    labelled row is the last valid one, since the final frame has no action)."""
    if success is None:
        return ["outcome unknown"] * int(ok.sum())
    if not success:
        return ["failed"] * int(ok.sum())
    rank_from_end = np.cumsum(ok[::-1])[::-1][ok]  # 1 for the last labelled row
    return [f"success, last {tail}" if r <= tail else "success, before" for r in rank_from_end]


def scores(pred: np.ndarray, true: np.ndarray) -> dict:
    r2 = r2_per_dim(pred, true)
    return {
        "rows": len(pred),
        "mse": float(((pred - true) ** 2).mean()),
        "mse_per_dim": ((pred - true) ** 2).mean(0).round(5).tolist(),
        "r2_per_dim": r2,
        "r2": mean_r2(r2),
    }


def label_error(data: Path, labels: str, truth: str, phases: int = 5, tail: int = EXTRA_STEPS_AFTER_SUCCESS) -> dict:
    pred, true, tasks, phase, outcome = paired_rows(data, labels, truth, tail)
    tasks, outcome = np.array(tasks), np.array(outcome)
    bins = np.minimum((phase * phases).astype(int), phases - 1)
    return {
        "data": str(data),
        "labels": labels,
        "truth": truth,
        "total": scores(pred, true),
        "per_task": {t: scores(pred[tasks == t], true[tasks == t]) for t in sorted(set(tasks))},
        "per_phase": [scores(pred[bins == i], true[bins == i]) for i in range(phases)],
        "per_outcome": {o: scores(pred[outcome == o], true[outcome == o]) for o in sorted(set(outcome))},
    }


def format_table(result: dict) -> str:
    def line(name: str, s: dict) -> str:
        r2 = " ".join("  -  " if v is None else f"{v:5.2f}" for v in s["r2_per_dim"])
        return f"| {name} | {s['rows']} | {s['mse']:.4f} | {r2} |"

    out = [f"labels {result['labels']} against {result['truth']} on {result['data']}", ""]
    out += ["| rows | n | MSE | R² per dim |", "|---|---|---|---|", line("all", result["total"])]
    out += [line(t, s) for t, s in result["per_task"].items()]
    n = len(result["per_phase"])
    out += [line(f"phase {i}/{n}", s) for i, s in enumerate(result["per_phase"])]
    out += [line(o, s) for o, s in result["per_outcome"].items()]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="the labelled dataset")
    p.add_argument("--labels", required=True, help="the sidecar to score")
    p.add_argument("--truth", default="oracle", help="the sidecar of true actions")
    p.add_argument("--phases", type=int, default=5, help="phase bins per episode")
    p.add_argument(
        "--tail", type=int, default=EXTRA_STEPS_AFTER_SUCCESS, help="actions after the success (wm collect's)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    result = label_error(args.data, args.labels, args.truth, args.phases, args.tail)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
