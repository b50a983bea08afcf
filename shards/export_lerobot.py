"""Export a shard dataset as a LeRobot v3 dataset (the layout ``LeRobotDataset(root=DIR)`` reads).

    export_lerobot("data/robot", "exports/robot")        # wm export lerobot data/robot --out exports/robot

The folder written (LeRobot's v3.0 layout, as ``lerobot.datasets`` writes and reads it)::

    meta/info.json                          codebase_version "v3.0", fps (int), robot_type, features, totals,
                                            chunks_size, data_files_size_in_mb, video_files_size_in_mb,
                                            data_path / video_path templates, splits
    meta/tasks.parquet                      one row per task: task_index, index = the task string
    meta/episodes/chunk-000/file-000.parquet one row per episode (columns below)
    meta/stats.json                         {feature: {min, max, mean, std, count, q01, q10, q50, q90, q99}}
    data/chunk-CCC/file-FFF.parquet         one row per frame: action, observation.state, timestamp,
                                            frame_index, episode_index, index, task_index
    videos/observation.images.<cam>/chunk-CCC/file-FFF.mp4   many episodes per file, one after the other

Episode rows: ``episode_index``, ``tasks`` (a list of one string), ``length``, ``data/chunk_index``,
``data/file_index``, ``dataset_from_index``, ``dataset_to_index`` (rows of the whole dataset),
``videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp}``,
``meta/episodes/{chunk_index, file_index}``, ``stats/<feature>/<stat>`` (the episode's own stats), and
``wm/key``, ``wm/task``, ``wm/success``, ``wm/seed`` (the sample this episode came from).

What maps to what:

- one sample = one episode, in manifest shard order, then tar order; ``index`` counts rows over the
  whole dataset, ``timestamp = frame_index / fps`` (float32);
- ``action.npy`` -> ``action``, ``state.npy`` -> ``observation.state`` (float32, bit-exact);
- camera ``<cam>`` -> video feature ``observation.images.<cam>``: the sample's H.264 stream is copied
  packet by packet (no re-encode: frames are the shard's frames exactly), its timestamps shifted
  so that frame ``t`` of the episode sits at ``from_timestamp + t / fps`` in the file. A new file
  starts when one would pass ``video_files_size_in_mb`` or when a stream's codec parameters differ
  from the file's;
- the LeRobot task is the sample's ``instruction``, or its ``task`` when the instruction is empty;
- image stats are per channel in [0, 1] (shape ``[3, 1, 1]``) over up to ``STAT_FRAMES`` evenly spaced
  frames per episode; dataset stats combine the episodes' (count-weighted mean, pooled variance, min,
  max; quantiles count-weighted means of the episodes', as LeRobot aggregates them).

One embodiment per LeRobot dataset (it has one ``robot_type`` and one action size): ``embodiment``
picks it when the shards hold several. Samples without actions are left out (and counted). LeRobot
stores an integer fps: a dataset whose fps is not a whole number is refused.

The result is written into ``<out>.tmp-<pid>`` and renamed to ``out`` at the end: ``out`` is either
absent or complete. ``out`` must not exist (or be an empty folder).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .format import ACTION, META, STATE, FormatError, SampleMeta, read_manifest
from .location import locate
from .tar_reader import read_tar_samples

log = logging.getLogger(__name__)

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
TASKS_PATH = "meta/tasks.parquet"
CHUNKS_SIZE = 1000  # files per chunk folder (LeRobot's default)
DATA_FILE_MB = 100  # LeRobot's defaults for starting a new file
VIDEO_FILE_MB = 200
CAMERA_PREFIX = "observation.images."
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
STAT_FRAMES = 64  # frames per episode that image stats look at
INDEX_FEATURES = {
    "timestamp": "float32",
    "frame_index": "int64",
    "episode_index": "int64",
    "index": "int64",
    "task_index": "int64",
}


class ExportError(ValueError):
    """The dataset cannot be exported as asked; ``str(e)`` is one line naming the file or the problem."""


@dataclasses.dataclass
class ExportResult:
    out: Path
    episodes: int
    frames: int
    tasks: int
    skipped: int  # samples left out: another embodiment, or no actions
    video_files: int


# ---------------------------------------------------------------- stats


def feature_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """LeRobot's per-feature stats of rows ``x [N, D]``: min, max, mean, std (population), count, q01..q99."""
    x = np.asarray(x, np.float64)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([len(x)])}
    for q, v in zip(QUANTILES, np.quantile(x, QUANTILES, axis=0)):
        out[f"q{round(q * 100):02d}"] = v
    return out


def image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel stats of uint8 ``frames [N, H, W, 3]`` in [0, 1], each of shape ``[3, 1, 1]``
    (``count``: frames looked at), as LeRobot keeps them for image and video features."""
    step = max(1, min(frames.shape[1:3]) // 150)  # LeRobot looks at ~150 px images too
    pixels = frames[:, ::step, ::step].reshape(-1, 3) / 255.0
    stats = feature_stats(pixels)
    return {k: (v if k == "count" else v.reshape(3, 1, 1)) for k, v in stats.items()} | {
        "count": np.array([len(frames)])
    }


def aggregate_stats(per_episode: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Combine episodes' stats of one feature: count-weighted mean, pooled variance, min, max, summed
    count; quantiles as count-weighted means of the episodes' quantiles."""
    counts = np.array([float(s["count"][0]) for s in per_episode])
    w = counts / counts.sum()

    def wsum(name: str) -> np.ndarray:
        return sum(wi * s[name] for wi, s in zip(w, per_episode))

    mean = wsum("mean")
    var = sum(wi * (s["std"] ** 2 + (s["mean"] - mean) ** 2) for wi, s in zip(w, per_episode))
    out = {
        "min": np.min([s["min"] for s in per_episode], 0),
        "max": np.max([s["max"] for s in per_episode], 0),
        "mean": mean,
        "std": np.sqrt(var),
        "count": np.array([int(counts.sum())]),
    }
    for q in QUANTILES:
        name = f"q{round(q * 100):02d}"
        out[name] = wsum(name)
    return out


def _tolist(stats: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: np.asarray(v).tolist() for k, v in stats.items()}


# ---------------------------------------------------------------- files


def _next_file(chunk: int, file: int) -> tuple[int, int]:
    """LeRobot's numbering: files 0..CHUNKS_SIZE-1 in a chunk folder, then the next chunk."""
    return (chunk + 1, 0) if file == CHUNKS_SIZE - 1 else (chunk, file + 1)


class _VideoFiles:
    """One camera's MP4 files: each episode's H.264 packets appended to the current file with shifted
    timestamps (stream copy, no re-encode); a new file when the size limit or the codec parameters say so."""

    def __init__(self, root: Path, key: str, fps: int, max_bytes: int):
        self.root, self.key, self.fps, self.max_bytes = root, key, fps, max_bytes
        self.chunk, self.file, self.files = 0, -1, 0
        self._out = self._stream = self._extradata = None
        self._frames = self._bytes = 0

    def _open(self, template) -> None:
        import av

        self.close()
        self.chunk, self.file = (0, 0) if self.file < 0 else _next_file(self.chunk, self.file)
        path = self.root / VIDEO_PATH.format(video_key=self.key, chunk_index=self.chunk, file_index=self.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._out = av.open(str(path), "w", format="mp4")
        self._stream = self._out.add_stream_from_template(template)
        self._stream.time_base = Fraction(1, self.fps)
        self._extradata = bytes(template.codec_context.extradata or b"")
        self._frames = self._bytes = 0
        self.files += 1

    def append(self, mp4: bytes, n_frames: int, where: str) -> tuple[int, int, float, float]:
        """Append one episode's video; returns (chunk_index, file_index, from_timestamp, to_timestamp)."""
        import av

        try:
            src = av.open(io.BytesIO(mp4), "r")
        except (av.FFmpegError, OSError) as e:
            raise ExportError(f"{where}: not a readable MP4 ({e})") from None
        with src:
            stream = src.streams.video[0]
            if stream.codec_context.name != "h264":
                raise ExportError(f"{where}: codec {stream.codec_context.name}, expected h264")
            extradata = bytes(stream.codec_context.extradata or b"")
            if (
                self._out is None
                or extradata != self._extradata
                or (self._frames and self._bytes + len(mp4) > self.max_bytes)
            ):
                self._open(stream)
            start = self._frames
            tb = stream.time_base
            shift = Fraction(start, self.fps) / tb  # the episode's first frame at start / fps
            if shift.denominator != 1:
                raise ExportError(f"{where}: time base {tb} cannot hold frame times of {self.fps} fps")
            count = 0
            for packet in src.demux(stream):
                if packet.dts is None and packet.pts is None:
                    continue  # the demuxer's end-of-stream flush packet
                packet.pts = None if packet.pts is None else packet.pts + int(shift)
                packet.dts = None if packet.dts is None else packet.dts + int(shift)
                packet.stream = self._stream
                self._out.mux(packet)
                count += 1
        if count != n_frames:
            raise ExportError(f"{where}: {count} video packets, but meta.json says {n_frames} frames")
        self._frames += n_frames
        self._bytes += len(mp4)
        return self.chunk, self.file, start / self.fps, self._frames / self.fps

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


class _DataFiles:
    """The frame rows, written as one parquet file per ``DATA_FILE_MB`` (LeRobot's column types)."""

    def __init__(self, root: Path, action_dim: int, state_dim: int, max_bytes: int):
        import pyarrow as pa

        self.root, self.max_bytes = root, max_bytes
        fields = [pa.field("action", pa.list_(pa.float32(), action_dim))]
        if state_dim:
            fields.append(pa.field("observation.state", pa.list_(pa.float32(), state_dim)))
        fields += [
            pa.field(name, pa.float32() if dtype == "float32" else pa.int64()) for name, dtype in INDEX_FEATURES.items()
        ]
        self.schema = pa.schema(fields)
        self.chunk, self.file = 0, 0
        self._writer, self._bytes = None, 0

    def append(self, columns: dict[str, np.ndarray]) -> tuple[int, int]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = []
        for field in self.schema:
            value = columns[field.name]
            if pa.types.is_fixed_size_list(field.type):
                flat = pa.array(np.ascontiguousarray(value, np.float32).reshape(-1), pa.float32())
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, field.type.list_size))
            else:
                arrays.append(pa.array(value, field.type))
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        if self._writer is not None and self._bytes + table.nbytes > self.max_bytes:
            self.close()
            self.chunk, self.file = _next_file(self.chunk, self.file)
        if self._writer is None:
            path = self.root / DATA_PATH.format(chunk_index=self.chunk, file_index=self.file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._writer, self._bytes = pq.ParquetWriter(str(path), self.schema, compression="snappy"), 0
        self._writer.write_table(table)  # one row group per episode, as LeRobot does
        self._bytes += table.nbytes
        return self.chunk, self.file

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _write_tasks(path: Path, tasks: list[str]) -> None:
    """``meta/tasks.parquet`` as pandas writes ``DataFrame({"task_index": ...}, index=Index(tasks, name="task"))``
    (LeRobot reads it with ``pd.read_parquet`` and looks tasks up by that index)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.0.0",
    }
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    table = table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
    pq.write_table(table, str(path))


# ---------------------------------------------------------------- the export


def _samples(src, manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    root = locate(src)
    for shard in manifest["shards"]:
        path = root / shard["name"]
        for sample in read_tar_samples(path):
            yield f"{path}:{sample['__key__']}", sample


def _pick_embodiment(manifest: dict[str, Any], embodiment: str | None, where: str) -> tuple[str, dict]:
    bodies = manifest["embodiments"]
    acting = sorted(n for n, e in bodies.items() if e.get("action_dim"))
    if embodiment is not None:
        if embodiment not in bodies:
            raise ExportError(f"{where}: no embodiment {embodiment!r} (the dataset has {sorted(bodies)})")
        if not bodies[embodiment].get("action_dim"):
            raise ExportError(f"{where}: embodiment {embodiment!r} has no actions; LeRobot datasets need them")
        return embodiment, bodies[embodiment]
    if not acting:
        raise ExportError(
            f"{where}: no sample has actions (embodiments {sorted(bodies)}); a LeRobot dataset needs them"
        )
    if len(acting) > 1:
        raise ExportError(
            f"{where}: samples of several embodiments {acting}; a LeRobot dataset holds one (choose with --embodiment)"
        )
    return acting[0], bodies[acting[0]]


def _integer_fps(fps: float, where: str) -> int:
    if abs(fps - round(fps)) > 1e-6 or round(fps) < 1:
        raise ExportError(f"{where}: fps {fps:g} is not a whole number; LeRobot datasets store an integer fps")
    return int(round(fps))


def export_lerobot(
    src,
    out_dir: str | Path,
    *,
    embodiment: str | None = None,
    robot_type: str | None = None,
    data_file_mb: float = DATA_FILE_MB,
    video_file_mb: float = VIDEO_FILE_MB,
) -> ExportResult:
    """Write the shard dataset ``src`` (folder or URL) as a LeRobot v3 dataset in ``out_dir`` (module docstring).

    ``robot_type`` defaults to the embodiment's name. Raises ``ExportError`` / ``FormatError`` (one line)."""
    from .decode import decode_video

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; choose a new --out")
    manifest = read_manifest(src)
    where = str(locate(src) / "manifest.json")
    name, body = _pick_embodiment(manifest, embodiment, where)
    fps = _integer_fps(float(body["fps"]), where)
    action_dim, state_dim, cameras = int(body["action_dim"]), int(body.get("state_dim") or 0), list(body["cameras"])
    height, width = manifest["resolution"]
    video_keys = {cam: CAMERA_PREFIX + cam for cam in cameras}

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        data = _DataFiles(tmp, action_dim, state_dim, int(data_file_mb * 2**20))
        videos = {cam: _VideoFiles(tmp, key, fps, int(video_file_mb * 2**20)) for cam, key in video_keys.items()}
        tasks: dict[str, int] = {}
        episodes: list[dict[str, Any]] = []
        stats: dict[str, list[dict[str, np.ndarray]]] = {}
        total, skipped = 0, 0
        try:
            for at, sample in _samples(src, manifest):
                meta = SampleMeta.from_json(sample[META], f"{at}.{META}")
                if meta.embodiment != name or not meta.has_action:
                    skipped += 1
                    continue
                if _integer_fps(meta.fps, f"{at}.{META}") != fps:
                    raise ExportError(f"{at}: fps {meta.fps:g} differs from the embodiment's {fps}")
                if list(meta.cameras) != cameras:
                    raise ExportError(f"{at}: cameras {meta.cameras} differ from the embodiment's {cameras}")
                n = meta.n_frames
                action = np.load(io.BytesIO(sample[ACTION]), allow_pickle=False).astype(np.float32, copy=False)
                state = (
                    np.load(io.BytesIO(sample[STATE]), allow_pickle=False).astype(np.float32, copy=False)
                    if STATE in sample
                    else None
                )
                if action.shape != (n, action_dim):
                    raise ExportError(f"{at}.{ACTION}: shape {list(action.shape)}, expected [{n}, {action_dim}]")
                if not state_dim:
                    state = None
                elif state is None or state.shape != (n, state_dim):
                    got = "absent" if state is None else f"shape {list(state.shape)}"
                    raise ExportError(f"{at}.{STATE}: {got}, expected [{n}, {state_dim}]")
                task = meta.instruction or meta.task
                task_index = tasks.setdefault(task, len(tasks))
                ep = len(episodes)
                frame_index = np.arange(n, dtype=np.int64)
                columns = {
                    "action": action,
                    "observation.state": state,
                    "timestamp": (frame_index / fps).astype(np.float32),
                    "frame_index": frame_index,
                    "episode_index": np.full(n, ep, np.int64),
                    "index": total + frame_index,
                    "task_index": np.full(n, task_index, np.int64),
                }
                chunk, file = data.append(columns)
                row: dict[str, Any] = {
                    "episode_index": ep,
                    "tasks": [task],
                    "length": n,
                    "data/chunk_index": chunk,
                    "data/file_index": file,
                    "dataset_from_index": total,
                    "dataset_to_index": total + n,
                }
                ep_stats = {k: feature_stats(v.reshape(n, -1)) for k, v in columns.items() if v is not None}
                for cam, key in video_keys.items():
                    mp4 = sample.get(f"{cam}.mp4")
                    if mp4 is None:
                        raise ExportError(f"{at}: no {cam}.mp4 member")
                    vc, vf, t0, t1 = videos[cam].append(mp4, n, f"{at}.{cam}.mp4")
                    row.update(
                        {
                            f"videos/{key}/chunk_index": vc,
                            f"videos/{key}/file_index": vf,
                            f"videos/{key}/from_timestamp": t0,
                            f"videos/{key}/to_timestamp": t1,
                        }
                    )
                    picks = np.unique(np.linspace(0, n - 1, min(n, STAT_FRAMES)).round().astype(int))
                    ep_stats[key] = image_stats(decode_video(mp4, picks.tolist(), source=f"{at}.{cam}.mp4"))
                row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
                for feature, s in ep_stats.items():
                    stats.setdefault(feature, []).append(s)
                    row.update({f"stats/{feature}/{k}": np.asarray(v).tolist() for k, v in s.items()})
                row.update({"wm/key": meta.key, "wm/task": meta.task, "wm/success": meta.success, "wm/seed": meta.seed})
                episodes.append(row)
                total += n
        finally:
            data.close()
            for v in videos.values():
                v.close()
        if not episodes:
            raise ExportError(f"{where}: no sample of embodiment {name!r} with actions to export")
        _write_meta(
            tmp,
            episodes,
            list(tasks),
            stats,
            fps=fps,
            robot_type=robot_type or name,
            action_dim=action_dim,
            state_dim=state_dim,
            video_keys=list(video_keys.values()),
            size=(height, width),
            data_file_mb=data_file_mb,
            video_file_mb=video_file_mb,
        )
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d episode(s), %d frame(s) to %s (%d sample(s) skipped)", len(episodes), total, out, skipped)
    return ExportResult(out, len(episodes), total, len(tasks), skipped, sum(v.files for v in videos.values()))


def _write_meta(
    root: Path,
    episodes: list[dict[str, Any]],
    tasks: list[str],
    stats: dict[str, list],
    *,
    fps: int,
    robot_type: str,
    action_dim: int,
    state_dim: int,
    video_keys: list[str],
    size: tuple[int, int],
    data_file_mb: float,
    video_file_mb: float,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    features: dict[str, Any] = {"action": {"dtype": "float32", "shape": [action_dim], "names": None}}
    if state_dim:
        features["observation.state"] = {"dtype": "float32", "shape": [state_dim], "names": None}
    for key in video_keys:
        features[key] = {
            "dtype": "video",
            "shape": [size[0], size[1], 3],
            "names": ["height", "width", "channels"],
            "info": {
                "video.height": size[0],
                "video.width": size[1],
                "video.codec": "h264",
                "video.pix_fmt": "yuv420p",
                "video.is_depth_map": False,
                "video.fps": fps,
                "video.channels": 3,
                "has_audio": False,
            },
        }
    features.update({name: {"dtype": dtype, "shape": [1], "names": None} for name, dtype in INDEX_FEATURES.items()})
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": len(episodes),
        "total_frames": episodes[-1]["dataset_to_index"],
        "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": data_file_mb,
        "video_files_size_in_mb": video_file_mb,
        "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if video_keys else None,
        "features": features,
    }
    (root / "meta").mkdir(exist_ok=True)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4) + "\n")
    (root / "meta" / "stats.json").write_text(
        json.dumps({k: _tolist(aggregate_stats(v)) for k, v in stats.items()}, indent=4) + "\n"
    )
    _write_tasks(root / TASKS_PATH, tasks)
    path = root / EPISODES_PATH.format(chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episodes), str(path))


__all__ = ["export_lerobot", "ExportError", "ExportResult", "FormatError"]
