"""`wm inspect`: counts, stats and failures of a real small dataset, and the contact-sheet PNG."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from shards.writer import BadInput, Episode, run_sharded_job


def make_episodes(i: int):
    """Input i -> one episode; frame t of episode i is gray level 20 i + 10 t (readable in the sheet)."""
    if i == 5:
        raise BadInput("unreadable demo")
    t = 6 + i
    frames = np.broadcast_to((20 * i + 10 * np.arange(t)).astype(np.uint8)[:, None, None, None], (t, 16, 24, 3))
    if i % 2:  # action-free clip
        return [Episode(key=f"clip{i}", frames={"cam": frames.copy()}, fps=10, embodiment="video")]
    rng = np.random.default_rng(i)
    return [
        Episode(
            key=f"ep{i}",
            frames={"cam": frames.copy()},
            fps=10,
            embodiment="sawyer",
            task=f"task{i % 4}",
            action=rng.normal(size=(t, 4)).astype(np.float32),
            state=rng.normal(size=(t, 3)).astype(np.float32),
        )
    ]


def wm(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "wm_pipeline", *args], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_inspect_reports_counts_stats_failures_and_draws_a_sheet(tmp_path):
    data = tmp_path / "data"
    result = run_sharded_job(data, list(range(7)), make_episodes, samples_per_shard=3, workers=1, created_by="test")
    assert len(result.failures) == 1

    proc = wm("inspect", str(data), "--json", "--samples", "3", "--frames", "5")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["shards"], report["samples"], report["frames"]) == (3, 6, sum(6 + i for i in range(7) if i != 5))
    assert report["embodiments"]["sawyer"]["samples"] == 4 and report["embodiments"]["video"]["samples"] == 2
    assert report["embodiments"]["sawyer"]["action_dim"] == 4 and report["embodiments"]["video"]["action_dim"] == 0
    assert report["tasks"] == {"task0": 2, "task2": 2}
    stats = report["embodiments"]["sawyer"]["stats"]["action"]
    assert len(stats["mean"]) == 4 and all(lo <= hi for lo, hi in zip(stats["min"], stats["max"]))
    assert report["failures"]["count"] == 1 and report["failures"]["first"][0]["reason"] == "unreadable demo"

    sheet = report["contact_sheet"]
    assert sheet["path"] == str(data / "contact_sheet.png")
    image = np.asarray(Image.open(data / "contact_sheet.png").convert("RGB"))
    assert image.shape == (3 * 16, 5 * 24, 3) == (sheet["height"], sheet["width"], 3)
    # samples spread over the dataset (first, middle, last); each tile shows the frame it names
    keys = [row["key"] for row in sheet["rows"]]
    assert keys[0] == "ep0" and keys[-1] == "ep6"
    for r, row in enumerate(sheet["rows"]):
        i = int(row["key"].removeprefix("ep").removeprefix("clip"))
        for c, t in enumerate(row["frames"]):
            tile = image[r * 16 : (r + 1) * 16, c * 24 : (c + 1) * 24]
            assert abs(tile.mean() - (20 * i + 10 * t)) < 4, (row["key"], t, tile.mean())

    other = tmp_path / "sheet.png"
    proc = wm("inspect", str(data), "--sheet", str(other))
    assert proc.returncode == 0, proc.stderr
    for text in (
        "samples 6",
        "sawyer",
        "video",
        "stats sawyer.action (4 dims)",
        "failures   1",
        "unreadable demo",
        str(other),
    ):
        assert text in proc.stdout, text
    assert Image.open(other).size == (8 * 24, 4 * 16)  # defaults: 4 samples x 8 frames


def test_inspect_flags_a_missing_shard_and_a_missing_dataset(tmp_path):
    data = tmp_path / "data"
    run_sharded_job(data, [0, 2, 4], make_episodes, samples_per_shard=1, workers=1, created_by="test")
    (data / "shard-000001.tar").unlink()
    proc = wm("inspect", str(data), "--no-sheet")
    assert proc.returncode == 3 and "shard-000001.tar: missing" in proc.stdout
    assert not (data / "contact_sheet.png").exists()
    proc = wm("inspect", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "no manifest" in proc.stderr
