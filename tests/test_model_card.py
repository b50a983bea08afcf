"""Model cards (wm_pipeline.model_card): `wm train` writes RUN/final/README.md from the run's own files,
huggingface_hub reads it back, its load snippet runs, and `wm eval --policy RUN` records the closed-loop
success in it (front matter model-index + the evaluation section), leaving the rest of the card alone."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from decoders.decoder import ActionDecoder
from shards.writer import Episode, run_sharded_job
from wm_pipeline import model_card as mc
from wm_pipeline.cli.main import main

STEPS = 3


def _demo(i: int) -> list[Episode]:
    """Meta-World-shaped demos (sawyer: 4-dim actions, 39-dim states) at 16 px, so that `wm eval` can drive
    the decoder trained on them."""
    n, rng = 12, np.random.default_rng(i)
    return [
        Episode(
            key=f"reach_{i:03d}",
            frames={"corner": rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)},
            fps=10.0,
            embodiment="sawyer",
            task="reach-v3",
            action=rng.uniform(-1, 1, (n, 4)).astype(np.float32),
            state=rng.normal(size=(n, 39)).astype(np.float32),
            success=True,
        )
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny decoder trained for 3 steps by `wm train` (every step logged, one eval at the end)."""
    root = tmp_path_factory.mktemp("card")
    assert run_sharded_job(root / "demos", [0, 1, 2], _demo, samples_per_shard=3, workers=1, created_by="tests").ok
    out = root / "run"
    assert (
        main(
            [
                "train",
                "decoder",
                "--data",
                str(root / "demos"),
                "--out",
                str(out),
                "--preset",
                "tiny",
                f"train.max_steps={STEPS}",
                f"train.ckpt_every={STEPS}",
                "train.log_every=1",
                f"train.eval_every={STEPS}",
                "train.eval_batches=1",
                "data.batch_size=2",
                "model.horizon=4",
                "model.n_obs_steps=1",
                "train.progress=false",
            ]
        )
        == 0
    )
    return out


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _python_block(text: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "no python snippet in the card"
    return blocks[0]


def test_training_writes_a_card_that_says_what_the_model_is(run, capsys):
    path = run / "final" / "README.md"
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["library_name"] == "wm-pipeline" and data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "robotics"
    assert {"robotics", "wm-pipeline", "decoder", "decoder-scratch"} <= set(data["tags"])
    assert "model_hub_mixin" not in data["tags"]  # not the hub mixin's generic card
    text = card.text
    assert mc.CARD_MARK in text and "unknown" not in text  # every fact of this run was found
    # the model: class, recipe, parameters
    model = ActionDecoder.from_pretrained(run / "final")
    assert "`decoders.decoder.ActionDecoder`" in text and "| recipe | `scratch` |" in text
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in text
    # the data: folder, episodes, frames, embodiment, task
    demos = str(run.parent / "demos")
    assert f"| `{demos}` | 3 | 36 | 16x16 | corner |" in text
    assert f"| sawyer | `{demos}` | 3 | 36 | 10 | 4 | 39 |" in text and "`reach-v3` (3)" in text
    # the training config: steps, batch, lr, seed; the model config
    cfg = yaml.safe_load((run / "final" / "run_config.yaml").read_text())
    assert f"| steps | {STEPS} (train.max_steps {STEPS}) |" in text
    assert "| batch | 2 windows per rank x 1 accumulated x 1 rank(s) = 2 windows per step |" in text
    assert f"| learning rate | {cfg['optim']['lr']:.6g}," in text and "| seed | 0 |" in text
    assert "| horizon | 4 |" in text and "| image_size | [16, 16] |" in text
    # the metrics: losses from metrics.jsonl, the last eval row
    train = [r for r in _rows(run) if "loss" in r]
    last_eval = [r for r in _rows(run) if "eval/loss" in r][-1]
    assert f"| train loss (first logged) | 1 | {train[0]['loss']:.6g} |" in text
    assert f"| train loss (last logged) | {STEPS} | {train[-1]['loss']:.6g} |" in text
    assert f"| eval/loss | {STEPS} | {last_eval['eval/loss']:.6g} |" in text
    assert "steps_per_s" not in text and "samples_per_s" not in text  # wall-clock, not the model's
    # not evaluated yet: the command that would
    assert "Not evaluated yet" in text and f"wm eval --policy {run} --tasks reach-v3" in text
    # how to load it: the snippet runs against the folder
    namespace: dict = {}
    exec(_python_block(text), namespace)
    assert isinstance(namespace["model"], ActionDecoder)
    assert capsys.readouterr().out.splitlines()[-1] == f"{sum(p.numel() for p in model.parameters()):,} parameters"
    for a, b in zip(namespace["model"].state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_the_card_is_a_function_of_the_run_files(run):
    model = ActionDecoder.from_pretrained(run / "final")
    again = mc.model_card(run / "final", model=model, step=STEPS, world_size=1)
    assert str(again) == (run / "final" / "README.md").read_text()


def test_missing_facts_are_unknown_not_errors(run, tmp_path):
    """A model folder outside its run, whose data folder is gone: the card says what it does not know."""
    folder = tmp_path / "moved"
    shutil.copytree(run / "final", folder)
    cfg = yaml.safe_load((folder / "run_config.yaml").read_text())
    cfg["data"]["paths"] = [str(tmp_path / "gone")]
    (folder / "run_config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "config.json").write_text("{not json")
    assert mc.write_model_card(folder) == folder / "README.md"
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "wm-pipeline"
    text = card.text
    assert f"| `{tmp_path / 'gone'}` | unknown (" in text and "no manifest" in text
    assert "## Metrics\n\nunknown: no run folder beside the weights." in text
    assert "| class | unknown (config.json unreadable" in text
    assert "(tensor elements in model.safetensors)" in text  # counted from the file


def test_wm_eval_records_the_success_rate_in_the_card(run, tmp_path):
    path = run / "final" / "README.md"
    before = ModelCard.load(path).text
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--policy",
                str(run),
                "--tasks",
                "reach-v3",
                "--episodes",
                "1",
                "--max-steps",
                "3",
                "--resolution",
                "16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    pc = results["tasks"]["reach-v3"]["aggregated"]["pc_success"]
    card = ModelCard.load(path)
    got = {r.metric_type: r for r in card.data.eval_results}
    assert got["pc_success"].metric_value == pc and got["pc_success"].dataset_config == "reach-v3"
    assert got["pc_success"].dataset_args == {
        "episodes": 1,
        "seed": 0,
        "max_steps": 3,
        "resolution": 16,
        "camera": "corner",
    }
    assert got["mean_episode_length"].metric_value == results["tasks"]["reach-v3"]["mean_length"]
    assert got["pc_success"].source_url == (out / "results.json").resolve().as_uri()
    text = card.text
    assert f"| metaworld | `reach-v3` | {pc:.1f} % ({round(pc / 100)}/1) | 1 | 0 | 3 | 16 |" in text
    assert "Not evaluated yet" not in text
    # everything outside the evaluation section is as training wrote it
    cut = lambda t: (t[: t.index(mc.EVAL_BEGIN)], t[t.index(mc.EVAL_END) :])  # noqa: E731
    assert cut(text) == cut(before)

    # a second evaluation (written here) of reach-v3 and push-v3: reach-v3's row is replaced, push-v3 added
    second = {
        "env": "metaworld",
        "seed": 7,
        "episodes_per_task": 4,
        "max_steps": 50,
        "resolution": 16,
        "camera": "corner",
        "tasks": {
            "reach-v3": {"mean_length": 20.0, "aggregated": {"pc_success": 75.0, "avg_max_reward": 2.0}},
            "push-v3": {"mean_length": 50.0, "aggregated": {"pc_success": 25.0, "avg_max_reward": 1.0}},
        },
    }
    (tmp_path / "second.json").write_text(json.dumps(second))
    assert mc.record_closed_loop_eval(run / "final", second, tmp_path / "second.json") == path
    card = ModelCard.load(path)
    rates = {r.dataset_config: r.metric_value for r in card.data.eval_results if r.metric_type == "pc_success"}
    assert rates == {"reach-v3": 75.0, "push-v3": 25.0}
    assert "| metaworld | `reach-v3` | 75.0 % (3/4) | 4 | 7 | 50 |" in card.text
    assert "Mean success over the 2 tasks: 50.0 %." in card.text
    # the same results again give the same card
    text = path.read_text()
    mc.record_closed_loop_eval(run, second, tmp_path / "second.json")
    assert path.read_text() == text


def test_someone_elses_readme_is_left_alone(run, tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(run / "final", folder)
    (folder / "README.md").write_text("# my own notes\n")
    results = {"env": "metaworld", "tasks": {"reach-v3": {"aggregated": {"pc_success": 100.0}}}}
    assert mc.record_closed_loop_eval(folder, results, tmp_path / "results.json") is None
    assert (folder / "README.md").read_text() == "# my own notes\n"
    # the hub mixin's generic card (a plain save_pretrained folder) is replaced by ours, with the result
    ActionDecoder.from_pretrained(run / "final").save_pretrained(tmp_path / "plain")
    assert "model_hub_mixin" in (tmp_path / "plain" / "README.md").read_text()
    assert mc.record_closed_loop_eval(tmp_path / "plain", results, tmp_path / "results.json") is not None
    card = ModelCard.load(tmp_path / "plain" / "README.md")
    assert mc.CARD_MARK in card.text and card.data.eval_results[0].metric_value == 100.0
    assert "unknown: no run_config.yaml" in card.text  # a plain folder: no run to describe


def test_data_locations_are_shown_without_credentials():
    assert mc.shown_location("https://user:secret@host:8080/ds?X-Amz-Signature=abc") == "https://host:8080/ds"
    assert mc.shown_location("s3://bucket/ds") == "s3://bucket/ds"
    assert mc.shown_location("pipe:curl -sf https://host/ds/{}") == "pipe:curl -sf https://host/ds/{}"
    assert mc.shown_location("/data/demos") == "/data/demos"
    assert mc.hub_dataset_id("hf://datasets/lerobot/pusht@main/shards") == "lerobot/pusht"
    assert mc.hub_dataset_id("/data/lerobot/pusht") is None
