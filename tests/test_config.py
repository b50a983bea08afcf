"""Run configs: layering, typed checks, one-line errors from `wm train` (exit 2, no traceback)."""

import subprocess
import sys

import pytest
import yaml

import toy_models
from wm_pipeline import exit_codes
from wm_pipeline.cli import main as cli
from wm_pipeline.training.config import ConfigError, RunConfig, dump_yaml, load_yaml, resolve, to_dict
from wm_pipeline.training.registry import get_model


def toy(**kw):
    return resolve("toy", toy_models.ToyConfig, toy_models.PRESETS, **kw)


def test_layers_defaults_preset_file_overrides(tmp_path):
    base = toy()
    assert base.preset == "small" and base.data.batch_size == 8 and base.model.channels == 16
    tiny = toy(preset="tiny")
    assert tiny.data.window == 2 and tiny.train.max_steps == 50 and tiny.model.channels == 8
    assert tiny.optim.weight_decay == 0.0 and tiny.optim.betas == [0.9, 0.999]  # untouched default

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        "preset: tiny\noptim:\n  lr: 3e-4\ndata:\n  window: 4\n  resize: [16, 16]\nmodel:\n  hidden: 32\n"
    )
    cfg = toy(
        config_file=cfg_file,
        overrides=[
            "data.window=8",
            "train.log_with=tensorboard,wandb",
            "data.camera=corner",
            "model.channels=4",
            "optim.grad_clip=0",
        ],
        data_paths=["/some/data"],
    )
    assert cfg.preset == "tiny" and cfg.train.max_steps == 50  # preset named in the file
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.data.window == 8 and cfg.data.resize == [16, 16]  # command line beats the file
    assert cfg.train.log_with == ["tensorboard", "wandb"] and cfg.data.camera == "corner"
    assert cfg.model.hidden == 32 and cfg.model.channels == 4 and cfg.optim.grad_clip == 0.0
    assert cfg.data.paths == ["/some/data"]
    assert toy(config_file=cfg_file, preset="base").train.max_steps == 100_000  # --preset beats the file

    # the resolved config round-trips through RUN/config.yaml
    dump_yaml(cfg, tmp_path / "config.yaml")
    again = toy(config_file=tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr' (command line) (did you mean 'optim.lr'?)"),
        (["trian.max_steps=1"], "unknown config key 'trian' (command line) (did you mean 'train'?)"),
        (["model.chanels=3"], "unknown config key 'model.chanels' (command line) (did you mean 'model.channels'?)"),
        (["data.window=eight"], "config key 'data.window' (command line): expected int, got str 'eight'"),
        (["optim.lr=fast"], "config key 'optim.lr' (command line): expected float, got str 'fast'"),
        (["train.progress=maybe"], "config key 'train.progress' (command line): expected bool, got str 'maybe'"),
        (["data.resize=[a,b]"], "config key 'data.resize[0]' (command line): expected int, got str 'a'"),
        (["train.precision=fp16"], "'train.precision': 'fp16' is not one of ['auto', 'fp32', 'bf16']"),
        (["optim.lr"], "override 'optim.lr': expected key=value"),
        (["data.batch_size=0"], "'data.batch_size': must be > 0, got 0"),
    ],
)
def test_bad_keys_and_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        toy(overrides=overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_file_and_preset(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("optim:\n  betas: 0.9\n")
    with pytest.raises(ConfigError, match=r"config key 'optim.betas' \(from .*cfg.yaml\): expected list"):
        toy(config_file=f)
    f.write_text("model_name: decoder\n")
    with pytest.raises(ConfigError, match="model_name is 'decoder' but the command trains 'toy'"):
        toy(config_file=f)
    with pytest.raises(ConfigError, match="unknown preset 'tiyn' \\(did you mean 'tiny'\\?\\)"):
        toy(preset="tiyn")
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")
    assert isinstance(RunConfig().data.paths, list)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return toy_models.make_dataset(tmp_path_factory.mktemp("toy") / "data", episodes=2, per_shard=2)


@pytest.mark.parametrize(
    "args, message",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr' (command line) (did you mean 'optim.lr'?)"),
        (["data.window=x"], "config key 'data.window' (command line): expected int, got str 'x'"),
        (["--data", "/no/such/folder"], "data folder /no/such/folder does not exist"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["model.action_dim=7"], "model.action_dim=7 but embodiment 'toybot' in the data has 3"),
    ],
)
def test_cli_errors_are_one_line_exit_2(data, tmp_path, capsys, args, message):
    argv = ["train", "toy", "--out", str(tmp_path / "run"), *args]
    if "--data" not in args:
        argv += ["--data", str(data)]
    assert cli.main(argv) == exit_codes.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wm train: error: {err[0].split('error: ', 1)[1]}"] and message in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_unknown_model_and_overrides_between_options(data, tmp_path, capsys):
    assert cli.main(["train", "toyy", "--data", str(data), "--out", str(tmp_path)]) == exit_codes.USAGE
    assert "unknown model 'toyy' (did you mean 'toy'?)" in capsys.readouterr().err
    args = cli.build_parser().parse_args(
        ["train", "toy", "optim.lr=1", "--data", "d", "data.window=3", "--out", "r", "train.seed=5"]
    )
    assert args.overrides == ["optim.lr=1", "data.window=3", "train.seed=5"] and args.data == ["d"]
    assert get_model("toy").config_cls is toy_models.ToyConfig


def test_missing_data_folder_subprocess_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wm_pipeline",
            "train",
            "toy",
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "run"),
            "optim.lr=3e-4",
        ],
        env=toy_models.plugin_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"wm train: error: data folder {tmp_path / 'nope'} does not exist"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_resolved_config_written_at_start(data, tmp_path):
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "toy",
                "--data",
                str(data),
                "--out",
                str(run),
                "--preset",
                "tiny",
                "train.max_steps=2",
                "train.progress=false",
                "optim.lr=2e-3",
            ]
        )
        == 0
    )
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["model_name"] == "toy" and written["preset"] == "tiny"
    assert written["optim"]["lr"] == 2e-3 and written["data"]["paths"] == [str(data)]
    assert written["model"]["action_dim"] == 3  # filled from the data by the model's prepare hook


def test_policy_is_the_old_name_of_recipe(tmp_path):
    """``RunConfig.recipe`` was ``policy``: a config file saved before the rename, and ``policy=`` on the
    command line, still set it; what is written back uses the new name."""
    old = tmp_path / "old_run_config.yaml"
    written = to_dict(toy(preset="tiny"))
    written["policy"] = written.pop("recipe")
    written["policy"] = "latent"
    old.write_text(yaml.safe_dump(written, sort_keys=False))
    cfg = toy(config_file=old)
    assert cfg.recipe == "latent" and cfg.policy == "latent"
    assert toy(config_file=old, overrides=["policy=idm-bc"]).recipe == "idm-bc"
    assert toy(overrides=["recipe=scratch"]).recipe == "scratch"
    dump_yaml(cfg, tmp_path / "new.yaml")
    again = yaml.safe_load((tmp_path / "new.yaml").read_text())
    assert again["recipe"] == "latent" and "policy" not in again
    with pytest.raises(ConfigError, match="unknown config key 'recipes'"):
        toy(overrides=["recipes=x"])
