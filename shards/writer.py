"""Write episodes into a shard dataset: validation, deterministic tars, resumable parallel jobs.

Producers (``wm collect``, ``wm ingest``) call ``run_sharded_job``::

    result = run_sharded_job(out_dir, inputs, make_episodes, samples_per_shard=64, workers=4,
                             created_by="wm ingest videos", desc="ingest")
    sys.exit(result.exit_code)   # 0, or DATA_FAILURES (3) when some inputs failed

Guarantees (docs/FORMAT.md has the user-facing version):

- ``inputs`` are cut into shards of ``samples_per_shard`` consecutive inputs; shard ``i`` holds the
  episodes of its inputs in order. The split never depends on ``workers``.
- A shard is written to ``shard-NNNNNN.tar.tmp`` and renamed; its ``stats.json`` is written (tmp +
  rename) after that, and is the completion marker: a rerun skips shards whose stats exist, were
  made from the same inputs and match the tar (its size and sha256), and redoes every other shard.
- One job per output folder: ``run_sharded_job`` holds ``out_dir/.lock`` (``shards.folder_lock``)
  for the whole job and refuses with ``FolderBusy`` (naming the holder's pid and host) when another
  live process holds it; a dead holder's lock is taken over. Worker processes die with the job's
  process (``PR_SET_PDEATHSIG`` on Linux, plus a parent check before every rename), so an orphan
  never renames a shard after a ``kill -9`` of the job.
- Bytes are deterministic (fixed tar headers, deterministic H.264, sorted JSON), so any number of
  workers, and any kill + resume, give byte-identical shards, manifest and failures.
- A full disk never leaves half a file: a write that fails with ENOSPC (or a quota, a read-only
  disk, a file too large) removes the partial ``*.tmp`` and ends the job with ``DiskFull``, one line
  naming the file, the room the rest of the job needs and the room left (``wm`` exits 74). The shards
  completed before stay; a rerun after making room resumes from them.
- Bad data never raises: each bad input or episode becomes a ``failures.jsonl`` row
  ``{"source", "key", "reason"}`` and the rest is ingested.
- Dataset-wide consistency (one resolution per dataset, one action/state dim per embodiment,
  unique keys) is decided in ``finalize_dataset`` in shard/key order: the first sample that has a
  value sets it, and later samples that disagree are removed from their shard (the tar is rewritten
  without them, no re-encoding) and reported. This gives the same result for any worker count or
  resume history, at the cost of encoding a few samples that are later dropped.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import io
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .dataset_card import CARD, dataset_card, is_ours
from .encode import EncodeError, check_frames, encode_video
from .folder_lock import FolderLock
from .format import (
    ACTION,
    FAILURES,
    MANIFEST,
    META,
    STATE,
    FormatError,
    SampleMeta,
    check_key,
    shard_name,
    stats_name,
    video_member,
)
from .stats import build_manifest, file_sha256, read_shard_stats, shard_stats_doc

log = logging.getLogger(__name__)

DATA_FAILURES = 3  # == wm_pipeline.exit_codes.DATA_FAILURES (shards may not import pipeline)
_RESERVED = {"meta", "action", "state"}


@dataclasses.dataclass
class Episode:
    """One episode or clip, as producers hand it to the writer."""

    key: str  # letters, digits, '_' and '-' only
    frames: dict[str, np.ndarray]  # camera -> uint8 [T, H, W, 3], H and W even
    fps: float
    embodiment: str  # e.g. "sawyer"; "video" for action-free clips
    task: str = ""
    instruction: str = ""
    source: str = ""  # defaults to str(input) of the job
    action: np.ndarray | None = None  # float [T, A]: the action taken after seeing frame t
    state: np.ndarray | None = None  # float [T, S]
    success: bool | None = None
    episode_index: int = -1
    seed: int | None = None
    extra: dict = dataclasses.field(default_factory=dict)


# errnos that mean "the disk refuses the write" (not a bug, not bad data): DiskFull, exit code 74
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


class DiskFull(Exception):
    """An output of the job could not be written (no space, a quota, a read-only disk). ``str(e)`` is one
    line naming the file; its partial ``*.tmp`` is already removed. ``wm_pipeline.cli.main`` exits 74
    (WRITE_FAILED). ``written`` is how many bytes of that file had been written (a lower bound of the
    room it needs)."""

    def __init__(self, message: str, path: str = "", written: int = 0, errno: int = 0):
        super().__init__(message, path, written, errno)  # all args: it crosses process boundaries by pickle
        self.message, self.path, self.written, self.errno = message, path, written, errno

    def __str__(self) -> str:
        return self.message


def megabytes(n: int) -> str:
    """A byte count for a message: ``12 kB``, ``3.4 MB``, ``81.0 GB``."""
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def room_note(path: str | Path, needed: int, what: str) -> str:
    """``"needs about 1.2 MB (what), 0.3 MB free there"``: the second half of a disk-full message."""
    free = free_bytes(path)
    return f"needs about {megabytes(needed)} ({what}), {megabytes(free) if free is not None else 'unknown'} free there"


def _disk_full(path: Path, e: OSError, tmp: Path | None = None) -> DiskFull:
    """``DiskFull`` for an OSError of a full / read-only disk while writing ``path`` (``tmp`` removed)."""
    written = 0
    if tmp is not None:
        try:
            written = tmp.stat().st_size
        except OSError:
            pass
        tmp.unlink(missing_ok=True)
    where = e.filename or path
    reason = e.strerror or str(e)
    removed = f"; removed the partial {tmp}" if tmp is not None else ""
    return DiskFull(f"cannot write {where}: {reason}{removed}", str(where), written, e.errno or 0)


class BadInput(Exception):
    """Bad data in one input or episode; becomes a failures.jsonl row instead of a traceback."""


@dataclasses.dataclass
class Failure:
    """One failures.jsonl row."""

    source: str
    key: str | None
    reason: str

    def row(self) -> dict[str, Any]:
        return {"source": self.source, "key": self.key, "reason": self.reason}


@dataclasses.dataclass
class JobResult:
    manifest: dict[str, Any]
    failures: list[dict[str, Any]]
    exit_code: int  # 0, or DATA_FAILURES when any failure row exists

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


# ---------------------------------------------------------------- validation


def _float_array(a: Any, name: str, n_frames: int) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "fiu":
        raise BadInput(f"{name} must be numeric, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[1] == 0:
        raise BadInput(f"{name} must be [T, D] with D >= 1, got shape {list(a.shape)}")
    if a.shape[0] != n_frames:
        raise BadInput(f"{name} has {a.shape[0]} rows but the video has {n_frames} frames")
    a = np.ascontiguousarray(a, dtype="<f4")
    if not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])
        raise BadInput(f"{name} holds NaN/inf (first at row {bad})")
    return a


def validate_episode(ep: Episode) -> tuple[SampleMeta, np.ndarray | None, np.ndarray | None]:
    """Check one episode on its own; returns (meta, action float32 [T, A] | None, state | None).

    Raises ``BadInput`` naming the problem. Dataset-wide checks happen in ``finalize_dataset``.
    """
    try:
        check_key(ep.key)
    except FormatError as e:
        raise BadInput(str(e)) from None
    if not isinstance(ep.frames, dict) or not ep.frames:
        raise BadInput("frames must be a non-empty dict camera -> uint8 [T, H, W, 3]")
    shapes = {}
    for camera, frames in ep.frames.items():
        if not isinstance(camera, str) or "." in camera or camera in _RESERVED or not camera:
            raise BadInput(f"camera name {camera!r}: no dots, not empty, not one of {sorted(_RESERVED)}")
        try:
            shapes[camera] = check_frames(frames)
        except EncodeError as e:
            raise BadInput(f"camera {camera!r}: {e}") from None
    if len(set(shapes.values())) > 1:
        raise BadInput(f"cameras differ in length or size (T, H, W): {shapes}")
    n_frames, height, width = next(iter(shapes.values()))
    action = None if ep.action is None else _float_array(ep.action, "action", n_frames)
    state = None if ep.state is None else _float_array(ep.state, "state", n_frames)
    try:
        fps = float(ep.fps)
        json.dumps(ep.extra)
    except (TypeError, ValueError) as e:
        raise BadInput(f"fps or extra not serialisable: {e}") from None
    if not (fps > 0 and np.isfinite(fps)):
        raise BadInput(f"fps must be a positive number, got {ep.fps}")
    if not ep.embodiment or not isinstance(ep.embodiment, str):
        raise BadInput("embodiment must be a non-empty string")
    meta = SampleMeta(
        key=ep.key,
        fps=fps,
        n_frames=n_frames,
        height=height,
        width=width,
        cameras=list(ep.frames),
        embodiment=ep.embodiment,
        task=str(ep.task),
        instruction=str(ep.instruction),
        source=str(ep.source),
        success=None if ep.success is None else bool(ep.success),
        has_action=action is not None,
        action_dim=0 if action is None else action.shape[1],
        state_dim=0 if state is None else state.shape[1],
        episode_index=int(ep.episode_index),
        seed=None if ep.seed is None else int(ep.seed),
        extra=ep.extra,
    )
    return meta, action, state


# ---------------------------------------------------------------- one shard


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: the bytes depend only on name and data
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------- worker processes

_JOB_PID: int | None = None  # in a pool worker: the pid of the job's process, which must outlive it


def _orphaned() -> bool:
    return _JOB_PID is not None and os.getppid() != _JOB_PID


def _watch_parent() -> None:
    while True:
        if _orphaned():
            os._exit(1)
        time.sleep(0.5)


def _worker_init(job_pid: int) -> None:
    """Pool worker initializer: die with the job's process (a kill -9 of it must not leave writers).

    Linux: the kernel sends SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere a
    thread polls ``getppid()``. Either way ``_replace`` checks once more before renaming anything.
    """
    global _JOB_PID
    _JOB_PID = job_pid
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if _orphaned():  # the job died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, name="watch-job-process", daemon=True).start()


def _replace(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` and rename it to ``path``: readers see the old file or the whole new one."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    if _orphaned():  # a worker whose job is gone writes nothing: a rerun owns the folder now
        os._exit(1)
    os.replace(tmp, path)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        _replace(tmp, path)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise _disk_full(path, e, tmp) from None


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_shard(
    out_dir: str | Path, index: int, items: Iterable[Episode | Failure], sources: list[str] | None = None
) -> dict[str, Any]:
    """Write shard ``index`` from episodes (validated here) and already-known failures.

    Writes ``shard-NNNNNN.tar`` atomically, then its stats.json (the completion marker), and returns
    the stats. ``sources`` (the job's inputs as strings) lets a rerun tell whether the shard is current.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tar_path, stats_path = out_dir / shard_name(index), out_dir / stats_name(index)
    stats_path.unlink(missing_ok=True)  # this shard is incomplete until its new stats exist
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    entries: list[tuple[SampleMeta, Any, Any]] = []
    failures: list[dict] = []
    keys: set[str] = set()
    try:
        _write_tar(tmp, items, entries, failures, keys)
        _replace(tmp, tar_path)
    except OSError as e:  # a full disk: no half tar left behind, the job stops (DiskFull, exit 74)
        if e.errno not in DISK_FULL:
            raise
        raise _disk_full(tar_path, e, tmp) from None
    for row in failures:
        log.warning("%s: %s%s", row["source"], f"{row['key']}: " if row["key"] else "", row["reason"])
    doc = shard_stats_doc(index, sources or [], entries, failures, tar_path)
    _write_stats(stats_path, doc, tar_path)
    return doc


def _write_stats(stats_path: Path, doc: dict[str, Any], tar_path: Path) -> None:
    """The shard's completion marker; on a full disk its tar goes too (only complete shards stay visible)."""
    try:
        _write_atomic(stats_path, _json_bytes(doc))
    except DiskFull:
        stats_path.unlink(missing_ok=True)
        tar_path.unlink(missing_ok=True)
        raise


def _write_tar(
    tmp: Path, items: Iterable[Episode | Failure], entries: list, failures: list[dict], keys: set[str]
) -> None:
    """Validate, encode and append ``items`` to the tar ``tmp``; fills ``entries`` and ``failures``."""
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for item in items:
            if isinstance(item, Failure):
                failures.append(item.row())
                continue
            source = str(item.source)
            try:
                meta, action, state = validate_episode(item)
                if meta.key in keys:
                    raise BadInput(f"duplicate key {meta.key!r} in this shard")
                videos = [(video_member(c), encode_video(f, meta.fps)) for c, f in item.frames.items()]
            except (BadInput, EncodeError) as e:
                failures.append(Failure(source, getattr(item, "key", None), str(e)).row())
                continue
            except Exception as e:  # noqa: BLE001 - e.g. an FFmpeg error: report, go on
                failures.append(Failure(source, getattr(item, "key", None), f"{type(e).__name__}: {e}").row())
                continue
            keys.add(meta.key)
            members = [(META, meta.to_json())]
            members += [(ACTION, _npy(action))] if action is not None else []
            members += [(STATE, _npy(state))] if state is not None else []
            for name, data in members + videos:
                _tar_add(tar, f"{meta.key}.{name}", data)
            entries.append((meta, action, state))


def _episodes_of(inputs: list, make_episodes: Callable[[Any], Iterable[Episode]]) -> Iterator[Episode | Failure]:
    """Episodes of each input in order; an exception while making them becomes a Failure."""
    for inp in inputs:
        source = str(inp)
        try:
            for ep in make_episodes(inp):
                if not isinstance(ep, Episode):
                    raise BadInput(f"make_episodes yielded a {type(ep).__name__}, not an Episode")
                yield ep if ep.source else dataclasses.replace(ep, source=source)
        except BadInput as e:
            yield Failure(source, None, str(e))
        except Exception as e:  # noqa: BLE001 - a broken input must not stop the job
            log.debug("making episodes from %s failed", source, exc_info=True)
            yield Failure(source, None, f"{type(e).__name__}: {e}")


def _job_shard(out_dir: str, index: int, inputs: list, make_episodes: Callable) -> dict[str, int]:
    doc = write_shard(out_dir, index, _episodes_of(inputs, make_episodes), [str(i) for i in inputs])
    return {"index": index, "samples": doc["samples"], "failures": len(doc["failures"])}


# ---------------------------------------------------------------- finalize


def _decide_drops(docs: list[dict[str, Any]]) -> dict[int, list[dict]]:
    """Samples that conflict with an earlier sample (shard/key order): {shard index: failure rows}.

    The first sample sets the dataset resolution; the first sample of an embodiment with an action
    (state) sets its action (state) dim; keys must be unique. Samples without actions agree with any
    action dim (they are action-free clips of that embodiment).
    """
    resolution, dims, seen = None, {}, set()
    drops: dict[int, list[dict]] = {}
    for i, doc in enumerate(docs):
        for s in doc["sample_info"]:
            key, emb = s["key"], s["embodiment"]
            reason = None
            if key in seen:
                reason = f"duplicate key {key!r}: an earlier shard already holds it"
            elif resolution and [s["height"], s["width"]] != resolution:
                reason = (
                    f"resolution {s['height']}x{s['width']} differs from the dataset's "
                    f"{resolution[0]}x{resolution[1]} (set by the first sample)"
                )
            else:
                for field in ("action", "state"):
                    dim, first = s[f"{field}_dim"], dims.get((emb, field))
                    if dim and first and first[0] != dim:
                        reason = (
                            f"{field} dim {dim} differs from embodiment {emb!r}'s {field} dim {first[0]} "
                            f"(set by sample {first[1]!r})"
                        )
                        break
            if reason:
                drops.setdefault(i, []).append(Failure(s["source"], key, reason).row())
                continue
            seen.add(key)
            resolution = resolution or [s["height"], s["width"]]
            for field in ("action", "state"):
                if s[f"{field}_dim"]:
                    dims.setdefault((emb, field), (s[f"{field}_dim"], key))
    return drops


def _drop_samples(out_dir: Path, index: int, doc: dict[str, Any], rows: list[dict]) -> dict[str, Any]:
    """Rewrite shard ``index`` without the samples in ``rows`` (no re-encoding) and its stats."""
    drop = {r["key"] for r in rows}
    tar_path = out_dir / shard_name(index)
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    entries: dict[str, list] = {}
    try:
        _copy_without(tar_path, tmp, drop, entries)
        _replace(tmp, tar_path)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise _disk_full(tar_path, e, tmp) from None
    new = shard_stats_doc(index, doc["sources"], [tuple(e) for e in entries.values()], doc["failures"] + rows, tar_path)
    _write_stats(out_dir / stats_name(index), new, tar_path)
    return new


def _copy_without(tar_path: Path, tmp: Path, drop: set[str], entries: dict[str, list]) -> None:
    with tarfile.open(tar_path) as src, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            key, name = member.name.split(".", 1)
            if key in drop:
                continue
            data = src.extractfile(member).read()
            _tar_add(dst, member.name, data)
            e = entries.setdefault(key, [None, None, None])
            if name == META:
                e[0] = SampleMeta.from_json(data, f"{tar_path}:{member.name}")
            elif name in (ACTION, STATE):
                e[1 if name == ACTION else 2] = np.load(io.BytesIO(data), allow_pickle=False)


def finalize_dataset(
    out_dir: str | Path, created_by: str | None = None, n_shards: int | None = None
) -> tuple[dict[str, Any], list[dict]]:
    """Make the dataset consistent and (re)build ``manifest.json`` and ``failures.jsonl``.

    Reads the stats of shards ``0 .. n_shards-1`` (default: every consecutive stats file from 0),
    drops samples that conflict with earlier ones (see ``_decide_drops``), and writes the manifest
    and the failure rows of all shards atomically. Idempotent: running it again changes nothing.
    ``created_by=None`` keeps the existing manifest's value.
    Returns (manifest, failure rows).
    """
    out = Path(out_dir)
    if n_shards is None:
        n_shards = 0
        while (out / stats_name(n_shards)).exists():
            n_shards += 1
    docs = [read_shard_stats(out / stats_name(i)) for i in range(n_shards)]
    for i, rows in _decide_drops(docs).items():
        for row in rows:
            log.warning("%s: %s: %s", shard_name(i), row["key"], row["reason"])
        docs[i] = _drop_samples(out, i, docs[i], rows)
    if (out / stats_name(n_shards)).exists():
        log.warning(
            "%s: holds shards beyond the %d of this job (from an earlier, larger job?); they are not in the manifest",
            out,
            n_shards,
        )
    if created_by is None:
        try:
            created_by = json.loads((out / MANIFEST).read_text()).get("created_by", "")
        except (OSError, ValueError, AttributeError):
            created_by = ""
    manifest = build_manifest(docs, created_by)
    failures = [row for d in docs for row in d["failures"]]
    _write_atomic(out / FAILURES, b"".join(_json_bytes(r) + b"\n" for r in failures))
    _write_atomic(out / MANIFEST, json.dumps(manifest, sort_keys=True, indent=1).encode() + b"\n")
    _write_card(out, manifest)
    return manifest, failures


def _write_card(out: Path, manifest: dict[str, Any]) -> None:
    """``README.md``, the dataset card (shards.dataset_card), unless the folder holds someone else's."""
    path = out / CARD
    try:
        if not is_ours(path.read_text(errors="replace")):
            log.info("%s: not written by wm-pipeline; left as it is (no dataset card)", path)
            return
    except FileNotFoundError:
        pass
    _write_atomic(path, dataset_card(manifest).encode())


# ---------------------------------------------------------------- the job


def _is_complete(out_dir: Path, index: int, sources: list[str], quiet: bool = False) -> bool:
    """A shard may be skipped: its stats exist, were made from ``sources`` and match the tar's size and sha256."""
    path, tar = out_dir / stats_name(index), out_dir / shard_name(index)
    warn = log.debug if quiet else log.warning
    if not (path.exists() and tar.exists()):
        return False
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        warn("%s: unreadable, shard will be rewritten", path)
        return False
    if doc.get("sources") != sources:
        warn("%s: made from other inputs than this job's; shard will be rewritten", path)
        return False
    size = tar.stat().st_size
    if doc.get("bytes") != size or doc.get("sha256") != file_sha256(tar):
        warn(
            "%s: does not match its stats record (file: %d bytes; %s records %s bytes, sha256 %.12s...); "
            "shard will be rewritten",
            tar,
            size,
            path.name,
            doc.get("bytes"),
            doc.get("sha256"),
        )
        return False
    return True


def run_sharded_job(
    out_dir: str | Path,
    inputs: list,
    make_episodes: Callable[[Any], Iterable[Episode]],
    samples_per_shard: int,
    workers: int = 1,
    created_by: str = "",
    desc: str = "shards",
) -> JobResult:
    """Turn ``inputs`` into a dataset in ``out_dir``, resuming whatever an earlier run completed.

    ``make_episodes(input)`` yields 0..n ``Episode``s; with ``workers > 1`` it runs in spawned
    processes, so it must be picklable (a module-level function or a functools.partial of one).
    Holds ``out_dir/.lock`` throughout; raises ``shards.folder_lock.FolderBusy`` when another live
    job holds it.
    """
    if samples_per_shard < 1 or workers < 1:
        raise ValueError(f"samples_per_shard and workers must be >= 1, got {samples_per_shard}, {workers}")
    with take_lock(FolderLock(out_dir)):
        return _run_job(Path(out_dir), list(inputs), make_episodes, samples_per_shard, workers, created_by, desc)


@contextlib.contextmanager
def take_lock(lock: FolderLock) -> Iterator[FolderLock]:
    """Hold ``lock`` for the ``with`` block; a disk too full for the lock file's few bytes is ``DiskFull``
    naming it (the empty lock file removed), not a traceback."""
    try:
        lock.acquire()
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        try:
            if lock.path.stat().st_size == 0:
                lock.path.unlink()
        except OSError:
            pass
        free = free_bytes(lock.path.parent)
        raise DiskFull(
            f"cannot write {lock.path} (the job's lock): {e.strerror or e}; nothing else was written; "
            f"{megabytes(free) if free is not None else 'unknown'} free there: make room and rerun",
            str(lock.path),
            0,
            e.errno,
        ) from None
    try:
        yield lock
    finally:
        lock.release()


def _write_pending(
    out: Path, chunks: list[list], pending: list[int], make_episodes: Callable, workers: int, bar: tqdm
) -> None:
    if workers == 1 or len(pending) <= 1:
        for i in pending:
            _job_shard(str(out), i, chunks[i], make_episodes)
            bar.update()
        return
    try:
        pickle.dumps(make_episodes)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"make_episodes must be picklable with workers > 1 (a module-level function): {e}") from None
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(workers, len(pending)), mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
    ) as pool:
        futures = [pool.submit(_job_shard, str(out), i, chunks[i], make_episodes) for i in pending]
        try:
            for fut in as_completed(futures):
                fut.result()
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # a full disk: start no further shard
            raise


def _job_disk_full(out: Path, chunks: list[list], e: DiskFull) -> DiskFull:
    """The job's one-line message: the file, the shards kept, the room the rest needs and the room left."""
    done = [i for i in range(len(chunks)) if _is_complete(out, i, [str(x) for x in chunks[i]], quiet=True)]
    left = len(chunks) - len(done)
    sizes = [(out / shard_name(i)).stat().st_size for i in done]
    if e.errno == errno.EFBIG:  # not the free room: a limit on one file's size
        room = (
            f"writes files larger than the file system or the process's file-size limit (`ulimit -f`) allows "
            f"({megabytes(e.written)} written); lower --samples-per-shard or raise the limit"
        )
        return DiskFull(
            f"{e}; {len(done)} of {len(chunks)} shard(s) complete and kept; the rest of the job {room}, "
            f"then rerun the same command to resume",
            e.path,
            e.written,
            e.errno,
        )
    if sizes and left:
        mean = sum(sizes) // len(sizes)
        room = room_note(out, mean * left, f"{left} shard(s) left x {megabytes(mean)} each")
    else:  # no complete shard to measure: the free room was not enough for one
        free = free_bytes(out)
        room = (
            f"needs more than the {megabytes(free) if free is not None else 'unknown'} free there (the shard had "
            f"written {megabytes(e.written)} when the disk filled)"
        )
    return DiskFull(
        f"{e}; {len(done)} of {len(chunks)} shard(s) complete and kept; the rest of the job {room}: "
        f"make room and rerun the same command to resume",
        e.path,
        e.written,
        e.errno,
    )


def _run_job(
    out: Path,
    inputs: list,
    make_episodes: Callable[[Any], Iterable[Episode]],
    samples_per_shard: int,
    workers: int,
    created_by: str,
    desc: str,
) -> JobResult:
    chunks = [inputs[i : i + samples_per_shard] for i in range(0, len(inputs), samples_per_shard)]
    pending = [i for i, c in enumerate(chunks) if not _is_complete(out, i, [str(x) for x in c])]
    if len(pending) < len(chunks):
        log.info("%s: resuming, %d of %d shards already complete", out, len(chunks) - len(pending), len(chunks))
    bar = tqdm(total=len(chunks), initial=len(chunks) - len(pending), desc=desc, unit="shard")
    try:
        _write_pending(out, chunks, pending, make_episodes, workers, bar)
        manifest, failures = finalize_dataset(out, created_by=created_by, n_shards=len(chunks))
    except DiskFull as e:
        raise _job_disk_full(out, chunks, e) from None
    finally:
        bar.close()
    totals = manifest["totals"]
    log.info(
        "%s: %d samples, %d frames in %d shards; %d failures%s",
        out,
        totals["samples"],
        totals["frames"],
        totals["shards"],
        len(failures),
        f" (see {out / FAILURES})" if failures else "",
    )
    return JobResult(manifest, failures, DATA_FAILURES if failures else 0)
