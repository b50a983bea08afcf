"""The policy contract (chunk queue, ensembling) and `wm eval` on the real simulator (reach-v3, 64 px)."""

import json

import av
import numpy as np
import pytest

from wm_pipeline.cli.main import main
from wm_pipeline.exit_codes import UsageError
from wm_pipeline.jobs import closed_loop_eval as ev
from wm_pipeline.jobs.policy import ChunkedPolicy, ExpertPolicy, RandomPolicy


class CountingChunks(ChunkedPolicy):
    """Chunk k holds actions [k*100 + j for j in range(H)], so the executed action tells which
    chunk and which position it came from."""

    action_dim = 1

    def __init__(self, horizon=6, **kw):
        self.horizon, self.calls, self.histories = horizon, 0, []
        super().__init__(**kw)

    def predict_chunk(self, obs_history):
        self.histories.append(obs_history["state"].copy())
        chunk = self.calls * 100 + np.arange(self.horizon, dtype=np.float32)[:, None]
        self.calls += 1
        return chunk


def _obs(t):
    return {"image": np.zeros((4, 4, 3), np.uint8), "state": np.array([t], np.float32), "task": "t"}


def test_chunk_queue_executes_n_of_h_and_keeps_history():
    p = CountingChunks(horizon=6, n_obs_steps=2, n_action_steps=4)
    actions = [float(p.act(_obs(t))[0]) for t in range(9)]
    assert actions == [0, 1, 2, 3, 100, 101, 102, 103, 200]
    assert p.calls == 3 and len(p.latencies) == 3 and all(x >= 0 for x in p.latencies)
    # first history repeats the first observation; later ones end with the current one
    assert p.histories[0].ravel().tolist() == [0, 0]
    assert p.histories[1].ravel().tolist() == [3, 4]
    p.reset(seed=7)
    assert float(p.act(_obs(0))[0]) == 300 and p.episode_seed == 7  # queue cleared on reset


def test_temporal_ensemble_averages_overlapping_chunks():
    k = 0.5
    p = CountingChunks(horizon=3, n_action_steps=1, temporal_ensemble=k)
    a0, a1, a2, a3 = (float(p.act(_obs(t))[0]) for t in range(4))
    w = np.exp(-k * np.arange(3))
    assert a0 == pytest.approx(0.0)
    assert a1 == pytest.approx((w[0] * 1 + w[1] * 100) / w[:2].sum())  # chunk 0 pos 1, chunk 1 pos 0
    assert a2 == pytest.approx((w[0] * 2 + w[1] * 101 + w[2] * 200) / w.sum())
    assert a3 == pytest.approx((w[0] * 102 + w[1] * 201 + w[2] * 300) / w.sum())  # chunk 0 has expired
    assert p.calls == 4


def test_load_policy_registry_and_compatibility_checks(tmp_path):
    info = ev.env_info("metaworld", resolution=64)
    assert isinstance(ev.load_policy("expert", info), ExpertPolicy)
    assert isinstance(ev.load_policy("random", info), RandomPolicy)
    with pytest.raises(UsageError, match="no/such/run"):
        ev.load_policy("no/such/run", info)

    def loader(spec, env_info):
        return RandomPolicy(action_dim=env_info["action_dim"]) if spec == "my-run" else None

    ev.register_policy_loader(loader)
    try:
        assert isinstance(ev.load_policy("my-run", info), RandomPolicy)
    finally:
        ev._LOADERS.remove(loader)
    with pytest.raises(UsageError, match="7-dim actions.*4-dim"):
        ev.evaluate(RandomPolicy(action_dim=7), ["reach-v3"], episodes=1, seed=0, out_dir=tmp_path)
    wide = RandomPolicy()
    wide.image_size = (96, 96)
    with pytest.raises(UsageError, match="96x96.*64x64"):
        ev.evaluate(wide, ["reach-v3"], episodes=1, seed=0, out_dir=tmp_path, resolution=64)
    assert not (tmp_path / "results.json").exists()  # failed before any rollout


def test_eval_expert_succeeds_and_writes_results_and_videos(tmp_path, capsys):
    rc = main(
        [
            "eval",
            "--policy",
            "expert",
            "--env",
            "metaworld",
            "--tasks",
            "reach-v3",
            "--episodes",
            "3",
            "--seed",
            "0",
            "--out",
            str(tmp_path),
            "--video",
            "--resolution",
            "64",
        ]
    )
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("policy", "env", "seed", "episodes_per_task", "tasks", "overall", "latency", "episodes", "fps"):
        assert key in results
    task = results["tasks"]["reach-v3"]
    assert task["episodes"] == 3 and task["successes"] == 3 and task["success_rate"] == 1.0
    assert 0 < task["mean_length"] < 200  # episodes stop at the first success
    assert [e["seed"] for e in results["episodes"]] == [100_000, 100_001, 100_002]  # never demo seeds 0..
    table = capsys.readouterr().out
    assert "reach-v3" in table and "3/3" in table
    ep = results["episodes"][0]
    with av.open(str(tmp_path / ep["video"])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    # rollout videos at a watchable 256 px (--video-size), apart from the policy's 64 px images
    assert len(frames) == ep["length"] + 1 and frames[0].shape == (256, 256, 3)


def test_eval_random_is_worse_than_expert(tmp_path):
    results = ev.evaluate(RandomPolicy(), ["reach-v3"], episodes=3, seed=0, out_dir=tmp_path, max_steps=40)
    assert results["tasks"]["reach-v3"]["success_rate"] < 1.0
    assert results["latency"] is None  # not a chunked policy


class ChunkedExpert(ChunkedPolicy):
    """The scripted expert's action for the current state, held for a whole chunk, plus noise drawn
    from the episode seed: exercises the queue, latency and seeded determinism in closed loop."""

    action_dim = 4

    def __init__(self):
        self.expert = ExpertPolicy()
        super().__init__(n_obs_steps=2, n_action_steps=2)

    def predict_chunk(self, obs_history):
        obs = {"state": obs_history["state"][-1], "task": obs_history["task"]}
        rng = np.random.default_rng([self.episode_seed, len(self.latencies)])
        return np.repeat(self.expert.act(obs)[None], 4, axis=0) + rng.normal(0, 0.05, (4, 4))


def test_eval_chunked_policy_is_deterministic_and_reports_latency(tmp_path):
    runs = [ev.evaluate(ChunkedExpert(), ["reach-v3"], episodes=2, seed=1, out_dir=tmp_path / str(i)) for i in range(2)]
    assert runs[0]["episodes"] == runs[1]["episodes"]
    assert runs[0]["tasks"]["reach-v3"]["success_rate"] == 1.0
    lat = runs[0]["latency"]
    lengths = [e["length"] for e in runs[0]["episodes"]]
    assert lat["calls"] == sum((n + 1) // 2 for n in lengths)  # one model call per 2 executed actions
    assert 0 <= lat["median_ms"] <= lat["p95_ms"]
    assert runs[0]["tasks"]["reach-v3"]["latency"]["calls"] == lat["calls"]


def test_eval_unknown_task_and_policy_exit_2(tmp_path, capsys):
    assert main(["eval", "--policy", "expert", "--tasks", "reach-v9", "--episodes", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "reach-v9" in err and "reach-v3" in err and "Traceback" not in err
    assert (
        main(
            [
                "eval",
                "--policy",
                str(tmp_path / "run"),
                "--tasks",
                "reach-v3",
                "--episodes",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "cannot load policy" in capsys.readouterr().err
