"""Resume and preemption with real processes: `python -m wm_pipeline train`, kill -9, SIGUSR1/SIGTERM."""

import json
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

STEPS = "train.max_steps=120"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return toy_models.make_dataset(tmp_path_factory.mktemp("toy") / "data")


def start(data, run, *overrides):
    cmd = [
        sys.executable,
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
        "train.log_every=10",
        *overrides,
    ]
    return subprocess.Popen(
        cmd, env=toy_models.plugin_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc, timeout=60):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for(predicate, proc, timeout=40.0):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"process ended early ({proc.returncode}): {proc.stdout.read()}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def weights(path):
    return load_file(str(path))


def test_resume_after_sigkill_matches_straight_run(data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = (STEPS, "train.ckpt_every=20", "train.keep_last=10")
    reference = start(data, straight, *args)  # runs beside the one we kill (saves wall time)
    proc = start(data, killed, *args)
    wait_for(lambda: checkpoint.latest_checkpoint(killed) is not None, proc)
    proc.send_signal(signal.SIGKILL)
    code, _ = finish(proc)
    assert code == -signal.SIGKILL
    resumed_at = checkpoint.complete_checkpoints(killed)[-1][0]
    assert resumed_at < 120
    code, out = finish(reference)
    assert code == 0, out

    code, out = finish(start(data, killed, *args))
    assert code == 0, out
    assert f"resuming from {checkpoint.step_dir(killed, resumed_at)} (step {resumed_at} of 120)" in out
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = weights(checkpoint.step_dir(straight, 120) / name)
        b = weights(checkpoint.step_dir(killed, 120) / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")
    # an intermediate state matches too (the data segments after the resume point line up)
    torch.testing.assert_close(
        weights(checkpoint.step_dir(straight, 100) / "model.safetensors"),
        weights(checkpoint.step_dir(killed, 100) / "model.safetensors"),
    )
    # metrics.jsonl: rows the killed run logged after its checkpoint were replaced, not duplicated
    steps = [json.loads(r)["step"] for r in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 121, 10))


def test_sigusr1_checkpoints_exits_75_and_rerun_finishes(data, tmp_path):
    run = tmp_path / "run"
    proc = start(data, run, "train.max_steps=150", "train.ckpt_every=1000", "train.log_every=5")
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().strip(), proc)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # a second signal while the checkpoint is being written
    code, out = finish(proc)
    assert code == exit_codes.PREEMPTED == 75, out
    assert "preempted by SIGUSR1" in out
    found = checkpoint.complete_checkpoints(run)
    assert len(found) == 1 and 5 <= found[0][0] < 150
    step = found[0][0]
    assert not list((run / "checkpoints").glob("*.tmp"))
    status = json.loads((run / "status.json").read_text())
    assert status == {**status, "state": "preempted", "step": step, "exit_code": 75}

    code, out = finish(start(data, run, "train.max_steps=150", "train.ckpt_every=1000"))
    assert code == 0, out
    assert f"(step {step} of 150)" in out
    assert [s for s, _ in checkpoint.complete_checkpoints(run)] == [step, 150]
    assert (run / "final" / "model.safetensors").is_file()
