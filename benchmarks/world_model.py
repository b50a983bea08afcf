"""World-model speed: training step time and sampling latency of every mode, random weights, CPU or CUDA.

Configurations: the ``tiny`` and ``small`` presets (both variants), and ``uwm-reference``: the setting of
the UWM reference measurement in docs/ANCHORS (2 views -> treated as 2x frames, 64 px, 2 + 2 frames,
chunk 16 x 7, depth 4, width 256, 4 heads, 8 registers, batch 8, VAE latents precomputed, policy
sampling at batch 1 with 10 steps). Reference on these machines: 318 ms per step, 113 ms per policy.

    python benchmarks/world_model.py [--out results.json] [--threads N] [--configs tiny-uwm,...]
    python benchmarks/world_model.py --device cuda --precision bf16 --configs small-uwm,base-uwm,base-dust

Prints one JSON document (also written to ``--out``): per configuration the parameter count, tokens
per sample, median train step (forward + backward + AdamW), training tokens per second, the model
FLOPs of one train step (counted by ``torch.utils.flop_counter``: matmuls, convolutions, attention)
and, on CUDA, the model FLOPs utilisation against ``--peak-tflops`` (default: the H100 / H200 dense
bf16 figure, 989), plus the median latency of each sampling mode at batch 1. ``--precision bf16`` runs
under ``torch.autocast`` as the training runtime does on CUDA. The ``base-*`` configurations (146 M /
273 M parameters) are for a GPU; they are not in the default CPU set. ``--compile [MODE]`` times the
train step with the model compiled as ``train.compile`` does it (FLOPs still counted eagerly), and
``--optim-impl`` picks AdamW's kernel as ``optim.impl`` does (default: torch's own choice, as before);
benchmarks/compile.py sets eager and compiled side by side in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time

from json_report import emit  # before the path filter below: a sibling module

# run as a script, this file's folder comes first on sys.path and its name would shadow the package
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import contextlib  # noqa: E402

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nets import attention as attention_module  # noqa: E402
from wm_pipeline.training.config import TrainConfig  # noqa: E402
from wm_pipeline.training.trainer import compile_model, optimizer_impl  # noqa: E402
from worldmodel.uwm import PRESETS, WorldModel, WorldModelConfig, embodiment_spec  # noqa: E402

ACTION_DIM = 7
EMB = {"robot": embodiment_spec(action_dim=ACTION_DIM)}


GPU_ONLY = ("base-uwm", "base-dust")


def configs() -> dict[str, tuple[WorldModelConfig, int]]:
    """name -> (config, train batch size)."""
    out = {}
    for preset in ("tiny", "small", "base"):
        for variant in ("uwm", "dust"):
            steps = dict(action_steps=10, video_steps=20 if variant == "dust" else 10)
            batch = 32 if preset == "base" else 8
            out[f"{preset}-{variant}"] = (
                dataclasses.replace(PRESETS[preset], variant=variant, embodiments=EMB, **steps),
                batch,
            )
    # UWM reference: SDXL-VAE latents of 64 px frames are 4 x 8 x 8; 2 views x 2 frames -> 4 current and 4 future
    # frames (patch 4: 4 tokens per frame; the reference's Conv3d (2, 4, 4) gives 4 per view and frame pair)
    ref = WorldModelConfig(
        image_size=64,
        n_obs=4,
        n_future=4,
        action_horizon=16,
        frame_gap=4,
        width=256,
        depth=4,
        heads=4,
        registers=8,
        frame_space="vae",
        vae_latent_channels=4,
        vae_downsample=8,
        patch_size=4,
        embodiments=EMB,
        action_steps=10,
        video_steps=10,
    )
    out["uwm-reference"] = (ref, 8)
    out["uwm-reference-dust"] = (dataclasses.replace(ref, variant="dust", video_steps=20), 8)
    return out


def make_batch(cfg: WorldModelConfig, b: int) -> dict:
    s, t = cfg.image_size, cfg.window
    batch = {
        "frames": torch.randint(0, 256, (b, t, 3, s, s), dtype=torch.uint8),
        "action": torch.randn(b, t, ACTION_DIM),
        "action_mask": torch.ones(b, dtype=torch.bool),
        "embodiment": ["robot"] * b,
        "task": [""] * b,
    }
    if cfg.frame_space == "vae":
        h = s // cfg.vae_downsample
        batch[cfg.vae_latent_key] = torch.randn(b, t, cfg.vae_latent_channels, h, h)
    return batch


def median_ms(fn, repeats: int, warmup: int = 1, device: torch.device | None = None) -> float:
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2)


def bench(
    cfg: WorldModelConfig,
    batch_size: int,
    repeats: int,
    device: torch.device,
    precision: str,
    peak_tflops: float,
    optim_impl: str = "torch",
    compile_mode: str | None = None,
) -> dict:
    torch.manual_seed(0)
    model = WorldModel(cfg).to(device)
    kernel = {} if optim_impl == "torch" else optimizer_impl(optim_impl, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **kernel)
    batch = make_batch(cfg, batch_size)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step():
        with amp():
            loss, _ = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    counter = FlopCounterMode(display=False)  # counted eagerly: the compiled step does the same maths
    with counter:
        loss = step()
    flops = counter.get_total_flops()
    if compile_mode is not None:  # as the runtime does it (train.compile): the model's forward + loss
        compile_model(model, TrainConfig(compile=True, compile_mode=compile_mode))
    step_ms = median_ms(step, repeats, warmup=2 if compile_mode is None else 10, device=device)
    tokens = batch_size * model.num_tokens
    result = {
        "variant": cfg.variant,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "tokens_per_sample": model.num_tokens,
        "window": cfg.window,
        "batch": batch_size,
        "train_step_ms": step_ms,
        "train_tokens_per_s": round(tokens / (step_ms / 1000)),
        "train_samples_per_s": round(batch_size / (step_ms / 1000), 1),
        "train_step_gflops": round(flops / 1e9, 2),
        "loss_finite": bool(torch.isfinite(loss).item()),
        "optim_impl": optim_impl,
        "compile_mode": compile_mode,
    }
    if device.type == "cuda":
        result["mfu"] = round(flops / (step_ms / 1000) / (peak_tflops * 1e12), 4)
        result["max_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    model.eval()
    one = make_batch(cfg, 1)
    obs, nxt = one["frames"][:, : cfg.n_obs], one["frames"][:, cfg.future_indices()]
    if cfg.frame_space == "vae":  # no VAE loaded: inverse dynamics takes latents; use the pixel stem's cost
        nxt = None
    actions = torch.randn(1, cfg.action_horizon, ACTION_DIM)
    modes = {
        "policy": lambda: model.sample_policy(obs, "robot", steps=cfg.action_steps),
        "forward_dynamics": lambda: model.sample_forward_dynamics(obs, actions, "robot", steps=cfg.video_steps),
        "video": lambda: model.sample_video(obs, steps=cfg.video_steps),
        "joint": lambda: model.sample_joint(obs, "robot"),
    }
    if nxt is not None:
        modes["inverse_dynamics"] = lambda: model.sample_inverse_dynamics(obs, nxt, "robot", steps=cfg.action_steps)
    with amp():
        result["sample_ms_batch1"] = {name: median_ms(fn, repeats, device=device) for name, fn in modes.items()}
    result["steps"] = {"action": cfg.action_steps, "video": cfg.video_steps}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", help="comma-separated subset of: " + ", ".join(configs()))
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, help="train batch size for every configuration (default: 8; base: 32)")
    parser.add_argument(
        "--sdpa",
        default="auto",
        choices=["auto", "flash", "efficient", "cudnn", "math"],
        help="pin torch's scaled_dot_product_attention to one backend (default: torch picks)",
    )
    parser.add_argument(
        "--optim-impl",
        default="torch",
        choices=["torch", "auto", "fused", "foreach", "for-loop"],
        help="AdamW kernel (optim.impl; torch: torch's own default, as before)",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        metavar="MODE",
        help="compile the train step's model as train.compile does (MODE: train.compile_mode)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="the accelerator's dense peak for --precision, for MFU (H100/H200 bf16: 989)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    chosen = {k: v for k, v in configs().items() if device.type == "cuda" or k not in GPU_ONLY}
    if args.configs:
        unknown = set(args.configs.split(",")) - set(configs())
        if unknown:
            parser.error(f"unknown configs {sorted(unknown)}; known: {sorted(configs())}")
        chosen = {k: v for k, v in configs().items() if k in args.configs.split(",")}
    report = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else (platform.processor() or platform.machine()),
            "precision": args.precision,
        },
        "reference_uwm_ms": {"train_step_precomputed_latents": 318, "policy_10_steps_batch1": 113},
        "results": {},
    }
    report["machine"]["sdpa"] = args.sdpa
    report["machine"]["flash_attn_installed"] = attention_module._flash_attn_func is not None
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    pinned = sdpa_kernel(backends[args.sdpa]) if args.sdpa != "auto" else contextlib.nullcontext()
    with pinned:
        for name, (cfg, batch_size) in (bar := tqdm(chosen.items(), desc="worldmodel bench")):
            bar.set_postfix_str(name)
            report["results"][name] = bench(
                cfg,
                args.batch or batch_size,
                args.repeats,
                device,
                args.precision,
                args.peak_tflops,
                args.optim_impl,
                args.compile,
            )
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    emit(report, args.out, indent=2)


if __name__ == "__main__":
    main()
