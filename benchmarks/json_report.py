"""The one output convention of the benchmarks: the report as JSON on stdout, and in ``--out`` when given."""

from __future__ import annotations

import json
from pathlib import Path


def emit(report: dict, out: str | None, indent: int = 2) -> None:
    text = json.dumps(report, indent=indent)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
