"""Two-rank DDP on the CPU with real torchrun (gloo): disjoint data, weights in sync, joint preemption."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import toy_models
from wm_pipeline import exit_codes
from wm_pipeline.training import checkpoint

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 4 shards: with 2 ranks x 0 workers each rank walks its own 2 shards
    return toy_models.make_dataset(tmp_path_factory.mktemp("toy") / "data", episodes=8, per_shard=2)


def torchrun(data, run, *overrides):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "wm_pipeline",
        "train",
        "toy",
        "--data",
        str(data),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "train.progress=false",
        "train.log_every=5",
        f"model.record_keys_to={run / 'seen'}",
        *overrides,
    ]
    return subprocess.Popen(
        cmd, env=toy_models.plugin_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def seen(run, rank):
    path = run / f"seen.rank{rank}"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_two_ranks_see_disjoint_data_and_stay_in_sync(data, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(
        data, run, "train.max_steps=20", "train.ckpt_every=10", "train.eval_every=10", "train.eval_batches=1"
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    rows = [seen(run, 0), seen(run, 1)]
    assert len(rows[0]) == len(rows[1]) == 20  # every rank did every step
    assert rows[0][0]["pid"] != rows[1][0]["pid"]
    episodes = [{k.split("@")[0] for r in rank_rows for k in r["keys"]} for rank_rows in rows]
    assert episodes[0] and episodes[1] and not episodes[0] & episodes[1], episodes
    # identical weights before every step: DDP averaged the gradients and both stepped alike
    assert [r["param_sum"] for r in rows[0]] == [r["param_sum"] for r in rows[1]]
    assert len({r["param_sum"] for r in rows[0]}) == 20  # and they did change
    ck = checkpoint.step_dir(run, 20)
    assert (ck / "rng-rank00000.safetensors").is_file() and (ck / "rng-rank00001.safetensors").is_file()
    assert json.loads((ck / "trainer_state.json").read_text())["world_size"] == 2
    # rank 0 alone logs; its lines reach torchrun's output once
    assert out.count("step 20/20 |") == 1 and "samples/s" in out
    assert (run / "final" / "model.safetensors").is_file()
    evals = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if "eval/loss" in r]
    assert [r["step"] for r in evals] == [10, 20]  # eval of the EMA model, averaged over ranks
    final = load_file(str(ck / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())


def test_signal_to_one_rank_stops_all_and_resumes(data, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(data, run, "train.max_steps=5000", "train.ckpt_every=5000")
    deadline = time.time() + 90
    while len(seen(run, 1)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    os.kill(seen(run, 1)[0]["pid"], signal.SIGUSR1)  # only rank 1 is told
    out, _ = proc.communicate(timeout=120)
    # torchrun itself exits 1 when workers exit non-zero, and lists each worker's code
    assert proc.returncode == 1, out
    assert out.count(f"exitcode  : {exit_codes.PREEMPTED} ") == 2, out
    found = checkpoint.complete_checkpoints(run)
    assert len(found) == 1, out
    step = found[0][0]
    assert len(seen(run, 0)) == len(seen(run, 1)) == step  # both ranks stopped after the same step
    assert "preempted by a signal on another rank" in out and "preempted by SIGUSR1" in out
    assert json.loads((run / "status.json").read_text())["state"] == "preempted"

    proc = torchrun(data, run, f"train.max_steps={step + 3}", "train.ckpt_every=5000")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"(step {step} of {step + 3})" in out
    assert len(seen(run, 0)) == len(seen(run, 1)) == step + 3
    assert seen(run, 0)[-1]["param_sum"] == seen(run, 1)[-1]["param_sum"]
