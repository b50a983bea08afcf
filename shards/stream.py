"""Stream training windows out of shard datasets: decode each episode once, cut several windows.

``WindowStream`` is a ``torch.utils.data.IterableDataset`` yielding window dicts (see docs/CONTRACTS.md
and docs/STREAMING.md)::

    frames       uint8 [T, C, H, W]        T = window, frames start, start + stride, ...
    action       float32 [T, A]            zeros when the sample has none (A = widest in the data)
    action_mask  bool                      True when the sample has real actions
    state        float32 [T, S], state_mask bool
    embodiment, task, key  str;  start  int
    <labeller>.<field>                     sidecar arrays, cut to the window when per-frame

It is a thin composition of the stages in ``shards.stages`` (list shards -> read samples -> window
starts -> decode -> cut windows -> shuffle; each usable alone), in two modes:

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
import logging
import os
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .decode import DecodeError, resolve_backend
from .format import FormatError, SampleMeta, read_manifest
from .location import Location, locate
from .samples import (
    EncodedSample,
    decode_frames,
    frame_size,
    missing_keys,
    missing_message,
    parse_sample,
    resize_frames,
)
from .sidecar import has_sidecar, read_sidecar, sidecar_dir
from .stages import (
    SampleReader,
    SkipLog,
    collate_windows,
    cut_windows,
    dataset_shards,
    decode,
    flatten,
    label_starts,
    long_episodes,
    mix,
    random_starts,
    read_samples,
    shard_cycles,
    shuffle,
    span,
    split_shards,
    tiled_starts,
)

# read_tar_samples resyncs past a damaged header: one bad spot costs the members it touches, never the
# rest of the shard; importable from here too, where readers have always found it
from .tar_reader import TarIssue, read_tar_samples

# names callers import from here (the stages and the sample helpers live in shards.stages / shards.samples)
__all__ = [
    "WindowStream",
    "collate_windows",
    "make_loader",
    "iter_samples",
    "iter_shard_samples",
    "DecodedSample",
    "EncodedSample",
    "SkipLog",
    "decode_frames",
    "label_starts",
    "locate_all",
    "missing_keys",
    "parse_sample",
    "rank_and_world",
    "read_tar_samples",
    "resize_frames",
    "worker_and_count",
]

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


# ---------------------------------------------------------------- whole episodes


@dataclasses.dataclass
class DecodedSample:
    """A whole episode for labelling jobs. ``error`` is set (and frames None) when it failed to decode;
    ``meta`` is None too when the failure left no readable meta.json (or the sample is missing)."""

    key: str
    shard: Path
    shard_index: int  # position of the shard in its dataset's manifest
    data_dir: Path
    meta: SampleMeta | None
    frames: torch.Tensor | None  # uint8 [n_frames, C, H, W]
    action: np.ndarray | None
    state: np.ndarray | None
    error: str | None = None


def iter_shard_samples(
    data_dir: str | Path,
    shard_index: int,
    *,
    camera: str | None = None,
    resize=None,
    backend: str = "auto",
    errors: str = "raise",
) -> Iterator[DecodedSample]:
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
    size = frame_size(resize)
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
        raise FormatError(missing_message(shard, missing, []))
    for key in missing:
        why = f" (the shard is damaged: {issues[0]})" if issues else ""
        yield DecodedSample(
            key,
            shard,
            shard_index,
            data_dir,
            None,
            None,
            None,
            None,
            f"{shard}:{key}: listed in the manifest but not in the shard{why}",
        )


def iter_samples(
    data: str | Path | Sequence[str | Path],
    *,
    camera: str | None = None,
    resize=None,
    backend: str = "auto",
    errors: str = "raise",
    split: bool = True,
) -> Iterator[DecodedSample]:
    """Every episode of one or more datasets, once; split by rank and DataLoader worker when ``split``."""
    dirs = locate_all(data)
    shards = [(d, i) for d in dirs for i in range(len(read_manifest(d)["shards"]))]
    if split:
        (rank, world), (worker, workers) = rank_and_world(), worker_and_count()
        shards = shards[rank::world][worker::workers]
    for d, i in shards:
        yield from iter_shard_samples(d, i, camera=camera, resize=resize, backend=backend, errors=errors)


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

    def __init__(
        self,
        data: str | Path | Sequence[str | Path],
        *,
        window: int = 8,
        stride: int = 1,
        camera: str | None = None,
        resize: int | Sequence[int] | None = None,
        backend: str = "auto",
        mode: str = "train",
        labels: Sequence[str] = (),
        windows_per_episode: int = 4,
        shuffle_buffer: int = 64,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        on_error: str | None = None,
        keys: Sequence[Collection[str] | None] | None = None,
        optional_labels: bool = False,
        label_every: int | None = None,
    ):
        super().__init__()
        if label_every is not None and (mode != "label" or label_every < 1):
            raise ValueError(f"label_every is a label-mode option and must be >= 1 (got {label_every}, mode {mode!r})")
        self.label_every = label_every
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if window < 1 or stride < 1 or windows_per_episode < 1:
            raise ValueError(
                f"window, stride and windows_per_episode must be >= 1 (got {window}, {stride}, {windows_per_episode})"
            )
        self.dirs = locate_all(data)
        if not self.dirs:
            raise ValueError("no data directories given")
        manifests = [read_manifest(d) for d in self.dirs]
        if keys is not None and len(keys) != len(self.dirs):
            raise ValueError(f"keys must have one entry per data dir ({len(self.dirs)}), got {len(keys)}")
        self.keys = {d: frozenset(k) for d, k in zip(self.dirs, keys or []) if k is not None}
        # shards without a wanted key are dropped up front: they would only be read to be skipped
        self.shards = [dataset_shards(d, m, self.keys.get(d)) for d, m in zip(self.dirs, manifests)]
        sizes = [
            m["totals"]["samples"] if d not in self.keys else len(self.keys[d]) for d, m in zip(self.dirs, manifests)
        ]
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
        self.window, self.stride, self.camera, self.size = window, stride, camera, frame_size(resize)
        # resolving imports the backend's library here, before any fork, so workers share it instead
        # of each importing it (~0.5 s CPU); decoder objects are still only made inside workers
        self.backend = resolve_backend(backend)
        self.mode, self.windows_per_episode = mode, windows_per_episode
        self.shuffle_buffer, self.seed = max(1, shuffle_buffer), seed
        self.on_error = on_error or ("skip" if mode == "train" else "raise")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.span = span(window, stride)  # frames a window covers in its episode
        self.skips = SkipLog()  # per process: each DataLoader worker counts its own
        self.reader = SampleReader(
            camera=camera,
            labels=self.dir_labels,
            keys=self.keys,
            manifests=dict(zip(self.dirs, manifests)),
            on_error=self.on_error,
            skips=self.skips,
        )

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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The stages (``shards.stages``) for this process's (rank, worker)."""
        (rank, world), (worker, workers) = rank_and_world(), worker_and_count()
        if self.mode == "label":
            shards = split_shards(
                [(d, s) for d, ss in zip(self.dirs, self.shards) for s in ss], rank, world, worker, workers
            )
            starts = tiled_starts(read_samples(shards, self.reader), self.window, self.stride, self.label_every)
        else:
            rng = np.random.default_rng([self.seed, rank, worker])
            slot, slots = rank * workers + worker, world * workers
            active = [i for i, w in enumerate(self.weights) if w > 0]
            sources = [
                long_episodes(
                    shard_cycles(self.shards[i], rng, slot, slots), self.dirs[i], self.reader, self.window, self.stride
                )
                for i in active
            ]
            probs = self.weights[active] / self.weights[active].sum()
            starts = random_starts(mix(sources, probs, rng), rng, self.window, self.stride, self.windows_per_episode)
        decoded = decode(
            starts,
            window=self.window,
            stride=self.stride,
            backend=self.backend,
            size=self.size,
            on_error=self.on_error,
            skips=self.skips,
        )
        groups = cut_windows(
            decoded,
            window=self.window,
            stride=self.stride,
            action_dim=self.action_dim,
            state_dim=self.state_dim,
            optional_labels=self.label_templates,
        )
        return flatten(groups) if self.mode == "label" else shuffle(groups, self.shuffle_buffer, rng)


# ---------------------------------------------------------------- batching


def make_loader(stream: WindowStream, batch_size: int, num_workers: int = 0, **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader over ``stream`` with ``collate_windows``; workers stay alive between epochs.

    Each worker keeps ``prefetch_factor`` (default 4) batches in flight: enough that a worker does
    not sit idle while a busy or oversubscribed main process is slow to ask for the next batch.
    """
    if num_workers > 0:
        kwargs.setdefault("prefetch_factor", 4)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_windows,
        persistent_workers=num_workers > 0,
        **kwargs,
    )
