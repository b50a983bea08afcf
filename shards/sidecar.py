"""Label sidecars: per-shard tars of arrays that a labeller (LAM, IDM) computed for each sample.

Layout beside a video dataset ``<data>``::

    labels/<name>/labeller.json              the checkpoint and config that made the labels
    labels/<name>/shard-NNNNNN.tar           members <key>.<field>.npy, same keys as the video shard
    labels/<name>/shard-NNNNNN.stats.json    written last: the completion marker, counts, failures

Labels never rewrite video shards. Each sidecar shard is written atomically (tmp + rename, then its
stats.json), with fixed tar headers and sorted members, so rerunning a labelling job gives the same
bytes and ``sidecar_complete`` lets it skip finished shards (idempotent, resumable) whose tar has
the size their stats.json records and that hold no failure rows (a rerun retries those).

Every key of the video shard must be either labelled (a row) or reported as a failure: the writer
checks this, so a reader that finds neither knows the sidecar is broken, not the sample unlabelled.
Arrays whose first dim equals the sample's ``n_frames`` are per-frame labels; ``shards.stream``
cuts those to each window.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from .folder_lock import FolderLock
from .format import LABELLER_INFO, LABELS_DIR, MANIFEST, FormatError, check_key, read_manifest, shard_index
from .location import Location, locate, write_atomic

log = logging.getLogger(__name__)

_FIELD_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
SIDECAR_SCHEMA = 1


class SidecarError(FormatError):
    """A sidecar is missing, incomplete or does not match its video shard; the message names both."""


def sidecar_dir(data_dir: str | Path, name: str) -> Path:
    if not _FIELD_RE.match(name):
        raise ValueError(f"labeller name {name!r}: letters, digits, '_' and '-' only")
    return locate(data_dir) / LABELS_DIR / name


def has_sidecar(data_dir, name: str) -> bool:
    """Whether dataset ``data_dir`` has sidecar ``name``: its folder exists (a local folder, or a prefix
    on an object store), or, where folders cannot be listed (``http(s)://``, ``pipe:``), its
    ``labeller.json`` does (``wm label`` always writes one)."""
    folder = sidecar_dir(data_dir, name)
    if not isinstance(folder, Location):
        return folder.is_dir()
    if folder.protocol not in ("http", "https", "pipe") and folder.is_dir():
        return True
    return (folder / LABELLER_INFO).exists()


def sidecar_path(data_dir: str | Path, name: str, shard_name: str) -> Path:
    shard_index(shard_name)  # validates the name
    return sidecar_dir(data_dir, name) / Path(shard_name).name


def _stats_path(tar_path: Path) -> Path:
    return tar_path.with_name(tar_path.name[: -len(".tar")] + ".stats.json")


def sidecar_shard_lock(data_dir: str | Path, name: str, shard_name: str) -> FolderLock:
    """The lock a labelling job holds while it writes one sidecar shard (``labels/<name>/.shard-NNNNNN.lock``).

    Per shard, not per folder: the disjoint ``--shards i/N`` ranges of a Slurm array write one sidecar
    folder side by side, while two jobs that reach the same shard cannot both write it."""
    path = sidecar_path(data_dir, name, shard_name)
    if isinstance(path, Location):  # no locks on object stores: keep --shards ranges disjoint
        return contextlib.nullcontext()
    return FolderLock(path.parent, f".{path.stem}.lock", what=f"sidecar {path}")


def labeller_info_lock(data_dir: str | Path, name: str, wait: float = 120.0) -> FolderLock:
    """Held (briefly, waiting for others) while a job checks and writes ``labels/<name>/labeller.json``."""
    folder = sidecar_dir(data_dir, name)
    if isinstance(folder, Location):
        return contextlib.nullcontext()
    return FolderLock(folder, ".labeller.lock", what=f"{folder / LABELLER_INFO}", wait=wait)


def sidecar_done(data_dir: str | Path, name: str, shard_name: str) -> bool:
    """True when the sidecar shard and its completion marker both exist."""
    path = sidecar_path(data_dir, name, shard_name)
    return path.exists() and _stats_path(path).exists()


def sidecar_complete(data_dir: str | Path, name: str, shard_name: str) -> bool:
    """``sidecar_done``, the tar's size equals the one its stats.json records, and no sample failed: a
    labelling job may skip it. A size mismatch (a stats file that belongs to another write) is logged
    and a shard with failure rows is retried: either way the shard is labelled again."""
    if not sidecar_done(data_dir, name, shard_name):
        return False
    path = sidecar_path(data_dir, name, shard_name)
    try:
        stats = json.loads(_stats_path(path).read_text())
        recorded, failed = stats.get("bytes"), [f.get("key") for f in stats.get("failures", [])]
    except (OSError, ValueError, AttributeError, TypeError):
        recorded, failed = "unreadable", []
    size = path.stat().st_size
    if recorded != size:
        log.warning("%s: %d bytes but its stats.json records %s; it will be labelled again", path, size, recorded)
        return False
    if failed:
        log.info(
            "%s: %d sample(s) failed in an earlier run (%s); retrying the shard",
            path,
            len(failed),
            ", ".join(map(str, failed[:5])) + (" ..." if len(failed) > 5 else ""),
        )
        return False
    return True


def video_shard_keys(data_dir: str | Path, shard_name: str) -> list[str]:
    """Keys of one video shard, from the manifest (which lists them per shard)."""
    for entry in read_manifest(data_dir)["shards"]:
        if entry["name"] == Path(shard_name).name:
            if "keys" not in entry:
                raise FormatError(f"{locate(data_dir) / MANIFEST}: shard {shard_name} lists no keys")
            return list(entry["keys"])
    raise FormatError(f"{locate(data_dir) / MANIFEST}: no shard named {shard_name}")


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, member: str, data: bytes) -> None:
    info = tarfile.TarInfo(member)  # fixed metadata: bytes depend only on names and data
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


_replace_atomic = write_atomic  # local: tmp + fsync + rename; remote: one put


def write_sidecar_shard(
    data_dir: str | Path,
    name: str,
    shard_name: str,
    rows: dict[str, dict[str, np.ndarray]],
    failures: list[dict[str, Any]] = (),
    video=None,
) -> dict[str, Any]:
    """Write ``labels/<name>/<shard_name>`` from ``rows`` {key: {field: array}}; returns its stats.

    ``data_dir`` is where the sidecar goes (a folder, or an ``s3://`` / ``gs://`` URL); ``video`` the
    dataset whose manifest lists the shard's keys, when that is elsewhere (default: ``data_dir``).

    ``failures`` are rows ``{"key", "reason"}`` for samples the labeller could not label. Labelled
    and failed keys together must equal the video shard's keys (checked; ``SidecarError`` otherwise).
    Object arrays are refused (no pickle in sidecars).
    """
    path = sidecar_path(data_dir, name, shard_name)
    where = f"sidecar {name}/{path.name}"
    failures = [dict(f) for f in failures]
    failed = [f.get("key") for f in failures]
    expected = video_shard_keys(data_dir if video is None else video, shard_name)
    got = list(rows) + failed
    if sorted(got) != sorted(expected) or len(set(got)) != len(got):
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        both = sorted(set(rows) & set(failed))[:5]
        raise SidecarError(
            f"{where}: keys must equal the video shard's {len(expected)} keys "
            f"(missing {missing}, unknown {extra}, both labelled and failed {both})"
        )
    fields: dict[str, list[int]] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    _stats_path(path).unlink(missing_ok=True)  # incomplete until the new marker exists
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key in sorted(rows):
            check_key(key)
            for field in sorted(rows[key]):
                if not _FIELD_RE.match(field):
                    raise SidecarError(f"{where}: field name {field!r} of key {key!r} must have no dots")
                arr = np.asarray(rows[key][field])
                if arr.dtype.hasobject:
                    raise SidecarError(f"{where}: {key}.{field} is an object array; labels must be numeric")
                fields.setdefault(field, list(arr.shape[1:]))
                _add(tar, f"{key}.{field}.npy", _npy(arr))
    _replace_atomic(path, buf.getvalue())
    stats = {
        "schema": SIDECAR_SCHEMA,
        "name": path.name,
        "labeller": name,
        "samples": len(rows),
        "keys": sorted(rows),
        "fields": fields,
        "failures": sorted(failures, key=lambda f: str(f.get("key"))),
        "bytes": len(buf.getvalue()),
    }
    _replace_atomic(_stats_path(path), json.dumps(stats, sort_keys=True, separators=(",", ":")).encode())
    return stats


def read_sidecar_stats(data_dir: str | Path, name: str, shard_name: str) -> dict[str, Any]:
    """The sidecar shard's stats.json (keys, fields, failures); ``SidecarError`` when not complete."""
    path = sidecar_path(data_dir, name, shard_name)
    if not sidecar_done(data_dir, name, shard_name):
        raise SidecarError(
            f"{path}: sidecar '{name}' for video shard {shard_name} is missing or incomplete "
            f"(run the labelling job for this shard)"
        )
    try:
        return json.loads(_stats_path(path).read_text())
    except json.JSONDecodeError as e:
        raise SidecarError(f"{_stats_path(path)}: not valid JSON ({e})") from None


def read_sidecar(data_dir: str | Path, name: str, shard_name: str) -> dict[str, dict[str, np.ndarray]]:
    """All labels of one sidecar shard: ``{key: {field: array}}`` (failed keys are absent)."""
    path = sidecar_path(data_dir, name, shard_name)
    read_sidecar_stats(data_dir, name, shard_name)  # raises when incomplete
    rows: dict[str, dict[str, np.ndarray]] = {}
    try:
        remote = isinstance(path, Location)
        with (
            tarfile.open(fileobj=io.BytesIO(path.read_bytes()), mode="r") if remote else tarfile.open(path, "r")
        ) as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, _, rest = info.name.partition(".")
                field, dot, ext = rest.partition(".")
                if not dot or ext != "npy":
                    raise SidecarError(f"{path}: unexpected member {info.name!r} (expected <key>.<field>.npy)")
                data = tar.extractfile(info).read()
                rows.setdefault(key, {})[field] = np.load(io.BytesIO(data), allow_pickle=False)
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise SidecarError(f"{path}: unreadable sidecar ({type(e).__name__}: {e})") from None
    return rows


def write_labeller_info(data_dir: str | Path, name: str, info: dict[str, Any]) -> Path:
    """Record which checkpoint and config made the labels (``labels/<name>/labeller.json``)."""
    path = sidecar_dir(data_dir, name) / LABELLER_INFO
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_atomic(path, json.dumps(info, sort_keys=True, indent=2).encode())
    return path


def read_labeller_info(data_dir: str | Path, name: str) -> dict[str, Any]:
    path = sidecar_dir(data_dir, name) / LABELLER_INFO
    if not path.exists():
        raise SidecarError(f"{path}: no labeller info (labels '{name}' were never written here)")
    return json.loads(path.read_text())
