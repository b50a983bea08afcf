"""How much can inverse dynamics gain over a policy on a dataset? An estimate from the robot's state.

The world model's inverse-dynamics mode sees the current frames and the future frames; its policy mode
(and the no-future control) the current frames only. Where the behaviour is a deterministic function of
the scene (a scripted expert), the future adds little to what the current state already fixes. This
script measures that on the state, where nothing has to be read from pixels: an MLP predicts the
H-step action chunk from the current state (n_obs steps), and a second one from the same plus the hand's
displacement at the future frames' steps (what the future frames show). Trained on ``--train`` (one
or more folders; every 10th episode is kept aside to pick the training step, so the MLP does not
overfit), scored on ``--test`` (R² pooled over the action dims, as `wm worldmodel eval` reports it).

    python scripts/action_information.py --train DATA/demos [--train MORE] --test DATA/heldout [--horizon 16 --gap 8]

Prints one JSON document. Meta-World's state starts with the hand position (x, y, z).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shards.format import shard_paths  # noqa: E402


def episodes(root: str) -> list[dict[str, np.ndarray]]:
    """Every episode with actions: {"action": [T, A], "state": [T, S]}."""
    found: dict[str, dict[str, np.ndarray]] = {}
    for path in shard_paths(root):
        with tarfile.open(path) as tar:
            for m in tar:
                key, _, kind = m.name.partition(".")
                if kind in ("action.npy", "state.npy"):
                    found.setdefault(key, {})[kind[:-4]] = np.load(io.BytesIO(tar.extractfile(m).read()))
    return [e for e in found.values() if "action" in e and "state" in e]


def windows(eps, n_obs: int, horizon: int, gap: int, n_future: int):
    """(current state [N, n_obs*S], future hand displacement [N, 3*n_future], action chunk [N, H*A])."""
    cur, fut, act = [], [], []
    for e in eps:
        s, a = e["state"], e["action"]
        for t0 in range(n_obs - 1, len(a) - max(horizon, gap * n_future)):
            cur.append(s[t0 - n_obs + 1 : t0 + 1].reshape(-1))
            fut.append(np.concatenate([s[t0 + gap * (j + 1), :3] - s[t0, :3] for j in range(n_future)]))
            act.append(a[t0 : t0 + horizon].reshape(-1))
    return np.asarray(cur), np.asarray(fut), np.asarray(act)


def r2(true: np.ndarray, pred: np.ndarray, dims: int) -> tuple[float, list[float]]:
    y, p = true.reshape(-1, dims), pred.reshape(-1, dims)
    res, tot = ((y - p) ** 2).sum(0), ((y - y.mean(0)) ** 2).sum(0)
    return float(1 - res.sum() / tot.sum()), [round(float(v), 3) for v in 1 - res / tot]


def fit_predict(x_train, y_train, x_val, y_val, x_test, steps: int, seed: int) -> tuple[np.ndarray, int]:
    """A two-layer GELU MLP on standardised inputs, MSE, AdamW, batch 128; the weights of the step (every
    100) with the lowest validation error predict ``x_test``. Returns (prediction, that step)."""
    torch.manual_seed(seed)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x = torch.tensor((x_train - mu) / sd, dtype=torch.float32)
    y = torch.tensor(y_train, dtype=torch.float32)
    xv, yv = torch.tensor((x_val - mu) / sd, dtype=torch.float32), torch.tensor(y_val, dtype=torch.float32)
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 256),
        torch.nn.GELU(),
        torch.nn.Linear(256, 256),
        torch.nn.GELU(),
        torch.nn.Linear(256, y.shape[1]),
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    best = (float("inf"), 0, None)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = ((net(x[idx]) - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                val = float(((net(xv) - yv) ** 2).mean())
            if val < best[0]:
                best = (val, step, {k: v.clone() for k, v in net.state_dict().items()})
    net.load_state_dict(best[2])
    with torch.no_grad():
        return net(torch.tensor((x_test - mu) / sd, dtype=torch.float32)).numpy(), best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, action="append", help="shard folder with actions and states")
    parser.add_argument("--test", required=True, help="held-out shard folder")
    parser.add_argument("--n-obs", type=int, default=2)
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--gap", type=int, default=8, help="steps between future frames (the world model's frame_gap)")
    parser.add_argument("--n-future", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = (args.n_obs, args.horizon, args.gap, args.n_future)
    train_eps = [e for root in args.train for e in episodes(root)]
    tr, va = windows([e for i, e in enumerate(train_eps) if i % 10], *shape), windows(train_eps[::10], *shape)
    te = windows(episodes(args.test), *shape)
    if not len(tr[2]) or not len(va[2]) or not len(te[2]):
        parser.error("no windows with actions and states in --train / --test (--train needs 2+ episodes)")
    dims = tr[2].shape[1] // args.horizon
    report = {
        "train_windows": len(tr[2]),
        "validation_windows": len(va[2]),
        "test_windows": len(te[2]),
        "action_dims": dims,
    }
    for name, cols in (("current_state", lambda w: w[0]), ("current_state+future_hand", lambda w: np.hstack(w[:2]))):
        pred, step = fit_predict(cols(tr), tr[2], cols(va), va[2], cols(te), args.steps, args.seed)
        total, per_dim = r2(te[2], pred, dims)
        report[name] = {"r2": round(total, 3), "r2_per_dim": per_dim, "best_step": step}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
