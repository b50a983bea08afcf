"""The model card (``README.md``) of a trained model folder: what the model is, what it was trained on,
how, what it measured, and how to load and run it.

    write_model_card(RUN / "final.tmp", run_dir=RUN, location=RUN / "final", model=ema_model)  # `wm train` export
    record_closed_loop_eval(RUN, results, OUT / "results.json")                                  # `wm eval --policy RUN`

The card is a Hugging Face model card (``huggingface_hub.ModelCard``): YAML front matter
(``library_name: wm-pipeline``, ``license``, ``pipeline_tag: robotics``, ``tags``, ``datasets`` when a
data location is a Hub dataset ``hf://datasets/OWNER/NAME``, and, once evaluated, the closed-loop
success rates as ``model-index`` results) and a body with the sections Model, Training data, Training,
Metrics, Closed-loop evaluation and Use.

Where the facts come from, all files of the run (so that the same run always gives the same card):
``config.json`` (class, format version, model config), ``run_config.yaml`` (model, recipe, preset,
data, optimiser, schedule, seed), the data folders' ``manifest.json`` (episodes, frames, embodiments,
tasks), ``RUN/metrics.jsonl`` (first and last train loss, the last eval row; wall-clock fields such as
``steps_per_s`` are left out). A fact that cannot be read is written as ``unknown`` with the reason;
writing the card never fails the run (anything but a refused write is a warning; the weights are kept).

``wm eval`` changes only two things in an existing card: the ``model-index`` results in the front
matter (one entry per environment and task: the newest evaluation of a task replaces the older one)
and the "Closed-loop evaluation" section between its two marker comments, rendered from those
results. Everything else, a user's edits included, is kept. A ``README.md`` that is neither ours (no
``CARD_MARK``) nor huggingface_hub's generic card is someone else's and is left alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from wm_pipeline.run_folder import FINAL, METRICS, MODEL_CARD, MODEL_CONFIG, WEIGHTS, is_run, recipe_of, run_config_of

log = logging.getLogger(__name__)

CARD = MODEL_CARD
LIBRARY = "wm-pipeline"
CARD_MARK = "<!-- model card written by wm-pipeline (wm_pipeline.model_card) -->"
EVAL_BEGIN = "<!-- closed-loop evaluation: this part is rewritten by `wm eval` -->"
EVAL_END = "<!-- end of the closed-loop evaluation -->"
HUB_GENERIC_TAG = "model_hub_mixin"  # huggingface_hub's generic save_pretrained card carries this tag
LOCK = ".card.lock"  # held while `wm eval` updates the card (evals of one run side by side)
LOCK_WAIT_S = 30.0
UNKNOWN = "unknown"
# metrics.jsonl fields that measure the machine, not the model (and differ between identical runs)
WALL_CLOCK = {"step", "time", "steps_per_s", "samples_per_s", "data_s"}
TASK_TYPE = "robotics"
SOURCE = "wm eval"
# (results.json aggregated field, model-index metric type, metric name), in card order
EVAL_METRICS = (
    ("pc_success", "pc_success", "success rate (%)"),
    ("avg_max_reward", "avg_max_reward", "mean of the episodes' max reward"),
    ("mean_length", "mean_episode_length", "mean episode length (actions)"),
)
SHOWN_TASKS = 20


# ---------------------------------------------------------------- reading the run, never failing


def _num(v: Any) -> str:
    """A number as the card writes it: 6 significant digits; ints with thousands separators."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.6g}" if math.isfinite(v) else str(v)


def _code(v: Any) -> str:
    return f"`{v}`"


def _read_json(path: Path) -> tuple[dict[str, Any], str]:
    """(the JSON object in ``path``, "") or ({}, why not)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, f"no {path.name}"
    except (OSError, ValueError) as e:
        return {}, f"{path.name} unreadable ({' '.join(str(e).split())[:120]})"
    return (data, "") if isinstance(data, dict) else ({}, f"{path.name} is not a JSON object")


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], str]:
    """The rows of ``metrics.jsonl`` (unparseable lines skipped), or ([], why there are none)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return [], f"no {path}"
    except OSError as e:
        return [], f"{path} unreadable ({e.strerror or e})"
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows, ("" if rows else f"{path} has no rows")


def shown_location(where: str) -> str:
    """A data location as the card shows it: a URL without user name, password or query (a presigned
    URL's signature); a folder or ``pipe:`` command as given."""
    if "://" not in where or where.startswith("pipe:"):
        return where
    parts = urlsplit(where)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def hub_dataset_id(where: str) -> str | None:
    """``OWNER/NAME`` of an ``hf://datasets/OWNER/NAME[@rev][/...]`` location, else None."""
    m = re.match(r"^hf://datasets/([^/@]+/[^/@]+)", where)
    return m.group(1) if m else None


def _license() -> str | None:
    try:
        md = metadata.metadata("wm-pipeline")
    except metadata.PackageNotFoundError:
        return None
    value = md.get("License-Expression") or md.get("License")
    return value.strip().lower() if value and value.strip() and "\n" not in value.strip() else None


def _version() -> str:
    try:
        return metadata.version("wm-pipeline")
    except metadata.PackageNotFoundError:
        return UNKNOWN


def _read_manifests(paths: Sequence[str]) -> list[tuple[str, dict[str, Any] | None, str]]:
    """(path, manifest or None, why not) per data location."""
    from shards.format import read_manifest

    out = []
    for p in paths:
        try:
            out.append((p, read_manifest(p), ""))
        except Exception as e:  # a card never fails the run: say why the data is unknown
            out.append((p, None, " ".join(str(e).split())[:200] or type(e).__name__))
    return out


def _count_stored(folder: Path) -> int | None:
    """Elements of the tensors in ``model.safetensors`` (parameters and buffers), None if unreadable."""
    try:
        from safetensors import safe_open

        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except Exception:
        return None


# ---------------------------------------------------------------- the sections


def _kv_table(rows: Iterable[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _model_section(config: dict, config_note: str, run_cfg: dict, model: Any, folder: Path) -> list[str]:
    cls = config.get("_class")
    if not cls and model is not None:
        cls = f"{type(model).__module__}.{type(model).__qualname__}"
    version = config.get("_format_version")
    if model is not None:
        params = sum(p.numel() for p in model.parameters())
        counted = f"{params:,}"
    else:
        stored = _count_stored(folder)
        counted = (
            f"{stored:,} (tensor elements in {WEIGHTS})" if stored is not None else f"{UNKNOWN} ({WEIGHTS} unreadable)"
        )
    name = run_cfg.get("model_name") or UNKNOWN
    recipe = recipe_of(run_cfg) if run_cfg else ""
    ema = run_cfg.get("ema") or {}
    init = run_cfg.get("init")
    rows = [
        ("class", _code(cls) if cls else f"{UNKNOWN} ({config_note or 'config.json names no _class'})"),
        ("format version", str(version) if version is not None else f"{UNKNOWN} (config.json records none)"),
        ("model", f"`wm train {name}`" if run_cfg else f"{UNKNOWN} (no run_config.yaml)"),
        ("recipe", _code(recipe) if recipe else "- (the model's only one)"),
        ("preset", _code(run_cfg["preset"]) if run_cfg.get("preset") else UNKNOWN),
        ("parameters", counted),
        ("initialised from", _code(init) if init else "nothing (trained from scratch)"),
        (
            "weights",
            f"`{WEIGHTS}` + `{MODEL_CONFIG}`: the EMA of the trained weights"
            + (f" (decay {_num(ema['decay'])})" if "decay" in ema else ""),
        ),
    ]
    return ["## Model", "", *_kv_table(rows), ""]


def _data_section(run_cfg: dict, manifests: list[tuple[str, dict | None, str]]) -> list[str]:
    out = ["## Training data", ""]
    if not run_cfg:
        return out + [f"{UNKNOWN}: no run_config.yaml beside the weights (not a `wm train` export).", ""]
    if not manifests:
        return out + [f"{UNKNOWN}: the run config names no data folder.", ""]
    out += ["| data | episodes | frames | resolution | cameras |", "|---|---|---|---|---|"]
    for path, m, why in manifests:
        if m is None:
            out.append(f"| `{shown_location(path)}` | {UNKNOWN} ({why}) | | | |")
            continue
        totals = m.get("totals") or {}
        res = m.get("resolution")
        out.append(
            f"| `{shown_location(path)}` | {_num(totals.get('samples', UNKNOWN))} | "
            f"{_num(totals.get('frames', UNKNOWN))} | {f'{res[0]}x{res[1]}' if res else UNKNOWN} | "
            f"{', '.join(m.get('cameras') or []) or '-'} |"
        )
    out.append("")
    embodiments = [(name, path, e) for path, m, _ in manifests if m for name, e in sorted(m["embodiments"].items())]
    if embodiments:
        out += [
            "| embodiment | data | episodes | frames | fps | action dim | state dim |",
            "|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {name} | `{shown_location(path)}` | {_num(e.get('samples', 0))} | {_num(e.get('frames', 0))} | "
            f"{_num(e.get('fps', 0))} | {e.get('action_dim', 0)} | {e.get('state_dim', 0)} |"
            for name, path, e in embodiments
        ]
        out.append("")
    tasks: dict[str, int] = {}
    for _, m, _ in manifests:
        for t, n in ((m or {}).get("tasks") or {}).items():
            if t:
                tasks[t] = tasks.get(t, 0) + int(n)
    if tasks:
        shown = sorted(tasks.items())[:SHOWN_TASKS]
        more = f" and {len(tasks) - len(shown)} more" if len(tasks) > len(shown) else ""
        out += [f"Tasks ({len(tasks)}; episodes): " + ", ".join(f"`{t}` ({n})" for t, n in shown) + more + ".", ""]
    elif any(m for _, m, _ in manifests):
        out += ["Tasks: none named in the data.", ""]
    d = run_cfg.get("data") or {}
    parts = [
        f"windows of {d.get('window', UNKNOWN)} frames (stride {d.get('stride', UNKNOWN)})",
        f"camera {_code(d['camera']) if d.get('camera') else 'the first of the data'}",
    ]
    if d.get("resize"):
        parts.append(f"resized to {d['resize'][0]}x{d['resize'][1]}")
    if d.get("labels"):
        parts.append("label sidecars " + ", ".join(_code(x) for x in d["labels"]))
    if d.get("episodes_per_task"):
        parts.append(f"few-shot: the first {d['episodes_per_task']} successful episodes per task")
    if d.get("weights"):
        parts.append(f"sampling weights {d['weights']}")
    return out + ["Read as " + "; ".join(parts) + ".", ""]


def _short(v: Any) -> str:
    """A model config value for the table: scalars as they are, long lists and dicts summarised."""
    if isinstance(v, dict):
        return f"{{{', '.join(sorted(map(str, v)))}}}" if len(v) <= 8 else f"{{{len(v)} keys}}"
    if isinstance(v, (list, tuple)):
        if len(v) <= 8 and all(not isinstance(x, (list, dict)) for x in v):
            return "[" + ", ".join(_num(x) if isinstance(x, float) else str(x) for x in v) + "]"
        return f"[{len(v)} values]"
    if isinstance(v, float):
        return _num(v)
    return "-" if v is None or v == "" else str(v)


def _training_section(
    run_cfg: dict, config: dict, config_note: str, step: int | None, world_size: int | None, rows: list[dict]
) -> list[str]:
    out = ["## Training", ""]
    if run_cfg:
        d, o, t, e = (run_cfg.get(k) or {} for k in ("data", "optim", "train", "ema"))
        done = step if step is not None else (rows[-1]["step"] if rows else None)
        batch = d.get("batch_size", UNKNOWN)
        accum = o.get("grad_accum", 1)
        ranks = f"{world_size} rank(s)" if world_size else "ranks: unknown"
        per_step = f" = {batch * accum * world_size} windows per step" if world_size and isinstance(batch, int) else ""
        table = [
            (
                "steps",
                f"{_num(done) if done is not None else UNKNOWN} (train.max_steps {_num(t.get('max_steps', UNKNOWN))})",
            ),
            ("batch", f"{batch} windows per rank x {accum} accumulated x {ranks}{per_step}"),
            (
                "learning rate",
                f"{_num(o.get('lr', UNKNOWN))}, AdamW betas {o.get('betas', UNKNOWN)}, weight decay "
                f"{_num(o.get('weight_decay', UNKNOWN))}",
            ),
            (
                "schedule",
                f"linear warm-up {o.get('warmup_steps', UNKNOWN)} steps, cosine to "
                f"{_num(o.get('min_lr_ratio', UNKNOWN))} x lr; grad clip {_num(o.get('grad_clip', UNKNOWN))}",
            ),
            ("EMA", f"decay {_num(e.get('decay', UNKNOWN))}" + (" with warm-up" if e.get("warmup") else "")),
            ("seed", str(t.get("seed", UNKNOWN))),
            ("precision", str(t.get("precision", UNKNOWN))),
        ]
        out += [
            *_kv_table(table),
            "",
            "The whole run config is `run_config.yaml` beside the weights "
            "(`wm train ... --config run_config.yaml` trains it again).",
            "",
        ]
    else:
        out += [f"{UNKNOWN}: no run_config.yaml beside the weights.", ""]
    fields = {k: v for k, v in sorted(config.items()) if not k.startswith("_")}
    if fields:
        out += ["Model config (`config.json`):", "", "| field | value |", "|---|---|"]
        out += [f"| {k} | {_short(v)} |" for k, v in fields.items()]
        out.append("")
    else:
        out += [f"Model config: {UNKNOWN} ({config_note or 'empty config.json'}).", ""]
    return out


def _metrics_section(rows: list[dict], why: str) -> list[str]:
    out = ["## Metrics", ""]
    if not rows:
        return out + [f"{UNKNOWN}: {why}.", ""]
    train = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    table = ["| metric | step | value |", "|---|---|---|"]
    if train:
        first, last = train[0], train[-1]
        table.append(f"| train loss (first logged) | {first['step']} | {_num(first['loss'])} |")
        table.append(f"| train loss (last logged) | {last['step']} | {_num(last['loss'])} |")
        table += [
            f"| train {k} | {last['step']} | {_num(v)} |"
            for k, v in sorted(last.items())
            if k not in WALL_CLOCK and k != "loss" and isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
    if evals:
        last = evals[-1]
        table += [
            f"| {k} | {last['step']} | {_num(v)} |"
            for k, v in sorted(last.items())
            if k.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
    notes = []
    if not train:
        notes.append(f"train loss: {UNKNOWN} (no train row in metrics.jsonl)")
    if not evals:
        notes.append("eval: none logged (train.eval_every 0, or the run ended before the first eval)")
    out += [
        f"From `{METRICS}` of the run ({len(rows)} rows; train rows are means over the `train.log_every` "
        "steps before them, eval rows the EMA model on fixed batches).",
        "",
        *table,
        "",
    ]
    return out + ([("; ".join(notes)).capitalize() + ".", ""] if notes else [])


def _is_policy(spec: Any) -> bool | None:
    return None if spec is None else spec.load_policy is not None


def _run_of(location: str) -> str:
    """The run folder a card names in its commands (``RUN`` of ``RUN/final``)."""
    p = Path(location)
    return str(p.parent) if p.name == FINAL else location


def _eval_command(run: str, config: dict, tasks: list[str]) -> str:
    size = config.get("image_size")  # [H, W] (decoder) or one side (world model)
    size = size[0] if isinstance(size, list) and len(size) == 2 and size[0] == size[1] else size
    res = f" --resolution {size}" if isinstance(size, int) and not isinstance(size, bool) else ""
    shown = ",".join(tasks[:3]) if tasks else "TASKS"
    return f"wm eval --policy {run} --tasks {shown} --episodes 10{res} --out {run}/eval"


def _eval_section(results: list[EvalResult], policy: bool | None, command: str) -> list[str]:
    out = ["## Closed-loop evaluation", "", EVAL_BEGIN, ""]
    if not results:
        if policy is False:
            out += ["Not a policy: `wm eval` does not drive this model.", ""]
        else:
            out += [f"Not evaluated yet. `{command}` runs it in the simulator and writes the success rates here.", ""]
        return out + [EVAL_END, ""]
    by_task: dict[tuple[str, str], dict[str, EvalResult]] = {}
    for r in results:
        by_task.setdefault((r.dataset_type, r.dataset_config or ""), {})[r.metric_type] = r
    out += [
        "| env | task | success | episodes | seed | max steps | resolution | mean length | results |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rates = []
    for (env, task), metrics in sorted(by_task.items()):
        any_r = next(iter(metrics.values()))
        args = any_r.dataset_args or {}
        pc = metrics.get("pc_success")
        n = args.get("episodes")
        if pc is not None and isinstance(pc.metric_value, (int, float)):
            rates.append(float(pc.metric_value))
            won = f" ({round(pc.metric_value * n / 100)}/{n})" if isinstance(n, int) else ""
            success = f"{pc.metric_value:.1f} %{won}"
        else:
            success = UNKNOWN
        length = metrics.get("mean_episode_length")
        out.append(
            f"| {env} | `{task}` | {success} | {n if n is not None else UNKNOWN} | "
            f"{args.get('seed', UNKNOWN)} | {args.get('max_steps', UNKNOWN)} | {args.get('resolution', UNKNOWN)} | "
            f"{_num(length.metric_value) if length else UNKNOWN} | {any_r.source_url or UNKNOWN} |"
        )
    out.append("")
    if len(rates) > 1:
        out += [f"Mean success over the {len(rates)} tasks: {sum(rates) / len(rates):.1f} %.", ""]
    out += [
        "Episode i of a task uses seed `seed + 100000 + i` (never a `wm collect --seed seed` demo layout); "
        "the newest `wm eval` of a task replaces the older row.",
        "",
    ]
    return out + [EVAL_END, ""]


def _use_section(cls: str | None, location: str, spec: Any, config: dict, tasks: list[str]) -> list[str]:
    run = _run_of(location)
    out = ["## Use", ""]
    if cls and "." in cls:
        module, name = cls.rsplit(".", 1)
        out += [
            "```python",
            f"from {module} import {name}",
            "",
            f"model = {name}.from_pretrained({str(location)!r})   # {MODEL_CONFIG} + {WEIGHTS}, eval mode",
            'print(f"{sum(p.numel() for p in model.parameters()):,} parameters")',
            "```",
            "",
        ]
    else:
        out += [f"Loading in Python: {UNKNOWN} (config.json names no class).", ""]
    commands = []
    if spec is None or spec.load_policy is not None:
        commands.append((_eval_command(run, config, tasks), "closed-loop success in the simulator"))
    if spec is not None and spec.labeller is not None:
        commands += [
            (f"wm label --labeller {run} --data VIDEO_DATA", "label a corpus (sidecar shards)"),
            (f"wm probe --labeller {run} --data HELD_OUT_DATA", "score the labels against true actions"),
        ]
    name = getattr(spec, "name", None)
    if name == "worldmodel":
        commands.append(
            (
                f"wm worldmodel eval --model {run} --data HELD_OUT_DATA",
                "offline forward / inverse / video error on held-out episodes",
            )
        )
    if name == "decoder":
        commands.append((f"wm probe --encoder {run} --data HELD_OUT_DATA", "what the image encoder places"))
    if commands:
        out += ["```bash", *[f"{c}   # {why}" for c, why in commands], "```", ""]
    elif spec is not None:
        out += [f"No `wm` command drives a `{spec.name}` model: load it in Python as above.", ""]
    return out


# ---------------------------------------------------------------- the card


def _card_data(run_cfg: dict, model_name: str, manifests: list) -> ModelCardData:
    """The front matter of a new card (``wm eval`` adds ``eval_results`` to it later)."""
    name = run_cfg.get("model_name")
    recipe = recipe_of(run_cfg) if run_cfg else ""
    tags = ["robotics", LIBRARY] + ([name] if name else []) + ([f"{name}-{recipe}"] if name and recipe else [])
    datasets = sorted({d for p, _, _ in manifests if (d := hub_dataset_id(p))})
    return ModelCardData(
        library_name=LIBRARY,
        license=_license(),
        pipeline_tag=TASK_TYPE,
        tags=tags,
        datasets=datasets or None,
        model_name=model_name,
    )


def model_card(
    folder: str | Path,
    *,
    run_dir: str | Path | None = None,
    location: str | Path | None = None,
    spec: Any = None,
    model: Any = None,
    step: int | None = None,
    world_size: int | None = None,
) -> ModelCard:
    """The card of the model folder ``folder`` (config.json + model.safetensors [+ run_config.yaml]).

    ``run_dir``: where ``metrics.jsonl`` is (default ``folder``'s parent when it is a run folder);
    ``location``: the folder the card's load snippet names (default ``folder``; the trainer writes the
    card into ``final.tmp`` and names ``RUN/final``); ``spec``: the model's ``ModelSpec`` (which ``wm``
    commands apply; default: the registered model that ``run_config.yaml`` names); ``model``: the
    model (its parameter count; else the stored tensors are counted); ``step`` / ``world_size``: the
    run's last step and number of ranks, when known."""
    folder = Path(folder)
    spec = spec if spec is not None else _spec_of(folder)
    if run_dir is None and is_run(folder.parent):
        run_dir = folder.parent
    config, config_note = _read_json(folder / MODEL_CONFIG)
    try:
        run_cfg = run_config_of(folder)
    except Exception as e:  # a garbled run_config.yaml: said in the card
        log.warning("%s: unreadable (%s); the model card says so", folder / "run_config.yaml", e)
        run_cfg = {}
    data = run_cfg.get("data") or {}
    manifests = _read_manifests([str(p) for p in data.get("paths") or []])
    rows, why = (
        read_metrics(Path(run_dir) / METRICS) if run_dir is not None else ([], "no run folder beside the weights")
    )
    location = str(location if location is not None else folder)
    run_name = Path(_run_of(location)).name or folder.name
    cls = config.get("_class") or (
        f"{type(model).__module__}.{type(model).__qualname__}" if model is not None else None
    )
    tasks = [t for t in config.get("tasks") or [] if isinstance(t, str)] or sorted(
        {t for _, m, _ in manifests for t in ((m or {}).get("tasks") or {}) if t}
    )
    kind = run_cfg.get("model_name") or "model"
    recipe = recipe_of(run_cfg) if run_cfg else ""
    made = (
        f"A {_code(kind)} model{f' (recipe {_code(recipe)})' if recipe else ''} trained by wm-pipeline "
        f"{_version()} with `wm train`."
        if run_cfg
        else f"A model saved with `save_pretrained`, outside a `wm train` run (card by wm-pipeline {_version()})."
    )
    body = [
        CARD_MARK,
        "",
        f"# {kind} `{run_name}`",
        "",
        made,
        "",
        *_model_section(config, config_note, run_cfg, model, folder),
        *_data_section(run_cfg, manifests),
        *_training_section(run_cfg, config, config_note, step, world_size, rows),
        *_metrics_section(rows, why),
        *_eval_section([], _is_policy(spec), _eval_command(_run_of(location), config, tasks)),
        *_use_section(cls, location, spec, config, tasks),
    ]
    return ModelCard(f"---\n{_card_data(run_cfg, run_name, manifests).to_yaml()}\n---\n" + "\n".join(body))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_model_card(folder: str | Path, **kw: Any) -> Path | None:
    """Write ``folder/README.md`` (``model_card``'s keywords), replacing the hub mixin's generic card. Raises only OSError (the
    disk refused the write); a fact it cannot read is written as unknown, and a failure to make the card
    at all is a warning (None): a card never costs a trained run its export."""
    folder = Path(folder)
    path = folder / CARD
    try:
        text = str(model_card(folder, **kw))
    except Exception as e:
        log.warning("%s: model card not written (%s: %s)", path, type(e).__name__, " ".join(str(e).split())[:300])
        return None
    _write_text(path, text)
    return path


# ---------------------------------------------------------------- `wm eval`


def eval_results(results: dict[str, Any], results_path: str | Path) -> list[EvalResult]:
    """``results.json`` of ``wm eval`` as model-index results: per task its success rate (LeRobot's
    ``pc_success``), mean max reward and mean episode length, with the eval's settings as dataset args."""
    env = str(results.get("env") or UNKNOWN)
    args = {
        "episodes": results.get("episodes_per_task"),
        "seed": results.get("seed"),
        "max_steps": results.get("max_steps"),
        "resolution": results.get("resolution"),
        "camera": results.get("camera"),
    }
    args = {k: v for k, v in args.items() if v is not None}
    url = Path(results_path).resolve().as_uri()
    out = []
    for task, r in sorted((results.get("tasks") or {}).items()):
        agg = dict(r.get("aggregated") or {})
        agg.setdefault("pc_success", 100 * r["success_rate"] if "success_rate" in r else None)
        agg["mean_length"] = r.get("mean_length")
        for field, metric, name in EVAL_METRICS:
            if isinstance(agg.get(field), (int, float)):
                out.append(
                    EvalResult(
                        task_type=TASK_TYPE,
                        task_name="closed-loop control",
                        dataset_type=env,
                        dataset_name=f"{env} {task}",
                        dataset_config=task,
                        dataset_args=dict(args),
                        metric_type=metric,
                        metric_name=name,
                        metric_value=float(agg[field]),
                        source_name=SOURCE,
                        source_url=url,
                    )
                )
    return out


def merge_eval_results(old: list[EvalResult], new: list[EvalResult]) -> list[EvalResult]:
    """``old`` without the (env, task) pairs that ``new`` evaluates, plus ``new``; sorted by env, task and
    the card's metric order (the same results in any order give the same card)."""
    fresh = {(r.dataset_type, r.dataset_config) for r in new}
    kept = [r for r in old if (r.dataset_type, r.dataset_config) not in fresh]
    order = {metric: i for i, (_, metric, _) in enumerate(EVAL_METRICS)}
    return sorted(
        kept + new,
        key=lambda r: (r.dataset_type, r.dataset_config or "", order.get(r.metric_type, len(order)), r.metric_type),
    )


def _replace_eval_section(text: str, section: list[str]) -> str | None:
    begin, end = text.find(EVAL_BEGIN), text.find(EVAL_END)
    if begin < 0 or end < begin:
        return None
    inner = section[section.index(EVAL_BEGIN) : section.index(EVAL_END) + 1]
    return text[:begin] + "\n".join(inner) + text[end + len(EVAL_END) :]


def _replaceable(path: Path) -> bool:
    """No card yet, or huggingface_hub's generic one (``save_pretrained`` without ours)."""
    if not path.exists():
        return True
    try:
        card = ModelCard.load(path, ignore_metadata_errors=True)
    except Exception:
        return False
    return CARD_MARK not in card.text and HUB_GENERIC_TAG in (card.data.tags or [])


def record_closed_loop_eval(policy: str | Path, results: dict[str, Any], results_path: str | Path) -> Path | None:
    """Put ``wm eval``'s ``results`` (written to ``results_path``) into the card of the model folder that
    ``policy`` names (a run folder, its ``final/``, or a save_pretrained folder); a folder without a
    card of ours gets one first. Returns the card, or None when ``policy`` is no model folder or the card
    is someone else's or cannot be written (a warning says which): the evaluation itself never fails."""
    from shards.folder_lock import FolderBusy, FolderLock
    from wm_pipeline.exit_codes import UsageError
    from wm_pipeline.run_folder import weights_folder

    try:
        folder = weights_folder(policy)
    except UsageError:
        return None  # e.g. a plugin's policy spec that is no folder
    path = folder / CARD
    try:
        with FolderLock(folder, LOCK, what=f"the model card {path}", wait=LOCK_WAIT_S):
            if _replaceable(path):
                write_model_card(folder)
            if not path.is_file():  # write_model_card said why
                return None
            card = ModelCard.load(path)
            if CARD_MARK not in card.text:
                log.info("%s was not written by wm-pipeline: left as it is", path)
                return None
            merged = merge_eval_results(card.data.eval_results or [], eval_results(results, results_path))
            text = _replace_eval_section(card.text, _eval_section(merged, True, ""))
            if text is None:
                log.warning(
                    "%s: no closed-loop evaluation section (its marker comments were removed); not updated", path
                )
                return None
            card.data.model_name = card.data.model_name or Path(_run_of(str(folder))).name
            card.data.eval_results = merged
            card.text = text
            _write_text(path, str(card))
    except FolderBusy as e:  # another eval kept writing the card for LOCK_WAIT_S
        log.warning("%s; this evaluation is not recorded in the model card", e)
        return None
    except Exception as e:  # a read-only folder, a card whose YAML someone broke, results of another shape
        log.warning(
            "%s: the evaluation could not be recorded in the model card (%s: %s)",
            path,
            type(e).__name__,
            " ".join(str(e).split())[:300],
        )
        return None
    log.info("recorded the closed-loop evaluation in %s", path)
    return path


def _spec_of(folder: Path) -> Any:
    """The registered model spec of a run's model folder, None when unknown."""
    try:
        from wm_pipeline.training.registry import get_model

        name = run_config_of(folder).get("model_name")
        return get_model(name) if name else None
    except Exception:
        return None


__all__ = [
    "CARD",
    "CARD_MARK",
    "EVAL_BEGIN",
    "EVAL_END",
    "model_card",
    "write_model_card",
    "eval_results",
    "merge_eval_results",
    "record_closed_loop_eval",
    "read_metrics",
    "shown_location",
    "hub_dataset_id",
]
