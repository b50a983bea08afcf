"""Clear errors everywhere (issue 16, point 4), with real `wm` processes and real files.

- a full disk during `wm ingest` and `wm collect` (a real small tmpfs where this process may mount one; everywhere a
  real per-process file-size limit, RLIMIT_FSIZE, which makes the kernel refuse the write with EFBIG):
  exit 74, one line naming the shard and the room needed, no partial file left, the rerun after making
  room gives the same samples as a run that never failed;
- `wm train` on a disk that refuses the checkpoint: exit 74, one line with the room a checkpoint needs;
  on a disk full from the start (logs, config): one line naming the file, status.json still `failed`;
- a binary `--config`, `data.resize=[0,0]`, `model.horizon=0`: exit 2, one line, the run folder not
  created (and an existing run left byte for byte as it was);
- `--init` that does not exist, or that the recipe does not use: exit 2, one line;
- SIGUSR1 the moment the handler exists (before torch is imported): a checkpoint and exit 75, and the
  rerun finishes;
- an MKV with a corrupt cluster: the gap is a failure row, no stored clip holds frozen frames;
- `wm inspect DIR | head`: stdout closed by the reader -> exit 141, nothing on stderr.
"""

from __future__ import annotations

import io
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

import toy_models
from in_process import wm_here
from test_ingest_videos import gray_ramp, read_samples, write_video
from wm_pipeline import exit_codes
from wm_pipeline.cli.main import main

TRAIN_ARGS = ("--preset", "tiny", "train.max_steps=20", "train.ckpt_every=10", "train.progress=false")
VIDEO_ARGS = ("--resolution", "32", "--fps", "15", "--clip-seconds", "0.5", "--samples-per-shard", "1")


def wm(*args: str, env: dict | None = None, file_size_limit: int | None = None, timeout: float = 300):
    """Run `wm ARGS` as a real process; ``file_size_limit``: the kernel refuses larger files (EFBIG)."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write(), not a killing signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    proc = subprocess.run(
        [sys.executable, "-m", "wm_pipeline", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or toy_models.plugin_env(),
        preexec_fn=limit if file_size_limit else None,
    )
    return proc.returncode, proc.stdout, proc.stderr


def error_lines(err: str, command: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"wm {command}: error:")]


def leftovers(folder: Path) -> list[str]:
    """Half-written or lock files a job must not leave behind."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name == ".lock")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return toy_models.make_dataset(tmp_path_factory.mktemp("toy") / "data")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Six 2 s noise videos (noise: shards of a known, incompressible size) and a clean ingest of them."""
    root = tmp_path_factory.mktemp("videos")
    src = _mkdir(root / "src")
    rng = np.random.default_rng(0)
    for i in range(6):
        write_video(src / f"v{i}.mp4", rng.integers(0, 255, (30, 64, 64, 3), dtype=np.uint8), 15)
    ref = root / "ref"
    code, out, err = wm("ingest", "videos", str(root / "src"), "--out", str(ref), *VIDEO_ARGS)
    assert code == 0, err
    return src, ref


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- a full disk


def test_ingest_on_a_full_tmpfs_stops_with_one_line_and_resumes(videos, small_tmpfs):
    src, ref = videos
    shard = (ref / "shard-000000.tar").stat().st_size
    out = small_tmpfs(3 * shard + shard // 2 + 16 * 1024) / "out"  # three shards and a half fit
    code, _, err = wm("ingest", "videos", str(src), "--out", str(out), *VIDEO_ARGS, "--workers", "2")
    assert code == exit_codes.WRITE_FAILED == 74, err
    assert "Traceback" not in err
    (line,) = error_lines(err, "ingest")
    assert "No space left on device" in line and "shard-00000" in line and "removed the partial" in line, line
    assert "needs about" in line and "free there" in line and "rerun" in line, line
    assert leftovers(out) == [] and not (out / "manifest.json").exists()
    kept = sorted(p.name for p in out.glob("shard-*.tar"))
    assert kept and all((out / k.replace(".tar", ".stats.json")).exists() for k in kept)

    small_tmpfs(16 * 1024 * 1024)  # room made: the rerun resumes, and nothing is lost
    code, _, err = wm("ingest", "videos", str(src), "--out", str(out), *VIDEO_ARGS, "--workers", "2")
    assert code == 0, err
    assert "resuming" in err
    assert read_samples(out) == read_samples(ref)


def test_ingest_past_a_file_size_limit_stops_with_one_line(videos, tmp_path):
    """Any machine: the kernel refuses a shard larger than the limit (EFBIG), as a quota would."""
    src, ref = videos
    out = tmp_path / "out"
    code, _, err = wm(
        "ingest", "videos", str(src), "--out", str(out), *VIDEO_ARGS, "--workers", "1", file_size_limit=8 * 1024
    )
    assert code == 74, err
    assert "Traceback" not in err
    (line,) = error_lines(err, "ingest")
    assert f"cannot write {out / 'shard-000000.tar'}: File too large" in line, line
    assert "0 of 6 shard(s) complete" in line and "file-size limit (`ulimit -f`)" in line, line
    assert leftovers(out) == [] and not list(out.glob("shard-*"))
    code, _, err = wm("ingest", "videos", str(src), "--out", str(out), *VIDEO_ARGS)
    assert code == 0, err
    assert read_samples(out) == read_samples(ref)


def test_collect_past_a_file_size_limit_is_one_line_and_no_traceback_at_exit(tmp_path):
    out = tmp_path / "out"
    code, _, err = wm(
        "collect",
        "metaworld",
        "--tasks",
        "reach-v3",
        "--episodes",
        "1",
        "--resolution",
        "32",
        "--max-steps",
        "20",
        "--out",
        str(out),
        file_size_limit=8 * 1024,
    )
    assert code == 74, err
    assert "Traceback" not in err and "Exception ignored" not in err, err  # the simulator closed cleanly
    (line,) = error_lines(err, "collect")
    assert f"cannot write {out / 'shard-000000.tar'}: File too large" in line, line
    assert leftovers(out) == [] and not list(out.glob("shard-*"))


def test_train_checkpoint_past_a_file_size_limit_names_the_room_needed(data, tmp_path):
    run = tmp_path / "run"
    # the toy's weights (~140 kB) fit, its AdamW moments (~270 kB) do not
    code, _, err = wm("train", "toy", "--data", str(data), "--out", str(run), *TRAIN_ARGS, file_size_limit=200_000)
    assert code == 74, err
    assert "Traceback" not in err
    (line,) = error_lines(err, "train")
    assert "step-0000010.tmp/optimizer.safetensors: File too large" in line, line
    assert "a checkpoint needs about" in line and "free there" in line, line
    assert leftovers(run / "checkpoints") == []
    assert json.loads((run / "status.json").read_text())["exit_code"] == 74
    code, _, err = wm("train", "toy", "--data", str(data), "--out", str(run), *TRAIN_ARGS)
    assert code == 0, err


def test_train_on_a_disk_full_from_the_start_is_one_line_and_a_final_status(data, small_tmpfs):
    """16 kB: room for the config and the lock, not for the logs: whichever write is refused first."""
    run = small_tmpfs(16 * 1024) / "run"
    code, _, err = wm(
        "train", "toy", "--data", str(data), "--out", str(run), *TRAIN_ARGS, "train.log_with=[tensorboard]"
    )
    assert code == 74, err
    assert "Traceback" not in err
    (line,) = error_lines(err, "train")
    assert line.startswith(f"wm train: error: cannot write {run}/") and "No space left on device" in line, line
    assert "free there): make room and rerun" in line, line
    assert leftovers(run) == []
    # status.json is rewritten in the blocks it holds: a final state even though the disk is full
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    assert json.loads((run / "status.json").read_text())["exit_code"] == 74


def test_a_disk_without_room_for_the_lock_file_is_one_line(data, videos, small_tmpfs):
    disk = small_tmpfs(8 * 1024)
    with open(disk / "filler", "wb") as f:  # fill it to the last byte
        try:
            f.write(bytes(64 * 1024))
        except OSError:
            pass
    src, _ = videos
    for command, args in [
        ("ingest", ["ingest", "videos", str(src), "--out", str(disk / "out"), *VIDEO_ARGS]),
        ("train", ["train", "toy", "--data", str(data), "--out", str(disk / "run"), *TRAIN_ARGS]),
    ]:
        code, _, err = wm(*args)
        assert code == 74, err
        (line,) = error_lines(err, command)
        assert "Traceback" not in err and "/.lock (the job's lock): No space left on device" in line, line
        assert leftovers(disk) == []


# ---------------------------------------------------------------- bad config, bad --init


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "decoder", "--data", str(data), "--out", str(run), *TRAIN_ARGS]) == 0
    return run


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["binary-config", "resize-0", "horizon-0", "init-missing", "init-unused"])
def test_bad_config_or_init_is_one_line_before_anything_is_written(data, finished, tmp_path, capsys, case):
    """In this process (main(): the same one-line error on stderr; a traceback would fail the test)."""
    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"data: {window: 2}\n\x00\xff\xfe\x80" + bytes(range(256)))
    extra, expected = {
        "binary-config": (["--config", str(binary)], f"{binary}: not a text (UTF-8 YAML) file: byte 0xff"),
        "resize-0": (["data.resize=[0,0]"], "config key 'data.resize': expected [H, W] with H, W > 0, got [0, 0]"),
        "horizon-0": (["model.horizon=0"], "model 'decoder' cannot be built from this config: ValueError"),
        "init-missing": (["--init", str(tmp_path / "no" / "such" / "run")], "does not exist"),
        "init-unused": (["--init", str(data)], "model 'decoder' with policy=scratch does not use it"),
    }[case]
    new = tmp_path / "new-run"
    code, _, err = wm_here(capsys, "train", "decoder", "--data", str(data), "--out", str(new), *TRAIN_ARGS, *extra)
    assert code == exit_codes.USAGE == 2, err
    assert "Traceback" not in err
    (line,) = error_lines(err, "train")
    assert expected in line, line
    assert case != "horizon-0" or "(check model.horizon=0)" in line, line
    assert not new.exists()
    # into a finished run, with one more step to do: refused, the run folder byte for byte as it was
    before = _tree(finished)
    code, _, err = wm_here(
        capsys,
        "train",
        "decoder",
        "--data",
        str(data),
        "--out",
        str(finished),
        *TRAIN_ARGS,
        "train.max_steps=21",
        *extra,
    )
    assert code == 2 and error_lines(err, "train") == [line.replace(str(new), str(finished))], err
    assert _tree(finished) == before


# ---------------------------------------------------------------- SIGUSR1 at start-up


def _catches(pid: int, sig: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(mask >> (sig - 1) & 1)


def _has_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_sigusr1_during_start_up_checkpoints_instead_of_killing(data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "wm_pipeline", "train", "toy", "--data", str(data), "--out", str(run), *TRAIN_ARGS]
    proc = subprocess.Popen(
        cmd, env=toy_models.plugin_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 60
    while not _catches(proc.pid, signal.SIGUSR1):
        assert proc.poll() is None and time.monotonic() < deadline, "the handler was never installed"
        time.sleep(0.001)
    early = not _has_torch(proc.pid)  # the handler exists before the heavy imports
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert early, "SIGUSR1 handler installed only after torch was imported"
    assert proc.returncode == exit_codes.PREEMPTED == 75, out
    assert "preempted by SIGUSR1 at step 1" in out
    assert json.loads((run / "status.json").read_text())["state"] == "preempted"
    assert (run / "checkpoints" / "step-0000001").is_dir()
    code, _, err = wm("train", "toy", "--data", str(data), "--out", str(run), *TRAIN_ARGS)
    assert code == 0 and "resuming from" in err, err


# ---------------------------------------------------------------- an MKV with a corrupt cluster


def corrupt_mkv(path: Path, frames: np.ndarray, fps: int, cluster: int = 5) -> Path:
    """An H.264 MKV, a keyframe every 5 frames, ~0.2 s clusters, whose ``cluster``-th cluster is zeroed
    (as a bad sector or a botched copy leaves it)."""
    with av.open(str(path), "w", options={"cluster_time_limit": "200"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 5
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    raw = bytearray(path.read_bytes())
    starts, i = [], 0
    while (i := raw.find(b"\x1f\x43\xb6\x75", i + 1)) > 0:  # the Matroska Cluster element ID
        starts.append(i)
    assert len(starts) > cluster + 1, starts
    raw[starts[cluster] : starts[cluster + 1]] = bytes(starts[cluster + 1] - starts[cluster])
    path.write_bytes(raw)
    return path


def test_mkv_with_a_corrupt_cluster_is_a_failure_row_without_frozen_frames(tmp_path):
    bad = corrupt_mkv(tmp_path / "bad.mkv", gray_ramp(75, 64, 64, 3), 25)  # 3 s, level = 3 x frame index
    out = tmp_path / "out"
    code, stdout, err = wm(
        "ingest", "videos", str(bad), "--out", str(out), "--resolution", "32", "--fps", "25", "--clip-seconds", "0.4"
    )
    assert code == exit_codes.DATA_FAILURES == 3, err
    (row,) = [json.loads(r) for r in (out / "failures.jsonl").read_text().splitlines()]
    assert row["source"] == str(bad) and row["reason"].startswith("timestamp gap: no usable frame from "), row
    assert "dropped 1 partial clip(s) across it" in row["reason"] and "kept 6 clip(s)" in row["reason"], row
    samples = read_samples(out)
    starts = sorted(json.loads(s["meta.json"])["extra"]["start_seconds"] for s in samples.values())
    assert len(starts) == 6 and any(s > 1.5 for s in starts), starts  # clips after the gap are kept
    for key, s in samples.items():  # each frame is the next source frame: the level rises by 3 a frame
        with av.open(io.BytesIO(s["video.mp4"])) as c:  # (give or take H.264's rounding), never stands still
            levels = [float(f.to_ndarray(format="rgb24").mean()) for f in c.decode(video=0)]
        steps = np.diff(levels)
        assert steps.min() >= -1 and steps.max() <= 8, (key, levels)  # no jump: no gap inside a clip
        assert (np.asarray(levels[2:]) - levels[:-2]).min() >= 3, (key, levels)  # no frozen frames


# ---------------------------------------------------------------- a closed stdout


def test_inspect_into_a_closed_pipe_ends_quietly(data):
    proc = subprocess.Popen(
        [sys.executable, "-m", "wm_pipeline", "inspect", str(data), "--no-sheet", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=toy_models.plugin_env(),
    )
    proc.stdout.close()  # the reader is gone before the first line (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == exit_codes.BROKEN_PIPE == 141, err
    assert err == ""
