"""`wm train MODEL --help-config`: every config key with its type and default; closes quietly into `| head`."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from wm_pipeline.cli.commands.train import config_help
from wm_pipeline.cli.main import main
from wm_pipeline.training.config import resolve
from wm_pipeline.training.registry import get_model, load_plugins, registered


def leaf_keys(obj, prefix: str = "") -> dict[str, object]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out.update(leaf_keys(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else {prefix + f.name: v})
    return out


def test_every_key_of_every_model_is_listed_with_type_and_its_preset_default():
    load_plugins()
    for model in registered():
        spec = get_model(model)
        cfg = resolve(model, spec.config_cls, spec.presets, preset="tiny", run_presets=spec.run_presets)
        lines = config_help(model, "tiny").splitlines()
        assert "preset 'tiny'" in lines[0] and lines[1].split() == ["key", "type", "default"]
        listed = {line.split()[0]: line for line in lines[2:]}
        keys = {k: v for k, v in leaf_keys(cfg).items() if k != "model_name"}
        assert set(listed) == set(keys), (model, set(keys) ^ set(listed))
        assert any(k.startswith("model.") for k in listed)
    lines = {line.split()[0]: line.split() for line in config_help("worldmodel", "tiny").splitlines()[2:]}
    tiny = resolve(
        "worldmodel",
        get_model("worldmodel").config_cls,
        get_model("worldmodel").presets,
        preset="tiny",
        run_presets=get_model("worldmodel").run_presets,
    )
    assert lines["optim.lr"] == ["optim.lr", "float", repr(tiny.optim.lr)]
    assert lines["train.max_steps"] == ["train.max_steps", "int", str(tiny.train.max_steps)]
    assert lines["init"][1:] == ["str", "|", "None", "null"]


def test_help_config_needs_no_out_and_ends_quietly_into_head(capsys):
    # the one real process here: a closed pipe (`| head`) is only seen by a process writing into one
    proc = subprocess.run(
        f"{sys.executable} -m wm_pipeline train decoder --help-config | head -3",
        shell=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.stderr == "" and len(proc.stdout.splitlines()) == 3 and "preset 'small'" in proc.stdout
    with pytest.raises(SystemExit) as e:  # the same main() as `python -m wm_pipeline` (its __main__ raises SystemExit)
        main(["train", "nosuch", "--help-config"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown model 'nosuch'" in err and "Traceback" not in err


@pytest.mark.parametrize("preset", ["base"])
def test_help_config_follows_preset(preset):
    assert f"preset {preset!r}" in config_help("lam", preset).splitlines()[0]
