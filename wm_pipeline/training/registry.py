"""Model registry: the one table of model specs, with each model's train, label and policy faces.

The built-in models are listed in one table, ``wm_pipeline.recipes.MODELS`` (and the labeller kinds
that are not trained models, ``wm_pipeline.recipes.LABELLERS``); ``load_plugins`` / ``builtin``
read it by name, so no module registers anything by being imported. A plugin adds a model with
one ``register_model`` call. A spec names:

- ``config_cls``: the model's config dataclass (the ``model`` section of the run config);
- ``model_cls``: an ``nn.Module`` built as ``model_cls(config)``, with ``forward(batch) -> (loss,
  metrics)`` and ``save_pretrained`` (``huggingface_hub.PyTorchModelHubMixin``);
- ``presets``: ``{"tiny" | "small" | "base": config}``; ``run_presets`` optionally refine the
  data / optim / train sections per size (see ``wm_pipeline.training.config.RUN_PRESETS``);
- ``prepare(cfg, info)``: the run config with the data-dependent fields filled from the data
  (``info``: a ``shards.dataset_info.DatasetInfo``, read once; action / state dims, normalisation
  stats, tasks, image size): a new config, ``cfg`` is not changed (a plugin's ``prepare`` may still
  fill ``cfg`` in place and return None; it gets a copy, and ``info`` is also the list of manifests
  it used to get). Raises ``ModelDataMismatch`` when model and data disagree. Runs before the model
  is built, and the result is validated (``wm_pipeline.training.trainer.fill_from_data``);
- ``build_stream(cfg, seed)``: the training batches (default: ``shards.stream.WindowStream``
  through a ``DataLoader`` with ``collate_windows``);
- ``required_keys``: batch keys the model reads; checked on the first batch before the first step;
- ``evaluate(model, cfg, step) -> dict[str, float]``: optional extra eval metrics (EMA model);
- ``labeller``: a ``LabellerFace`` when ``wm label --labeller RUN`` can label with a trained run
  (wm_pipeline.jobs.labelling: ``load(folder, run_config) -> Labeller``, ``label(labeller, frames,
  embodiments) -> {field: tensor}``);
- ``load_policy(spec, env_info) -> Policy | None``: ``wm eval --policy RUN`` for this model's runs
  (None: ``RUN`` is not one of them; wm_pipeline.jobs.closed_loop_eval).

Plugins are modules or ``.py`` files named by ``--plugin`` or the ``WM_PLUGINS`` environment variable
(comma-separated), imported before the model name is looked up.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wm_pipeline.exit_codes import UsageError

log = logging.getLogger(__name__)

PLUGINS_ENV = "WM_PLUGINS"
BUILTIN_MODULE = "wm_pipeline.recipes"


class ModelDataMismatch(UsageError):
    """The model config and the data disagree (action dim, image size, missing key): exit 2."""


@dataclass(frozen=True)
class LabellerFace:
    """How ``wm label`` / ``wm probe`` label with a trained model (see wm_pipeline.jobs.labelling)."""

    load: Callable[[Path, dict], Any]  # (RUN/final, run config) -> Labeller
    label: Callable[[Any, Any, list[str]], dict[str, Any]]  # (labeller, frames, embodiments) -> fields
    detect: Callable[[Path], bool] | None = None  # recognises a folder of this kind


@dataclass
class ModelSpec:
    name: str
    config_cls: type
    model_cls: type
    presets: dict[str, Any]
    prepare: Callable[[Any, list[dict]], None] | None = None
    build_stream: Callable[..., Iterable[dict]] | None = None
    run_presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    required_keys: tuple[str, ...] = ()
    evaluate: Callable[..., dict[str, float]] | None = None
    warm_start: bool = False  # `--init RUN` loads RUN's weights into the new model (fine-tuning)
    # cfg -> does this recipe read `--init` in `prepare` (e.g. decoder policy=latent: the world model)?
    reads_init: Callable[[Any], bool] | None = None
    labeller: LabellerFace | None = None  # `wm label --labeller RUN`
    load_policy: Callable[[str, dict], Any] | None = None  # `wm eval --policy RUN`

    def stream(self, cfg: Any, seed: int) -> Iterable[dict]:
        return (self.build_stream or default_stream)(cfg, seed=seed)


_REGISTRY: dict[str, ModelSpec] = {}
_builtin_error: str | None = None
_builtin_labellers: tuple = ()
_builtin_loaded = False


def register_model(
    name: str,
    config_cls: type,
    model_cls: type,
    presets: dict[str, Any],
    *,
    prepare: Callable[[Any, list[dict]], None] | None = None,
    build_stream: Callable[..., Iterable[dict]] | None = None,
    run_presets: dict[str, dict[str, Any]] | None = None,
    required_keys: Iterable[str] = (),
    evaluate: Callable[..., dict[str, float]] | None = None,
    warm_start: bool = False,
    reads_init: Callable[[Any], bool] | None = None,
    labeller: LabellerFace | None = None,
    load_policy: Callable[[str, dict], Any] | None = None,
) -> ModelSpec:
    """Register ``name`` (a plugin's model); registering the same classes again (a re-import) replaces it."""
    spec = ModelSpec(
        name,
        config_cls,
        model_cls,
        dict(presets),
        prepare,
        build_stream,
        dict(run_presets or {}),
        tuple(required_keys),
        evaluate,
        warm_start,
        reads_init,
        labeller,
        load_policy,
    )
    return add(spec)


def add(spec: ModelSpec) -> ModelSpec:
    """Put ``spec`` in the registry (checked: its presets are its config class; a name is taken once)."""
    old = _REGISTRY.get(spec.name)
    if old is not None and (old.model_cls.__qualname__, old.model_cls.__module__) != (
        spec.model_cls.__qualname__,
        spec.model_cls.__module__,
    ):
        raise ValueError(
            f"model name '{spec.name}' is already registered to {old.model_cls.__module__}.{old.model_cls.__qualname__}"
        )
    for preset, config in spec.presets.items():
        if not isinstance(config, spec.config_cls):
            raise TypeError(
                f"preset '{preset}' of model '{spec.name}' is a {type(config).__name__}, "
                f"not a {spec.config_cls.__name__}"
            )
    _REGISTRY[spec.name] = spec
    return spec


def specs() -> list[ModelSpec]:
    """Every registered spec: the built-in table's in its order, then the plugins' in registration order."""
    return list(_REGISTRY.values())


def registered() -> list[str]:
    return sorted(_REGISTRY)


def get_model(name: str) -> ModelSpec:
    """The spec registered as ``name``; an unknown name is a UsageError with the closest one."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    names = registered()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    known = ", ".join(names) if names else "none"
    why = f"; {BUILTIN_MODULE} failed to import: {_builtin_error}" if _builtin_error else ""
    raise UsageError(f"unknown model '{name}'{hint}; registered models: {known}{why}")


def builtin() -> list[ModelSpec]:
    """The built-in table (``wm_pipeline.recipes.MODELS``), read into the registry on the first call."""
    global _builtin_error, _builtin_labellers, _builtin_loaded
    if not _builtin_loaded and importlib.util.find_spec(BUILTIN_MODULE) is not None:
        try:
            table = importlib.import_module(BUILTIN_MODULE)
        except Exception as e:  # a broken optional model must not block training the others
            _builtin_error = f"{type(e).__name__}: {e}"
            log.warning("%s failed to import (%s); its models are unavailable", BUILTIN_MODULE, _builtin_error)
            return []
        plugins = list(_REGISTRY.values())  # registered before the table was read
        _REGISTRY.clear()
        for spec in [*table.MODELS, *plugins]:  # built-ins first, in table order
            add(spec)
        _builtin_labellers = tuple(table.LABELLERS)
        _builtin_loaded = True
    return list(getattr(sys.modules.get(BUILTIN_MODULE), "MODELS", ()))


def builtin_labellers() -> tuple:
    """The built-in labeller kinds that are not trained models (``wm_pipeline.recipes.LABELLERS``)."""
    builtin()
    return _builtin_labellers


def load_plugins(plugins: Iterable[str] = ()) -> None:
    """Read the built-in table, then import each plugin (module name or ``.py`` path) from ``plugins``
    and ``$WM_PLUGINS``. A plugin that cannot be imported is a UsageError."""
    builtin()
    env = [p.strip() for p in os.environ.get(PLUGINS_ENV, "").split(",") if p.strip()]
    for plugin in [*plugins, *env]:
        _import_plugin(plugin)


def _import_plugin(plugin: str) -> None:
    path = Path(plugin)
    try:
        if plugin.endswith(".py"):
            if not path.is_file():
                raise UsageError(f"plugin {plugin}: file not found")
            name = f"wm_plugin_{path.stem}"
            if name in sys.modules:
                return
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(plugin)
    except UsageError:
        raise
    except ImportError as e:
        raise UsageError(f"plugin {plugin}: cannot import ({e})") from None


# ---------------------------------------------------------------- default data stream


def default_stream(cfg: Any, seed: int, **stream_kw: Any) -> Iterable[dict]:
    """Batches of training windows (see docs/CONTRACTS.md, shards.stream) for one rank, restricted to the
    few-shot subset when ``data.episodes_per_task`` is set and to ``data.tasks`` when given
    (wm_pipeline.training.few_shot).

    ``seed`` already folds in the rank and the step this stream starts at (wm_pipeline.training.trainer);
    the stream itself splits shards by rank and worker. ``stream_kw``: more ``WindowStream`` arguments
    (e.g. ``optional_labels``) for a model's own ``build_stream`` wrapped around this one."""
    import torch

    from shards.stream import WindowStream, collate_windows
    from wm_pipeline.training.few_shot import few_shot_keys

    d = cfg.data
    keys = None
    if d.episodes_per_task or d.tasks:
        keys, counts = few_shot_keys(list(d.paths), d.episodes_per_task, d.tasks)
        log.info(
            "training on %s demos per task for %s",
            d.episodes_per_task or "all",
            ", ".join(f"{t} ({n})" for t, n in sorted(counts.items())),
        )
    dataset = WindowStream(
        list(d.paths),
        window=d.window,
        stride=d.stride,
        camera=d.camera,
        resize=tuple(d.resize) if d.resize else None,
        backend=d.backend,
        mode="train",
        labels=tuple(d.labels),
        windows_per_episode=d.windows_per_episode,
        shuffle_buffer=d.shuffle_buffer,
        seed=seed,
        keys=keys,
        **_weights_kw(d),
        **stream_kw,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=d.batch_size,
        num_workers=d.num_workers,
        collate_fn=collate_windows,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=2 if d.num_workers else None,
    )


def _weights_kw(d: Any) -> dict[str, Any]:
    return {"weights": list(d.weights)} if d.weights is not None else {}
