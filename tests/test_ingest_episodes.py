"""`wm ingest episodes` for npz and robomimic hdf5 demos: round trips and bad data (LeRobot: test_ingest_lerobot.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np

from shards.format import read_manifest
from wm_pipeline.cli.main import main


def wm(*args: str, check_rc: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "wm_pipeline", *args], capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def wm_here(capsys, *args: str, check_rc: int) -> subprocess.CompletedProcess:
    """``wm`` run by the same ``main()`` in this process (a fresh interpreter costs seconds; the round trips
    above run real ones). An exception escapes to the test instead of printing a traceback."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse errors, as `python -m wm_pipeline` ends with them
        code = e.code
    out, err = capsys.readouterr()
    assert code == check_rc, out + err
    return subprocess.CompletedProcess(list(args), code, out, err)


def read_samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for s in read_manifest(out)["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            for m in tar:
                key, _, suffix = m.name.partition(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    return samples


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def by_source(samples: dict) -> dict[str, dict]:
    return {json.loads(m["meta.json"])["source"]: m for m in samples.values()}


def failures(out: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    return {Path(r["source"]).name: r["reason"] for r in rows}


def episode(rng, t: int, a: int = 4, s: int = 7, size: int = 32) -> dict[str, np.ndarray]:
    return {
        "frames": rng.integers(0, 255, (t, size, size, 3), dtype=np.uint8),
        "action": rng.normal(size=(t, a)).astype(np.float32),
        "state": rng.normal(size=(t, s)).astype(np.float32),
    }


def test_npz_round_trip_is_bit_exact_and_bad_episodes_fail(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "demos"
    src.mkdir()
    good = {}
    for i in range(3):
        ep = episode(rng, 10 + i)
        np.savez(src / f"ep{i}.npz", **ep, task="push-v3", instruction="push the puck", success=i != 1)
        good[str(src / f"ep{i}.npz")] = ep
    np.savez(
        src / "wrist_cam.npz",
        wrist_image=rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8),
        actions=np.ones((6, 4), np.float32),
        fps=np.float64(20),
        embodiment="sawyer",
    )
    ep = episode(rng, 10)
    np.savez(src / "x_len.npz", frames=ep["frames"], action=ep["action"][:9])
    nan = ep["action"].copy()
    nan[4, 2] = np.nan
    np.savez(src / "x_nan.npz", frames=ep["frames"], action=nan)
    np.savez(src / "y_dim.npz", frames=ep["frames"], action=np.zeros((10, 3), np.float32))  # robot has A=4
    np.savez(src / "y_noaction.npz", frames=ep["frames"])
    (src / "z_junk.npz").write_bytes(b"this is not a zip archive")

    out = tmp_path / "out"
    proc = wm("ingest", "episodes", str(src), "--format", "npz", "--out", str(out), "--workers", "1", check_rc=3)
    assert "4 samples" in proc.stdout and "5 failure(s)" in proc.stdout
    reasons = failures(out)
    assert "action has 9 rows but the video has 10 frames" in reasons["x_len.npz"]
    assert "NaN" in reasons["x_nan.npz"]
    assert "action dim 3 differs" in reasons["y_dim.npz"]
    assert "no 'action'" in reasons["y_noaction.npz"]
    assert "not an .npz file" in reasons["z_junk.npz"]

    samples = by_source(read_samples(out))
    for path, ep in good.items():
        m = samples[path]
        action, state = npy(m["action.npy"]), npy(m["state.npy"])
        assert action.dtype == np.float32 and action.tobytes() == ep["action"].tobytes()
        assert state.dtype == np.float32 and state.tobytes() == ep["state"].tobytes()
        meta = json.loads(m["meta.json"])
        assert (meta["task"], meta["instruction"], meta["embodiment"]) == ("push-v3", "push the puck", "robot")
        assert meta["success"] == (not path.endswith("ep1.npz")) and meta["cameras"] == ["image"]
        assert meta["n_frames"] == len(ep["action"]) and "image.mp4" in m
    wrist = json.loads(samples[str(src / "wrist_cam.npz")]["meta.json"])
    assert (wrist["cameras"], wrist["fps"], wrist["embodiment"]) == (["wrist"], 20.0, "sawyer")
    manifest = read_manifest(out)
    assert manifest["embodiments"]["robot"]["action_dim"] == 4 and manifest["tasks"] == {"push-v3": 3}


def write_robomimic(
    path: Path,
    rng,
    lengths: list[int],
    bad_demo: int | None = None,
    images: bool = True,
    lang: str | None = None,
    valid: tuple[int, ...] = (),
) -> dict:
    """A file in robomimic's layout (robomimic/scripts/dataset_states_to_obs.py, split_train_val.py):
    data.attrs total / env_args; data/demo_N with actions, states, rewards, dones, obs/*, next_obs/* and
    attrs num_samples, model_file (and ep_meta, robosuite >= 1.5); mask/train, mask/valid (dtype 'S')."""
    demos = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = sum(lengths)
        data.attrs["env_args"] = json.dumps(
            {
                "env_name": "Lift",
                "type": 1,
                "env_version": "1.5.1",
                "env_kwargs": {
                    "control_freq": 20,
                    "has_renderer": False,
                    "camera_names": ["agentview", "robot0_eye_in_hand"],
                },
            }
        )
        for i, t in enumerate(lengths):
            g = data.create_group(f"demo_{i}")
            d = {
                "actions": rng.normal(size=(t, 7)).astype(np.float32),
                "robot0_eef_pos": rng.normal(size=(t, 3)).astype(np.float32),
                "robot0_gripper_qpos": rng.normal(size=(t, 2)).astype(np.float32),
            }
            if images:
                d["agentview_image"] = rng.integers(0, 255, (t, 48, 64, 3), dtype=np.uint8)
                d["robot0_eye_in_hand_image"] = rng.integers(0, 255, (t, 48, 64, 3), dtype=np.uint8)
            g.create_dataset("actions", data=d["actions"][:-1] if i == bad_demo else d["actions"])
            g.create_dataset("states", data=rng.normal(size=(t, 32)))
            g.create_dataset("rewards", data=np.zeros(t))
            g.create_dataset("dones", data=np.r_[np.zeros(t - 1), 1].astype(np.int64))
            for k, v in d.items():
                if k != "actions":
                    g.create_dataset(f"obs/{k}", data=v)
                    g.create_dataset(f"next_obs/{k}", data=v)
            g.attrs["num_samples"] = t
            g.attrs["model_file"] = "<mujoco model='base'></mujoco>"
            if lang is not None:
                g.attrs["ep_meta"] = json.dumps({"lang": f"{lang} {i}", "layout_id": 3}, indent=4)
            demos[f"demo_{i}"] = d
        if valid:
            f["mask/valid"] = np.array([f"demo_{i}" for i in valid], dtype="S")
            f["mask/train"] = np.array([f"demo_{i}" for i in range(len(lengths)) if i not in valid], dtype="S")
    return demos


def test_hdf5_robomimic_round_trip_cameras_and_state_keys(tmp_path, capsys):
    rng = np.random.default_rng(1)
    demos = write_robomimic(tmp_path / "lift.hdf5", rng, [8, 9, 12], bad_demo=1)
    (tmp_path / "broken.hdf5").write_bytes(b"\x89HDF not really")
    out = tmp_path / "out"
    wm(
        "ingest",
        "episodes",
        str(tmp_path / "lift.hdf5"),
        str(tmp_path / "broken.hdf5"),
        "--format",
        "hdf5",
        "--out",
        str(out),
        "--resolution",
        "32",
        "--workers",
        "1",
        check_rc=3,
    )
    reasons = failures(out)
    assert set(reasons) == {"lift.hdf5::demo_1", "broken.hdf5"}
    assert "action has 8 rows but the video has 9 frames" in reasons["lift.hdf5::demo_1"]
    assert "not a readable HDF5 file" in reasons["broken.hdf5"]
    samples = by_source(read_samples(out))
    assert len(samples) == 2
    for name in ("demo_0", "demo_2"):
        m, d = samples[f"{tmp_path / 'lift.hdf5'}::{name}"], demos[name]
        meta = json.loads(m["meta.json"])
        assert npy(m["action.npy"]).tobytes() == d["actions"].tobytes()
        # default state: every low-dim obs key, sorted
        expected = np.concatenate([d["robot0_eef_pos"], d["robot0_gripper_qpos"]], axis=1)
        assert npy(m["state.npy"]).tobytes() == expected.tobytes()
        assert meta["extra"]["state_keys"] == ["robot0_eef_pos", "robot0_gripper_qpos"]
        assert sorted(meta["cameras"]) == ["agentview", "robot0_eye_in_hand"]
        assert (meta["height"], meta["width"], meta["fps"], meta["task"]) == (32, 32, 20.0, "Lift")
        assert meta["episode_index"] == int(name[-1])

    out2 = tmp_path / "out2"
    wm_here(
        capsys,
        "ingest",
        "episodes",
        str(tmp_path / "lift.hdf5"),
        "--format",
        "hdf5",
        "--out",
        str(out2),
        "--camera",
        "agentview",
        "--state-keys",
        "robot0_gripper_qpos,robot0_eef_pos",
        "--embodiment",
        "panda",
        check_rc=3,
    )
    m = by_source(read_samples(out2))[f"{tmp_path / 'lift.hdf5'}::demo_2"]
    meta = json.loads(m["meta.json"])
    d = demos["demo_2"]
    assert meta["cameras"] == ["agentview"] and meta["embodiment"] == "panda"
    assert (meta["height"], meta["width"]) == (48, 64)  # native size kept without --resolution
    expected = np.concatenate([d["robot0_gripper_qpos"], d["robot0_eef_pos"]], axis=1)
    assert npy(m["state.npy"]).tobytes() == expected.tobytes()


def test_hdf5_filter_key_ep_meta_language_and_a_low_dim_file(tmp_path, capsys):
    rng = np.random.default_rng(3)
    demos = write_robomimic(tmp_path / "image.hdf5", rng, [6, 7, 8, 9, 6], lang="lift the cube", valid=(1, 3))
    write_robomimic(tmp_path / "low_dim.hdf5", rng, [6, 7], images=False, valid=(1,))
    out = tmp_path / "train"
    proc = wm_here(
        capsys,
        "ingest",
        "episodes",
        str(tmp_path / "image.hdf5"),
        str(tmp_path / "low_dim.hdf5"),
        "--format",
        "hdf5",
        "--filter-key",
        "train",
        "--camera",
        "agentview",
        "--out",
        str(out),
        "--workers",
        "1",
        check_rc=3,
    )
    assert "3 samples" in proc.stdout and "1 failure(s)" in proc.stdout
    reason = failures(out)["low_dim.hdf5"]  # one row for the file, not one per demo
    assert reason.startswith("no image observations") and "low-dim file" in reason and "\n" not in reason
    samples = by_source(read_samples(out))
    assert sorted(Path(s).name for s in samples) == ["image.hdf5::demo_0", "image.hdf5::demo_2", "image.hdf5::demo_4"]
    for i in (0, 2, 4):
        meta = json.loads(samples[f"{tmp_path / 'image.hdf5'}::demo_{i}"]["meta.json"])
        assert (meta["instruction"], meta["task"], meta["cameras"]) == (f"lift the cube {i}", "Lift", ["agentview"])
        assert (
            npy(samples[f"{tmp_path / 'image.hdf5'}::demo_{i}"]["action.npy"]).tobytes()
            == demos[f"demo_{i}"]["actions"].tobytes()
        )

    out_valid = tmp_path / "valid"
    wm_here(
        capsys,
        "ingest",
        "episodes",
        str(tmp_path / "image.hdf5"),
        "--format",
        "hdf5",
        "--filter-key",
        "valid",
        "--out",
        str(out_valid),
        "--workers",
        "1",
        check_rc=0,
    )
    assert sorted(json.loads(m["meta.json"])["episode_index"] for m in read_samples(out_valid).values()) == [1, 3]

    out_bad = tmp_path / "bad"
    wm_here(
        capsys,
        "ingest",
        "episodes",
        str(tmp_path / "image.hdf5"),
        "--format",
        "hdf5",
        "--filter-key",
        "test",
        "--out",
        str(out_bad),
        "--workers",
        "1",
        check_rc=3,
    )
    assert failures(out_bad)["image.hdf5"] == "no filter key 'test': mask/ holds ['train', 'valid']"
    proc = wm_here(
        capsys,
        "ingest",
        "episodes",
        str(tmp_path),
        "--format",
        "npz",
        "--filter-key",
        "train",
        "--out",
        str(tmp_path / "x"),
        check_rc=2,
    )
    assert "--filter-key" in proc.stderr and "hdf5" in proc.stderr
