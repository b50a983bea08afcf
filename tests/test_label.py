"""`wm label`: LAM / IDM runs trained here label real encoded videos into sidecar shards.

Covers: sidecar keys equal video keys, rows equal the model's own output on the episode (windows
overlapped correctly, edges masked), kill -9 + resume gives byte-identical sidecars, `--shards i/N`
ranges are disjoint and cover everything (also under torchrun), misfitting labellers fail before
any work, an undecodable shard becomes failure rows, and the stream joins the sidecars by key.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # 2 shared cores: one thread is ~25x faster than two fighting other jobs

from in_process import wm_here
from shards.format import read_manifest
from shards.sidecar import read_labeller_info, read_sidecar, read_sidecar_stats, sidecar_dir
from shards.stream import WindowStream, collate_windows, iter_samples
from shards.writer import Episode, run_sharded_job
from wm_pipeline.cli.main import main
from wm_pipeline.jobs.labelling import label_episodes, load_labeller, shard_range

LENGTHS = [14, 9, 21, 3, 17, 12, 25, 10]  # frames; one shorter than the LAM's frame gap + 1 window
WM = [sys.executable, "-m", "wm_pipeline"]


def _episode(i: int, size: int = 32, camera: str = "front", fps: float = 10.0, n: int | None = None) -> list[Episode]:
    """A square moving by its action (velocity in px/frame), on a background that differs per episode."""
    n = n or LENGTHS[i]
    rng = np.random.default_rng(i)
    action = rng.integers(-2, 3, (n, 2)).astype(np.float32)
    pos = np.clip(np.cumsum(np.vstack([[size // 2 - 3, size // 2 - 3], action[:-1]]), 0), 0, size - 6).astype(int)
    frames = np.full((n, size, size, 3), 30 + 20 * (i % 5), np.uint8)
    for t, (y, x) in enumerate(pos):
        frames[t, y : y + 6, x : x + 6] = (230, 200, 40)
    return [
        Episode(
            key=f"ep{i:02d}", frames={camera: frames}, fps=fps, embodiment="toybot", task=f"task{i % 2}", action=action
        )
    ]


def _make(root: Path, make, n: int, per_shard: int = 1) -> Path:
    result = run_sharded_job(
        root, list(range(n)), make, samples_per_shard=per_shard, workers=1, created_by="tests", desc="data"
    )
    assert result.exit_code == 0, result.failures
    return root


def _wm(capsys, *args: str) -> subprocess.CompletedProcess:
    """`wm ARGS` by the same main() in this process (the killed run above is the real process)."""
    code, out, err = wm_here(capsys, *args)
    return subprocess.CompletedProcess(list(args), code, out, err)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    data = _make(root / "data", _episode, len(LENGTHS))
    for model, extra in (("lam", ["model.frame_gap=2"]), ("idm", ["data.window=6"])):
        code = main(
            [
                "train",
                model,
                "--data",
                str(data),
                "--out",
                str(root / model),
                "--preset",
                "tiny",
                "train.max_steps=3",
                "train.ckpt_every=3",
                "train.progress=false",
                *extra,
            ]
        )
        assert code == 0
    assert (
        main(["label", "--labeller", str(root / "lam"), "--data", str(data), "--batch-size", "4", "--no-progress"]) == 0
    )
    assert (
        main(["label", "--labeller", str(root / "idm"), "--data", str(data), "--batch-size", "4", "--no-progress"]) == 0
    )
    return root, data


def _episodes(data: Path) -> dict[str, torch.Tensor]:
    return {s.key: s.frames for s in iter_samples(data, split=False)}


def test_sidecar_keys_equal_video_keys_and_lam_rows_are_the_models(setup):
    root, data = setup
    spec, lab = load_labeller(root / "lam")
    k, frames = lab.tail, _episodes(data)
    info = read_labeller_info(data, "lam")
    assert info["kind"] == "lam" and info["checkpoint"] == str((root / "lam" / "final").resolve())
    assert info["config"]["frame_gap"] == 2 and len(info["checkpoint_sha256"]) == 64
    for entry in read_manifest(data)["shards"]:
        rows = read_sidecar(data, "lam", entry["name"])
        assert sorted(rows) == sorted(entry["keys"])
        for key, r in rows.items():
            n = frames[key].shape[0]
            assert set(r) == {"latent", "codes", "valid"}
            assert r["latent"].shape == (n, lab.model.config.action_dim) and r["latent"].dtype == np.float32
            assert r["codes"].shape == (n, lab.model.config.n_tokens) and r["codes"].dtype == np.int64
            assert r["valid"].tolist() == [True] * max(n - k, 0) + [False] * min(k, n)
            if n > k:  # the whole episode in one pass: row t is the transition t -> t + k
                ref = lab.model.encode_latent_actions(frames[key][None])
                np.testing.assert_allclose(r["latent"][: n - k], ref["latent"][0].numpy(), atol=1e-5)
                assert (r["codes"][: n - k] == ref["codes"][0].numpy()).all()
            assert not r["latent"][~r["valid"]].any()


def test_idm_rows_come_from_windows_where_the_step_is_not_last(setup):
    root, data = setup
    spec, lab = load_labeller(root / "idm")
    t = lab.window
    for key, frames in _episodes(data).items():
        r = read_sidecar(data, "idm", f"shard-{int(key[2:]):06d}.tar")[key]
        n = frames.shape[0]
        assert r["pseudo_action"].shape == (n, 2) and r["valid"].tolist() == [True] * (n - 1) + [False]
        w = min(t, n)
        windows = frames.unfold(0, w, 1).permute(0, 4, 1, 2, 3)  # every window [S, w, C, H, W]
        pred = lab.model.predict_actions(windows, "toybot").numpy()  # [S, w, A]
        for step in range(n - 1):  # some window holds the step at a non-last position with this output
            cands = [pred[s, step - s] for s in range(max(0, step - w + 2), min(step, n - w) + 1)]
            assert min(np.abs(c - r["pseudo_action"][step]).max() for c in cands) < 1e-4


def test_kill_9_then_resume_gives_identical_sidecars(setup, capsys):
    root, data = setup
    args = [
        "label",
        "--labeller",
        str(root / "lam"),
        "--data",
        str(data),
        "--name",
        "resumed",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        [*WM, *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    out = sidecar_dir(data, "resumed")
    deadline = time.time() + 600  # the first shard's own start-up: a minute or more on a loaded machine
    while not list(out.glob("*.stats.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*.stats.json")))
    assert 1 <= done < len(LENGTHS), f"kill landed after {done} of {len(LENGTHS)} shards"
    r = _wm(capsys, *args)
    assert r.returncode == 0, r.stderr
    assert f"labelling {len(LENGTHS) - done} of {len(LENGTHS)} shards" in r.stderr
    for entry in read_manifest(data)["shards"]:
        name = entry["name"]
        assert (out / name).read_bytes() == (sidecar_dir(data, "lam") / name).read_bytes()
        a, b = read_sidecar_stats(data, "resumed", name), read_sidecar_stats(data, "lam", name)
        assert {**a, "labeller": ""} == {**b, "labeller": ""}


def test_shard_ranges_are_disjoint_and_cover(setup, tmp_path):
    for n in range(0, 23):
        for parts in (1, 2, 3, 5, 8):
            for world in (1, 2, 3):
                got = [s for i in range(parts) for r in range(world) for s in shard_range(n, (i, parts), r, world)]
                assert sorted(got) == list(range(n))
                firsts = [shard_range(n, (i, parts)) for i in range(parts)]
                assert all(f == sorted(f) for f in firsts)  # contiguous ranges, in order
    root, data = setup
    out, seen = sidecar_dir(data, "parts"), set()
    for i in range(3):
        assert (
            main(
                [
                    "label",
                    "--labeller",
                    str(root / "lam"),
                    "--data",
                    str(data),
                    "--name",
                    "parts",
                    "--shards",
                    f"{i}/3",
                    "--batch-size",
                    "4",
                    "--no-progress",
                ]
            )
            == 0
        )
        now = {p.name for p in out.glob("*.stats.json")}
        new = now - seen
        assert new and not (new & seen)
        assert sorted(new) == [f"shard-{j:06d}.stats.json" for j in shard_range(len(LENGTHS), (i, 3))]
        seen = now
    assert len(seen) == len(LENGTHS)
    assert main(["label", "--labeller", str(root / "lam"), "--data", str(data), "--shards", "3/3"]) == 2


def test_torchrun_ranks_take_their_own_shards(setup):
    root, data = setup
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "wm_pipeline",
            "label",
            "--labeller",
            str(root / "lam"),
            "--data",
            str(data),
            "--name",
            "ranks",
            "--batch-size",
            "4",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for entry in read_manifest(data)["shards"]:  # every shard once, same bytes as one process
        name = entry["name"]
        assert (sidecar_dir(data, "ranks") / name).read_bytes() == (sidecar_dir(data, "lam") / name).read_bytes()
    assert f"labelled {len(LENGTHS)} clips" in r.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        ({"camera": "side"}, "trained on camera 'front' but"),
        ({"size": 48}, "takes 32x32 frames (trained without resize) but"),
        ({"fps": 25.0}, "trained on [10.0] fps video"),
    ],
)
def test_misfit_labeller_fails_before_any_work(setup, tmp_path, capsys, change, message):
    root, _ = setup
    data = _make(
        tmp_path / "other",
        lambda i: _episode(i, change.get("size", 32), change.get("camera", "front"), change.get("fps", 10.0), n=8),
        1,
    )
    r = _wm(capsys, "label", "--labeller", str(root / "lam"), "--data", str(data))
    assert r.returncode == 2 and message in r.stderr and str(data) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (data / "labels").exists()


def test_undecodable_shard_is_recorded_and_skipped_by_the_stream(setup, tmp_path):
    root, data = setup
    broken = tmp_path / "broken"
    shutil.copytree(data, broken, ignore=shutil.ignore_patterns("labels"))
    tar = broken / "shard-000002.tar"
    raw = tar.read_bytes()
    i = raw.index(b"front.mp4") + 1024  # inside the mp4: keep the tar readable, break the video
    tar.write_bytes(raw[:i] + bytes(len(raw) - i - 1024) + raw[-1024:])
    assert main(["label", "--labeller", str(root / "lam"), "--data", str(broken), "--no-progress"]) == 3
    stats = read_sidecar_stats(broken, "lam", "shard-000002.tar")
    assert [f["key"] for f in stats["failures"]] == ["ep02"] and stats["samples"] == 0
    keys = {w["key"] for w in WindowStream(broken, window=3, mode="label", labels=["lam"])}
    assert keys == {f"ep{i:02d}" for i in range(len(LENGTHS)) if i != 2 and LENGTHS[i] >= 3}


def test_stream_joins_sidecars_by_key(setup):
    root, data = setup
    sidecars = {}
    for entry in read_manifest(data)["shards"]:
        for name in ("lam", "idm"):
            for key, r in read_sidecar(data, name, entry["name"]).items():
                sidecars[(name, key)] = r
    batches = torch.utils.data.DataLoader(
        WindowStream(data, window=3, mode="label", labels=["lam", "idm"]), batch_size=4, collate_fn=collate_windows
    )
    n = 0
    for batch in batches:
        for j, (key, start) in enumerate(zip(batch["key"], batch["start"].tolist())):
            for field, name in (("latent", "lam"), ("valid", "lam"), ("pseudo_action", "idm")):
                want = sidecars[(name, key)][field][start : start + 3]
                assert np.array_equal(batch[f"{name}.{field}"][j].numpy(), want)
            n += 1
    assert n > len(LENGTHS)


def test_label_episodes_with_stride_labels_each_phase(setup):
    root, data = setup
    spec, lab = load_labeller(root / "lam")
    lab.stride = 2
    frames = _episodes(data)["ep02"]  # 21 frames
    r = label_episodes(spec, lab, [(frames, "toybot")], batch_size=3)[0]
    gap = lab.tail * 2
    assert r["valid"].tolist() == [True] * (21 - gap) + [False] * gap
    for p in (0, 1):
        ref = lab.model.encode_latent_actions(frames[p::2][None])["latent"][0].numpy()
        np.testing.assert_allclose(r["latent"][p : 21 - gap : 2], ref, atol=1e-5)


def test_a_registered_labeller_kind_runs_through_the_same_job(setup, tmp_path):
    """The hook another package uses (e.g. frozen VAE latents): a per-frame kind, detected by config.json."""
    import json

    from safetensors.torch import save_file

    from wm_pipeline.jobs.labelling import Labeller, register_labeller

    root, data = setup
    folder = tmp_path / "frame_mean"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"labeller_kind": "frame_mean"}))
    save_file({"unused": torch.zeros(1)}, str(folder / "model.safetensors"))

    def load(path, run_config):
        return Labeller(
            kind="frame_mean",
            model=torch.nn.Identity(),
            folder=path,
            window=5,
            tail=0,
            fields={"mean": ((3,), "float32")},
            image_size=(32, 32),
        )

    register_labeller("frame_mean", load, lambda lab, frames, embs: {"mean": frames.float().mean((-1, -2))})
    assert main(["label", "--labeller", str(folder), "--data", str(data), "--no-progress"]) == 0
    frames = _episodes(data)
    for entry in read_manifest(data)["shards"]:
        for key, r in read_sidecar(data, "frame_mean", entry["name"]).items():
            assert r["valid"].all()
            np.testing.assert_allclose(r["mean"], frames[key].float().mean((-1, -2)).numpy(), rtol=1e-6)
