"""``scripts/oracle_labels.py``: the true actions of a dataset become the IDM sidecar of its action-free twin,
and the decoder's idm-bc stream then trains on exactly those actions; a twin that is not the same
episodes is refused, naming the sample. ``scripts/label_error.py`` scores another sidecar against them:
zero error for the truth itself, the known error of labels with a known offset, per dim, phase and outcome.
``scripts/ensemble_labels.py`` averages several sidecars: the known mean and spread, valid where all are."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.format import read_manifest
from shards.sidecar import read_labeller_info, read_sidecar, write_sidecar_shard
from shards.stream import WindowStream, collate_windows
from shards.writer import Episode, run_sharded_job
from wm_pipeline.recipes.decoder import idm_targets
from wm_pipeline.sim.metaworld_env import ACTION_DIM, EMBODIMENT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import ensemble_labels  # noqa: E402
import label_error  # noqa: E402
import oracle_labels  # noqa: E402

N = 12


def _episode(i: int, with_action: bool, n: int = N, success: bool | None = None) -> list[Episode]:
    rng = np.random.default_rng(i)
    frames = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    action = rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32)
    kw = {"action": action, "success": True} if with_action else {}
    if success is not None:
        kw["success"] = success
    return [
        Episode(key=f"ep{i:02d}", frames={"corner": frames}, fps=10.0, embodiment=EMBODIMENT, task="reach-v3", **kw)
    ]


def _make(root: Path, make) -> Path:
    result = run_sharded_job(root, list(range(3)), make, samples_per_shard=2, workers=1, created_by="tests")
    assert result.exit_code == 0, result.failures
    return root


def _with_actions(i):
    return _episode(i, True)


def _action_free(i):
    return _episode(i, False)


def _action_free_with_outcome(i):  # as `wm collect --drop-actions` writes: the outcome kept; episode 2 failed
    return _episode(i, False, success=i != 2)


def _shorter(i):
    return _episode(i, False, n=N - 2 if i == 1 else N)


def test_oracle_labels_are_the_true_actions_and_idm_bc_trains_on_them(tmp_path):
    truth, video = _make(tmp_path / "truth", _with_actions), _make(tmp_path / "video", _action_free)
    assert oracle_labels.main(["--actions", str(truth), "--video", str(video), "--name", "oracle"]) == 0
    assert read_labeller_info(video, "oracle")["kind"] == "oracle"
    for shard in read_manifest(video)["shards"]:
        rows = read_sidecar(video, "oracle", shard["name"])
        assert sorted(rows) == sorted(shard["keys"])
        for key, row in rows.items():
            (ep,) = _episode(int(key[2:]), True)
            np.testing.assert_array_equal(row["pseudo_action"], ep.action)
            assert row["valid"].tolist() == [True] * (N - 1) + [False]  # no next frame after the last
    # the idm-bc stream over demos + video: every window that trains has its episode's true actions,
    # and the video's whole-valid windows (all but those that reach the last frame) are among them
    stream = WindowStream([truth, video], window=4, mode="label", labels=["oracle"], optional_labels=True)
    batch = collate_windows(list(stream))
    demo_windows = int(batch["action_mask"].sum())
    out = idm_targets(dict(batch), EMBODIMENT, ACTION_DIM, "oracle")
    video_windows = int((batch["oracle.present"] & batch["oracle.valid"].all(1)).sum())
    assert video_windows > 0 and int(out["action_mask"].sum()) == demo_windows + video_windows
    for j, (key, start) in enumerate(zip(batch["key"], batch["start"].tolist())):
        if out["action_mask"][j]:
            (ep,) = _episode(int(key[2:]), True)
            torch.testing.assert_close(out["action"][j], torch.from_numpy(ep.action[start : start + 4]))


def test_oracle_labels_refuse_a_twin_of_other_episodes(tmp_path):
    truth, video = _make(tmp_path / "truth", _with_actions), _make(tmp_path / "video", _shorter)
    with pytest.raises(SystemExit, match=r"ep01.*12 frames.*10"):
        oracle_labels.main(["--actions", str(truth), "--video", str(video)])
    assert not (video / "labels" / "oracle").exists() or not any((video / "labels" / "oracle").glob("*.tar"))


def test_label_error_scores_labels_against_the_oracle_per_dim_task_phase_and_outcome(tmp_path, capsys):
    truth, video = _make(tmp_path / "truth", _with_actions), _make(tmp_path / "video", _action_free_with_outcome)
    oracle_labels.main(["--actions", str(truth), "--video", str(video)])
    exact = label_error.label_error(video, "oracle", "oracle")
    assert exact["total"]["mse"] == 0 and exact["total"]["r2"] == pytest.approx(1.0)
    offset = np.zeros(ACTION_DIM, np.float32)
    offset[0] = 0.5  # x off by 0.5 in the second half of every episode only
    for shard in read_manifest(video)["shards"]:
        rows = read_sidecar(video, "oracle", shard["name"])
        for row in rows.values():
            row["pseudo_action"][N // 2 :] += offset
        write_sidecar_shard(video, "shifted", shard["name"], rows)
    assert label_error.main(["--data", str(video), "--labels", "shifted", "--phases", "2"]) == 0
    out = label_error.label_error(video, "shifted", "oracle", phases=2)
    assert out["total"]["rows"] == 3 * (N - 1)  # the last frame of each episode has no label
    first, second = out["per_phase"]
    assert first["mse"] == 0 and second["mse_per_dim"][0] == pytest.approx(0.25)
    assert second["mse_per_dim"][1:] == [0.0] * (ACTION_DIM - 1) and out["total"]["r2_per_dim"][0] < 1
    assert list(out["per_task"]) == ["reach-v3"]
    assert "phase 1/2" in capsys.readouterr().out
    # outcome groups (mse_per_dim has 5 digits): rows 0..N-2 are labelled, x is off from row N // 2 on;
    # episodes 0 and 1 succeeded, 2 failed
    by_outcome = label_error.label_error(video, "shifted", "oracle", tail=3)["per_outcome"]
    tail, before, failed = by_outcome["success, last 3"], by_outcome["success, before"], by_outcome["failed"]
    assert (tail["rows"], before["rows"], failed["rows"]) == (2 * 3, 2 * (N - 4), N - 1)
    assert tail["mse_per_dim"][0] == pytest.approx(0.25, abs=1e-5)  # all three tail rows are in the shifted half
    assert before["mse_per_dim"][0] == pytest.approx(0.25 * (N - 4 - N // 2) / (N - 4), abs=1e-5)
    assert failed["mse_per_dim"][0] == pytest.approx(0.25 * (N - 1 - N // 2) / (N - 1), abs=1e-5)


def test_ensemble_labels_average_the_members_and_keep_rows_every_member_labelled(tmp_path, capsys):
    truth, video = _make(tmp_path / "truth", _with_actions), _make(tmp_path / "video", _action_free)
    oracle_labels.main(["--actions", str(truth), "--video", str(video)])
    shards = read_manifest(video)["shards"]
    for name, off in (("a", 0.1), ("b", -0.3)):  # two labellers, each off by a constant
        for shard in shards:
            rows = read_sidecar(video, "oracle", shard["name"])
            for key, row in rows.items():
                row["pseudo_action"] += off
                if name == "b" and key == "ep01":
                    row["valid"][3] = False  # one row only member b could not read
            failures = [{"key": "ep02", "reason": "test"}] if name == "b" and "ep02" in rows else []
            rows = {k: v for k, v in rows.items() if not (failures and k == "ep02")}
            write_sidecar_shard(video, name, shard["name"], rows, failures)
    with pytest.raises(SystemExit, match="needs >= 2"):
        ensemble_labels.main(["--data", str(video), "--labels", "a", "--name", "ens"])
    assert ensemble_labels.main(["--data", str(video), "--labels", "a,b", "--name", "ens"]) == 0
    assert "1 not labelled by every member" in capsys.readouterr().out
    assert read_labeller_info(video, "ens") == {"kind": "ensemble", "members": ["a", "b"], "reduce": "mean"}
    rows = {k: v for s in shards for k, v in read_sidecar(video, "ens", s["name"]).items()}
    assert sorted(rows) == ["ep00", "ep01"]  # ep02: member b failed it
    for key, row in rows.items():
        (ep,) = _episode(int(key[2:]), True)
        np.testing.assert_allclose(row["pseudo_action"], ep.action - 0.1, atol=1e-6)
        np.testing.assert_allclose(row["spread"], 0.2, atol=1e-6)  # std of +0.1 and -0.3
        want = [True] * (N - 1) + [False]
        if key == "ep01":
            want[3] = False
        assert row["valid"].tolist() == want
    # the error against the truth is the mean's: 0.1 in every dim
    assert label_error.label_error(video, "ens", "oracle")["total"]["mse"] == pytest.approx(0.01, abs=1e-6)
    # and the decoder's idm-bc stream reads it like any IDM sidecar
    stream = WindowStream([truth, video], window=4, mode="label", labels=["ens"], optional_labels=True)
    batch = collate_windows(list(stream))
    out = idm_targets(dict(batch), EMBODIMENT, ACTION_DIM, "ens")
    video_windows = int((batch["ens.present"] & batch["ens.valid"].all(1)).sum())
    assert video_windows > 0 and int(out["action_mask"].sum()) == int(batch["action_mask"].sum()) + video_windows


def test_ensemble_labels_keep_marks_the_rows_the_members_disagree_on_most_not_valid(tmp_path, capsys):
    truth, video = _make(tmp_path / "truth", _with_actions), _make(tmp_path / "video", _action_free)
    oracle_labels.main(["--actions", str(truth), "--video", str(video)])
    shards = read_manifest(video)["shards"]
    for name, sign in (("a", 1.0), ("b", -1.0)):  # row r: the members are +-0.01 * r off, spread 0.01 * r
        for shard in shards:
            rows = read_sidecar(video, "oracle", shard["name"])
            for row in rows.values():
                row["pseudo_action"] += sign * 0.01 * np.arange(N, dtype=np.float32)[:, None]
            write_sidecar_shard(video, name, shard["name"], rows, [])
    with pytest.raises(SystemExit, match="a fraction in"):
        ensemble_labels.main(["--data", str(video), "--labels", "a,b", "--name", "ens", "--keep", "0"])
    assert ensemble_labels.main(["--data", str(video), "--labels", "a,b", "--name", "ens", "--keep", "0.45"]) == 0
    assert "marked not valid (--keep 0.45)" in capsys.readouterr().out
    info = read_labeller_info(video, "ens")
    # 3 episodes x rows 0-10 valid: the 0.45-quantile lies 0.4 of the way from row 4's 0.04 to row 5's 0.05
    assert info["keep"] == 0.45 and info["max_spread"] == pytest.approx(0.044, abs=1e-5)
    for shard in shards:
        for row in read_sidecar(video, "ens", shard["name"]).values():
            np.testing.assert_allclose(row["spread"], 0.01 * np.arange(N), atol=1e-6)
            # rows 0-4 agree most; rows 5-10 are past the threshold, row 11 had no label already
            assert row["valid"].tolist() == [True] * 5 + [False] * (N - 5)
