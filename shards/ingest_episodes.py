"""Ingest robot demonstrations (frames + per-frame actions and states) into shards.

Three input layouts (docs/INGEST.md has the full description):

- ``npz``: one episode per ``.npz`` file (loaded without pickle)::

      frames | image          uint8 [T, H, W, 3]      camera "image"
      <cam>_image            uint8 [T, H, W, 3]      camera "<cam>" (any number of cameras)
      action | actions       float [T, A]            required
      state  | states        float [T, S]            optional
      task, instruction, embodiment                  optional 0-d strings
      success                                        optional 0-d bool
      fps                                            optional 0-d number (else --fps)

- ``hdf5``: robomimic files, one episode per ``data/demo_N`` group::

      data/demo_N/actions            [T, A]
      data/demo_N/obs/<cam>_image    uint8 [T, H, W, 3]   camera "<cam>"
      data/demo_N/obs/<key>          [T, d]  low-dim keys, concatenated (sorted, or --state-keys) into state
      data.attrs["env_args"]         JSON: env_name -> task, env_kwargs.control_freq -> fps

- ``lerobot``: a LeRobot v3 dataset folder, one episode per ``meta/episodes`` row: ``action`` and
  ``observation.state`` columns of ``data/chunk-*/file-*.parquet``; every ``video`` feature
  ``observation.images.<cam>`` becomes camera ``<cam>``, its frames taken from
  ``videos/<key>/chunk-*/file-*.mp4`` at ``from_timestamp + timestamp``; ``tasks[0]`` is the task
  and instruction, ``robot_type`` the embodiment.

Each episode is one sample. Validation (action rows == frames, NaN/inf, dims consistent within an
embodiment, one resolution per dataset) is done by ``shards.writer``, which turns every problem into
a ``failures.jsonl`` row; this module only raises ``BadInput`` for what it alone can see (a missing
array, an unreadable file, an unknown camera).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from shards.ingest_videos import find_inputs, source_id, square_array
from shards.writer import BadInput, Episode, JobResult, run_sharded_job

log = logging.getLogger(__name__)

FORMATS = ("npz", "hdf5", "lerobot")
DEFAULT_EMBODIMENT = "robot"
DEFAULT_FPS = 10.0
BARE_CAMERA = "image"                       # the camera name of an npz's `frames` / `image` array
DEMO_SEP = "::"                             # input string "<file.hdf5>::<demo>"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def _natural(name: str) -> list:
    """Sort key that puts demo_2 before demo_10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _scalar(value: np.ndarray | bytes | str) -> object:
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode() if isinstance(value, bytes) else value


def _frames(arrays: dict[str, np.ndarray], cameras: list[str] | None, resolution: int | None,
            what: str) -> dict[str, np.ndarray]:
    """Pick the requested cameras from ``{camera: array}`` and resize them when asked."""
    if not arrays:
        raise BadInput(f"no image array found ({what})")
    if cameras:
        missing = [c for c in cameras if c not in arrays]
        if missing:
            raise BadInput(f"camera(s) {missing} not found; this episode has {sorted(arrays)}")
        arrays = {c: arrays[c] for c in cameras}
    out = {}
    for cam, a in arrays.items():
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
            raise BadInput(f"camera {cam!r}: images must be uint8 [T, H, W, 3], got {a.dtype} {list(a.shape)}")
        out[cam] = square_array(a, resolution) if resolution else a
    return out


# ---------------------------------------------------------------- npz

def npz_episodes(path: str, *, embodiment: str | None, cameras: list[str] | None, resolution: int | None,
                 fps: float) -> Iterator[Episode]:
    """The one episode of an ``.npz`` file (layout in the module docstring)."""
    if os.path.exists(path) and not zipfile.is_zipfile(path):
        raise BadInput("not an .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise BadInput("no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise BadInput(f"not a readable .npz file ({e})") from None
    images = {}
    for name, a in data.items():
        if name in ("frames", "image"):
            if BARE_CAMERA in images:
                raise BadInput("holds both 'frames' and 'image': which one is the camera?")
            images[BARE_CAMERA] = a
        elif name.endswith("_image"):
            images[name[: -len("_image")]] = a
    action = data.get("action", data.get("actions"))
    if action is None:
        raise BadInput(f"no 'action' (or 'actions') array; arrays: {sorted(data)}")
    meta = {k: _scalar(data[k]) for k in ("task", "instruction", "embodiment", "success", "fps") if k in data}
    yield Episode(
        key=source_id(path), frames=_frames(images, cameras, resolution, f"arrays: {sorted(data)}"),
        fps=float(meta.get("fps", fps)), embodiment=embodiment or str(meta.get("embodiment", DEFAULT_EMBODIMENT)),
        task=str(meta.get("task", "")), instruction=str(meta.get("instruction", "")), source=path,
        action=action, state=data.get("state", data.get("states")),
        success=None if "success" not in meta else bool(meta["success"]),
    )


# ---------------------------------------------------------------- hdf5 (robomimic)

def hdf5_inputs(paths: list[str]) -> list[str]:
    """One input ``"<file>::<demo>"`` per ``data/<demo>`` group; an unreadable file stays one input
    (it becomes a failure row when its episodes are made)."""
    inputs = []
    for path in paths:
        try:
            with h5py.File(path, "r") as f:
                demos = sorted(f["data"].keys(), key=_natural) if "data" in f else []
        except (OSError, KeyError, ValueError):
            demos = []
        inputs += [f"{path}{DEMO_SEP}{d}" for d in demos] or [path]
    return inputs


def _env_args(f: h5py.File) -> dict:
    try:
        return json.loads(f["data"].attrs.get("env_args", "{}"))
    except (TypeError, ValueError):
        return {}


def hdf5_episodes(item: str, *, embodiment: str | None, cameras: list[str] | None, resolution: int | None,
                  fps: float, state_keys: list[str] | None) -> Iterator[Episode]:
    """The episode of one robomimic demo, ``item = "<file>::<demo>"``."""
    path, sep, demo = item.rpartition(DEMO_SEP)
    if not sep:
        path, demo = item, ""
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise BadInput("no such file") from None
    except OSError as e:
        raise BadInput(f"not a readable HDF5 file ({e})") from None
    with f:
        if not demo:
            raise BadInput("no data/<demo> groups (not a robomimic file?)")
        g = f["data"][demo]
        if "actions" not in g or "obs" not in g:
            raise BadInput(f"data/{demo} lacks 'actions' or 'obs' (has {sorted(g.keys())})")
        obs = g["obs"]
        images = {k[: -len("_image")]: obs[k][()] for k in obs if k.endswith("_image")}
        low_dim = sorted(k for k in obs if not k.endswith(("_image", "_depth")) and obs[k].ndim == 2)
        keys = state_keys if state_keys is not None else low_dim
        missing = [k for k in keys if k not in obs]
        if missing:
            raise BadInput(f"state key(s) {missing} not in data/{demo}/obs (low-dim keys: {low_dim})")
        state = np.concatenate([obs[k][()] for k in keys], axis=1) if keys else None
        env = _env_args(f)
        rate = env.get("env_kwargs", {}).get("control_freq", fps)
        attrs = {k: _scalar(v) for k, v in g.attrs.items()}
        yield Episode(
            key=f"{source_id(path)}-{_UNSAFE.sub('_', demo)}",
            frames=_frames(images, cameras, resolution, f"obs keys: {sorted(obs)}"),
            fps=float(rate), embodiment=embodiment or DEFAULT_EMBODIMENT,
            task=str(env.get("env_name", "")), instruction=str(attrs.get("instruction", attrs.get("lang", ""))),
            source=item, action=g["actions"][()], state=state,
            success=bool(attrs["success"]) if "success" in attrs else None,
            episode_index=int(m.group(1)) if (m := re.search(r"(\d+)$", demo)) else -1,
            extra={"state_keys": list(keys)},
        )


# ---------------------------------------------------------------- lerobot (v3)

def lerobot_inputs(sources: list[str]) -> list[str]:
    """One input ``"<dataset root>::<episode_index>"`` per episode listed in ``meta/episodes``;
    a folder whose metadata cannot be read stays one input (a failure row later)."""
    inputs = []
    for src in sources:
        root = os.path.abspath(src)
        try:
            episodes = _lerobot_episode_table(root)
        except BadInput:
            inputs.append(root)
            continue
        inputs += [f"{root}{DEMO_SEP}{i}" for i in sorted(episodes)]
    return inputs


def _lerobot_info(root: str) -> dict:
    path = Path(root) / "meta" / "info.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"not a LeRobot dataset folder: cannot read meta/info.json ({e})") from None
    if not str(info.get("codebase_version", "")).startswith("v3"):
        raise BadInput(f"LeRobot codebase_version {info.get('codebase_version')!r}: only v3.x is supported")
    return info


def _lerobot_episode_table(root: str) -> dict[int, dict]:
    """``{episode_index: row of meta/episodes/*.parquet}``."""
    import pyarrow.parquet as pq

    _lerobot_info(root)
    files = sorted((Path(root) / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise BadInput("no meta/episodes/chunk-*/file-*.parquet")
    rows = {}
    for f in files:
        try:
            for row in pq.read_table(f).to_pylist():
                rows[int(row["episode_index"])] = row
        except (OSError, ValueError, KeyError) as e:
            raise BadInput(f"{f}: unreadable episode metadata ({e})") from None
    return rows


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


def lerobot_episodes(item: str, *, embodiment: str | None, cameras: list[str] | None, resolution: int | None,
                     fps: float) -> Iterator[Episode]:
    """The episode ``item = "<root>::<episode_index>"`` of a LeRobot v3 dataset."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root, sep, index = item.rpartition(DEMO_SEP)
    if not sep:
        _lerobot_episode_table(item)  # raises the reason this folder yields no episode
        raise BadInput("no episode listed")
    info, ep = _lerobot_info(root), _lerobot_episode_table(root)[int(index)]
    rate = float(info.get("fps") or fps)
    data_path = Path(root) / info["data_path"].format(chunk_index=ep["data/chunk_index"],
                                                      file_index=ep["data/file_index"])
    try:
        table = pq.read_table(data_path)
    except (OSError, ValueError) as e:
        raise BadInput(f"{data_path}: unreadable ({e})") from None
    table = table.filter(pc.equal(table["episode_index"], int(index))).sort_by("frame_index")
    if table.num_rows == 0:
        raise BadInput(f"{data_path}: no rows of episode {index}")
    columns = set(table.column_names)
    if "action" not in columns:
        raise BadInput(f"{data_path}: no 'action' column")
    stamps = (np.asarray(table["timestamp"].to_pylist(), np.float64) if "timestamp" in columns
              else np.arange(table.num_rows) / rate)
    images = {}
    for key, feature in info.get("features", {}).items():
        if feature.get("dtype") == "video":
            cam = _UNSAFE.sub("_", key.removeprefix("observation.images.").removeprefix("observation."))
            if cameras and cam not in cameras:
                continue
            video = Path(root) / info["video_path"].format(
                video_key=key, chunk_index=ep[f"videos/{key}/chunk_index"], file_index=ep[f"videos/{key}/file_index"])
            images[cam] = _video_frames(video, ep[f"videos/{key}/from_timestamp"] + stamps, rate)
    tasks = ep.get("tasks") or []
    yield Episode(
        key=f"{source_id(root)}-ep{int(index):06d}", frames=_frames(images, cameras, resolution, f"features of {root}"),
        fps=rate, embodiment=embodiment or info.get("robot_type") or DEFAULT_EMBODIMENT,
        task=tasks[0] if tasks else "", instruction=tasks[0] if tasks else "", source=item,
        action=np.asarray(table["action"].to_pylist(), np.float32),
        state=np.asarray(table["observation.state"].to_pylist(), np.float32) if "observation.state" in columns else None,
        episode_index=int(index),
    )


# ---------------------------------------------------------------- the job

def ingest_episodes(sources: list[str], out_dir: str | Path, *, fmt: str, embodiment: str | None = None,
                    cameras: list[str] | None = None, resolution: int | None = None, fps: float = DEFAULT_FPS,
                    state_keys: list[str] | None = None, workers: int = 2, samples_per_shard: int = 64,
                    created_by: str = "") -> JobResult:
    """Find the episodes in ``sources`` (files, folders, globs) and write them as shards into ``out_dir``."""
    common = dict(embodiment=embodiment, cameras=cameras, resolution=resolution, fps=fps)
    if fmt == "npz":
        inputs = find_inputs(sources, frozenset({".npz"}))
        make = functools.partial(npz_episodes, **common)
    elif fmt == "hdf5":
        inputs = hdf5_inputs(find_inputs(sources, frozenset({".hdf5", ".h5"})))
        make = functools.partial(hdf5_episodes, state_keys=state_keys, **common)
    elif fmt == "lerobot":
        inputs = lerobot_inputs(sources)
        make = functools.partial(lerobot_episodes, **common)
    else:
        raise ValueError(f"unknown episode format {fmt!r}; choose one of {FORMATS}")
    if not inputs:
        raise FileNotFoundError(f"no {fmt} input found in {sources}")
    log.info("ingesting %d %s episode input(s) into %s", len(inputs), fmt, out_dir)
    return run_sharded_job(out_dir, inputs, make, samples_per_shard=samples_per_shard, workers=workers,
                           created_by=created_by or f"wm ingest episodes --format {fmt}", desc=f"{fmt} episodes")
