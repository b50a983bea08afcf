"""The dataset card: every folder the writer finalizes gets a README.md whose front matter makes Hugging Face
`datasets.load_dataset(folder)` read the shard tars (the WebDataset builder), not the JSON sidecars."""

from __future__ import annotations

import numpy as np
import yaml

from shards.dataset_card import CARD_MARK
from shards.writer import Episode, finalize_dataset, run_sharded_job


def _frames(n: int, phase: float) -> np.ndarray:
    t, y, x = np.ogrid[:n, :32, :32]
    return np.repeat((128 + 80 * np.sin(x / 5 + t / 3 + phase) * np.cos(y / 6))[..., None], 3, -1).astype(np.uint8)


def make_episodes(i: int):
    rng = np.random.default_rng(i)
    yield Episode(
        key=f"ep{i:03d}",
        frames={"corner": _frames(6 + i, i)},
        fps=10.0,
        embodiment="sawyer",
        task="reach-v3",
        instruction="reach the goal",
        action=rng.normal(size=(6 + i, 4)).astype(np.float32),
        state=rng.normal(size=(6 + i, 5)).astype(np.float32),
        episode_index=i,
    )


def test_card_front_matter_and_load_dataset_reads_the_shards(tmp_path):
    import datasets  # the test extra (pyproject.toml)

    out = tmp_path / "data"
    run_sharded_job(out, list(range(3)), make_episodes, samples_per_shard=2, workers=1, created_by="test")
    text = (out / "README.md").read_text()
    assert text.startswith("---\n") and CARD_MARK in text
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "shard-*.tar"}]}]
    assert "3 samples" in text and "| sawyer | 3 |" in text

    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 3
    assert sorted(ds.column_names) == ["__key__", "__url__", "action.npy", "corner.mp4", "meta.json", "state.npy"]
    rows = {r["__key__"]: r for r in ds.cast_column("corner.mp4", datasets.Video(decode=False))}
    for i in range(3):
        (ep,) = make_episodes(i)
        row = rows[ep.key]
        assert np.array_equal(np.asarray(row["action.npy"], np.float32), ep.action)  # bit-exact through HF
        assert row["meta.json"]["n_frames"] == 6 + i and row["meta.json"]["task"] == "reach-v3"
        assert row["corner.mp4"]["bytes"][4:8] == b"ftyp"  # the MP4 member itself


def test_a_users_readme_is_never_replaced_and_ours_is_refreshed(tmp_path):
    out = tmp_path / "data"
    run_sharded_job(out, [0], make_episodes, samples_per_shard=2, workers=1)
    assert "1 samples" in (out / "README.md").read_text()
    run_sharded_job(out, [0, 1], make_episodes, samples_per_shard=2, workers=1)  # our card: rewritten
    assert "2 samples" in (out / "README.md").read_text()
    (out / "README.md").write_text("# my notes\n")
    finalize_dataset(out)
    assert (out / "README.md").read_text() == "# my notes\n"
