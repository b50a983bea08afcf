"""Look at a shard dataset: counts, normalisation stats, failures, and a contact sheet of frames.

``dataset_summary(root)`` reads only ``manifest.json`` and ``failures.jsonl`` (and stats the shard
files to spot missing or resized ones), so it is instant on any dataset size.
``contact_sheet(root, path)`` decodes a few frames of a few samples spread over the dataset and
writes one PNG grid: a row per sample, ``frames`` evenly spaced frames per row, no gaps, so the
image is ``[rows * H, frames * W]`` pixels at the dataset resolution.
"""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from shards.decode import DecodeError, decode_video
from shards.format import FAILURES, META, FormatError, SampleMeta, read_manifest, video_member

log = logging.getLogger(__name__)

FIRST_FAILURES = 5        # failure reasons shown in the summary
STATS_DIMS = 8            # dims shown per stats row in the table


def dataset_summary(root: str | Path) -> dict[str, Any]:
    """Counts, per-embodiment dims and stats, tasks, failures and shard-file problems of a dataset."""
    root = Path(root)
    manifest = read_manifest(root)
    failures = _read_failures(root / FAILURES)
    problems = []
    for s in manifest["shards"]:
        path = root / s["name"]
        if not path.exists():
            problems.append(f"{s['name']}: missing")
        elif path.stat().st_size != s["bytes"]:
            problems.append(f"{s['name']}: {path.stat().st_size} bytes, the manifest says {s['bytes']}")
    embodiments = {}
    for name, e in manifest["embodiments"].items():
        embodiments[name] = {k: e.get(k) for k in ("samples", "frames", "fps", "action_dim", "state_dim", "cameras")}
        embodiments[name]["stats"] = e.get("stats", {})
    return {
        "path": str(root), "created_by": manifest.get("created_by", ""), "schema": manifest["schema"],
        "shards": manifest["totals"]["shards"], "samples": manifest["totals"]["samples"],
        "frames": manifest["totals"]["frames"], "bytes": manifest["totals"]["bytes"],
        "resolution": manifest.get("resolution"), "cameras": manifest.get("cameras", []),
        "embodiments": embodiments, "tasks": manifest.get("tasks", {}),
        "failures": {"count": len(failures), "first": failures[:FIRST_FAILURES]},
        "problems": problems,
    }


def _read_failures(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append({"source": f"{path}:{n}", "key": None, "reason": "unreadable failure row"})
    return rows


# ---------------------------------------------------------------- contact sheet

def _pick_samples(manifest: dict, n: int) -> list[tuple[str, str]]:
    """``n`` (shard name, key) pairs evenly spread over the whole dataset, in dataset order."""
    everything = [(s["name"], k) for s in manifest["shards"] for k in s.get("keys", [])]
    if len(everything) <= n:
        return everything
    return [everything[i] for i in np.linspace(0, len(everything) - 1, n).round().astype(int)]


def _read_members(tar_path: Path, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """``{key: {member suffix: bytes}}`` for the wanted keys of one shard."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, _, suffix = member.name.partition(".")
            if key in keys and member.isfile():
                out.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return out


def contact_sheet(root: str | Path, path: str | Path, samples: int = 4, frames: int = 8,
                  backend: str = "pyav") -> dict[str, Any]:
    """Write a PNG grid of ``frames`` evenly spaced frames from ``samples`` samples to ``path``.

    Returns ``{"path", "width", "height", "frames_per_row", "rows": [{"shard", "key", "camera", "frames": [indices]}]}``.
    Raises ``FormatError`` when the dataset has no sample or a picked sample cannot be read.
    """
    from PIL import Image  # Pillow comes with matplotlib

    root = Path(root)
    manifest = read_manifest(root)
    picked = _pick_samples(manifest, samples)
    if not picked:
        raise FormatError(f"{root}: the dataset holds no sample to draw")
    by_shard: dict[str, set[str]] = {}
    for shard, key in picked:
        by_shard.setdefault(shard, set()).add(key)
    members = {}
    for shard, keys in by_shard.items():
        try:
            for key, m in _read_members(root / shard, keys).items():
                members[(shard, key)] = m
        except (OSError, tarfile.TarError) as e:
            raise FormatError(f"{root / shard}: unreadable shard ({e})") from None
    tiles, rows = [], []
    for shard, key in picked:
        m = members.get((shard, key))
        where = f"{root / shard}:{key}"
        if m is None or META not in m:
            raise FormatError(f"{where}: sample listed in the manifest but not in the shard")
        meta = SampleMeta.from_json(m[META], f"{where}.{META}")
        camera = meta.cameras[0]
        indices = np.linspace(0, meta.n_frames - 1, min(frames, meta.n_frames)).round().astype(int)
        try:
            video = decode_video(m[video_member(camera)], indices, backend=backend, source=where)
        except (DecodeError, KeyError) as e:
            raise FormatError(f"{where}: cannot draw camera {camera!r}: {e}") from None
        if len(indices) < frames:  # short sample: pad the row with black
            video = np.concatenate([video, np.zeros((frames - len(indices),) + video.shape[1:], np.uint8)])
        tiles.append(np.concatenate(list(video), axis=1))  # [H, frames * W, 3]
        rows.append({"shard": shard, "key": key, "camera": camera, "frames": indices.tolist()})
    width = max(t.shape[1] for t in tiles)
    grid = np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles], axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    log.info("wrote %s (%dx%d)", path, grid.shape[1], grid.shape[0])
    return {"path": str(path), "width": int(grid.shape[1]), "height": int(grid.shape[0]),
            "frames_per_row": frames, "rows": rows}


# ---------------------------------------------------------------- the table

def _fmt_values(values: list[float]) -> str:
    shown = ", ".join(f"{v:.3g}" for v in values[:STATS_DIMS])
    return f"[{shown}{', ...' if len(values) > STATS_DIMS else ''}]"


def format_summary(summary: dict[str, Any], sheet: dict[str, Any] | None = None) -> str:
    """The human-readable report of ``dataset_summary`` (and of the contact sheet, when drawn)."""
    res = summary["resolution"]
    lines = [
        f"dataset    {summary['path']}  (schema {summary['schema']}, made by {summary['created_by'] or '?'})",
        f"shards     {summary['shards']}    samples {summary['samples']}    frames {summary['frames']}    "
        f"bytes {summary['bytes']:,}",
        f"resolution {f'{res[0]}x{res[1]}' if res else '-'}    cameras {', '.join(summary['cameras']) or '-'}",
        "",
        f"{'embodiment':<16}{'samples':>9}{'frames':>10}{'fps':>8}{'action':>8}{'state':>7}  cameras",
    ]
    for name, e in sorted(summary["embodiments"].items()):
        lines.append(f"{name:<16}{e['samples']:>9}{e['frames']:>10}{e['fps']:>8.3g}{e['action_dim']:>8}"
                     f"{e['state_dim']:>7}  {', '.join(e['cameras'] or [])}")
    for name, e in sorted(summary["embodiments"].items()):
        for field, stats in e["stats"].items():
            lines.append(f"\nstats {name}.{field} ({len(stats['mean'])} dims)")
            for stat in ("mean", "std", "min", "max", "q01", "q99"):
                if stat in stats:
                    lines.append(f"  {stat:<5} {_fmt_values(stats[stat])}")
    if summary["tasks"]:
        lines.append("\ntask" + " " * 36 + "samples")
        lines += [f"{task:<40}{n:>7}" for task, n in summary["tasks"].items()]
    f = summary["failures"]
    lines.append(f"\nfailures   {f['count']}")
    lines += [f"  {row.get('source')}{' [' + row['key'] + ']' if row.get('key') else ''}: {row.get('reason')}"
              for row in f["first"]]
    if f["count"] > len(f["first"]):
        lines.append(f"  ... {f['count'] - len(f['first'])} more in {Path(summary['path']) / FAILURES}")
    for p in summary["problems"]:
        lines.append(f"problem    {p}")
    if sheet:
        lines.append(f"\ncontact sheet {sheet['path']} ({sheet['width']}x{sheet['height']}): "
                     f"{len(sheet['rows'])} samples x {sheet['frames_per_row']} frames")
    return "\n".join(lines)
