"""shards.encode + shards.writer: round trip, determinism, bad inputs, kill -9 and resume.

Everything is real: frames are encoded with libx264 and decoded back with PyAV, workers are
spawned processes, the interrupted job is a separate process killed with SIGKILL.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import av
import numpy as np
import pytest

from shards.encode import GOP, EncodeError, encode_video
from shards.format import read_manifest
from shards.stats import embodiment_stats
from shards.writer import DATA_FAILURES, BadInput, Episode, finalize_dataset, run_sharded_job

ROOT = Path(__file__).resolve().parents[1]


def moving_frames(n: int, h: int = 32, w: int = 32, phase: float = 0.0) -> np.ndarray:
    """A smooth pattern that drifts over time: uint8 [n, h, w, 3]."""
    t = np.arange(n)[:, None, None, None]
    y = np.arange(h)[None, :, None, None]
    x = np.arange(w)[None, None, :, None]
    c = np.arange(3)[None, None, None, :]
    img = 128 + 80 * np.sin(x / 6.0 + t / 4.0 + phase + c) * np.cos(y / 7.0 - t / 9.0)
    return img.astype(np.uint8)


def episode(i: int, n: int = 12, **kw) -> Episode:
    rng = np.random.default_rng(i)
    args = dict(
        key=f"ep{i:03d}",
        frames={"corner": moving_frames(n, phase=i)},
        fps=10.0,
        embodiment="sawyer",
        task="reach-v3",
        instruction="reach the goal",
        action=rng.normal(size=(n, 4)).astype(np.float32),
        state=rng.normal(size=(n, 6)).astype(np.float32),
        success=bool(i % 2),
        episode_index=i,
        seed=i,
    )
    args.update(kw)
    return Episode(**args)


def good_episodes(i: int):
    """make_episodes for the tests (module level: picklable for spawned workers)."""
    yield episode(i)


def mixed_episodes(i: int):
    """Good episodes with some that finalize must drop (depends on order only)."""
    if i == 3:
        raise RuntimeError("cannot open input 3")
    if i == 4:
        yield episode(i, action=np.zeros((12, 3), np.float32))  # action dim conflict
        return
    if i == 6:
        yield episode(i, frames={"corner": moving_frames(12, 16, 16)})  # resolution conflict
        return
    yield episode(i)
    if i == 1:
        yield episode(100, embodiment="video", action=None, state=None)  # two episodes from one input


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def decode(data: bytes) -> tuple[np.ndarray, list[int], list[bool]]:
    with av.open(io.BytesIO(data)) as c:
        frames = list(c.decode(video=0))
    return (
        np.stack([f.to_ndarray(format="rgb24") for f in frames]),
        [f.pts for f in frames],
        [f.key_frame for f in frames],
    )


# ---------------------------------------------------------------- encode


def test_encode_is_deterministic_with_short_gop_and_rejects_odd_sizes():
    frames = moving_frames(20)
    data = encode_video(frames, 10.0)
    assert data == encode_video(frames.copy(), 10.0)
    assert b"creation_time" not in data and b"Lavf" not in data
    decoded, pts, key = decode(data)
    assert decoded.shape == frames.shape
    assert pts == list(range(20))
    assert [i for i, k in enumerate(key) if k] == list(range(0, 20, GOP))
    with pytest.raises(EncodeError, match="even"):
        encode_video(moving_frames(3, 31, 32), 10.0)
    with pytest.raises(EncodeError, match="zero frames"):
        encode_video(moving_frames(0), 10.0)


# ---------------------------------------------------------------- round trip


def test_round_trip_action_state_bit_exact_and_video_close(tmp_path):
    result = run_sharded_job(tmp_path, [0, 1, 2], good_episodes, samples_per_shard=2, workers=1, created_by="test")
    assert result.exit_code == 0 and result.ok and result.failures == []
    manifest = read_manifest(tmp_path)
    assert [s["keys"] for s in manifest["shards"]] == [["ep000", "ep001"], ["ep002"]]
    assert manifest["totals"] == {"samples": 3, "frames": 36, "shards": 2, "bytes": manifest["totals"]["bytes"]}
    assert manifest["resolution"] == [32, 32] and manifest["tasks"] == {"reach-v3": 3}
    members = {**read_tar(tmp_path / "shard-000000.tar"), **read_tar(tmp_path / "shard-000001.tar")}
    for i in range(3):
        ep, key = episode(i), f"ep{i:03d}"
        assert sorted(n for n in members if n.startswith(key)) == [
            f"{key}.action.npy",
            f"{key}.corner.mp4",
            f"{key}.meta.json",
            f"{key}.state.npy",
        ]
        action = np.load(io.BytesIO(members[f"{key}.action.npy"]))
        state = np.load(io.BytesIO(members[f"{key}.state.npy"]))
        assert action.dtype == np.float32 and np.array_equal(action, ep.action)
        assert np.array_equal(state, ep.state)
        meta = json.loads(members[f"{key}.meta.json"])
        assert (meta["n_frames"], meta["height"], meta["width"], meta["action_dim"], meta["state_dim"]) == (
            12,
            32,
            32,
            4,
            6,
        )
        assert meta["success"] == bool(i % 2) and meta["source"] == str(i) and meta["cameras"] == ["corner"]
        frames, pts, _ = decode(members[f"{key}.corner.mp4"])
        assert frames.shape == (12, 32, 32, 3) and pts == list(range(12))
        err = np.abs(frames.astype(np.int16) - ep.frames["corner"]).mean()
        assert err < 4.0, err
    # normalisation stats agree with numpy over all rows
    actions = np.concatenate([episode(i).action for i in range(3)])
    stats = embodiment_stats(tmp_path)["sawyer"]
    assert stats["action"]["mean"].dtype == np.float32 and stats["state"]["std"].shape == (6,)
    np.testing.assert_allclose(stats["action"]["mean"], actions.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["action"]["std"], actions.std(0), rtol=1e-5)
    np.testing.assert_array_equal(stats["action"]["min"], actions.min(0))
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(actions, 0.99, axis=0), rtol=1e-5)


# ---------------------------------------------------------------- determinism


def test_bytes_identical_for_one_and_two_workers(tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        result = run_sharded_job(out, list(range(8)), mixed_episodes, samples_per_shard=2, workers=workers)
        assert result.exit_code == DATA_FAILURES
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    assert "manifest.json" in names and "shard-000003.stats.json" in names
    assert not [n for n in names if n.endswith(".tmp")]
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


# ---------------------------------------------------------------- bad inputs


def bad_episodes(case: str):
    n = 10
    f = moving_frames(n)
    a = np.zeros((n, 4), np.float32)
    cases = {
        "good_a": episode(1, n=n),
        "zero_frames": episode(2, frames={"corner": f[:0]}, action=None, state=None),
        "float_frames": episode(3, frames={"corner": f.astype(np.float32)}),
        "gray_frames": episode(4, frames={"corner": f[..., 0]}),
        "camera_lengths": episode(5, n=n, frames={"corner": f, "wrist": f[:7]}),
        "action_length": episode(6, n=n, action=a[:8]),
        "state_length": episode(7, n=n, state=np.zeros((n + 1, 6), np.float32)),
        "action_nan": episode(8, n=n, action=np.where(np.arange(n)[:, None] == 5, np.nan, a)),
        "state_inf": episode(9, n=n, state=np.full((n, 6), np.inf, np.float32)),
        "action_dims": episode(10, n=n, action=np.zeros((n, 7), np.float32)),
        "state_dims": episode(11, n=n, state=np.zeros((n, 2), np.float32)),
        "resolution": episode(12, n=n, frames={"corner": moving_frames(n, 16, 24)}),
        "odd_size": episode(13, n=n, frames={"corner": moving_frames(n, 15, 32)}),
        "bad_key": episode(14, key="ep.14"),
        "duplicate": episode(1, n=n),
        "good_b": episode(16, n=n, embodiment="video", action=None, state=None),
    }
    if case == "raises":
        raise BadInput("input file is truncated")
    yield cases[case]


BAD = {
    "zero_frames": "zero frames",
    "float_frames": "uint8",
    "gray_frames": "[T, H, W, 3]",
    "camera_lengths": "cameras differ",
    "action_length": "action has 8 rows",
    "state_length": "state has 11 rows",
    "action_nan": "NaN/inf (first at row 5)",
    "state_inf": "state holds NaN/inf",
    "action_dims": "action dim 7 differs",
    "state_dims": "state dim 2 differs",
    "resolution": "resolution 16x24 differs",
    "odd_size": "even",
    "bad_key": "keys may only",
    "duplicate": "duplicate key",
    "raises": "input file is truncated",
}


def test_every_bad_input_is_a_failure_row_and_good_samples_stay(tmp_path):
    inputs = ["good_a", *BAD, "good_b"]
    result = run_sharded_job(tmp_path, inputs, bad_episodes, samples_per_shard=3, workers=1)
    assert result.exit_code == DATA_FAILURES
    rows = {r["source"]: r for r in result.failures}
    assert sorted(rows) == sorted(BAD)
    for case, needle in BAD.items():
        assert needle in rows[case]["reason"], (case, rows[case])
    on_disk = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert on_disk == result.failures and result.manifest["failures"] == len(BAD)
    keys_in_tars = sorted({n.split(".")[0] for p in sorted(tmp_path.glob("shard-*.tar")) for n in read_tar(p)})
    keys_in_manifest = sorted(k for s in result.manifest["shards"] for k in s["keys"])
    assert keys_in_tars == keys_in_manifest == ["ep001", "ep016"]
    assert result.manifest["embodiments"]["video"]["action_dim"] == 0
    assert "action" not in result.manifest["embodiments"]["video"]["stats"]
    # finalize is idempotent: running it again changes no byte
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    finalize_dataset(tmp_path)
    assert before == {p.name: p.read_bytes() for p in tmp_path.iterdir()}


def test_rerun_with_other_inputs_rewrites_the_shard(tmp_path):
    run_sharded_job(tmp_path, [0, 1], good_episodes, samples_per_shard=2, workers=1)
    result = run_sharded_job(tmp_path, [2, 3], good_episodes, samples_per_shard=2, workers=1)
    assert result.manifest["shards"][0]["keys"] == ["ep002", "ep003"]


# ---------------------------------------------------------------- kill -9 and resume

JOB = """
import os, sys, time
sys.path.insert(0, {tests!r})
from test_writer import episode
from shards.writer import run_sharded_job

def slow_episodes(i):
    time.sleep(float(os.environ.get("DELAY", "0")))
    yield episode(i)

if __name__ == "__main__":
    r = run_sharded_job(sys.argv[1], list(range(8)), slow_episodes, samples_per_shard=1, workers=1)
    sys.exit(r.exit_code)
"""


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(JOB.format(tests=str(Path(__file__).parent))))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "DELAY": "0.4"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(killed)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while len(list(killed.glob("*.stats.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in killed.glob("*.stats.json"))
    assert 3 <= len(done) < 8, done
    assert not (killed / "manifest.json").exists()
    # a shard whose tar exists but whose stats do not must be redone: make one such, with a broken tar
    (killed / "shard-000001.stats.json").unlink()
    (killed / "shard-000001.tar").write_bytes(b"truncated")

    env["DELAY"] = "0"
    assert subprocess.run([sys.executable, str(script), str(killed)], env=env, cwd=ROOT).returncode == 0
    assert subprocess.run([sys.executable, str(script), str(clean)], env=env, cwd=ROOT).returncode == 0
    names = sorted(p.name for p in clean.iterdir())
    assert (
        sorted(p.name for p in killed.iterdir()) == names and len(names) == 19
    )  # 8 tars + 8 stats, manifest, failures, README
    for name in names:
        if name.endswith(".tar"):
            a, b = read_tar(killed / name), read_tar(clean / name)
            assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), name
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name


def test_exit_code_agrees_with_pipeline():
    from wm_pipeline.exit_codes import DATA_FAILURES as PIPELINE_DATA_FAILURES

    assert DATA_FAILURES == PIPELINE_DATA_FAILURES
