"""The sbatch scripts, submitted to a real one-node Slurm cluster started on this machine.

Skipped (with the reason) where Slurm cannot be installed. Selected with ``-m slurm``; takes
about two minutes: tiny presets on the CPU, torchrun with 2 ranks on gloo.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import SlurmCluster, SlurmUnavailable  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def wm(*argv: str) -> None:
    """The data and the labeller the scripts are given, made by the same main() in this process (a fresh
    interpreter would cost seconds of imports each); the sbatch jobs themselves are real processes."""
    from wm_pipeline.cli.main import main

    assert main(list(argv)) == 0, f"wm {' '.join(argv)} failed"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    try:
        with SlurmCluster(root / "cluster") as c:
            c.env.update(
                WM_PYTHON=sys.executable,
                WM_SLURM_DIR=str(REPO / "slurm"),
                OMP_NUM_THREADS="1",
                MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"),
            )
            yield c
    except SlurmUnavailable as e:
        pytest.skip(f"no local Slurm cluster: {e}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Demos (2 tasks x 2 episodes) and an action-free corpus of 4 one-episode shards."""
    root = tmp_path_factory.mktemp("slurm-data")
    wm(
        "collect",
        "metaworld",
        "--tasks",
        "reach-v3,push-v3",
        "--episodes",
        "2",
        "--max-steps",
        "40",
        "--resolution",
        "32",
        "--out",
        str(root / "demos"),
    )
    wm(
        "collect",
        "metaworld",
        "--tasks",
        "reach-v3,push-v3",
        "--episodes",
        "2",
        "--max-steps",
        "40",
        "--resolution",
        "32",
        "--seed",
        "1000",
        "--drop-actions",
        "--samples-per-shard",
        "1",
        "--out",
        str(root / "video"),
    )
    return root


def submit(cluster: SlurmCluster, script: str, out: Path, env: dict[str, str], *args: str) -> int:
    return cluster.sbatch([*args, f"--output={out}", f"--chdir={REPO}", str(REPO / "slurm" / script)], env=env)


def test_pretrain_two_ranks_finishes_and_checkpoint_loads(cluster, data, tmp_path):
    run = tmp_path / "wm"
    env = dict(
        WM_DATA=f"{data / 'demos'},{data / 'video'}",
        WM_RUN=str(run),
        WM_MODEL="worldmodel",
        WM_PRESET="tiny",
        WM_NPROC="2",
        WM_PORT="29611",
        WM_ARGS="train.max_steps=12 train.ckpt_every=6 data.batch_size=2 data.num_workers=0",
    )
    job = submit(cluster, "pretrain.sbatch", tmp_path / "job.out", env)
    state = cluster.wait(job, timeout=240)
    log = (tmp_path / "job.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert "nproc/node=2" in log
    from worldmodel.uwm import WorldModel

    model = WorldModel.from_pretrained(str(run / "final"))
    assert sum(p.numel() for p in model.parameters()) > 0
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 12


def test_label_array_covers_every_shard_once(cluster, data, tmp_path):
    lam = tmp_path / "lam"
    wm(
        "train",
        "lam",
        "--data",
        str(data / "video"),
        "--out",
        str(lam),
        "--preset",
        "tiny",
        "train.max_steps=4",
        "data.batch_size=2",
        "data.num_workers=0",
    )
    env = dict(WM_LABELLER=str(lam), WM_DATA=str(data / "video"), WM_NAME="lam_slurm")
    job = submit(cluster, "label.sbatch", tmp_path / "label-%a.out", env, "--array=0-2%2")
    rows = cluster.wait_array(job, timeout=240)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("label-*.out")))
    assert len(rows) == 3 and all(r["JobState"] == "COMPLETED" for r in rows), logs[-3000:]
    manifest = json.loads((data / "video" / "manifest.json").read_text())
    shards = [s["name"] for s in manifest["shards"]]
    side = data / "video" / "labels" / "lam_slurm"
    done = sorted(p.name.replace(".stats.json", ".tar") for p in side.glob("shard-*.stats.json"))
    assert done == sorted(shards)
    # every shard was labelled by exactly one array task: the ranges' sizes add up to the shard count,
    # none found work already done, and every shard is complete
    ranges = [
        re.search(r"labelling (\d+) of (\d+) shards \((\d+) already done\)", p.read_text())
        for p in sorted(tmp_path.glob("label-*.out"))
    ]
    assert all(ranges), logs[-3000:]
    assert sum(int(m.group(2)) for m in ranges) == len(shards)
    assert all(m.group(1) == m.group(2) and m.group(3) == "0" for m in ranges)
    # resubmitting is safe: nothing is redone, the sidecars stay byte-identical
    before = {p.name: p.read_bytes() for p in side.glob("shard-*.tar")}
    job = submit(cluster, "label.sbatch", tmp_path / "again-%a.out", env, "--array=0-2")
    rows = cluster.wait_array(job, timeout=240)
    assert all(r["JobState"] == "COMPLETED" for r in rows)
    assert {p.name: p.read_bytes() for p in side.glob("shard-*.tar")} == before


def test_pretrain_preempted_requeues_and_resumes(cluster, data, tmp_path):
    run = tmp_path / "wm"
    env = dict(
        WM_DATA=str(data / "demos"),
        WM_RUN=str(run),
        WM_MODEL="worldmodel",
        WM_PRESET="tiny",
        WM_NPROC="1",
        WM_PORT="29612",
        WM_ARGS="train.max_steps=400 train.ckpt_every=50 data.batch_size=2 data.num_workers=0",
    )
    out = tmp_path / "job.out"
    job = submit(cluster, "pretrain.sbatch", out, env)
    deadline = time.time() + 180
    while time.time() < deadline and not list((run / "checkpoints").glob("step-*")):
        time.sleep(1)
    assert list((run / "checkpoints").glob("step-*")), "no checkpoint before the signal"
    cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    state = cluster.wait(job, timeout=400)
    log = out.read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert "requeueing" in log and "restart=1" in log, log[-3000:]
    assert int(state.get("Restarts", "0")) >= 1
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 400
    assert (run / "final" / "config.json").exists()


def test_finetune_and_eval_scripts(cluster, data, tmp_path):
    run = tmp_path / "dec"
    env = dict(
        WM_DATA=str(data / "demos"),
        WM_RUN=str(run),
        WM_PRESET="tiny",
        WM_ARGS="train.max_steps=6 data.batch_size=2 data.num_workers=0",
    )
    job = submit(cluster, "finetune.sbatch", tmp_path / "ft.out", env, "--gpus=0")
    state = cluster.wait(job, timeout=240)
    assert state["JobState"] == "COMPLETED", (tmp_path / "ft.out").read_text()[-3000:]
    assert (run / "final" / "config.json").exists()
    env = dict(
        WM_POLICY=str(run),
        WM_OUT=str(tmp_path / "eval"),
        WM_TASKS="reach-v3",
        WM_EPISODES="1",
        WM_ARGS="--max-steps 20 --resolution 32",
    )
    job = submit(cluster, "eval.sbatch", tmp_path / "ev.out", env, "--gpus=0")
    state = cluster.wait(job, timeout=240)
    assert state["JobState"] == "COMPLETED", (tmp_path / "ev.out").read_text()[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["overall"]["episodes"] == 1
