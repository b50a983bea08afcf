"""`wm ingest episodes --format lerobot`: LeRobot v3 datasets in the layout LeRobot 0.6 writes them.

The writer below follows lerobot's own code (``lerobot.datasets``: ``create_empty_dataset_info``,
``get_hf_features_from_features``, ``embed_images``, ``DatasetWriter._save_episode_data``,
``VideoEncoderConfig`` / ``DepthEncoderConfig``): ``meta/info.json`` with every default feature,
1-D features as fixed-size float32 lists, image features as ``datasets.Image`` structs ``{bytes, path}``
holding PNGs (``compress_level=1``, path = the frame file's base name), many episodes per data parquet
and per AV1 video (libsvtav1, yuv420p, g=2, crf=30), ``from_timestamp`` = the episode's start in its
video file, per-episode stats columns in ``meta/episodes``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from shards.ingest_lerobot import lerobot_home
from tests.test_ingest_episodes import by_source, failures, npy, read_samples

FPS = 10
SIDE = 64
DIM = 6
TASK = "pick up the cube"


def wm(*args: str, check_rc: int, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "wm_pipeline", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def level_frames(levels: np.ndarray) -> list[np.ndarray]:
    """One flat RGB frame per level (survives lossy video exactly enough to identify the frame)."""
    return [
        np.stack(
            [
                np.full((SIDE, SIDE), lv, np.uint8),
                np.full((SIDE, SIDE), 255 - lv, np.uint8),
                np.full((SIDE, SIDE), 128, np.uint8),
            ],
            -1,
        )
        for lv in levels
    ]


def png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_av1(path: Path, frames: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libsvtav1", rate=Fraction(FPS))
        s.width = s.height = SIDE
        s.pix_fmt = "yuv420p"
        s.options = {"g": "2", "crf": "30", "preset": "12"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_lerobot_v3(
    root: Path,
    rng,
    lengths: list[int],
    *,
    use_videos: bool = True,
    per_file: int = 2,
    depth: bool = False,
    version: str = "v3.0",
) -> list[dict]:
    """A LeRobot v3 dataset with camera ``observation.images.top`` (video or image feature), optionally a
    depth video feature ``observation.images.depth``; ``per_file`` episodes per data parquet / video file."""
    cam = "observation.images.top"
    vec = {"dtype": "float32", "shape": [DIM], "names": [f"j{i}" for i in range(DIM)]}
    rgb_info = {
        "video.height": SIDE,
        "video.width": SIDE,
        "video.codec": "av1",
        "video.pix_fmt": "yuv420p",
        "video.is_depth_map": False,
        "video.fps": FPS,
        "video.channels": 3,
        "has_audio": False,
        "video.g": 2,
        "video.crf": 30,
        "is_depth_map": False,
    }
    features = {
        "action": vec,
        "observation.state": vec,
        cam: {
            "dtype": "video" if use_videos else "image",
            "shape": [SIDE, SIDE, 3],
            "names": ["height", "width", "channels"],
            **({"info": rgb_info} if use_videos else {}),
        },
    }
    if depth:
        features["observation.images.depth"] = {
            "dtype": "video",
            "shape": [SIDE, SIDE, 1],
            "names": ["height", "width", "channels"],
            "info": {
                "video.height": SIDE,
                "video.width": SIDE,
                "video.codec": "hevc",
                "video.pix_fmt": "gray12le",
                "video.fps": FPS,
                "video.channels": 1,
                "video.depth_min": 0.01,
                "video.depth_max": 10.0,
                "video.shift": 3.5,
                "video.use_log": True,
                "is_depth_map": True,
            },
        }
    for k, dtype in (
        ("timestamp", "float32"),
        ("frame_index", "int64"),
        ("episode_index", "int64"),
        ("index", "int64"),
        ("task_index", "int64"),
    ):
        features[k] = {"dtype": dtype, "shape": [1], "names": None}
    info = {
        "codebase_version": version,
        "robot_type": "so100",
        "total_episodes": len(lengths),
        "total_frames": sum(lengths),
        "total_tasks": 1,
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": FPS,
        "splits": {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if use_videos else None,
        "features": features,
    }
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    pq.write_table(pa.table({"task_index": [0], "task": [TASK]}), root / "meta" / "tasks.parquet")

    fixed = pa.list_(pa.float32(), DIM)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    episodes, index, level = [], 0, 0
    for f, first in enumerate(range(0, len(lengths), per_file)):
        rows, ep_rows, video, start_in_file = [], [], [], 0
        for e in range(first, min(first + per_file, len(lengths))):
            t = lengths[e]
            ep = {
                "action": rng.normal(size=(t, DIM)).astype(np.float32),
                "state": rng.normal(size=(t, DIM)).astype(np.float32),
                "level": (np.arange(level, level + t) * 17 % 238).astype(np.uint8),
            }
            level += t
            frames = level_frames(ep["level"])
            episodes.append(ep)
            for i in range(t):
                row = {
                    "action": ep["action"][i],
                    "observation.state": ep["state"][i],
                    "timestamp": i / FPS,
                    "frame_index": i,
                    "episode_index": e,
                    "index": index + i,
                    "task_index": 0,
                }
                if not use_videos:
                    row[cam] = {"bytes": png(frames[i]), "path": f"frame-{i:06d}.png"}
                rows.append(row)
            video += frames
            stats = {
                f"stats/{k}/{s}": getattr(ep[a], s)(axis=0).tolist()
                for k, a in (("action", "action"), ("observation.state", "state"))
                for s in ("min", "max", "mean", "std")
            }
            ep_row = {
                "episode_index": e,
                "tasks": [TASK],
                "length": t,
                "data/chunk_index": 0,
                "data/file_index": f,
                "dataset_from_index": index,
                "dataset_to_index": index + t,
                **stats,
                "meta/episodes/chunk_index": 0,
                "meta/episodes/file_index": f // 2,
            }
            if use_videos:
                ep_row.update(
                    {
                        f"videos/{cam}/chunk_index": 0,
                        f"videos/{cam}/file_index": f,
                        f"videos/{cam}/from_timestamp": start_in_file / FPS,
                        f"videos/{cam}/to_timestamp": (start_in_file + t) / FPS,
                    }
                )
                if depth:
                    ep_row.update(
                        {
                            "videos/observation.images.depth/chunk_index": 0,
                            "videos/observation.images.depth/file_index": f,
                            "videos/observation.images.depth/from_timestamp": start_in_file / FPS,
                        }
                    )
            ep_rows.append(ep_row)
            index += t
            start_in_file += t
        fields = (
            [("action", fixed), ("observation.state", fixed)]
            + ([] if use_videos else [(cam, image)])
            + [
                ("timestamp", pa.float32()),
                ("frame_index", pa.int64()),
                ("episode_index", pa.int64()),
                ("index", pa.int64()),
                ("task_index", pa.int64()),
            ]
        )
        data = root / "data" / "chunk-000" / f"file-{f:03d}.parquet"
        data.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), data)
        meta = root / "meta" / "episodes" / "chunk-000" / f"file-{f // 2:03d}.parquet"  # 2 data files' rows each
        meta.parent.mkdir(parents=True, exist_ok=True)
        if meta.exists():
            ep_rows = pq.read_table(meta).to_pylist() + ep_rows
        pq.write_table(pa.Table.from_pylist(ep_rows), meta)
        if use_videos:
            encode_av1(root / "videos" / cam / "chunk-000" / f"file-{f:03d}.mp4", video)
    return episodes


def frame_levels(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as c:
        return np.array([f.to_ndarray(format="rgb24")[..., 0].mean() for f in c.decode(video=0)])


def check_round_trip(out: Path, root: Path, episodes: list[dict]) -> None:
    samples = by_source(read_samples(out))
    assert len(samples) == len(episodes)
    for e, ep in enumerate(episodes):
        m = samples[f"{root}::{e}"]
        meta = json.loads(m["meta.json"])
        assert (meta["embodiment"], meta["cameras"], meta["fps"], meta["episode_index"]) == ("so100", ["top"], 10.0, e)
        assert meta["task"] == meta["instruction"] == TASK and meta["n_frames"] == len(ep["action"])
        assert npy(m["action.npy"]).tobytes() == ep["action"].tobytes()
        assert npy(m["state.npy"]).tobytes() == ep["state"].tobytes()
        np.testing.assert_allclose(
            frame_levels(m["top.mp4"]), ep["level"], atol=7
        )  # its own frames, in order (levels 17 apart)


def test_video_dataset_with_episodes_spread_over_files(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "so100_pick"
    episodes = write_lerobot_v3(root, rng, [7, 5, 9, 6, 8], per_file=2)  # 3 data + 3 video files, 2 meta files
    out = tmp_path / "out"
    wm(
        "ingest",
        "episodes",
        str(root),
        str(tmp_path / "not_a_dataset"),
        "--format",
        "lerobot",
        "--out",
        str(out),
        "--workers",
        "1",
        check_rc=3,
    )
    assert "meta/info.json" in failures(out)["not_a_dataset"]
    check_round_trip(out, root, episodes)


def test_image_feature_dataset_png_bytes_in_parquet(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "so100_images"
    episodes = write_lerobot_v3(root, rng, [6, 8, 5], use_videos=False, per_file=2)
    out = tmp_path / "out"
    proc = wm("ingest", "episodes", str(root), "--format", "lerobot", "--out", str(out), "--workers", "1", check_rc=0)
    assert "3 samples" in proc.stdout
    check_round_trip(out, root, episodes)


def test_depth_feature_is_refused_by_name_and_skipped_with_camera(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "rgbd"
    episodes = write_lerobot_v3(root, rng, [6, 7], depth=True)
    out = tmp_path / "out"
    proc = wm("ingest", "episodes", str(root), "--format", "lerobot", "--out", str(out), "--workers", "1", check_rc=3)
    assert "0 samples" in proc.stdout
    reason = failures(out)["rgbd"]
    assert "'observation.images.depth'" in reason and "not supported" in reason and "--camera top" in reason
    assert "\n" not in reason
    out2 = tmp_path / "out2"
    wm(
        "ingest",
        "episodes",
        str(root),
        "--format",
        "lerobot",
        "--out",
        str(out2),
        "--camera",
        "top",
        "--workers",
        "1",
        check_rc=0,
    )
    check_round_trip(out2, root, episodes)


def test_repo_id_is_found_in_the_lerobot_cache_and_v21_names_the_converter(tmp_path):
    rng = np.random.default_rng(5)
    hf_home = tmp_path / "hf"
    root = hf_home / "lerobot" / "lerobot" / "pusht"  # $HF_HOME/lerobot/<repo_id>: LeRobot's default root
    episodes = write_lerobot_v3(root, rng, [5, 6])
    write_lerobot_v3(hf_home / "lerobot" / "someone" / "old_v21", rng, [5], version="v2.1")
    env = {"HF_HOME": str(hf_home)}
    env_clean = {k: v for k, v in os.environ.items() if k != "HF_LEROBOT_HOME"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wm_pipeline",
            "ingest",
            "episodes",
            "lerobot/pusht",
            "someone/old_v21",
            "nobody/missing",
            "--format",
            "lerobot",
            "--out",
            str(out),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env_clean, **env},
        cwd=tmp_path,
    )
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    check_round_trip(out, root, episodes)
    reasons = failures(out)
    assert (
        "python -m lerobot.scripts.convert_dataset_v21_to_v30 --repo-id=someone/old_v21 "
        f"--root={hf_home / 'lerobot' / 'someone' / 'old_v21'} --push-to-hub=false"
    ) in reasons["old_v21"]
    assert "v2.1" in reasons["old_v21"]
    assert (
        "not in the LeRobot cache" in reasons["missing"]
        and str(hf_home / "lerobot" / "nobody" / "missing") in reasons["missing"]
    )

    # $HF_LEROBOT_HOME wins over $HF_HOME, and LeRobot's Hub snapshot cache is looked in too
    snapshot = tmp_path / "home2" / "hub" / "datasets--lerobot--aloha" / "snapshots" / "0123abcd"
    write_lerobot_v3(snapshot, rng, [5])
    out2 = tmp_path / "out2"
    wm(
        "ingest",
        "episodes",
        "lerobot/aloha",
        "--format",
        "lerobot",
        "--out",
        str(out2),
        "--workers",
        "1",
        check_rc=0,
        env={**env, "HF_LEROBOT_HOME": str(tmp_path / "home2")},
    )
    assert len(read_samples(out2)) == 1


def test_lerobot_home_defaults_like_lerobot(monkeypatch, tmp_path):
    for k in ("HF_LEROBOT_HOME", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    assert lerobot_home() == Path.home() / ".cache" / "huggingface" / "lerobot"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lerobot_home() == tmp_path / "xdg" / "huggingface" / "lerobot"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert lerobot_home() == tmp_path / "hf" / "lerobot"
    monkeypatch.setenv("HF_LEROBOT_HOME", "~/lr")
    assert lerobot_home() == Path.home() / "lr"


def test_metadata_is_read_once_per_file(tmp_path):
    """The episode table and each data parquet are read once for the whole dataset, not once per episode."""
    import pyarrow.parquet as pq_mod

    from shards import ingest_lerobot

    root = tmp_path / "ds"
    write_lerobot_v3(root, np.random.default_rng(6), [5] * 6, use_videos=False, per_file=2)
    for fn in (ingest_lerobot.read_info, ingest_lerobot.episode_table, ingest_lerobot.data_file):
        fn.cache_clear()
    reads: list[str] = []
    real = pq_mod.read_table

    def counting(path, *a, **k):
        reads.append(Path(path).name)
        return real(path, *a, **k)

    pq_mod.read_table = counting
    try:
        items = ingest_lerobot.lerobot_inputs([str(root)])
        eps = [ingest_lerobot.episode_data(str(root), int(i.rpartition("::")[2])) for i in items]
    finally:
        pq_mod.read_table = real
    assert [len(e.action) for e in eps] == [5] * 6
    assert sorted(reads) == sorted(["file-000.parquet", "file-001.parquet"] + [f"file-00{i}.parquet" for i in range(3)])
