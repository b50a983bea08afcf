"""shards.dataset_info: one typed view of a run's data folders, read once from their manifests; the
recipes fill their configs from it without changing the config they are given."""

import numpy as np
import pytest

import toy_models
from shards.dataset_info import DatasetInfo, FolderInfo
from shards.format import read_manifest
from shards.stats import embodiment_stats


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    return (
        toy_models.make_dataset(root / "a", episodes=2, frames=6, size=16, per_shard=2),
        toy_models.make_dataset(root / "b", episodes=2, frames=6, size=16, per_shard=2, seed=1),
    )


def test_embodiments_dims_stats_and_totals_from_the_manifests(folders):
    a, b = folders
    info = DatasetInfo.read([str(a), str(b)])
    assert info.paths == [str(a), str(b)] and len(info) == 2 and info[0] == read_manifest(a)
    robots = info.robots()
    assert list(robots) == ["toybot"]
    bot = robots["toybot"]
    assert (bot.action_dim, bot.state_dim, bot.fps, bot.path) == (3, 2, 10.0, str(a))  # the first folder's
    assert [e.path for e in info.embodiments_with_actions()] == [str(a), str(b)]
    expected = embodiment_stats(a)["toybot"]  # float32, as the stats helper gives them
    for field in ("action", "state"):
        for key, value in expected[field].items():
            assert bot.stats_f32()[field][key] == np.asarray(value).tolist()
    assert list(bot.stats_f32(["action"])) == ["action"]
    assert info.resolutions() == {(16, 16)} and info.tasks() == ["square"] and info.fps() == [10.0]
    assert info.samples == 4 and info.folders[0].cameras == ["corner"]
    assert FolderInfo.read(a) == info.folders[0] and info.folders[0].fps() == [10.0]  # one folder alone


def test_prepare_returns_a_new_config_and_leaves_the_given_one(folders):
    from wm_pipeline.training.config import resolve, to_dict
    from wm_pipeline.training.registry import get_model, load_plugins
    from wm_pipeline.training.trainer import fill_from_data

    load_plugins()
    a, _ = folders
    info = DatasetInfo.read([str(a)])
    for name in ("lam", "idm", "worldmodel"):
        spec = get_model(name)
        cfg = resolve(
            name, spec.config_cls, spec.presets, preset="tiny", data_paths=[str(a)], run_presets=spec.run_presets
        )
        before = to_dict(cfg)
        filled = fill_from_data(cfg, spec, info)
        assert to_dict(cfg) == before, name  # the validated config given is not changed
        assert filled.data.camera == "corner" and filled.model.image_size == 16, name
    spec = get_model("toy")  # a plugin's prepare filling cfg in place, handed the manifests before
    cfg = resolve("toy", spec.config_cls, spec.presets, preset="tiny", data_paths=[str(a)])
    filled = fill_from_data(cfg, spec, info)
    assert cfg.model.action_dim == 0 and filled.model.action_dim == 3 and filled.model.image_size == [16, 16]
