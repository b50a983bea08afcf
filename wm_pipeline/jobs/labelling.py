"""`wm label`: run a trained labeller (LAM, IDM, ...) over a video corpus and write sidecar shards.

    wm label --labeller RUN --data DIR|URL [--labels-out DIR|URL] [--name NAME] [--shards i/N] [--batch-size B]

One sidecar shard per video shard (``DIR/labels/NAME/shard-NNNNNN.tar``, shards/sidecar.py; with
``--labels-out OUT``: ``OUT/labels/NAME/...``, for data that cannot be written, e.g. over http(s):// or
pipe:, see docs/STREAMING.md "Locations"), each
written atomically and marked complete by its ``stats.json``: the job is idempotent per shard, and
a rerun after a kill finishes only what is missing. Sidecar bytes depend only on the labeller, the
video and the batch size (batches never span shards), so a resumed run equals an uninterrupted one.
Each shard is written under its own lock (``labels/NAME/.shard-NNNNNN.lock``, shards/folder_lock.py):
the disjoint ranges of ``--shards i/N`` run side by side, and a job that reaches a shard another live
job is writing stops with a one-line error naming that job (pid, host); a dead job's lock is taken over.

Labellers are pluggable. A *kind* registers how to load a run folder and how to label a batch of
windows::

    register_labeller("vae", load_fn, label_fn, detect=None)
    load_fn(folder: Path, run_config: dict) -> Labeller      # folder: RUN/final (or a save_pretrained dir)
    label_fn(labeller, frames uint8 [B, T, C, H, W], embodiments: list[str]) -> {field: [B, T - tail, ...]}

The built-in kinds are the label faces of the models in ``wm_pipeline.recipes.MODELS`` (``lam``,
``idm``) and ``wm_pipeline.recipes.LABELLERS`` (``vae``); ``register_labeller`` adds a plugin's.
``wm label`` picks the kind from ``RUN/final/run_config.yaml``'s ``model_name``, else from a
``labeller_kind`` key in ``config.json``, else from the model class ``config.json`` names (``_class``),
else from the first ``detect(folder)`` that says True.

Rows. Every per-frame field has ``n_frames`` rows plus a bool ``valid`` [n_frames]. A window of ``T``
frames (``stride`` apart) gives outputs for its first ``T - tail`` positions (``tail``: LAM ``k``,
IDM 1, a per-frame encoder 0). Windows overlap so that every position that can be labelled is
(``hop`` apart; the last window ends on the episode's last frame), and each row is taken from the
window where it sits closest to the centre (the IDM sees most context there; the LAM's pair
encoder gives the same answer in any window). The last ``tail * stride`` rows of an episode stay
``valid=False`` (zeros). With ``stride > 1`` each phase ``p, p + stride, ...`` is labelled on its own.
"""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.batch_keys import VALID
from shards.dataset_info import DatasetInfo, FolderInfo
from shards.model_folder import CLASS_KEY, class_name
from shards.stats import file_sha256
from wm_pipeline.exit_codes import UsageError
from wm_pipeline.run_folder import MODEL_CONFIG, WEIGHTS, run_config_of, weights_folder
from wm_pipeline.weights import loading, model_folders, read_json

log = logging.getLogger(__name__)


@dataclass
class Labeller:
    """A loaded labeller and what it needs from the data (see the module docstring)."""

    kind: str
    model: torch.nn.Module
    folder: Path  # the weights folder (RUN/final)
    window: int  # frames per window
    tail: int  # trailing window positions without an output
    fields: dict[str, tuple[tuple[int, ...], str]]  # field -> (per-row shape, numpy dtype)
    image_size: tuple[int, int]  # (H, W) the model takes
    resize: bool = False  # the training run resized frames: do the same here
    stride: int = 1
    hop: int | None = None  # window starts apart; None: window - tail (no overlap beyond tail)
    camera: str | None = None  # None: the data's first camera
    fps: list[float] = field(default_factory=list)  # fps of the training data (temporal models)
    embodiments: list[str] = field(default_factory=list)  # those it can label; [] = any
    config: dict[str, Any] = field(default_factory=dict)  # recorded in labeller.json
    run_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class LabellerKind:
    kind: str
    load: Callable[[Path, dict], Labeller]
    label: Callable[[Labeller, torch.Tensor, list[str]], dict[str, torch.Tensor]]
    detect: Callable[[Path], bool] | None = None


_KINDS: dict[str, LabellerKind] = {}  # plugins' kinds (register_labeller); the built-in ones are in the registry


def register_labeller(
    kind: str,
    load_fn: Callable[[Path, dict], Labeller],
    label_fn: Callable[[Labeller, torch.Tensor, list[str]], dict[str, torch.Tensor]],
    *,
    detect: Callable[[Path], bool] | None = None,
) -> LabellerKind:
    """Make ``kind`` usable by ``wm label`` / ``wm probe`` (a plugin's; see the module docstring)."""
    _KINDS[kind] = LabellerKind(kind, load_fn, label_fn, detect)
    return _KINDS[kind]


def _kinds() -> dict[str, LabellerKind]:
    """Every labeller kind: the registered models' labeller faces (wm_pipeline.training.registry, the
    built-in table first), the built-in kinds that are not trained models, then the plugins'."""
    from wm_pipeline.training.registry import builtin_labellers, specs

    extra = builtin_labellers()  # reads the built-in table
    kinds = {
        s.name: LabellerKind(s.name, s.labeller.load, s.labeller.label, s.labeller.detect)
        for s in specs()
        if s.labeller is not None
    }
    return {**kinds, **{k.kind: k for k in extra}, **_KINDS}


def labeller_kinds() -> list[str]:
    return sorted(_kinds())


def _kind_of_class(named: object) -> str | None:
    """The registered model whose class config.json names (``_class``), when it labels."""
    from wm_pipeline.training.registry import specs

    return next((s.name for s in specs() if s.labeller is not None and class_name(s.model_cls) == named), None)


def load_labeller(run: str | Path) -> tuple[LabellerKind, Labeller]:
    """Find the kind of ``run`` (a run folder, its ``final/``, or a save_pretrained folder) and load it."""
    run = Path(run)
    if not run.exists():
        raise UsageError(f"labeller {run} does not exist")
    folder = weights_folder(run)
    run_config = run_config_of(folder)
    config = read_json(folder / MODEL_CONFIG)
    if not isinstance(config, dict):
        raise UsageError(f"{folder / MODEL_CONFIG}: not a model config (a JSON object)")
    kinds = _kinds()
    kind = run_config.get("model_name") if run_config.get("model_name") in kinds else config.get("labeller_kind")
    if kind is None:
        kind = _kind_of_class(config.get(CLASS_KEY))  # folders saved before _class: by detect below
    if kind is None:
        kind = next((k for k, spec in kinds.items() if spec.detect is not None and spec.detect(folder)), None)
    if kind not in kinds:
        what = run_config.get("model_name") or config.get("labeller_kind") or "unknown"
        raise UsageError(f"{run}: a '{what}' model is not a labeller; labeller kinds: {', '.join(labeller_kinds())}")
    spec = kinds[kind]
    # the kind's loader reads the weights (and whatever folders its config points at): read errors
    # become one line naming the file
    with loading(model_folders(folder), required=(MODEL_CONFIG, WEIGHTS), what="labeller"):
        return spec, spec.load(folder, run_config)


# ---------------------------------------------------------------- fitting the data


def training_fps(run_config: dict) -> list[float]:
    """fps of the run's training data (from its manifests, when still readable), for the frame-gap check."""
    from shards.format import FormatError

    fps: set[float] = set()
    for path in (run_config.get("data") or {}).get("paths") or []:
        try:
            fps.update(DatasetInfo.read([path]).fps())
        except (FormatError, OSError) as e:
            log.warning("cannot read the labeller's training data %s (%s): frame rate not checked", path, e)
    return sorted(fps)


def check_fits(lab: Labeller, data_dir: Path, info: FolderInfo | dict, run: str) -> str:
    """Fail (UsageError naming both) when the labeller cannot label ``data_dir`` (``info``: its
    ``shards.dataset_info.FolderInfo``, or its manifest); returns the camera."""
    if isinstance(info, dict):
        info = FolderInfo(str(data_dir), info)
    cams = info.cameras
    camera = lab.camera or (cams[0] if cams else None)
    if camera not in cams:
        raise UsageError(f"labeller {run} was trained on camera {lab.camera!r} but {data_dir} has cameras {cams}")
    if info.resolution:
        h, w = info.resolution
        th, tw = lab.image_size
        if lab.resize and h * tw != w * th:
            raise UsageError(
                f"labeller {run} takes {th}x{tw} frames (resized from its data) but {data_dir} is "
                f"{h}x{w}: the aspect ratios differ"
            )
        if not lab.resize and (h, w) != (th, tw):
            raise UsageError(
                f"labeller {run} takes {th}x{tw} frames (trained without resize) but {data_dir} is {h}x{w}"
            )
    mine = info.fps()
    if lab.fps and mine and any(abs(a - b) > 0.01 * b for a in mine for b in lab.fps):
        gap = lab.stride * max(lab.tail, 1)
        raise UsageError(
            f"labeller {run} was trained on {lab.fps} fps video (frame gap {gap} frames = "
            f"{1000 * gap / lab.fps[0]:.1f} ms) but {data_dir} is {mine} fps: the same frame gap "
            f"would span another time interval"
        )
    if lab.embodiments and len(lab.embodiments) > 1:
        unknown = sorted(set(info.embodiments) - set(lab.embodiments))
        if unknown:
            raise UsageError(f"labeller {run} knows embodiments {lab.embodiments} but {data_dir} has {unknown}")
    return camera


def shard_range(n_shards: int, part: tuple[int, int] = (0, 1), rank: int = 0, world: int = 1) -> list[int]:
    """Shard indices of part ``i`` of ``N`` (contiguous, disjoint, covering), then of ``rank`` in it."""
    i, n = part
    lo, hi = i * n_shards // n, (i + 1) * n_shards // n
    size = hi - lo
    return list(range(lo + rank * size // world, lo + (rank + 1) * size // world))


def parse_part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shards {text!r}: expected i/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shards {text!r}: need N >= 1 and 0 <= i < N")
    return i, n


# ---------------------------------------------------------------- windows -> rows


def _starts(m: int, window: int, tail: int, hop: int | None) -> tuple[int, list[int]]:
    """(window length, starts) tiling a sequence of m frames so that rows 0..m-1-tail are covered."""
    t = min(window, m)
    if t <= tail:
        return t, []
    step = max(1, min(hop or (t - tail), t - tail))
    starts = list(range(0, m - t + 1, step))
    if starts[-1] != m - t:
        starts.append(m - t)
    return t, starts


def label_episodes(
    spec: LabellerKind, lab: Labeller, episodes: list[tuple[torch.Tensor, str]], batch_size: int
) -> list[dict[str, np.ndarray]]:
    """Label whole episodes: ``[(frames uint8 [n, C, H, W], embodiment)]`` -> one row dict per episode
    (``{field: [n, ...], "valid": bool [n]}``). Windows of equal length are batched together."""
    rows = []
    jobs: dict[int, list[tuple]] = {}  # window length -> [(episode, phase rows, start)]
    for e, (frames, _) in enumerate(episodes):
        n = frames.shape[0]
        r = {f: np.zeros((n, *shape), dtype) for f, (shape, dtype) in lab.fields.items()}
        r[VALID] = np.zeros(n, bool)
        r["_best"] = np.full(n, np.inf)  # distance of the chosen window position from its centre
        rows.append(r)
        for p in range(min(lab.stride, n)):
            idx = np.arange(p, n, lab.stride)
            t, starts = _starts(len(idx), lab.window, lab.tail, lab.hop)
            for s in starts:
                jobs.setdefault(t, []).append((e, idx[s : s + t]))
    for t, items in sorted(jobs.items()):
        for b in range(0, len(items), batch_size):
            chunk = items[b : b + batch_size]
            frames = torch.stack([episodes[e][0][torch.from_numpy(idx)] for e, idx in chunk])
            out = spec.label(lab, frames, [episodes[e][1] for e, _ in chunk])
            out = {f: v.detach().cpu().numpy() for f, v in out.items()}
            centre = (t - 1) / 2
            dist = np.abs(np.arange(t - lab.tail) - centre)
            for j, (e, idx) in enumerate(chunk):
                r, where = rows[e], idx[: t - lab.tail]
                better = dist < r["_best"][where]  # strict: ties keep the earlier window
                sel = where[better]
                r["_best"][sel] = dist[better]
                r[VALID][sel] = True
                for f in lab.fields:
                    r[f][sel] = out[f][j][better]
    for r in rows:
        del r["_best"]
    return rows


# ---------------------------------------------------------------- the job


def _prefetch(items: Iterable, size: int = 4) -> Iterator:
    """Run ``items`` in a thread, ``size`` ahead: decoding overlaps the model's forward passes."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def work():
        try:
            for item in items:
                q.put(item)
            q.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def code_version() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    out: dict[str, Any] = {}
    try:
        from importlib.metadata import version

        out["package"] = version("wm-pipeline")
    except Exception:
        out["package"] = None
    try:
        out["git_commit"] = (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def labeller_info(lab: Labeller, run: str, camera: str, batch_size: int) -> dict[str, Any]:
    return {
        "kind": lab.kind,
        "run": str(Path(run).resolve()),
        "checkpoint": str(lab.folder.resolve()),
        "checkpoint_sha256": file_sha256(lab.folder / WEIGHTS),
        "config": lab.config,
        "run_config": lab.run_config,
        "camera": camera,
        "image_size": list(lab.image_size),
        "window": lab.window,
        "stride": lab.stride,
        "tail": lab.tail,
        "hop": lab.hop,
        "batch_size": batch_size,
        "fields": {f: {"shape": ["n_frames", *s], "dtype": d} for f, (s, d) in lab.fields.items()},
        "rows": f"row t labels frame t (transitions t -> t + {lab.tail * lab.stride}); 'valid' marks labelled rows",
        "code_version": code_version(),
    }


def _ensure_info(data_dir, name: str, info: dict[str, Any], write: bool = True) -> None:
    """Write labeller.json once (rank 0 only: ranks would race on its tmp file); refuse to mix labels of
    another checkpoint under the same name."""
    from shards.sidecar import sidecar_dir, write_labeller_info

    path = sidecar_dir(data_dir, name) / "labeller.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("checkpoint_sha256") not in (None, info["checkpoint_sha256"]):
            raise UsageError(
                f"{path}: these labels were made by another checkpoint ({old.get('checkpoint')}); "
                f"use another --name or delete {path.parent}"
            )
        if old.get("checkpoint_sha256") == info["checkpoint_sha256"]:
            if old.get("batch_size") != info["batch_size"]:  # float sums differ in the last bits
                log.warning(
                    "%s: earlier shards were labelled with --batch-size %s, now %s: rows may differ in "
                    "the last bits between shards",
                    path,
                    old.get("batch_size"),
                    info["batch_size"],
                )
            return
    if write:
        write_labeller_info(data_dir, name, info)


def label_shard(
    spec: LabellerKind,
    lab: Labeller,
    data_dir,
    shard: int,
    name: str,
    camera: str,
    batch_size: int,
    backend: str,
    bar=None,
    out=None,
) -> dict[str, Any]:
    """Label one video shard into its sidecar (under ``out``, default ``data_dir``); each malformed,
    undecodable or missing sample becomes a failure row naming shard, key and member, and the others
    are labelled. Returns the sidecar's stats."""
    from shards.format import FormatError, read_manifest
    from shards.sidecar import write_sidecar_shard
    from shards.stream import iter_shard_samples

    entry = read_manifest(data_dir)["shards"][shard]
    size = tuple(lab.image_size) if lab.resize else None
    samples, failures, broken = [], [], None
    try:
        # record mode: every key of the manifest comes back once, labelled-to-be or with its error
        # (malformed, undecodable, or lost in a damaged tar); one bad sample costs that sample only
        for s in _prefetch(
            iter_shard_samples(data_dir, shard, camera=camera, resize=size, backend=backend, errors="record")
        ):
            if s.error is not None:
                failures.append({"key": s.key, "reason": s.error})
            elif lab.embodiments and s.meta.embodiment not in lab.embodiments and len(lab.embodiments) > 1:
                failures.append({"key": s.key, "reason": f"embodiment {s.meta.embodiment!r} unknown to the labeller"})
            else:
                samples.append(s)
    except (FormatError, OSError) as e:  # the shard file itself could not be read
        broken = str(e)
        log.warning("%s: %s", entry["name"], broken)
    seen = {s.key for s in samples} | {f["key"] for f in failures}
    failures += [
        {"key": k, "reason": f"not read: {broken or 'the shard ended before it'}"}
        for k in entry["keys"]
        if k not in seen
    ]
    for f in failures:
        log.warning("%s: not labelled: %s", entry["name"], f["reason"])
    labelled = label_episodes(spec, lab, [(s.frames, s.meta.embodiment) for s in samples], batch_size)
    rows = {s.key: r for s, r in zip(samples, labelled)}
    if bar is not None:
        bar.update(len(entry["keys"]))
    return write_sidecar_shard(data_dir if out is None else out, name, entry["name"], rows, failures, video=data_dir)


def label_shards(
    spec: LabellerKind,
    lab: Labeller,
    data_dir,
    shards: list[int],
    name: str,
    camera: str,
    batch_size: int,
    backend: str,
    bar=None,
    out=None,
) -> int:
    """Label video shards ``shards`` into sidecar ``name``, each under its own lock
    (``shards.sidecar.sidecar_shard_lock``; ``FolderBusy`` naming the holder when another job is
    writing it); a shard that another job completed in the meantime is skipped. Returns the number of
    failure rows."""
    from shards.format import read_manifest
    from shards.sidecar import sidecar_complete, sidecar_shard_lock

    entries = read_manifest(data_dir)["shards"]
    out = data_dir if out is None else out
    failures = 0
    for i in shards:
        with sidecar_shard_lock(out, name, entries[i]["name"]):  # no lock on object stores (docs/STREAMING.md)
            if sidecar_complete(out, name, entries[i]["name"]):
                log.info("%s: labelled by another job meanwhile; skipped", entries[i]["name"])
                if bar is not None:
                    bar.update(len(entries[i]["keys"]))
                continue
            failures += len(
                label_shard(spec, lab, data_dir, i, name, camera, batch_size, backend, bar, out)["failures"]
            )
    return failures


def label_dataset(
    run: str,
    data_dir: str | Path,
    name: str | None = None,
    part: tuple[int, int] = (0, 1),
    batch_size: int = 16,
    backend: str = "auto",
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    labels_out: str | Path | None = None,
) -> dict[str, Any]:
    """Label this process's shards of ``data_dir`` (a folder or a URL, ``shards.location``) with ``run``
    into ``labels_out/labels/NAME`` (default: beside the data); returns counts for the summary."""
    from tqdm import tqdm

    from shards.format import read_manifest
    from shards.location import Location, locate
    from shards.sidecar import labeller_info_lock, sidecar_complete

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    data_dir = locate(data_dir)
    if not isinstance(data_dir, Location) and not data_dir.is_dir():
        raise UsageError(f"data folder {data_dir} does not exist")
    out = locate(labels_out) if labels_out is not None else data_dir
    if isinstance(out, Location) and (out.is_pipe or out.protocol in ("http", "https")):
        raise UsageError(
            f"{out}: sidecars cannot be written to a {out.protocol}: location; pass --labels-out DIR "
            f"(a folder, or an s3:// / gs:// URL)"
        )
    manifest = read_manifest(data_dir)  # a URL without one: a one-line error naming it
    spec, lab = load_labeller(run)
    camera = check_fits(lab, data_dir, FolderInfo(str(data_dir), manifest), run)
    name = name or lab.kind
    info = labeller_info(lab, run, camera, batch_size)
    if rank == 0:  # each task of a Slurm array is a rank 0: they take turns on labeller.json
        with labeller_info_lock(out, name):
            _ensure_info(out, name, info)
    else:
        _ensure_info(out, name, info, write=False)
    mine = shard_range(len(manifest["shards"]), part, rank, world)
    # a shard is redone unless complete without failures: a rerun retries the samples that failed
    todo = [i for i in mine if not sidecar_complete(out, name, manifest["shards"][i]["name"])]
    keys = sum(len(manifest["shards"][i]["keys"]) for i in todo)
    log.info(
        "labelling %d of %d shards (%d already done) of %s with %s '%s' -> %s/labels/%s",
        len(todo),
        len(mine),
        len(mine) - len(todo),
        data_dir,
        lab.kind,
        run,
        out,
        name,
    )
    with (
        torch.inference_mode(),
        tqdm(total=keys, unit="clip", desc=f"label {name}", disable=not progress, dynamic_ncols=True) as bar,
    ):
        failures = label_shards(spec, lab, data_dir, todo, name, camera, batch_size, backend, bar, out)
    # every key of a shard is labelled or a failure row (write_sidecar_shard checks), so this counts
    # the clips actually labelled, not the ones attempted
    return {
        "shards": len(todo),
        "skipped": len(mine) - len(todo),
        "clips": keys - failures,
        "failures": failures,
        "name": name,
        "out": str(out),
    }
