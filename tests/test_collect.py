"""`wm collect metaworld`: real scripted-expert rollouts written as shards (64 px, reach-v3)."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from shards.format import read_manifest
from wm_pipeline.cli.main import main


def _collect(out: Path, *extra: str) -> int:
    return main(
        [
            "collect",
            "metaworld",
            "--tasks",
            "reach-v3",
            "--episodes",
            "2",
            "--resolution",
            "64",
            "--seed",
            "3",
            "--samples-per-shard",
            "1",
            "--out",
            str(out),
            *extra,
        ]
    )


def _members(root: Path) -> dict[str, bytes]:
    """Every member of every shard of ``root``: {member name: bytes}."""
    out = {}
    for shard in sorted(root.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                out[m.name] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    root = tmp_path_factory.mktemp("collect")
    assert _collect(root / "a") == 0
    return root


def test_collect_writes_episodes_with_task_and_success(collected):
    a = collected / "a"
    manifest = read_manifest(a)
    assert manifest["totals"]["samples"] == 2 and manifest["tasks"] == {"reach-v3": 2}
    sawyer = manifest["embodiments"]["sawyer"]
    assert sawyer["action_dim"] == 4 and sawyer["state_dim"] == 39 and sawyer["fps"] == pytest.approx(80.0)
    assert manifest["resolution"] == [64, 64] and manifest["cameras"] == ["corner"]
    members = _members(a)
    for i in range(2):
        key = f"reach-v3_{i:06d}"
        meta = json.loads(members[f"{key}.meta.json"])
        action = np.load(io.BytesIO(members[f"{key}.action.npy"]))
        state = np.load(io.BytesIO(members[f"{key}.state.npy"]))
        assert meta["task"] == "reach-v3" and meta["success"] is True and meta["has_action"]
        assert meta["seed"] == 3 + i and meta["episode_index"] == i
        assert meta["instruction"] == "Reach the goal position."
        assert action.shape == (meta["n_frames"], 4) and state.shape == (meta["n_frames"], 39)
        assert action.dtype == np.float32 and np.abs(action).max() <= 1.0
        # stops a few steps after the first success, well before --max-steps
        assert meta["n_frames"] == meta["extra"]["first_success_step"] + 10 < 200
    first = np.load(io.BytesIO(members["reach-v3_000000.state.npy"]))[0]
    second = np.load(io.BytesIO(members["reach-v3_000001.state.npy"]))[0]
    assert not np.array_equal(first[-3:], second[-3:])  # seeds 3 and 4: different goals


def test_collect_is_deterministic(collected):
    assert _collect(collected / "b") == 0
    a, b = _members(collected / "a"), _members(collected / "b")
    assert sorted(a) == sorted(b)
    for name in a:  # actions/states bit-exact, and identical video bytes
        assert a[name] == b[name], name
    assert (collected / "a" / "manifest.json").read_bytes() == (collected / "b" / "manifest.json").read_bytes()


def test_drop_actions_writes_the_same_video_without_actions(collected):
    out = collected / "video_only"
    assert _collect(out, "--drop-actions") == 0
    with_actions, video_only = _members(collected / "a"), _members(out)
    assert not [n for n in video_only if n.endswith((".action.npy", ".state.npy"))]
    for i in range(2):
        key = f"reach-v3_{i:06d}"
        meta = json.loads(video_only[f"{key}.meta.json"])
        assert not meta["has_action"] and meta["action_dim"] == 0 and meta["embodiment"] == "sawyer"
        assert video_only[f"{key}.corner.mp4"] == with_actions[f"{key}.corner.mp4"]
    assert read_manifest(out)["embodiments"]["sawyer"]["action_dim"] == 0


def test_unknown_task_lists_valid_names_exit_2(tmp_path):
    env = dict(os.environ, MUJOCO_GL="egl")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wm_pipeline",
            "collect",
            "metaworld",
            "--tasks",
            "reach-v3,fly-v3",
            "--episodes",
            "1",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "fly-v3" in proc.stderr and "push-v3" in proc.stderr and "valid tasks" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()  # nothing was written


def test_action_noise_changes_the_motion_and_is_seeded(collected):
    out = collected / "noisy"
    assert _collect(out, "--action-noise", "0.5", "--max-steps", "30") == 0
    again = collected / "noisy2"
    assert _collect(again, "--action-noise", "0.5", "--max-steps", "30") == 0
    assert _members(out) == _members(again)  # the noise comes from the episode seed
    expert, noisy = _members(collected / "a"), _members(out)
    key = "reach-v3_000000"
    meta = json.loads(noisy[f"{key}.meta.json"])
    assert meta["extra"]["policy"] == "scripted-expert+gaussian(0.5)"
    a_expert = np.load(io.BytesIO(expert[f"{key}.action.npy"]))
    a_noisy = np.load(io.BytesIO(noisy[f"{key}.action.npy"]))
    assert np.abs(a_noisy).max() <= 1.0
    # the recorded actions are the executed, noisy ones: far from the expert's from the first step
    diff = a_noisy[:10] - a_expert[:10]
    assert 0.25 < diff.std() < 0.75, diff.std()
    assert noisy[f"{key}.corner.mp4"] != expert[f"{key}.corner.mp4"]
    assert _collect(collected / "bad", "--action-noise", "-1") == 2


def test_noise_hold_keeps_each_draw_for_k_steps(collected):
    """--noise-hold 5: executed action = expert(state) + a perturbation redrawn every 5 steps (small noise,
    so clipping stays rare; where an action is clipped the check skips it)."""
    from wm_pipeline.jobs.policy import ExpertPolicy

    out = collected / "held"
    assert _collect(out, "--action-noise", "0.1", "--noise-hold", "5", "--max-steps", "20") == 0
    noisy = _members(out)
    key = "reach-v3_000000"
    assert json.loads(noisy[f"{key}.meta.json"])["extra"]["policy"] == "scripted-expert+gaussian(0.1, held 5 steps)"
    action = np.load(io.BytesIO(noisy[f"{key}.action.npy"]))
    state = np.load(io.BytesIO(noisy[f"{key}.state.npy"]))
    expert = ExpertPolicy()
    offset = np.stack([action[t] - expert.act({"task": "reach-v3", "state": state[t]}) for t in range(20)])
    inside = np.abs(action) < 0.999
    blocks = [offset[b : b + 5][inside[b : b + 5].all(1)] for b in range(0, 20, 5)]
    for blk in blocks:  # constant within a block
        assert len(blk) >= 2 and np.abs(blk - blk[0]).max() < 1e-4
    assert np.abs(blocks[0][0] - blocks[1][0]).max() > 1e-3  # redrawn between blocks
    assert _collect(collected / "bad2", "--action-noise", "0.1", "--noise-hold", "0") == 2
