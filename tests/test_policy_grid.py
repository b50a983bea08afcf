"""scripts/policy_grid.py end to end on real Meta-World demos: two training seeds of one arm, every
checkpoint validated (held-out action error + closed-loop validation episodes), the final checkpoint
evaluated, one table with standard errors and the plots; a rerun resumes without redoing anything.
Also wm_pipeline.jobs.action_error: a trained decoder's chunks are closer to the demos than an untrained one's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wm_pipeline.cli.main import main
from wm_pipeline.exit_codes import UsageError
from wm_pipeline.jobs.action_error import held_out_action_error

ROOT = Path(__file__).resolve().parents[1]


def grid_cmd(out: Path, demos: Path, arm: str, **flags) -> list[str]:
    """``scripts/policy_grid.py`` at 32 px on ``demos``: ``flags`` are its options (``ks=2`` ->
    ``--ks 2``; ``per_task=True`` -> ``--per-task``)."""
    cmd = [sys.executable, str(ROOT / "scripts" / "policy_grid.py"), "--out", str(out), "--demos", str(demos)]
    cmd += ["--arm", arm, "--resolution", "32"]
    for key, value in flags.items():
        cmd += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return cmd


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grid") / "demos"
    assert (
        main(
            [
                "collect",
                "metaworld",
                "--tasks",
                "reach-v3",
                "--episodes",
                "3",
                "--resolution",
                "32",
                "--seed",
                "0",
                "--max-steps",
                "100",
                "--out",
                str(root),
            ]
        )
        == 0
    )
    return root


@pytest.mark.slow
def test_policy_grid_trains_validates_evaluates_and_resumes(demos, tmp_path):
    out = tmp_path / "grid"
    cmd = grid_cmd(
        out,
        demos,
        "mf=policy=scratch model.objective=meanflow model.augment_shift=2 model.n_obs_steps=1",
        val_demos=demos,
        tasks="reach-v3",
        ks=2,
        seeds="0,1",
        steps=200,
        ckpt_every=100,
        eval_episodes=2,
        val_episodes=1,
        max_steps=15,
        lanes=2,
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    for seed in (0, 1):
        run = out / "runs" / f"mf-k2-s{seed}"
        assert json.loads((run / "status.json").read_text())["state"] == "finished"
        assert json.loads((out / "evals" / f"mf-k2-s{seed}" / "results.json").read_text())["episodes_per_task"] == 2
        steps = sorted(p.name for p in (out / "val" / f"mf-k2-s{seed}").iterdir())
        assert steps == ["step-0000100", "step-0000200"]
        for step in steps:
            folder = out / "val" / f"mf-k2-s{seed}" / step
            assert json.loads((folder / "action_error.json").read_text())["windows"] > 0
            assert (folder / "eval" / "results.json").is_file()
    table = (out / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| mf | 2 | 2 |"))
    assert "±" in row and "s0 " in row and "s1 " in row  # mean ± SE over the two seeds
    assert (out / "learning_curves.png").stat().st_size > 0 and (out / "success_vs_k.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["table"]["mf-k2"]["runs"]) == 2 and len(results["curves"]["mf-k2"]) == 4

    # A rerun finds every stage done: no new command in any log.
    logs = {p: p.read_text() for p in (out / "logs").iterdir()}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.read_text() for p in (out / "logs").iterdir()} == logs

    # The held-out action error can tell a trained decoder from an untrained one.
    from decoders.decoder import ActionDecoder

    trained = out / "val" / "mf-k2-s0" / "step-0000200" / "policy"
    untrained = ActionDecoder(ActionDecoder.from_pretrained(str(trained)).config)
    torch.manual_seed(0)
    untrained.save_pretrained(tmp_path / "untrained")
    before = held_out_action_error(tmp_path / "untrained", demos)["action_mse"]
    after = held_out_action_error(trained, demos)["action_mse"]
    assert after < 0.8 * before, (after, before)


@pytest.mark.slow
def test_policy_grid_idm_bc_arm_trains_probes_and_labels_one_idm_per_k_and_seed(demos, tmp_path):
    """An idm-bc arm: the grid trains the IDM of (K, seed) on those K demos, probes it on the validation
    demos, labels the action-free corpus under its own name and trains the decoder on demos + video."""
    video = tmp_path / "video"
    assert (
        main(
            [
                "collect",
                "metaworld",
                "--tasks",
                "reach-v3",
                "--episodes",
                "4",
                "--resolution",
                "32",
                "--seed",
                "1000",
                "--max-steps",
                "40",
                "--drop-actions",
                "--out",
                str(video),
            ]
        )
        == 0
    )
    out = tmp_path / "grid"
    cmd = grid_cmd(
        out,
        demos,
        "bc=policy=idm-bc model.objective=meanflow model.n_obs_steps=1",
        val_demos=demos,
        video=video,
        idm_steps=30,
        tasks="reach-v3",
        ks=2,
        seeds=0,
        steps=40,
        ckpt_every=40,
        eval_episodes=1,
        val_episodes=0,
        max_steps=10,
        lanes=1,
        stages="train,report",
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    idm = out / "runs" / "idm-k2-s0"
    assert json.loads((idm / "status.json").read_text())["state"] == "finished"
    assert "2 demos per task" in (out / "logs" / "train-idm-k2-s0.log").read_text()
    assert json.loads((idm / "probe" / "probe.json").read_text())
    assert (video / "labels" / f"{out.name}-idm-k2-s0").is_dir() and not (video / "labels" / "idm").exists()
    run = out / "runs" / "bc-k2-s0"
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    logged = (out / "logs" / "train-bc-k2-s0.log").read_text()
    assert f"--data {video} --labels {out.name}-idm-k2-s0" in logged
    assert "| idm-k2-s0 |" in (out / "results.md").read_text()  # the IDM's probe R² in the table


@pytest.mark.slow
def test_policy_grid_per_task_trains_one_policy_per_task_and_merges_their_evaluations(tmp_path):
    """--per-task: runs/<job>/<task> trained on that task only (data.tasks), evaluated on it; the
    evaluations merge into the job's results.json, which the table reads as for one policy. Each
    checkpoint is validated on its own task's demos, merged per step for the learning curves."""
    demos = tmp_path / "demos"
    assert (
        main(
            [
                "collect",
                "metaworld",
                "--tasks",
                "reach-v3,button-press-v3",
                "--episodes",
                "1",
                "--resolution",
                "32",
                "--seed",
                "0",
                "--max-steps",
                "150",
                "--out",
                str(demos),
            ]
        )
        == 0
    )
    out = tmp_path / "grid"
    cmd = grid_cmd(
        out,
        demos,
        "mf=policy=scratch model.objective=meanflow model.n_obs_steps=1",
        val_demos=demos,
        tasks="reach-v3,button-press-v3",
        ks=1,
        seeds=0,
        per_task=True,
        steps=20,
        ckpt_every=20,
        eval_episodes=1,
        val_episodes=1,
        max_steps=5,
        lanes=1,
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tasks = ("reach-v3", "button-press-v3")
    for task in tasks:
        config = json.loads((out / "runs" / "mf-k1-s0" / task / "final" / "config.json").read_text())
        assert config["tasks"] == [task]  # trained on that task's demos only
    merged = json.loads((out / "evals" / "mf-k1-s0" / "results.json").read_text())
    assert sorted(merged["tasks"]) == ["button-press-v3", "reach-v3"] and merged["overall"]["episodes"] == 2
    row = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| mf | 1 | 1 |"))
    assert "one policy per task" in (out / "results.md").read_text() and "s0 " in row

    # Validation per task: each policy on its own task's windows; the merged step pools them all.
    val = out / "val" / "mf-k1-s0"
    windows = {t: json.loads((val / t / "step-0000020" / "action_error.json").read_text())["windows"] for t in tasks}
    assert all(n > 0 for n in windows.values())
    policy = val / "reach-v3" / "step-0000020" / "policy"
    assert held_out_action_error(policy, demos)["windows"] == sum(windows.values())  # unfiltered: both tasks
    merged = json.loads((val / "step-0000020" / "action_error.json").read_text())
    assert merged["windows"] == sum(windows.values())
    assert json.loads((val / "step-0000020" / "eval" / "results.json").read_text())["overall"]["episodes"] == 2
    assert len(json.loads((out / "results.json").read_text())["curves"]["mf-k1"]) == 1
    with pytest.raises(UsageError, match="door-open-v3"):
        held_out_action_error(policy, demos, tasks=["door-open-v3"])


def test_policy_grid_idm_bc_arm_that_names_its_own_labels_trains_no_idm(tmp_path):
    """``--arm "NAME=policy=idm-bc --data VIDEO --labels oracle ..."`` reads that sidecar: the grid adds no
    IDM (and needs no --video) for it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import policy_grid

    arm = "o=policy=idm-bc --data video --labels oracle model.objective=meanflow"
    args = policy_grid.parse_args(
        ["--out", str(tmp_path / "g"), "--demos", "d", "--tasks", "reach-v3", "--seeds", "0", "--arm", arm]
    )
    (job,) = policy_grid.jobs_of(args)
    assert policy_grid.idm_labels(args, job) == [] and not (tmp_path / "g").exists()
    plain = policy_grid.parse_args(
        ["--out", str(tmp_path / "g"), "--demos", "d", "--tasks", "reach-v3", "--arm", "b=policy=idm-bc"]
    )
    with pytest.raises(SystemExit, match="--video"):
        policy_grid.idm_labels(plain, policy_grid.jobs_of(plain)[0])
