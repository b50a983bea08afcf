"""Step time of the training runtime vs a bare PyTorch loop on the same model and batches.

Both train ``ToyPolicy`` (tests/toy_models.py: a conv net, frames + state -> action) on the same
in-memory batches (no decoding: only the runtime's own cost is measured) and do the same maths:
AdamW, warm-up + cosine schedule, gradient clipping and an EMA update per step. The runtime adds
accelerate's wrappers, the per-step agreement on non-finite loss / preemption, the log line,
metrics.jsonl, TensorBoard and the tqdm bar. Steps 6..N are timed (the runtime's final checkpoint
and export are excluded; see ``TrainResult.loop_seconds``). The machine may be shared: the two
alternate for ``--rounds`` rounds and medians are reported. ``overhead`` = runtime / bare - 1;
target < 0.05. Prints one JSON object.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trainer_overhead.py [--steps 200 --rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from json_report import emit

from wm_pipeline.training.config import resolve
from wm_pipeline.training.ema import EMA
from wm_pipeline.training.registry import register_model
from wm_pipeline.training.trainer import build_optimizer, build_scheduler, train

ROOT = Path(__file__).resolve().parent.parent


def _toy_module():
    spec = importlib.util.spec_from_file_location("wm_bench_toy_models", ROOT / "tests" / "toy_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def make_batches(n: int, batch: int, window: int, size: int, seed: int = 0) -> list[dict]:
    """``n`` batches in the stream's format (docs/CONTRACTS.md), random content."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "frames": torch.randint(0, 256, (batch, window, 3, size, size), dtype=torch.uint8, generator=g),
            "action": torch.randn(batch, window, 3, generator=g),
            "action_mask": torch.ones(batch, dtype=torch.bool),
            "state": torch.randn(batch, window, 2, generator=g),
            "state_mask": torch.ones(batch, dtype=torch.bool),
            "key": [f"ep{i}" for i in range(batch)],
            "start": torch.zeros(batch, dtype=torch.int64),
            "embodiment": ["toybot"] * batch,
            "task": ["bench"] * batch,
        }
        for _ in range(n)
    ]


def bare_loop(model_cls, cfg, batches: list[dict], steps: int) -> float:
    """Seconds per step of a hand-written loop doing the runtime's maths, steps 6..N."""
    torch.manual_seed(0)
    model = model_cls(cfg.model)
    ema = EMA(model, cfg.ema.decay, cfg.ema.warmup)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg)
    data = itertools.cycle(batches)
    t0 = None
    for step in range(steps):
        if step == 5:
            t0 = time.perf_counter()
        loss, _ = model(next(data))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
    return (time.perf_counter() - t0) / (steps - 5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    toy = _toy_module()
    batches = make_batches(8, args.batch, 2, args.size)
    spec = register_model(
        "bench-toy", toy.ToyConfig, toy.ToyPolicy, toy.PRESETS, build_stream=lambda cfg, seed: itertools.cycle(batches)
    )
    cfg = resolve(
        "bench-toy",
        toy.ToyConfig,
        toy.PRESETS,
        preset="small",
        overrides=[
            f"train.max_steps={args.steps}",
            f"train.ckpt_every={args.steps}",
            "train.eval_every=0",
            "train.log_every=25",
            "train.log_with=tensorboard",
            f"data.batch_size={args.batch}",
            "model.action_dim=3",
            "model.state_dim=2",
            f"model.image_size=[{args.size},{args.size}]",
        ],
    )
    cfg.data.paths = ["<in memory>"]

    import wm_pipeline.training.trainer as trainer_mod

    trainer_mod.read_manifests = lambda paths: []  # in-memory batches: no dataset folder to read

    runtime, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            result = train(cfg, spec, Path(tmp) / f"run{r}")
            runtime.append(result.loop_seconds / result.loop_steps)
            bare.append(bare_loop(toy.ToyPolicy, cfg, batches, args.steps))
    rt, br = statistics.median(runtime), statistics.median(bare)
    report = {
        "benchmark": "trainer_overhead",
        "steps": args.steps,
        "rounds": args.rounds,
        "batch": args.batch,
        "image": args.size,
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in toy.ToyPolicy(cfg.model).parameters()),
        "runtime_s_per_step": rt,
        "bare_s_per_step": br,
        "ratio": rt / br,
        "overhead": rt / br - 1,
        "runtime_rounds": runtime,
        "bare_rounds": bare,
        "target_overhead": 0.05,
    }
    emit(report, args.out, indent=1)


if __name__ == "__main__":
    main()
