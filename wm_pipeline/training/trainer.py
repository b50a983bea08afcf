"""The one training loop every registered model trains through.

``train(cfg, spec, run_dir)`` builds the model from the registry spec, then per optimizer step::

    grad_accum x (next batch -> forward under autocast -> backward)   (DDP syncs on the last)
    clip grads -> agree across ranks on (non-finite loss?, preemption signal?)
    optimizer + warm-up/cosine scheduler step -> EMA update
    every log_every: log line + metrics.jsonl + TensorBoard/W&B;  every eval_every: EMA eval
    every ckpt_every: checkpoint, then restart the data stream seeded by (seed, step)

Reproducible data: the stream is re-created at every checkpoint with a seed derived from
``(train.seed, step)`` (each rank and DataLoader worker folds in its own index inside
``WindowStream``), and the RNG states of every rank are saved with the weights. Resuming from
a checkpoint therefore replays exactly the batches and random draws an uninterrupted run sees
after that step, at no fast-forward cost (skipping up to ``ckpt_every`` batches would mean
decoding them). A preemption checkpoint starts a new segment too: the run stays deterministic
from its checkpoints, but its sample order after the signal differs from an uninterrupted run.

One job per run folder: rank 0 holds ``RUN/.lock`` (shards.folder_lock) for the whole run; a
second job into the same folder stops at once on every rank with ``FolderBusy`` naming the holder.

Resume verifies the checkpoints before loading one (wm_pipeline.training.checkpoint.resume_checkpoint): a damaged
newest checkpoint is skipped with a warning naming the bad file, and the run resumes from the newest
intact one; none intact is a one-line error (exit 2).

``RUN/status.json`` always ends in a final state once this job holds the lock: ``finished``,
``preempted``, ``nonfinite``, or ``failed`` (with the exit code) for any exception out of the run,
e.g. a checkpoint write that hit a full disk (``WriteFailed``: the partial checkpoint is removed,
exit 74).

Exit codes (wm_pipeline.exit_codes): 0 done, 2 bad config / data / unreadable file, 4 non-finite loss,
74 an output could not be written, 75 preempted (checkpoint written).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import functools
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import set_seed
from tqdm import tqdm

from shards.batch_keys import KEY, START
from shards.dataset_info import DatasetInfo
from shards.folder_lock import FolderBusy, FolderLock
from shards.format import read_manifest
from shards.location import missing_folder
from wm_pipeline import exit_codes, model_card, weights
from wm_pipeline.exit_codes import UsageError, WriteFailed
from wm_pipeline.run_folder import CONFIG, FINAL, LOCK, METRICS, RUN_CONFIG, STATUS, TENSORBOARD
from wm_pipeline.training import checkpoint, config as config_mod
from wm_pipeline.training.distributed import derive_seed, make_accelerator
from wm_pipeline.training.ema import EMA
from wm_pipeline.training.preemption import PreemptionHandler, agree
from wm_pipeline.training.registry import ModelDataMismatch, ModelSpec

log = logging.getLogger(__name__)


class NonFiniteLoss(Exception):
    """Loss or gradient norm was NaN/inf more than ``train.nan_skip_steps`` times."""


@dataclasses.dataclass
class TrainResult:
    exit_code: int
    step: int
    run_dir: Path
    resumed_from: int | None = None  # step of the checkpoint this run started from
    loop_seconds: float = 0.0  # wall time of the steps after the first 5 of this process,
    # logging/eval/checkpoints between them included
    loop_steps: int = 0  # steps in loop_seconds


# ---------------------------------------------------------------- pieces


def read_manifests(paths: list[str]) -> list[dict]:
    if not paths:
        raise UsageError("no training data: pass --data DIR (a dataset folder with manifest.json)")
    for p in paths:
        if missing_folder(p):  # a URL (s3://, http://, pipe:) is checked by reading its manifest
            raise UsageError(f"data folder {p} does not exist")
    return [read_manifest(p) for p in paths]


def read_dataset_info(paths: list[str]) -> DatasetInfo:
    """The run's data folders, each manifest read once (``read_manifests``: a missing folder is a UsageError)."""
    return DatasetInfo.from_manifests(paths, read_manifests(paths))


def fill_from_data(cfg: config_mod.RunConfig, spec: ModelSpec, info: DatasetInfo) -> config_mod.RunConfig:
    """The run config with the data-dependent fields filled by the recipe's ``prepare``, validated.

    ``prepare(cfg, info)`` returns a new config; a plugin's ``prepare`` that fills ``cfg`` in place
    (returning None) gets a copy, so the caller's config is never changed."""
    if spec.prepare is None:
        return cfg
    work = copy.deepcopy(cfg)
    filled = spec.prepare(work, info)  # raises ModelDataMismatch when model and data disagree
    return config_mod.validate(work if filled is None else filled)


def build_optimizer(
    model: torch.nn.Module, o: config_mod.OptimConfig, device: torch.device | str | None = None
) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and kernels only (not biases, norms, embeddings' scales).
    ``o.impl`` picks the kernel (``optimizer_impl``) for ``device``, where the model will train
    (default: where its parameters are now)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), **optimizer_impl(o.impl, device)
    )


def optimizer_impl(impl: str, device: torch.device) -> dict[str, bool]:
    """AdamW's kernel flags for ``optim.impl``: ``auto`` is fused on CUDA, foreach elsewhere; ``fused``
    (one kernel for all parameters), ``foreach`` (one op per step over the parameter list) and
    ``for-loop`` (per parameter) compute the same update."""
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    return {
        "fused": {"fused": True},
        "foreach": {"foreach": True, "fused": False},
        "for-loop": {"foreach": False, "fused": False},
    }[impl]


def compile_model(model: torch.nn.Module, t: config_mod.TrainConfig) -> torch.nn.Module:
    """With ``train.compile``, ``model`` (as ``accelerate.prepare`` returned it: DDP-wrapped on several
    ranks, so that compiling it lets dynamo split the graph at DDP's buckets, as torch's docs advise)
    compiled in place (``nn.Module.compile``): calls go through ``torch.compile``, but no wrapper
    module is made, so ``state_dict`` keys, ``unwrap_model``, checkpoints and the EMA copy (made before,
    eager) are those of the eager model."""
    if t.compile:
        model.compile(mode=None if t.compile_mode == "default" else t.compile_mode)
    return model


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps: linear warm-up, then cosine to ``floor``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: config_mod.RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    fn = functools.partial(
        lr_factor, warmup=cfg.optim.warmup_steps, total=cfg.train.max_steps, floor=cfg.optim.min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def batch_keys(batch: dict[str, Any]) -> list[str]:
    """``key@start`` of every window in a batch (names the data in error messages)."""
    keys = batch.get(KEY) or []
    starts = batch.get(START)
    starts = starts.tolist() if torch.is_tensor(starts) else [None] * len(keys)
    return [f"{k}@{s}" if s is not None else str(k) for k, s in zip(keys, starts)]


class MetricSink:
    """Rank 0's metric outputs: RUN/metrics.jsonl (always), TensorBoard and/or W&B (train.log_with)."""

    def __init__(self, run_dir: Path, cfg: config_mod.RunConfig, start_step: int):
        self.path = run_dir / METRICS
        if self.path.exists():  # drop rows a killed run wrote after its last checkpoint
            rows = [r for r in self.path.read_text().splitlines() if r.strip()]
            kept = [r for r in rows if json.loads(r).get("step", 0) <= start_step]
            self.path.write_text("".join(r + "\n" for r in kept))
        self.file = open(self.path, "a")
        self.tb = self.wandb = None
        if "tensorboard" in cfg.train.log_with:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=start_step + 1 if start_step else None)
        if "wandb" in cfg.train.log_with:
            try:
                import wandb
            except ImportError:
                raise UsageError(
                    "train.log_with includes wandb but wandb is not installed (pip install 'wm-pipeline[wandb]')"
                ) from None
            self.wandb = wandb.init(
                project=cfg.train.wandb_project,
                name=run_dir.name,
                dir=str(run_dir),
                config=config_mod.to_dict(cfg),
                resume="allow",
                id=run_dir.name,
            )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        try:
            self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
            self.file.flush()
        except OSError as e:
            raise WriteFailed(f"cannot write {self.path}: {e.strerror or e}") from None
        for k, v in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self, failing: bool = False) -> None:
        """Flush and close; a refused flush is ``WriteFailed`` naming the file, unless the run is already
        ``failing`` (then the first error is the one reported)."""
        try:
            self.file.close()
        except OSError as e:
            if not failing:
                raise WriteFailed(f"cannot write {self.path}: {e.strerror or e}") from None
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def write_status(run_dir: Path, state: str, step: int, code: int) -> None:
    """RUN/status.json, replaced atomically (a full disk leaves the previous one, never half a file)."""
    path, tmp = run_dir / STATUS, run_dir / (STATUS + ".tmp")
    text = json.dumps({"state": state, "step": step, "exit_code": code, "time": round(time.time(), 3)}) + "\n"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in DISK_FULL and _overwrite_in_place(path, text):
            return
        raise WriteFailed(f"cannot write {path}: {e.strerror or e}") from None


def _overwrite_in_place(path: Path, text: str) -> bool:
    """A full disk: rewrite the existing status.json inside the blocks it already holds (padded with
    spaces to its old length, which JSON ignores), so that it still ends in a final state."""
    try:
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.write(text.encode().ljust(size))
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        return False


# errnos that mean "the disk refuses the write": reported as WriteFailed (exit 74), not as a bug
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def exit_code_of(e: BaseException) -> int:
    """The exit code the CLI gives for an exception leaving ``train`` (recorded in status.json)."""
    from shards.format import FormatError

    if isinstance(e, WriteFailed):
        return exit_codes.WRITE_FAILED
    if isinstance(e, (UsageError, FormatError, FileNotFoundError, FolderBusy)):
        return exit_codes.USAGE
    if isinstance(e, KeyboardInterrupt):
        return 130
    return exit_codes.FAILED


class _Status:
    """RUN/status.json of this job: written by the main rank only, and only once it holds the run
    folder's lock (a job refused before that leaves the folder as it was). ``close`` writes the final
    state; ``fail`` writes ``failed`` with the exception's exit code unless a final state is written."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.active, self.closed, self.step = run_dir, False, False, 0

    def write(self, state: str, step: int, code: int) -> None:
        self.step = step
        if self.active and not self.closed:
            write_status(self.run_dir, state, step, code)

    def close(self, state: str, step: int, code: int) -> None:
        self.write(state, step, code)
        self.closed = True

    def fail(self, e: BaseException) -> None:
        if not self.active or self.closed:
            return
        code = exit_code_of(e)
        try:
            self.close("failed", self.step, code)
        except WriteFailed as again:
            log.error("%s (the run failed with exit code %d)", again, code)
            self.closed = True


def _write_config(run_dir: Path, cfg: config_mod.RunConfig) -> None:
    path = run_dir / CONFIG
    new = config_mod.to_dict(cfg)
    if path.exists():
        old = config_mod.renamed_keys(yaml.safe_load(path.read_text()) or {})
        changes = config_mod.diff(old, new)
        if changes:
            log.warning("config differs from the previous run in %s: %s", run_dir, "; ".join(changes))
    tmp = path.with_name(path.name + ".tmp")  # replaced atomically: a full disk leaves the old one whole
    try:
        tmp.write_text(yaml.safe_dump(new, sort_keys=False))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(f"cannot write {path}: {e.strerror or e}") from None


def export_final(
    run_dir: Path,
    ema_model: torch.nn.Module,
    cfg: config_mod.RunConfig,
    step: int | None = None,
    world_size: int | None = None,
) -> Path:
    """RUN/final/: the EMA model via save_pretrained (+ the run config and the model card, README.md:
    wm_pipeline.model_card), atomically replaced. A failed write removes ``final.tmp`` and raises
    ``WriteFailed`` (the last checkpoint still has the weights: rerunning exports them)."""
    from safetensors import SafetensorError

    final, tmp = run_dir / FINAL, run_dir / (FINAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ema_model.save_pretrained(tmp)
        (tmp / RUN_CONFIG).write_text(yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False))
        model_card.write_model_card(
            tmp, run_dir=run_dir, location=final, model=ema_model, step=step, world_size=world_size
        )  # a fact it cannot read is "unknown", never an error
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = " ".join(str(getattr(e, "strerror", None) or e).split())
        raise WriteFailed(
            f"cannot write {getattr(e, 'filename', None) or tmp}: {reason}; removed {tmp}; the last "
            f"checkpoint holds the weights: make room and rerun to export them"
        ) from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log.info("exported EMA model -> %s", final)
    return final


def lock_run_dir(run_dir: Path, main: bool, device: torch.device, locks: contextlib.ExitStack) -> None:
    """One job per run folder: the main rank holds ``RUN/.lock`` (shards.folder_lock) until ``locks``
    closes; every rank learns whether it got it (one all-reduce), so that a refused job stops on all
    ranks at once (``FolderBusy``) instead of leaving some waiting in a collective."""
    from shards.writer import DiskFull, take_lock

    refused = None
    if main:
        try:
            locks.enter_context(take_lock(FolderLock(run_dir, what=f"run folder {run_dir}")))
        except FolderBusy as e:
            refused = e
        except DiskFull as e:  # not even room for the lock file
            refused = WriteFailed(str(e))
    busy, disk = agree([isinstance(refused, FolderBusy), isinstance(refused, WriteFailed)], device)
    if refused is not None:
        raise refused
    if busy:
        raise FolderBusy(f"run folder {run_dir} is in use by another job (rank 0's message names it)")
    if disk:
        raise WriteFailed(f"rank 0 cannot write the lock file {run_dir / LOCK} (its message says why)")


def check_init_exists(cfg: config_mod.RunConfig) -> None:
    if cfg.init is not None and not Path(cfg.init).exists():
        raise UsageError(f"--init {cfg.init} does not exist (expected a run folder of `wm train`)")


def check_init_used(cfg: config_mod.RunConfig, spec: ModelSpec) -> None:
    """Refuse an ``--init`` that nothing would load: the model does not fine-tune (``warm_start``) and
    this recipe does not read it (``reads_init``; e.g. ``wm train decoder policy=scratch``)."""
    if cfg.init is None or spec.warm_start or (spec.reads_init is not None and spec.reads_init(cfg)):
        return
    recipe = f"model '{spec.name}'" + (f" with policy={cfg.recipe}" if cfg.recipe else "")
    raise UsageError(
        f"--init {cfg.init}: {recipe} does not use it (nothing would be loaded from it); "
        f"drop --init, or pick the policy that starts from it"
    )


# exceptions a model's constructor raises for config values it cannot build (sizes of 0, bad ratios)
_BAD_CONFIG_ERRORS = (ValueError, TypeError, AssertionError, ZeroDivisionError, RuntimeError, IndexError)


def build_model(cfg: config_mod.RunConfig, spec: ModelSpec) -> torch.nn.Module:
    """The model of ``cfg``: a config it cannot be built from is a one-line ``UsageError`` (exit 2), raised
    before anything is written to the run folder, naming the model.* values that look suspicious."""
    try:
        with weights.loading(weights.config_folders(cfg.model), what="a folder the model config points at:"):
            return spec.model_cls(cfg.model)  # may load frozen parts (a VAE, a text encoder) from disk
    except UsageError:
        raise
    except _BAD_CONFIG_ERRORS as e:
        log.debug("building model '%s' failed", spec.name, exc_info=True)
        preset = spec.presets.get(cfg.preset)  # values <= 0 the user set (not the preset's own zeros)
        suspicious = [
            f"model.{f.name}={getattr(cfg.model, f.name)}"
            for f in dataclasses.fields(cfg.model)
            if type(getattr(cfg.model, f.name)) in (int, float)
            and getattr(cfg.model, f.name) <= 0
            and getattr(preset, f.name, None) != getattr(cfg.model, f.name)
        ]
        hint = f" (check {', '.join(suspicious)})" if suspicious else ""
        first = " ".join(str(e).split())[:300] or type(e).__name__
        raise UsageError(
            f"model '{spec.name}' cannot be built from this config: {type(e).__name__}: {first}{hint}"
        ) from None


# ---------------------------------------------------------------- the loop


class _Run:
    """State of one training process; ``train`` drives it."""

    def __init__(
        self, cfg: config_mod.RunConfig, spec: ModelSpec, run_dir: Path, locks: contextlib.ExitStack, status: _Status
    ):
        self.cfg, self.spec, self.run_dir = cfg, spec, run_dir
        # Everything the user can get wrong is checked before anything is written to RUN: the data, the
        # model/data fit, --init, and that the model builds from the config.
        info = read_dataset_info(cfg.data.paths)
        check_init_exists(cfg)
        self.cfg = cfg = fill_from_data(cfg, spec, info)  # data-dependent model fields; ModelDataMismatch
        check_init_used(cfg, spec)  # after prepare: it settles the recipe (e.g. the default policy)
        self.acc = make_accelerator(cfg.train.precision)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.main = self.acc.is_main_process
        seed = cfg.train.seed
        set_seed(derive_seed(seed, "init"))  # identical initial weights on every rank
        model = build_model(cfg, spec)
        lock_run_dir(run_dir, self.main, self.acc.device, locks)  # before anything is written there
        run_dir.mkdir(parents=True, exist_ok=True)
        done = checkpoint.complete_checkpoints(run_dir)
        status.active, status.step = self.main, done[-1][0] if done else 0  # from here on, any end is recorded
        if self.main:
            checkpoint.remove_partial(run_dir)
        if spec.warm_start and cfg.init and checkpoint.latest_checkpoint(run_dir) is None:
            checkpoint.load_init_weights(model, cfg.init)  # fine-tuning; a resume loads its own weights
        self.ema = EMA(model, cfg.ema.decay, cfg.ema.warmup)
        optimizer = build_optimizer(model, cfg.optim, self.acc.device)
        self.scheduler = build_scheduler(optimizer, cfg)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        compile_model(self.model, cfg.train)  # training forward + loss; eval runs the EMA model eagerly
        self.ema.model.to(self.acc.device)
        set_seed(derive_seed(seed, "rank", self.rank))  # model-internal noise differs per rank
        self.step, self.resumed_from, self.bad_steps = 0, None, 0
        # the newest checkpoint whose files all read back on every rank; damaged newer ones are skipped
        latest, damaged = checkpoint.resume_checkpoint(run_dir, self.rank)
        if latest is not None:
            try:
                state = checkpoint.load_checkpoint(
                    latest,
                    model=self.acc.unwrap_model(self.model),
                    ema_model=self.ema.model,
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    rank=self.rank,
                )
            except UsageError:  # an unreadable file (named): not a config change
                raise
            except (RuntimeError, KeyError, ValueError, OSError) as e:  # read fine, does not fit the model
                first = " ".join(str(e).split())[:300] or type(e).__name__
                raise UsageError(
                    f"{latest}: cannot resume from it ({first}); did the model config change? "
                    f"use a new --out, or the settings in {run_dir / CONFIG}"
                ) from None
            self.step = self.resumed_from = int(state["step"])
            self.bad_steps = int(state.get("bad_steps", 0))
            self.ema.load_state(state["ema"])
            log.info("resuming from %s (step %d of %d)", latest, self.step, cfg.train.max_steps)
            if self.main:
                checkpoint.set_aside(damaged)
        status.step = self.step
        if self.main:  # after a successful resume: a refused config must not replace the good one
            _write_config(run_dir, cfg)
        self.eval_batches: list[dict] | None = None

    # -- data

    def data(self, start_step: int) -> Iterator[dict]:
        """Training batches of the segment starting at ``start_step`` (see module docstring)."""
        return iter(self.spec.stream(self.cfg, seed=derive_seed(self.cfg.train.seed, "data", start_step)))

    def check_first_batch(self, batch: dict) -> None:
        missing = [k for k in self.spec.required_keys if k not in batch]
        if missing:
            raise ModelDataMismatch(
                f"model '{self.spec.name}' needs batch key(s) {missing} that the data "
                f"{self.cfg.data.paths} does not provide (it has {sorted(batch)})"
            )

    # -- one optimizer step

    def train_step(self, data: Iterator[dict], stop_flag: bool) -> tuple[bool, bool, dict[str, float]]:
        """Returns (bad, stop, metrics): bad = non-finite loss/grad on any rank, stop = signal on any rank."""
        accum = self.cfg.optim.grad_accum
        total = torch.zeros((), device=self.acc.device)
        sums: dict[str, float] = {}
        keys: list[str] = []
        for micro in range(accum):
            batch = next(data)
            if self.step == (self.resumed_from or 0) and micro == 0 and self.spec.required_keys:
                self.check_first_batch(batch)
            keys += batch_keys(batch)
            sync = contextlib.nullcontext() if micro == accum - 1 else self.acc.no_sync(self.model)
            with sync:
                with self.acc.autocast():
                    loss, metrics = self.model(to_device(batch, self.acc.device))
                self.acc.backward(loss / accum)
            total += loss.detach().float() / accum
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        grad_norm = None
        if self.cfg.optim.grad_clip > 0:
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        finite = torch.isfinite(total) & (torch.isfinite(grad_norm) if grad_norm is not None else True)
        bad, stop = agree([not bool(finite), stop_flag], self.acc.device)
        out = {"loss": float(total), **sums}
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            msg = (
                f"non-finite loss at step {self.step + 1} (loss {out['loss']}, grad_norm "
                f"{out.get('grad_norm')}) on batch keys {keys}"
            )
            if self.bad_steps > self.cfg.train.nan_skip_steps:
                raise NonFiniteLoss(
                    msg + f"; {self.bad_steps} bad step(s) > train.nan_skip_steps={self.cfg.train.nan_skip_steps}"
                )
            log.warning("%s: skipped (%d of %d allowed)", msg, self.bad_steps, self.cfg.train.nan_skip_steps)
            return True, stop, out
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.acc.unwrap_model(self.model))
        self.step += 1
        return False, stop, out

    # -- eval / checkpoint

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """EMA model's mean loss/metrics on fixed batches (same every eval), plus the spec's own eval."""
        cfg = self.cfg
        if self.eval_batches is None:
            it = iter(self.spec.stream(cfg, seed=derive_seed(cfg.train.seed, "eval")))
            self.eval_batches = [next(it) for _ in range(cfg.train.eval_batches)]
            del it
        sums: dict[str, float] = {}
        # a fixed seed makes eval noise comparable across steps and leaves the training RNG untouched
        with torch.random.fork_rng(devices=[self.acc.device] if self.acc.device.type == "cuda" else []):
            torch.manual_seed(derive_seed(cfg.train.seed, "eval-noise", self.rank))
            for batch in self.eval_batches:
                with self.acc.autocast():
                    loss, metrics = self.ema.model(to_device(batch, self.acc.device))
                for k, v in {"loss": loss, **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / len(self.eval_batches)
            if self.spec.evaluate is not None:
                sums.update(self.spec.evaluate(self.ema.model, cfg, self.step))
        names = sorted(sums)
        values = torch.tensor([sums[k] for k in names], device=self.acc.device)
        values = self.acc.reduce(values, reduction="mean") if self.world > 1 else values
        return {f"eval/{k}": float(v) for k, v in zip(names, values.tolist())}

    def save(self) -> None:
        try:
            self._save()
        except WriteFailed as e:
            raise WriteFailed(f"{e}; a checkpoint {self._room()}") from None

    def _room(self) -> str:
        """How much room a checkpoint takes (the newest complete one, else the weights in memory) and is free."""
        from shards.writer import room_note

        newest = checkpoint.latest_checkpoint(self.run_dir)
        if newest is not None:
            size = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
            return room_note(self.run_dir, size, f"the size of {newest.name}")
        params = sum(p.numel() * p.element_size() for p in self.acc.unwrap_model(self.model).parameters())
        return room_note(self.run_dir, 4 * params, "weights, EMA weights and two AdamW moments")

    def _save(self) -> None:
        checkpoint.save_checkpoint(
            self.run_dir,
            self.step,
            model=self.acc.unwrap_model(self.model),
            ema_model=self.ema.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            rank=self.rank,
            keep_last=self.cfg.train.keep_last,
            trainer_state={
                "bad_steps": self.bad_steps,
                "ema": self.ema.state(),
                "world_size": self.world,
                "data": {"seed": self.cfg.train.seed, "segment_start": self.step},
                "model_name": self.spec.name,
            },
        )


def _log_line(step: int, total: int, m: dict[str, float], eta_s: float) -> str:
    extra = " | ".join(
        f"{k} {v:.4g}"
        for k, v in m.items()
        if k not in ("loss", "lr", "grad_norm", "steps_per_s", "samples_per_s", "data_s")
    )
    eta = time.strftime("%H:%M:%S", time.gmtime(max(0.0, eta_s)))
    gn = f" | grad_norm {m['grad_norm']:.3g}" if "grad_norm" in m else ""
    return (
        f"step {step}/{total} | loss {m['loss']:.4g} | lr {m['lr']:.3g}{gn} | {m['steps_per_s']:.2f} step/s"
        f" | {m['samples_per_s']:.1f} samples/s | eta {eta}" + (f" | {extra}" if extra else "")
    )


def train(
    cfg: config_mod.RunConfig, spec: ModelSpec, run_dir: str | Path, signals: PreemptionHandler | None = None
) -> TrainResult:
    """Train ``spec``'s model with ``cfg`` into ``run_dir``, resuming from its latest checkpoint.

    Holds ``run_dir/.lock`` (rank 0) for the whole run: ``FolderBusy`` when another job trains there.
    Once the lock is held, every way out writes a final state to ``run_dir/status.json`` (rank 0): an
    exception writes ``failed`` with its exit code (``exit_code_of``) and propagates; an OSError of a
    full or read-only disk propagates as ``WriteFailed`` naming the file.

    ``signals``: a ``PreemptionHandler`` installed by the caller as early as it could (`wm train` does so
    before importing torch), so that SIGUSR1 / SIGTERM during start-up are a checkpoint at the first step
    boundary, never a dead process; by default one is installed here, before anything else."""
    run_dir = Path(run_dir)
    status = _Status(run_dir)
    signals = signals if signals is not None else PreemptionHandler().install()
    try:
        with contextlib.ExitStack() as locks:
            try:
                return _train(cfg, spec, run_dir, locks, status, signals)
            except BaseException as e:
                disk = isinstance(e, OSError) and e.errno in DISK_FULL and not isinstance(e, WriteFailed)
                error = _disk_error(e, run_dir) if disk else e
                if isinstance(e, WriteFailed) and "free there" not in str(e):  # metrics, config, status, final
                    error, disk = WriteFailed(f"{e} ({_free(run_dir)} free there): make room and rerun"), True
                status.fail(error)
                if disk:
                    raise error from None
                raise
    finally:
        signals.uninstall()


def _disk_error(e: OSError, run_dir: Path) -> WriteFailed:
    log.debug("the disk refused a write", exc_info=e)  # `wm -v train`: where it happened
    return WriteFailed(
        f"cannot write {e.filename or f'in {run_dir}'}: {e.strerror or e} "
        f"({_free(run_dir)} free there): make room and rerun"
    )


def _free(run_dir: Path) -> str:
    from shards.writer import free_bytes, megabytes

    free = free_bytes(run_dir)
    return megabytes(free) if free is not None else "unknown"


def _train(
    cfg: config_mod.RunConfig,
    spec: ModelSpec,
    run_dir: Path,
    locks: contextlib.ExitStack,
    status: _Status,
    signals: PreemptionHandler,
) -> TrainResult:
    run = _Run(cfg, spec, run_dir, locks, status)
    cfg = run.cfg  # filled from the data
    t = cfg.train
    result = TrainResult(exit_codes.OK, run.step, run_dir, run.resumed_from)
    if run.step >= t.max_steps:
        log.info("%s already reached max_steps=%d", run_dir, t.max_steps)
        if run.main and not (run_dir / FINAL).is_dir():
            export_final(run_dir, run.ema.model, cfg, step=run.step, world_size=run.world)
        status.close("finished", run.step, exit_codes.OK)
        return result
    sink = MetricSink(run_dir, cfg, run.step) if run.main else None
    samples_per_step = cfg.data.batch_size * cfg.optim.grad_accum * run.world
    bar = tqdm(
        total=t.max_steps,
        initial=run.step,
        desc=f"train {spec.name}",
        unit="step",
        dynamic_ncols=True,
        disable=not (run.main and t.progress),
        mininterval=1.0,
    )
    window: dict[str, float] = {}
    n_window, t_window, t_warm, warm_step = 0, time.perf_counter(), None, None
    data = run.data(run.step)
    state, code = "running", exit_codes.OK
    status.write(state, run.step, code)
    with contextlib.nullcontext():  # `signals` is installed since train() began and uninstalled when it ends
        try:
            while run.step < t.max_steps:
                bad, stop, m = run.train_step(data, signals.local_flag)
                status.step = run.step
                if not bad:
                    n_window += 1
                    for k, v in m.items():
                        window[k] = window.get(k, 0.0) + v
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.4g}", refresh=False)
                    t_step_end = time.perf_counter()
                    if run.step == (run.resumed_from or 0) + 5:
                        t_warm, warm_step = t_step_end, run.step
                    if run.step % t.log_every == 0 and n_window:
                        dt = time.perf_counter() - t_window
                        logged = {k: v / n_window for k, v in window.items()}
                        logged.update(
                            lr=run.scheduler.get_last_lr()[0],
                            steps_per_s=n_window / dt,
                            samples_per_s=n_window * samples_per_step / dt,
                        )
                        if run.main:
                            log.info(_log_line(run.step, t.max_steps, logged, (t.max_steps - run.step) * dt / n_window))
                            sink.write(run.step, logged)
                        window, n_window, t_window = {}, 0, time.perf_counter()
                    if t.eval_every and run.step % t.eval_every == 0:
                        metrics = run.evaluate()
                        if run.main:
                            log.info(
                                "eval step %d: %s", run.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                            )
                            sink.write(run.step, metrics)
                    if run.step % t.ckpt_every == 0 or run.step == t.max_steps:
                        run.save()
                        if run.step < t.max_steps and not stop:
                            data = run.data(run.step)  # new segment: resume replays it exactly
                if stop:
                    signals.stopping = True
                    if checkpoint.latest_checkpoint(run_dir) != checkpoint.step_dir(run_dir, run.step):
                        run.save()
                    log.warning(
                        "preempted by %s at step %d: checkpoint written, exiting %d; rerun the same command to resume",
                        signals.received or "a signal on another rank",
                        run.step,
                        exit_codes.PREEMPTED,
                    )
                    state, code = "preempted", exit_codes.PREEMPTED
                    break
            else:
                if t_warm is not None:  # steps 6..N, without the final checkpoint and export
                    result.loop_seconds, result.loop_steps = t_step_end - t_warm, run.step - warm_step
                if run.main:
                    export_final(run_dir, run.ema.model, cfg, step=run.step, world_size=run.world)
                state = "finished"
        except NonFiniteLoss as e:
            log.error("%s", e)
            state, code = "nonfinite", exit_codes.NONFINITE_LOSS
        finally:
            bar.close()
            if sink is not None:
                sink.close(failing=sys.exc_info()[0] is not None)
            del data
    status.close(state, run.step, code)
    result.exit_code, result.step = code, run.step
    del run
    return result
