"""Checkpoints: everything needed to continue a run bit-for-bit, without pickle.

Layout (``RUN/checkpoints/step-0001000/``)::

    model.safetensors          live weights (unwrapped; written by rank 0)
    ema.safetensors            EMA weights
    optimizer.safetensors      optimizer tensors, keyed "state.<param index>.<name>"
    optimizer.json             param groups and non-tensor optimizer state
    scheduler.json             LR scheduler state_dict
    rng-rank00000.safetensors  torch CPU / CUDA generator states of that rank
    rng-rank00000.json         Python and NumPy generator states of that rank
    trainer_state.json         step, data position, counters, world size (written last)

Writes are atomic: all files go to ``step-XXXXXXX.tmp/`` and the directory is renamed into
place when complete, so a crash or ``kill -9`` mid-save leaves the previous checkpoint the
latest complete one. Only the newest ``keep_last`` are kept. Saving and loading are collective:
every rank calls them (each writes / reads its own RNG files).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from pipeline.distributed import barrier
from pipeline.exit_codes import UsageError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_STEP_RE = re.compile(r"^step-(\d{7,})$")


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint, oldest first (``*.tmp`` are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        m = _STEP_RE.match(p.name)
        if m and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


# ---------------------------------------------------------------- optimizer / RNG <-> files

def _optimizer_to_files(state: dict, directory: Path) -> None:
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    _write_json(directory / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def _optimizer_from_files(directory: Path, template: dict) -> dict:
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(directory / "optimizer.safetensors")).items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = meta["param_groups"]
    # JSON turned tuples (AdamW betas) into lists; give them back the live optimizer's types.
    for group, live in zip(groups, template["param_groups"]):
        for k, v in live.items():
            if isinstance(v, tuple) and isinstance(group.get(k), list):
                group[k] = tuple(group[k])
    return {"state": state, "param_groups": groups}


def _rng_to_files(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    save_file(tensors, str(directory / f"rng-rank{rank:05d}.safetensors"))
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    _write_json(directory / f"rng-rank{rank:05d}.json", {
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next]})


def _rng_from_files(directory: Path, rank: int) -> bool:
    path = directory / f"rng-rank{rank:05d}.safetensors"
    if not path.is_file():
        return False
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    states = json.loads((directory / f"rng-rank{rank:05d}.json").read_text())
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    return True


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))


def _fsync_tree(directory: Path) -> None:
    """Flush the files of ``directory`` and the directory entry itself to disk."""
    for p in directory.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- save / load

def save_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module, ema_model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict[str, Any],
                    rank: int = 0, keep_last: int = 3) -> Path:
    """Write the checkpoint of ``step`` atomically (collective: call on every rank).

    ``model`` is the unwrapped live model; ``trainer_state`` is JSON (it gets ``step`` added)."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    _rng_to_files(tmp, rank)
    barrier()
    if rank == 0:
        save_model(model, str(tmp / "model.safetensors"))
        save_model(ema_model, str(tmp / "ema.safetensors"))
        _optimizer_to_files(optimizer.state_dict(), tmp)
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        _write_json(tmp / TRAINER_STATE, {**trainer_state, "step": step})
        _fsync_tree(tmp)
        if final.exists():   # a checkpoint of this step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_tree(final.parent)   # make the rename itself durable
        prune(run_dir, keep_last)
        log.info("checkpoint step %d -> %s", step, final)
    barrier()
    return final


def load_checkpoint(path: str | Path, *, model: torch.nn.Module, ema_model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0) -> dict[str, Any]:
    """Restore everything saved by ``save_checkpoint`` into live objects; returns trainer_state."""
    path = Path(path)
    state = json.loads((path / TRAINER_STATE).read_text())
    load_model(model, str(path / "model.safetensors"), strict=True)
    load_model(ema_model, str(path / "ema.safetensors"), strict=True)
    optimizer.load_state_dict(_optimizer_from_files(path, optimizer.state_dict()))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    if not _rng_from_files(path, rank):
        log.warning("%s has no RNG state for rank %d (world size changed?); keeping the seeded one", path, rank)
    return state


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale ``*.tmp`` dirs."""
    found = complete_checkpoints(run_dir)
    for _, p in found[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def remove_partial(run_dir: str | Path) -> None:
    """Remove ``*.tmp`` checkpoint dirs left by a killed run (call on rank 0 before training)."""
    root = Path(run_dir) / CHECKPOINTS
    for p in root.glob("step-*.tmp") if root.is_dir() else []:
        log.info("removing incomplete checkpoint %s", p)
        shutil.rmtree(p, ignore_errors=True)


def init_weights_file(init: str | Path) -> Path:
    """``model.safetensors`` of a run folder (its ``final/``) or of a ``save_pretrained`` folder."""
    init = Path(init)
    for candidate in (init / "final" / "model.safetensors", init / "model.safetensors"):
        if candidate.exists():
            return candidate
    raise UsageError(f"--init {init}: no final/model.safetensors or model.safetensors there "
                     f"(is it a finished run folder?)")


def load_init_weights(model: torch.nn.Module, init: str | Path) -> None:
    """Warm start for fine-tuning: copy every tensor of ``init`` whose name and shape match.

    Tensors that only one side has (e.g. the adapter of an embodiment seen only in pretraining, or
    a new robot's adapter) or whose shape differs (a larger task vocabulary) keep their fresh
    initialisation; both lists are logged. Nothing matching at all is an error: the run is not of
    this model.
    """
    path = init_weights_file(init)
    source = load_file(str(path))
    own = model.state_dict()
    matched = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise UsageError(f"--init {init}: none of its {len(source)} tensors fit this model; is it a run of "
                         f"the same model and preset?")
    model.load_state_dict(matched, strict=False)
    fresh = sorted(k for k in own if k not in matched)
    unused = sorted(k for k in source if k not in matched)
    log.info("initialised %d/%d tensors from %s; fresh: %s; unused: %s", len(matched), len(own), path,
             ", ".join(fresh[:8]) + (" ..." if len(fresh) > 8 else "") or "none",
             ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else "") or "none")
