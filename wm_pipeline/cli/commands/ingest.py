"""`wm ingest videos|episodes`: turn raw video or robot demos into a shard dataset (docs/INGEST.md)."""

from __future__ import annotations

import argparse
import re

from wm_pipeline import exit_codes
from wm_pipeline.exit_codes import UsageError

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_RESERVED = {"meta", "action", "state"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="turn raw video or robot demos into a shard dataset",
        description="Turn raw video or robot demos into a shard dataset (docs/INGEST.md).",
    )
    sub = parser.add_subparsers(dest="source_kind", metavar="KIND", required=True)

    v = sub.add_parser(
        "videos",
        help="action-free video files -> fixed-length square clips",
        description="Cut videos (anything FFmpeg reads) into fixed-length square clips at a constant "
        "fps, embodiment 'video', no actions. A truncated file gives the clips before "
        "the damage plus a failure row; a tail shorter than one clip is dropped.",
    )
    v.add_argument(
        "sources",
        nargs="+",
        metavar="SRC",
        help="video files, folders (searched recursively for video suffixes) or glob patterns",
    )
    _common(v, samples_per_shard=16, per_shard="video files per shard (a file's clips all go to its shard)")
    v.add_argument(
        "--resolution",
        type=int,
        default=64,
        help="output side in pixels, even: shorter side resized to it, then center-cropped square "
        "(default: %(default)s)",
    )
    v.add_argument(
        "--fps",
        type=float,
        default=10.0,
        help="output frame rate, frames resampled by timestamp (default: %(default)s)",
    )
    v.add_argument(
        "--clip-seconds",
        type=float,
        default=4.0,
        help="clip length in seconds; the short tail is dropped (default: %(default)s)",
    )
    v.add_argument(
        "--camera",
        default="video",
        help="camera name of the stored video (member <key>.<camera>.mp4); set it to match the "
        "datasets you will train on together (default: %(default)s)",
    )
    v.set_defaults(run=run_videos)

    e = sub.add_parser(
        "episodes",
        help="robot demos (frames + actions + states) -> one sample per episode",
        description="Ingest robot demonstrations, one sample per episode. Layouts: npz (one episode "
        "per file), hdf5 (robomimic: data/demo_N), lerobot (v3 dataset folder or repo id); "
        "see docs/INGEST.md.",
    )
    e.add_argument(
        "sources",
        nargs="+",
        metavar="SRC",
        help="files, folders (searched recursively for .npz / .hdf5 / .h5) or globs; "
        "for lerobot: dataset folders or repo ids (lerobot/pusht, looked up in $HF_LEROBOT_HOME)",
    )
    e.add_argument("--format", required=True, choices=("npz", "hdf5", "lerobot"), dest="fmt", help="input layout")
    _common(e, samples_per_shard=64, per_shard="episodes per shard")
    e.add_argument(
        "--embodiment",
        default=None,
        help="robot name for every episode (default: the file's 'embodiment' entry if any, else 'robot')",
    )
    e.add_argument("--camera", default=None, help="comma-separated cameras to keep (default: every camera found)")
    e.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="resize (shorter side) + center-crop to this even square size (default: keep the "
        "native size, which must be even and equal across episodes)",
    )
    e.add_argument(
        "--fps",
        type=float,
        default=10.0,
        help="frame rate when the input does not state one (npz 'fps', robomimic control_freq, "
        "lerobot info.json fps) (default: %(default)s)",
    )
    e.add_argument(
        "--state-keys",
        default=None,
        help="hdf5: comma-separated obs keys concatenated into state, in this order "
        "(default: every low-dim obs key, sorted)",
    )
    e.add_argument(
        "--filter-key",
        default=None,
        metavar="KEY",
        help="hdf5: ingest only the demos listed in mask/KEY (robomimic's splits: train, valid, ...) "
        "(default: every data/demo_N)",
    )
    e.set_defaults(run=run_episodes)


def _common(p: argparse.ArgumentParser, samples_per_shard: int, per_shard: str) -> None:
    p.add_argument("--out", required=True, help="output dataset folder (rerun the same command to resume)")
    p.add_argument(
        "--workers", type=int, default=2, help="parallel processes, one shard each at a time (default: %(default)s)"
    )
    p.add_argument(
        "--samples-per-shard", type=int, default=samples_per_shard, help=per_shard + " (default: %(default)s)"
    )


def _check(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.samples_per_shard < 1:
        raise UsageError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    if args.resolution is not None and (args.resolution < 2 or args.resolution % 2):
        raise UsageError(f"--resolution must be an even number >= 2 (H.264 yuv420p), got {args.resolution}")
    if not args.fps > 0:
        raise UsageError(f"--fps must be positive, got {args.fps}")


def _check_name(what: str, name: str) -> str:
    if not _NAME.match(name) or name in _RESERVED:
        raise UsageError(f"{what} {name!r}: letters, digits, '_' and '-' only, not one of {sorted(_RESERVED)}")
    return name


def _summary(what: str, out: str, result) -> int:
    totals = result.manifest["totals"]
    line = (
        f"wm ingest {what}: {totals['samples']} samples, {totals['frames']} frames in {totals['shards']} "
        f"shard(s) -> {out}; {len(result.failures)} failure(s)"
    )
    if result.failures:
        line += f" (see {out}/failures.jsonl)"
    print(line, flush=True)
    return exit_codes.DATA_FAILURES if result.failures else exit_codes.OK


def run_videos(args: argparse.Namespace) -> int:
    from shards.ingest_videos import clip_frames, ingest_videos  # imported late: `wm --help` stays fast

    _check(args)
    _check_name("--camera", args.camera)
    try:
        clip_frames(args.fps, args.clip_seconds)
    except ValueError as e:
        raise UsageError(f"--clip-seconds: {e}") from None
    result = ingest_videos(
        args.sources,
        args.out,
        resolution=args.resolution,
        fps=args.fps,
        clip_seconds=args.clip_seconds,
        camera=args.camera,
        workers=args.workers,
        samples_per_shard=args.samples_per_shard,
        created_by="wm ingest videos",
    )
    return _summary("videos", args.out, result)


def run_episodes(args: argparse.Namespace) -> int:
    from shards.ingest_episodes import ingest_episodes

    _check(args)
    cameras = [_check_name("--camera", c) for c in args.camera.split(",")] if args.camera else None
    state_keys = [k for k in args.state_keys.split(",") if k] if args.state_keys is not None else None
    if args.embodiment is not None:
        _check_name("--embodiment", args.embodiment)
    if args.filter_key is not None and args.fmt != "hdf5":
        raise UsageError(f"--filter-key selects robomimic demos (mask/KEY): only with --format hdf5, not {args.fmt}")
    result = ingest_episodes(
        args.sources,
        args.out,
        fmt=args.fmt,
        embodiment=args.embodiment,
        cameras=cameras,
        resolution=args.resolution,
        fps=args.fps,
        state_keys=state_keys,
        filter_key=args.filter_key,
        workers=args.workers,
        samples_per_shard=args.samples_per_shard,
        created_by=f"wm ingest episodes --format {args.fmt}",
    )
    return _summary(f"episodes --format {args.fmt}", args.out, result)
