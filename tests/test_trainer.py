"""The training runtime in one process: learning, guards, checkpoints, export, logs."""

import json

import pytest
import torch
from safetensors.torch import load_file

import toy_models
from wm_pipeline import exit_codes
from wm_pipeline.training import checkpoint
from wm_pipeline.training.config import resolve
from wm_pipeline.training.registry import ModelDataMismatch, get_model, register_model
from wm_pipeline.training.trainer import lr_factor, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return toy_models.make_dataset(tmp_path_factory.mktemp("toy") / "data")


def toy_cfg(data, *overrides, preset="tiny", model="toy"):
    spec = get_model(model)
    return resolve(
        model,
        spec.config_cls,
        spec.presets,
        preset=preset,
        data_paths=[str(data)],
        overrides=list(overrides),
        run_presets=spec.run_presets,
    ), spec


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_model_overfits_real_shards(data, tmp_path):
    cfg, spec = toy_cfg(
        data,
        "train.max_steps=160",
        "train.log_every=10",
        "train.ckpt_every=80",
        "optim.lr=3e-3",
        "train.eval_every=80",
        "train.eval_batches=2",
        "train.log_with=tensorboard",
    )
    run = tmp_path / "run"
    result = train(cfg, spec, run)
    assert result.exit_code == exit_codes.OK and result.step == 160
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(10, 161, 10))
    assert rows[-1]["loss"] < rows[0]["loss"] / 10, (rows[0]["loss"], rows[-1]["loss"])
    assert all(r["samples_per_s"] > 0 and r["lr"] > 0 for r in rows)
    evals = [r for r in read_metrics(run) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [80, 160] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # checkpoints: layout, keep_last=2 of the tiny preset, complete ones only
    assert [s for s, _ in checkpoint.complete_checkpoints(run)] == [80, 160]
    ck = checkpoint.step_dir(run, 160)
    assert {p.name for p in ck.iterdir()} == {
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        "rng-rank00000.safetensors",
        "rng-rank00000.json",
        "trainer_state.json",
    }
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == 160
    # final/ holds the EMA weights, loadable with from_pretrained, and they predict actions
    model = toy_models.ToyPolicy.from_pretrained(run / "final")
    ema = load_file(str(ck / "ema.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ema[name]), name
    assert model.config.action_dim == 3 and model.config.image_size == [32, 32]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    # a rerun of a finished run does nothing and says so
    again = train(cfg, spec, run)
    assert again.exit_code == 0 and again.resumed_from == 160 and again.loop_steps == 0


def test_lr_schedule_warms_up_then_decays_to_floor():
    lrs = [lr_factor(s, warmup=10, total=100, floor=0.1) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0
    assert max(lrs) == pytest.approx(1.0, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_nonfinite_loss_stops_with_step_and_keys(data, tmp_path, caplog):
    # an absurd learning rate blows the weights up after the first update: loss inf/NaN from step 2
    cfg, spec = toy_cfg(
        data,
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "optim.grad_clip=0",
        "train.nan_skip_steps=2",
        "train.max_steps=20",
    )
    with caplog.at_level("WARNING"):
        result = train(cfg, spec, tmp_path / "run")
    assert result.exit_code == exit_codes.NONFINITE_LOSS == 4
    assert result.step == 1
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2
    fatal = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(fatal) == 1 and "non-finite loss at step 2" in fatal[0] and "ep00" in fatal[0], fatal
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "nonfinite"
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.action_dim=7", "model.action_dim=7 but embodiment 'toybot' in the data has 3"),
        ("model.image_size=[64,64]", "model.image_size=[64, 64] but the data gives [32, 32]"),
    ],
)
def test_model_data_mismatch_fails_before_first_step(data, tmp_path, override, message):
    cfg, spec = toy_cfg(data, override)
    with pytest.raises(ModelDataMismatch, match=message.replace("[", r"\[").replace("]", r"\]")):
        train(cfg, spec, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_batch_key_fails_on_first_batch(data, tmp_path):
    register_model(
        "toy-latent",
        toy_models.ToyConfig,
        toy_models.ToyPolicy,
        toy_models.PRESETS,
        prepare=toy_models.prepare,
        required_keys=("frames", "lam.latent"),
    )
    cfg, spec = toy_cfg(data, model="toy-latent")
    with pytest.raises(ModelDataMismatch, match=r"needs batch key\(s\) \['lam.latent'\]"):
        train(cfg, spec, tmp_path / "run")
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))


def test_grad_accumulation_and_rerun_with_more_steps(data, tmp_path):
    run = tmp_path / "run"
    cfg, spec = toy_cfg(data, "optim.grad_accum=2", "train.max_steps=25")
    assert train(cfg, spec, run).step == 25
    cfg.train.max_steps = 30  # extending a finished run resumes from its last checkpoint
    result = train(cfg, spec, run)
    assert result.resumed_from == 25 and result.step == 30
    assert [s for s, _ in checkpoint.complete_checkpoints(run)] == [25, 30]
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 30
    assert read_metrics(run)[-1]["samples_per_s"] > 0


def test_init_warm_starts_from_a_finished_run(data, tmp_path):
    spec = get_model("toy")
    register_model(
        "toy-finetune",
        spec.config_cls,
        spec.model_cls,
        spec.presets,
        prepare=spec.prepare,
        required_keys=spec.required_keys,
        warm_start=True,
    )
    cfg, _ = toy_cfg(data, "train.max_steps=40", "optim.lr=3e-3")
    assert train(cfg, spec, tmp_path / "pre").exit_code == exit_codes.OK
    pretrained = load_file(str(tmp_path / "pre" / "final" / "model.safetensors"))

    # zero steps after warm start: the fine-tuned run starts from the pretrained weights exactly
    cfg, ft = toy_cfg(
        data, "train.max_steps=1", "optim.lr=1e-12", "ema.decay=0", f"init={tmp_path / 'pre'}", model="toy-finetune"
    )
    assert train(cfg, ft, tmp_path / "ft").exit_code == exit_codes.OK
    tuned = load_file(str(tmp_path / "ft" / "final" / "model.safetensors"))
    for k in pretrained:
        torch.testing.assert_close(tuned[k], pretrained[k], rtol=0, atol=1e-6)
    # without --init the same run starts elsewhere, and a folder with no weights is a one-line error
    cfg, _ = toy_cfg(data, "train.max_steps=1", "optim.lr=1e-12", "ema.decay=0", model="toy-finetune")
    train(cfg, ft, tmp_path / "fresh")
    fresh = load_file(str(tmp_path / "fresh" / "final" / "model.safetensors"))
    assert any(not torch.allclose(fresh[k], pretrained[k]) for k in pretrained)
    (tmp_path / "nothing").mkdir()  # a folder that does not exist is refused earlier (tests/test_clear_errors.py)
    cfg, _ = toy_cfg(data, "train.max_steps=1", f"init={tmp_path / 'nothing'}", model="toy-finetune")
    with pytest.raises(exit_codes.UsageError, match="no final/model.safetensors"):
        train(cfg, ft, tmp_path / "bad")
