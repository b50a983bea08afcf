"""Datasets read from where clusters keep them: a real HTTP server, a local S3-compatible server (moto,
started here), and ``pipe:`` commands; the same windows come out as from the folder, sidecars are read
from and written to them, and an unreadable location is a one-line error naming the URL.

Nothing leaves the machine: both servers listen on 127.0.0.1 ports picked here.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from shards.format import FormatError, read_manifest
from shards.location import Location, LocationError, locate
from shards.sidecar import read_sidecar, sidecar_done, write_labeller_info, write_sidecar_shard
from shards.stream import WindowStream, iter_samples
from shards.writer import Episode, run_sharded_job

LENGTHS = [20, 13, 17, 9, 24]
BUCKET = "wm-test"


def _episode(i: int) -> list[Episode]:
    n = LENGTHS[i]
    t = np.arange(n)
    frames = np.zeros((n, 32, 32, 3), np.uint8)
    frames[..., 0] = (t * 9 % 256)[:, None, None]
    frames[:, 8:16, 8:16, 1] = 40 * i
    action = np.stack([t, np.full(n, i), np.sin(t), np.cos(t)], 1).astype(np.float32)
    return [
        Episode(
            key=f"ep{i}", frames={"front": frames}, fps=10.0, embodiment="sawyer", task=f"task{i % 2}", action=action
        )
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """5 real encoded episodes in 3 shards, with a sidecar 'lam' (per-frame rows) beside them."""
    root = tmp_path_factory.mktemp("remote") / "ds"
    result = run_sharded_job(
        root, list(range(len(LENGTHS))), _episode, samples_per_shard=2, workers=1, created_by="tests", desc="remote"
    )
    assert result.exit_code == 0, result.failures
    for entry in read_manifest(root)["shards"]:
        rows = {k: {"z": np.full((LENGTHS[int(k[2:])], 3), int(k[2:]), np.float32)} for k in entry["keys"]}
        write_sidecar_shard(root, "lam", entry["name"], rows)
    write_labeller_info(root, "lam", {"checkpoint": "test"})
    return root


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def http_url(data):
    """``python -m http.server``'s handler on a thread, serving the folder that holds the dataset."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(data.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{data.name}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def s3(data):
    """A moto S3 server in its own process; credentials and endpoint only through the standard
    environment variables (inherited by the `wm` subprocesses). Yields (s3fs filesystem, dataset URL)."""
    s3fs = pytest.importorskip("s3fs", reason="s3fs not installed (pip install 'wm-pipeline[remote]')")
    server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(server).exists():
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = _free_port()
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("moto_server did not start")
                time.sleep(0.1)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        fs.put(str(data), f"{BUCKET}/ds", recursive=True)
        yield fs, f"s3://{BUCKET}/ds"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _windows(where, **kw) -> list[tuple]:
    """Every label-mode window as comparable tuples (key, start, frames bytes, action bytes, labels)."""
    out = []
    for w in WindowStream(where, window=4, stride=2, mode="label", **kw):
        labels = tuple(w[k].numpy().tobytes() for k in sorted(w) if k.split(".")[0] in kw.get("labels", ()))
        out.append((w["key"], w["start"], w["frames"].numpy().tobytes(), w["action"].numpy().tobytes(), labels))
    return out


# ---------------------------------------------------------------- locations


def test_locate_keeps_folders_local_and_names_urls(tmp_path):
    assert locate(str(tmp_path)) == tmp_path and locate(f"file://{tmp_path}") == tmp_path
    loc = locate("s3://bucket/ds/")
    assert (
        isinstance(loc, Location)
        and str(loc / "labels/lam" / "shard-000000.tar") == "s3://bucket/ds/labels/lam/shard-000000.tar"
    )
    assert (loc / "shard-000001.tar").with_name("x.json").url == "s3://bucket/ds/x.json"
    pipe = locate("pipe:curl -sf https://h/ds/{}")
    assert str(pipe / "manifest.json") == "pipe:curl -sf https://h/ds/manifest.json"
    with pytest.raises(LocationError, match=r"pipe:cat x: a pipe: dataset needs '\{\}'"):
        locate("pipe:cat x")
    with pytest.raises(LocationError, match="not a name inside a dataset"):
        loc / "../etc"


# ---------------------------------------------------------------- http


def test_http_stream_yields_exactly_the_folders_windows(data, http_url):
    local = _windows(data, labels=("lam",))
    assert len(local) > 10 and all(w[4] for w in local)  # labels joined
    assert _windows(http_url, labels=("lam",)) == local


def test_http_whole_episodes_and_train_mode(data, http_url):
    remote = {s.key: s for s in iter_samples(http_url, split=False)}
    for s in iter_samples(data, split=False):
        assert np.array_equal(remote[s.key].frames.numpy(), s.frames.numpy())
        assert np.array_equal(remote[s.key].action, s.action)
        assert str(remote[s.key].shard).startswith(http_url)
    it = iter(WindowStream(http_url, window=4, windows_per_episode=2, shuffle_buffer=4))
    keys = {next(it)["key"] for _ in range(40)}
    assert keys <= {f"ep{i}" for i in range(len(LENGTHS))} and len(keys) >= 3


def test_missing_manifest_at_a_url_is_one_line_naming_it(http_url):
    url = http_url.rsplit("/", 1)[0] + "/nothing-here"
    with pytest.raises(FormatError) as e:
        read_manifest(url)
    assert str(e.value).startswith(f"{url}/manifest.json: no manifest") and "\n" not in str(e.value)
    with pytest.raises(FormatError, match=f"{url}/manifest.json: no manifest"):
        WindowStream(url, window=4)


def test_a_missing_shard_at_a_url_names_it(data, http_url, tmp_path):
    part = tmp_path / "srv" / "part"
    shutil.copytree(data, part)
    (part / "shard-000001.tar").unlink()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(part.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/part"
        with pytest.raises(LocationError) as e:
            list(WindowStream(url, window=4, mode="label"))
        assert str(e.value).startswith(f"{url}/shard-000001.tar: cannot read (FileNotFoundError")
        assert "\n" not in str(e.value)
    finally:
        server.shutdown()
        server.server_close()


def test_sidecars_cannot_be_written_to_http(data, http_url):
    entry = read_manifest(data)["shards"][0]
    with pytest.raises(LocationError, match=f"{http_url}/labels/x: cannot write to an http:// location"):
        write_sidecar_shard(http_url, "x", entry["name"], {k: {"z": np.zeros(3)} for k in entry["keys"]})


# ---------------------------------------------------------------- pipe:


def test_pipe_stream_yields_exactly_the_folders_windows(data):
    assert _windows(f"pipe:cat {data}/{{}}", labels=("lam",)) == _windows(data, labels=("lam",))


def test_pipe_command_failure_is_one_line_naming_the_command(data, tmp_path):
    with pytest.raises(FormatError, match=f"pipe:cat {tmp_path}/manifest.json: no manifest"):
        read_manifest(f"pipe:cat {tmp_path}/{{}}")
    # the manifest reads, the shard command fails: its exit status and stderr are in the message
    cmd = f"pipe:sh -c 'case $0 in *.tar) echo boom >&2; exit 7;; *) cat {data}/$0;; esac' {{}}"
    with pytest.raises(LocationError) as e:
        list(WindowStream(cmd, window=4, mode="label"))
    assert "shard-000000.tar" in str(e.value) and "exited with status 7: boom" in str(e.value)


# ---------------------------------------------------------------- s3 (moto)


def test_s3_stream_yields_exactly_the_folders_windows(data, s3):
    fs, url = s3
    assert _windows(url, labels=("lam",)) == _windows(data, labels=("lam",))


def test_sidecars_are_written_to_and_read_back_from_s3(data, s3):
    fs, url = s3
    entry = read_manifest(url)["shards"][1]
    rows = {k: {"y": np.arange(4, dtype=np.int16) + i} for i, k in enumerate(entry["keys"])}
    stats = write_sidecar_shard(url, "probe", entry["name"], rows)
    assert fs.exists(f"{BUCKET}/ds/labels/probe/{entry['name']}") and sidecar_done(url, "probe", entry["name"])
    assert stats["bytes"] == fs.size(f"{BUCKET}/ds/labels/probe/{entry['name']}")
    back = read_sidecar(url, "probe", entry["name"])
    assert sorted(back) == sorted(rows) and all(np.array_equal(back[k]["y"], rows[k]["y"]) for k in rows)


def test_a_local_sidecar_for_a_remote_dataset_checks_keys_against_the_remote_manifest(s3, tmp_path):
    fs, url = s3
    entry = read_manifest(url)["shards"][0]
    rows = {k: {"y": np.zeros(2)} for k in entry["keys"]}
    write_sidecar_shard(tmp_path, "out", entry["name"], rows, video=url)
    assert sidecar_done(tmp_path, "out", entry["name"]) and not fs.exists(f"{BUCKET}/ds/labels/out")
    with pytest.raises(FormatError, match="keys must equal the video shard's 2 keys"):
        write_sidecar_shard(tmp_path, "out", entry["name"], {"ep0": {"y": np.zeros(2)}}, video=url)


def test_missing_s3_object_is_one_line_naming_it(s3):
    fs, url = s3
    with pytest.raises(FormatError, match=f"s3://{BUCKET}/nope/manifest.json: no manifest"):
        read_manifest(f"s3://{BUCKET}/nope")


# ---------------------------------------------------------------- the wm CLI


def _wm(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "wm_pipeline", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_wm_inspect_verifies_a_dataset_over_http_and_s3(data, http_url, s3, tmp_path):
    import json

    for url in (http_url, s3[1]):
        proc = _wm("inspect", url, "--json", "--verify", "--sheet", str(tmp_path / "sheet.png"))
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert (out["path"], out["samples"], out["shards"]) == (url, len(LENGTHS), 3)
        assert out["problems"] == [] and out["verify"]["problems"] == [] and out["verify"]["samples"] == len(LENGTHS)
        assert len(out["contact_sheet"]["rows"]) == 4 and (tmp_path / "sheet.png").stat().st_size > 0
    missing = http_url + "-missing"
    proc = _wm("inspect", missing)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert f"{missing}/manifest.json: no manifest" in proc.stderr


@pytest.fixture(scope="module")
def lam(data, tmp_path_factory):
    """A LAM run trained (3 steps) on the local folder, and the sidecars it writes for that folder."""
    from wm_pipeline.cli.main import main

    root = tmp_path_factory.mktemp("lam")
    assert (
        main(
            [
                "train",
                "lam",
                "--data",
                str(data),
                "--out",
                str(root / "run"),
                "--preset",
                "tiny",
                "train.max_steps=3",
                "train.ckpt_every=3",
                "train.progress=false",
                "model.frame_gap=2",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "label",
                "--labeller",
                str(root / "run"),
                "--data",
                str(data),
                "--labels-out",
                str(root / "ref"),
                "--name",
                "lamx",
                "--no-progress",
            ]
        )
        == 0
    )
    ref = {p.name: p.read_bytes() for p in sorted((root / "ref" / "labels" / "lamx").glob("shard-*.tar"))}
    assert len(ref) == 3 and not (data / "labels" / "lamx").exists()  # --labels-out: nothing beside the data
    return root / "run", ref


def test_wm_label_reads_http_and_writes_its_sidecars_to_a_local_folder(http_url, lam, tmp_path):
    from wm_pipeline.cli.main import main

    run, ref = lam
    assert (
        main(
            [
                "label",
                "--labeller",
                str(run),
                "--data",
                http_url,
                "--labels-out",
                str(tmp_path),
                "--name",
                "lamx",
                "--no-progress",
            ]
        )
        == 0
    )
    got = {p.name: p.read_bytes() for p in sorted((tmp_path / "labels" / "lamx").glob("shard-*.tar"))}
    assert got == ref  # byte-identical to labelling the folder
    # http cannot take the sidecars: refused before any work, one line
    proc = _wm("label", "--labeller", str(run), "--data", http_url, "--name", "lamx", "--no-progress")
    assert proc.returncode == 2 and "--labels-out" in proc.stderr and http_url in proc.stderr


def test_wm_label_reads_s3_and_writes_its_sidecars_beside_it_on_s3(s3, lam, data, tmp_path):
    from wm_pipeline.cli.main import main

    fs, url = s3
    run, ref = lam
    assert main(["label", "--labeller", str(run), "--data", url, "--name", "lamx", "--no-progress"]) == 0
    got = {name: fs.cat_file(f"{BUCKET}/ds/labels/lamx/{name}") for name in ref}
    assert got == ref and fs.exists(f"{BUCKET}/ds/labels/lamx/labeller.json")
    # a rerun finds every shard complete on s3 and labels nothing
    from wm_pipeline.jobs.labelling import label_dataset

    assert label_dataset(str(run), url, "lamx", progress=False)["shards"] == 0
    # and the stream joins them from s3 as it does the same sidecars in a local copy of the dataset
    local = tmp_path / "ds"
    shutil.copytree(data, local)
    fs.get(f"{BUCKET}/ds/labels/lamx", str(local / "labels" / "lamx"), recursive=True)
    windows = _windows(url, labels=("lamx",))
    assert windows and all(w[4] for w in windows) and windows == _windows(local, labels=("lamx",))


def test_dataloader_workers_stream_from_s3(data, s3):
    """Two forked DataLoader workers, each opening its own S3 connections: the label pass over s3://
    still delivers every window exactly once, equal to the folder's."""
    from shards.stream import make_loader

    fs, url = s3

    def windows(where):
        loader = make_loader(WindowStream(where, window=4, stride=2, mode="label"), batch_size=3, num_workers=2)
        return sorted(
            (k, int(s), f.numpy().tobytes()) for b in loader for k, s, f in zip(b["key"], b["start"], b["frames"])
        )

    assert windows(url) == windows(data)


def test_wm_probe_reads_a_url_and_scores_as_on_the_folder(data, http_url, lam, tmp_path):
    import json

    from wm_pipeline.cli.main import main

    run, _ = lam
    scores = []
    for where, out in ((data, tmp_path / "local"), (http_url, tmp_path / "http")):
        assert main(["probe", "--labeller", str(run), "--data", str(where), "--out", str(out)]) == 0
        result = json.loads((out / "probe.json").read_text())
        assert result["data"] == str(where) and result["episodes"] == len(LENGTHS)
        scores.append({k: v for k, v in result.items() if k not in ("data", "png", "json", "held_out")})
    assert scores[0] == scores[1]
