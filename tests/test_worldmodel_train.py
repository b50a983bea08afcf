"""`wm train worldmodel` / `wm worldmodel eval` on a tiny real Meta-World collection (32 px, reach-v3).

Real parts only: scripted-expert rollouts rendered by MuJoCo, H.264 shards, the real runtime (one
process and 2-rank torchrun on gloo), a randomly initialised diffusers AutoencoderKL saved to disk.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from in_process import wm_here
from wm_pipeline.cli.main import main

PRESET = ["--preset", "tiny", "train.progress=false", "data.num_workers=0"]


def _collect(out: Path, episodes: int, seed: int, *extra: str) -> Path:
    code = main(
        [
            "collect",
            "metaworld",
            "--tasks",
            "reach-v3",
            "--episodes",
            str(episodes),
            "--seed",
            str(seed),
            "--resolution",
            "32",
            "--max-steps",
            "60",
            "--samples-per-shard",
            "2",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def mw(tmp_path_factory):
    root = tmp_path_factory.mktemp("mw")
    return {
        "demos": _collect(root / "demos", 3, 0),
        "video": _collect(root / "video", 2, 50, "--drop-actions"),
        "heldout": _collect(root / "heldout", 1, 100),
        "root": root,
    }


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") :])  # huggingface_hub prints a line of its own first


def _wm(capsys, *args: str) -> subprocess.CompletedProcess:
    """`wm ARGS` by the same main() in this process (no fresh interpreter: seconds of imports saved per call)."""
    code, out, err = wm_here(capsys, *args)
    return subprocess.CompletedProcess(list(args), code, out, err)


def test_mixed_demos_and_video_loss_falls_then_eval_writes_json_and_grid(mw, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "worldmodel",
            "--data",
            str(mw["demos"]),
            "--data",
            str(mw["video"]),
            "--out",
            str(run),
            *PRESET,
            "data.weights=0.5,0.5",
            "train.max_steps=80",
        ]
    )
    assert code == 0
    rows = [r for r in _rows(run) if "loss" in r]
    assert rows[-1]["step"] == 80
    first, last = rows[0], rows[-1]
    assert last["loss"] < 0.7 * first["loss"], (first, last)
    assert last["loss_video"] < first["loss_video"]
    # both sources were drawn: some samples had actions, some did not (and trained the video loss only)
    fractions = [r["action_fraction"] for r in rows]
    assert 0.15 < float(np.mean(fractions)) < 0.85, fractions
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["window"] == 10 and set(cfg["model"]["embodiments"]) == {"sawyer"}
    assert cfg["model"]["embodiments"]["sawyer"]["action_dim"] == 4
    assert cfg["model"]["embodiments"]["sawyer"]["state_dim"] == 39 and cfg["model"]["tasks"] == ["reach-v3"]

    out = tmp_path / "eval"
    proc = _wm(
        capsys,
        "worldmodel",
        "eval",
        "--model",
        str(run),
        "--data",
        str(mw["heldout"]),
        "--out",
        str(out),
        "--windows",
        "6",
        "--examples",
        "3",
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert _json(proc.stdout) == metrics
    assert metrics["windows"] == 6 and metrics["variant"] == "uwm"
    for k in (
        "forward_dynamics_mse",
        "forward_dynamics_mean_mse",
        "copy_last_frame_mse",
        "video_mse",
        "video_mean_mse",
        "policy_mse",
        "inverse_dynamics_mse",
    ):
        assert np.isfinite(metrics[k]) and metrics[k] > 0, k
    for k in ("forward_dynamics", "copy_last_frame", "video", "forward_dynamics_mean", "video_mean"):  # beside MSE
        assert 0 < metrics[f"{k}_psnr"] < 100 and -1 <= metrics[f"{k}_ssim"] < 1, k
    r2_keys = [k for k in metrics if k.endswith("_r2")]
    assert len(r2_keys) == 6 and max(metrics[k] for k in r2_keys) <= 1, r2_keys
    grid = np.asarray(Image.open(out / "grid.png"))
    # 3 rows of 32 px (+ 2 px bars); 2 context + 2 predicted + 2 true frames of 32 px + two 6 px bars
    assert grid.shape == (3 * 32 + 2 * 2, 6 * 32 + 2 * 6, 3)
    assert (out / "grid.mp4").stat().st_size > 0
    # the same seed gives the same numbers; a folder that is not a world model is a one-line error
    again = _wm(
        capsys,
        "worldmodel",
        "eval",
        "--model",
        str(run),
        "--data",
        str(mw["heldout"]),
        "--out",
        str(tmp_path / "e2"),
        "--windows",
        "6",
        "--examples",
        "1",
    )
    assert _json(again.stdout)["forward_dynamics_mse"] == metrics["forward_dynamics_mse"]
    bad = _wm(capsys, "worldmodel", "eval", "--model", str(mw["demos"]), "--data", str(mw["heldout"]))
    assert bad.returncode == 2 and "no world model" in bad.stderr and "Traceback" not in bad.stderr
    # --every K --windows 0: a window at every K-th frame of every held-out episode
    from shards.stream import WindowStream

    dense = _wm(
        capsys,
        "worldmodel",
        "eval",
        "--model",
        str(run),
        "--data",
        str(mw["heldout"]),
        "--out",
        str(tmp_path / "e3"),
        "--windows",
        "0",
        "--every",
        "3",
        "--examples",
        "1",
    )
    expected = sum(1 for _ in WindowStream(str(mw["heldout"]), window=10, mode="label", label_every=3))
    assert dense.returncode == 0, dense.stderr
    assert _json(dense.stdout)["windows"] == expected > 6 and _json(dense.stdout)["window_every"] == 3
    assert (
        _wm(capsys, "worldmodel", "eval", "--model", str(run), "--data", str(mw["heldout"]), "--every", "0").returncode
        == 2
    )


def test_no_future_control_hides_future_frames(mw, tmp_path):
    from wm_pipeline.recipes.worldmodel import build_stream, hide_future
    from wm_pipeline.training.config import resolve
    from wm_pipeline.training.registry import get_model, load_plugins
    from wm_pipeline.training.trainer import read_dataset_info

    load_plugins()
    spec = get_model("worldmodel")
    cfg = resolve(
        "worldmodel",
        spec.config_cls,
        spec.presets,
        preset="tiny",
        config_file=None,
        overrides=["policy=no-future", "data.num_workers=0"],
        data_paths=[str(mw["demos"])],
        run_presets=spec.run_presets,
    )
    cfg = spec.prepare(cfg, read_dataset_info(cfg.data.paths))  # a new, filled config
    assert cfg.model.video_loss_weight == 0.0
    batch = next(iter(build_stream(cfg, seed=0)))
    t0 = cfg.model.n_obs - 1
    frames = batch["frames"]
    assert all(torch.equal(frames[:, t], frames[:, t0]) for t in range(t0 + 1, frames.shape[1]))
    raw = {"frames": torch.arange(2 * 10).view(2, 10, 1, 1, 1).expand(2, 10, 3, 2, 2).to(torch.uint8)}
    hidden = hide_future(dict(raw), cfg.model)["frames"]
    assert (
        torch.equal(hidden[:, : t0 + 1], raw["frames"][:, : t0 + 1])
        and (hidden[:, t0 + 1 :] == hidden[:, t0 : t0 + 1]).all()
    )
    cfg.recipe = "nonsense"
    with pytest.raises(Exception, match="no-future"):
        spec.prepare(cfg, read_dataset_info(cfg.data.paths))


def test_vae_sidecar_is_streamed_and_trains(mw, tmp_path, capsys):
    from diffusers import AutoencoderKL

    from shards.sidecar import read_sidecar
    from shards.stream import iter_samples
    from wm_pipeline.jobs.vae_labeller import label_vae
    from worldmodel.tokenizer import encode_frames, load_vae

    torch.manual_seed(0)
    vae_dir = tmp_path / "vae"
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).save_pretrained(vae_dir)
    data = tmp_path / "demos"
    subprocess.run(["cp", "-r", str(mw["demos"]), str(data)], check=True)  # the sidecar is written beside the data
    summary = label_vae(data, vae_dir, "vae", progress=False)
    assert summary["failures"] == 0 and summary["shards"] == 2
    assert label_vae(data, vae_dir, "vae", progress=False)["skipped"] == 2  # idempotent: nothing redone
    # the sidecar holds the latent of every frame, as encode_frames computes it
    sample = next(iter_samples(str(data)))
    rows = read_sidecar(data, "vae", "shard-000000.tar")[sample.key]
    assert rows["latent"].shape == (sample.frames.shape[0], 4, 16, 16) and rows["valid"].all()
    expected = encode_frames(load_vae(vae_dir), sample.frames[:5])
    torch.testing.assert_close(torch.from_numpy(rows["latent"][:5]), expected, rtol=1e-4, atol=1e-4)

    run = tmp_path / "run"
    proc = _wm(
        capsys,
        "train",
        "worldmodel",
        "--data",
        str(data),
        "--labels",
        "vae",
        "--out",
        str(run),
        *PRESET,
        "train.max_steps=40",
        "optim.lr=3e-3",
    )
    assert proc.returncode == 0, proc.stderr
    assert "at every step" not in proc.stderr  # the latents came from the sidecar, not a per-step VAE pass
    cfg = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert (cfg["video_target"], cfg["video_prediction"]) == ("residual", "x0")  # the residual of latents
    assert (cfg["frame_space"], cfg["vae_latent_key"], cfg["vae_latent_channels"], cfg["vae_downsample"]) == (
        "vae",
        "vae.latent",
        4,
        2,
    )
    rows = [r for r in _rows(run) if "loss_video" in r]
    assert rows[-1]["loss_video"] < rows[0]["loss_video"]
    # evaluation decodes the predicted latents with the VAE named in the run, and scores pixels
    proc = _wm(
        capsys,
        "worldmodel",
        "eval",
        "--model",
        str(run),
        "--data",
        str(mw["heldout"]),
        "--out",
        str(tmp_path / "ev"),
        "--windows",
        "2",
        "--examples",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    metrics = _json(proc.stdout)
    assert metrics["frame_space"] == "vae" and np.isfinite(metrics["forward_dynamics_mse"])


@pytest.mark.distributed
def test_torchrun_two_ranks_train_and_the_final_model_loads(mw, tmp_path):
    from worldmodel.uwm import WorldModel

    run, logs = tmp_path / "run", tmp_path / "logs"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
        "-m",
        "wm_pipeline",
        "train",
        "worldmodel",
        "--data",
        str(mw["demos"]),
        "--out",
        str(run),
        *PRESET,
        "train.max_steps=12",
        "train.log_every=4",
        "train.ckpt_every=12",
        "model.variant=dust",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    errs = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    assert proc.returncode == 0, (proc.stdout[-2000:], errs)
    assert sorted(errs) == ["0", "1"], errs
    assert all("Traceback" not in e and "error" not in e.lower() for e in errs.values()), errs
    assert "step 12/12 |" in errs["0"] and "step 12/12 |" not in errs["1"]  # rank 0 alone logs
    ck = run / "checkpoints" / "step-0000012"
    assert json.loads((ck / "trainer_state.json").read_text())["world_size"] == 2
    assert (ck / "rng-rank00000.safetensors").is_file() and (ck / "rng-rank00001.safetensors").is_file()
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    model = WorldModel.from_pretrained(str(run / "final"), strict=True).eval()
    assert model.config.variant == "dust" and "sawyer" in model.adapters
    obs = torch.zeros(1, model.config.n_obs, 3, 32, 32, dtype=torch.uint8)
    actions = model.sample_policy(obs, "sawyer", task=["reach-v3"], generator=torch.Generator().manual_seed(0))
    assert actions.shape == (1, model.config.action_horizon, 4) and torch.isfinite(actions).all()
