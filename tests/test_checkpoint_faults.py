"""Bad files on disk and a full disk, with real files and real `wm train` runs (issue 16, point 2).

- a truncated file in the newest checkpoint: the rerun skips it with a warning naming the file,
  resumes from the newest intact checkpoint and reaches the same weights;
- every checkpoint damaged: a one-line error naming the files, exit 2, nothing deleted;
- weights that read but do not fit (the model config changed): the config-change hint, no fallback;
- truncated weights given to `--init`, `wm eval --policy`, `wm worldmodel eval`, the labellers, and the
  VAE / text-encoder folders a world-model config points at: one line naming the file, exit 2;
- a checkpoint write that hits a full disk (a real 2-4 MB tmpfs when this process may mount one, and an
  OSError(ENOSPC) raised in-process): exit 74, the partial step-N.tmp removed, status.json `failed`;
- any exception out of training leaves status.json in a final state;
- two ranks (torchrun, gloo): a file only rank 1 reads is damaged -> both skip that checkpoint; a full
  disk during a save -> both ranks stop with 74 (no rank left waiting in a barrier).
"""

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import toy_models
from wm_pipeline import exit_codes
from wm_pipeline.cli.main import main
from wm_pipeline.training import checkpoint
from wm_pipeline.training.config import resolve
from wm_pipeline.training.registry import get_model, register_model
from wm_pipeline.training.trainer import train

RUN_ARGS = (
    "train.max_steps=30",
    "train.ckpt_every=10",
    "train.keep_last=5",
    "train.log_every=10",
    "train.progress=false",
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return toy_models.make_dataset(tmp_path_factory.mktemp("toy") / "data")


def wm_train(data, run, *overrides, model="toy", env=None, extra=()):
    cmd = [
        sys.executable,
        "-m",
        "wm_pipeline",
        "train",
        model,
        "--data",
        str(data),
        "--out",
        str(run),
        "--preset",
        "tiny",
        *extra,
        *RUN_ARGS,
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env or toy_models.plugin_env(), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished toy run with checkpoints at steps 10, 20 and 30 (copied by each test before damage)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    code, out = wm_train(data, run)
    assert code == 0, out
    assert [s for s, _ in checkpoint.complete_checkpoints(run)] == [10, 20, 30]
    return run


def copy_run(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def error_lines(out: str, command: str = "train") -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"wm {command}: error:")]


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "name", ["model.safetensors", "ema.safetensors", "optimizer.safetensors", "trainer_state.json"]
)
def test_truncated_file_in_latest_checkpoint_falls_back_to_the_intact_one(data, trained, tmp_path, name):
    run = copy_run(trained, tmp_path)
    bad = checkpoint.step_dir(run, 30) / name
    truncate(bad)
    damaged_size = bad.stat().st_size
    assert checkpoint.verify_checkpoint(checkpoint.step_dir(run, 30))[0].path == bad
    assert checkpoint.verify_checkpoint(checkpoint.step_dir(run, 20)) == []

    code, out = wm_train(data, run)
    assert code == 0, out
    assert "Traceback" not in out
    warning = [line for line in out.splitlines() if "is damaged, skipping it" in line]
    assert len(warning) == 1 and f"{bad} is unreadable" in warning[0], out
    assert ("not valid JSON" if name.endswith(".json") else "truncated or corrupt safetensors") in warning[0]
    assert "did the model config change" not in out
    assert f"resuming from {checkpoint.step_dir(run, 20)} (step 20 of 30)" in out
    assert status(run)["state"] == "finished" and status(run)["exit_code"] == 0
    # the damaged checkpoint is set aside, and the one rewritten in its place is intact
    aside = checkpoint.step_dir(run, 30).with_name("step-0000030.damaged")
    assert (aside / name).stat().st_size == damaged_size
    assert [s for s, _ in checkpoint.complete_checkpoints(run)] == [10, 20, 30]
    assert checkpoint.verify_checkpoint(checkpoint.step_dir(run, 30)) == []
    # resuming replays the same batches and noise: the same weights as the uninterrupted run
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = (
            load_file(str(checkpoint.step_dir(trained, 30) / file)),
            load_file(str(checkpoint.step_dir(run, 30) / file)),
        )
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{file}:{key}")


def test_no_intact_checkpoint_is_a_one_line_error_and_deletes_nothing(data, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    bad = [
        checkpoint.step_dir(run, 10) / "model.safetensors",
        checkpoint.step_dir(run, 20) / "optimizer.safetensors",
        checkpoint.step_dir(run, 30) / "trainer_state.json",
    ]
    for path in bad:
        truncate(path)
    sizes = {p: p.stat().st_size for p in bad}

    code, out = wm_train(data, run)
    assert code == exit_codes.USAGE == 2, out
    assert "Traceback" not in out
    (line,) = error_lines(out)
    assert "cannot resume: none of the 3 checkpoint(s)" in line and "move" in line and "from scratch" in line
    assert all(str(p) in line for p in bad), line
    assert "did the model config change" not in line
    # nothing restarted, deleted or set aside: the user decides
    assert [s for s, _ in checkpoint.complete_checkpoints(run)] == [10, 20, 30]
    assert not list((run / "checkpoints").glob("*.damaged"))
    assert {p: p.stat().st_size for p in bad} == sizes
    assert status(run) == {**status(run), "state": "failed", "exit_code": 2, "step": 30}


def test_weights_that_do_not_fit_keep_the_config_change_hint(data, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    code, out = wm_train(data, run, "train.max_steps=40", "model.hidden=32")
    assert code == 2, out
    (line,) = error_lines(out)
    assert f"{checkpoint.step_dir(run, 30)}: cannot resume from it" in line and "did the model config change?" in line
    assert "unreadable" not in line and "Traceback" not in out
    assert not list((run / "checkpoints").glob("*.damaged"))


# ---------------------------------------------------------------- other readers of weights


def test_truncated_init_weights_are_a_one_line_error(data, trained, tmp_path):
    pre = copy_run(trained, tmp_path)
    bad = pre / "final" / "model.safetensors"
    truncate(bad)
    plugin = tmp_path / "finetune_plugin.py"
    plugin.write_text(
        "from wm_pipeline.training.registry import get_model, register_model\n"
        "s = get_model('toy')\n"
        "register_model('toy-finetune', s.config_cls, s.model_cls, s.presets, prepare=s.prepare,\n"
        "               required_keys=s.required_keys, warm_start=True)\n"
    )
    env = toy_models.plugin_env()
    env["WM_PLUGINS"] = f"{env['WM_PLUGINS']},{plugin}"  # in order: `toy` first
    ft = tmp_path / "ft"
    code, out = wm_train(data, ft, model="toy-finetune", env=env, extra=("--init", str(pre)))
    assert code == 2, out
    assert "Traceback" not in out
    (line,) = error_lines(out)
    assert f"--init {pre}: {bad} is unreadable: truncated or corrupt safetensors" in line, line
    assert not list(ft.glob("checkpoints/step-*"))
    assert status(ft)["state"] == "failed" and status(ft)["exit_code"] == 2


def _saved_decoder(run: Path) -> Path:
    from decoders.decoder import ActionDecoder, DecoderConfig

    stats = {
        "sawyer": {
            "action": {"mean": [0.0] * 4, "std": [0.5] * 4, "min": [-1.0] * 4, "max": [1.0] * 4},
            "state": {"mean": [0.0] * 39, "std": [1.0] * 39, "min": [-1.0] * 39, "max": [1.0] * 39},
        }
    }
    final = run / "final"
    ActionDecoder(
        DecoderConfig.from_preset(
            "tiny", action_dim=4, state_dim=39, image_size=[64, 64], tasks=["reach-v3"], stats=stats
        )
    ).save_pretrained(final)
    (final / "run_config.yaml").write_text(yaml.safe_dump({"model_name": "decoder"}))
    return final


@pytest.mark.parametrize("damage", ["model.safetensors", "config.json", "empty"])
def test_wm_eval_policy_names_the_unreadable_file(tmp_path, capsys, damage):
    final = _saved_decoder(tmp_path / "dec")
    bad = final / ("model.safetensors" if damage == "empty" else damage)
    if damage == "empty":
        bad.write_bytes(b"")
    else:
        truncate(bad)
    args = [
        "eval",
        "--policy",
        str(tmp_path / "dec"),
        "--tasks",
        "reach-v3",
        "--episodes",
        "1",
        "--out",
        str(tmp_path / "eval"),
    ]
    assert main(args) == exit_codes.USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = error_lines(err, "eval")
    expected = {
        "model.safetensors": "is unreadable: truncated or corrupt safetensors",
        "config.json": "is unreadable: not valid JSON",
        "empty": "is empty (0 bytes)",
    }[damage]
    assert f"{bad} {expected}" in line, line
    assert not (tmp_path / "eval" / "results.json").exists()


def _tiny_world_model_config(**kw):
    from worldmodel.uwm import WorldModelConfig, embodiment_spec

    base = dict(
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
    return WorldModelConfig(**{**base, **kw})


def _tiny_vae(path: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    ).save_pretrained(path)
    return path


def _tiny_text_encoder(path: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "reach"]
    vocab = path.with_name("vocab.txt")
    vocab.write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(path)
    BertModel(
        BertConfig(
            vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(path)
    return path


def test_world_model_loaders_name_the_unreadable_file(tmp_path):
    """`wm eval --policy` / `wm worldmodel eval` of a world model, and the VAE / text-encoder folders
    its config points at (loaded when the model is built)."""
    from wm_pipeline.jobs.closed_loop_eval import env_info, load_policy
    from wm_pipeline.jobs.worldmodel_offline_eval import load_world_model
    from wm_pipeline.recipes.worldmodel_policy import load_world_model_policy
    from wm_pipeline.weights import UnreadableFile
    from worldmodel.uwm import WorldModel

    info = {
        **env_info("metaworld", resolution=16),
        "action_steps": None,
        "temporal_ensemble": None,
        "sampling_steps": None,
    }
    plain = tmp_path / "wm"
    WorldModel(_tiny_world_model_config()).save_pretrained(plain)
    truncate(plain / "model.safetensors")
    for load in (
        lambda: load_world_model_policy(str(plain), info),
        lambda: load_policy(str(plain), info),
        lambda: load_world_model(plain),
    ):
        with pytest.raises(UnreadableFile, match="truncated or corrupt safetensors") as e:
            load()
        assert e.value.path == plain / "model.safetensors"

    vae = _tiny_vae(tmp_path / "vae")
    with_vae = tmp_path / "wm-vae"
    WorldModel(_tiny_world_model_config(image_size=32, frame_space="vae", vae_path=str(vae))).save_pretrained(with_vae)
    truncate(vae / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UnreadableFile) as e:
        load_world_model(with_vae)
    assert e.value.path == vae / "diffusion_pytorch_model.safetensors"

    text = _tiny_text_encoder(tmp_path / "text")
    with_text = tmp_path / "wm-text"
    WorldModel(_tiny_world_model_config(text_encoder_path=str(text))).save_pretrained(with_text)
    truncate(text / "model.safetensors")
    with pytest.raises(UnreadableFile) as e:
        load_world_model_policy(str(with_text), info)
    assert e.value.path == text / "model.safetensors"
    truncate(text / "tokenizer.json")
    with pytest.raises(UnreadableFile, match="not valid JSON") as e:
        load_world_model(with_text)
    assert e.value.path == text / "tokenizer.json"


def test_worldmodel_training_names_an_unreadable_vae_folder(tmp_path):
    """The folders a run config points at are read when the model is built: `wm train` reports them."""
    from wm_pipeline.training.trainer import exit_code_of
    from wm_pipeline.weights import UnreadableFile, config_folders, loading
    from worldmodel.uwm import WorldModel

    vae = _tiny_vae(tmp_path / "vae")
    truncate(vae / "config.json")
    cfg = _tiny_world_model_config(image_size=32, frame_space="vae", vae_path=str(vae))
    assert config_folders(cfg) == [vae]
    with pytest.raises(UnreadableFile, match="not valid JSON") as e:
        with loading(config_folders(cfg), what="a folder the model config points at:"):
            WorldModel(cfg)
    assert e.value.path == vae / "config.json" and exit_code_of(e.value) == 2


def test_labellers_name_the_unreadable_file(tmp_path):
    from latent_actions.idm import InverseDynamicsModel
    from latent_actions.lam import LatentActionModel
    from wm_pipeline.jobs.labelling import load_labeller
    from wm_pipeline.jobs.vae_labeller import label_vae, load_vae_labeller
    from wm_pipeline.weights import UnreadableFile

    for name, model in (
        ("lam", LatentActionModel.from_preset("tiny")),
        ("idm", InverseDynamicsModel.from_preset("tiny", action_dim=4)),
    ):
        final = tmp_path / name / "final"
        model.save_pretrained(final)
        (final / "run_config.yaml").write_text(yaml.safe_dump({"model_name": name, "data": {"window": 4}}))
        load_labeller(tmp_path / name)  # intact: loads
        truncate(final / "model.safetensors")
        with pytest.raises(UnreadableFile, match="truncated or corrupt safetensors") as e:
            load_labeller(tmp_path / name)
        assert e.value.path == final / "model.safetensors"

    vae = _tiny_vae(tmp_path / "vae")
    truncate(vae / "diffusion_pytorch_model.safetensors", keep=0.9)
    with pytest.raises(UnreadableFile) as e:
        load_vae_labeller(vae)
    assert e.value.path == vae / "diffusion_pytorch_model.safetensors"
    truncate(vae / "config.json")
    with pytest.raises(UnreadableFile, match="not valid JSON"):
        label_vae(toy_models.make_dataset(tmp_path / "d", episodes=1, per_shard=1), vae, progress=False)


# ---------------------------------------------------------------- a full disk during a save


def _tree_bytes(path: Path) -> int:
    """Bytes a tmpfs charges for the files under ``path`` (whole 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in path.rglob("*") if p.is_file())


def test_full_disk_during_a_save_on_a_real_tmpfs(data, trained, small_tmpfs):
    # room for the run's small files and one checkpoint and a half: the second checkpoint cannot fit
    ckpt = _tree_bytes(checkpoint.step_dir(trained, 10))
    disk = small_tmpfs(64 * 1024 + ckpt * 3 // 2)
    run = disk / "run"
    code, out = wm_train(data, run)
    assert code == exit_codes.WRITE_FAILED == 74, out
    assert "Traceback" not in out
    (line,) = error_lines(out)
    assert "step-0000020.tmp" in line and "No space left on device" in line, line
    assert "removed the partial" in line and f"{checkpoint.step_dir(run, 10)}" in line
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert [s for s, _ in checkpoint.complete_checkpoints(run)] == [10]
    assert checkpoint.verify_checkpoint(checkpoint.step_dir(run, 10)) == []
    assert status(run) == {**status(run), "state": "failed", "exit_code": 74, "step": 20}
    # room made: the rerun resumes from the last complete checkpoint and finishes
    small_tmpfs(16 * 1024 * 1024)
    code, out = wm_train(data, run)
    assert code == 0, out
    assert f"resuming from {checkpoint.step_dir(run, 10)} (step 10 of 30)" in out
    assert status(run)["state"] == "finished"


def test_full_disk_during_a_save_in_process(data, tmp_path, monkeypatch, capsys):
    """ENOSPC raised from the middle of a save (after some files are written): same outcome, any machine."""
    real = checkpoint._write_json

    def full_disk(path, obj):
        if path.name == "scheduler.json" and "step-0000020" in str(path.parent):
            path.write_text("{")  # a partial file, as a real full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, obj)

    monkeypatch.setattr(checkpoint, "_write_json", full_disk)
    run = tmp_path / "run"
    args = ["train", "toy", "--data", str(data), "--out", str(run), "--preset", "tiny", *RUN_ARGS]
    assert main(args) == exit_codes.WRITE_FAILED
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert f"cannot write {checkpoint.step_dir(run, 20)}.tmp/scheduler.json: No space left on device" in line, line
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert [s for s, _ in checkpoint.complete_checkpoints(run)] == [10]
    assert status(run) == {**status(run), "state": "failed", "exit_code": 74, "step": 20}

    monkeypatch.setattr(checkpoint, "_write_json", real)
    assert main(args) == 0
    assert status(run)["state"] == "finished"
    assert [s for s, _ in checkpoint.complete_checkpoints(run)] == [10, 20, 30]


# ---------------------------------------------------------------- status.json always ends final


class _Broken(toy_models.ToyPolicy):
    """Raises a bug-like error at the 5th training step."""

    calls = 0

    def forward(self, batch):
        type(self).calls += 1
        if self.training and type(self).calls == 5:
            raise RuntimeError("a bug in the model")
        return super().forward(batch)


def test_an_exception_out_of_training_writes_a_final_status(data, tmp_path):
    spec = get_model("toy")
    register_model(
        "toy-broken", spec.config_cls, _Broken, spec.presets, prepare=spec.prepare, required_keys=spec.required_keys
    )
    cfg = resolve(
        "toy-broken",
        spec.config_cls,
        spec.presets,
        preset="tiny",
        data_paths=[str(data)],
        overrides=["train.max_steps=20"],
        run_presets=spec.run_presets,
    )
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="a bug in the model"):
        train(cfg, get_model("toy-broken"), run)
    assert status(run) == {**status(run), "state": "failed", "exit_code": exit_codes.FAILED, "step": 4}


# ---------------------------------------------------------------- two ranks


def torchrun(data, run, *overrides, timeout=240):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "wm_pipeline",
        "train",
        "toy",
        "--data",
        str(data),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "train.ckpt_every=10",
        "train.keep_last=5",
        "train.log_every=10",
        "train.progress=false",
        *overrides,
    ]
    proc = subprocess.run(cmd, env=toy_models.plugin_env(), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def data4(tmp_path_factory):
    # 4 shards: each of 2 ranks reads its own 2
    return toy_models.make_dataset(tmp_path_factory.mktemp("toy4") / "data", episodes=8, per_shard=2)


@pytest.mark.distributed
def test_two_ranks_agree_to_skip_a_checkpoint_damaged_on_one_rank(data4, tmp_path):
    run = tmp_path / "run"
    code, out = torchrun(data4, run, "train.max_steps=20")
    assert code == 0, out
    bad = checkpoint.step_dir(run, 20) / "rng-rank00001.safetensors"  # read by rank 1 only
    truncate(bad)
    code, out = torchrun(data4, run, "train.max_steps=30")
    assert code == 0, out
    assert f"{bad} is unreadable" in out  # rank 1's warning
    assert "a file of another rank is unreadable" in out  # rank 0's
    assert f"resuming from {checkpoint.step_dir(run, 10)} (step 10 of 30)" in out
    assert [s for s, _ in checkpoint.complete_checkpoints(run)] == [10, 20, 30]
    assert status(run)["state"] == "finished"


@pytest.mark.distributed
def test_two_ranks_stop_together_when_a_save_hits_a_full_disk(data4, trained, small_tmpfs):
    ckpt = _tree_bytes(checkpoint.step_dir(trained, 10)) + 8192  # + the second rank's RNG pair
    run = small_tmpfs(64 * 1024 + ckpt * 3 // 2) / "run"
    code, out = torchrun(data4, run, "train.max_steps=30")
    assert code != 0 and re.search(r"exitcode\s*:\s*74", out), out  # torchrun's summary of its workers
    assert "No space left on device" in out and "failed on another rank" in out
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert [s for s, _ in checkpoint.complete_checkpoints(run)] == [10]
    assert status(run) == {**status(run), "state": "failed", "exit_code": 74, "step": 20}
