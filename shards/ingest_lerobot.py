"""Ingest LeRobot v3 datasets (the layout ``LeRobotDataset`` writes) into episodes.

A dataset folder::

    meta/info.json                        codebase_version v3.x, fps, robot_type, features, data_path, video_path
    meta/episodes/chunk-*/file-*.parquet  one row per episode: episode_index, tasks, data/{chunk,file}_index,
                                          dataset_{from,to}_index, videos/<key>/{chunk_index,file_index,from_timestamp}
    data/chunk-*/file-*.parquet           rows of many episodes: action, observation.state, timestamp, frame_index,
                                          episode_index; image features (``dtype: image``) as struct {bytes, path}
    videos/<key>/chunk-*/file-*.mp4       video features: many episodes per file

``SRC`` is a folder or a repo id (``lerobot/pusht``) looked up in LeRobot's local cache: the folder
``$HF_LEROBOT_HOME/<repo_id>`` (``HF_LEROBOT_HOME`` defaults to ``$HF_HOME/lerobot``, ``HF_HOME`` to
``$XDG_CACHE_HOME/huggingface`` or ``~/.cache/huggingface``, as ``lerobot.utils.constants`` computes
it), else the newest snapshot LeRobot downloaded into ``$HF_LEROBOT_HOME/hub``.

Metadata is read once per process: the episode table once per dataset, each data parquet once (kept
while its episodes are made, grouped by episode), so the metadata cost is linear in the number of
episodes (benchmarks/ingest_metadata.py).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from shards.ingest_episodes import DEFAULT_EMBODIMENT, DEMO_SEP, frames_of
from shards.ingest_videos import source_id
from shards.writer import BadInput, Episode

CONVERTER = "lerobot.scripts.convert_dataset_v21_to_v30"  # LeRobot's v2.1 -> v3.0 converter (lerobot >= 0.5)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")
_IMAGE_KINDS = ("video", "image")


# ---------------------------------------------------------------- where the dataset is


def lerobot_home() -> Path:
    """``$HF_LEROBOT_HOME``, defaulting the way LeRobot does (``$HF_HOME/lerobot``)."""
    hf_home = os.path.expandvars(
        os.path.expanduser(
            os.getenv(
                "HF_HOME",
                os.path.join(
                    os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
                ),
            )
        )
    )
    return Path(os.getenv("HF_LEROBOT_HOME", os.path.join(hf_home, "lerobot"))).expanduser()


def resolve_dataset(src: str) -> str:
    """The dataset folder of ``src``: the folder itself, or a repo id found in LeRobot's local cache.
    Raises ``BadInput`` (one line naming where it looked) for a repo id that is not there."""
    if os.path.exists(src) or not _REPO_ID.match(src):
        return os.path.abspath(src)
    home = lerobot_home()
    local = home / src
    if local.is_dir():
        return str(local)
    snapshots = home / "hub" / ("datasets--" + src.replace("/", "--")) / "snapshots"
    found = sorted(
        (p for p in snapshots.glob("*") if (p / "meta" / "info.json").is_file()),
        key=lambda p: (p / "meta" / "info.json").stat().st_mtime,
    )
    if found:
        return str(found[-1])
    raise BadInput(
        f"{src}: no such folder, and not in the LeRobot cache ({local} nor {snapshots}/*); download it "
        f"first (e.g. LeRobotDataset('{src}')) or set HF_LEROBOT_HOME"
    )


def repo_id_of(root: str) -> str:
    """A repo id for messages: ``<owner>/<name>`` of the folder under ``$HF_LEROBOT_HOME``, else ``<parent>/<name>``."""
    p = Path(root)
    try:
        rel = p.relative_to(lerobot_home())
        if len(rel.parts) == 2:
            return "/".join(rel.parts)
    except ValueError:
        pass
    return f"{p.parent.name or 'local'}/{p.name}"


# ---------------------------------------------------------------- metadata, read once per process


@functools.lru_cache(maxsize=8)
def read_info(root: str) -> dict:
    """``meta/info.json`` of a v3 dataset; a v2.x dataset is refused naming LeRobot's converter."""
    path = Path(root) / "meta" / "info.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"not a LeRobot dataset folder: cannot read meta/info.json ({e})") from None
    version = str(info.get("codebase_version", ""))
    if version.startswith("v2"):
        raise BadInput(
            f"LeRobot dataset format {version} (only v3.x is read): convert it in place with LeRobot's "
            f"converter: python -m {CONVERTER} --repo-id={repo_id_of(root)} --root={root} "
            f"--push-to-hub=false"
        )
    if not version.startswith("v3"):
        raise BadInput(f"LeRobot codebase_version {info.get('codebase_version')!r}: only v3.x is supported")
    return info


def is_depth(feature: dict) -> bool:
    """LeRobot's depth flag: ``info.is_depth_map`` (or the legacy ``video.is_depth_map`` in ``info`` / ``video_info``)."""
    info, video_info = feature.get("info") or {}, feature.get("video_info") or {}
    return bool(info.get("is_depth_map") or info.get("video.is_depth_map") or video_info.get("video.is_depth_map"))


def camera_name(key: str) -> str:
    return _UNSAFE.sub("_", key.removeprefix("observation.images.").removeprefix("observation."))


def image_features(info: dict, cameras: list[str] | None) -> dict[str, tuple[str, str]]:
    """``{camera: (feature key, "video" | "image")}`` of the features to ingest. A depth feature that would
    be ingested is refused by name (it would otherwise be read as an RGB camera)."""
    out, depth = {}, []
    for key, feature in info.get("features", {}).items():
        if feature.get("dtype") not in _IMAGE_KINDS:
            continue
        cam = camera_name(key)
        if cameras and cam not in cameras:
            continue
        if is_depth(feature):
            depth.append((key, cam))
        else:
            out[cam] = (key, feature["dtype"])
    if depth:
        keys = ", ".join(repr(k) for k, _ in depth)
        others = ",".join(sorted(out))
        hint = f"--camera {others}" if others else "--camera with the non-depth cameras"
        raise BadInput(
            f"depth feature(s) {keys} (is_depth_map) are not supported (they would be stored as RGB "
            f"video): skip them with {hint}"
        )
    return out


_EPISODE_COLUMNS = ("episode_index", "tasks", "data/chunk_index", "data/file_index")


@functools.lru_cache(maxsize=8)
def episode_table(root: str) -> dict[int, dict]:
    """``{episode_index: row}`` of ``meta/episodes/*.parquet``: the columns ingest uses, read once."""
    import pyarrow.parquet as pq

    read_info(root)
    files = sorted((Path(root) / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise BadInput("no meta/episodes/chunk-*/file-*.parquet")
    rows: dict[int, dict] = {}
    for f in files:
        try:
            names = pq.read_schema(f).names
            wanted = [
                c
                for c in names
                if c in _EPISODE_COLUMNS
                or (c.startswith("videos/") and c.endswith(("/chunk_index", "/file_index", "/from_timestamp")))
            ]
            columns = pq.read_table(f, columns=wanted).to_pydict()
            indices = columns["episode_index"]
        except (OSError, ValueError, KeyError) as e:
            raise BadInput(f"{f}: unreadable episode metadata ({e})") from None
        for i, index in enumerate(indices):
            rows[int(index)] = {c: v[i] for c, v in columns.items()}
    return rows


@dataclasses.dataclass
class DataFile:
    """One data parquet, sorted by (episode_index, frame_index), with each episode's row range."""

    table: object  # pyarrow.Table
    ranges: dict[int, tuple[int, int]]  # episode_index -> (first row, end row)


@functools.lru_cache(maxsize=2)  # inputs come in episode order, so one file is used for a run of episodes
def data_file(path: str) -> DataFile:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: unreadable ({e})") from None
    if "episode_index" not in table.column_names:
        raise BadInput(f"{path}: no 'episode_index' column")
    order = [("episode_index", "ascending")] + (
        [("frame_index", "ascending")] if "frame_index" in table.column_names else []
    )
    table = table.sort_by(order)
    episodes = table["episode_index"].to_numpy()
    ranges = {}
    if len(episodes):
        starts = np.flatnonzero(np.r_[True, episodes[1:] != episodes[:-1]])
        ends = np.r_[starts[1:], len(episodes)]
        ranges = {int(episodes[s]): (int(s), int(e)) for s, e in zip(starts, ends)}
    return DataFile(table, ranges)


def numeric_column(column, what: str) -> np.ndarray:
    """A float32 ``[T, d]`` array from a list / fixed-size-list / scalar numeric column (float32 bit-exact)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    try:
        if (
            pa.types.is_list(column.type)
            or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)
        ):
            values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
            if n and values.size % n:
                raise BadInput(f"{what}: rows of different lengths")
            values = values.reshape(n, -1 if n else 0)
        else:
            values = column.to_numpy(zero_copy_only=False).reshape(n, 1)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise BadInput(f"{what}: not a numeric column ({e})") from None
    if not np.issubdtype(values.dtype, np.number) and values.dtype != np.bool_:
        raise BadInput(f"{what}: not a numeric column ({values.dtype})")
    return values.astype(np.float32, copy=False)


@dataclasses.dataclass
class EpisodeData:
    """The metadata part of one episode: its table row, its data rows and the arrays made of them."""

    root: str
    index: int
    row: dict
    rows: object  # pyarrow.Table slice, rows in frame order
    action: np.ndarray
    state: np.ndarray | None
    timestamps: np.ndarray  # seconds from the episode's start


def episode_data(root: str, index: int) -> EpisodeData:
    """Episode ``index`` of the dataset at ``root``, without its images (the metadata part of ingest)."""
    info, row = read_info(root), episode_table(root)[index]
    path = str(
        Path(root) / info["data_path"].format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
    )
    data = data_file(path)
    if index not in data.ranges:
        raise BadInput(f"{path}: no rows of episode {index}")
    start, end = data.ranges[index]
    rows = data.table.slice(start, end - start)
    columns = set(rows.column_names)
    if "action" not in columns:
        raise BadInput(f"{path}: no 'action' column")
    rate = float(info.get("fps") or 0) or None
    stamps = (
        rows["timestamp"].to_numpy().astype(np.float64)
        if "timestamp" in columns
        else np.arange(rows.num_rows) / (rate or 1.0)
    )
    return EpisodeData(
        root=root,
        index=index,
        row=row,
        rows=rows,
        action=numeric_column(rows["action"], f"{path}: 'action'"),
        state=numeric_column(rows["observation.state"], f"{path}: 'observation.state'")
        if "observation.state" in columns
        else None,
        timestamps=stamps,
    )


# ---------------------------------------------------------------- images


def _video_frames(path: Path, targets: np.ndarray, fps: float) -> np.ndarray:
    """Frames of ``path`` nearest to each time in ``targets`` (seconds): uint8 ``[len(targets), H, W, 3]``."""
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise BadInput(f"{path}: cannot open video ({e})") from None
    with container:
        stream = container.streams.video[0]
        lo, hi = targets.min() - 0.5 / fps, targets.max() + 0.5 / fps
        container.seek(int(max(lo, 0) / stream.time_base), stream=stream, backward=True)
        times, frames = [], []
        try:
            for frame in container.decode(stream):
                t = float(frame.time)
                if t >= hi:
                    break
                if t >= lo:
                    times.append(t)
                    frames.append(frame.to_ndarray(format="rgb24"))
        except av.FFmpegError as e:
            raise BadInput(f"{path}: decode error ({e})") from None
    if not frames:
        raise BadInput(f"{path}: no frame between {lo:.3f} s and {hi:.3f} s")
    times_a = np.asarray(times)
    nearest = np.abs(times_a[None, :] - targets[:, None]).argmin(axis=1)
    off = np.abs(times_a[nearest] - targets).max()
    if off > 0.5 / fps:
        raise BadInput(f"{path}: frames are up to {off:.3f} s away from the data's timestamps")
    return np.stack([frames[i] for i in nearest])


def _image_frames(ep: EpisodeData, key: str) -> np.ndarray:
    """The PNG (or any PIL-readable) images of an ``image`` feature, embedded in the data parquet as
    ``{bytes, path}`` structs (``datasets.Image`` storage), decoded to uint8 ``[T, H, W, 3]``."""
    from PIL import Image

    if key not in ep.rows.column_names:
        raise BadInput(f"episode {ep.index}: image feature {key!r} has no column in the data parquet")
    column = ep.rows[key].combine_chunks()
    try:
        blobs = column.field("bytes").to_pylist()
    except (KeyError, AttributeError, TypeError):
        raise BadInput(
            f"episode {ep.index}: column {key!r} is {column.type}, not an image struct {{bytes, path}}"
        ) from None
    frames = []
    for t, blob in enumerate(blobs):
        if blob is None:
            raise BadInput(f"episode {ep.index}: {key!r} row {t} holds no image bytes (images not embedded)")
        try:
            with Image.open(io.BytesIO(blob)) as im:
                if im.mode not in ("RGB", "RGBA", "L", "P", "LA"):
                    raise BadInput(f"episode {ep.index}: {key!r} image mode {im.mode} is not a colour/gray image")
                frames.append(np.asarray(im.convert("RGB")))
        except (OSError, ValueError) as e:
            raise BadInput(f"episode {ep.index}: {key!r} row {t} is not a readable image ({e})") from None
    try:
        return np.stack(frames)
    except ValueError:
        raise BadInput(f"episode {ep.index}: {key!r} images of different sizes") from None


# ---------------------------------------------------------------- inputs and episodes


def lerobot_inputs(sources: list[str], cameras: list[str] | None = None) -> list[str]:
    """One input ``"<dataset root>::<episode_index>"`` per episode listed in ``meta/episodes``; a source
    that cannot be used stays one input (``<root>`` or the source as given): its failure row later."""
    inputs = []
    for src in sources:
        try:
            root = resolve_dataset(src)
        except BadInput:
            inputs.append(src)
            continue
        try:
            episodes = episode_table(root)
            image_features(read_info(root), cameras)
        except BadInput:
            inputs.append(root)
            continue
        inputs += [f"{root}{DEMO_SEP}{i}" for i in sorted(episodes)]
    return inputs


def lerobot_episodes(
    item: str, *, embodiment: str | None, cameras: list[str] | None, resolution: int | None, fps: float
) -> Iterator[Episode]:
    """The episode ``item = "<root>::<episode_index>"`` of a LeRobot v3 dataset."""
    root, sep, index = item.rpartition(DEMO_SEP)
    if not sep:  # a source that yielded no episode: raise its reason
        root = resolve_dataset(item)
        episode_table(root)
        image_features(read_info(root), cameras)
        raise BadInput("no episode listed")
    info = read_info(root)
    ep = episode_data(root, int(index))
    rate = float(info.get("fps") or fps)
    images = {}
    for cam, (key, kind) in image_features(info, cameras).items():
        if kind == "image":
            images[cam] = _image_frames(ep, key)
            continue
        video = Path(root) / info["video_path"].format(
            video_key=key,
            chunk_index=ep.row[f"videos/{key}/chunk_index"],
            file_index=ep.row[f"videos/{key}/file_index"],
        )
        images[cam] = _video_frames(video, ep.row[f"videos/{key}/from_timestamp"] + ep.timestamps, rate)
    tasks = ep.row.get("tasks") or []
    yield Episode(
        key=f"{source_id(root)}-ep{ep.index:06d}",
        frames=frames_of(images, cameras, resolution, f"features of {root}"),
        fps=rate,
        embodiment=embodiment or info.get("robot_type") or DEFAULT_EMBODIMENT,
        task=tasks[0] if tasks else "",
        instruction=tasks[0] if tasks else "",
        source=item,
        action=ep.action,
        state=ep.state,
        episode_index=ep.index,
    )
