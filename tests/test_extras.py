"""`pip install wm-pipeline` without extras: every module imports, and a feature that needs an extra says
which one (pyproject.toml [project.optional-dependencies]).

The extras' packages are blocked in a fresh interpreter as on a machine where they are not installed
(decord has no aarch64 / macOS arm64 wheel): ``sys.modules[name] = None`` makes ``import name`` (and of
its submodules) raise ModuleNotFoundError and ``importlib.util.find_spec(name)`` return None, which is
what availability checks such as accelerate's see when a package is absent (a ``sys.meta_path`` finder
that raises would instead break those checks, which a real absence does not)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ["decord", "diffusers", "transformers", "flash_attn", "torchcodec", "wandb"]

SCRIPT = r"""
import importlib, json, pkgutil, sys, tempfile
from pathlib import Path

BLOCKED = set(json.loads(sys.argv[1]))
for name in BLOCKED:   # as if not installed: `import name` raises ModuleNotFoundError, find_spec(name) is None
    sys.modules[name] = None
root = Path(sys.argv[2])
report = {"modules": 0, "failed": {}, "leaked": [], "errors": {}}
for package in ("nets", "shards", "latent_actions", "worldmodel", "decoders", "wm_pipeline"):
    names = [package] + [m.name for m in pkgutil.walk_packages([str(root / package)], prefix=package + ".")]
    for name in names:
        try:
            importlib.import_module(name)
            report["modules"] += 1
        except BaseException as e:
            report["failed"][name] = f"{type(e).__name__}: {e}"
report["leaked"] = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in BLOCKED)

import numpy as np
from shards.decode import decode_video, resolve_backend
from shards.encode import encode_video
from worldmodel.tokenizer import load_vae

report["auto_backend"] = resolve_backend("auto")
frames = np.zeros((4, 16, 16, 3), np.uint8)
report["decoded"] = len(decode_video(encode_video(frames, fps=10.0), backend="auto"))
for what, call in (("decord", lambda: resolve_backend("decord")),
                   ("vae", lambda: load_vae(tempfile.mkdtemp()))):
    try:
        call()
    except Exception as e:
        report["errors"][what] = f"{type(e).__name__}: {e}"
print(json.dumps(report))
"""


def test_every_module_imports_without_the_extras_and_features_name_their_extra(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(EXTRAS), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}
    assert report["modules"] > 50 and report["leaked"] == []
    assert report["auto_backend"] == "pyav" and report["decoded"] == 4  # PyAV, a base dependency, covers decode
    assert "pip install 'wm-pipeline[decord]'" in report["errors"]["decord"]
    assert report["errors"]["vae"].startswith("ImportError") and "wm-pipeline[vae]" in report["errors"]["vae"]


def test_pyproject_keeps_the_extras_out_of_the_base_dependencies():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert not base & {"decord", "diffusers", "transformers", "flash-attn", "torchcodec", "wandb"}
    extras = project["optional-dependencies"]
    assert extras["decord"] == ["decord>=0.6"] and extras["vae"][0].startswith("diffusers")
    assert extras["text"][0].startswith("transformers") and extras["gpu"] == ["flash-attn"]
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "extras=test,decord,vae,text" in setup  # make test / make demo get every feature


def test_wm_version_is_the_package_version():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    proc = subprocess.run(
        [sys.executable, "-m", "wm_pipeline", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"wm {version}", proc.stdout + proc.stderr
