"""The shard format: names, schema version, and validation of what a reader sees.

A dataset is a folder::

    manifest.json                 schema, shard list, per-embodiment dims and normalisation stats
    shard-000000.tar              WebDataset tar, one sample per episode or clip
    shard-000000.stats.json       written last, atomically: the shard's completion marker
    failures.jsonl                one row per input that could not be ingested
    labels/<labeller>/...         sidecar shards joined by sample key (see ``shards.sidecar``)

Members of one sample ``<key>`` inside a tar (keys contain no dots)::

    <key>.<camera>.mp4            H.264, constant fps, pts from 0, short GOP
    <key>.meta.json               see ``SampleMeta``
    <key>.action.npy              float32 [n_frames, A]: the action taken after seeing frame t (optional)
    <key>.state.npy               float32 [n_frames, S] (optional)

docs/FORMAT.md is the prose version of this file; the two change together, and any change to
what a reader may see bumps ``SCHEMA_VERSION``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
SCHEMA_NAME = "wm-shards"

MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
LABELS_DIR = "labels"
LABELLER_INFO = "labeller.json"
META = "meta.json"
ACTION = "action.npy"
STATE = "state.npy"
VIDEO_EXT = "mp4"

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")


class FormatError(ValueError):
    """A dataset on disk does not follow the shard format; the message names the file."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def stats_name(index: int) -> str:
    return f"shard-{index:06d}.stats.json"


def shard_index(name: str) -> int:
    m = _SHARD_RE.match(Path(name).name)
    if not m:
        raise FormatError(f"{name}: not a shard name (expected shard-NNNNNN.tar)")
    return int(m.group(1))


def check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise FormatError(f"sample key {key!r}: keys may only hold letters, digits, '_' and '-' (no dots)")
    return key


def video_member(camera: str) -> str:
    return f"{camera}.{VIDEO_EXT}"


@dataclasses.dataclass
class SampleMeta:
    """`meta.json` of one sample (episode or clip)."""

    key: str
    fps: float
    n_frames: int
    height: int
    width: int
    cameras: list[str]
    embodiment: str  # robot name for demos; "video" for action-free clips of unknown source
    task: str = ""
    instruction: str = ""
    source: str = ""  # the input file or generator this sample came from
    success: bool | None = None
    has_action: bool = False
    action_dim: int = 0
    state_dim: int = 0
    episode_index: int = -1
    seed: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str, where: str = "meta.json") -> SampleMeta:
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # flipped bytes may break the UTF-8 too
            raise FormatError(f"{where}: not valid JSON ({e})") from None
        return validate_meta(raw, where)


_META_TYPES = {
    "key": str,
    "fps": (int, float),
    "n_frames": int,
    "height": int,
    "width": int,
    "cameras": list,
    "embodiment": str,
    "task": str,
    "instruction": str,
    "source": str,
    "success": (bool, type(None)),
    "has_action": bool,
    "action_dim": int,
    "state_dim": int,
    "episode_index": int,
    "seed": (int, type(None)),
    "extra": dict,
    "schema": int,
}


def validate_meta(raw: dict[str, Any], where: str) -> SampleMeta:
    if not isinstance(raw, dict):
        raise FormatError(f"{where}: a JSON {type(raw).__name__}, expected an object")
    fields = {f.name: f for f in dataclasses.fields(SampleMeta)}
    required = [
        n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in raw]
    if missing:
        raise FormatError(f"{where}: missing field(s) {missing}")
    schema = raw.get("schema", SCHEMA_VERSION)
    if isinstance(schema, int) and schema > SCHEMA_VERSION:
        raise FormatError(f"{where}: schema {schema} is newer than this reader ({SCHEMA_VERSION}); upgrade wm-pipeline")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise FormatError(f"{where}: unknown field(s) {unknown}")
    for name, value in raw.items():
        types = _META_TYPES[name]
        bad_bool = isinstance(value, bool) and types in (int, (int, float))
        if (
            bad_bool
            or not isinstance(value, types)
            or (name == "cameras" and not all(isinstance(c, str) for c in value))
        ):
            raise FormatError(f"{where}: field {name!r} is {value!r}, of the wrong type")
    meta = SampleMeta(**raw)
    check_key(meta.key)
    if meta.n_frames <= 0:
        raise FormatError(f"{where}: n_frames must be positive, got {meta.n_frames}")
    if not meta.cameras:
        raise FormatError(f"{where}: no cameras listed")
    if meta.has_action and meta.action_dim <= 0:
        raise FormatError(f"{where}: has_action is true but action_dim is {meta.action_dim}")
    if not (meta.fps > 0 and math.isfinite(meta.fps)):
        raise FormatError(f"{where}: fps must be a positive number, got {meta.fps}")
    return meta


# ---------------------------------------------------------------- manifest


def read_manifest(root) -> dict[str, Any]:
    """Read and validate ``manifest.json`` of a dataset: a folder or a URL (``shards.location``)."""
    from .location import locate  # location builds on this module's FormatError

    path = locate(root) / MANIFEST
    if not path.exists():
        raise FormatError(f"{path}: no manifest (is {root} a dataset written by `wm collect` / `wm ingest`?)")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    validate_manifest(manifest, str(path))
    return manifest


def validate_manifest(m: dict[str, Any], where: str) -> None:
    if m.get("format") != SCHEMA_NAME:
        raise FormatError(f"{where}: 'format' is {m.get('format')!r}, expected {SCHEMA_NAME!r}")
    schema = m.get("schema")
    if not isinstance(schema, int) or schema > SCHEMA_VERSION:
        raise FormatError(f"{where}: schema {schema!r} not readable by this version (reads <= {SCHEMA_VERSION})")
    for key in ("shards", "embodiments", "totals"):
        if key not in m:
            raise FormatError(f"{where}: missing {key!r}")
    for s in m["shards"]:
        for k in ("name", "samples", "frames", "bytes", "sha256"):
            if k not in s:
                raise FormatError(f"{where}: shard entry {s.get('name', '?')} lacks {k!r}")
        shard_index(s["name"])
    for name, e in m["embodiments"].items():
        for k in ("action_dim", "state_dim", "fps"):
            if k not in e:
                raise FormatError(f"{where}: embodiment {name!r} lacks {k!r}")


def shard_paths(root) -> list:
    """The dataset's shard files in order, as listed by its manifest (``Path`` or ``Location``)."""
    from .location import locate

    root = locate(root)
    return [root / s["name"] for s in read_manifest(root)["shards"]]
