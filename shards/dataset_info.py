"""What a training run needs to know about its data, read once from the data folders' manifests.

    info = DatasetInfo.read(["data/demos", "data/video"])
    info.robots()        # {"sawyer": EmbodimentInfo(action_dim=4, state_dim=39, stats=..., path="data/demos")}
    info.resolutions()   # {(64, 64)}
    info.tasks()         # ["reach-v3", ...]

One typed object instead of each consumer walking ``manifest["embodiments"]`` itself: the recipes
fill their models' data-dependent fields (action / state dims, normalisation stats, image size,
tasks, camera) from it. ``DatasetInfo`` is also a sequence of the raw manifests (``info[0]``,
``for manifest in info``), which is what a plugin's ``prepare(cfg, manifests)`` was handed before.
The manifest format is docs/CONTRACTS.md "Manifest".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .format import read_manifest


@dataclass(frozen=True)
class EmbodimentInfo:
    """One embodiment of one data folder (``manifest["embodiments"][name]``)."""

    name: str
    path: str  # the data folder it was read from
    action_dim: int  # 0: action-free (video)
    state_dim: int
    fps: float
    cameras: tuple[str, ...] = ()
    samples: int = 0
    frames: int = 0
    stats: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # {"action": {"mean": ...}, "state": ...}

    def stats_f32(self, fields: Sequence[str] | None = None) -> dict[str, dict[str, list[float]]]:
        """The stats as ``shards.stats.embodiment_stats`` gives them (float32 values), as plain lists;
        ``fields``: only these of ``action`` / ``state``."""
        return {
            f: {k: np.asarray(v, np.float32).tolist() for k, v in s.items()}
            for f, s in self.stats.items()
            if fields is None or f in fields
        }


@dataclass(frozen=True)
class FolderInfo:
    """One data folder: its manifest and what the recipes read from it."""

    path: str
    manifest: dict[str, Any]

    @classmethod
    def read(cls, path) -> FolderInfo:
        """One folder (or URL, ``shards.location``) from its manifest (``read_manifest``: FormatError naming it)."""
        return cls(str(path), read_manifest(path))

    @property
    def embodiments(self) -> dict[str, EmbodimentInfo]:
        return {
            name: EmbodimentInfo(
                name=name,
                path=self.path,
                action_dim=int(e["action_dim"]),
                state_dim=int(e.get("state_dim") or 0),
                fps=float(e["fps"]),
                cameras=tuple(e.get("cameras") or ()),
                samples=int(e.get("samples") or 0),
                frames=int(e.get("frames") or 0),
                stats=dict(e.get("stats") or {}),
            )
            for name, e in self.manifest["embodiments"].items()
        }

    @property
    def resolution(self) -> tuple[int, int] | None:
        res = self.manifest.get("resolution")
        return (int(res[0]), int(res[1])) if res else None

    @property
    def cameras(self) -> list[str]:
        return list(self.manifest.get("cameras") or [])

    @property
    def tasks(self) -> dict[str, int]:
        return dict(self.manifest.get("tasks") or {})

    @property
    def samples(self) -> int:
        return int(self.manifest["totals"].get("samples", 0))

    @property
    def episodes(self) -> int:
        return self.samples

    def fps(self) -> list[float]:
        """The distinct frame rates of its embodiments, sorted."""
        return sorted({e.fps for e in self.embodiments.values()})


@dataclass(frozen=True)
class DatasetInfo(Sequence):
    """The data folders of a run, in ``--data`` order (see the module docstring)."""

    folders: tuple[FolderInfo, ...]

    @classmethod
    def read(cls, paths: Sequence[str]) -> DatasetInfo:
        """Read every folder's manifest once (``shards.format.read_manifest``: FormatError naming it)."""
        return cls.from_manifests(paths, [read_manifest(p) for p in paths])

    @classmethod
    def from_manifests(cls, paths: Sequence[str], manifests: Sequence[dict]) -> DatasetInfo:
        return cls(tuple(FolderInfo(str(p), m) for p, m in zip(paths, manifests)))

    # a sequence of the raw manifests (the plugin API before this object)
    def __getitem__(self, i):
        return self.folders[i].manifest

    def __len__(self) -> int:
        return len(self.folders)

    def __iter__(self) -> Iterator[dict]:
        return (f.manifest for f in self.folders)

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.folders]

    @property
    def manifests(self) -> list[dict]:
        return [f.manifest for f in self.folders]

    def embodiments_with_actions(self) -> list[EmbodimentInfo]:
        """Every (folder, embodiment) pair that has actions, in folder then manifest order."""
        return [e for f in self.folders for e in f.embodiments.values() if e.action_dim]

    def robots(self) -> dict[str, EmbodimentInfo]:
        """The embodiments with actions, each as the first folder that has it gives it."""
        out: dict[str, EmbodimentInfo] = {}
        for e in self.embodiments_with_actions():
            out.setdefault(e.name, e)
        return out

    def resolutions(self) -> set[tuple[int, int]]:
        """The distinct frame sizes ``(H, W)`` of the folders (those that record one)."""
        return {f.resolution for f in self.folders if f.resolution}

    def tasks(self) -> list[str]:
        """The union of the folders' task names, sorted (empty names left out)."""
        return sorted({t for f in self.folders for t in f.tasks if t})

    def fps(self) -> list[float]:
        """The distinct frame rates of every embodiment, sorted."""
        return sorted({v for f in self.folders for v in f.fps()})

    @property
    def samples(self) -> int:
        return sum(f.samples for f in self.folders)
