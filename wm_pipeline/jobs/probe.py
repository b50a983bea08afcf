"""`wm probe`: how good are a labeller's labels, measured against ground truth it never trained on.

The labeller (wm_pipeline/jobs/labelling.py) labels held-out episodes that carry real actions, in memory
(no sidecars), and the labels are scored:

- LAM: a linear probe (ridge regression, cross-validated by episode) from the latent of row t to the
  mean true action over the transition's steps ``t .. t + gap - 1`` (``gap = frame_gap * stride``):
  R² per action dim. Two controls go through the same probe: Gaussian random latents of the same
  shape, and the latents of an untrained LAM of the same architecture (random features of the same
  frame pair). VQ code usage over the data: perplexity of the pooled codes, codes used, dead codes,
  distinct code tuples. The decoder's next-frame error (pixel MSE in [0, 1]) beside copying frame t,
  and with the latents shuffled between transitions (is the latent used?). A PNG shows frame t /
  predicted t + gap / true t + gap for the transitions with the most motion.
- IDM: pseudo-actions against the true actions: R² and MSE per action dim (raw units), the MSE per
  task as well, and a PNG of both over time for a few episodes.

``probe(run, data_dir, out_dir)`` returns the result dict and writes ``probe.json`` and ``probe.png``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.batch_keys import PSEUDO_ACTION
from wm_pipeline.exit_codes import UsageError
from wm_pipeline.jobs.labelling import VALID, check_fits, label_episodes, load_labeller

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- statistics


def r2_per_dim(pred: np.ndarray, true: np.ndarray) -> list[float | None]:
    """R² of each column ([N, A]); None for a constant column (R² undefined)."""
    sst = ((true - true.mean(0)) ** 2).sum(0)
    sse = ((pred - true) ** 2).sum(0)
    return [None if s <= 1e-12 else float(1 - e / s) for e, s in zip(sse, sst)]


def mean_r2(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def linear_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5, ridge: float = 1.0) -> list:
    """Out-of-fold ridge predictions of ``y`` [N, A] from ``x`` [N, D], folds by ``groups`` (episodes);
    returns R² per dim. Features are standardised on each training fold."""
    ids = np.unique(groups)
    folds = max(2, min(folds, len(ids)))
    assign = {g: i % folds for i, g in enumerate(np.random.default_rng(0).permutation(ids))}
    fold = np.array([assign[g] for g in groups])
    pred = np.zeros_like(y, dtype=np.float64)
    for f in range(folds):
        tr, te = fold != f, fold == f
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        a = np.hstack([(x[tr] - mu) / sd, np.ones((tr.sum(), 1))])
        b = np.hstack([(x[te] - mu) / sd, np.ones((te.sum(), 1))])
        reg = ridge * np.eye(a.shape[1])
        reg[-1, -1] = 0.0  # the intercept is not shrunk
        w = np.linalg.solve(a.T @ a + reg, a.T @ y[tr])
        pred[te] = b @ w
    return r2_per_dim(pred, y.astype(np.float64))


def code_usage(codes: np.ndarray, num_codes: int) -> dict[str, Any]:
    """codes int [N, n_tokens] of one shared codebook -> perplexity, used / dead codes, distinct tuples."""
    counts = np.bincount(codes.ravel(), minlength=num_codes).astype(np.float64)
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    return {
        "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
        "num_codes": num_codes,
        "codes_used": int((counts > 0).sum()),
        "dead_codes": int((counts == 0).sum()),
        "distinct_tuples": int(len({tuple(c) for c in codes.tolist()})),
        "n_tokens": int(codes.shape[1]),
    }


# ---------------------------------------------------------------- the probe


def _held_out(lab, data_dir) -> bool:
    from shards.location import identity

    trained = [identity(p) for p in (lab.run_config.get("data") or {}).get("paths") or []]
    return identity(data_dir) not in trained


def probe(
    run: str,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    max_episodes: int | None = None,
    folds: int = 5,
    backend: str = "auto",
) -> dict[str, Any]:
    from shards.dataset_info import FolderInfo
    from shards.location import locate, missing_folder
    from shards.stream import iter_samples

    data_dir = locate(data_dir)  # a folder or a URL (shards.location)
    if missing_folder(data_dir):
        raise UsageError(f"data folder {data_dir} does not exist")
    spec, lab = load_labeller(run)
    camera = check_fits(lab, data_dir, FolderInfo.read(data_dir), run)
    samples = []
    for s in iter_samples(
        data_dir,
        camera=camera,
        resize=tuple(lab.image_size) if lab.resize else None,
        backend=backend,
        errors="record",
        split=False,
    ):
        if s.error is None and s.action is not None:
            samples.append(s)
        if max_episodes and len(samples) >= max_episodes:
            break
    if not samples:
        raise UsageError(f"{data_dir}: no decodable episodes with actions to probe against")
    held_out = _held_out(lab, data_dir)
    if not held_out:
        log.warning("%s is part of the labeller's training data: these numbers are not held out", data_dir)
    with torch.inference_mode():
        rows = label_episodes(spec, lab, [(s.frames, s.meta.embodiment) for s in samples], batch_size)
        result: dict[str, Any] = {
            "kind": lab.kind,
            "labeller": str(run),
            "data": str(data_dir),
            "held_out": held_out,
            "episodes": len(samples),
        }
        if lab.kind == "lam":
            result.update(_probe_lam(lab, samples, rows, folds, batch_size))
        elif lab.kind == "idm":
            result.update(_probe_idm(samples, rows))
        else:
            raise UsageError(f"wm probe knows lam and idm labellers, not '{lab.kind}'")
    out = Path(out_dir) if out_dir else Path(run) / "probe" / (data_dir.name or "data")
    out.mkdir(parents=True, exist_ok=True)
    if lab.kind == "lam":
        _plot_lam(lab, samples, rows, out / "probe.png")
    else:
        _plot_idm(samples, rows, out / "probe.png")
    result["png"] = str(out / "probe.png")
    (out / "probe.json").write_text(json.dumps(result, indent=2))
    result["json"] = str(out / "probe.json")
    return result


def _transitions(lab, samples, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(episode index, row t) of every valid row, and the mean true action over its steps [N, A]."""
    gap = lab.tail * lab.stride
    ep, t, y = [], [], []
    for e, (s, r) in enumerate(zip(samples, rows)):
        for row in np.flatnonzero(r[VALID]):
            ep.append(e)
            t.append(row)
            y.append(s.action[row : row + gap].mean(0))
    return np.array(ep), np.array(t), np.array(y, np.float64), np.concatenate([r["latent"][r[VALID]] for r in rows])


def _probe_lam(lab, samples, rows, folds: int, batch_size: int) -> dict[str, Any]:
    from latent_actions.lam import LatentActionModel

    ep, t, y, x = _transitions(lab, samples, rows)
    if len(ep) == 0:
        raise UsageError("no transitions to probe: every episode is shorter than the LAM's frame gap")
    r2 = linear_probe(x.astype(np.float64), y, ep, folds)
    noise = np.random.default_rng(0).standard_normal(x.shape)
    r2_noise = linear_probe(noise, y, ep, folds)
    torch.manual_seed(0)
    untrained = LatentActionModel(lab.model.config).eval()
    fresh = label_episodes(_LamOnly(untrained), lab, [(s.frames, s.meta.embodiment) for s in samples], batch_size)
    r2_untrained = linear_probe(np.concatenate([r["latent"][r[VALID]] for r in fresh]).astype(np.float64), y, ep, folds)
    out: dict[str, Any] = {
        "transitions": int(len(ep)),
        "frame_gap": lab.tail * lab.stride,
        "probe_r2": {"latent": r2, "random_latent": r2_noise, "untrained_lam": r2_untrained},
        "probe_r2_mean": {
            "latent": mean_r2(r2),
            "random_latent": mean_r2(r2_noise),
            "untrained_lam": mean_r2(r2_untrained),
        },
    }
    if "codes" in rows[0]:
        out["codes"] = code_usage(np.concatenate([r["codes"][r[VALID]] for r in rows]), lab.model.config.num_codes)
    out["next_frame"] = _next_frame_errors(lab, samples, rows, ep, t, batch_size)
    return out


class _LamOnly:
    """The ``label`` of the 'lam' kind for a model other than the loaded one (the untrained control)."""

    def __init__(self, model):
        self.model = model

    def label(self, lab, frames, embodiments):
        out = self.model.encode_latent_actions(frames)
        return {"latent": out["latent"], **({"codes": out["codes"]} if out["codes"] is not None else {})}


def _next_frame_errors(lab, samples, rows, ep, t, batch_size: int) -> dict[str, float]:
    """Pixel MSE (in [0, 1]) of the decoder's t + gap prediction with its own / shuffled latents vs copying t."""
    gap = lab.tail * lab.stride
    perm = np.random.default_rng(0).permutation(len(ep))
    latents = np.concatenate([r["latent"][r[VALID]] for r in rows])
    sums = {"lam": 0.0, "copy": 0.0, "shuffled_latent": 0.0}
    step = max(64, batch_size * 8)
    for b in range(0, len(ep), step):
        sl = slice(b, b + step)
        x_t = torch.stack([samples[e].frames[i] for e, i in zip(ep[sl], t[sl])])
        x_next = torch.stack([samples[e].frames[i + gap] for e, i in zip(ep[sl], t[sl])]).float() / 255
        for name, lat in (("lam", latents[sl]), ("shuffled_latent", latents[perm[sl]])):
            pred = lab.model.predict_next_frame(x_t, torch.from_numpy(lat)).float() / 255
            sums[name] += float(((pred - x_next) ** 2).mean((1, 2, 3)).sum())
        sums["copy"] += float(((x_t.float() / 255 - x_next) ** 2).mean((1, 2, 3)).sum())
    mse = {f"mse_{k}": v / len(ep) for k, v in sums.items()}
    mse["lam_over_copy"] = mse["mse_lam"] / max(mse["mse_copy"], 1e-12)
    mse["shuffled_over_lam"] = mse["mse_shuffled_latent"] / max(mse["mse_lam"], 1e-12)
    return mse


def _probe_idm(samples, rows) -> dict[str, Any]:
    true = np.concatenate([s.action[r[VALID]] for s, r in zip(samples, rows)]).astype(np.float64)
    pred = np.concatenate([r[PSEUDO_ACTION][r[VALID]] for r in rows]).astype(np.float64)
    r2 = r2_per_dim(pred, true)

    def mse(sel=slice(None)) -> dict[str, Any]:
        per_dim = ((pred[sel] - true[sel]) ** 2).mean(0).tolist()
        return {"idm_mse": per_dim, "idm_mse_mean": float(np.mean(per_dim))}

    # per task (the episode's task; "" where the data names none): a mean R² can hide the task it fails
    tasks = np.concatenate([np.full(int(r[VALID].sum()), s.meta.task or "") for s, r in zip(samples, rows)])
    per_task = {t: {"steps": int((tasks == t).sum()), **mse(tasks == t)} for t in sorted(set(tasks.tolist()))}
    return {
        "steps": int(len(true)),
        "idm_r2": r2,
        "idm_r2_mean": mean_r2(r2),
        **mse(),
        "action_std": true.std(0).tolist(),
        "per_task": per_task,
    }


# ---------------------------------------------------------------- pictures and the table


def _plot_lam(lab, samples, rows, path: Path, n: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gap = lab.tail * lab.stride
    ep, t, _, latents = _transitions(lab, samples, rows)
    motion = np.array(
        [float((samples[e].frames[i].float() - samples[e].frames[i + gap].float()).abs().mean()) for e, i in zip(ep, t)]
    )
    pick = np.argsort(-motion)[:n]
    fig, axes = plt.subplots(len(pick), 3, figsize=(6, 2 * len(pick)), squeeze=False)
    for row, j in enumerate(pick):
        e, i = ep[j], t[j]
        pred = lab.model.predict_next_frame(samples[e].frames[i][None], torch.from_numpy(latents[j : j + 1]))[0]
        for col, (img, title) in enumerate(
            (
                (samples[e].frames[i], "frame t"),
                (pred, f"predicted t+{gap}"),
                (samples[e].frames[i + gap], f"true t+{gap}"),
            )
        ):
            axes[row, col].imshow(img.permute(1, 2, 0).numpy())
            axes[row, col].set_axis_off()
            axes[row, col].set_title(f"{title}" + (f"\n{samples[e].key}@{i}" if col == 0 else ""), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_idm(samples, rows, path: Path, n: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = samples[0].action.shape[1]
    fig, axes = plt.subplots(min(n, len(samples)), dims, figsize=(3 * dims, 2 * min(n, len(samples))), squeeze=False)
    for e in range(min(n, len(samples))):
        for d in range(dims):
            ax = axes[e, d]
            ax.plot(samples[e].action[:, d], label="true", lw=1)
            ax.plot(np.where(rows[e][VALID], rows[e][PSEUDO_ACTION][:, d], np.nan), label="IDM", lw=1)
            ax.set_title(f"{samples[e].key} dim {d}", fontsize=7)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['kind']} labeller {result['labeller']} on {result['data']} "
        f"({result['episodes']} episodes{'' if result['held_out'] else ', NOT held out'})"
    ]
    if result["kind"] == "lam":
        pr, m = result["probe_r2"], result["probe_r2_mean"]
        lines.append(
            f"{'linear probe R2 (latent -> mean action over gap ' + str(result['frame_gap']) + ')':<58}"
            f"{'mean':>7}  per dim"
        )
        for name in ("latent", "untrained_lam", "random_latent"):
            lines.append(f"  {name:<56}{_fmt(m[name]):>7}  {' '.join(_fmt(v) for v in pr[name])}")
        nf = result["next_frame"]
        lines.append(
            f"next-frame MSE (pixels in [0,1]): LAM {nf['mse_lam']:.5f} | copy frame t {nf['mse_copy']:.5f} | "
            f"shuffled latents {nf['mse_shuffled_latent']:.5f} | LAM/copy {nf['lam_over_copy']:.3f}"
        )
        if "codes" in result:
            c = result["codes"]
            lines.append(
                f"VQ codes: perplexity {c['perplexity']:.2f} of {c['num_codes']} | used {c['codes_used']} | "
                f"dead {c['dead_codes']} | distinct tuples of {c['n_tokens']} tokens {c['distinct_tuples']}"
            )
    else:
        lines.append(f"{'IDM pseudo-actions vs true':<30}{'mean':>8}  per dim")
        lines.append(f"  {'R2':<28}{_fmt(result['idm_r2_mean']):>8}  {' '.join(_fmt(v) for v in result['idm_r2'])}")
        # the total, then each named task (data without task names has one row: the total)
        rows = [("MSE (raw units)", result)] + [(f"MSE {t}", r) for t, r in result.get("per_task", {}).items() if t]
        for label, row in rows:
            lines.append(f"  {label:<28}{row['idm_mse_mean']:>8.4f}  {' '.join(f'{v:.4f}' for v in row['idm_mse'])}")
    return "\n".join(lines)
