"""The `wm` command line. Each command lives in `pipeline/commands/<name>.py` and exposes
``add_parser(subparsers)``, which registers itself with ``set_defaults(run=<fn>)``; the function
takes the parsed args and returns an exit code (see ``pipeline.exit_codes``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from pipeline import commands, exit_codes
from shards.folder_lock import FolderBusy
from shards.format import FormatError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wm", description="Video world models and latent actions, from video to robot control.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"pipeline.commands.{info.name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.run(args) or 0)
    except (exit_codes.UsageError, FormatError, FileNotFoundError, FolderBusy) as e:   # FolderBusy: --out in use
        print(f"wm {args.command}: error: {e}", file=sys.stderr)
        return exit_codes.USAGE
    except exit_codes.WriteFailed as e:   # disk full / I/O error while writing an output: names the path
        print(f"wm {args.command}: error: {e}", file=sys.stderr)
        return exit_codes.WRITE_FAILED
    except KeyboardInterrupt:
        print(f"wm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
