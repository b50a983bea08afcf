"""LAM ablations in one process: train a latent-action model on decoded episodes held in memory, then
score its latents with the same linear probe as `wm probe`.

    python scripts/lam_ablation.py --train data/video --held data/heldout --steps 1000 \
        --set frame_gap=4 --set bottleneck=continuous

Faster than `wm train lam` + `wm label` + `wm probe` for comparing settings (no streaming, no
checkpoints); the model code is the library's. Windows of ``frame_gap + 2`` frames (two transitions),
batch 16, AdamW 5e-4, no warm-up. Prints one JSON line: the settings, the probe R² per action dim
(latent -> mean true action over the gap, folds by episode) beside Gaussian random latents, the
decoder's next-frame error over copying frame t on the held-out clips, and with latents swapped
between clips (``shuffled_over_own`` ~1: the latent is not used). docs/RESULTS.md has the runs.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from tqdm import tqdm

from latent_actions.lam import PRESETS, LatentActionModel
from shards.stream import iter_samples
from wm_pipeline.jobs.probe import linear_probe, mean_r2
from wm_pipeline.training.config import apply_overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, help="dataset of training video (actions, if any, unused)")
    ap.add_argument("--held", required=True, help="held-out dataset with actions (the probe's targets)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="LAMConfig override")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = apply_overrides(PRESETS[args.preset], args.set, "--set")
    torch.manual_seed(args.seed)
    model = LatentActionModel(cfg)
    size = (cfg.image_size, cfg.image_size)
    train = [s.frames for s in iter_samples(args.train, resize=size, split=False)]
    held = [(s.frames, s.action) for s in iter_samples(args.held, resize=size, split=False)]
    k, window = cfg.frame_gap, cfg.frame_gap + 2
    train = [f for f in train if len(f) >= window]

    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    bar = tqdm(range(args.steps), desc="lam ablation", unit="step")
    for _ in bar:
        clips = []
        for _ in range(args.batch_size):
            f = train[rng.integers(len(train))]
            s = int(rng.integers(0, len(f) - window + 1))
            clips.append(f[s : s + window])
        loss, metrics = model({"frames": torch.stack(clips)})
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(
            recon_over_copy=f"{metrics['recon_over_copy']:.3f}",
            perplexity=f"{metrics.get('perplexity', float('nan')):.2f}",
        )
    minutes = (time.perf_counter() - started) / 60

    x, y, groups, own, copy, shuffled = [], [], [], [], [], []
    for i, (frames, action) in enumerate(held):
        latent = model.encode_latent_actions(frames[None])["latent"][0].numpy()
        x.append(latent)
        y.append(np.stack([action[t : t + k].mean(0) for t in range(len(latent))]))
        groups.append(np.full(len(latent), i))
        other = held[(i + 1) % len(held)][0]
        n = min(len(frames), len(other), 40)
        if n > k:
            usage = model.probe_latent_usage(torch.stack([frames[:n], other[:n]]))
            own.append(usage["own"]), copy.append(usage["copy"]), shuffled.append(usage["shuffled"])
    x, y, groups = np.concatenate(x), np.concatenate(y), np.concatenate(groups)
    r2 = linear_probe(x, y, groups)
    r2_random = linear_probe(np.random.default_rng(0).normal(size=x.shape), y, groups)
    print(
        json.dumps(
            {
                "settings": args.set,
                "preset": args.preset,
                "steps": args.steps,
                "train_minutes": round(minutes, 2),
                "probe_r2": r2,
                "probe_r2_mean": mean_r2(r2),
                "random_latent_r2_mean": mean_r2(r2_random),
                "own_over_copy": float(np.mean(own) / np.mean(copy)),
                "shuffled_over_own": float(np.mean(shuffled) / np.mean(own)),
            }
        )
    )


if __name__ == "__main__":
    main()
