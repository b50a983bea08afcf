"""Shard stats files and the manifest built from them, with per-embodiment normalisation stats.

``shard-NNNNNN.stats.json`` (written last by ``shards.writer``: the completion marker) holds the
shard's counts, sha256, keys, per-sample info (key, source, embodiment, dims, resolution, ...), its
failure rows, and, per embodiment, per field (``action`` / ``state``) and per
dimension count, an accumulator::

    {"n": rows, "mean": [D], "m2": [D], "min": [D], "max": [D], "rows": [[D], ...]}

``mean``/``m2`` (sum of squared deviations) merge exactly across shards with Chan's formula, in
shard order, so the result does not depend on how many workers wrote the shards. ``rows`` is a
deterministic subsample (evenly spaced rows, at most ``QUANTILE_ROWS`` per shard) from which the
1 % / 99 % quantiles are estimated.

Readers: ``embodiment_stats(data_dir)`` returns the merged stats from ``manifest.json`` as float32
numpy arrays: ``{embodiment: {"action": {"mean": [A], "std": [A], "min", "max", "q01", "q99"},
"state": {... [S]}}}`` (a field is absent when the embodiment has no such data).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .dataset_info import FolderInfo
from .format import SCHEMA_NAME, SCHEMA_VERSION, FormatError, shard_name

QUANTILE_ROWS = 256  # per shard, per embodiment and field: keeps stats.json small (~100 KB)
FIELDS = ("action", "state")
STATS_SCHEMA = 1  # of stats.json; bump when a field changes meaning
STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")


def _compact(values: np.ndarray) -> list:
    """float32 values as the shortest decimal that round-trips (deterministic, small JSON)."""
    return [float(np.format_float_positional(v, unique=True, trim="0")) for v in np.asarray(values, np.float32).ravel()]


def accumulate(arrays: Iterable[np.ndarray]) -> dict[str, Any]:
    """Accumulator of float32 ``[T_i, D]`` arrays (one per sample, in key order)."""
    data = np.concatenate([np.asarray(a, np.float32) for a in arrays], axis=0)
    n, d = data.shape
    x = data.astype(np.float64)
    mean = x.mean(axis=0)
    m2 = ((x - mean) ** 2).sum(axis=0)
    pick = np.unique(np.linspace(0, n - 1, min(n, QUANTILE_ROWS)).round().astype(np.int64))
    return {
        "n": int(n),
        "mean": [float(v) for v in mean],
        "m2": [float(v) for v in m2],
        "min": _compact(data.min(axis=0)),
        "max": _compact(data.max(axis=0)),
        "rows": [_compact(r) for r in data[pick]],
    }


def merge(accs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Merge accumulators (in shard order) into ``{mean, std, min, max, q01, q99}`` lists."""
    n = 0
    mean = m2 = lo = hi = None
    rows = []
    for a in accs:
        na, ma, m2a = a["n"], np.asarray(a["mean"]), np.asarray(a["m2"])
        if n == 0:
            n, mean, m2 = na, ma, m2a
            lo, hi = np.asarray(a["min"]), np.asarray(a["max"])
        else:  # Chan et al.: exact pairwise merge of mean and sum of squared deviations
            delta = ma - mean
            total = n + na
            mean = mean + delta * na / total
            m2 = m2 + m2a + delta**2 * n * na / total
            n = total
            lo, hi = np.minimum(lo, a["min"]), np.maximum(hi, a["max"])
        rows.extend(a["rows"])
    sample = np.asarray(rows, np.float64)
    std = np.sqrt(np.maximum(m2 / n, 0.0))
    return {
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "min": [float(v) for v in lo],
        "max": [float(v) for v in hi],
        "q01": [float(v) for v in np.quantile(sample, 0.01, axis=0)],
        "q99": [float(v) for v in np.quantile(sample, 0.99, axis=0)],
    }


def shard_accumulators(samples: list[tuple[str, dict[str, np.ndarray | None]]]) -> dict[str, Any]:
    """Accumulators of one shard: ``{embodiment: {field: {str(dim): acc}}}``.

    ``samples`` is ``[(embodiment, {"action": [T, A] | None, "state": [T, S] | None}), ...]`` in key
    order. Grouping by dimension count keeps a shard whose samples disagree (to be resolved by
    finalize, which drops the later ones) representable.
    """
    groups: dict[tuple[str, str, int], list[np.ndarray]] = {}
    for embodiment, arrays in samples:
        for field in FIELDS:
            a = arrays.get(field)
            if a is not None:
                groups.setdefault((embodiment, field, int(a.shape[1])), []).append(a)
    out: dict[str, Any] = {}
    for (embodiment, field, dim), arrays in sorted(groups.items()):
        out.setdefault(embodiment, {}).setdefault(field, {})[str(dim)] = accumulate(arrays)
    return out


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_stats_doc(
    index: int, sources: list[str], entries: list[tuple[Any, Any, Any]], failures: list[dict], tar_path: Path
) -> dict[str, Any]:
    """The stats.json of shard ``index``; ``entries`` are ``(SampleMeta, action | None, state | None)``."""
    info = [
        {
            "key": m.key,
            "source": m.source,
            "embodiment": m.embodiment,
            "task": m.task,
            "fps": m.fps,
            "n_frames": m.n_frames,
            "height": m.height,
            "width": m.width,
            "cameras": m.cameras,
            "action_dim": m.action_dim,
            "state_dim": m.state_dim,
        }
        for m, _, _ in entries
    ]
    return {
        "format": SCHEMA_NAME,
        "stats_schema": STATS_SCHEMA,
        "name": shard_name(index),
        "sources": sources,
        "samples": len(entries),
        "frames": sum(m.n_frames for m, _, _ in entries),
        "bytes": tar_path.stat().st_size,
        "sha256": file_sha256(tar_path),
        "keys": [m.key for m, _, _ in entries],
        "sample_info": info,
        "failures": failures,
        "accumulators": shard_accumulators([(m.embodiment, {"action": a, "state": s}) for m, a, s in entries]),
    }


def read_shard_stats(path: Path) -> dict[str, Any]:
    """Read one stats.json; ``FormatError`` naming the file when it is missing or unreadable."""
    if not path.exists():
        raise FormatError(f"{path}: missing (the shard is incomplete; rerun the job to finish it)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if doc.get("format") != SCHEMA_NAME or not isinstance(doc.get("stats_schema"), int):
        raise FormatError(f"{path}: not a {SCHEMA_NAME} shard stats file")
    if doc["stats_schema"] > STATS_SCHEMA:
        raise FormatError(f"{path}: stats_schema {doc['stats_schema']} is newer than this version ({STATS_SCHEMA})")
    for k in ("name", "samples", "frames", "bytes", "sha256", "keys", "sample_info", "failures", "accumulators"):
        if k not in doc:
            raise FormatError(f"{path}: missing {k!r}")
    return doc


def build_manifest(docs: list[dict[str, Any]], created_by: str) -> dict[str, Any]:
    """``manifest.json`` from the stats of every shard (in shard order, already made consistent)."""
    embodiments: dict[str, dict[str, Any]] = {}
    tasks: dict[str, int] = {}
    cameras: set[str] = set()
    resolution = None
    for doc in docs:
        for s in doc["sample_info"]:
            e = embodiments.setdefault(
                s["embodiment"],
                {"action_dim": 0, "state_dim": 0, "fps": s["fps"], "cameras": set(), "samples": 0, "frames": 0},
            )
            e["action_dim"] = e["action_dim"] or s["action_dim"]
            e["state_dim"] = e["state_dim"] or s["state_dim"]
            e["cameras"].update(s["cameras"])
            e["samples"] += 1
            e["frames"] += s["n_frames"]
            cameras.update(s["cameras"])
            if s["task"]:
                tasks[s["task"]] = tasks.get(s["task"], 0) + 1
            resolution = resolution or [s["height"], s["width"]]
    for name, e in embodiments.items():
        e["cameras"] = sorted(e["cameras"])
        e["stats"] = {}
        for field in FIELDS:
            dim = e[f"{field}_dim"]
            accs = [
                d["accumulators"][name][field][str(dim)]
                for d in docs
                if str(dim) in d["accumulators"].get(name, {}).get(field, {})
            ]
            if dim and accs:
                e["stats"][field] = merge(accs)
    shards = [{k: d[k] for k in ("name", "samples", "frames", "bytes", "sha256", "keys")} for d in docs]
    n_failures = sum(len(d["failures"]) for d in docs)
    return {
        "format": SCHEMA_NAME,
        "schema": SCHEMA_VERSION,
        "created_by": created_by,
        "shards": shards,
        "embodiments": embodiments,
        "tasks": dict(sorted(tasks.items())),
        "resolution": resolution,
        "cameras": sorted(cameras),
        "totals": {
            "samples": sum(d["samples"] for d in docs),
            "frames": sum(d["frames"] for d in docs),
            "shards": len(docs),
            "bytes": sum(d["bytes"] for d in docs),
        },
        "failures": n_failures,
    }


def embodiment_stats(data_dir: str | Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Normalisation stats of every embodiment in a dataset, read from its manifest.

    Returns ``{embodiment: {"action": {"mean": float32 [A], "std", "min", "max", "q01", "q99"},
    "state": {... float32 [S]}}}``; fields the embodiment has no data for are absent.
    """
    return {
        name: {field: {k: np.asarray(v, np.float32) for k, v in stats.items()} for field, stats in e.stats.items()}
        for name, e in FolderInfo.read(data_dir).embodiments.items()
    }
