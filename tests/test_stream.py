"""WindowStream on real shard datasets written by shards.writer: contract, coverage, joins, errors."""

import io
import itertools
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.decode import DecodeError, decode_video
from shards.format import FormatError, read_manifest
from shards.sidecar import (
    SidecarError,
    read_sidecar,
    sidecar_done,
    sidecar_path,
    write_labeller_info,
    write_sidecar_shard,
)
from shards.stream import (
    WindowStream,
    collate_windows,
    iter_samples,
    label_starts,
    make_loader,
    read_tar_samples,
    resize_frames,
)
from shards.writer import Episode, run_sharded_job

LENGTHS = [20, 13, 17, 9, 24]  # frames per episode: uneven, one shorter than some windows


def _robot_episode(i: int) -> list[Episode]:
    n = LENGTHS[i]
    t = np.arange(n)
    frames = np.zeros((n, 32, 32, 3), np.uint8)
    frames[..., 0] = (t * 9 % 256)[:, None, None]
    frames[:, 8:16, 8:16, 1] = 40 * i
    action = np.stack([t, np.full(n, i), np.sin(t), np.cos(t)], 1).astype(np.float32)
    state = np.stack([t * 0.5, np.full(n, -i), t**2], 1).astype(np.float32)
    return [
        Episode(
            key=f"ep{i}",
            frames={"front": frames, "wrist": 255 - frames},
            fps=10.0,
            embodiment="sawyer",
            task=f"task{i % 2}",
            action=action,
            state=state,
        )
    ]


def _video_clip(i: int) -> list[Episode]:
    frames = np.full((12, 32, 32, 3), 200 - 10 * i, np.uint8)
    return [Episode(key=f"clip{i}", frames={"front": frames}, fps=10.0, embodiment="video", task="")]


def make_dataset(root: Path, kind: str = "robot", per_shard: int = 2) -> Path:
    """A small dataset: 'robot' (5 episodes with action/state, 3 shards) or 'video' (3 clips, no actions)."""
    make, n = (_robot_episode, len(LENGTHS)) if kind == "robot" else (_video_clip, 3)
    result = run_sharded_job(
        root, list(range(n)), make, samples_per_shard=per_shard, workers=1, created_by="tests", desc=kind
    )
    assert result.exit_code == 0, result.failures
    return root


@pytest.fixture(scope="module")
def robot(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("robot"))


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("video"), "video")


def stored(root: Path) -> dict[str, dict]:
    """key -> {"n", "action", "state", "frames"} straight from the tars (frames decoded with pyav)."""
    out = {}
    for entry in read_manifest(root)["shards"]:
        for raw in read_tar_samples(root / entry["name"]):
            out[raw["__key__"]] = {
                "action": np.load(io.BytesIO(raw["action.npy"])) if "action.npy" in raw else None,
                "state": np.load(io.BytesIO(raw["state.npy"])) if "state.npy" in raw else None,
                "frames": decode_video(raw["front.mp4"], backend="pyav"),
                "shard": entry["name"],
            }
    return out


def test_label_starts_tile_every_frame():
    for n, window, stride in itertools.product([1, 7, 8, 9, 16, 23], [1, 3, 8], [1, 2, 3]):
        starts = label_starts(n, window, stride)
        assert starts == sorted(set(starts))
        covered = {s + k * stride for s in starts for k in range(window)}
        assert all(s + (window - 1) * stride < n for s in starts)
        # every frame of every phase long enough to hold a window is covered
        long_phases = {p for p in range(min(stride, n)) if len(range(p, n, stride)) >= window}
        assert covered == {f for f in range(n) if f % stride in long_phases}
    assert label_starts(20, 8, 1) == [0, 8, 12]


def test_windows_follow_the_contract(robot):
    stream = WindowStream(robot, window=6, stride=1, windows_per_episode=2, shuffle_buffer=4, seed=1)
    batch = next(iter(make_loader(stream, batch_size=5)))
    assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape == (5, 6, 3, 32, 32)
    assert batch["action"].dtype == torch.float32 and batch["action"].shape == (5, 6, 4)
    assert batch["state"].dtype == torch.float32 and batch["state"].shape == (5, 6, 3)
    assert batch["action_mask"].dtype == torch.bool and batch["action_mask"].all()
    assert batch["state_mask"].dtype == torch.bool and batch["state_mask"].all()
    assert batch["start"].dtype == torch.int64 and batch["start"].shape == (5,)
    assert batch["embodiment"] == ["sawyer"] * 5
    assert all(t in ("task0", "task1") for t in batch["task"]) and all(k.startswith("ep") for k in batch["key"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_label_mode_covers_every_window_exactly_once(robot, num_workers):
    stream = WindowStream(robot, window=8, stride=1, mode="label")
    seen = []
    for batch in make_loader(stream, batch_size=3, num_workers=num_workers):
        seen += list(zip(batch["key"], batch["start"].tolist()))
    expected = [(f"ep{i}", s) for i, n in enumerate(LENGTHS) for s in label_starts(n, 8, 1)]
    assert len(seen) == len(set(seen)) == len(expected)
    assert set(seen) == set(expected)
    assert ("ep3", 0) in seen and ("ep1", 5) in seen  # short episodes still covered, ends reached


def test_label_every_starts_a_window_at_every_kth_frame(robot):
    stream = WindowStream(robot, window=4, stride=2, mode="label", label_every=3)
    seen = [(w["key"], int(w["start"])) for w in stream]
    span = 3 * 2 + 1
    expected = [(f"ep{i}", s) for i, n in enumerate(LENGTHS) for s in range(0, n - span + 1, 3)]
    assert seen == expected  # in data order, overlapping, none beyond an episode's end
    with pytest.raises(ValueError, match="label_every"):
        WindowStream(robot, window=4, mode="train", label_every=3)


def test_window_contents_equal_the_stored_arrays(robot):
    truth = stored(robot)
    stream = WindowStream(robot, window=4, stride=3, mode="label", backend="torchcodec", camera="front")
    count = 0
    for w in stream:
        idx = w["start"] + 3 * np.arange(4)
        ep = truth[w["key"]]
        assert np.array_equal(w["action"].numpy(), ep["action"][idx])
        assert np.array_equal(w["state"].numpy(), ep["state"][idx])
        assert np.array_equal(w["frames"].numpy(), ep["frames"][idx].transpose(0, 3, 1, 2))
        count += 1
    assert count == sum(len(label_starts(n, 4, 3)) for n in LENGTHS)


def test_camera_choice_and_resize(robot):
    truth = stored(robot)
    front = next(iter(WindowStream(robot, window=3, mode="label")))
    wrist = next(iter(WindowStream(robot, window=3, mode="label", camera="wrist")))
    assert front["key"] == wrist["key"] and not torch.equal(front["frames"], wrist["frames"])
    for size, hw in [(16, (16, 16)), ((8, 24), (8, 24))]:
        w = next(iter(WindowStream(robot, window=3, mode="label", resize=size)))
        assert w["frames"].shape == (3, 3, *hw) and w["frames"].dtype == torch.uint8
        full = torch.from_numpy(truth[w["key"]]["frames"][:3]).permute(0, 3, 1, 2)
        assert torch.equal(w["frames"], resize_frames(full, hw))
        # antialiased downscale keeps the mean colour
        assert abs(w["frames"].float().mean() - full.float().mean()) < 2
    with pytest.raises(FormatError, match="no camera 'top'"):
        next(iter(WindowStream(robot, window=3, mode="label", camera="top")))


def test_train_mode_is_infinite_and_mixes_sources_by_weight(robot, video):
    n_windows_one_pass = sum(len(label_starts(n, 4, 1)) for n in LENGTHS) + 3 * len(label_starts(12, 4, 1))
    only_robot = list(itertools.islice(WindowStream([robot, video], window=4, weights=[1, 0]), 60))
    assert {w["embodiment"] for w in only_robot} == {"sawyer"}
    mixed = list(
        itertools.islice(WindowStream([robot, video], window=4, weights=[1, 1], seed=3), 2 * n_windows_one_pass)
    )
    clips = [w for w in mixed if w["embodiment"] == "video"]
    assert 0.25 < len(clips) / len(mixed) < 0.75
    assert not any(w["action_mask"] for w in clips) and all(w["action"].abs().sum() == 0 for w in clips)
    assert all(w["action"].shape == (4, 4) for w in mixed)  # zero-padded to the widest embodiment
    batch = collate_windows(mixed[:16])
    assert batch["action_mask"].tolist() == [w["embodiment"] == "sawyer" for w in mixed[:16]]
    # different seeds give different streams; the same seed the same one
    a = [(w["key"], w["start"]) for w in itertools.islice(WindowStream(robot, window=4, seed=5), 20)]
    b = [(w["key"], w["start"]) for w in itertools.islice(WindowStream(robot, window=4, seed=5), 20)]
    c = [(w["key"], w["start"]) for w in itertools.islice(WindowStream(robot, window=4, seed=6), 20)]
    assert a == b and a != c


def test_sidecar_labels_join_by_key_and_are_cut_to_the_window(robot, tmp_path):
    manifest = read_manifest(robot)
    for entry in manifest["shards"]:
        rows = {}
        for key in entry["keys"]:
            n = LENGTHS[int(key[2:])]
            rows[key] = {
                "code": np.arange(n, dtype=np.int64) + 1000 * int(key[2:]),
                "summary": np.array([int(key[2:]), n], np.float32),
            }
        stats = write_sidecar_shard(robot, "lam", entry["name"], rows)
        assert stats["samples"] == len(rows) and sidecar_done(robot, "lam", entry["name"])
    write_labeller_info(robot, "lam", {"checkpoint": "ckpt/step-1"})
    first = sidecar_path(robot, "lam", manifest["shards"][0]["name"])
    before = first.read_bytes()
    write_sidecar_shard(robot, "lam", manifest["shards"][0]["name"], read_sidecar(robot, "lam", first.name))
    assert first.read_bytes() == before  # deterministic bytes: a rerun rewrites the same shard

    windows = list(WindowStream(robot, window=5, stride=2, mode="label", labels=["lam"]))
    assert windows
    for w in windows:
        i = int(w["key"][2:])
        assert w["lam.code"].tolist() == [1000 * i + w["start"] + 2 * k for k in range(5)]
        assert w["lam.summary"].tolist() == [i, LENGTHS[i]]
    assert collate_windows(windows[:4])["lam.code"].shape == (4, 5)

    # keys must match the video shard on write
    with pytest.raises(SidecarError, match="missing \\['ep1'\\]"):
        write_sidecar_shard(robot, "bad", manifest["shards"][0]["name"], {"ep0": {"code": np.zeros(3)}})
    # a sidecar that lost a key is a clear error naming shard and key
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if not m.name.startswith("ep1.")]
    with tarfile.open(first, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(FormatError, match=r"no labels for key 'ep1' of video shard .*shard-000000.tar"):
        list(WindowStream(robot, window=5, mode="label", labels=["lam"]))
    with pytest.raises(FormatError, match="no labels 'idm'"):
        WindowStream(robot, labels=["idm"])


def _corrupt_copy(src: Path, dst: Path, key: str) -> Path:
    """Copy a dataset and truncate the videos of ``key`` inside its tar (manifest kept)."""
    import shutil

    shutil.copytree(src, dst)
    for tar_path in dst.glob("shard-*.tar"):
        with tarfile.open(tar_path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        if not any(m.name.startswith(key + ".") for m, _ in members):
            continue
        with tarfile.open(tar_path, "w") as tar:
            for m, data in members:
                if m.name.startswith(key + ".") and m.name.endswith(".mp4"):
                    data = data[: len(data) // 4]
                    m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
    return dst


def test_corrupt_video_is_skipped_in_train_and_raised_in_label_mode(robot, tmp_path, caplog):
    bad = _corrupt_copy(robot, tmp_path / "bad", "ep2")
    with caplog.at_level(logging.WARNING, logger="shards.stream"):
        windows = list(itertools.islice(WindowStream(bad, window=4, windows_per_episode=2), 40))
    assert {w["key"] for w in windows} == {"ep0", "ep1", "ep3", "ep4"}
    assert any("shard-000001.tar:ep2" in r.getMessage() for r in caplog.records)
    with pytest.raises(DecodeError, match="shard-000001.tar:ep2"):
        list(WindowStream(bad, window=4, mode="label"))
    records = list(iter_samples(bad, errors="record"))
    assert [r.key for r in records] == [f"ep{i}" for i in range(5)]
    assert [r.error is not None for r in records] == [False, False, True, False, False]
    assert "shard-000001.tar:ep2" in records[2].error


def test_iter_samples_gives_whole_episodes(robot):
    samples = list(iter_samples(robot, resize=16))
    assert [s.key for s in samples] == [f"ep{i}" for i in range(5)]
    assert [s.shard_index for s in samples] == [0, 0, 1, 1, 2]
    for s in samples:
        assert s.frames.shape == (s.meta.n_frames, 3, 16, 16) and s.action.shape == (s.meta.n_frames, 4)


def test_truncated_shard_is_a_clear_error_in_label_mode_and_skipped_in_train(robot, tmp_path, caplog):
    import shutil

    bad = tmp_path / "cut"
    shutil.copytree(robot, bad)
    tar = bad / "shard-000002.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(FormatError, match="shard-000002.tar: unreadable shard"):
        list(WindowStream(bad, window=4, mode="label"))
    with caplog.at_level(logging.WARNING, logger="shards.stream"):
        keys = {w["key"] for w in itertools.islice(WindowStream(bad, window=4, windows_per_episode=2), 40)}
    assert {"ep0", "ep1", "ep2", "ep3"} <= keys
    assert any("shard-000002.tar" in r.getMessage() for r in caplog.records)
