"""`wm export lerobot SHARDS --out DIR`: a shard dataset written as a LeRobot v3 dataset (shards/export_lerobot.py).

wm export lerobot data/robot --out exports/robot      # then: LeRobotDataset("any/name", root="exports/robot")
"""

from __future__ import annotations

import argparse

from wm_pipeline import exit_codes


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a shard dataset in another ecosystem's format (LeRobot v3)",
        description="Write a shard dataset in another ecosystem's format.",
    )
    sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    e = sub.add_parser(
        "lerobot",
        help="a LeRobot v3 dataset folder (LeRobotDataset(root=DIR) reads it)",
        description="Write SHARDS as a LeRobot v3.0 dataset: meta/info.json, tasks, episodes, stats, "
        "data parquet (action, observation.state, ...) and one MP4 per camera holding "
        "the episodes' H.264 streams copied without re-encoding. docs/INGEST.md, 'Export'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("data", metavar="SHARDS", help="shard dataset folder (or URL) holding manifest.json")
    e.add_argument("--out", required=True, help="new folder for the LeRobot dataset (must not exist, or be empty)")
    e.add_argument("--embodiment", default=None, help="the embodiment to export when the shards hold several")
    e.add_argument("--robot-type", default=None, help="info.json robot_type (default: the embodiment's name)")
    e.add_argument("--data-file-mb", type=float, default=100, help="start a new data parquet past this size")
    e.add_argument("--video-file-mb", type=float, default=200, help="start a new MP4 past this size")
    e.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from shards.export_lerobot import ExportError, export_lerobot

    try:
        r = export_lerobot(
            args.data,
            args.out,
            embodiment=args.embodiment,
            robot_type=args.robot_type,
            data_file_mb=args.data_file_mb,
            video_file_mb=args.video_file_mb,
        )
    except ExportError as e:
        raise exit_codes.UsageError(str(e)) from None
    skipped = f"; {r.skipped} sample(s) without actions or of another embodiment left out" if r.skipped else ""
    print(
        f"wm export lerobot: {r.episodes} episodes, {r.frames} frames, {r.tasks} task(s), "
        f"{r.video_files} video file(s) -> {r.out}{skipped}"
    )
    return exit_codes.OK
