"""One job per output folder (shards.folder_lock), with real processes throughout.

Covers: a second `wm ingest` into a folder another ingest is writing fails at once with one line
naming the holder (pid, host) and the first one's output stays intact; `kill -9` of an ingest's
parent takes its worker processes with it and an immediate rerun gives the clean run's bytes; a
lock left by a dead process (or by a forked child's parent) is taken over; a shard whose stats
record does not match its tar is rewritten on rerun; a second `wm train` into a run folder (one
process or torchrun ranks) is refused; `wm label` locks per sidecar shard, so disjoint `--shards`
ranges still run side by side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import toy_models
from shards.folder_lock import LOCK_NAME, FolderBusy, FolderLock, read_holder
from shards.format import read_manifest
from shards.writer import Episode, run_sharded_job
from test_ingest_videos import gray_ramp, read_samples, write_video
from wm_pipeline.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
# Waiting for a state (a lock taken, a process done) never fails a test by being slow: a loaded 2-core
# machine takes a minute to start one `wm` process; these bounds only stop a hung test.
WAIT = 600
VIDEO_ARGS = ["--resolution", "32", "--fps", "15", "--clip-seconds", "0.5", "--samples-per-shard", "1"]


def wm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "wm_pipeline", *args]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for whoever reaps in this container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return [p for p in out if alive(p)]


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, step: float = 0.005):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)


def holds(folder: Path, pid: int, name: str = LOCK_NAME) -> bool:
    return (read_holder(folder / name) or {}).get("pid") == pid


def videos(folder: Path, n: int, step: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        write_video(folder / f"v{i:02d}.mp4", gray_ramp(30, 64, 64, step), 15)
    return folder


HOLD = textwrap.dedent("""
    import sys, time
    from shards.folder_lock import FolderLock
    FolderLock(sys.argv[1], *sys.argv[2:3]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def hold_lock(folder: Path, name: str = LOCK_NAME) -> subprocess.Popen:
    """Another process that takes the lock and keeps it until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), name],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def one_error_line(stderr: str, command: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"wm {command}: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


# ---------------------------------------------------------------- the lock itself


def test_live_holder_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "out"
    holder = hold_lock(folder)
    with pytest.raises(FolderBusy) as e:
        FolderLock(folder).acquire()
    message = str(e.value)
    assert "\n" not in message and str(folder) in message and f"pid {holder.pid} on host {HOST}" in message
    assert e.value.holder["pid"] == holder.pid
    kill(holder)  # kill -9: nothing released the file, only the kernel the lock
    assert read_holder(folder / LOCK_NAME)["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="shards.folder_lock"), FolderLock(folder) as lock:
        assert lock.held and read_holder(folder / LOCK_NAME)["pid"] == os.getpid()
        assert f"taking over the lock left by pid {holder.pid} on host {HOST}" in caplog.text
    assert not (folder / LOCK_NAME).exists()  # a clean release leaves nothing in the folder

    (folder / LOCK_NAME).write_text("not json")  # whatever a dead process left
    with FolderLock(folder):
        assert read_holder(folder / LOCK_NAME)["pid"] == os.getpid()


def test_wait_retries_until_the_holder_ends(tmp_path):
    folder = tmp_path / "out"
    # the holder says when it lets go (CLOCK_MONOTONIC is one clock for every process): taking the lock
    # after that instant shows the wait, however slowly either process runs
    script = (
        "import time; from shards.folder_lock import FolderLock\n"
        f"with FolderLock({str(folder)!r}):\n    print('locked', flush=True); time.sleep(1.0)\n"
        "    print(time.monotonic(), flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    with FolderLock(folder, wait=WAIT):  # the holder releases after its second
        taken = time.monotonic()
        assert taken > float(proc.stdout.readline()) and read_holder(folder / LOCK_NAME)["pid"] == os.getpid()
    with pytest.raises(FolderBusy):  # wait=0 refuses at once
        with FolderLock(folder), FolderLock(folder):
            pass
    proc.wait()


def test_a_forked_child_does_not_keep_its_dead_parents_lock(tmp_path):
    """DataLoader workers are forked while the run folder is locked: they must not hold it alive."""
    folder = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, time
        from shards.folder_lock import FolderLock
        FolderLock({str(folder)!r}).acquire()
        child = os.fork()
        if child == 0:
            time.sleep(120)
            os._exit(0)
        print(child, flush=True)
        os._exit(0)   # the parent ends without releasing; its child lives on
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = int(proc.stdout.readline())
    proc.wait()
    try:
        assert alive(child)
        with FolderLock(folder, wait=WAIT):  # free once the child has run its at-fork hook
            assert alive(child)
    finally:
        os.kill(child, signal.SIGKILL)


# ---------------------------------------------------------------- ingest


def test_second_ingest_into_one_folder_fails_at_once_and_the_first_stays_intact(tmp_path):
    mine, theirs = videos(tmp_path / "mine", 8, step=8), videos(tmp_path / "theirs", 8, step=4)
    ref = tmp_path / "ref"  # what a lone run writes (in this process: only the two jobs below need their own)
    assert main(["ingest", "videos", str(mine), *VIDEO_ARGS, "--workers", "1", "--out", str(ref)]) == 0
    out = tmp_path / "out"
    t0 = time.monotonic()
    first = subprocess.Popen(
        wm_cmd("ingest", "videos", str(mine), *VIDEO_ARGS, "--workers", "1", "--out", str(out)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: holds(out, first.pid), WAIT, "the first ingest's lock", first)
    startup = time.monotonic() - t0  # a `wm ingest` from its start to the lock, on this machine now
    first.send_signal(signal.SIGSTOP)  # keep it mid-job (holding the lock) while the second one tries
    try:
        assert holds(out, first.pid), "the first ingest ended before it could be paused"
        t0 = time.monotonic()
        second = subprocess.run(
            wm_cmd("ingest", "videos", str(theirs), *VIDEO_ARGS, "--workers", "2", "--out", str(out)),
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        took = time.monotonic() - t0
        assert first.poll() is None, "the first ingest ended before the second one ran"
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stdout + second.stderr
    line = one_error_line(second.stderr, "ingest")
    assert f"output folder {out} is in use by another job (pid {first.pid} on host {HOST}" in line, line
    # refused at once, not after waiting for the holder: about one start-up to the lock, scaled to this
    # machine's load (the paused first job never ends, so a waiting second one would time out)
    assert "wm ingest videos" in line and took < 30 + 3 * startup, (took, startup)
    _, err = first.communicate(timeout=WAIT)
    assert first.returncode == 0, err
    assert read_samples(out) == read_samples(ref)  # only the first job's clips, as a lone run writes them
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    assert not (out / LOCK_NAME).exists()


def test_kill_9_of_the_parent_takes_its_workers_and_an_immediate_rerun_succeeds(tmp_path):
    src = videos(tmp_path / "src", 12, step=8)
    args = ["ingest", "videos", str(src), *VIDEO_ARGS, "--workers", "2"]
    ref = tmp_path / "ref"  # a lone run's bytes (in this process, one worker: the bytes never depend on workers)
    assert main([*args[:-1], "1", "--out", str(ref)]) == 0

    out = tmp_path / "out"
    proc = subprocess.Popen(wm_cmd(*args, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(
        lambda: list(out.glob("shard-*.stats.json")) and len(descendants(proc.pid)) >= 2,
        WAIT,
        "a first shard and two workers",
        proc,
    )
    workers = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the parent only, as a user's kill or the OOM killer does
    proc.wait()
    assert not (out / "manifest.json").exists(), "the kill landed after the job: cannot test the rerun"
    rerun = subprocess.Popen(
        wm_cmd(*args, "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )  # at once, before anyone looked at the workers
    try:
        # the kernel kills them with it (PR_SET_PDEATHSIG) while the rerun is still starting up;
        # the bound is generous for a loaded machine and only stops a test whose workers live on
        wait_until(lambda: not any(alive(p) for p in workers), 60, f"workers {workers} to die with their parent")
    finally:
        _, err = rerun.communicate(timeout=WAIT)
    assert rerun.returncode == 0, err
    assert "resuming" in err
    assert f"taking over the lock left by pid {proc.pid} on host {HOST}" in err
    assert read_samples(out) == read_samples(ref)
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    for entry in read_manifest(out)["shards"]:
        assert (out / entry["name"]).stat().st_size == entry["bytes"]
    assert not list(out.glob("*.tmp")) and not (out / LOCK_NAME).exists()


def _episodes(i: int):
    """make_episodes of the stats test (module level, picklable)."""
    rng = np.random.default_rng(i)
    frames = rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    yield Episode(
        key=f"ep{i:02d}",
        frames={"cam": frames},
        fps=10.0,
        embodiment="toybot",
        action=rng.normal(size=(6, 2)).astype(np.float32),
    )


def test_a_shard_whose_stats_do_not_match_its_tar_is_rewritten(tmp_path, caplog):
    ref, out = tmp_path / "ref", tmp_path / "out"
    for folder in (ref, out):
        assert run_sharded_job(folder, [0, 1, 2], _episodes, samples_per_shard=1).ok
    # what two jobs in one folder once left: shard 0 holds another shard's clips under its own stats,
    # and shard 1's stats record an empty file for a good tar
    (out / "shard-000000.tar").write_bytes((out / "shard-000002.tar").read_bytes())
    stats = json.loads((out / "shard-000001.stats.json").read_text())
    stats.update(bytes=0, sha256=hashlib.sha256(b"").hexdigest())  # the hash of an empty file
    (out / "shard-000001.stats.json").write_text(json.dumps(stats))
    with caplog.at_level(logging.INFO, logger="shards.writer"):
        assert run_sharded_job(out, [0, 1, 2], _episodes, samples_per_shard=1).ok
    assert f"{out / 'shard-000000.tar'}: does not match its stats record" in caplog.text
    assert f"{out / 'shard-000001.tar'}: does not match its stats record" in caplog.text
    assert "resuming, 1 of 3 shards already complete" in caplog.text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in ref.iterdir()}


# ---------------------------------------------------------------- train


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return toy_models.make_dataset(tmp_path_factory.mktemp("toy") / "data", episodes=4, per_shard=2)


def train_cmd(data: Path, run: Path, *overrides: str) -> list[str]:
    return wm_cmd(
        "train", "toy", "--data", str(data), "--out", str(run), "--preset", "tiny", "train.progress=false", *overrides
    )


def test_second_train_into_one_run_folder_is_refused(toy_data, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    env = toy_models.plugin_env()
    first = subprocess.Popen(
        train_cmd(toy_data, run, "train.max_steps=1000000", "train.ckpt_every=1000000"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: holds(run, first.pid) and (run / "status.json").exists(), WAIT, "the first run", first)
        first.send_signal(signal.SIGSTOP)  # mid-run, holding the lock, without taking the CPU the others need
        try:  # the second and third runs in this process (another one than the first; torchrun ranks below)
            capsys.readouterr()
            assert main(train_cmd(toy_data, run, "train.max_steps=3")[3:]) == 2
        finally:
            first.send_signal(signal.SIGCONT)
        line = one_error_line(capsys.readouterr().err, "train")
        assert f"run folder {run} is in use by another job (pid {first.pid} on host {HOST}" in line, line
        assert first.poll() is None  # the first run goes on, untouched
        assert yaml_max_steps(run) == 1000000  # the refused run wrote nothing (not even its config)
    finally:
        kill(first)
    # the dead run's lock is taken over
    with caplog.at_level(logging.WARNING, logger="shards.folder_lock"):
        assert main(train_cmd(toy_data, run, "train.max_steps=3")[3:]) == 0
    assert f"taking over the lock left by pid {first.pid}" in caplog.text
    assert not (run / LOCK_NAME).exists()


def yaml_max_steps(run: Path) -> int:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"]


@pytest.mark.distributed
def test_torchrun_ranks_all_stop_when_the_run_folder_is_taken(toy_data, tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *train_cmd(toy_data, run, "train.max_steps=3")[1:],
        ]
        r = subprocess.run(cmd, env=toy_models.plugin_env(), capture_output=True, text=True, timeout=WAIT)
    finally:
        kill(holder)
    # one line per rank (the two ranks may interleave their writes), and no rank left hanging in a collective
    assert r.stderr.count("wm train: error:") == 2, r.stderr
    assert f"is in use by another job (pid {holder.pid} on host {HOST}" in r.stderr
    assert "is in use by another job (rank 0's message names it)" in r.stderr
    assert r.returncode != 0
    assert not (run / "checkpoints").exists()


# ---------------------------------------------------------------- label


@pytest.fixture
def frame_mean(tmp_path):
    """A per-frame labeller kind (no training needed) and a 4-shard dataset."""
    import torch
    from safetensors.torch import save_file

    from wm_pipeline.jobs.labelling import Labeller, register_labeller

    folder = tmp_path / "frame_mean"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"labeller_kind": "frame_mean_lock"}))
    save_file({"unused": torch.zeros(1)}, str(folder / "model.safetensors"))

    def load(path, run_config):
        return Labeller(
            kind="frame_mean_lock",
            model=torch.nn.Identity(),
            folder=path,
            window=3,
            tail=0,
            fields={"mean": ((3,), "float32")},
            image_size=(16, 16),
        )

    register_labeller("frame_mean_lock", load, lambda lab, frames, embs: {"mean": frames.float().mean((-1, -2))})
    data = tmp_path / "data"
    assert run_sharded_job(data, [0, 1, 2, 3], _episodes, samples_per_shard=1).ok
    return folder, data


def test_label_locks_each_sidecar_shard_so_disjoint_ranges_run_side_by_side(frame_mean, capsys):
    from shards.sidecar import sidecar_done, sidecar_shard_lock
    from wm_pipeline.cli.main import main

    labeller, data = frame_mean
    lock = sidecar_shard_lock(data, "m", "shard-000000.tar")
    holder = hold_lock(lock.folder, lock.path.name)  # another job is labelling shard 0
    try:
        base = ["label", "--labeller", str(labeller), "--data", str(data), "--name", "m", "--no-progress"]
        assert main([*base, "--shards", "1/2"]) == 0  # shards 2 and 3: not in the way
        assert [sidecar_done(data, "m", f"shard-{i:06d}.tar") for i in range(4)] == [False, False, True, True]
        capsys.readouterr()
        assert main(base) == 2  # reaches shard 0: refused, one line naming the holder
        line = one_error_line(capsys.readouterr().err, "label")
        assert f"sidecar {lock.folder / 'shard-000000.tar'} is in use by another job (pid {holder.pid}" in line
    finally:
        kill(holder)
    assert main(base) == 0  # the dead job's lock is taken over
    assert all(sidecar_done(data, "m", f"shard-{i:06d}.tar") for i in range(4))
    assert not list(lock.folder.glob(".*.lock"))
