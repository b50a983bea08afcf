"""Training steps/s eager vs compiled (``train.compile``) and per AdamW kernel (``optim.impl``), in one run.

A step is what the runtime does per optimizer step: forward + loss (under bf16 autocast with
``--precision bf16``), backward, gradient clipping, AdamW (the runtime's ``build_optimizer``: decay
groups, the chosen kernel), zero_grad. The compiled model is compiled the way the runtime does it
(``trainer.compile_model``: ``nn.Module.compile``). Per configuration the settings are eager with each
kernel (``for-loop``, ``foreach``, ``fused``) and compiled with ``auto`` (fused on CUDA, foreach on the
CPU); each gets its own model from the same seed and the same fixed batch. After a warm-up (the
compiled setting's first calls compile it: ``compile_s``) the settings alternate, one step each per
repetition, so that load from other processes spreads over all of them. Each step is timed on the
wall clock and on this process's CPU time; with one thread (the default) the ratios are on CPU time,
which on a shared machine is the work itself without the waits (``--clock wall`` to change that).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compile.py [--configs tiny-decoder,tiny-uwm] [--reps 20]
    python3 benchmarks/compile.py --device cuda --precision bf16 --configs small-uwm,base-uwm,base-dust

Prints one JSON object: per configuration and setting the median ms per step and steps/s, and the
ratios ``compiled_over_eager`` (steps/s compiled / eager, both with the ``auto`` kernel) and
``<kernel>_over_for_loop`` (eager steps/s of that kernel / the for-loop one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time

import torch
import world_model as wm_bench  # its configurations and batches (a sibling script)
from json_report import emit

from wm_pipeline.training.config import OptimConfig, TrainConfig
from wm_pipeline.training.trainer import build_optimizer, compile_model, optimizer_impl

IMPLS = ("for-loop", "foreach", "fused")


def decoder_config(preset: str):
    from decoders.decoder import DecoderConfig
    from nets.normalize import stats_of

    g = torch.Generator().manual_seed(0)
    stats = {
        "robot": {
            "action": stats_of(torch.rand(100, 4, generator=g) * 2 - 1),
            "state": stats_of(torch.randn(100, 39, generator=g)),
        }
    }
    return DecoderConfig.from_preset(
        preset, action_dim=4, state_dim=39, image_size=[64, 64], tasks=["reach-v3"], stats=stats
    )


def decoder_batch(cfg, b: int) -> dict:
    g = torch.Generator().manual_seed(1)
    t = cfg.window_length
    return {
        "frames": torch.randint(0, 256, (b, t, 3, 64, 64), dtype=torch.uint8, generator=g),
        "action": torch.rand(b, t, 4, generator=g) * 2 - 1,
        "action_mask": torch.ones(b, dtype=torch.bool),
        "state": torch.randn(b, t, 39, generator=g),
        "state_mask": torch.ones(b, dtype=torch.bool),
        "embodiment": ["robot"] * b,
        "task": ["reach-v3"] * b,
    }


def configs() -> dict:
    """name -> (build model, build batch of size b, default batch size)."""
    from decoders.decoder import ActionDecoder
    from worldmodel.uwm import WorldModel

    out = {}
    for preset in ("tiny", "small", "base"):
        out[f"{preset}-decoder"] = (
            lambda p=preset: ActionDecoder(decoder_config(p)),
            lambda b, p=preset: decoder_batch(decoder_config(p), b),
            32 if preset == "base" else 8,
        )
    for name, (cfg, batch) in wm_bench.configs().items():
        out[name] = (lambda c=cfg: WorldModel(c), lambda b, c=cfg: wm_bench.make_batch(c, b), batch)
    return out


def settings(device: torch.device) -> list[tuple[str, bool, str]]:
    auto = "fused" if optimizer_impl("auto", device) == {"fused": True} else "foreach"
    return [(f"eager_{impl}", False, impl) for impl in IMPLS] + [(f"compiled_{auto}", True, auto)]


class Setting:
    def __init__(self, build, batch: dict, compiled: bool, impl: str, args, device: torch.device):
        torch.manual_seed(0)
        self.model = build().to(device).train()
        self.optimizer = build_optimizer(self.model, OptimConfig(lr=1e-4, impl=impl), device)
        compile_model(self.model, TrainConfig(compile=compiled, compile_mode=args.compile_mode))
        self.batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        self.device, self.bf16 = device, args.precision == "bf16"
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.losses: list[float] = []

    def step(self) -> None:
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with amp:
            loss, _ = self.model(self.batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(loss.detach()))

    def timed(self) -> None:
        start, start_cpu = time.perf_counter(), time.process_time()
        self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.wall.append((time.perf_counter() - start) * 1000)
        self.cpu.append((time.process_time() - start_cpu) * 1000)


def bench(name: str, build, make_batch, batch_size: int, args, device: torch.device, clock: str) -> dict:
    torch._dynamo.reset()
    batch = make_batch(batch_size)
    runs = {}
    for label, compiled, impl in settings(device):
        runs[label] = s = Setting(build, batch, compiled, impl, args, device)
        start = time.perf_counter()
        for _ in range(args.warmup):
            s.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        s.warmup_s = time.perf_counter() - start
    for _ in range(args.reps):
        for s in runs.values():
            s.timed()
    out = {
        "params_M": round(sum(p.numel() for p in runs["eager_for-loop"].model.parameters()) / 1e6, 3),
        "batch": batch_size,
        "settings": {},
    }
    for label, s in runs.items():
        ms = statistics.median(getattr(s, clock))
        out["settings"][label] = {
            "ms_per_step": round(ms, 2),
            "steps_per_s": round(1000 / ms, 2),
            "wall_ms": round(statistics.median(s.wall), 2),
            "cpu_ms": round(statistics.median(s.cpu), 2),
            "warmup_s": round(s.warmup_s, 1),
            "loss_first": round(s.losses[0], 4),
            "loss_last": round(s.losses[-1], 4),
        }
    sps = {label: v["steps_per_s"] for label, v in out["settings"].items()}
    compiled = next(label for label in sps if label.startswith("compiled_"))
    auto = compiled.split("_", 1)[1]
    out["compiled_over_eager"] = round(sps[compiled] / sps[f"eager_{auto}"], 3)
    out["compile_s"] = out["settings"][compiled]["warmup_s"]
    for impl in IMPLS[1:]:
        out[f"{impl}_over_for_loop"] = round(sps[f"eager_{impl}"] / sps["eager_for-loop"], 3)
    return out


def main() -> None:
    names = list(configs())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", default="tiny-decoder,tiny-uwm", help="comma-separated subset of: " + ", ".join(names)
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, help="batch size for every configuration (default: 8; base: 32)")
    parser.add_argument("--reps", type=int, default=20, help="timed steps per setting")
    parser.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="untimed steps per setting first (compiles; the decoder recompiles the frame after its .item() metrics for several steps)",
    )
    parser.add_argument("--compile-mode", default="default", help="train.compile_mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="",
        help="what the ratios use (default: cpu with one thread on the CPU, else wall)",
    )
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    unknown = set(args.configs.split(",")) - set(names)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; known: {names}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    clock = args.clock or ("cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall")
    report = {
        "benchmark": "compile",
        "clock": clock,
        "reps": args.reps,
        "compile_mode": args.compile_mode,
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "precision": args.precision,
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else (platform.processor() or platform.machine()),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "results": {},
    }
    built = configs()
    for name in args.configs.split(","):
        build, make_batch, batch_size = built[name]
        report["results"][name] = bench(name, build, make_batch, args.batch or batch_size, args, device, clock)
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    emit(report, args.out, indent=1)


if __name__ == "__main__":
    main()
