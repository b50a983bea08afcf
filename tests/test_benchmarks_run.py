"""Every benchmark script still imports and parses its arguments (`--help`): they are not run by the
suite, so a module moved under them (nets/, wm_pipeline/) would otherwise break them silently."""

import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "json_report.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_imports_and_parses_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delitem(sys.modules, "json_report", raising=False)  # each script must find it itself
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(script), run_name="__main__")
    assert stop.value.code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()
