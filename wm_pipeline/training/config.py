"""Run configuration: one typed tree of dataclasses for every `wm train` run.

A run config has five sections::

    data   where the windows come from and how they are cut and batched   (DataConfig)
    optim  AdamW, warm-up + cosine schedule, clipping, accumulation        (OptimConfig)
    train  length, logging, checkpoints, eval, seed, guards, precision     (TrainConfig)
    ema    the exponential moving average of the weights                   (EMAConfig)
    model  the registered model's own config dataclass                     (from wm_pipeline.training.registry)

Values are layered, later wins: dataclass defaults < preset (``tiny`` / ``small`` / ``base``) <
YAML file (``--config``) < ``key=value`` overrides on the command line. Every layer is checked
as it is applied: an unknown key is an error naming the key and its closest valid spelling, a
value of the wrong type is an error naming the key, the expected type and what was given. All
such errors are ``ConfigError`` (a ``UsageError``: one line, exit code 2).

The resolved config is written as ``RUN/config.yaml`` and can be fed back with ``--config``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wm_pipeline.exit_codes import UsageError


class ConfigError(UsageError):
    """A bad key or value in a run config; the message names the key (one line)."""


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # dataset folders (``--data``), each with manifest.json
    window: int = 8  # frames per training window
    stride: int = 1  # frame step inside a window
    camera: str | None = None  # None: the dataset's first camera
    resize: list[int] | None = None  # [H, W]; None keeps the stored resolution
    backend: str = "auto"  # video decoder: auto | torchcodec | decord | pyav
    batch_size: int = 8  # windows per rank per micro-batch
    num_workers: int = 2  # DataLoader workers per rank
    labels: list[str] = field(default_factory=list)  # labeller sidecars to join (labels/<name>/)
    weights: list[float] | None = None  # sampling weight per data path (None: by size)
    windows_per_episode: int = 4  # windows cut from one decoded episode
    shuffle_buffer: int = 64  # windows mixed before batching
    episodes_per_task: int = 0  # few-shot: first K successful action episodes per task (0: all)
    tasks: list[str] = field(default_factory=list)  # only these tasks' samples (empty: all); one policy per task


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.01  # applied to matrices / conv kernels only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 500  # linear 0 -> lr, then cosine
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    grad_accum: int = 1  # micro-batches per optimizer step
    impl: str = "auto"  # AdamW kernel: auto (fused on CUDA, foreach otherwise) |
    # fused | foreach | for-loop (the same maths)


@dataclass
class TrainConfig:
    max_steps: int = 10_000  # optimizer steps
    log_every: int = 50
    ckpt_every: int = 1000
    keep_last: int = 3  # checkpoints kept on disk
    eval_every: int = 1000  # 0 disables the periodic eval
    eval_batches: int = 4  # fixed batches the EMA model is scored on
    seed: int = 0
    nan_skip_steps: int = 0  # bad (non-finite) steps skipped before stopping
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb
    wandb_project: str = "wm-pipeline"
    progress: bool = True  # tqdm bar on rank 0
    compile: bool = False  # torch.compile the training forward + loss (EMA/eval eager)
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune |
    # max-autotune-no-cudagraphs (torch.compile's mode)


@dataclass
class EMAConfig:
    decay: float = 0.999  # 0: the EMA model is a copy of the weights
    warmup: bool = True  # decay_t = min(decay, (1+t)/(10+t))


@dataclass
class RunConfig:
    model_name: str = ""
    preset: str = "small"
    recipe: str = ""  # how the model is trained (decoder: scratch|latent|uwm|idm-bc;
    # worldmodel: uwm|no-future); ``policy=`` is the old name
    init: str | None = None  # a run folder to start from (``--init``), read by the model's prepare
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    model: Any = None  # the registered model's config dataclass

    @property
    def policy(self) -> str:
        """The old name of ``recipe`` (``policy=`` on the command line and in config files is still read)."""
        return self.recipe

    @policy.setter
    def policy(self, value: str) -> None:
        self.recipe = value


# keys read under their old names: {config class: {old: new}} (config files and overrides written before)
RENAMED: dict[type, dict[str, str]] = {RunConfig: {"policy": "recipe"}}


# Run-level presets per model size; a registration may refine them (ModelSpec.run_presets).
RUN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {  # unit tests: seconds on a shared CPU
        "data": {"window": 2, "batch_size": 4, "num_workers": 0, "windows_per_episode": 2, "shuffle_buffer": 8},
        "optim": {"lr": 1e-3, "warmup_steps": 5, "weight_decay": 0.0},
        "train": {"max_steps": 50, "log_every": 10, "ckpt_every": 25, "eval_every": 0, "keep_last": 2, "log_with": []},
        "ema": {"decay": 0.99},
    },
    "small": {  # a CPU demo: minutes
        "data": {"window": 4, "batch_size": 8, "num_workers": 2},
        "optim": {"lr": 5e-4, "warmup_steps": 100},
        "train": {"max_steps": 2000, "log_every": 25, "ckpt_every": 500, "eval_every": 500},
        "ema": {"decay": 0.995},
    },
    "base": {  # one or more GPUs
        "data": {"window": 8, "batch_size": 32, "num_workers": 8},
        "optim": {"lr": 3e-4, "warmup_steps": 1000},
        "train": {"max_steps": 100_000, "log_every": 50, "ckpt_every": 2000, "eval_every": 2000},
        "ema": {"decay": 0.9999},
    },
}

PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for-loop")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LOGGERS = ("tensorboard", "wandb")


# ---------------------------------------------------------------- typed updates


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _fail(key: str, source: str, tp: Any, value: Any) -> typing.NoReturn:
    raise ConfigError(f"config key '{key}' ({source}): expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert the harmless cases
    (int -> float, list -> tuple, "3e-4" -> float: YAML 1.1 reads exponent-only floats as strings)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise message
            return _coerce(value, options[0], key, source)
        for arg in options:
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        _fail(key, source, tp, value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' ({source}): {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _fail(key, source, tp, value)
        return update(tp(), value, source, prefix=key)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str) and source == "command line":
            value = [yaml.safe_load(v) for v in value.split(",") if v]  # data.resize=64,64
        if not isinstance(value, (list, tuple)):
            _fail(key, source, tp, value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}' ({source}): expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            _fail(key, source, tp, value)
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(key, source, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(key, source, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        _fail(key, source, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(key, source, tp, value)
    if isinstance(tp, type) and not isinstance(value, tp):
        _fail(key, source, tp, value)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, valid: list[str], prefix: str, source: str) -> typing.NoReturn:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = (
        f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)"
        if close
        else f" (valid keys: {', '.join(valid)})"
    )
    raise ConfigError(f"unknown config key '{full}' ({source}){hint}")


def update(obj: Any, values: dict[str, Any], source: str, prefix: str = "") -> Any:
    """A copy of dataclass ``obj`` with ``values`` (a nested, possibly partial dict) applied."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix or '<top>'}' ({source}): expected a mapping, got {values!r}")
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    renamed = RENAMED.get(type(obj), {})
    changes = {}
    for key, value in values.items():
        key = renamed.get(str(key), str(key))
        if key not in names:
            _unknown_key(key, names, prefix, source)
        full = f"{prefix}.{key}" if prefix else key
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = update(current, value, source, full)
        else:
            changes[key] = _coerce(value, hints[key], full, source)
    return dataclasses.replace(obj, **changes)


# ---------------------------------------------------------------- sources


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a text (UTF-8 YAML) file: byte 0x{e.object[e.start]:02x} at offset {e.start} (a binary file?)"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "parse error"
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "data.window=8"]`` -> ``{"optim": {"lr": 3e-4}, "data": {"window": 8}}``.
    Values are read as YAML scalars/lists (``true``, ``8``, ``[64, 64]``, ``null``); a string
    field keeps the raw text (see ``_raw_strings``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-4")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is set both as a value and a section")
        node[parts[-1]] = _RawText(text, value)
    return out


class _RawText:
    """A command-line value: its YAML reading plus the raw text (kept for str fields)."""

    def __init__(self, text: str, value: Any):
        self.text, self.value = text, value


def _raw_strings(obj: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Resolve ``_RawText`` leaves against the schema: str fields get the text, others the YAML value."""
    hints = _hints(type(obj)) if dataclasses.is_dataclass(obj) else {}
    renamed = RENAMED.get(type(obj), {})
    out = {}
    for key, v in values.items():
        tp = hints.get(renamed.get(key, key), Any)
        if isinstance(v, dict):
            sub = getattr(obj, key, None) if dataclasses.is_dataclass(obj) else None
            out[key] = _raw_strings(sub, v)
        elif isinstance(v, _RawText):
            wants_str = tp is str or (
                typing.get_origin(tp) in (typing.Union, types.UnionType)
                and str in typing.get_args(tp)
                and v.value is not None
            )
            out[key] = v.text if wants_str else v.value
        else:
            out[key] = v
    return out


def apply_overrides(obj: Any, overrides: list[str], source: str = "command line") -> Any:
    """``obj`` (any config dataclass) with ``KEY=VALUE`` overrides applied and checked against its schema."""
    return update(obj, _raw_strings(obj, parse_overrides(list(overrides))), source)


def to_dict(obj: Any) -> Any:
    """A plain, YAML-safe nested dict/list copy of a config."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def validate(cfg: RunConfig) -> RunConfig:
    """Value checks that types alone cannot express."""

    def positive(key: str, value: float, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"config key '{key}': must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    d, o, t = cfg.data, cfg.optim, cfg.train
    for key, value in [
        ("data.window", d.window),
        ("data.stride", d.stride),
        ("data.batch_size", d.batch_size),
        ("data.windows_per_episode", d.windows_per_episode),
        ("optim.lr", o.lr),
        ("optim.grad_accum", o.grad_accum),
        ("train.max_steps", t.max_steps),
        ("train.log_every", t.log_every),
        ("train.ckpt_every", t.ckpt_every),
        ("train.keep_last", t.keep_last),
    ]:
        positive(key, value)
    for key, value in [
        ("data.num_workers", d.num_workers),
        ("data.episodes_per_task", d.episodes_per_task),
        ("optim.weight_decay", o.weight_decay),
        ("optim.warmup_steps", o.warmup_steps),
        ("optim.grad_clip", o.grad_clip),
        ("train.eval_every", t.eval_every),
        ("train.nan_skip_steps", t.nan_skip_steps),
    ]:
        positive(key, value, allow_zero=True)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"config key 'optim.betas': expected two values in [0, 1), got {o.betas}")
    if not 0 <= cfg.ema.decay < 1:
        raise ConfigError(f"config key 'ema.decay': must be in [0, 1), got {cfg.ema.decay}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"config key 'train.precision': {t.precision!r} is not one of {list(PRECISIONS)}")
    if o.impl not in OPTIMIZER_IMPLS:
        raise ConfigError(f"config key 'optim.impl': {o.impl!r} is not one of {list(OPTIMIZER_IMPLS)}")
    if t.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"config key 'train.compile_mode': {t.compile_mode!r} is not one of {list(COMPILE_MODES)}")
    for name in t.log_with:
        if name not in LOGGERS:
            raise ConfigError(f"config key 'train.log_with': {name!r} is not one of {list(LOGGERS)}")
    if d.resize is not None and (len(d.resize) != 2 or not all(v > 0 for v in d.resize)):
        raise ConfigError(f"config key 'data.resize': expected [H, W] with H, W > 0, got {d.resize}")
    if d.weights is not None and len(d.weights) != len(d.paths):
        raise ConfigError(f"config key 'data.weights': {len(d.weights)} weights for {len(d.paths)} data paths")
    return cfg


def _choose(name: str, choices: list[str], what: str) -> None:
    if name not in choices:
        close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown {what} '{name}'{hint}; choose from {', '.join(choices)}")


def resolve(
    model_name: str,
    model_config_cls: type,
    model_presets: dict[str, Any],
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] = (),
    data_paths: list[str] | None = None,
    run_presets: dict[str, dict[str, Any]] | None = None,
) -> RunConfig:
    """Build the run config of ``model_name``: defaults < preset < YAML file < overrides.

    ``preset`` (``--preset``) beats a ``preset:`` key in the file; ``data_paths`` (``--data``)
    beat ``data.paths`` from the file."""
    file_values = load_yaml(config_file) if config_file else {}
    file_source = f"from {config_file}"
    named = file_values.get("model_name")
    if named not in (None, "", model_name):
        raise ConfigError(f"{config_file}: model_name is '{named}' but the command trains '{model_name}'")
    chosen = preset or file_values.get("preset") or RunConfig.preset
    presets = sorted(set(RUN_PRESETS) | set(model_presets))
    _choose(str(chosen), presets, "preset")
    if chosen not in model_presets:
        raise ConfigError(f"model '{model_name}' has no preset '{chosen}' (it has {', '.join(model_presets)})")

    cfg = RunConfig(model_name=model_name, preset=chosen, model=model_config_cls())
    cfg = update(cfg, RUN_PRESETS.get(chosen, {}), f"preset {chosen}")
    cfg = update(cfg, (run_presets or {}).get(chosen, {}), f"preset {chosen} of {model_name}")
    cfg.model = copy.deepcopy(model_presets[chosen])
    file_values = {k: v for k, v in file_values.items() if k not in ("model_name", "preset")}
    cfg = update(cfg, file_values, file_source)
    cfg = apply_overrides(cfg, overrides)
    cfg.model_name, cfg.preset = model_name, chosen
    if data_paths:
        cfg.data.paths = [str(p) for p in data_paths]
    return validate(cfg)


def renamed_keys(values: dict[str, Any]) -> dict[str, Any]:
    """A run config's ``to_dict`` tree (e.g. an old config.yaml) with its top-level keys under today's names."""
    renamed = RENAMED[RunConfig]
    return {renamed.get(k, k): v for k, v in values.items()}


def diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two ``to_dict`` trees, as ``key: old -> new`` lines."""
    lines = []
    for key in sorted(set(old) | set(new)):
        full = f"{prefix}.{key}" if prefix else key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += diff(a, b, full)
        elif a != b:
            lines.append(f"{full}: {a!r} -> {b!r}")
    return lines
