"""Ingest action-free video (anything FFmpeg reads) into fixed-length square clips.

One input file -> 0..n clips, each one sample with embodiment ``"video"`` and no actions:

1. decode with PyAV (it bundles FFmpeg and keeps the good frames of a damaged file);
2. resample to a constant ``fps`` by timestamps: output frame ``i`` sits at ``t0 + i / fps``
   (``t0`` = the first frame's time) and shows the latest source frame at or before that time
   (sample-and-hold; times within ``TIME_TOLERANCE`` count as equal because Matroska/WebM store
   milliseconds). Frame rate changes, dropped frames and pts that do not start at 0 are handled;
3. resize the shorter side to ``resolution`` and center-crop to ``[resolution, resolution]``
   (only the frames that are kept are converted);
4. cut into clips of ``round(clip_seconds * fps)`` frames; the short tail is dropped.

Failures (each becomes one ``failures.jsonl`` row naming the file, never a traceback): a missing,
empty or non-media file, no video stream, no decodable frame, a video shorter than one clip.
A truncated or corrupt file yields the clips decoded before the damage AND a failure row saying
how much was lost, so the good part is used and the damage is still reported. A timestamp gap
(decoded frames more than ``GAP_SECONDS`` and ``GAP_FRAMES`` source frames apart: a corrupt cluster
the demuxer skipped) is not bridged with frozen frames: the clip across it is dropped, clips start
again after it, and a failure row names where the gap is.

Keys: ``<sanitised stem>-<8 hex of sha1(absolute path)>-c<clip index>``: stable across runs and
worker counts, unique across folders that hold equal file names, no dots.

Parallelism, sharding, resume and the manifest come from ``shards.writer.run_sharded_job``.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from shards.writer import BadInput, Episode, JobResult, run_sharded_job

log = logging.getLogger(__name__)

EMBODIMENT = "video"
DEFAULT_CAMERA = "video"
TIME_TOLERANCE = 1e-3  # seconds; timestamps closer than this are equal (ms time bases)
# A decode that ends this much before the container's stated duration is called truncated.
TRUNCATION_SLACK = 0.5  # seconds, plus two source frames
# Consecutive decoded frames further apart than this (and than GAP_FRAMES source frames) mark a gap:
# footage the demuxer skipped (a corrupt Matroska cluster, a cut in the stream). Holding the last frame
# across it would store frozen frames, so the clip across a gap is dropped and the gap reported.
GAP_SECONDS = 0.25
GAP_FRAMES = 4
# Folder walks pick files with these suffixes; files named explicitly (or by a glob) are always tried.
VIDEO_SUFFIXES = frozenset(
    {
        ".mp4",
        ".m4v",
        ".mov",
        ".mkv",
        ".webm",
        ".avi",
        ".flv",
        ".wmv",
        ".mpg",
        ".mpeg",
        ".ts",
        ".mts",
        ".m2ts",
        ".3gp",
        ".ogv",
        ".gif",
        ".y4m",
    }
)
_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


# ---------------------------------------------------------------- finding inputs


def find_videos(sources: list[str]) -> list[str]:
    """Expand files, folders (recursive, by ``VIDEO_SUFFIXES``) and globs into absolute paths."""
    return find_inputs(sources, VIDEO_SUFFIXES)


def find_inputs(sources: list[str], suffixes: frozenset[str]) -> list[str]:
    """Expand files, folders (recursive, files with one of ``suffixes``) and globs into absolute paths.

    Order: sources in the order given, each folder / glob sorted; duplicates dropped. A path that
    does not exist is kept (it becomes a failure row); a glob that matches nothing is logged.
    """
    found: list[str] = []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            found += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        elif not path.exists() and _GLOB_CHARS.search(src):
            matches = sorted(p for p in glob.glob(src, recursive=True) if os.path.isfile(p))
            if not matches:
                log.warning("%s: the pattern matches no file", src)
            found += matches
        else:
            found.append(str(path))
    return list(dict.fromkeys(os.path.abspath(p) for p in found))


def source_id(path: str) -> str:
    """``<sanitised stem>-<8 hex>``: readable, stable for a given absolute path, no dots."""
    stem = _UNSAFE.sub("_", Path(path).stem).strip("_")[:40] or "video"
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def clip_key(path: str, clip_index: int) -> str:
    return f"{source_id(path)}-c{clip_index:04d}"


# ---------------------------------------------------------------- frames


def square_frame(frame: av.VideoFrame, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (area filter) and center-crop: uint8 ``[size, size, 3]``."""
    w, h = frame.width, frame.height
    if w <= h:
        new_w, new_h = size, max(size, round(h * size / w))
    else:
        new_w, new_h = max(size, round(w * size / h)), size
    rgb = frame.reformat(width=new_w, height=new_h, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(rgb[top : top + size, left : left + size])


def square_array(frames: np.ndarray, size: int) -> np.ndarray:
    """``square_frame`` for a uint8 ``[T, H, W, 3]`` array -> ``[T, size, size, 3]``."""
    return np.stack(
        [square_frame(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24"), size) for f in frames]
    )


def _open(path: str) -> av.container.InputContainer:
    if not os.path.exists(path):
        raise BadInput("no such file")
    if os.path.getsize(path) == 0:
        raise BadInput("empty file (0 bytes)")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, EOFError, ValueError) as e:
        raise BadInput(f"not a readable media file ({e})") from None
    if not container.streams.video:
        container.close()
        raise BadInput("no video stream")
    return container


def resampled_frames(path: str, fps: float, size: int, stats: dict) -> Iterator[np.ndarray]:
    """Yield the video's frames at a constant ``fps``, each uint8 ``[size, size, 3]``.

    ``stats`` is filled as decoding goes: ``source_fps``, ``source_size`` [H, W], ``decoded``
    (source frames), ``end`` (seconds covered), ``error`` (why decoding stopped early, or None) and
    ``gaps`` ([(from, to)] seconds since the first frame: timestamp gaps). At a gap it yields ``None``
    (frames before and after it are not continuous) instead of holding the last frame across it.
    Raises ``BadInput`` when the file cannot be opened or holds no decodable frame.
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        stats.update(source_fps=rate, decoded=0, end=0.0, error=None, gaps=[])
        frame_dt = 1.0 / rate if rate else 1.0 / fps
        gap = max(GAP_SECONDS, GAP_FRAMES * frame_dt)
        t0: float | None = None
        held, held_time, held_rgb = None, 0.0, None  # the source frame shown until the next one
        out_index = 0
        gap_from: float | None = None  # inside a gap: where it began (waiting for the next keyframe)

        def emit_until(limit: float) -> Iterator[np.ndarray]:
            # every output time before `limit` shows the held frame
            nonlocal out_index, held_rgb
            while t0 + out_index / fps < limit - TIME_TOLERANCE:
                if held_rgb is None:
                    held_rgb = square_frame(held, size)
                yield held_rgb
                out_index += 1

        try:
            for frame in container.decode(stream):
                # pts can be missing in raw streams: fall back to the frame count
                t = float(frame.time) if frame.time is not None else stats["decoded"] * frame_dt
                if t0 is None:
                    t0 = t
                    stats["source_size"] = [frame.height, frame.width]
                if held is not None and gap_from is None and t - held_time > gap:  # skipped footage
                    gap_from = held_time + frame_dt  # the last frame before it lasts one source frame
                    yield from emit_until(gap_from)
                if gap_from is not None:
                    if not frame.key_frame:  # predicted from frames that were lost: garbage until a keyframe
                        stats["decoded"] += 1
                        continue
                    stats["gaps"].append((gap_from - t0, t - t0))
                    out_index = stats["next_index"] = max(out_index, math.ceil((t - t0 - TIME_TOLERANCE) * fps))
                    gap_from = None
                    yield None  # do not freeze across the gap: the clip in progress ends here
                elif held is not None:
                    yield from emit_until(t)
                held, held_time, held_rgb = frame, t, None
                stats["decoded"] += 1
        except (av.FFmpegError, OSError, EOFError, ValueError) as e:
            stats["error"] = f"decode error after {stats['decoded']} frames ({e})"
        if held is None:
            raise BadInput(stats["error"] or "no decodable video frame (zero-frame video)")
        end = held_time + frame_dt  # the last frame lasts one source frame
        stats["end"] = end - t0
        if gap_from is not None:  # no keyframe after the gap: the rest of the file is lost
            stats["gaps"].append((gap_from - t0, None))
        else:
            yield from emit_until(end)
        if stats["error"] is None:
            stated = _stated_duration(container, stream)
            if stated is not None and stats["end"] < stated - TRUNCATION_SLACK - 2 * frame_dt:
                stats["error"] = f"truncated: decoded {stats['end']:.2f} s of the {stated:.2f} s the container states"
    finally:
        container.close()


def _stated_duration(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


# ---------------------------------------------------------------- clips


def video_clips(path: str, *, resolution: int, fps: float, clip_seconds: float, camera: str) -> Iterator[Episode]:
    """Yield the clips of one video file as ``Episode``s (frames ``[L, R, R, 3]``, no actions).

    Raises ``BadInput`` after the last good clip when the file is damaged, or when it yields none.
    """
    clip_len = clip_frames(fps, clip_seconds)
    stats: dict = {}
    buffer: list[np.ndarray] = []
    n_clips, n_out, dropped = 0, 0, 0  # n_out: output frame times passed (gaps included)
    for rgb in resampled_frames(path, fps, resolution, stats):
        if rgb is None:  # a timestamp gap: the clip in progress is not continuous, drop it
            dropped += bool(buffer)
            n_out = stats["next_index"]
            buffer = []
            continue
        buffer.append(rgb)
        n_out += 1
        if len(buffer) == clip_len:
            yield Episode(
                key=clip_key(path, n_clips),
                frames={camera: np.stack(buffer)},
                fps=float(fps),
                embodiment=EMBODIMENT,
                source=path,
                episode_index=n_clips,
                extra={
                    "clip_index": n_clips,
                    "start_seconds": round((n_out - clip_len) / fps, 6),
                    "source_fps": stats.get("source_fps"),
                    "source_size": stats.get("source_size"),
                },
            )
            n_clips += 1
            buffer = []
    gaps = stats.get("gaps") or []
    if gaps:
        a, b = gaps[0]
        where = (
            f"no usable frame from {a:.2f} s to {b:.2f} s ({b - a:.2f} s missing or undecodable up to the next "
            f"keyframe: a corrupt or cut part)"
            if b is not None
            else f"no usable frame after {a:.2f} s (no keyframe after the damage)"
        )
        more = f" and {len(gaps) - 1} more" if len(gaps) > 1 else ""
        stats["error"] = "; ".join(
            filter(
                None, [f"timestamp gap: {where}{more}; dropped {dropped} partial clip(s) across it", stats.get("error")]
            )
        )
    if stats.get("error"):
        raise BadInput(f"{stats['error']}; kept {n_clips} clip(s) from the good part")
    if n_clips == 0:
        raise BadInput(f"shorter than one clip: {stats.get('end', 0):.2f} s < {clip_seconds} s")
    if buffer:
        log.debug("%s: dropped a %d-frame tail shorter than a clip", path, len(buffer))


def clip_frames(fps: float, clip_seconds: float) -> int:
    n = round(clip_seconds * fps)
    if n < 1:
        raise ValueError(f"a clip of {clip_seconds} s at {fps} fps has no frame")
    return n


def ingest_videos(
    sources: list[str],
    out_dir: str | Path,
    *,
    resolution: int = 64,
    fps: float = 10.0,
    clip_seconds: float = 4.0,
    camera: str = DEFAULT_CAMERA,
    workers: int = 2,
    samples_per_shard: int = 64,
    created_by: str = "wm ingest videos",
) -> JobResult:
    """Find the videos in ``sources`` and write their clips as shards into ``out_dir``."""
    paths = find_videos(sources)
    if not paths:
        raise FileNotFoundError(f"no video found in {sources}")
    make = functools.partial(video_clips, resolution=resolution, fps=fps, clip_seconds=clip_seconds, camera=camera)
    log.info("ingesting %d video file(s) into %s", len(paths), out_dir)
    return run_sharded_job(
        out_dir, paths, make, samples_per_shard=samples_per_shard, workers=workers, created_by=created_by, desc="videos"
    )
