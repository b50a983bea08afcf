"""The stages of the window stream, each an iterator -> iterator step (webdataset's pipeline style).

``shards.stream.WindowStream`` is their composition; each stage is usable and tested on its own::

    label mode:  split_shards -> read_samples -> tiled_starts  -> decode -> cut_windows -> flatten
    train mode:  shard_cycles -> long_episodes (one per dataset) -> mix -> random_starts
                                                                  -> decode -> cut_windows -> shuffle
    then:        collate_windows / batched (shards.stream's DataLoader does the batching)

1. list shards: ``dataset_shards`` (a dataset's shards holding wanted keys), ``split_shards`` (label:
   the exact split by rank, then worker), ``shard_cycles`` (train: this process's shards in a fresh
   random order per cycle, forever).
2. read samples: ``SampleReader`` ((data dir, shard) -> checked ``EncodedSample`` with its sidecar rows
   in ``sample.labels``), ``read_samples`` over a shard list, ``long_episodes`` (train: the samples long
   enough for a window, cycle after cycle), ``mix`` (train: the next sample from a dataset drawn by weight).
3. window starts: ``tiled_starts`` (label: ``label_starts`` or every K-th frame), ``random_starts`` (train).
4. decode: ``decode`` (the frames an episode's windows need, once per episode).
5. cut windows: ``cut_windows`` (one list of window dicts per episode; keys from ``shards.batch_keys``).
6. shuffle: ``shuffle`` (a buffer filled with whole episodes, random picks out), or ``flatten``.
7. batch: ``batched`` (consecutive windows through ``collate_windows``).

Errors: ``on_error="skip"`` (the train default) makes a bad sample a counted, rate-limited warning
naming shard, key and member (``SkipLog``) that costs only that sample; ``"raise"`` (the label default)
raises it (``FormatError`` / ``DecodeError``). All randomness comes
from the one ``np.random.Generator`` passed in, drawn in pipeline order, so a seed fixes the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from . import batch_keys as bk
from .decode import DecodeError
from .format import FormatError, read_manifest
from .samples import EncodedSample, decode_frames, missing_keys, missing_message, parse_sample
from .sidecar import read_sidecar, read_sidecar_stats, sidecar_dir
from .tar_reader import TarIssue, read_tar_samples

log = logging.getLogger(__name__)

WARN_FIRST = 10  # skipped samples warned about one by one per process; then only at powers of two


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


def span(window: int, stride: int) -> int:
    """Frames a window of ``window`` frames ``stride`` apart covers in its episode."""
    return (window - 1) * stride + 1


# ---------------------------------------------------------------- 1. list shards


def dataset_shards(data_dir: Path, manifest: dict, keys: Collection[str] | None = None) -> list[Path]:
    """The shards of one dataset in manifest order; with ``keys``, only those holding one of them
    (the others would only be read to be skipped)."""
    return [data_dir / s["name"] for s in manifest["shards"] if keys is None or set(keys) & set(s["keys"])]


def split_shards(shards: Sequence, rank: int, world: int, worker: int, workers: int) -> list:
    """Label mode: shards dealt to ranks, then to DataLoader workers (``shards[rank::world][worker::workers]``):
    disjoint and together complete; a process that gets none yields nothing."""
    return list(shards)[rank::world][worker::workers]


def shard_cycles(shards: Sequence[Path], rng: np.random.Generator, slot: int, slots: int) -> Iterator[list[Path]]:
    """Train mode: this process's shards, in a fresh random order each cycle, one list per cycle, forever.

    ``slot`` of ``slots`` is (rank x workers + worker) of (world x workers). With at least as many
    shards as slots each slot walks a disjoint subset; with fewer, every slot walks all of them (with
    its own seed), so nobody runs dry and nothing waits on anybody."""
    mine = list(shards[slot::slots] if len(shards) >= slots else shards)
    while True:
        yield [mine[i] for i in rng.permutation(len(mine))]


# ---------------------------------------------------------------- 2. read samples


class SampleReader:
    """``reader(data_dir, shard)``: the shard's usable samples, each with its sidecar rows joined by key
    (``sample.labels``), in tar order.

    ``camera``: the camera whose video to take (None: each sample's first). ``labels``: data dir -> the
    sidecar names to join there. ``keys``: data dir -> the sample keys to use (others are passed over).
    ``manifests``: data dir -> its manifest, for the keys each shard must hold (read when not given).
    ``on_error="skip"``: every problem (damaged tar, malformed sample, manifest keys the shard lacks) is
    a counted skip in ``skips`` that costs only the samples it touches; ``"raise"`` raises it. A sample
    its labeller failed on is skipped either way; a sidecar that lacks a sample's key always raises."""

    def __init__(
        self,
        *,
        camera: str | None = None,
        labels: dict[Path, Sequence[str]] | None = None,
        keys: dict[Path, Collection[str]] | None = None,
        manifests: dict[Path, dict] | None = None,
        on_error: str = "raise",
        skips: SkipLog | None = None,
    ):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.camera, self.on_error, self.skips = camera, on_error, skips if skips is not None else SkipLog()
        self.labels, self.keys = dict(labels or {}), dict(keys or {})
        self._listed = {d: self._listed_keys(m) for d, m in (manifests or {}).items()}

    @staticmethod
    def _listed_keys(manifest: dict) -> dict[str, list[str] | None]:
        return {s["name"]: s.get("keys") for s in manifest["shards"]}

    def listed(self, data_dir: Path, shard: Path) -> list[str] | None:
        """The keys the manifest lists for ``shard``: what reading it must find."""
        if data_dir not in self._listed:
            self._listed[data_dir] = self._listed_keys(read_manifest(data_dir))
        return self._listed[data_dir].get(shard.name)

    def __call__(self, data_dir: Path, shard: Path) -> Iterator[EncodedSample]:
        sidecars = {}
        for name in self.labels.get(data_dir, ()):
            stats = read_sidecar_stats(data_dir, name, shard.name)
            sidecars[name] = (read_sidecar(data_dir, name, shard.name), {f.get("key") for f in stats["failures"]})
        wanted = self.keys.get(data_dir)
        listed = self.listed(data_dir, shard)
        skip = self.on_error == "skip"
        issues: list[TarIssue] | None = [] if skip else None
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
                if not skip:
                    raise
                self.skips.skip(f"{shard}:{key}", f"malformed sample: {e}")
                continue
            for name, (table, failed) in sidecars.items():
                if sample.key in failed:  # the labeller reported this sample: it has no label
                    self.skips.skip(
                        f"{sample.where}#{name}", f"{sample.where}: labeller '{name}' failed on this sample"
                    )
                    break
                if sample.key not in table:
                    raise FormatError(
                        f"{sidecar_dir(data_dir, name) / shard.name}: no labels for key "
                        f"{sample.key!r} of video shard {shard}"
                    )
                sample.labels[name] = table[sample.key]
            else:
                yield sample
        for issue in (issues or [])[reported:]:
            self.skips.skip(f"{issue.shard}@{issue.offset}", f"damaged shard data: {issue}")
        missing = [k for k in missing_keys(listed, seen) if wanted is None or k in wanted]
        if missing:
            message = missing_message(shard, missing, issues or [])
            if not skip:
                raise FormatError(message)
            self.skips.skip(f"{shard}#missing", message)


def read_samples(
    shards: Iterable[tuple[Path, Path]], reader: Callable[[Path, Path], Iterator[EncodedSample]]
) -> Iterator[EncodedSample]:
    """The samples of ``(data_dir, shard)`` pairs, in order."""
    for data_dir, shard in shards:
        yield from reader(data_dir, shard)


def long_episodes(
    cycles: Iterable[list[Path]],
    data_dir: Path,
    reader: Callable[[Path, Path], Iterator[EncodedSample]],
    window: int,
    stride: int,
) -> Iterator[EncodedSample]:
    """Train mode: the samples of one dataset's shard cycles that hold a window (``span(window, stride)``
    frames). A whole cycle without one is a ``FormatError`` (the stream would spin without yielding)."""
    need = span(window, stride)
    for cycle in cycles:
        usable = 0
        for shard in cycle:
            for sample in reader(data_dir, shard):
                if sample.meta.n_frames >= need:
                    usable += 1
                    yield sample
        if usable == 0:
            raise FormatError(
                f"{data_dir}: no episode with at least {need} frames (window {window}, stride "
                f"{stride}) in shards {sorted(s.name for s in cycle)}"
            )


def mix(sources: Sequence[Iterator], probs: Sequence[float], rng: np.random.Generator) -> Iterator:
    """Train mode: each item from a source drawn with probability ``probs`` (the sources are infinite)."""
    while True:
        yield next(sources[rng.choice(len(sources), p=probs)])


# ---------------------------------------------------------------- 3. window starts


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


def tiled_starts(
    samples: Iterable[EncodedSample], window: int, stride: int, every: int | None = None
) -> Iterator[tuple[EncodedSample, list[int]]]:
    """Label mode: ``(sample, starts)`` with the starts that tile the episode (``label_starts``), or with
    ``every=K`` a start at every K-th frame (overlapping windows). An episode too short for one window
    gets no starts, and a warning."""
    need = span(window, stride)
    for sample in samples:
        n = sample.meta.n_frames
        starts = list(range(0, n - need + 1, every)) if every else label_starts(n, window, stride)
        if not starts:
            log.warning(
                "%s: %d frames, too short for a window of %d frames at stride %d (%d frames); no windows",
                sample.where,
                n,
                window,
                stride,
                need,
            )
        yield sample, starts


def random_starts(
    samples: Iterable[EncodedSample], rng: np.random.Generator, window: int, stride: int, per_episode: int
) -> Iterator[tuple[EncodedSample, list[int]]]:
    """Train mode: ``(sample, starts)`` with ``per_episode`` uniform random starts (sorted; repeats allowed)."""
    need = span(window, stride)
    for sample in samples:
        yield sample, sorted(rng.integers(0, sample.meta.n_frames - need + 1, per_episode).tolist())


# ---------------------------------------------------------------- 4. decode


class Decoded(NamedTuple):
    """An episode's frames for its windows: ``frames`` uint8 ``[N, C, H, W]`` are the episode's frames
    ``index`` (sorted), or all of them when ``index`` is None."""

    sample: EncodedSample
    starts: list[int]
    frames: torch.Tensor
    index: np.ndarray | None


def decode(
    items: Iterable[tuple[EncodedSample, list[int]]],
    *,
    window: int,
    stride: int,
    backend: str,
    size: tuple[int, int] | None = None,
    on_error: str = "raise",
    skips: SkipLog | None = None,
) -> Iterator[Decoded]:
    """Decode, once per episode, the frames its windows need (all of them when they need all), resized to
    ``size``. An episode without starts is passed over; an undecodable one is raised (``DecodeError``),
    or with ``on_error="skip"`` a counted skip in ``skips``."""
    skips = skips if skips is not None else SkipLog()
    offsets = np.arange(window) * stride
    for sample, starts in items:
        if not starts:
            continue
        needed = np.unique(np.add.outer(np.asarray(starts), offsets))
        full = len(needed) == sample.meta.n_frames
        try:
            frames = decode_frames(sample, None if full else needed, backend, size)
            if frames.shape[0] != len(needed):
                raise DecodeError(
                    sample.video_where, backend, f"{frames.shape[0]} frames, meta.json says {sample.meta.n_frames}"
                )
        except DecodeError as e:
            if on_error != "skip":
                raise
            skips.skip(sample.where, f"undecodable sample: {e}")
            continue
        yield Decoded(sample, starts, frames, None if full else needed)


# ---------------------------------------------------------------- 5. cut windows


def _take(x: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """``x[rows]``: a strided view when ``rows`` are evenly spaced (the usual case), else a copy."""
    step = int(rows[1] - rows[0]) if len(rows) > 1 else 1
    if step > 0 and (np.diff(rows) == step).all():
        return x[int(rows[0]) : int(rows[-1]) + 1 : step]
    return x[torch.from_numpy(rows)]


def _padded(arr: np.ndarray | None, dim: int, n_frames: int) -> torch.Tensor:
    """float32 ``[n_frames, dim]``: ``arr`` zero-padded to the stream's widest dim (zeros when None)."""
    out = torch.zeros(n_frames, dim)
    if arr is not None:
        out[:, : arr.shape[1]] = torch.from_numpy(arr)
    return out


def cut_windows(
    items: Iterable[Decoded],
    *,
    window: int,
    stride: int,
    action_dim: int,
    state_dim: int,
    optional_labels: dict[str, dict[str, tuple[tuple[int, ...], np.dtype]]] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """One list of window dicts per episode (docs/CONTRACTS.md): frames, action / state zero-padded to
    ``action_dim`` / ``state_dim``, masks, strings, start, and each sidecar field cut to the window when
    it is per-frame. ``optional_labels`` (``{name: {field: (per-frame shape, dtype)}}``): every window
    says whether it has sidecar ``name`` (``<name>.present``) and gets zeros where it has not."""
    offsets = np.arange(window) * stride
    length = span(window, stride)
    for d in items:
        sample, n = d.sample, d.sample.meta.n_frames
        action, state = _padded(sample.action, action_dim, n), _padded(sample.state, state_dim, n)
        out = []
        for start in d.starts:
            idx = start + offsets
            cut = slice(start, start + length, stride)  # views, no copy: collate copies once
            w = {
                bk.FRAMES: d.frames[cut] if d.index is None else _take(d.frames, np.searchsorted(d.index, idx)),
                bk.ACTION: action[cut],
                bk.STATE: state[cut],
                bk.ACTION_MASK: sample.action is not None,
                bk.STATE_MASK: sample.state is not None,
                bk.EMBODIMENT: sample.meta.embodiment,
                bk.TASK: sample.meta.task,
                bk.KEY: sample.key,
                bk.START: start,
            }
            for name, fields in sample.labels.items():
                for field, arr in fields.items():
                    per_frame = arr.ndim >= 1 and arr.shape[0] == n
                    w[bk.label_key(name, field)] = torch.from_numpy(
                        np.ascontiguousarray(arr[idx] if per_frame else arr)
                    )
            for name, fields in (optional_labels or {}).items():  # flag, zero-fill
                w[bk.label_key(name, bk.PRESENT)] = name in sample.labels
                if name not in sample.labels:
                    for field, (shape, dtype) in fields.items():
                        w[bk.label_key(name, field)] = torch.from_numpy(np.zeros((window, *shape), dtype))
            out.append(w)
        yield out


# ---------------------------------------------------------------- 6. shuffle


def shuffle(groups: Iterable[list], size: int, rng: np.random.Generator) -> Iterator:
    """Items of ``groups`` (an episode's windows: correlated) in random order: the groups fill a buffer,
    and once it holds ``size`` items random picks come out until it holds fewer; what is left when
    ``groups`` ends comes out last, in random order too."""
    size = max(1, size)
    buffer: list = []
    for group in groups:
        buffer.extend(group)
        while len(buffer) >= size:
            yield _pick(buffer, rng)
    while buffer:
        yield _pick(buffer, rng)


def _pick(buffer: list, rng: np.random.Generator):
    j = int(rng.integers(len(buffer)))
    buffer[j], buffer[-1] = buffer[-1], buffer[j]
    return buffer.pop()


def flatten(groups: Iterable[list]) -> Iterator:
    """The items of ``groups`` in order (label mode: no shuffling)."""
    for group in groups:
        yield from group


# ---------------------------------------------------------------- 7. batch


def collate_windows(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack window dicts into a batch (docs/CONTRACTS.md): tensors stacked, flags and starts as
    tensors, strings as lists. ``action`` / ``state`` of different widths are zero-padded."""
    if not windows:
        raise ValueError("cannot collate an empty list of windows")
    batch: dict[str, Any] = {}
    for name in windows[0]:
        values = [w[name] for w in windows]
        if isinstance(values[0], torch.Tensor):
            if name in (bk.ACTION, bk.STATE):
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


def batched(windows: Iterable[dict[str, Any]], batch_size: int, partial: bool = True) -> Iterator[dict[str, Any]]:
    """Consecutive ``batch_size`` windows collated (``collate_windows``); the last, smaller batch too
    unless ``partial=False``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: list[dict[str, Any]] = []
    for w in windows:
        pending.append(w)
        if len(pending) == batch_size:
            yield collate_windows(pending)
            pending = []
    if pending and partial:
        yield collate_windows(pending)
