"""Run the faults of issue 16 as real `wm` processes on real files, and print one table.

    python scripts/fault_runner.py            # every case (a few minutes on 2 cores)
    python scripts/fault_runner.py --quick    # the cheap subset (about a minute)
    python scripts/fault_runner.py --case tampered_tar --case bad_init --keep

Each case builds its inputs in a fresh temp folder (small noise videos, the toy training set of
tests/toy_models.py), breaks something the way a user or a machine does (kill -9, two jobs on one
folder, a truncated checkpoint, a full disk, a tampered tar, a bad config or --init, a signal during
start-up, a corrupt MKV cluster, a closed stdout) and checks what the guarantees in docs/FORMAT.md and
docs/TRAINING.md promise: the exit code, one line instead of a traceback, nothing half-written, and
after the rerun the same samples as a run that never failed. "samples lost" compares the dataset with
that clean run (`-` where a case makes no dataset). Exit code 0 when every case passed, 1 otherwise.

The set-ups are the tests' own helpers (tests/test_folder_lock.py, tests/test_ingest_videos.py,
tests/test_clear_errors.py, tests/toy_models.py); tests/ holds one assertion-level test per mechanism,
this script is the end-to-end tour.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

import toy_models  # noqa: E402
from test_clear_errors import _catches, corrupt_mkv  # noqa: E402
from test_folder_lock import alive, descendants, wait_until  # noqa: E402
from test_ingest_videos import gray_ramp, read_samples, write_video  # noqa: E402

VIDEO_ARGS = ["--resolution", "32", "--fps", "15", "--clip-seconds", "0.5", "--samples-per-shard", "1"]
TRAIN_ARGS = [
    "--preset",
    "tiny",
    "train.max_steps=30",
    "train.ckpt_every=10",
    "train.keep_last=5",
    "train.progress=false",
]


@dataclasses.dataclass
class Outcome:
    expected: str
    got: str
    passed: bool
    lost: int | None = None  # samples missing from (or differing with) the clean run; None: no dataset


@dataclasses.dataclass
class Case:
    name: str
    quick: bool
    run: Callable[[Workspace], Outcome]


# ---------------------------------------------------------------- shared set-up


def wm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "wm_pipeline", *map(str, args)]


def wm(*args, file_size_limit: int | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run `wm ARGS`; returns (exit code, stderr + stdout). ``file_size_limit``: RLIMIT_FSIZE (EFBIG)."""

    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    proc = subprocess.run(
        wm_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=toy_models.plugin_env(),
        preexec_fn=limit if file_size_limit else None,
    )
    return proc.returncode, proc.stderr + proc.stdout


def one_line(out: str, command: str) -> bool:
    return "Traceback" not in out and sum(line.startswith(f"wm {command}: error:") for line in out.splitlines()) == 1


def lost(out: Path, ref: Path) -> int:
    """Samples of the clean run ``ref`` that ``out`` lacks or holds differently."""
    try:
        got = read_samples(out)
    except Exception:  # noqa: BLE001 - no manifest: everything is lost
        got = {}
    want = read_samples(ref)
    return sum(got.get(k) != v for k, v in want.items())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name == ".lock")


class Workspace:
    """Inputs built once per runner and shared by the cases (each case writes into its own folder)."""

    def __init__(self, root: Path):
        self.root = root
        self._videos = self._ref = self._toy = None

    def folder(self, name: str) -> Path:
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def videos(self) -> tuple[Path, Path]:
        """12 noise videos of 2 s and their clean ingest (the reference for samples lost)."""
        if self._videos is None:
            src = self.folder("videos")
            rng = np.random.default_rng(0)
            for i in range(12):
                write_video(src / f"v{i:02d}.mp4", rng.integers(0, 255, (30, 64, 64, 3), dtype=np.uint8), 15)
            ref = self.root / "videos-ref"
            code, out = wm("ingest", "videos", src, "--out", ref, *VIDEO_ARGS, "--workers", "2")
            assert code == 0, out
            self._videos, self._ref = src, ref
        return self._videos, self._ref

    def toy(self) -> Path:
        if self._toy is None:
            self._toy = toy_models.make_dataset(self.root / "toy")
        return self._toy

    def tmpfs(self, name: str, size: int) -> Path | None:
        """A tmpfs of ``size`` bytes (remounted when it exists), or None where mounting is not allowed."""
        mnt = self.root / name
        mnt.mkdir(exist_ok=True)
        opts = f"remount,size={size}" if os.path.ismount(mnt) else f"size={size}"
        ok = (
            subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True).returncode == 0
        )
        return mnt if ok else None

    def close(self) -> None:
        for mnt in self.root.iterdir():
            if os.path.ismount(mnt):
                subprocess.run(["umount", str(mnt)], check=False)


# ---------------------------------------------------------------- the cases


def kill9_ingest(ws: Workspace) -> Outcome:
    src, ref = ws.videos()
    out = ws.folder("kill9") / "out"
    args = ["ingest", "videos", src, *VIDEO_ARGS, "--workers", "2", "--out", out]
    proc = subprocess.Popen(
        wm_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=toy_models.plugin_env()
    )
    wait_until(
        lambda: list(out.glob("shard-*.stats.json")) and len(descendants(proc.pid)) >= 2,
        120,
        "a first shard and two workers",
        proc,
    )
    workers = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the parent only, as a user's kill or the OOM killer does
    proc.wait()
    code, text = wm(*args)
    time.sleep(0.5)
    orphans = [p for p in workers if alive(p)]
    n = lost(out, ref)
    ok = code == 0 and not orphans and n == 0 and "resuming" in text and not leftovers(out)
    return Outcome("rerun 0, workers gone, = clean run", f"rerun {code}, {len(orphans)} orphan(s)", ok, n)


def concurrent_ingest(ws: Workspace) -> Outcome:
    src, ref = ws.videos()
    out = ws.folder("concurrent") / "out"
    args = ["ingest", "videos", src, *VIDEO_ARGS, "--workers", "1", "--out", out]
    first = subprocess.Popen(
        wm_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=toy_models.plugin_env()
    )
    wait_until(lambda: (out / ".lock").exists(), 60, "the first job's lock", first)
    code2, text2 = wm(*args)
    _, err1 = first.communicate(timeout=300)
    n = lost(out, ref)
    ok = (
        first.returncode == 0
        and code2 == 2
        and one_line(text2, "ingest")
        and "in use by another job" in text2
        and n == 0
    )
    return Outcome("first 0, second 2 (one line), = clean run", f"first {first.returncode}, second {code2}", ok, n)


def tampered_tar(ws: Workspace) -> Outcome:
    src, ref = ws.videos()
    out = ws.folder("tampered") / "out"
    shutil.copytree(ref, out)
    tar = out / "shard-000003.tar"
    raw = bytearray(tar.read_bytes())
    raw[600:616] = bytes(b ^ 0xFF for b in raw[600:616])  # flipped bytes inside the first member's header
    tar.write_bytes(raw)
    code, text = wm("ingest", "videos", src, *VIDEO_ARGS, "--out", out)
    n = lost(out, ref)
    ok = code == 0 and "does not match its stats record" in text and n == 0
    return Outcome("rerun rewrites the shard: 0, = clean run", f"rerun {code}", ok, n)


def truncated_checkpoint(ws: Workspace) -> Outcome:
    from safetensors.torch import load_file

    data = ws.toy()
    run = ws.folder("ckpt") / "run"
    code, text = wm("train", "toy", "--data", data, "--out", run, *TRAIN_ARGS)
    assert code == 0, text
    straight = load_file(str(run / "final" / "model.safetensors"))
    bad = run / "checkpoints" / "step-0000030" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    shutil.rmtree(run / "final")
    code, text = wm("train", "toy", "--data", data, "--out", run, *TRAIN_ARGS)
    resumed = load_file(str(run / "final" / "model.safetensors")) if (run / "final").is_dir() else {}
    same = bool(resumed) and all(np.allclose(straight[k].numpy(), resumed[k].numpy(), atol=1e-6) for k in straight)
    ok = code == 0 and "is damaged, skipping it" in text and "step-0000020" in text and same
    return Outcome("0, resumed from step 20, same weights", f"{code}, {'same' if same else 'different'} weights", ok)


def enospc_ingest(ws: Workspace) -> Outcome:
    src, ref = ws.videos()
    shard = (ref / "shard-000000.tar").stat().st_size
    disk = ws.tmpfs("disk-ingest", 4 * shard + 16 * 1024)
    how = "tmpfs" if disk else "RLIMIT_FSIZE"
    out = (disk or ws.folder("enospc-ingest")) / "out"
    args = ["ingest", "videos", src, *VIDEO_ARGS, "--workers", "2", "--out", out]
    code, text = wm(*args, file_size_limit=None if disk else shard // 2)
    room = "needs" in text or "file-size limit" in text
    unmarked = [t for t in out.glob("shard-*.tar") if not t.with_name(t.name[:-4] + ".stats.json").exists()]
    clean = (
        one_line(text, "ingest")
        and room
        and not leftovers(out)
        and not unmarked
        and not (out / "manifest.json").exists()
    )
    if disk:
        ws.tmpfs("disk-ingest", 64 * 1024 * 1024)
    code2, _ = wm(*args)
    n = lost(out, ref)
    ok = code == 74 and clean and code2 == 0 and n == 0
    return Outcome(
        f"74 one line, no partial ({how}); rerun 0", f"{code}{'' if clean else ' (not clean)'}; rerun {code2}", ok, n
    )


def enospc_train(ws: Workspace) -> Outcome:
    data = ws.toy()
    disk = ws.tmpfs("disk-train", 600 * 1024)  # one checkpoint (~0.7 MB) does not fit
    how = "tmpfs" if disk else "RLIMIT_FSIZE"
    run = (disk or ws.folder("enospc-train")) / "run"
    code, text = wm(
        "train", "toy", "--data", data, "--out", run, *TRAIN_ARGS, file_size_limit=None if disk else 200_000
    )
    clean = one_line(text, "train") and "a checkpoint needs about" in text and not leftovers(run)
    if disk:
        ws.tmpfs("disk-train", 64 * 1024 * 1024)
    code2, _ = wm("train", "toy", "--data", data, "--out", run, *TRAIN_ARGS)
    ok = code == 74 and clean and code2 == 0
    return Outcome(
        f"74 one line, no partial ({how}); rerun 0", f"{code}{'' if clean else ' (not clean)'}; rerun {code2}", ok
    )


def bad_config(ws: Workspace) -> Outcome:
    data = ws.toy()
    folder = ws.folder("bad-config")
    binary = folder / "config.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    codes = []
    for extra in (["--config", binary], ["data.resize=[0,0]"], ["model.horizon=0"]):
        run = folder / "run"
        code, text = wm("train", "decoder", "--data", data, "--out", run, *TRAIN_ARGS, *extra)
        codes.append(code if one_line(text, "train") and not run.exists() else f"{code}!")
    return Outcome("2 2 2, one line, no run folder", " ".join(map(str, codes)), codes == [2, 2, 2])


def bad_init(ws: Workspace) -> Outcome:
    data = ws.toy()
    folder = ws.folder("bad-init")
    codes = []
    for init in (folder / "no" / "such" / "run", data):  # missing; exists but policy=scratch reads none
        run = folder / "run"
        code, text = wm("train", "decoder", "--data", data, "--out", run, *TRAIN_ARGS, "--init", init)
        codes.append(code if one_line(text, "train") and not run.exists() else f"{code}!")
    return Outcome("2 2 (missing, unused), one line", " ".join(map(str, codes)), codes == [2, 2])


def sigusr1_startup(ws: Workspace) -> Outcome:
    data = ws.toy()
    run = ws.folder("sigusr1") / "run"
    proc = subprocess.Popen(
        wm_cmd("train", "toy", "--data", data, "--out", run, *TRAIN_ARGS),
        env=toy_models.plugin_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: _catches(proc.pid, signal.SIGUSR1), 60, "the SIGUSR1 handler", proc, step=0.001)
    proc.send_signal(signal.SIGUSR1)
    code = proc.wait(timeout=300)
    code2, _ = wm("train", "toy", "--data", data, "--out", run, *TRAIN_ARGS)
    return Outcome("75 (checkpoint), rerun 0", f"{code}, rerun {code2}", code == 75 and code2 == 0)


def mkv_gap(ws: Workspace) -> Outcome:
    folder = ws.folder("mkv")
    bad = corrupt_mkv(folder / "bad.mkv", gray_ramp(75, 64, 64, 3), 25)
    out = folder / "out"
    code, _ = wm("ingest", "videos", bad, "--out", out, "--resolution", "32", "--fps", "25", "--clip-seconds", "0.4")
    rows = [json.loads(r) for r in (out / "failures.jsonl").read_text().splitlines()] if out.is_dir() else []
    gap = len(rows) == 1 and rows[0]["reason"].startswith("timestamp gap")
    return Outcome(
        "3, a 'timestamp gap' failure row",
        f"{code}, {len(rows)} row(s){'' if gap else ' (no gap row)'}",
        code == 3 and gap,
    )


def broken_pipe(ws: Workspace) -> Outcome:
    _, ref = ws.videos()
    proc = subprocess.Popen(
        wm_cmd("inspect", ref, "--no-sheet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=toy_models.plugin_env(),
    )
    proc.stdout.close()  # `| head` that already left
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=60)
    return Outcome("141, nothing on stderr", f"{code}, {len(err.splitlines())} stderr line(s)", code == 141 and not err)


CASES = [
    Case("kill9_ingest_rerun", True, kill9_ingest),
    Case("two_ingests_one_out", True, concurrent_ingest),
    Case("tampered_tar", True, tampered_tar),
    Case("truncated_checkpoint", False, truncated_checkpoint),
    Case("enospc_ingest", True, enospc_ingest),
    Case("enospc_train", False, enospc_train),
    Case("bad_config", False, bad_config),
    Case("bad_init", True, bad_init),
    Case("sigusr1_startup", False, sigusr1_startup),
    Case("mkv_corrupt_cluster", True, mkv_gap),
    Case("inspect_broken_pipe", True, broken_pipe),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="only the cheap cases (no training runs)")
    p.add_argument("--case", action="append", default=[], choices=[c.name for c in CASES], help="run only these")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    args = p.parse_args(argv)
    cases = [c for c in CASES if (not args.case or c.name in args.case) and (c.quick or not args.quick or args.case)]
    root = Path(tempfile.mkdtemp(prefix="wm-faults-"))
    ws = Workspace(root)
    rows = []
    try:
        for case in cases:
            t0 = time.monotonic()
            try:
                o = case.run(ws)
            except Exception as e:  # noqa: BLE001 - a broken set-up is a failed case, not the end of the tour
                o = Outcome(
                    "-", f"set-up failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}", False
                )
            rows.append(
                (
                    case.name,
                    o.expected,
                    o.got,
                    "yes" if o.passed else "NO",
                    "-" if o.lost is None else str(o.lost),
                    f"{time.monotonic() - t0:.0f}s",
                )
            )
            print(f"{case.name}: {'passed' if o.passed else 'FAILED'} ({o.got})", file=sys.stderr, flush=True)
    finally:
        ws.close()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    head = ("case", "expected", "got", "passed", "samples lost", "time")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    passed = sum(r[3] == "yes" for r in rows)
    total_lost = sum(int(r[4]) for r in rows if r[4] != "-")
    print(f"\n{passed} of {len(rows)} cases passed; samples lost: {total_lost}")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
