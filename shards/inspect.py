"""Look at a shard dataset: counts, normalisation stats, failures, and a contact sheet of frames.

``dataset_summary(root)`` reads only ``manifest.json`` and ``failures.jsonl`` (and stats the shard
files to spot missing or resized ones), so it is instant on any dataset size.
``verify_dataset(root)`` (``wm inspect --verify``) reads and decodes every member of every shard and
lists each bad one (damaged header, unsafe or non-file member, malformed meta.json / .npy, undecodable
video, a key the manifest lists that the shard lacks).
``contact_sheet(root, path)`` decodes a few frames of a few samples spread over the dataset and
writes one PNG grid: a row per sample, ``frames`` evenly spaced frames per row, no gaps, so the
image is ``[rows * H, frames * W]`` pixels at the dataset resolution.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from shards.decode import DecodeError, decode_video
from shards.format import ACTION, FAILURES, META, STATE, FormatError, SampleMeta, read_manifest, video_member
from shards.location import Location, locate, open_read
from shards.tar_reader import read_tar_samples

log = logging.getLogger(__name__)

FIRST_FAILURES = 5  # failure reasons shown in the summary
STATS_DIMS = 8  # dims shown per stats row in the table


def dataset_summary(root: str | Path) -> dict[str, Any]:
    """Counts, per-embodiment dims and stats, tasks, failures and shard-file problems of a dataset
    (a folder or a URL, ``shards.location``; a ``pipe:`` dataset's shard sizes are not checked: that
    would read every shard)."""
    root = locate(root)
    manifest = read_manifest(root)
    failures = _read_failures(root / FAILURES)
    problems = []
    sized = not (isinstance(root, Location) and root.is_pipe)
    for s in manifest["shards"]:
        path = root / s["name"]
        if not path.exists():
            problems.append(f"{s['name']}: missing")
        elif sized and path.stat().st_size != s["bytes"]:
            problems.append(f"{s['name']}: {path.stat().st_size} bytes, the manifest says {s['bytes']}")
    embodiments = {}
    for name, e in manifest["embodiments"].items():
        embodiments[name] = {k: e.get(k) for k in ("samples", "frames", "fps", "action_dim", "state_dim", "cameras")}
        embodiments[name]["stats"] = e.get("stats", {})
    return {
        "path": str(root),
        "created_by": manifest.get("created_by", ""),
        "schema": manifest["schema"],
        "shards": manifest["totals"]["shards"],
        "samples": manifest["totals"]["samples"],
        "frames": manifest["totals"]["frames"],
        "bytes": manifest["totals"]["bytes"],
        "resolution": manifest.get("resolution"),
        "cameras": manifest.get("cameras", []),
        "embodiments": embodiments,
        "tasks": manifest.get("tasks", {}),
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
    """``{key: {member suffix: bytes}}`` for the wanted keys of one shard (past any damage, which is logged)."""
    issues: list = []
    out = {
        raw["__key__"]: {k: v for k, v in raw.items() if not k.startswith("__")}
        for raw in read_tar_samples(tar_path, issues)
        if raw["__key__"] in keys
    }
    for issue in issues:
        log.warning("%s (run `wm inspect --verify` to check every member)", issue)
    return out


# ---------------------------------------------------------------- verify


def _problem(shard: str, key: str | None, member: str | None, reason: str) -> dict[str, Any]:
    return {"shard": shard, "key": key, "member": member, "reason": reason}


def _verify_sample(raw: dict[str, Any], path: Path, backend: str) -> list[dict[str, Any]]:
    """Problems of one sample: its meta and arrays parse, every camera decodes to n_frames x H x W."""
    from shards.stream import parse_sample

    key, name = raw["__key__"], path.name
    try:
        sample = parse_sample(raw, path, None)
    except FormatError as e:
        return [_problem(name, key, None, str(e))]
    meta, problems = sample.meta, []
    expected = {
        META,
        *(video_member(c) for c in meta.cameras),
        *((ACTION,) if ACTION in raw else ()),
        *((STATE,) if STATE in raw else ()),
    }
    for field in sorted(set(raw) - expected):
        if not field.startswith("__"):
            problems.append(
                _problem(name, key, f"{key}.{field}", f"{path}:{key}.{field}: unexpected member (not in its meta.json)")
            )
    for camera in meta.cameras:
        member = f"{key}.{video_member(camera)}"
        if video_member(camera) not in raw:
            problems.append(
                _problem(name, key, member, f"{path}:{member}: missing (its meta.json lists camera {camera!r})")
            )
            continue
        try:
            frames = decode_video(raw[video_member(camera)], None, backend=backend, source=f"{path}:{member}")
        except DecodeError as e:
            problems.append(_problem(name, key, member, str(e)))
            continue
        if frames.shape[:3] != (meta.n_frames, meta.height, meta.width):
            problems.append(
                _problem(
                    name,
                    key,
                    member,
                    f"{path}:{member}: {frames.shape[0]} frames of "
                    f"{frames.shape[1]}x{frames.shape[2]}, its meta.json says "
                    f"{meta.n_frames} of {meta.height}x{meta.width}",
                )
            )
    return problems


def _size_and_sha256(path) -> tuple[int, str]:
    """Bytes and hex SHA-256 of a local or remote file, read as one stream (a second read of a remote
    shard: ``--verify`` downloads each twice)."""
    h, size = hashlib.sha256(), 0
    with open_read(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def verify_dataset(root: str | Path, backend: str = "pyav") -> dict[str, Any]:
    """Read and decode every member of every shard: headers, names, meta.json, arrays, every camera's
    video, the shard's size and sha256, and its keys against the manifest.

    Returns ``{"shards", "samples", "members", "problems": [{"shard", "key", "member", "reason"}]}``;
    ``key`` / ``member`` are None where the problem is not one sample's (a damaged header, the hash).
    """
    from shards.stream import missing_keys

    root = locate(root)
    manifest = read_manifest(root)
    problems: list[dict[str, Any]] = []
    samples = members = 0
    for entry in manifest["shards"]:
        name, path = entry["name"], root / entry["name"]
        if not path.exists():
            problems.append(_problem(name, None, None, f"{path}: missing"))
            continue
        try:
            changed = _size_and_sha256(path) != (entry["bytes"], entry["sha256"])
        except FormatError as e:
            problems.append(_problem(name, None, None, str(e)))
            continue
        if changed:
            problems.append(
                _problem(
                    name,
                    None,
                    None,
                    f"{path}: size or sha256 differs from the manifest's (the file changed after it was written)",
                )
            )
        issues: list = []
        listed, seen = entry.get("keys"), set()
        try:
            for raw in read_tar_samples(path, issues):
                key = raw["__key__"]
                seen.add(key)
                samples += 1
                members += sum(not k.startswith("__") for k in raw)
                if listed is not None and key not in listed:
                    problems.append(_problem(name, key, None, f"{path}:{key}: a sample the manifest does not list"))
                problems += _verify_sample(raw, path, backend)
        except FormatError as e:  # the file could not be opened or read at all
            problems.append(_problem(name, None, None, str(e)))
        problems += [_problem(name, i.key, i.member, str(i)) for i in issues]
        problems += [
            _problem(name, k, None, f"{path}:{k}: listed in the manifest but not in the shard")
            for k in missing_keys(listed, seen)
        ]
    return {"shards": len(manifest["shards"]), "samples": samples, "members": members, "problems": problems}


def contact_sheet(
    root: str | Path, path: str | Path, samples: int = 4, frames: int = 8, backend: str = "pyav"
) -> dict[str, Any]:
    """Write a PNG grid of ``frames`` evenly spaced frames from ``samples`` samples to ``path``.

    Returns ``{"path", "width", "height", "frames_per_row", "rows": [{"shard", "key", "camera", "frames": [indices]}],
    "skipped": [{"shard", "key", "reason"}]}``: a picked sample that cannot be read is skipped (with a
    warning), so the sheet may have fewer rows. Raises ``FormatError`` when none can be drawn.
    """
    from PIL import Image  # Pillow comes with matplotlib

    root = locate(root)
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
        except OSError as e:
            raise FormatError(f"{root / shard}: unreadable shard ({e})") from None
    tiles, rows, skipped = [], [], []
    for shard, key in picked:
        m = members.get((shard, key))
        where = f"{root / shard}:{key}"
        try:
            if m is None or META not in m:
                raise FormatError(f"{where}: sample listed in the manifest but not in the shard")
            meta = SampleMeta.from_json(m[META], f"{where}.{META}")
            camera = meta.cameras[0]
            indices = np.linspace(0, meta.n_frames - 1, min(frames, meta.n_frames)).round().astype(int)
            try:
                video = decode_video(m[video_member(camera)], indices, backend=backend, source=where)
            except (DecodeError, KeyError) as e:
                raise FormatError(f"{where}: cannot draw camera {camera!r}: {e}") from None
        except FormatError as e:  # a damaged sample costs its row, not the sheet
            log.warning("contact sheet: %s", e)
            skipped.append({"shard": shard, "key": key, "reason": str(e)})
            continue
        if len(indices) < frames:  # short sample: pad the row with black
            video = np.concatenate([video, np.zeros((frames - len(indices),) + video.shape[1:], np.uint8)])
        tiles.append(np.concatenate(list(video), axis=1))  # [H, frames * W, 3]
        rows.append({"shard": shard, "key": key, "camera": camera, "frames": indices.tolist()})
    if not tiles:
        raise FormatError(
            f"{root}: none of the samples picked for the contact sheet can be drawn: {skipped[0]['reason']}"
        )
    width = max(t.shape[1] for t in tiles)
    grid = np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles], axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    log.info("wrote %s (%dx%d)", path, grid.shape[1], grid.shape[0])
    return {
        "path": str(path),
        "width": int(grid.shape[1]),
        "height": int(grid.shape[0]),
        "frames_per_row": frames,
        "rows": rows,
        "skipped": skipped,
    }


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
        lines.append(
            f"{name:<16}{e['samples']:>9}{e['frames']:>10}{e['fps']:>8.3g}{e['action_dim']:>8}"
            f"{e['state_dim']:>7}  {', '.join(e['cameras'] or [])}"
        )
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
    lines += [
        f"  {row.get('source')}{' [' + row['key'] + ']' if row.get('key') else ''}: {row.get('reason')}"
        for row in f["first"]
    ]
    if f["count"] > len(f["first"]):
        lines.append(f"  ... {f['count'] - len(f['first'])} more in {locate(summary['path']) / FAILURES}")
    for p in summary["problems"]:
        lines.append(f"problem    {p}")
    v = summary.get("verify")
    if v is not None:
        lines.append(
            f"\nverify     {v['shards']} shards, {v['samples']} samples, {v['members']} members read and "
            f"decoded: {len(v['problems'])} problem(s)"
        )
        lines += [f"  bad  {p['reason']}" for p in v["problems"]]
    if sheet:
        lines.append(
            f"\ncontact sheet {sheet['path']} ({sheet['width']}x{sheet['height']}): "
            f"{len(sheet['rows'])} samples x {sheet['frames_per_row']} frames"
            + (f" ({len(sheet['skipped'])} unreadable sample(s) left out)" if sheet.get("skipped") else "")
        )
    return "\n".join(lines)
