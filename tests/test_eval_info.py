"""`wm eval`'s results.json: LeRobot's eval_info fields beside ours, on the real simulator (reach-v3)."""

import json

import numpy as np

from wm_pipeline.cli.main import main
from wm_pipeline.jobs import closed_loop_eval as ev
from wm_pipeline.jobs.policy import RandomPolicy


def test_results_hold_lerobot_eval_info_fields(tmp_path):
    assert (
        main(
            [
                "eval",
                "--policy",
                "expert",
                "--tasks",
                "reach-v3",
                "--episodes",
                "2",
                "--seed",
                "3",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "results.json").read_text())
    task = results["tasks"]["reach-v3"]
    rows = task["per_episode"]
    assert [r["episode_ix"] for r in rows] == [0, 1] and [r["seed"] for r in rows] == [100_003, 100_004]
    assert all(r["success"] is True for r in rows)
    for r in rows:
        assert set(r) == {"episode_ix", "sum_reward", "max_reward", "success", "seed"}
        assert 0 < r["max_reward"] <= r["sum_reward"]  # Meta-World rewards are positive, up to 10
    agg = task["aggregated"]
    assert agg["pc_success"] == 100.0 and agg["n_episodes"] == 2
    assert np.isclose(agg["avg_sum_reward"], np.mean([r["sum_reward"] for r in rows]))
    assert np.isclose(agg["avg_max_reward"], np.mean([r["max_reward"] for r in rows]))
    assert agg["eval_s"] > 0 and np.isclose(agg["eval_ep_s"], agg["eval_s"] / 2, atol=1e-3)
    overall = results["overall"]
    assert overall["pc_success"] == 100.0 and overall["success_rate"] == 1.0  # ours kept beside LeRobot's
    assert overall["avg_sum_reward"] == agg["avg_sum_reward"] and overall["eval_s"] >= agg["eval_s"]
    # our own episode rows carry the same rewards
    assert [e["sum_reward"] for e in results["episodes"]] == [r["sum_reward"] for r in rows]


def test_pc_success_counts_failures(tmp_path):
    results = ev.evaluate(RandomPolicy(), ["reach-v3"], episodes=2, seed=0, out_dir=tmp_path, max_steps=5)
    task = results["tasks"]["reach-v3"]
    assert task["aggregated"]["pc_success"] == 100.0 * task["success_rate"]
    assert all(r["max_reward"] <= r["sum_reward"] for r in task["per_episode"])


def test_videos_are_rendered_at_video_size_apart_from_the_policy_images(tmp_path):
    import av

    rc = main(
        [
            "eval",
            "--policy",
            "expert",
            "--tasks",
            "reach-v3",
            "--episodes",
            "1",
            "--seed",
            "0",
            "--out",
            str(tmp_path / "v"),
            "--video",
            "--resolution",
            "32",
            "--video-size",
            "128",
        ]
    )
    assert rc == 0
    with_video = json.loads((tmp_path / "v" / "results.json").read_text())
    ep = with_video["episodes"][0]
    with av.open(str(tmp_path / "v" / ep["video"])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == ep["length"] + 1 and frames[0].shape == (128, 128, 3)
    assert with_video["video_size"] == 128 and with_video["resolution"] == 32
    # the policy saw the same 32 px episode: same outcome and rewards as without --video
    plain = ev.evaluate(ev.load_policy("expert", ev.env_info()), ["reach-v3"], episodes=1, seed=0, resolution=32)
    assert plain["episodes"][0]["length"] == ep["length"] and plain["episodes"][0]["sum_reward"] == ep["sum_reward"]
    assert plain["video_size"] is None
