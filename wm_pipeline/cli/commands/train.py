"""`wm train MODEL --data DIR [--data DIR2] --out RUN [--config FILE] [--preset NAME] [key=value ...]`

Trains any registered model (wm_pipeline.training.registry) with the one runtime (wm_pipeline.training.trainer). Rerunning
the same command resumes from the latest complete checkpoint in RUN. Many processes::

    torchrun --nproc_per_node 2 -m wm_pipeline train MODEL --data DIR --out RUN

One job per run folder (RUN/.lock): a second `wm train` into a RUN that a live job is training in
stops at once with a one-line error naming that job (pid, host).

Rerunning verifies the checkpoints first: a damaged newest one (a truncated file) is skipped with a
warning naming the file, and the run resumes from the newest intact one (docs/TRAINING.md).

Exit codes: 0 done, 2 bad config / data / model-data mismatch / unreadable weights file / no intact
checkpoint / RUN in use by another job, 4 non-finite loss, 74 a checkpoint or other output could not
be written (disk full: the partial checkpoint is removed), 75 preempted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from wm_pipeline import exit_codes

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a registered model (resumes automatically)",
        usage="wm train MODEL --data DIR [--data DIR2 ...] --out RUN [--config FILE] [--preset NAME] "
        "[--init RUN] [--episodes-per-task K] [--labels NAME ...] [--plugin MODULE] [key=value ...]",
        description="Train a registered model. Overrides are key=value pairs, e.g. optim.lr=3e-4 data.window=8; "
        "precedence: defaults < --preset < --config < key=value. See docs/TRAINING.md.",
    )
    p.add_argument("model", help="registered model name (e.g. lam, idm, worldmodel, decoder)")
    p.add_argument("--data", action="append", default=[], metavar="DIR", help="dataset folder (repeatable)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder: config, checkpoints, logs, final/")
    p.add_argument("--config", metavar="FILE", help="YAML run config (e.g. a previous RUN/config.yaml)")
    p.add_argument("--preset", metavar="NAME", help="size preset: tiny, small (default) or base")
    p.add_argument(
        "--init",
        metavar="RUN",
        help="run folder to start from (sets 'init'; e.g. a world model or LAM run for `wm train decoder`)",
    )
    p.add_argument(
        "--episodes-per-task",
        type=int,
        metavar="K",
        help="few-shot: train on the first K successful episodes per task (sets data.episodes_per_task)",
    )
    p.add_argument(
        "--labels",
        action="append",
        default=[],
        metavar="NAME",
        help="label sidecar to join (labels/NAME/ in every --data folder; repeatable; sets data.labels)",
    )
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="module or .py file that registers models (also $WM_PLUGINS, comma-separated)",
    )
    p.add_argument(
        "--help-config",
        action=_HelpConfig,
        help="list every config key of MODEL with its type and default (of --preset, given before it), "
        "then exit: wm train MODEL [--preset NAME] --help-config",
    )
    p.set_defaults(run=run, overrides=[])
    # key=value overrides may sit anywhere after the model name, between options; argparse cannot
    # mix a variable-length positional with options, so they are collected from the leftovers.
    parse_known = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, rest = parse_known(args, namespace)
        ns.overrides = list(getattr(ns, "overrides", []) or []) + [
            a for a in rest if "=" in a and not a.startswith("-")
        ]
        return ns, [a for a in rest if not ("=" in a and not a.startswith("-"))]

    p.parse_known_args = parse_known_args


class _HelpConfig(argparse.Action):
    """``--help-config``: print ``config_help`` of the model named before it and exit (like ``--help``, so
    ``--out`` is not needed)."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        model = getattr(namespace, "model", None)
        if not model or "=" in model:
            parser.error("--help-config: name the model first: wm train MODEL --help-config")
        try:
            text = config_help(model, getattr(namespace, "preset", None), getattr(namespace, "plugin", None) or [])
        except exit_codes.UsageError as e:
            parser.error(str(e))
        try:
            print(text, flush=True)
        except BrokenPipeError:  # `wm train MODEL --help-config | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            parser.exit(exit_codes.BROKEN_PIPE)
        parser.exit(0)


def config_help(model: str, preset: str | None = None, plugins: list[str] = ()) -> str:
    """Every key of ``model``'s run config (``section.key``, ``model.<field>``) with its type and its value
    in ``preset`` (default: the run config's default preset), one per line."""
    import dataclasses
    import json
    import typing

    from wm_pipeline.training.config import RunConfig, resolve
    from wm_pipeline.training.registry import get_model, load_plugins

    load_plugins(plugins)
    spec = get_model(model)
    cfg = resolve(model, spec.config_cls, spec.presets, preset=preset, run_presets=spec.run_presets)

    def type_name(tp) -> str:
        if isinstance(tp, type) and not typing.get_args(tp):
            return tp.__name__
        return str(tp).replace("typing.", "").replace("NoneType", "None")

    def value(v) -> str:
        try:
            return json.dumps(v)
        except TypeError:
            return repr(v)

    rows: list[tuple[str, str, str]] = []

    def walk(obj, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                walk(v, f"{prefix}{f.name}.")
            else:
                rows.append((prefix + f.name, type_name(hints.get(f.name, type(v))), value(v)))

    walk(cfg, "")
    rows = [r for r in rows if r[0] != "model_name"]
    w_key, w_type = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    head = (
        f"wm train {model}: config keys, types and defaults (preset {cfg.preset!r}; set them with key=value "
        f"or --config FILE; {RunConfig.__name__} in wm_pipeline/training/config.py, "
        f"model.* in {spec.config_cls.__module__}.{spec.config_cls.__name__})"
    )
    lines = [head, f"{'key':<{w_key}}  {'type':<{w_type}}  default"]
    lines += [f"{k:<{w_key}}  {t:<{w_type}}  {d}" for k, t, d in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from wm_pipeline.training.preemption import PreemptionHandler

    # first: SIGUSR1 / SIGTERM from here on checkpoint, never kill (wm_pipeline.cli.main installed it already)
    signals = getattr(args, "signals", None) or PreemptionHandler().install()
    try:
        return _run(args, signals)
    finally:
        signals.uninstall()


def _run(args: argparse.Namespace, signals) -> int:
    from shards.folder_lock import FolderBusy
    from wm_pipeline.training import distributed
    from wm_pipeline.training.config import resolve
    from wm_pipeline.training.registry import get_model, load_plugins
    from wm_pipeline.training.trainer import train

    torchrun = distributed.launched_world_size() > 1
    if torchrun and int(os.environ.get("RANK", "0")) > 0:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the log lines: rank 0's
    try:
        if "=" in args.model:
            raise exit_codes.UsageError(f"expected a model name before overrides, got {args.model!r}")
        load_plugins(args.plugin)
        spec = get_model(args.model)
        overrides = list(args.overrides)  # the flags are shorthands for overrides: they beat --config
        if args.init is not None:
            overrides.append(f"init={args.init}")
        if args.episodes_per_task is not None:
            overrides.append(f"data.episodes_per_task={args.episodes_per_task}")
        if args.labels:
            overrides.append(f"data.labels={','.join(args.labels)}")
        cfg = resolve(
            args.model,
            spec.config_cls,
            spec.presets,
            preset=args.preset,
            config_file=args.config,
            overrides=overrides,
            data_paths=args.data,
            run_presets=spec.run_presets,
        )
        code = train(cfg, spec, args.out, signals).exit_code
    except (exit_codes.UsageError, FolderBusy) as e:  # FolderBusy: another job trains in --out
        if not torchrun:
            raise  # wm_pipeline.cli.main prints it as one line, exit 2
        print(f"wm train: error: {e}", file=sys.stderr)
        code = exit_codes.USAGE
    except exit_codes.WriteFailed as e:  # e.g. a checkpoint on a full disk
        if not torchrun:
            raise  # wm_pipeline.cli.main prints it as one line, exit 74
        print(f"wm train: error: {e}", file=sys.stderr)
        code = exit_codes.WRITE_FAILED
    except Exception as e:
        from shards.format import FormatError

        if not (torchrun and isinstance(e, FormatError)):
            raise
        print(f"wm train: error: {e}", file=sys.stderr)
        code = exit_codes.USAGE
    if torchrun:
        distributed.shutdown()
        distributed.finish_process(code)
    return code
