"""The on-disk format as readers see it: manifest / stats / meta validation with messages naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shards.format import FormatError, SampleMeta, read_manifest, shard_paths
from shards.stats import embodiment_stats, read_shard_stats
from shards.writer import Episode, finalize_dataset, run_sharded_job


def one_episode(i: int):
    n = 6
    frames = np.full((n, 16, 16, 3), 40 * i, np.uint8)
    yield Episode(
        key=f"k{i}",
        frames={"front": frames},
        fps=5.0,
        embodiment="arm",
        action=np.full((n, 2), i, np.float32),
        state=np.arange(n * 3, dtype=np.float32).reshape(n, 3),
    )


@pytest.fixture
def dataset(tmp_path):
    run_sharded_job(tmp_path, [0, 1, 2], one_episode, samples_per_shard=2, workers=1, created_by="test_format")
    return tmp_path


def test_written_manifest_reads_back(dataset):
    m = read_manifest(dataset)
    assert m["created_by"] == "test_format" and m["totals"]["samples"] == 3 and m["failures"] == 0
    assert [p.name for p in shard_paths(dataset)] == ["shard-000000.tar", "shard-000001.tar"]
    arm = m["embodiments"]["arm"]
    assert (arm["action_dim"], arm["state_dim"], arm["fps"], arm["cameras"]) == (2, 3, 5.0, ["front"])
    stats = embodiment_stats(dataset)["arm"]
    assert set(stats["action"]) == {"mean", "std", "min", "max", "q01", "q99"}
    np.testing.assert_allclose(stats["action"]["mean"], [1.0, 1.0])
    np.testing.assert_allclose(stats["action"]["max"], [2.0, 2.0])
    assert stats["state"]["q01"].dtype == np.float32 and stats["state"]["q01"].shape == (3,)


def _edit_manifest(root, edit):
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    return path


def test_newer_manifest_schema_fails_naming_the_file(dataset):
    path = _edit_manifest(dataset, lambda m: m.update(schema=99))
    with pytest.raises(FormatError, match=f"{path}.*99"):
        read_manifest(dataset)
    with pytest.raises(FormatError, match=str(path)):
        embodiment_stats(dataset)


@pytest.mark.parametrize("field", ["totals", "shards", "embodiments"])
def test_manifest_missing_field_fails_naming_the_file(dataset, field):
    path = _edit_manifest(dataset, lambda m: m.pop(field))
    with pytest.raises(FormatError, match=f"{path}.*{field}"):
        read_manifest(dataset)


def test_manifest_shard_entry_and_embodiment_fields_checked(dataset):
    path = _edit_manifest(dataset, lambda m: m["shards"][0].pop("sha256"))
    with pytest.raises(FormatError, match=f"{path}.*sha256"):
        read_manifest(dataset)
    finalize_dataset(dataset)  # rebuilds the manifest from the stats files, keeping created_by
    assert read_manifest(dataset)["created_by"] == "test_format"
    path = _edit_manifest(dataset, lambda m: m["embodiments"]["arm"].pop("action_dim"))
    with pytest.raises(FormatError, match=f"{path}.*action_dim"):
        read_manifest(dataset)


def test_missing_manifest_and_broken_stats_name_the_file(dataset):
    (dataset / "manifest.json").unlink()
    with pytest.raises(FormatError, match="no manifest"):
        read_manifest(dataset)
    stats = dataset / "shard-000001.stats.json"
    doc = json.loads(stats.read_text())
    stats.write_text(json.dumps({**doc, "stats_schema": 7}))
    with pytest.raises(FormatError, match=f"{stats}.*newer"):
        read_shard_stats(stats)
    stats.write_text(json.dumps({k: v for k, v in doc.items() if k != "sha256"}))
    with pytest.raises(FormatError, match=f"{stats}.*sha256"):
        finalize_dataset(dataset, n_shards=2)
    stats.unlink()
    with pytest.raises(FormatError, match=f"{stats}.*incomplete"):
        finalize_dataset(dataset, n_shards=2)


def test_sample_meta_newer_schema_or_missing_field():
    meta = SampleMeta(key="a", fps=10.0, n_frames=3, height=8, width=8, cameras=["c"], embodiment="e")
    assert SampleMeta.from_json(meta.to_json()) == meta
    raw = json.loads(meta.to_json())
    with pytest.raises(FormatError, match="x.tar:a.meta.json.*newer"):
        SampleMeta.from_json(json.dumps({**raw, "schema": 2}), "x.tar:a.meta.json")
    with pytest.raises(FormatError, match="x.tar:a.meta.json.*n_frames"):
        SampleMeta.from_json(json.dumps({k: v for k, v in raw.items() if k != "n_frames"}), "x.tar:a.meta.json")
