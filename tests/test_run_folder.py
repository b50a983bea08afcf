"""The run-folder layout and model folders (wm_pipeline.run_folder, shards.model_folder): config.json
names its class and format version, weights carry {"format": "pt"}, and folders saved before those
keys existed still resolve and load (their kind guessed from the field set, as before)."""

import dataclasses
import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_model

from decoders.decoder import ActionDecoder, DecoderConfig
from latent_actions.idm import IDMConfig, InverseDynamicsModel
from shards.model_folder import CLASS_KEY, VERSION_KEY, saved_class, saved_version
from wm_pipeline import run_folder
from wm_pipeline.exit_codes import UsageError
from wm_pipeline.jobs.worldmodel_offline_eval import load_world_model
from wm_pipeline.recipes.decoder import _decoder_dir
from wm_pipeline.recipes.worldmodel_policy import world_model_dir
from worldmodel.uwm import WorldModel, WorldModelConfig, embodiment_spec

STATS = {"sawyer": {"action": {"mean": [0.0] * 4, "std": [0.5] * 4, "min": [-1.0] * 4, "max": [1.0] * 4}}}


def _decoder() -> ActionDecoder:
    torch.manual_seed(0)
    return ActionDecoder(
        DecoderConfig.from_preset(
            "tiny",
            action_dim=4,
            state_dim=0,
            image_size=[16, 16],
            tasks=["reach-v3"],
            stats=STATS,
            encoder_channels=[8, 16],
            obs_dim=16,
        )
    )


def _world_model() -> WorldModel:
    torch.manual_seed(0)
    return WorldModel(
        WorldModelConfig(
            image_size=16,
            patch_size=4,
            n_obs=1,
            n_future=1,
            action_horizon=4,
            width=32,
            depth=1,
            heads=2,
            registers=1,
            encoder_channels=[8, 16],
            embodiments={"sawyer": embodiment_spec(action_dim=4)},
        )
    )


def _save_the_old_way(model, folder):
    """What save_pretrained wrote before config.json named its class: the config fields only, and
    weights without metadata."""
    folder.mkdir(parents=True)
    save_model(model, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(model.config), sort_keys=True, indent=2))


def _metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_save_pretrained_names_the_class_and_format_version(tmp_path):
    for model, name in (
        (_decoder(), "decoders.decoder.ActionDecoder"),
        (_world_model(), "worldmodel.uwm.WorldModel"),
        (
            InverseDynamicsModel(IDMConfig(action_dim=4, image_size=16, stats=STATS)),
            "latent_actions.idm.InverseDynamicsModel",
        ),
    ):
        folder = tmp_path / type(model).__name__
        model.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        version = type(model).FORMAT_VERSION  # 1, the world model's 2 (the network under net.)
        assert version == (2 if name.startswith("worldmodel") else 1)
        assert config[CLASS_KEY] == name and config[VERSION_KEY] == version
        assert saved_class(folder) == name and saved_version(folder) == version
        assert _metadata(folder / "model.safetensors") == {"format": "pt"}
        again = type(model).from_pretrained(str(folder))  # the header keys are not config fields
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
        folder2 = tmp_path / (folder.name + "-again")  # saved again: the same config.json
        again.save_pretrained(folder2)
        assert json.loads((folder2 / "config.json").read_text()) == config


def test_each_loader_finds_its_own_kind_by_class_and_by_field_set_in_old_folders(tmp_path):
    dec, wm = _decoder(), _world_model()
    dec.save_pretrained(tmp_path / "new-dec")
    wm.save_pretrained(tmp_path / "new-wm")
    _save_the_old_way(dec, tmp_path / "old-dec")
    _save_the_old_way(wm, tmp_path / "old-wm")
    assert saved_class(tmp_path / "old-dec") is None and saved_version(tmp_path / "old-wm") == 0
    for age in ("new", "old"):
        assert _decoder_dir(str(tmp_path / f"{age}-dec")) == tmp_path / f"{age}-dec"
        assert world_model_dir(str(tmp_path / f"{age}-dec")) is None
        assert world_model_dir(str(tmp_path / f"{age}-wm")) == tmp_path / f"{age}-wm"
        assert _decoder_dir(str(tmp_path / f"{age}-wm")) is None
    old = ActionDecoder.from_pretrained(str(tmp_path / "old-dec"))
    assert all(torch.equal(a, b) for a, b in zip(dec.state_dict().values(), old.state_dict().values()))
    model, run_config = load_world_model(tmp_path / "old-wm")
    assert run_config == {} and model.config.action_horizon == 4
    with pytest.raises(UsageError, match="config.json is not a world model's"):
        load_world_model(tmp_path / "new-dec")
    with pytest.raises(UsageError, match="config.json is not a world model's"):
        load_world_model(tmp_path / "old-dec")


def test_run_layout_resolves_run_final_and_unfinished_runs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / run_folder.CONFIG).write_text(yaml.safe_dump({"model_name": "decoder"}))
    with pytest.raises(UsageError, match=r"decoder run has no final/ model yet .*status.json"):
        _decoder_dir(str(run))
    with pytest.raises(UsageError, match="the run has no final/ model yet"):
        run_folder.weights_folder(run)
    assert world_model_dir(str(run)) is None  # another model's run: the next loader's turn
    final = run / run_folder.FINAL
    _decoder().save_pretrained(final)
    (final / run_folder.RUN_CONFIG).write_text(yaml.safe_dump({"model_name": "decoder", "data": {"stride": 2}}))
    assert _decoder_dir(str(run)) == final and _decoder_dir(str(final)) == final
    assert run_folder.weights_folder(run) == final
    assert run_folder.run_config_of(final)["data"] == {"stride": 2}
    assert world_model_dir(str(run)) is None
    assert run_folder.step_name(1000) == "step-0001000"
    with pytest.raises(UsageError, match="not a run folder"):
        run_folder.weights_folder(tmp_path)
