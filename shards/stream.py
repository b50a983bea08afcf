"""Stream training windows out of shard datasets: decode each episode once, cut several windows.

``WindowStream`` is a ``torch.utils.data.IterableDataset`` yielding window dicts (see docs/CONTRACTS.md
and docs/STREAMING.md)::

    frames       uint8 [T, C, H, W]        T = window, frames start, start + stride, ...
    action       float32 [T, A]            zeros when the sample has none (A = widest in the data)
    action_mask  bool                      True when the sample has real actions
    state        float32 [T, S], state_mask bool
    embodiment, task, key  str;  start  int
    <labeller>.<field>                     sidecar arrays, cut to the window when per-frame

Two modes:

- ``"train"``: infinite. Every (rank, DataLoader worker) runs its own seeded RNG: it draws a source
  by ``weights``, walks that source's shards in a fresh random order each cycle, cuts
  ``windows_per_episode`` random windows per episode and mixes windows through a shuffle buffer.
  With at least as many shards as ranks x workers each process walks a disjoint subset; with fewer,
  all walk all shards (different seeds), so nobody runs dry and nothing waits on anybody.
- ``"label"``: one exact pass. Shards are dealt to ranks, then to workers (``shards[rank::world]
  [worker::workers]``); each episode is tiled by ``label_starts`` in order. Processes that get no
  shard yield nothing and return.

``iter_samples`` gives whole decoded episodes (frames + meta + key + shard) for labelling jobs.

One bad sample costs one sample: shards are read past damage (``shards.tar_reader``), each sample is
checked on its own, and the keys read are checked against the manifest; in train mode every problem is
a counted, rate-limited warning (``SkipLog``) naming shard, key and member.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from .decode import DecodeError, decode_video, resolve_backend
from .format import ACTION, META, STATE, FormatError, SampleMeta, read_manifest, video_member
from .location import Location, locate
from .sidecar import has_sidecar, read_sidecar, read_sidecar_stats, sidecar_dir
# read_tar_samples resyncs past a damaged header: one bad spot costs the members it touches, never the
# rest of the shard; importable from here too, where readers have always found it
from .tar_reader import TarIssue, read_tar_samples  # noqa: F401

log = logging.getLogger(__name__)

MODES = ("train", "label")


# ---------------------------------------------------------------- splitting

def locate_all(data) -> list[Path | Location]:
    """One dataset or a list of them (folders or URLs, ``shards.location``) as located roots."""
    if isinstance(data, (str, os.PathLike, Location)):
        return [locate(data)]
    return [locate(d) for d in data]


def rank_and_world() -> tuple[int, int]:
    """This process's (rank, world size): torch.distributed when initialised, else RANK / WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_and_count() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def label_starts(n_frames: int, window: int, stride: int) -> list[int]:
    """Window starts that tile an episode: every frame lies in at least one window, in order.

    Frames of each phase ``p < stride`` (p, p + stride, ...) are cut into consecutive blocks of
    ``window``; when the last block would run past the end it is moved back to end on the last
    frame of that phase (overlapping its predecessor). Phases with fewer than ``window`` frames
    give no window. Sorted, no repeats.
    """
    starts = set()
    for p in range(min(stride, n_frames)):
        m = (n_frames - p + stride - 1) // stride  # frames in this phase
        if m < window:
            continue
        q = list(range(0, m - window + 1, window))
        if q[-1] + window < m:
            q.append(m - window)
        starts.update(p + i * stride for i in q)
    return sorted(starts)


# ---------------------------------------------------------------- reading

WARN_FIRST = 10   # skipped samples warned about one by one per process; then only at powers of two


class SkipLog:
    """Counts the samples (and shard damage) a stream skips in this process, and warns about them
    rate-limited: each distinct problem is counted once (train mode meets it again every cycle), the
    first ``WARN_FIRST`` are warned about one by one, later ones when the count reaches a power of two."""

    def __init__(self):
        self.count = 0
        self.seen: set[str] = set()

    def skip(self, ident: str, message: str) -> None:
        if ident in self.seen:
            return
        self.seen.add(ident)
        self.count += 1
        if self.count <= WARN_FIRST or self.count & (self.count - 1) == 0:
            more = "; further skips are warned about at powers of two" if self.count == WARN_FIRST else ""
            log.warning("skipping %s (skip %d in this process%s)", message, self.count, more)


def _npy(sample: dict[str, Any], name: str, where: str, n_frames: int, dim: int) -> np.ndarray | None:
    if name not in sample:
        return None
    member = f"{where}.{name}"
    try:
        arr = np.load(io.BytesIO(sample[name]), allow_pickle=False)
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub":
            raise ValueError(f"not a numeric array ({type(arr).__name__} {getattr(arr, 'dtype', '')})")
        arr = arr.astype(np.float32, copy=False)
    except Exception as e:  # flipped header bytes raise ValueError, SyntaxError, EOFError, ... from numpy
        raise FormatError(f"{member}: unreadable ({type(e).__name__}: {e})") from None
    if arr.ndim != 2 or arr.shape[0] != n_frames or (dim and arr.shape[1] != dim):
        raise FormatError(f"{member}: shape {list(arr.shape)}, meta.json says [n_frames={n_frames}, "
                          f"{dim or 'D'}]")
    return arr


@dataclasses.dataclass
class EncodedSample:
    """One sample as stored: checked meta, the chosen camera's mp4 bytes, arrays."""

    key: str
    shard: Path
    meta: SampleMeta
    camera: str
    video: bytes
    action: np.ndarray | None  # float32 [n_frames, A]
    state: np.ndarray | None   # float32 [n_frames, S]

    @property
    def where(self) -> str:
        return f"{self.shard}:{self.key}"

    @property
    def video_where(self) -> str:
        """The video member, for decode errors: ``shard:key.<camera>.mp4``."""
        return f"{self.where}.{video_member(self.camera)}"


def _members(raw: dict[str, Any]) -> list[str]:
    return sorted(k for k in raw if not k.startswith("__"))


def parse_sample(raw: dict[str, Any], shard: Path, camera: str | None) -> EncodedSample:
    """Validate one raw tar sample; ``FormatError`` naming shard, key and member when it is malformed."""
    key = raw["__key__"]
    where = f"{shard}:{key}"
    if META not in raw:
        raise FormatError(f"{where}: no member {key}.{META} (the sample has {_members(raw)})")
    meta = SampleMeta.from_json(raw[META], where=f"{where}.{META}")
    if meta.key != key:
        raise FormatError(f"{where}.{META}: says key {meta.key!r}")
    cam = camera or meta.cameras[0]
    if cam not in meta.cameras:
        raise FormatError(f"{where}: no camera {cam!r} (its {META} lists cameras {meta.cameras})")
    if video_member(cam) not in raw:
        raise FormatError(f"{where}: no member {key}.{video_member(cam)} for camera {cam!r} listed in its "
                          f"{META} (the sample has {_members(raw)})")
    for name, dim, flag in ((ACTION, meta.action_dim, meta.has_action), (STATE, meta.state_dim, meta.state_dim > 0)):
        if flag and name not in raw:
            raise FormatError(f"{where}: no member {key}.{name}, but its {META} gives it {name.split('.')[0]} "
                              f"dim {dim} (the sample has {_members(raw)})")
    return EncodedSample(key, shard, meta, cam, raw[video_member(cam)],
                         _npy(raw, ACTION, where, meta.n_frames, meta.action_dim),
                         _npy(raw, STATE, where, meta.n_frames, meta.state_dim))


def missing_keys(listed: Sequence[str] | None, seen: Collection[str]) -> list[str]:
    """Keys the manifest lists for a shard that reading it did not find, in manifest order."""
    return [k for k in listed or () if k not in seen]


def resize_frames(frames: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> uint8 ``[N, C, *size]`` (bilinear with antialias; no-op when equal)."""
    if size is None or tuple(frames.shape[-2:]) == tuple(size):
        return frames
    x = F.interpolate(frames.float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _size(resize: int | Sequence[int] | None) -> tuple[int, int] | None:
    if resize is None:
        return None
    size = (int(resize), int(resize)) if isinstance(resize, int) else tuple(int(v) for v in resize)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"resize must be a positive int or (H, W), got {resize!r}")
    return size


def decode_frames(sample: EncodedSample, indices: np.ndarray | None, backend: str,
                  size: tuple[int, int] | None) -> torch.Tensor:
    """Frames ``indices`` (all when None) of a sample as uint8 ``[N, C, H, W]``, resized."""
    frames = decode_video(sample.video, indices, backend, source=sample.video_where)
    # one contiguous NCHW copy per episode: windows are then cheap views/copies of it (indexing a
    # permuted view per window costs ~6x more, and far more when torch threads compete for cores)
    return resize_frames(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), size)


# ---------------------------------------------------------------- whole episodes

@dataclasses.dataclass
class DecodedSample:
    """A whole episode for labelling jobs. ``error`` is set (and frames None) when it failed to decode;
    ``meta`` is None too when the failure left no readable meta.json (or the sample is missing)."""

    key: str
    shard: Path
    shard_index: int           # position of the shard in its dataset's manifest
    data_dir: Path
    meta: SampleMeta | None
    frames: torch.Tensor | None  # uint8 [n_frames, C, H, W]
    action: np.ndarray | None
    state: np.ndarray | None
    error: str | None = None


def _missing_message(shard: Path, keys: list[str], issues: list[TarIssue]) -> str:
    why = f"; the shard is damaged: {issues[0]}" if issues else ""
    return (f"{shard}: {len(keys)} sample(s) the manifest lists are not in the shard: "
            f"{keys[:10]}{' ...' if len(keys) > 10 else ''}{why}")


def iter_shard_samples(data_dir: str | Path, shard_index: int, *, camera: str | None = None,
                       resize=None, backend: str = "auto", errors: str = "raise") -> Iterator[DecodedSample]:
    """Decode every episode of shard ``shard_index`` of ``data_dir`` in order.

    ``errors="raise"`` raises ``DecodeError`` / ``FormatError`` naming shard, key and member;
    ``errors="record"`` yields every sample the manifest lists exactly once, with ``error`` set when it
    is malformed, undecodable or missing from the (damaged) tar; the damage itself (bad headers,
    unsafe or non-file members, samples the manifest does not list) is logged as warnings naming the
    shard, byte offset and member.
    """
    if errors not in ("raise", "record"):
        raise ValueError(f"errors must be 'raise' or 'record', got {errors!r}")
    data_dir = locate(data_dir)
    entry = read_manifest(data_dir)["shards"][shard_index]
    shard, listed = data_dir / entry["name"], entry.get("keys")
    size = _size(resize)
    record = errors == "record"
    issues: list[TarIssue] | None = [] if record else None
    reported, seen = 0, set()
    for raw in read_tar_samples(shard, issues):
        for issue in (issues or [])[reported:]:
            log.warning("%s", issue)
        reported = len(issues or [])
        key = raw["__key__"]
        if listed is not None and key not in listed:
            message = f"{shard}:{key}: a sample the manifest does not list for this shard"
            if not record:
                raise FormatError(message)
            log.warning("%s; ignored", message)
            continue
        seen.add(key)
        meta = None
        try:
            s = parse_sample(raw, shard, camera)
            meta = s.meta
            frames = decode_frames(s, None, backend, size)
            if frames.shape[0] != s.meta.n_frames:
                raise DecodeError(s.video_where, backend, f"{frames.shape[0]} frames, meta.json says {s.meta.n_frames}")
        except (DecodeError, FormatError) as e:
            if not record:
                raise
            yield DecodedSample(key, shard, shard_index, data_dir, meta, None, None, None, str(e))
            continue
        yield DecodedSample(s.key, shard, shard_index, data_dir, s.meta, frames, s.action, s.state)
    for issue in (issues or [])[reported:]:
        log.warning("%s", issue)
    missing = missing_keys(listed, seen)
    if missing and not record:
        raise FormatError(_missing_message(shard, missing, []))
    for key in missing:
        why = f" (the shard is damaged: {issues[0]})" if issues else ""
        yield DecodedSample(key, shard, shard_index, data_dir, None, None, None, None,
                            f"{shard}:{key}: listed in the manifest but not in the shard{why}")


def iter_samples(data: str | Path | Sequence[str | Path], *, camera: str | None = None, resize=None,
                 backend: str = "auto", errors: str = "raise", split: bool = True) -> Iterator[DecodedSample]:
    """Every episode of one or more datasets, once; split by rank and DataLoader worker when ``split``."""
    dirs = locate_all(data)
    shards = [(d, i) for d in dirs for i in range(len(read_manifest(d)["shards"]))]
    if split:
        (rank, world), (worker, workers) = rank_and_world(), worker_and_count()
        shards = shards[rank::world][worker::workers]
    for d, i in shards:
        yield from iter_shard_samples(d, i, camera=camera, resize=resize, backend=backend, errors=errors)


# ---------------------------------------------------------------- windows

def _take(x: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """``x[rows]``: a strided view when ``rows`` are evenly spaced (the usual case), else a copy."""
    step = int(rows[1] - rows[0]) if len(rows) > 1 else 1
    if step > 0 and (np.diff(rows) == step).all():
        return x[int(rows[0]): int(rows[-1]) + 1: step]
    return x[torch.from_numpy(rows)]


def _padded(arr: np.ndarray | None, dim: int, n_frames: int) -> torch.Tensor:
    """float32 ``[n_frames, dim]``: ``arr`` zero-padded to the stream's widest dim (zeros when None)."""
    out = torch.zeros(n_frames, dim)
    if arr is not None:
        out[:, : arr.shape[1]] = torch.from_numpy(arr)
    return out


class WindowStream(torch.utils.data.IterableDataset):
    """Windows of ``window`` frames (``stride`` apart) from one or more shard datasets.

    Args beyond docs/CONTRACTS.md: ``weights`` (train mode: relative probability of drawing the
    next episode from each data dir; default proportional to its sample count), ``on_error``
    ("skip": a counted skip, ``self.skips``, with a rate-limited warning naming shard, key and member,
    the train default; "raise": the label default) for undecodable or malformed samples, damaged
    tars and manifest keys the shard lacks (docs/STREAMING.md, "Bad samples"), and ``keys`` (one entry per data dir: the
    sample keys to use from it, or None for all; e.g. a few-shot subset of demos).

    ``optional_labels=True`` lets a sidecar named in ``labels`` be absent from some data dirs (e.g.
    IDM pseudo-labels on the video corpus, none on the demos; at least one dir must have it). Every
    window then also carries ``<name>.present`` (bool), and windows from a dir without the sidecar
    get its fields zero-filled (``[window, ...]``, shapes and dtypes read from the first sidecar row
    found), so such windows collate with labelled ones.

    ``label_every=K`` (label mode): a window starts at every K-th frame of an episode (overlapping
    windows, e.g. to score a model at many points of few episodes) instead of the ``label_starts``
    tiling; an exact, ordered pass all the same.
    """

    def __init__(self, data: str | Path | Sequence[str | Path], *, window: int = 8, stride: int = 1,
                 camera: str | None = None, resize: int | Sequence[int] | None = None, backend: str = "auto",
                 mode: str = "train", labels: Sequence[str] = (), windows_per_episode: int = 4,
                 shuffle_buffer: int = 64, seed: int = 0, weights: Sequence[float] | None = None,
                 on_error: str | None = None, keys: Sequence[Collection[str] | None] | None = None,
                 optional_labels: bool = False, label_every: int | None = None):
        super().__init__()
        if label_every is not None and (mode != "label" or label_every < 1):
            raise ValueError(f"label_every is a label-mode option and must be >= 1 (got {label_every}, mode {mode!r})")
        self.label_every = label_every
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if window < 1 or stride < 1 or windows_per_episode < 1:
            raise ValueError(f"window, stride and windows_per_episode must be >= 1 (got {window}, {stride}, "
                             f"{windows_per_episode})")
        self.dirs = locate_all(data)
        if not self.dirs:
            raise ValueError("no data directories given")
        manifests = [read_manifest(d) for d in self.dirs]
        if keys is not None and len(keys) != len(self.dirs):
            raise ValueError(f"keys must have one entry per data dir ({len(self.dirs)}), got {len(keys)}")
        self.keys = {d: frozenset(k) for d, k in zip(self.dirs, keys or []) if k is not None}
        # shards without a wanted key are dropped up front: they would only be read to be skipped
        self.shards = [[d / s["name"] for s in m["shards"] if d not in self.keys or self.keys[d] & set(s["keys"])]
                       for d, m in zip(self.dirs, manifests)]
        sizes = [m["totals"]["samples"] if d not in self.keys else len(self.keys[d])
                 for d, m in zip(self.dirs, manifests)]
        if weights is None:
            weights = sizes
        if len(weights) != len(self.dirs) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be {len(self.dirs)} non-negative numbers, not all zero; got {weights}")
        self.weights = np.asarray(weights, np.float64) / float(sum(weights))
        for d, n, w in zip(self.dirs, sizes, self.weights):
            if n == 0 and (mode == "label" or w > 0):
                log.warning("%s: dataset holds no samples", d)
        self.action_dim = max([e["action_dim"] for m in manifests for e in m["embodiments"].values()], default=0)
        self.state_dim = max([e["state_dim"] for m in manifests for e in m["embodiments"].values()], default=0)
        self.labels, self.optional_labels = tuple(labels), optional_labels
        # data dir -> the label names it has (all of them unless optional_labels)
        self.dir_labels = {d: tuple(n for n in self.labels if has_sidecar(d, n)) for d in self.dirs}
        for d in self.dirs:
            for name in self.labels:
                if name not in self.dir_labels[d] and not (optional_labels and self._has_label(name)):
                    raise FormatError(f"{sidecar_dir(d, name)}: no labels '{name}' for dataset {d}")
        self.label_templates = {n: self._label_template(n) for n in self.labels} if optional_labels else {}
        self.window, self.stride, self.camera, self.size = window, stride, camera, _size(resize)
        # resolving imports the backend's library here, before any fork, so workers share it instead
        # of each importing it (~0.5 s CPU); decoder objects are still only made inside workers
        self.backend = resolve_backend(backend)
        self.mode, self.windows_per_episode = mode, windows_per_episode
        self.shuffle_buffer, self.seed = max(1, shuffle_buffer), seed
        self.on_error = on_error or ("skip" if mode == "train" else "raise")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.span = (window - 1) * stride + 1  # frames a window covers in its episode
        # data dir -> shard name -> the keys its manifest lists: what reading each shard must find
        self.listed = {d: {s["name"]: s.get("keys") for s in m["shards"]} for d, m in zip(self.dirs, manifests)}
        self.skips = SkipLog()  # per process: each DataLoader worker counts its own

    def _has_label(self, name: str) -> bool:
        return any(name in have for have in self.dir_labels.values())

    def _label_template(self, name: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{field: (per-frame shape, dtype)} of sidecar ``name``, from its first labelled row."""
        for d, shards in zip(self.dirs, self.shards):
            if name not in self.dir_labels[d]:
                continue
            for shard in shards:
                for row in read_sidecar(d, name, shard.name).values():
                    return {f: (tuple(a.shape[1:]), a.dtype) for f, a in row.items()}
        raise FormatError(f"labels '{name}': no labelled sample in any of {[str(d) for d in self.dirs]}")

    # -- one shard -> episodes with their sidecar rows

    def _episodes(self, data_dir: Path, shard: Path) -> Iterator[tuple[EncodedSample, dict[str, dict]]]:
        """The shard's usable samples with their sidecar rows. Skip mode: every problem (damaged tar,
        malformed sample, manifest keys the shard lacks) is a counted, rate-limited warning naming
        shard, key and member, and costs only the samples it touches; raise mode raises it."""
        sidecars = {}
        for name in self.dir_labels[data_dir]:
            stats = read_sidecar_stats(data_dir, name, shard.name)
            sidecars[name] = (read_sidecar(data_dir, name, shard.name), {f.get("key") for f in stats["failures"]})
        wanted = self.keys.get(data_dir)
        listed = self.listed[data_dir].get(shard.name)
        issues: list[TarIssue] | None = [] if self.on_error == "skip" else None
        reported, seen = 0, set()
        for raw in read_tar_samples(shard, issues):
            for issue in (issues or [])[reported:]:
                self.skips.skip(f"{issue.shard}@{issue.offset}", f"damaged shard data: {issue}")
            reported = len(issues or [])
            key = raw["__key__"]
            seen.add(key)
            if wanted is not None and key not in wanted:
                continue
            try:
                if listed is not None and key not in listed:
                    raise FormatError(f"{shard}:{key}: a sample the manifest does not list for this shard")
                sample = parse_sample(raw, shard, self.camera)
            except FormatError as e:  # a malformed sample: it alone is lost
                if self.on_error == "raise":
                    raise
                self.skips.skip(f"{shard}:{key}", f"malformed sample: {e}")
                continue
            rows = {}
            for name, (table, failed) in sidecars.items():
                if sample.key in failed:  # the labeller reported this sample: it has no label
                    self.skips.skip(f"{sample.where}#{name}", f"{sample.where}: labeller '{name}' failed on "
                                                                f"this sample")
                    break
                if sample.key not in table:
                    raise FormatError(f"{sidecar_dir(data_dir, name) / shard.name}: no labels for key "
                                      f"{sample.key!r} of video shard {shard}")
                rows[name] = table[sample.key]
            else:
                yield sample, rows
        for issue in (issues or [])[reported:]:
            self.skips.skip(f"{issue.shard}@{issue.offset}", f"damaged shard data: {issue}")
        missing = [k for k in missing_keys(listed, seen) if wanted is None or k in wanted]
        if missing:
            message = _missing_message(shard, missing, issues or [])
            if self.on_error == "raise":
                raise FormatError(message)
            self.skips.skip(f"{shard}#missing", message)

    def _windows(self, sample: EncodedSample, rows: dict[str, dict], starts: list[int]) -> list[dict[str, Any]]:
        """Decode the frames ``starts`` need (once) and cut one window dict per start."""
        if not starts:
            return []
        offsets = np.arange(self.window) * self.stride
        needed = np.unique(np.add.outer(np.asarray(starts), offsets))
        full = len(needed) == sample.meta.n_frames
        try:
            frames = decode_frames(sample, None if full else needed, self.backend, self.size)
            if frames.shape[0] != len(needed):
                raise DecodeError(sample.video_where, self.backend, f"{frames.shape[0]} frames, meta.json says "
                                  f"{sample.meta.n_frames}")
        except DecodeError as e:
            if self.on_error == "raise":
                raise
            self.skips.skip(sample.where, f"undecodable sample: {e}")
            return []
        n = sample.meta.n_frames
        action, state = _padded(sample.action, self.action_dim, n), _padded(sample.state, self.state_dim, n)
        out = []
        for start in starts:
            idx = start + offsets
            cut = slice(start, start + self.span, self.stride)  # views, no copy: collate copies once
            w = {"frames": frames[cut] if full else _take(frames, np.searchsorted(needed, idx)),
                 "action": action[cut], "state": state[cut],
                 "action_mask": sample.action is not None, "state_mask": sample.state is not None,
                 "embodiment": sample.meta.embodiment, "task": sample.meta.task, "key": sample.key, "start": start}
            for name, fields in rows.items():
                for field, arr in fields.items():
                    per_frame = arr.ndim >= 1 and arr.shape[0] == sample.meta.n_frames
                    w[f"{name}.{field}"] = torch.from_numpy(np.ascontiguousarray(arr[idx] if per_frame else arr))
            for name, fields in self.label_templates.items():   # optional labels: flag, zero-fill
                w[f"{name}.present"] = name in rows
                if name not in rows:
                    for field, (shape, dtype) in fields.items():
                        w[f"{name}.{field}"] = torch.from_numpy(np.zeros((self.window, *shape), dtype))
            out.append(w)
        return out

    # -- the two modes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        (rank, world), (worker, workers) = rank_and_world(), worker_and_count()
        if self.mode == "label":
            return self._label_pass(rank, world, worker, workers)
        return self._train_stream(rank, world, worker, workers)

    def _label_pass(self, rank: int, world: int, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        shards = [(d, s) for d, ss in zip(self.dirs, self.shards) for s in ss][rank::world][worker::workers]
        for data_dir, shard in shards:
            for sample, rows in self._episodes(data_dir, shard):
                if self.label_every:
                    starts = list(range(0, sample.meta.n_frames - self.span + 1, self.label_every))
                else:
                    starts = label_starts(sample.meta.n_frames, self.window, self.stride)
                if not starts:
                    log.warning("%s: %d frames, too short for a window of %d frames at stride %d (%d frames); "
                                "no windows", sample.where, sample.meta.n_frames, self.window, self.stride, self.span)
                yield from self._windows(sample, rows, starts)

    def _cycle(self, source: int, rng: np.random.Generator, slot: int, slots: int) -> Iterator[tuple]:
        """Episodes of one source forever, shards in a fresh random order each cycle."""
        shards = self.shards[source]
        mine = shards[slot::slots] if len(shards) >= slots else shards
        while True:
            usable = 0
            for i in rng.permutation(len(mine)):
                for sample, rows in self._episodes(self.dirs[source], mine[i]):
                    if sample.meta.n_frames >= self.span:
                        usable += 1
                        yield sample, rows
            if usable == 0:  # would otherwise spin forever without yielding
                raise FormatError(f"{self.dirs[source]}: no episode with at least {self.span} frames "
                                  f"(window {self.window}, stride {self.stride}) in shards {[s.name for s in mine]}")

    def _train_stream(self, rank: int, world: int, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        rng = np.random.default_rng([self.seed, rank, worker])
        slot, slots = rank * workers + worker, world * workers
        active = [i for i, w in enumerate(self.weights) if w > 0]
        cycles = {i: self._cycle(i, rng, slot, slots) for i in active}
        probs = self.weights[active] / self.weights[active].sum()
        buffer: list[dict[str, Any]] = []
        while True:
            sample, rows = next(cycles[active[rng.choice(len(active), p=probs)]])
            starts = sorted(rng.integers(0, sample.meta.n_frames - self.span + 1, self.windows_per_episode).tolist())
            buffer.extend(self._windows(sample, rows, starts))
            # windows of one episode are correlated: hand out random picks once the buffer is full
            while len(buffer) >= self.shuffle_buffer:
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()


# ---------------------------------------------------------------- batching

def collate_windows(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack window dicts into a batch (docs/CONTRACTS.md): tensors stacked, flags and starts as
    tensors, strings as lists. ``action`` / ``state`` of different widths are zero-padded."""
    if not windows:
        raise ValueError("cannot collate an empty list of windows")
    batch: dict[str, Any] = {}
    for name in windows[0]:
        values = [w[name] for w in windows]
        if isinstance(values[0], torch.Tensor):
            if name in ("action", "state"):
                width = max(v.shape[-1] for v in values)
                values = [v if v.shape[-1] == width else F.pad(v, (0, width - v.shape[-1])) for v in values]
            if len({tuple(v.shape) for v in values}) > 1:
                raise ValueError(f"cannot batch '{name}': shapes differ {sorted({tuple(v.shape) for v in values})}")
            # default_collate stacks straight into shared memory inside a DataLoader worker
            batch[name] = default_collate(values)
        elif isinstance(values[0], bool):
            batch[name] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(values[0], int):
            batch[name] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[name] = values
    return batch


def make_loader(stream: WindowStream, batch_size: int, num_workers: int = 0, **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader over ``stream`` with ``collate_windows``; workers stay alive between epochs.

    Each worker keeps ``prefetch_factor`` (default 4) batches in flight: enough that a worker does
    not sit idle while a busy or oversubscribed main process is slow to ask for the next batch.
    """
    if num_workers > 0:
        kwargs.setdefault("prefetch_factor", 4)
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=num_workers,
                                       collate_fn=collate_windows, persistent_workers=num_workers > 0, **kwargs)
