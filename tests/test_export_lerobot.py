"""`wm export lerobot`: a shard dataset (our writer, real H.264) out as a LeRobot v3 dataset, checked two ways:
read back the way LeRobotDataset reads it (HF datasets over the data parquet with the features info.json
declares, the episode table, pandas' tasks, frames at from_timestamp + timestamp within LeRobot's 1e-4 s
tolerance), and re-ingested with our own LeRobot ingest (actions / states bit-exact, frames, tasks, fps)."""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shards.decode import decode_video
from shards.export_lerobot import ExportError, export_lerobot
from shards.ingest_episodes import ingest_episodes
from shards.tar_reader import read_tar_samples
from shards.writer import Episode, run_sharded_job
from wm_pipeline.cli.main import main

LENGTHS = [7, 12, 9, 5]
TASKS = ["reach-v3", "push-v3", "reach-v3", "push-v3"]


def _frames(n: int, phase: float) -> np.ndarray:
    t, y, x = np.ogrid[:n, :32, :48]
    img = 128 + 90 * np.sin(x / 5 + t / 2 + phase)[..., None] * np.cos(y[..., None] / 6 + np.arange(3))
    return img.astype(np.uint8)


def make_episodes(i: int):
    rng = np.random.default_rng(i)
    n = LENGTHS[i]
    yield Episode(
        key=f"ep{i:03d}",
        frames={"corner": _frames(n, i), "wrist": _frames(n, 10 + i)},
        fps=10.0,
        embodiment="sawyer",
        task=TASKS[i],
        instruction=f"do {TASKS[i]}",
        action=rng.normal(size=(n, 4)).astype(np.float32),
        state=rng.normal(size=(n, 6)).astype(np.float32),
        success=bool(i % 2),
        episode_index=i,
        seed=100 + i,
    )
    if i == 1:  # an action-free clip: not a LeRobot episode
        yield Episode(
            key="clip", frames={"corner": _frames(6, 3), "wrist": _frames(6, 4)}, fps=10.0, embodiment="video"
        )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    src, out = tmp / "shards", tmp / "lerobot"
    run_sharded_job(src, list(range(len(LENGTHS))), make_episodes, samples_per_shard=2, workers=1)
    result = export_lerobot(src, out)
    assert (result.episodes, result.frames, result.tasks, result.skipped) == (4, sum(LENGTHS), 2, 1)
    originals = {}
    for shard in sorted(src.glob("shard-*.tar")):
        for s in read_tar_samples(shard):
            if s["__key__"] != "clip":
                originals[s["__key__"]] = s
    return src, out, originals


def test_layout_is_lerobot_v3(exported):
    _, out, _ = exported
    info = json.loads((out / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10 and isinstance(info["fps"], int)
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (4, sum(LENGTHS), 2)
    assert info["robot_type"] == "sawyer" and info["splits"] == {"train": "0:4"} and info["chunks_size"] == 1000
    for key in ("data_files_size_in_mb", "video_files_size_in_mb"):
        assert info[key] > 0
    feats = info["features"]
    assert feats["action"] == {"dtype": "float32", "shape": [4], "names": None}
    assert feats["observation.state"]["shape"] == [6]
    for cam in ("corner", "wrist"):
        f = feats[f"observation.images.{cam}"]
        assert f["dtype"] == "video" and f["shape"] == [32, 48, 3] and f["names"] == ["height", "width", "channels"]
        assert f["info"]["video.codec"] == "h264" and f["info"]["video.fps"] == 10
    for name, dtype in [
        ("timestamp", "float32"),
        ("frame_index", "int64"),
        ("episode_index", "int64"),
        ("index", "int64"),
        ("task_index", "int64"),
    ]:
        assert feats[name] == {"dtype": dtype, "shape": [1], "names": None}

    data = pq.read_table(out / info["data_path"].format(chunk_index=0, file_index=0))
    assert data.schema.names == [
        "action",
        "observation.state",
        "timestamp",
        "frame_index",
        "episode_index",
        "index",
        "task_index",
    ]
    assert data.schema.field("action").type == pa.list_(pa.float32(), 4)
    assert data.schema.field("observation.state").type == pa.list_(pa.float32(), 6)
    assert data.schema.field("timestamp").type == pa.float32() and data.schema.field("index").type == pa.int64()
    assert data["index"].to_pylist() == list(range(sum(LENGTHS)))

    eps = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["episode_index"] for e in eps] == [0, 1, 2, 3] and [e["length"] for e in eps] == LENGTHS
    bounds = np.cumsum([0] + LENGTHS)
    for e, lo, hi, task in zip(eps, bounds[:-1], bounds[1:], TASKS):
        assert (e["dataset_from_index"], e["dataset_to_index"]) == (lo, hi) and e["tasks"] == [f"do {task}"]
        assert (e["data/chunk_index"], e["data/file_index"]) == (0, 0)
        assert (e["meta/episodes/chunk_index"], e["meta/episodes/file_index"]) == (0, 0)
        for cam in ("corner", "wrist"):
            key = f"videos/observation.images.{cam}"
            assert (e[f"{key}/chunk_index"], e[f"{key}/file_index"]) == (0, 0)
            assert e[f"{key}/from_timestamp"] == pytest.approx(lo / 10) and e[f"{key}/to_timestamp"] == pytest.approx(
                hi / 10
            )
        assert e["stats/action/count"] == [hi - lo] and len(e["stats/action/q50"]) == 4
        assert np.asarray(e["stats/observation.images.corner/mean"]).shape == (3, 1, 1)
    assert [e["wm/task"] for e in eps] == TASKS and [e["wm/success"] for e in eps] == [False, True, False, True]

    import pandas as pd  # LeRobot's load_tasks: pd.read_parquet, looked up by the index (the task string)

    tasks = pd.read_parquet(out / "meta/tasks.parquet")
    assert list(tasks.index) == ["do reach-v3", "do push-v3"] and tasks.loc["do push-v3"].task_index == 1
    assert tasks.iloc[1].name == "do push-v3"

    stats = json.loads((out / "meta/stats.json").read_text())
    assert set(stats) == {
        "action",
        "observation.state",
        "observation.images.corner",
        "observation.images.wrist",
        "timestamp",
        "frame_index",
        "episode_index",
        "index",
        "task_index",
    }
    assert set(stats["action"]) == {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    actions = np.concatenate([e.action for i in range(4) for e in make_episodes(i) if e.action is not None])
    assert np.allclose(stats["action"]["mean"], actions.mean(0), atol=1e-6)
    assert np.allclose(stats["action"]["std"], actions.std(0), atol=1e-6)
    assert stats["action"]["min"] == actions.min(0).tolist() and stats["action"]["count"] == [len(actions)]
    assert np.asarray(stats["observation.images.wrist"]["mean"]).shape == (3, 1, 1)
    assert (
        0 <= np.min(stats["observation.images.wrist"]["min"]) <= np.max(stats["observation.images.wrist"]["max"]) <= 1
    )


def test_read_as_lerobot_dataset_reads_it(exported, tmp_path):
    """LeRobotDataset's read path: Dataset.from_parquet(data/*/*.parquet, features from info.json), the
    episode table, tasks, then per row the frame at from_timestamp + timestamp (tolerance 1e-4 s)."""
    import datasets

    _, out, originals = exported
    info = json.loads((out / "meta/info.json").read_text())
    hf = {}
    for key, ft in info["features"].items():
        if ft["dtype"] == "video":
            continue
        hf[key] = (
            datasets.Value(ft["dtype"])
            if ft["shape"] == [1]
            else datasets.Sequence(length=ft["shape"][0], feature=datasets.Value(ft["dtype"]))
        )
    frames = datasets.Dataset.from_parquet(
        [str(p) for p in sorted((out / "data").glob("*/*.parquet"))],
        features=datasets.Features(hf),
        cache_dir=str(tmp_path),
    )
    episodes = datasets.Dataset.from_parquet(
        [str(p) for p in sorted((out / "meta/episodes").glob("*/*.parquet"))], cache_dir=str(tmp_path)
    )
    assert len(frames) == info["total_frames"] and len(episodes) == info["total_episodes"]
    decoded: dict[str, dict[float, np.ndarray]] = {}
    for key in ("observation.images.corner", "observation.images.wrist"):
        path = out / info["video_path"].format(video_key=key, chunk_index=0, file_index=0)
        with av.open(str(path)) as c:
            decoded[key] = {float(f.time): f.to_ndarray(format="rgb24") for f in c.decode(video=0)}
    for ep_index, key in enumerate(sorted(originals)):
        ep = episodes[ep_index]
        rows = frames.select(range(ep["dataset_from_index"], ep["dataset_to_index"]))
        orig = originals[key]
        assert np.array_equal(np.asarray(rows["action"], np.float32), np.load(io.BytesIO(orig["action.npy"])))
        assert np.array_equal(np.asarray(rows["observation.state"], np.float32), np.load(io.BytesIO(orig["state.npy"])))
        assert set(rows["episode_index"]) == {ep_index} and rows["frame_index"] == list(range(len(rows)))
        for cam in ("corner", "wrist"):
            vkey = f"observation.images.{cam}"
            times = np.array(sorted(decoded[vkey]))
            want = decode_video(orig[f"{cam}.mp4"])
            for t, ts in enumerate(rows["timestamp"]):
                query = ep[f"videos/{vkey}/from_timestamp"] + ts
                nearest = times[np.abs(times - query).argmin()]
                assert abs(nearest - query) < 1e-4  # LeRobot's default tolerance_s
                assert np.array_equal(decoded[vkey][nearest], want[t])  # stream copy: the very same pixels


def test_reingest_gives_back_the_episodes(exported, tmp_path):
    _, out, originals = exported
    back = tmp_path / "back"
    ingest_episodes([str(out)], back, fmt="lerobot", workers=1)
    samples = [s for shard in sorted(back.glob("shard-*.tar")) for s in read_tar_samples(shard)]
    assert len(samples) == 4
    for s, key, task in zip(samples, sorted(originals), TASKS):
        orig = originals[key]
        meta = json.loads(s["meta.json"])
        assert meta["fps"] == 10.0 and meta["task"] == f"do {task}" and meta["embodiment"] == "sawyer"
        assert meta["n_frames"] == json.loads(orig["meta.json"])["n_frames"]
        assert np.load(io.BytesIO(s["action.npy"])).tobytes() == np.load(io.BytesIO(orig["action.npy"])).tobytes()
        assert np.load(io.BytesIO(s["state.npy"])).tobytes() == np.load(io.BytesIO(orig["state.npy"])).tobytes()
        for cam in ("corner", "wrist"):
            a, b = decode_video(s[f"{cam}.mp4"]).astype(int), decode_video(orig[f"{cam}.mp4"]).astype(int)
            assert a.shape == b.shape and np.abs(a - b).mean() < 2.0  # one more H.264 generation (crf 18)


def test_refusals_are_one_line(exported, tmp_path):
    src, out, _ = exported
    with pytest.raises(ExportError, match="not an empty folder"):
        export_lerobot(src, out)
    with pytest.raises(ExportError, match="no embodiment 'franka'"):
        export_lerobot(src, tmp_path / "x", embodiment="franka")
    with pytest.raises(ExportError, match="has no actions"):
        export_lerobot(src, tmp_path / "x", embodiment="video")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("x.tmp-*"))


def test_cli(exported, tmp_path, capsys):
    src, out, _ = exported
    assert main(["export", "lerobot", str(src), "--out", str(tmp_path / "lr")]) == 0
    assert "4 episodes" in capsys.readouterr().out
    assert (tmp_path / "lr/meta/info.json").is_file()
    assert main(["export", "lerobot", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not an empty folder" in err and "Traceback" not in err
