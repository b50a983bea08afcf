"""One stored sample of a shard: parse and check it (``parse_sample`` -> ``EncodedSample``), decode its
frames (``decode_frames``), and name what a shard lacks (``missing_keys``, ``missing_message``).

Used by the stream's read and decode stages (``shards.stages``) and by the whole-episode readers
(``shards.stream.iter_shard_samples``). A malformed sample is a ``FormatError`` naming shard, key and
member; an undecodable video a ``DecodeError`` naming its member.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .decode import decode_video
from .format import ACTION, META, STATE, FormatError, SampleMeta, video_member
from .tar_reader import TarIssue


def _npy(sample: dict[str, Any], name: str, where: str, n_frames: int, dim: int) -> np.ndarray | None:
    if name not in sample:
        return None
    member = f"{where}.{name}"
    try:
        arr = np.load(io.BytesIO(sample[name]), allow_pickle=False)
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub":
            raise ValueError(f"not a numeric array ({type(arr).__name__} {getattr(arr, 'dtype', '')})")
        arr = arr.astype(np.float32, copy=False)
    except Exception as e:  # flipped header bytes raise ValueError, SyntaxError, EOFError, ... from numpy
        raise FormatError(f"{member}: unreadable ({type(e).__name__}: {e})") from None
    if arr.ndim != 2 or arr.shape[0] != n_frames or (dim and arr.shape[1] != dim):
        raise FormatError(f"{member}: shape {list(arr.shape)}, meta.json says [n_frames={n_frames}, {dim or 'D'}]")
    return arr


@dataclasses.dataclass
class EncodedSample:
    """One sample as stored: checked meta, the chosen camera's mp4 bytes, arrays (and its sidecar rows)."""

    key: str
    shard: Path
    meta: SampleMeta
    camera: str
    video: bytes
    action: np.ndarray | None  # float32 [n_frames, A]
    state: np.ndarray | None  # float32 [n_frames, S]
    # sidecar rows of this sample, {labeller: {field: array}}, joined by the stream's reader (shards.stages)
    labels: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.shard}:{self.key}"

    @property
    def video_where(self) -> str:
        """The video member, for decode errors: ``shard:key.<camera>.mp4``."""
        return f"{self.where}.{video_member(self.camera)}"


def _members(raw: dict[str, Any]) -> list[str]:
    return sorted(k for k in raw if not k.startswith("__"))


def parse_sample(raw: dict[str, Any], shard: Path, camera: str | None) -> EncodedSample:
    """Validate one raw tar sample; ``FormatError`` naming shard, key and member when it is malformed."""
    key = raw["__key__"]
    where = f"{shard}:{key}"
    if META not in raw:
        raise FormatError(f"{where}: no member {key}.{META} (the sample has {_members(raw)})")
    meta = SampleMeta.from_json(raw[META], where=f"{where}.{META}")
    if meta.key != key:
        raise FormatError(f"{where}.{META}: says key {meta.key!r}")
    cam = camera or meta.cameras[0]
    if cam not in meta.cameras:
        raise FormatError(f"{where}: no camera {cam!r} (its {META} lists cameras {meta.cameras})")
    if video_member(cam) not in raw:
        raise FormatError(
            f"{where}: no member {key}.{video_member(cam)} for camera {cam!r} listed in its "
            f"{META} (the sample has {_members(raw)})"
        )
    for name, dim, flag in ((ACTION, meta.action_dim, meta.has_action), (STATE, meta.state_dim, meta.state_dim > 0)):
        if flag and name not in raw:
            raise FormatError(
                f"{where}: no member {key}.{name}, but its {META} gives it {name.split('.')[0]} "
                f"dim {dim} (the sample has {_members(raw)})"
            )
    return EncodedSample(
        key,
        shard,
        meta,
        cam,
        raw[video_member(cam)],
        _npy(raw, ACTION, where, meta.n_frames, meta.action_dim),
        _npy(raw, STATE, where, meta.n_frames, meta.state_dim),
    )


def missing_keys(listed: Sequence[str] | None, seen: Collection[str]) -> list[str]:
    """Keys the manifest lists for a shard that reading it did not find, in manifest order."""
    return [k for k in listed or () if k not in seen]


def resize_frames(frames: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> uint8 ``[N, C, *size]`` (bilinear with antialias; no-op when equal)."""
    if size is None or tuple(frames.shape[-2:]) == tuple(size):
        return frames
    x = F.interpolate(frames.float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def frame_size(resize: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``resize`` (an int or (H, W)) as (H, W); None stays None."""
    if resize is None:
        return None
    size = (int(resize), int(resize)) if isinstance(resize, int) else tuple(int(v) for v in resize)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"resize must be a positive int or (H, W), got {resize!r}")
    return size


def decode_frames(
    sample: EncodedSample, indices: np.ndarray | None, backend: str, size: tuple[int, int] | None
) -> torch.Tensor:
    """Frames ``indices`` (all when None) of a sample as uint8 ``[N, C, H, W]``, resized."""
    frames = decode_video(sample.video, indices, backend, source=sample.video_where)
    # one contiguous NCHW copy per episode: windows are then cheap views/copies of it (indexing a
    # permuted view per window costs ~6x more, and far more when torch threads compete for cores)
    return resize_frames(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), size)


def missing_message(shard: Path, keys: list[str], issues: list[TarIssue]) -> str:
    why = f"; the shard is damaged: {issues[0]}" if issues else ""
    return (
        f"{shard}: {len(keys)} sample(s) the manifest lists are not in the shard: "
        f"{keys[:10]}{' ...' if len(keys) > 10 else ''}{why}"
    )
