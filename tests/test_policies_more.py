"""The world model as a closed-loop policy (``uwm``) and the decoder trained on IDM pseudo-labels (``idm-bc``).

Covers: a WorldModelPolicy around a tiny random WorldModel drives real Meta-World episodes through
``wm_pipeline.jobs.closed_loop_eval.evaluate`` (latency reported, actions seeded per episode); ``wm eval --policy RUN``
dispatches a trained world-model run to it (and a decoder run still to the decoder); the window
stream mixes a labelled and an unlabelled folder with ``optional_labels``; ``wm train decoder
policy=idm-bc`` trains on demos plus video labelled by a real IDM (``wm label``), with the
pseudo-actions as targets; ``policy=latent`` trains a decoder on LAM latents of the demos and runs
it in closed loop with a world model predicting the latent chunk.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

import wm_pipeline.recipes  # noqa: F401  (registers the policy loaders)
from decoders.world_model_policy import WorldModelPolicy
from shards.format import FormatError
from shards.sidecar import read_sidecar
from shards.stream import WindowStream, collate_windows
from shards.writer import Episode, run_sharded_job
from wm_pipeline.cli.main import main
from wm_pipeline.jobs.closed_loop_eval import env_info, evaluate, load_policy
from wm_pipeline.recipes.decoder import idm_targets
from wm_pipeline.sim.metaworld_env import ACTION_DIM, EMBODIMENT, STATE_DIM
from worldmodel.uwm import PRESETS, WorldModel, embodiment_spec

SIZE = 32


def _episode(i: int, robot: bool, n: int = 14) -> list[Episode]:
    """A square moving by its action (px/frame); action-free ('video') episodes hide the actions."""
    rng = np.random.default_rng(i)
    move = rng.integers(-2, 3, (n, 2)).astype(np.float32)
    pos = np.clip(np.cumsum(np.vstack([[SIZE // 2 - 3] * 2, move[:-1]]), 0), 0, SIZE - 6).astype(int)
    frames = np.full((n, SIZE, SIZE, 3), 30 + 20 * (i % 5), np.uint8)
    for t, (y, x) in enumerate(pos):
        frames[t, y : y + 6, x : x + 6] = (230, 200, 40)
    action = np.concatenate([move, np.zeros((n, ACTION_DIM - 2), np.float32)], 1)
    if robot:
        return [
            Episode(
                key=f"demo{i:02d}",
                frames={"corner": frames},
                fps=10.0,
                embodiment=EMBODIMENT,
                task="reach-v3",
                action=action,
                state=rng.normal(size=(n, STATE_DIM)).astype(np.float32),
                success=True,
            )
        ]
    return [Episode(key=f"clip{i:02d}", frames={"corner": frames}, fps=10.0, embodiment="video", task="reach-v3")]


def _demos(i):
    return _episode(i, robot=True)


def _video(i):
    return _episode(100 + i, robot=False)


def _make(root: Path, make, n: int) -> Path:
    result = run_sharded_job(
        root, list(range(n)), make, samples_per_shard=2, workers=1, created_by="tests", desc="data"
    )
    assert result.exit_code == 0, result.failures
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    return _make(root / "demos", _demos, 4), _make(root / "video", _video, 4), root


def _tiny_world_model(seed=0) -> WorldModel:
    torch.manual_seed(seed)
    spec = embodiment_spec(action_dim=ACTION_DIM, state_dim=STATE_DIM)
    cfg = PRESETS["tiny"]
    cfg = type(cfg)(**{**cfg.__dict__, "embodiments": {EMBODIMENT: spec}, "tasks": ["reach-v3"]})
    model = WorldModel(cfg)
    torch.nn.init.normal_(model.adapters[EMBODIMENT].action_out.weight, std=0.5)  # not a zero policy
    return model


def test_world_model_policy_runs_closed_loop_in_metaworld(tmp_path):
    model = _tiny_world_model()
    policy = WorldModelPolicy(model, n_steps=2, n_action_steps=4)
    assert (policy.action_dim, policy.image_size, policy.embodiment) == (ACTION_DIM, (SIZE, SIZE), EMBODIMENT)
    assert policy.n_obs_steps == model.config.n_obs
    results = evaluate(policy, ["reach-v3"], episodes=1, seed=0, out_dir=tmp_path, resolution=SIZE, max_steps=10)
    assert results["overall"]["episodes"] == 1
    assert 1 <= results["overall"]["mean_length"] <= 10
    assert results["latency"]["calls"] == -(-results["overall"]["mean_length"] // 4)  # one call per 4 actions
    assert results["latency"]["median_ms"] > 0
    # actions are a function of the episode seed
    obs = {"image": np.zeros((SIZE, SIZE, 3), np.uint8), "state": np.zeros(STATE_DIM, np.float32), "task": "reach-v3"}
    runs = []
    for seed in (3, 3, 4):
        policy.reset(seed)
        runs.append(np.stack([policy.act(obs) for _ in range(4)]))
    assert np.array_equal(runs[0], runs[1]) and not np.allclose(runs[0], runs[2])
    with pytest.raises(ValueError, match="no robot embodiment"):
        WorldModelPolicy(model, embodiment="panda")
    # a bare save_pretrained folder goes to the world-model loader, not the decoder's
    model.save_pretrained(str(tmp_path / "saved"))
    loaded = load_policy(str(tmp_path / "saved"), env_info("metaworld", resolution=SIZE))
    assert isinstance(loaded, WorldModelPolicy) and loaded.horizon == model.config.action_horizon


def test_wm_eval_dispatches_a_world_model_run(data, tmp_path, capsys):
    demos, _, _ = data
    run = tmp_path / "wm"
    assert (
        main(
            [
                "train",
                "worldmodel",
                "--data",
                str(demos),
                "--out",
                str(run),
                "--preset",
                "tiny",
                "train.max_steps=2",
                "train.ckpt_every=2",
                "train.progress=false",
                "data.batch_size=2",
            ]
        )
        == 0
    )
    assert (
        json.loads((run / "final" / "config.json").read_text())["embodiments"][EMBODIMENT]["action_dim"] == ACTION_DIM
    )
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
                "6",
                "--resolution",
                str(SIZE),
                "--sampling-steps",
                "2",
                "--action-steps",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["latency"]["calls"] == 2 and results["overall"]["mean_length"] == 6
    # the harness refuses a resolution the model was not trained at, before any rollout
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
                "--resolution",
                "64",
                "--out",
                str(tmp_path / "e2"),
            ]
        )
        == 2
    )
    assert "32x32" in capsys.readouterr().err


def test_stream_mixes_labelled_and_unlabelled_folders(data, tmp_path):
    demos, video, _ = data
    from shards.format import read_manifest
    from shards.sidecar import write_sidecar_shard

    for shard in read_manifest(video)["shards"]:  # a hand-made sidecar on the video only
        rows = {
            k: {"pseudo_action": np.full((14, ACTION_DIM), 7, np.float32), "valid": np.arange(14) < 13}
            for k in shard["keys"]
        }
        write_sidecar_shard(video, "idm", shard["name"], rows)
    with pytest.raises(FormatError, match="no labels 'idm'"):
        WindowStream([demos, video], window=4, labels=["idm"])
    stream = WindowStream([demos, video], window=4, mode="label", labels=["idm"], optional_labels=True)
    windows = list(stream)
    batch = collate_windows(windows)
    present = batch["idm.present"]
    from_video = torch.tensor([e == "video" for e in batch["embodiment"]])
    assert present.dtype == torch.bool and torch.equal(present, from_video) and present.any() and (~present).any()
    assert batch["idm.pseudo_action"].shape == (len(windows), 4, ACTION_DIM)
    assert (batch["idm.pseudo_action"][present] == 7).all() and (batch["idm.pseudo_action"][~present] == 0).all()
    assert batch["idm.valid"].dtype == torch.bool and not batch["idm.valid"][~present].any()
    # idm-bc's batch hook: valid pseudo-labelled video windows become sawyer action samples
    before = batch["action_mask"].clone()
    out = idm_targets(dict(batch), EMBODIMENT, ACTION_DIM)
    whole = batch["idm.valid"].all(1)
    assert torch.equal(out["action_mask"], before | (present & whole))
    assert (out["action"][present & whole] == 7).all()
    assert all(e == EMBODIMENT for e, m in zip(out["embodiment"], out["action_mask"]) if m)
    # the previous behaviour is kept without optional_labels: no flag, no zero-fill
    assert "idm.present" not in next(iter(WindowStream(video, window=4, mode="label", labels=["idm"])))


def test_train_decoder_idm_bc_on_idm_pseudo_labels(data, tmp_path, capsys):
    demos, video, _ = data
    video_copy = tmp_path / "video"
    import shutil

    shutil.copytree(video, video_copy, ignore=shutil.ignore_patterns("labels"))
    refused = main(
        [
            "train",
            "decoder",
            "--data",
            str(demos),
            "--data",
            str(video_copy),
            "--out",
            str(tmp_path / "no"),
            "--preset",
            "tiny",
            "policy=idm-bc",
        ]
    )
    assert refused == 2 and "wm label" in capsys.readouterr().err
    idm = tmp_path / "idm"
    assert (
        main(
            [
                "train",
                "idm",
                "--data",
                str(demos),
                "--out",
                str(idm),
                "--preset",
                "tiny",
                "train.max_steps=3",
                "train.ckpt_every=3",
                "train.progress=false",
                "data.window=6",
                "data.batch_size=2",
            ]
        )
        == 0
    )
    assert main(["label", "--labeller", str(idm), "--data", str(video_copy), "--batch-size", "4", "--no-progress"]) == 0
    rows = read_sidecar(video_copy, "idm", "shard-000000.tar")
    assert rows and all(r["pseudo_action"].shape == (14, ACTION_DIM) for r in rows.values())
    run = tmp_path / "dec"
    assert (
        main(
            [
                "train",
                "decoder",
                "--data",
                str(demos),
                "--data",
                str(video_copy),
                "--out",
                str(run),
                "--preset",
                "tiny",
                "policy=idm-bc",
                "train.max_steps=3",
                "train.ckpt_every=3",
                "train.progress=false",
                "data.batch_size=8",
                "data.shuffle_buffer=8",
                "model.horizon=4",
                "model.n_obs_steps=1",
                "train.log_every=1",
                "data.weights=0,1",
            ]
        )
        == 0
    )  # video only: every action target is an IDM pseudo-label
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [m for m in metrics if "loss" in m]
    assert train_rows and all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in train_rows)
    # without the pseudo-labels these windows would have no action target (0 samples, loss 0)
    assert all(m["action_samples"] > 0 for m in train_rows), train_rows
    cfg = json.loads((run / "final" / "config.json").read_text())
    assert list(cfg["stats"]) == [EMBODIMENT]
    # another sidecar name (one IDM per K): --labels NAME, refused by name while it is missing
    args = [
        "train",
        "decoder",
        "--data",
        str(demos),
        "--data",
        str(video_copy),
        "--preset",
        "tiny",
        "policy=idm-bc",
        "--labels",
        "idm-k2",
        "train.max_steps=2",
        "train.ckpt_every=2",
        "train.progress=false",
        "data.batch_size=8",
        "data.shuffle_buffer=8",
        "model.horizon=4",
        "model.n_obs_steps=1",
        "train.log_every=1",
        "data.weights=0,1",
    ]
    assert main([*args, "--out", str(tmp_path / "no2")]) == 2 and "--name idm-k2" in capsys.readouterr().err
    (video_copy / "labels" / "idm").rename(video_copy / "labels" / "idm-k2")
    assert main([*args, "--out", str(tmp_path / "dec2")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "dec2" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["action_samples"] > 0 for m in rows if "loss" in m)


def test_train_decoder_latent_on_world_model_latents(data, tmp_path, capsys):
    """policy=latent: LAM labels on the demos, a world model pretrained on them, a decoder that maps
    the latent chunk to actions, and in closed loop the world model predicts that chunk."""
    from decoders.policy import DecoderPolicy
    from decoders.world_model_policy import WorldModelLatentSource

    demos_src, _, _ = data
    import shutil

    demos = tmp_path / "demos"
    shutil.copytree(demos_src, demos, ignore=shutil.ignore_patterns("labels"))
    quiet = ["train.progress=false", "data.batch_size=2"]
    lam, wm, dec = tmp_path / "lam", tmp_path / "wm", tmp_path / "dec"
    assert (
        main(
            [
                "train",
                "lam",
                "--data",
                str(demos),
                "--out",
                str(lam),
                "--preset",
                "tiny",
                "train.max_steps=2",
                "train.ckpt_every=2",
                *quiet,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "worldmodel",
                "--data",
                str(demos),
                "--out",
                str(wm),
                "--preset",
                "tiny",
                "train.max_steps=2",
                "train.ckpt_every=2",
                *quiet,
            ]
        )
        == 0
    )  # no latent actions yet
    decoder_args = [
        "train",
        "decoder",
        "--data",
        str(demos),
        "--out",
        str(dec),
        "--preset",
        "tiny",
        "policy=latent",
        "train.max_steps=3",
        "train.ckpt_every=3",
        "model.horizon=4",
        *quiet,
    ]
    assert main(decoder_args) == 2 and "--init RUN_WM" in capsys.readouterr().err
    assert main([*decoder_args, "--init", str(wm)]) == 2 and "without latent actions" in capsys.readouterr().err
    assert main(["label", "--labeller", str(lam), "--data", str(demos), "--no-progress"]) == 0
    shutil.rmtree(wm)
    assert (
        main(
            [
                "train",
                "worldmodel",
                "--data",
                str(demos),
                "--labels",
                "lam",
                "--out",
                str(wm),
                "--preset",
                "tiny",
                "train.max_steps=2",
                "train.ckpt_every=2",
                *quiet,
            ]
        )
        == 0
    )
    assert main([*decoder_args, "--init", str(wm)]) == 0
    cfg = json.loads((dec / "final" / "config.json").read_text())
    wm_cfg = json.loads((wm / "final" / "config.json").read_text())
    assert cfg["latent_key"] == "lam.latent" and cfg["latent_dim"] == wm_cfg["latent_action_dim"] > 0
    assert cfg["latent_model"] == str((wm / "final").resolve()) and cfg["latent_horizon"] == 4

    policy = load_policy(str(dec), env_info("metaworld", resolution=SIZE))
    assert isinstance(policy, DecoderPolicy) and isinstance(policy.latent_source, WorldModelLatentSource)
    obs = {
        "image": np.full((SIZE, SIZE, 3), 90, np.uint8),
        "state": np.zeros(STATE_DIM, np.float32),
        "task": "reach-v3",
    }
    history = {"image": np.stack([obs["image"]] * cfg["n_obs_steps"]), "task": "reach-v3"}
    policy.reset(3)
    first = policy.latent_source(history)
    assert tuple(first.shape) == (4, cfg["latent_dim"])
    policy.reset(3)
    assert torch.equal(first, policy.latent_source(history))  # the latent noise is reseeded per episode
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--policy",
                str(dec),
                "--tasks",
                "reach-v3",
                "--episodes",
                "1",
                "--max-steps",
                "4",
                "--resolution",
                str(SIZE),
                "--action-steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["latency"]["calls"] == 2 and results["overall"]["mean_length"] == 4
    # the world model the decoder was trained with is gone: a clear error before any rollout
    shutil.rmtree(wm)
    assert (
        main(
            [
                "eval",
                "--policy",
                str(dec),
                "--tasks",
                "reach-v3",
                "--episodes",
                "1",
                "--resolution",
                str(SIZE),
                "--out",
                str(tmp_path / "e2"),
            ]
        )
        == 2
    )
    assert "not there" in capsys.readouterr().err
