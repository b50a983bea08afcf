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

- ``lerobot``: a LeRobot v3 dataset folder or repo id, one episode per ``meta/episodes`` row
  (``shards/ingest_lerobot.py``).

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
BARE_CAMERA = "image"  # the camera name of an npz's `frames` / `image` array
DEMO_SEP = "::"  # input string "<file.hdf5>::<demo>"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def _natural(name: str) -> list:
    """Sort key that puts demo_2 before demo_10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _scalar(value: np.ndarray | bytes | str) -> object:
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode() if isinstance(value, bytes) else value


def frames_of(
    arrays: dict[str, np.ndarray], cameras: list[str] | None, resolution: int | None, what: str
) -> dict[str, np.ndarray]:
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


def npz_episodes(
    path: str, *, embodiment: str | None, cameras: list[str] | None, resolution: int | None, fps: float
) -> Iterator[Episode]:
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
        key=source_id(path),
        frames=frames_of(images, cameras, resolution, f"arrays: {sorted(data)}"),
        fps=float(meta.get("fps", fps)),
        embodiment=embodiment or str(meta.get("embodiment", DEFAULT_EMBODIMENT)),
        task=str(meta.get("task", "")),
        instruction=str(meta.get("instruction", "")),
        source=path,
        action=action,
        state=data.get("state", data.get("states")),
        success=None if "success" not in meta else bool(meta["success"]),
    )


# ---------------------------------------------------------------- hdf5 (robomimic)

IMAGE_DATASET_HINT = (
    "robomimic's image datasets (image.hdf5) hold them; make one with robomimic's "
    "dataset_states_to_obs.py --camera_names agentview robot0_eye_in_hand"
)


def file_demos(f: h5py.File, filter_key: str | None) -> list[str]:
    """The demos of a robomimic file to ingest, in natural order: every ``data/<demo>``, or the names listed
    in ``mask/<filter_key>`` (robomimic's train / valid splits). ``BadInput`` (one line) when there is
    none to ingest: no ``data`` group, an unknown filter key, or a file without image observations."""
    if "data" not in f or not len(f["data"]):
        raise BadInput("no data/<demo> groups (not a robomimic file?)")
    demos = sorted(f["data"].keys(), key=_natural)
    if filter_key is not None:
        keys = sorted(f["mask"].keys()) if "mask" in f else []
        if filter_key not in keys:
            raise BadInput(f"no filter key {filter_key!r}: mask/ holds {keys}")
        listed = [_scalar(x) for x in f["mask"][filter_key][()]]
        unknown = [d for d in listed if d not in f["data"]]
        if unknown:
            raise BadInput(f"mask/{filter_key} lists demo(s) not in data/: {unknown[:5]}")
        demos = sorted(listed, key=_natural)
    obs = f["data"][demos[0]].get("obs") if demos else None
    if obs is not None and not any(k.endswith("_image") for k in obs):
        raise BadInput(
            f"no image observations (data/{demos[0]}/obs has only {sorted(obs)}: a low-dim file); " + IMAGE_DATASET_HINT
        )
    return demos


def hdf5_inputs(paths: list[str], filter_key: str | None = None) -> list[str]:
    """One input ``"<file>::<demo>"`` per demo to ingest (``file_demos``); a file that yields none
    stays one input (it becomes one failure row, with the reason, when its episodes are made)."""
    inputs = []
    for path in paths:
        try:
            with h5py.File(path, "r") as f:
                demos = file_demos(f, filter_key)
        except (OSError, KeyError, ValueError, BadInput):
            demos = []
        inputs += [f"{path}{DEMO_SEP}{d}" for d in demos] or [path]
    return inputs


def _instruction(attrs: dict) -> str:
    """The demo's language: ``instruction`` / ``lang`` attributes, else ``lang`` of the ``ep_meta`` JSON
    (robosuite >= 1.5 / robocasa: ``json.dumps(env.get_ep_meta())`` stored on ``data/<demo>``)."""
    for k in ("instruction", "lang"):
        if attrs.get(k):
            return str(attrs[k])
    try:
        meta = json.loads(attrs.get("ep_meta") or "{}")
    except (TypeError, ValueError):
        return ""
    return str(meta.get("lang") or "") if isinstance(meta, dict) else ""


def _env_args(f: h5py.File) -> dict:
    try:
        return json.loads(f["data"].attrs.get("env_args", "{}"))
    except (TypeError, ValueError):
        return {}


def hdf5_episodes(
    item: str,
    *,
    embodiment: str | None,
    cameras: list[str] | None,
    resolution: int | None,
    fps: float,
    state_keys: list[str] | None,
    filter_key: str | None = None,
) -> Iterator[Episode]:
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
            file_demos(f, filter_key)  # raises why this file yields no demo
            raise BadInput("no demo to ingest")
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
            frames=frames_of(images, cameras, resolution, f"obs keys: {sorted(obs)}"),
            fps=float(rate),
            embodiment=embodiment or DEFAULT_EMBODIMENT,
            task=str(env.get("env_name", "")),
            instruction=_instruction(attrs),
            source=item,
            action=g["actions"][()],
            state=state,
            success=bool(attrs["success"]) if "success" in attrs else None,
            episode_index=int(m.group(1)) if (m := re.search(r"(\d+)$", demo)) else -1,
            extra={"state_keys": list(keys)},
        )


# ---------------------------------------------------------------- the job


def ingest_episodes(
    sources: list[str],
    out_dir: str | Path,
    *,
    fmt: str,
    embodiment: str | None = None,
    cameras: list[str] | None = None,
    resolution: int | None = None,
    fps: float = DEFAULT_FPS,
    state_keys: list[str] | None = None,
    filter_key: str | None = None,
    workers: int = 2,
    samples_per_shard: int = 64,
    created_by: str = "",
) -> JobResult:
    """Find the episodes in ``sources`` (files, folders, globs) and write them as shards into ``out_dir``."""
    common = dict(embodiment=embodiment, cameras=cameras, resolution=resolution, fps=fps)
    if fmt == "npz":
        inputs = find_inputs(sources, frozenset({".npz"}))
        make = functools.partial(npz_episodes, **common)
    elif fmt == "hdf5":
        inputs = hdf5_inputs(find_inputs(sources, frozenset({".hdf5", ".h5"})), filter_key)
        make = functools.partial(hdf5_episodes, state_keys=state_keys, filter_key=filter_key, **common)
    elif fmt == "lerobot":
        from shards.ingest_lerobot import lerobot_episodes, lerobot_inputs

        inputs = lerobot_inputs(sources, cameras)
        make = functools.partial(lerobot_episodes, **common)
    else:
        raise ValueError(f"unknown episode format {fmt!r}; choose one of {FORMATS}")
    if not inputs:
        raise FileNotFoundError(f"no {fmt} input found in {sources}")
    log.info("ingesting %d %s episode input(s) into %s", len(inputs), fmt, out_dir)
    return run_sharded_job(
        out_dir,
        inputs,
        make,
        samples_per_shard=samples_per_shard,
        workers=workers,
        created_by=created_by or f"wm ingest episodes --format {fmt}",
        desc=f"{fmt} episodes",
    )
