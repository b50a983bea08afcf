"""`wm inspect DIR|URL`: counts, normalisation stats, failures and a contact-sheet PNG of a shard dataset.

``DIR|URL``: a folder, or an ``s3://`` / ``gs://`` / ``http(s)://`` / ``pipe:CMD {}`` location
(docs/STREAMING.md "Locations"); the contact sheet of a URL goes to ``./contact_sheet.png`` unless
``--sheet`` says otherwise."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wm_pipeline import exit_codes
from wm_pipeline.exit_codes import UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="summarise a shard dataset and draw a contact sheet",
        description="Print a dataset's counts (shards, samples, frames, per embodiment and "
        "task), normalisation stats, failures, and write a contact-sheet PNG: "
        "one row per sample, evenly spaced frames, no gaps.",
    )
    p.add_argument(
        "data",
        metavar="DIR|URL",
        help="dataset folder (holds manifest.json), or an s3:// gs:// http(s):// or pipe: location",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument(
        "--sheet",
        default=None,
        help="contact-sheet PNG path (default: DIR/contact_sheet.png; for a URL ./contact_sheet.png)",
    )
    p.add_argument("--no-sheet", action="store_true", help="do not decode anything or write the PNG")
    p.add_argument(
        "--verify",
        action="store_true",
        help="read and decode every member of every shard; exit 3 listing the bad ones (docs/FORMAT.md)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=4,
        help="contact sheet rows: samples spread over the dataset (default: %(default)s)",
    )
    p.add_argument(
        "--frames",
        type=int,
        default=8,
        help="contact sheet columns: frames evenly spaced in a sample (default: %(default)s)",
    )
    # PyAV by default: a few frames do not repay importing torch for torchcodec
    p.add_argument(
        "--backend",
        default="pyav",
        choices=("pyav", "auto", "torchcodec", "decord"),
        help="video decode backend (default: %(default)s)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from shards.inspect import contact_sheet, dataset_summary, format_summary, verify_dataset
    from shards.location import is_remote

    if args.samples < 1 or args.frames < 1:
        raise UsageError(f"--samples and --frames must be >= 1, got {args.samples}, {args.frames}")
    summary = dataset_summary(args.data)
    if args.verify:
        summary["verify"] = verify_dataset(args.data, backend=args.backend)
    sheet = None
    if not args.no_sheet and summary["samples"]:
        path = args.sheet or (
            "contact_sheet.png" if is_remote(args.data) else str(Path(args.data) / "contact_sheet.png")
        )
        sheet = contact_sheet(args.data, path, samples=args.samples, frames=args.frames, backend=args.backend)
    if args.json:
        print(json.dumps({**summary, "contact_sheet": sheet}, indent=1))
    else:
        print(format_summary(summary, sheet))
    # a damaged dataset (missing or resized shard files) is a data problem, like ingest failures
    bad = summary["problems"] or (summary.get("verify") or {}).get("problems")
    return exit_codes.DATA_FAILURES if bad else exit_codes.OK
