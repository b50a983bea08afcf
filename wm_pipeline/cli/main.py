"""The `wm` command line. Each command lives in `wm_pipeline/cli/commands/<name>.py` and exposes
``add_parser(subparsers)``, which registers itself with ``set_defaults(run=<fn>)``; the function
takes the parsed args and returns an exit code (see ``wm_pipeline.exit_codes``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from wm_pipeline import exit_codes
from wm_pipeline.training.preemption import PreemptionHandler  # imports nothing heavy: main() installs it first thing


def build_parser() -> argparse.ArgumentParser:
    import importlib
    import pkgutil

    from wm_pipeline.cli import commands

    parser = argparse.ArgumentParser(
        prog="wm", description="Video world models and latent actions, from video to robot control."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"wm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"wm_pipeline.cli.commands.{info.name}")
        module.add_parser(sub)
    return parser


def _version() -> str:
    """The installed package's version (pyproject.toml), without importing anything heavy."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wm-pipeline")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `wm train`: SIGUSR1 / SIGTERM checkpoint from the first moment, before the commands' imports
    # (wm_pipeline.training.preemption imports nothing heavy); wm_pipeline.cli.commands.train takes the handler over.
    signals = PreemptionHandler().install() if _command(argv) == "train" else None
    try:
        return _main(argv, signals)
    finally:
        if signals is not None:
            signals.uninstall()


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _main(argv: list[str], signals: PreemptionHandler | None) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.signals = signals
    from shards.folder_lock import FolderBusy
    from shards.format import FormatError

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except (exit_codes.UsageError, FormatError, FileNotFoundError, FolderBusy) as e:  # FolderBusy: --out in use
        print(f"wm {args.command}: error: {e}", file=sys.stderr)
        return exit_codes.USAGE
    except exit_codes.WriteFailed as e:  # disk full / I/O error while writing an output: names the path
        print(f"wm {args.command}: error: {e}", file=sys.stderr)
        return exit_codes.WRITE_FAILED
    except BrokenPipeError:  # `wm inspect DIR | head`: the reader left; end quietly, as Unix tools do
        return _stdout_closed()
    except KeyboardInterrupt:
        print(f"wm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        writer = sys.modules.get("shards.writer")  # loaded by every job that writes shards (not by `wm --help`)
        if writer is not None and isinstance(e, writer.DiskFull):  # ingest / collect on a full disk
            print(f"wm {args.command}: error: {e}", file=sys.stderr)
            return exit_codes.WRITE_FAILED
        if isinstance(e, ImportError) and "pip install 'wm-pipeline[" in str(e):  # a feature whose extra is missing
            print(f"wm {args.command}: error: {e}", file=sys.stderr)
            return exit_codes.USAGE
        raise


def _stdout_closed() -> int:
    """Nobody reads stdout any more: point it at /dev/null (Python's flush at exit would fail again) and
    return the exit status of a process ended by SIGPIPE (128 + 13), without a message."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return exit_codes.BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
