"""`wm ARGS` run by the same ``main()`` in this process, where the process itself is not what a test
checks: a fresh interpreter costs seconds of imports (torch, the simulator, diffusers) per call.

Like a real `wm` process, stderr gets the log lines (``logging.basicConfig`` does nothing under pytest,
whose handlers are already on the root logger), and argparse's ``SystemExit`` becomes the exit code.
An unexpected exception escapes to the test instead of printing a traceback."""

from __future__ import annotations

import logging
import sys

from wm_pipeline.cli.main import main


def wm_here(capsys, *args: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``wm ARGS`` run in this process (``capsys``: pytest's fixture)."""
    capsys.readouterr()
    handler = logging.StreamHandler(sys.stderr)  # capsys's stderr at this moment
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # what main()'s basicConfig sets in a real process
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    out, err = capsys.readouterr()
    return int(code or 0), out, err
