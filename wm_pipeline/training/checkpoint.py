"""Checkpoints: everything needed to continue a run bit-for-bit, without pickle.

Layout (``RUN/checkpoints/step-0001000/``)::

    model.safetensors          live weights (unwrapped; written by rank 0)
    ema.safetensors            EMA weights
    optimizer.safetensors      optimizer tensors, keyed "state.<param index>.<name>"
    optimizer.json             param groups, non-tensor optimizer state, the parameter name of each index
    scheduler.json             LR scheduler state_dict
    rng-rank00000.safetensors  torch CPU / CUDA generator states of that rank
    rng-rank00000.json         Python and NumPy generator states of that rank
    trainer_state.json         step, data position, counters, world size (written last)

Writes are atomic: all files go to ``step-XXXXXXX.tmp/`` and the directory is renamed into
place when complete, so a crash or ``kill -9`` mid-save leaves the previous checkpoint the
latest complete one. A save that fails (disk full, quota, I/O error: an ``OSError`` or a
safetensors write error) removes its ``.tmp`` folder and raises ``WriteFailed`` naming the file,
on every rank (the ranks agree on the outcome instead of waiting in a barrier). Only the newest
``keep_last`` are kept. Saving and loading are collective: every rank calls them (each writes /
reads its own RNG files).

Resume verifies before it loads (``resume_checkpoint``): the checkpoints are tried newest first,
and one whose files do not all read back (``verify_checkpoint``: every file the loader reads is
there, every safetensors header and tensor reads, every JSON file parses, ``trainer_state.json``
names its step; on any rank) is skipped with a warning naming the file and why. The run resumes
from the newest intact one, and the damaged newer ones are renamed ``step-XXXXXXX.damaged`` (kept
for inspection, no longer counted as checkpoints). When checkpoints exist but none is intact,
nothing is loaded and nothing is deleted: a one-line ``UsageError`` (exit 2) names every bad file;
restarting from scratch is the user's decision (move ``RUN/checkpoints`` away). A checkpoint that
reads but does not fit the model (names, shapes: the model config changed) is a different error,
raised by ``load_checkpoint``.

The optimizer state is saved by parameter index (torch's ``state_dict``), and ``optimizer.json``
records the parameter name of each index (``param_names``, the names of ``model.named_parameters()``).
On resume the saved state is matched to the live parameters by name, after renaming old names with
the model's own renames (``nets.state_dict.current_names``: the ``rename_on_load`` rules a model
registers when its layout changes, e.g. ``worldmodel.uwm.NETWORK_RENAMES``), so a run checkpointed
before a layout change (new parameter order, new names) resumes with each parameter's moments. A
name that matches nothing on either side is a ``ValueError`` naming the checkpoint and the first such
parameter. Checkpoints saved before names were recorded load by index as before; a saved moment whose
shape is not its parameter's (an older parameter order) is a ``ValueError`` pointing to ``--init``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file

from nets.state_dict import current_names
from shards.model_folder import WEIGHTS_METADATA, save_weights
from wm_pipeline.exit_codes import UsageError, WriteFailed
from wm_pipeline.run_folder import CHECKPOINTS, FINAL, STEP_PREFIX, WEIGHTS, step_name
from wm_pipeline.training.distributed import any_rank
from wm_pipeline.weights import UnreadableFile, check_json, check_safetensors, load_safetensors, read_json

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
DAMAGED = ".damaged"  # suffix of a checkpoint folder set aside by resume_checkpoint
# every file load_checkpoint reads (besides the per-rank RNG pair, optional: the world size may change)
FILES = (WEIGHTS, "ema.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", TRAINER_STATE)
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d{{7,}})$")


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / step_name(step)


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


def parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str] | None:
    """The name in ``model`` (``named_parameters``) of each parameter index of ``optimizer.state_dict()``;
    None when a parameter of the optimizer is not one of ``model``'s (then the state is saved by index only)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names: dict[int, str] = {}
    for saved, live in zip(optimizer.state_dict()["param_groups"], optimizer.param_groups):
        for index, p in zip(saved["params"], live["params"]):
            if id(p) not in by_id:
                return None
            names[index] = by_id[id(p)]
    return names


def _optimizer_to_files(state: dict, directory: Path, names: dict[int, str] | None = None) -> None:
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    with _writing(directory / "optimizer.safetensors"):
        save_file(tensors, str(directory / "optimizer.safetensors"), metadata=dict(WEIGHTS_METADATA))
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    if names is not None:
        meta["param_names"] = {str(index): name for index, name in names.items()}
    _write_json(directory / "optimizer.json", meta)


def _optimizer_from_files(directory: Path, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """The optimizer state saved in ``directory`` as a state dict for the live ``optimizer`` of ``model``:
    matched by parameter name when the checkpoint records names, else by index."""
    meta = read_json(directory / "optimizer.json")
    template, names = optimizer.state_dict(), parameter_names(model, optimizer)
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_safetensors(directory / "optimizer.safetensors").items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = meta["param_groups"]
    saved_names = meta.get("param_names")
    if names is not None and saved_names is not None:
        state, groups = _by_name(
            directory, state, groups, {int(i): n for i, n in saved_names.items()}, template, model, names
        )
    if names is not None:
        _check_shapes(directory, state, model, names, by_index=saved_names is None)
    # JSON turned tuples (AdamW betas) into lists; give them back the live optimizer's types.
    # The kernel (optim.impl: fused / foreach) is the live optimizer's, not state: a resume may change it.
    for group, live in zip(groups, template["param_groups"]):
        for k, v in live.items():
            if isinstance(v, tuple) and isinstance(group.get(k), list):
                group[k] = tuple(group[k])
        for k in ("fused", "foreach"):
            if k in live:
                group[k] = live[k]
    return {"state": state, "param_groups": groups}


def _by_name(
    directory: Path,
    state: dict[int, dict],
    groups: list[dict],
    saved_names: dict[int, str],
    template: dict,
    model: torch.nn.Module,
    names: dict[int, str],
) -> tuple[dict, list[dict]]:
    """The saved ``state`` / ``groups`` re-indexed for the live optimizer (``template``, its parameter
    ``names``): each live parameter gets the state saved under its name, old names renamed by the model's
    rules (``current_names``); group hyperparameters by position. A name without a partner is a ValueError."""
    where = directory / "optimizer.json"
    renamed = current_names(model, {name: index for index, name in saved_names.items()})  # name now -> saved index
    if len(renamed) != len(saved_names):
        raise ValueError(f"{where}: two saved parameters have the same name after the model's renames")
    if len(groups) != len(template["param_groups"]):
        raise ValueError(
            f"{where}: {len(groups)} parameter groups saved, the optimizer has {len(template['param_groups'])}"
        )
    saved_group = {index: g for g, group in enumerate(groups) for index in group["params"]}
    new_state: dict[int, dict] = {}
    new_groups, used = [], set()
    for g, (group, live) in enumerate(zip(groups, template["param_groups"])):
        for index in live["params"]:
            saved = renamed.get(names[index])
            if saved is None:
                raise ValueError(
                    f"{where}: no saved state for the model's parameter '{names[index]}' "
                    f"({len(saved_names)} parameters saved)"
                )
            if saved_group.get(saved) != g:
                raise ValueError(
                    f"{where}: the parameter '{names[index]}' was saved in parameter group "
                    f"{saved_group.get(saved)}, the optimizer has it in group {g}"
                )
            used.add(saved)
            if saved in state:
                new_state[index] = state[saved]
        new_groups.append({**group, "params": list(live["params"])})
    unused = sorted((index, name) for name, index in renamed.items() if index not in used)
    if unused:
        index, now = unused[0]
        also = f" (renamed '{now}')" if now != saved_names[index] else ""
        raise ValueError(
            f"{where}: the saved parameter '{saved_names[index]}'{also} is not a parameter of the "
            f"model ({len(unused)} unmatched)"
        )
    return new_state, new_groups


def _check_shapes(
    directory: Path, state: dict[int, dict], model: torch.nn.Module, names: dict[int, str], by_index: bool
) -> None:
    """Every per-parameter tensor of ``state`` (AdamW's moments) has its parameter's shape: a checkpoint
    saved by index only under an older parameter order fails here, at resume, not at the first step."""
    params = dict(model.named_parameters())
    for index, entry in state.items():
        p = params.get(names.get(index, ""))
        for key, value in entry.items() if p is not None else ():
            if torch.is_tensor(value) and value.ndim > 0 and value.shape != p.shape:
                hint = f"; an older parameter order? train from its weights: --init {directory}" if by_index else ""
                raise ValueError(
                    f"{directory / 'optimizer.safetensors'}: state.{index}.{key} {list(value.shape)} "
                    f"does not fit the parameter '{names[index]}' {list(p.shape)}{hint}"
                )


def _rng_to_files(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    path = directory / f"rng-rank{rank:05d}.safetensors"
    with _writing(path):
        save_file(tensors, str(path), metadata=dict(WEIGHTS_METADATA))
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    _write_json(
        directory / f"rng-rank{rank:05d}.json",
        {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": [version, list(internal), gauss_next]},
    )


def _rng_from_files(directory: Path, rank: int) -> bool:
    path = directory / f"rng-rank{rank:05d}.safetensors"
    if not path.is_file():
        return False
    tensors = load_safetensors(path)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    states = read_json(directory / f"rng-rank{rank:05d}.json")
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    return True


def _write_json(path: Path, obj: Any) -> None:
    with _writing(path):
        path.write_text(json.dumps(obj, indent=1))


def _write_error(path: Path, e: BaseException) -> WriteFailed:
    """``WriteFailed`` naming the file (an OSError's own file name when it has one, else ``path``)."""
    if isinstance(e, WriteFailed):
        return e
    if isinstance(e, OSError):
        where, reason = e.filename or path, e.strerror or str(e)
    else:  # SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
        where, reason = path, str(e)
        for prefix in ("Error while serializing: ", "I/O error: "):
            reason = reason[len(prefix) :] if reason.startswith(prefix) else reason
    return WriteFailed(f"cannot write {where}: {' '.join(str(reason).split())}")


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write of ``path`` (OSError, safetensors error) into ``WriteFailed`` naming it."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        raise _write_error(path, e) from None


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


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    ema_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    rank: int = 0,
    keep_last: int = 3,
) -> Path:
    """Write the checkpoint of ``step`` atomically (collective: call on every rank).

    ``model`` is the unwrapped live model; ``trainer_state`` is JSON (it gets ``step`` added). A write
    that fails on any rank removes the partial ``.tmp`` folder and raises ``WriteFailed`` on every rank
    (the failing rank's message names the file); the checkpoints written before stay as they were."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")

    def phase(fn: Callable[[], None] | None) -> None:
        """Run this rank's part, then agree with the other ranks on whether every part succeeded."""
        error = None
        if fn is not None:
            try:
                fn()
            except (OSError, SafetensorError, WriteFailed) as e:
                error = _write_error(tmp, e)
        if any_rank(error is not None):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            newest = latest_checkpoint(run_dir)
            kept = f"the newest complete checkpoint is {newest}" if newest else "there is no complete checkpoint yet"
            raise WriteFailed(
                f"{error or 'writing the checkpoint failed on another rank (its log names the file)'} "
                f"(checkpoint of step {step}); removed the partial {tmp}; {kept}: make room and rerun "
                f"to resume"
            ) from None

    def start() -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        with _writing(tmp):
            tmp.mkdir(parents=True)

    def write() -> None:
        with _writing(tmp / WEIGHTS):
            save_weights(model, tmp / WEIGHTS)
        with _writing(tmp / "ema.safetensors"):
            save_weights(ema_model, tmp / "ema.safetensors")
        _optimizer_to_files(optimizer.state_dict(), tmp, parameter_names(model, optimizer))
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        _write_json(tmp / TRAINER_STATE, {**trainer_state, "step": step})
        with _writing(tmp):
            _fsync_tree(tmp)
            if final.exists():  # a checkpoint of this step from an earlier attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_tree(final.parent)  # make the rename itself durable
        prune(run_dir, keep_last)
        log.info("checkpoint step %d -> %s", step, final)

    phase(start if rank == 0 else None)
    phase(lambda: _rng_to_files(tmp, rank))
    phase(write if rank == 0 else None)
    return final


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    ema_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore everything saved by ``save_checkpoint`` into live objects; returns trainer_state.

    A file that cannot be read is an ``UnreadableFile`` naming it; weights that read but do not fit
    the live objects raise what torch raises (RuntimeError / ValueError / KeyError)."""
    path = Path(path)
    state = read_json(path / TRAINER_STATE)
    _load_weights(model, path / WEIGHTS)
    _load_weights(ema_model, path / "ema.safetensors")
    optimizer.load_state_dict(_optimizer_from_files(path, optimizer, model))
    scheduler.load_state_dict(read_json(path / "scheduler.json"))
    if not _rng_from_files(path, rank):
        log.warning("%s has no RNG state for rank %d (world size changed?); keeping the seeded one", path, rank)
    return state


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    """``safetensors.torch.load_model`` (strict; it restores tensors that ``save_model`` stored once for
    several names) with read errors as ``UnreadableFile``."""
    if not path.is_file():
        raise UnreadableFile(path, "missing")
    try:
        load_model(model, str(path), strict=True)
    except SafetensorError:
        check_safetensors(path)  # raises UnreadableFile with the reason
        raise


def verify_checkpoint(path: str | Path, rank: int = 0) -> list[UnreadableFile]:
    """What keeps ``rank`` from loading the checkpoint ``path``: one ``UnreadableFile`` per file that is
    missing, empty, truncated or corrupt (every safetensors header and tensor is read, every JSON file
    parsed); an empty list when it is intact. Whether the tensors fit the model is not checked here."""
    path = Path(path)
    problems: list[UnreadableFile] = []

    def check(p: Path) -> bool:
        try:
            (check_safetensors if p.suffix == ".safetensors" else check_json)(p)
            return True
        except UnreadableFile as e:
            problems.append(e)
            return False

    for name in FILES:
        check(path / name)
    state_file = path / TRAINER_STATE
    if not any(p.path == state_file for p in problems):
        state, m = read_json(state_file), _STEP_RE.match(path.name)
        if not isinstance(state, dict) or "step" not in state or "ema" not in state:
            problems.append(UnreadableFile(state_file, "not a trainer state (no 'step' or 'ema' entry)"))
        elif m and int(state["step"]) != int(m.group(1)):
            problems.append(
                UnreadableFile(
                    state_file, f"inconsistent: it says step {state['step']}, its folder step {int(m.group(1))}"
                )
            )
    rng = [path / f"rng-rank{rank:05d}.safetensors", path / f"rng-rank{rank:05d}.json"]
    if any(p.exists() for p in rng):  # neither: a checkpoint of a smaller world, load_checkpoint says so
        for p in rng:
            check(p)
    return problems


def resume_checkpoint(run_dir: str | Path, rank: int = 0) -> tuple[Path | None, list[Path]]:
    """The checkpoint to resume from: the newest one that verifies on every rank (collective: call on
    every rank), and the newer ones skipped because they did not (a warning names each bad file).

    ``(None, [])`` when there is no checkpoint. When there are checkpoints but none is intact, a
    ``UsageError`` (exit 2) names every bad file: nothing is loaded, deleted or restarted."""
    found = complete_checkpoints(run_dir)
    skipped: list[Path] = []
    reasons: list[str] = []
    for _, path in reversed(found):
        problems = verify_checkpoint(path, rank)
        if not any_rank(bool(problems)):
            if skipped:
                log.warning(
                    "resuming from %s, the newest intact checkpoint (skipped: %s)",
                    path,
                    ", ".join(p.name for p in skipped),
                )
            return path, skipped
        log.warning(
            "checkpoint %s is damaged, skipping it: %s",
            path,
            "; ".join(str(p) for p in problems) or "a file of another rank is unreadable (its log names it)",
        )
        skipped.append(path)
        reasons += [f"{p.path}: {p.reason.split(' (')[0]}" for p in problems] or [f"{path}: damaged on another rank"]
    if not found:
        return None, []
    root = Path(run_dir) / CHECKPOINTS
    raise UsageError(
        f"cannot resume: none of the {len(found)} checkpoint(s) in {root} is intact ({'; '.join(reasons)}); "
        f"restore them, or move {root} away to start the run from scratch"
    )


def set_aside(damaged: list[Path]) -> None:
    """Rename checkpoints skipped by ``resume_checkpoint`` to ``step-XXXXXXX.damaged`` (rank 0, once the
    resume succeeded): they no longer count as the latest or towards ``keep_last``, and stay on disk
    for inspection until deleted by hand."""
    for path in damaged:
        target = path.with_name(path.name + DAMAGED)
        try:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
            log.warning(
                "set the damaged checkpoint %s aside as %s (delete it when no longer needed)", path, target.name
            )
        except OSError as e:
            log.warning("could not set the damaged checkpoint %s aside (%s)", path, e)


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale ``*.tmp`` dirs."""
    found = complete_checkpoints(run_dir)
    for _, p in found[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def remove_partial(run_dir: str | Path) -> None:
    """Remove ``*.tmp`` checkpoint dirs left by a killed run (call on rank 0 before training)."""
    root = Path(run_dir) / CHECKPOINTS
    for p in root.glob(f"{STEP_PREFIX}*.tmp") if root.is_dir() else []:
        log.info("removing incomplete checkpoint %s", p)
        shutil.rmtree(p, ignore_errors=True)


def init_weights_file(init: str | Path) -> Path:
    """``model.safetensors`` of a run folder (its ``final/``) or of a ``save_pretrained`` folder."""
    init = Path(init)
    for candidate in (init / FINAL / WEIGHTS, init / WEIGHTS):
        if candidate.exists():
            return candidate
    raise UsageError(
        f"--init {init}: no final/model.safetensors or model.safetensors there (is it a finished run folder?)"
    )


def load_init_weights(model: torch.nn.Module, init: str | Path) -> None:
    """Warm start for fine-tuning: copy every tensor of ``init`` whose name and shape match.

    Tensors that only one side has (e.g. the adapter of an embodiment seen only in pretraining, or
    a new robot's adapter) or whose shape differs (a larger task vocabulary) keep their fresh
    initialisation; both lists are logged. Nothing matching at all is an error: the run is not of
    this model.
    """
    path = init_weights_file(init)
    source = current_names(model, load_safetensors(path, context=f"--init {init}: "))  # older layouts' names
    own = model.state_dict()
    matched = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise UsageError(
            f"--init {init}: none of its {len(source)} tensors fit this model; is it a run of "
            f"the same model and preset?"
        )
    model.load_state_dict(matched, strict=False)
    fresh = sorted(k for k in own if k not in matched)
    unused = sorted(k for k in source if k not in matched)
    log.info(
        "initialised %d/%d tensors from %s; fresh: %s; unused: %s",
        len(matched),
        len(own),
        path,
        ", ".join(fresh[:8]) + (" ..." if len(fresh) > 8 else "") or "none",
        ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else "") or "none",
    )
