"""The run folder: its layout, and resolving a run (or a saved model) to the model folder inside it.

One module owns the names, so that the trainer that writes a run and the jobs that read it back
(`wm label`, `wm probe`, `wm eval --policy`, `wm worldmodel eval`, `--init`) agree::

    RUN/
      config.yaml                 the resolved run config (``--config`` takes it back)
      status.json                 running | finished | preempted | failed, step, exit code
      metrics.jsonl               one JSON row per logged step
      tensorboard/                TensorBoard events (``train.log_with``)
      checkpoints/step-0001000/   everything a resume needs (wm_pipeline.training.checkpoint)
      final/                      the EMA model: config.json + model.safetensors (``save_pretrained``)
        run_config.yaml           the run config again, beside the weights
        README.md                 the model card (wm_pipeline.model_card; `wm eval` adds its results)
      .lock                       held by the job training in RUN (shards.folder_lock)

A *model folder* holds ``config.json`` + ``model.safetensors``: ``RUN/final`` of a finished run, or
any ``save_pretrained`` folder. Which model it is: ``run_config.yaml``'s ``model_name`` for a run;
else ``config.json``'s ``_class`` (``shards.model_folder``); only folders saved before the class was
recorded fall back to a model's own guess from the config's field set (``legacy`` below).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from shards.folder_lock import LOCK_NAME as LOCK
from shards.model_folder import CONFIG as MODEL_CONFIG, WEIGHTS, class_name, saved_class
from wm_pipeline.exit_codes import UsageError

CONFIG = "config.yaml"
STATUS = "status.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
FINAL = "final"
RUN_CONFIG = "run_config.yaml"
MODEL_CARD = "README.md"  # in a model folder: the model card (wm_pipeline.model_card)
STEP_PREFIX = "step-"  # checkpoints/step-XXXXXXX (7 digits or more)

__all__ = [
    "CONFIG",
    "STATUS",
    "METRICS",
    "TENSORBOARD",
    "CHECKPOINTS",
    "FINAL",
    "RUN_CONFIG",
    "LOCK",
    "MODEL_CONFIG",
    "MODEL_CARD",
    "WEIGHTS",
    "STEP_PREFIX",
    "step_name",
    "has_weights",
    "is_run",
    "read_yaml",
    "run_config_of",
    "recipe_of",
    "trained_run_folder",
    "weights_folder",
    "model_folder",
    "plain_model_folder",
]


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def has_weights(folder: Path) -> bool:
    """``folder`` holds a model: config.json and model.safetensors."""
    return (folder / MODEL_CONFIG).is_file() and (folder / WEIGHTS).is_file()


def is_run(folder: Path) -> bool:
    """``folder`` is a `wm train` run folder (it has config.yaml)."""
    return (folder / CONFIG).is_file()


def read_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text()) or {}


def run_config_of(folder: Path) -> dict[str, Any]:
    """``folder/run_config.yaml`` (a `wm train` export), or ``{}`` for a plain save_pretrained folder."""
    path = Path(folder) / RUN_CONFIG
    return read_yaml(path) if path.is_file() else {}


def recipe_of(run_config: dict[str, Any]) -> str:
    """The recipe a run config names (``recipe``; ``policy`` in runs saved before the rename)."""
    return run_config.get("recipe") or run_config.get("policy") or ""


def _not_finished(run: Path, what: str) -> UsageError:
    return UsageError(f"{run}: {what} has no final/ model yet (training not finished; see {run / STATUS})")


def trained_run_folder(spec: str | Path, model_name: str) -> Path | None:
    """``RUN/final`` (or ``RUN`` itself when it is a final/ folder) of a ``wm train <model_name>`` run;
    None when ``spec`` is another model's run or no run at all. A run of this model without final/
    (training not finished) is a UsageError saying so."""
    run = Path(spec)
    if not run.is_dir():
        return None
    for folder in (run / FINAL, run):
        if (folder / RUN_CONFIG).is_file():
            return folder if read_yaml(folder / RUN_CONFIG).get("model_name") == model_name else None
    if is_run(run) and read_yaml(run / CONFIG).get("model_name") == model_name:
        raise _not_finished(run, f"{model_name} run")
    return None


def weights_folder(run: str | Path) -> Path:
    """The model folder of ``run`` (a run folder, its ``final/``, or a save_pretrained folder), whatever
    the model; a UsageError when there is none (a run still training says so)."""
    run = Path(run)
    for folder in (run / FINAL, run):
        if has_weights(folder):
            return folder
    if is_run(run):
        raise _not_finished(run, "the run")
    raise UsageError(f"{run}: not a run folder (no final/config.json + model.safetensors)")


def plain_model_folder(spec: str | Path) -> Path | None:
    """``spec`` when it is a save_pretrained folder outside any run (config.json + model.safetensors, no
    config.yaml / run_config.yaml), else None."""
    run = Path(spec)
    if not run.is_dir() or is_run(run) or (run / RUN_CONFIG).is_file() or not has_weights(run):
        return None
    return run


def model_folder(spec: str | Path, model_name: str, model_cls: type, legacy: Callable[[Path], bool]) -> Path | None:
    """The model folder of ``spec`` when it holds a ``model_name`` model: ``RUN/final`` of a ``wm train
    model_name`` run, or a save_pretrained folder whose config.json names ``model_cls`` (``_class``; a
    folder saved before the class was recorded: when ``legacy(folder)`` says so). None for any other
    model or none at all, so that the next loader can try."""
    folder = trained_run_folder(spec, model_name)
    if folder is not None:
        return folder
    plain = plain_model_folder(spec)
    if plain is None:
        return None
    named = saved_class(plain)
    if named is not None:
        return plain if named == class_name(model_cls) else None
    return plain if legacy(plain) else None
