"""`wm ingest videos` on real encoded videos (PyAV, several containers, frame rates and sizes)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from shards.format import read_manifest


def write_video(
    path: Path, frames: np.ndarray, fps: float, codec: str = "libx264", options: dict | None = None
) -> Path:
    """Encode uint8 [T, H, W, 3] frames with PyAV; the container follows the file suffix."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def gray_ramp(n: int, h: int, w: int, step: int) -> np.ndarray:
    """Frame i is uniformly gray at level i * step: the decoded level tells which frame was kept."""
    return np.broadcast_to((np.arange(n) * step).astype(np.uint8)[:, None, None, None], (n, h, w, 3)).copy()


def wm(*args: str, check_rc: int | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "wm_pipeline", *args], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def read_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {member suffix: bytes}} over every shard of the manifest, in order."""
    samples: dict[str, dict[str, bytes]] = {}
    for s in read_manifest(out)["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            for m in tar:
                key, _, suffix = m.name.partition(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    return samples


def decode(data: bytes) -> tuple[np.ndarray, Fraction]:
    with av.open(io.BytesIO(data)) as c:
        rate = c.streams.video[0].average_rate
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]), rate


def test_clips_have_right_count_length_size_fps_and_content(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    write_video(src / "a.mp4", gray_ramp(90, 64, 96, 2), 30)  # 3.0 s -> 3 clips
    write_video(src / "sub" / "b.mkv", gray_ramp(60, 80, 64, 3), 25)  # 2.4 s -> 2 clips, tail dropped
    write_video(src / "c.avi", gray_ramp(30, 40, 48, 8), 12, codec="mpeg4")  # 2.5 s -> 2 clips
    # geometry: landscape thirds red | green | blue; the square center crop keeps a bit of red and blue
    thirds = np.zeros((10, 64, 96, 3), np.uint8)
    thirds[:, :, :32, 0] = thirds[:, :, 32:64, 1] = thirds[:, :, 64:, 2] = 255
    write_video(tmp_path / "thirds.webm", thirds, 10, codec="libvpx-vp9")  # 1.0 s -> 1 clip
    (src / "notes.txt").write_text("not picked up by a folder walk")
    out = tmp_path / "out"
    proc = wm(
        "ingest",
        "videos",
        str(src),
        str(tmp_path / "*.webm"),
        "--out",
        str(out),
        "--resolution",
        "32",
        "--fps",
        "10",
        "--clip-seconds",
        "1",
        "--workers",
        "1",
        check_rc=0,
    )
    assert "8 samples, 80 frames" in proc.stdout
    samples = read_samples(out)
    by_source = {}
    for key, m in samples.items():
        meta = json.loads(m["meta.json"])
        by_source.setdefault(Path(meta["source"]).name, []).append(meta["extra"]["clip_index"])
        assert "." not in key and meta["embodiment"] == "video" and not meta["has_action"]
        assert (meta["n_frames"], meta["height"], meta["width"], meta["fps"]) == (10, 32, 32, 10.0)
        frames, rate = decode(m["video.mp4"])
        assert frames.shape == (10, 32, 32, 3) and rate == 10
        level = frames.mean(axis=(1, 2, 3))
        start = meta["extra"]["clip_index"] * 10 / 10.0  # seconds
        times = start + np.arange(10) / 10.0
        if meta["source"].endswith("a.mp4"):  # 30 fps: output frame at t shows source frame 30 t
            np.testing.assert_allclose(level, np.round(times * 30) * 2, atol=3)
        if meta["source"].endswith("b.mkv"):  # 25 fps: latest source frame at or before t
            np.testing.assert_allclose(level, np.floor(times * 25 + 1e-6) * 3, atol=3)
        if meta["source"].endswith("thirds.webm"):
            mid = frames[5, 16]
            assert mid[4, 0] > 200 and mid[16, 1] > 200 and mid[28, 2] > 200  # red | green | blue
            assert mid[4, 1] < 60 and mid[28, 0] < 60
    assert {k: sorted(v) for k, v in by_source.items()} == {
        "a.mp4": [0, 1, 2],
        "b.mkv": [0, 1],
        "c.avi": [0, 1],
        "thirds.webm": [0],
    }
    assert not (out / "failures.jsonl").read_text()


def test_workers_1_and_2_give_identical_bytes(tmp_path):
    for i in range(4):
        write_video(tmp_path / f"v{i}.mp4", gray_ramp(20 + 5 * i, 48, 64, 5), 10 + 5 * i)
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        wm(
            "ingest",
            "videos",
            str(tmp_path / "v*.mp4"),
            "--out",
            str(out),
            "--resolution",
            "16",
            "--clip-seconds",
            "0.5",
            "--samples-per-shard",
            "1",
            "--workers",
            workers,
            check_rc=0,
        )
        outs.append(out)
    names = sorted(p.name for p in outs[0].glob("shard-*.tar"))
    assert len(names) == 4
    for name in names + ["manifest.json"]:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_bad_inputs_become_failure_rows(tmp_path):
    rng = np.random.default_rng(0)
    good = write_video(tmp_path / "good.mp4", gray_ramp(20, 32, 32, 10), 10)
    moving = rng.integers(0, 255, (40, 48, 48, 3), dtype=np.uint8)  # noise: large packets, easy to cut
    whole = write_video(tmp_path / "whole.mp4", moving, 10).read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # index (moov) at the end: lost
    fast = write_video(tmp_path / "faststart.mp4", moving, 10, options={"movflags": "+faststart"}).read_bytes()
    (tmp_path / "truncated_faststart.mp4").write_bytes(fast[: len(fast) * 6 // 10])  # index first: 2 s of 4 kept
    (tmp_path / "junk.mp4").write_bytes(rng.integers(0, 255, 4000, dtype=np.uint8).tobytes())
    (tmp_path / "empty.mkv").write_bytes(b"")
    with av.open(str(tmp_path / "zero_frames.mp4"), "w") as c:  # a stream, never a frame
        s = c.add_stream("libx264", rate=10)
        s.width = s.height = 32
        c.start_encoding()  # writes the header: a valid file that holds no frame
    (tmp_path / "notes.txt").write_text("hello")
    bad = {
        "truncated.mp4": "not a readable media file",
        "truncated_faststart.mp4": "kept 2 clip",
        "junk.mp4": "not a readable media file",
        "empty.mkv": "empty file",
        "zero_frames.mp4": "no video stream",
        "notes.txt": "not a readable media file",
        "missing.mp4": "no such file",
    }
    out = tmp_path / "out"
    paths = [str(good)] + [str(tmp_path / n) for n in bad]
    proc = wm("ingest", "videos", *paths, "--out", str(out), "--clip-seconds", "1", "--resolution", "16", check_rc=3)
    assert proc.stdout.strip().splitlines()[-1].endswith(f"7 failure(s) (see {out}/failures.jsonl)")
    rows = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    reasons = {Path(r["source"]).name: r["reason"] for r in rows}
    assert set(reasons) == set(bad)
    for name, expected in bad.items():
        assert expected in reasons[name], (name, reasons[name])
    sources = sorted(Path(json.loads(m["meta.json"])["source"]).name for m in read_samples(out).values())
    assert sources == ["good.mp4", "good.mp4", "truncated_faststart.mp4", "truncated_faststart.mp4"]


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        write_video(src / f"v{i:02d}.mp4", gray_ramp(30, 64, 64, 8), 15)
    args = [
        str(src),
        "--resolution",
        "32",
        "--fps",
        "15",
        "--clip-seconds",
        "0.5",
        "--samples-per-shard",
        "1",
        "--workers",
        "2",
    ]
    ref = tmp_path / "ref"
    wm("ingest", "videos", *args, "--out", str(ref), check_rc=0)

    out = tmp_path / "out"
    # its own session, so that kill -9 reaches the spawned worker processes too
    proc = subprocess.Popen(
        [sys.executable, "-m", "wm_pipeline", "ingest", "videos", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("shard-*.stats.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("shard-*.stats.json")))
    assert 1 <= done < 12, f"kill landed after {done} of 12 shards: cannot test resume"
    assert not (out / "manifest.json").exists()

    proc = wm("ingest", "videos", *args, "--out", str(out), check_rc=0)
    assert "resuming" in proc.stderr
    assert read_samples(out) == read_samples(ref)
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()


def test_usage_errors_are_one_line(tmp_path):
    write_video(tmp_path / "a.mp4", gray_ramp(10, 32, 32, 10), 10)
    for extra in (["--resolution", "33"], ["--clip-seconds", "0.01"], ["--camera", "a.b"]):
        proc = wm("ingest", "videos", str(tmp_path / "a.mp4"), "--out", str(tmp_path / "o"), *extra, check_rc=2)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = wm("ingest", "videos", str(tmp_path / "nothing*.mp4"), "--out", str(tmp_path / "o"), check_rc=2)
    assert "no video found" in proc.stderr
    help_text = wm("ingest", "videos", "--help", check_rc=0).stdout
    for option in ("--resolution", "--fps", "--clip-seconds", "--workers", "--samples-per-shard", "--camera"):
        assert option in help_text
