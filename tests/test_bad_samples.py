"""One bad sample costs one sample: tampered real shards (flipped header / .npy / meta.json bytes, unsafe
members, dropped samples) lose only the samples they touch, and every loss is named (shard, key, member)
in training (a counted, rate-limited warning), labelling (a failure row, retried on rerun, exit 3 while
failures remain) and `wm inspect --verify` (exit 3 listing the bad members)."""

import io
import itertools
import json
import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.format import FormatError
from shards.sidecar import read_sidecar, read_sidecar_stats
from shards.stream import WindowStream, iter_samples, read_tar_samples
from test_stream import make_dataset
from wm_pipeline.cli.main import main
from wm_pipeline.jobs.labelling import Labeller, register_labeller

KEYS = [f"ep{i}" for i in range(5)]  # test_stream's robot dataset: frames 20, 13, 17, 9, 24
SHARD = "shard-000000.tar"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """All five episodes (two cameras, action + state) in one shard."""
    return make_dataset(tmp_path_factory.mktemp("clean"), per_shard=5)


def _copy(clean: Path, dst: Path) -> Path:
    shutil.copytree(clean, dst, ignore=shutil.ignore_patterns("labels", "contact_sheet.png"))
    return dst / SHARD


def _offsets(tar: Path) -> dict[str, tuple[int, int]]:
    """member name -> (header offset, data offset), read with Python's own tarfile from the clean file."""
    with tarfile.open(tar) as t:
        return {m.name: (m.offset, m.offset_data) for m in t}


def _flip(tar: Path, at: int, n: int = 4) -> None:
    raw = bytearray(tar.read_bytes())
    for i in range(at, at + n):
        raw[i] ^= 0xFF
    tar.write_bytes(bytes(raw))


def _flip_header(tar: Path, member: str) -> None:
    _flip(tar, _offsets(tar)[member][0] + 2)  # inside the name field: the checksum no longer matches


def _label_keys(data: Path, caplog) -> set[str]:
    with caplog.at_level(logging.WARNING, logger="shards.stream"):
        return {w["key"] for w in WindowStream(data, window=4, mode="label", on_error="skip")}


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.mark.parametrize("member", ["ep1.meta.json", "ep1.action.npy", "ep1.front.mp4", "ep1.wrist.mp4"])
def test_a_flipped_tar_header_costs_only_its_sample(clean, tmp_path, caplog, member):
    tar = _copy(clean, tmp_path / "d")
    _flip_header(tar, member)
    # the samples after it are read; the stream reads camera 'front' only, so a lost wrist video costs none
    lost = set() if member == "ep1.wrist.mp4" else {"ep1"}
    assert _label_keys(tmp_path / "d", caplog) == set(KEYS) - lost
    text = _warnings(caplog)
    offset = _offsets(clean / SHARD)[member][0]
    assert f"{SHARD}: unreadable shard data at byte {offset} (damaged tar header; skipped" in text
    assert not lost or f"{SHARD}:ep1: no member {member}" in text  # the sample it cost, by key and member
    with pytest.raises(FormatError, match=f"{SHARD}: unreadable shard data at byte {offset}"):
        list(WindowStream(tmp_path / "d", window=4, mode="label"))  # strict: raised, not swallowed


def test_train_mode_counts_each_bad_sample_once_and_keeps_going(clean, tmp_path, caplog):
    tar = _copy(clean, tmp_path / "d")
    _flip_header(tar, "ep2.meta.json")
    stream = WindowStream(tmp_path / "d", window=4, windows_per_episode=2, shuffle_buffer=4)
    with caplog.at_level(logging.WARNING, logger="shards.stream"):
        windows = list(itertools.islice(iter(stream), 120))  # ~15 passes over the shard
    assert {w["key"] for w in windows} == set(KEYS) - {"ep2"}
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    # two distinct problems (the header, the sample it broke), each warned once despite every pass
    assert len(skips) == 2 and stream.skips.count == 2, skips
    assert any("ep2" in s and "no member ep2.meta.json" in s for s in skips), skips


def test_flipped_npy_header_and_meta_json_bytes_are_skips_not_tracebacks(clean, tmp_path, caplog):
    tar = _copy(clean, tmp_path / "d")
    offsets = _offsets(tar)
    _flip(tar, offsets["ep1.action.npy"][1] + 12)  # inside the .npy header dict
    _flip(tar, offsets["ep3.meta.json"][1] + 1, 2)  # bytes that are not UTF-8 JSON
    assert _label_keys(tmp_path / "d", caplog) == {"ep0", "ep2", "ep4"}
    text = _warnings(caplog)
    assert f"{SHARD}:ep1.action.npy: unreadable" in text and f"{SHARD}:ep3.meta.json: not valid JSON" in text
    records = list(iter_samples(tmp_path / "d", errors="record"))
    assert [(r.key, r.error is None) for r in records] == [(k, k not in ("ep1", "ep3")) for k in KEYS]
    with pytest.raises(FormatError, match="ep1.action.npy"):
        list(iter_samples(tmp_path / "d"))


def _rewrite(tar: Path, drop: str = "", extra: list[tarfile.TarInfo] = (), link: str = "") -> None:
    """Rewrite the tar member by member: without members starting with ``drop``, with ``link`` made a
    symlink to /etc/passwd, and ``extra`` (empty-data) members appended."""
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t]
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        for m, data in members:
            if drop and m.name.startswith(drop):
                continue
            if m.name == link:
                m.type, m.linkname, m.size, data = tarfile.SYMTYPE, "/etc/passwd", 0, b""
            t.addfile(m, io.BytesIO(data))
        for m in extra:
            t.addfile(m, io.BytesIO(b"x" * m.size))


def _member(name: str, size: int = 8) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def test_unsafe_and_non_file_members_are_named_and_never_used(clean, tmp_path, caplog):
    tar = _copy(clean, tmp_path / "a" / "b" / "d")
    _rewrite(
        tar,
        extra=[_member("../../evil.mp4"), _member("/tmp/evil.mp4"), _member("sub/ep9.meta.json")],
        link="ep1.front.mp4",
    )
    assert _label_keys(tmp_path / "a" / "b" / "d", caplog) == set(KEYS) - {"ep1"}
    text = _warnings(caplog)
    for name in ("'../../evil.mp4'", "'/tmp/evil.mp4'", "'sub/ep9.meta.json'"):
        assert f"member {name} at byte" in text and "unsafe member name" in text, name
    assert "member 'ep1.front.mp4' at byte" in text and "a symlink to '/etc/passwd'" in text
    # the sample's own message says what is there, instead of "no camera 'front' (has ['front', ...])"
    assert "no member ep1.front.mp4 for camera 'front' listed in its meta.json" in text
    assert not (tmp_path / "evil.mp4").exists() and not (tmp_path / "a" / "evil.mp4").exists()


def test_samples_the_manifest_lists_but_the_shard_lacks_are_reported(clean, tmp_path, caplog):
    tar = _copy(clean, tmp_path / "d")
    _rewrite(tar, drop="ep3.")  # a valid tar: nothing else says so
    assert [r["__key__"] for r in read_tar_samples(tar)] == ["ep0", "ep1", "ep2", "ep4"]
    assert _label_keys(tmp_path / "d", caplog) == set(KEYS) - {"ep3"}
    assert f"{SHARD}: 1 sample(s) the manifest lists are not in the shard: ['ep3']" in _warnings(caplog)
    with pytest.raises(FormatError, match=r"not in the shard: \['ep3'\]"):
        list(WindowStream(tmp_path / "d", window=4, mode="label"))
    records = {r.key: r.error for r in iter_samples(tmp_path / "d", errors="record")}
    assert set(records) == set(KEYS) and "listed in the manifest but not in the shard" in records["ep3"]


def _wm(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "wm_pipeline", *args], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_inspect_verify_reads_every_member_and_lists_the_bad_ones(clean, tmp_path):
    proc = _wm("inspect", str(clean), "--verify", "--no-sheet", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["verify"]["members"] == 5 * 5 and not json.loads(proc.stdout)["verify"]["problems"]

    tar = _copy(clean, tmp_path / "d")
    _rewrite(tar, link="ep4.wrist.mp4", extra=[_member("../../evil.mp4")])
    offsets = _offsets(tar)
    _flip_header(tar, "ep1.meta.json")
    _flip(tar, offsets["ep2.state.npy"][1] + 12)
    _flip(tar, offsets["ep3.front.mp4"][1] + 600, 400)  # inside the H.264 stream
    assert _wm("inspect", str(tmp_path / "d"), "--no-sheet").returncode == 0  # the summary alone cannot tell
    proc = _wm("inspect", str(tmp_path / "d"), "--verify", "--no-sheet")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    bad = [line for line in proc.stdout.splitlines() if line.startswith("  bad  ")]
    for text in (
        "size or sha256 differs",
        f"unreadable shard data at byte {offsets['ep1.meta.json'][0]}",
        f"{SHARD}:ep1: no member ep1.meta.json",
        f"{SHARD}:ep2.state.npy: unreadable",
        f"{SHARD}:ep3.front.mp4: cannot decode",
        "member 'ep4.wrist.mp4'",
        "member '../../evil.mp4'",
    ):
        assert sum(text in line for line in bad) >= 1, (text, bad)
    assert not any("ep0" in line for line in bad), bad


@pytest.fixture(scope="module")
def labeller(tmp_path_factory):
    """A registered per-frame labeller kind (frame means): the real `wm label` job, no training."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("frame_mean")
    (folder / "config.json").write_text(json.dumps({"labeller_kind": "bad_samples_mean"}))
    save_file({"unused": torch.zeros(1)}, str(folder / "model.safetensors"))

    def load(path, run_config):
        return Labeller(
            kind="bad_samples_mean",
            model=torch.nn.Identity(),
            folder=path,
            window=4,
            tail=0,
            fields={"mean": ((3,), "float32")},
            image_size=(32, 32),
        )

    register_labeller("bad_samples_mean", load, lambda lab, frames, embs: {"mean": frames.float().mean((-1, -2))})
    return folder


def test_label_fails_only_bad_samples_and_reruns_retry_them(clean, labeller, tmp_path, caplog):
    data = tmp_path / "d"
    tar = _copy(clean, data)
    good, offsets = tar.read_bytes(), _offsets(tar)
    _flip_header(tar, "ep1.meta.json")  # Python's tarfile (and WebDataset) stop here
    _flip(tar, offsets["ep3.action.npy"][1] + 12)
    args = ["label", "--labeller", str(labeller), "--data", str(data), "--no-progress"]
    with caplog.at_level(logging.INFO):
        assert main(args) == 3
    stats = read_sidecar_stats(data, "bad_samples_mean", SHARD)
    assert stats["keys"] == ["ep0", "ep2", "ep4"] and [f["key"] for f in stats["failures"]] == ["ep1", "ep3"]
    reasons = {f["key"]: f["reason"] for f in stats["failures"]}
    assert "no member ep1.meta.json" in reasons["ep1"] and "ep3.action.npy: unreadable" in reasons["ep3"]
    assert "None" not in json.dumps(reasons)
    assert "labelled 3 clips" in caplog.text and "(2 failures)" in caplog.text  # what it did, not what it tried

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(args) == 3  # a rerun retries the shard and stays honest
    assert "2 sample(s) failed in an earlier run (ep1, ep3); retrying" in caplog.text

    tar.write_bytes(good)  # the shard repaired: the rerun labels the rest
    assert main(args) == 0
    stats = read_sidecar_stats(data, "bad_samples_mean", SHARD)
    assert stats["keys"] == KEYS and stats["failures"] == []
    rows = read_sidecar(data, "bad_samples_mean", SHARD)
    frames = {s.key: s.frames for s in iter_samples(data, camera="front")}
    np.testing.assert_allclose(rows["ep1"]["mean"], frames["ep1"].float().mean((-1, -2)).numpy(), rtol=1e-6)
