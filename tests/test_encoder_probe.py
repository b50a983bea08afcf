"""`wm probe --encoder`: the linear probe tells what a decoder's image encoder can place (an object
drawn in the frames) from what it cannot (a state the frames do not show)."""

import json

import numpy as np
import pytest
import torch

from decoders.decoder import ActionDecoder, DecoderConfig
from shards.writer import Episode, run_sharded_job
from wm_pipeline.cli.main import main
from wm_pipeline.exit_codes import UsageError
from wm_pipeline.jobs.encoder_probe import encoder_probe, parse_targets

N = 16  # frames per episode


def _episode(spec):
    """A white square whose (x, y) is state dims 4:6 wanders over the frame; state dims 0:3 (the
    'hand') are noise the frames never show."""
    task, i = spec
    rng = np.random.default_rng(i)
    pos = np.clip(np.cumsum(rng.integers(-4, 5, size=(N, 2)), 0) + rng.integers(12, 44, size=2), 4, 52)
    frames = np.zeros((N, 64, 64, 3), np.uint8)
    for t, (x, y) in enumerate(pos):
        frames[t, y : y + 8, x : x + 8] = 255
    state = np.zeros((N, 7), np.float32)
    state[:, 0:3] = rng.normal(size=(N, 3))
    state[:, 4:6] = pos
    return [
        Episode(
            key=f"{task}_{i:03d}",
            frames={"corner": frames},
            fps=10.0,
            embodiment="sawyer",
            task=task,
            action=np.zeros((N, 4), np.float32),
            state=state,
            success=True,
        )
    ]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    data = root / "data"
    assert run_sharded_job(
        data,
        [(t, i) for t in ("a", "b") for i in range(10)],
        _episode,
        samples_per_shard=8,
        workers=1,
        created_by="tests",
    ).ok
    assert run_sharded_job(
        root / "held",
        [(t, i) for t in ("a", "b") for i in range(10, 16)],
        _episode,
        samples_per_shard=8,
        workers=1,
        created_by="tests",
    ).ok
    stats = {
        "sawyer": {
            "action": {"mean": [0.0] * 4, "std": [1.0] * 4, "min": [-1.0] * 4, "max": [1.0] * 4},
            "state": {"mean": [0.0] * 7, "std": [1.0] * 7, "min": [-1.0] * 7, "max": [1.0] * 7},
        }
    }
    torch.manual_seed(1)
    cfg = DecoderConfig.from_preset(
        "tiny", action_dim=4, state_dim=7, image_size=[64, 64], tasks=["a", "b"], stats=stats
    )
    ActionDecoder(cfg).save_pretrained(root / "dec")
    return root


def test_the_probe_places_what_the_frames_show_and_not_what_they_hide(scene):
    result = encoder_probe(
        str(scene / "dec"), scene / "data", scene / "out", targets={"hand": (0, 3), "object": (4, 6)}, every=1
    )
    assert result["episodes"] == 20 and result["frames"] == 20 * N and result["tasks"] == ["a", "b"]
    obj, hand = result["targets"]["object"], result["targets"]["hand"]
    # random conv features of the frame already place a drawn square; nothing places noise
    assert obj["trained"]["r2"] > 0.5 and obj["untrained"]["r2"] > 0.5
    assert hand["trained"]["r2"] < 0.1 and hand["untrained"]["r2"] < 0.1
    saved = json.loads((scene / "out" / "encoder_probe.json").read_text())
    assert saved["targets"]["object"]["trained"]["r2"] == obj["trained"]["r2"]


def test_fitted_on_one_set_and_scored_on_another(scene):
    result = encoder_probe(
        str(scene / "dec"),
        scene / "held",
        scene / "out-held",
        targets={"hand": (0, 3), "object": (4, 6)},
        every=1,
        fit_dir=scene / "data",
    )
    assert result["episodes"] == 12 and result["fit_data"] == str(scene / "data")
    assert result["targets"]["object"]["untrained"]["r2"] > 0.5
    assert result["targets"]["hand"]["untrained"]["r2"] < 0.1


def test_cli_and_bad_targets(scene, capsys):
    assert (
        main(
            [
                "probe",
                "--encoder",
                str(scene / "dec"),
                "--data",
                str(scene / "data"),
                "--out",
                str(scene / "cli"),
                "--targets",
                "object=4:6",
                "--max-episodes",
                "8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "object" in out and "untrained" in out and (scene / "cli" / "encoder_probe.json").is_file()
    with pytest.raises(UsageError, match="NAME=START:STOP"):
        parse_targets("object=4")
    with pytest.raises(UsageError, match="7 state dims"):
        encoder_probe(str(scene / "dec"), scene / "data", scene / "bad", targets={"far": (5, 9)})
