"""Held-out action error of a trained decoder: how far its chunks are from a demo's real actions.

    metrics = held_out_action_error("runs/dec/final", "data/valdemos", every=4)
    metrics = held_out_action_error("runs/dec/final", "data/valdemos", tasks=["door-open-v3"])

Windows come from ``shards.stream.WindowStream`` in label mode (one ordered, exact pass: two calls see
the same windows), one at every ``every``-th frame of each episode with real actions. The decoder
predicts each window's chunk from its observation frames, state and task with its own sampler and a
seeded generator; the error is the mean squared error in the decoder's NORMALISED action units (so
every action dim counts alike), over every (window, chunk step, dim), and ``first_action_mse`` is the
same for the first action of the chunk (the one a receding-horizon policy executes first). ``tasks``
keeps the episodes of those tasks only (a policy trained on one task is scored on that task).

This is the learning-curve companion of closed-loop success (scripts/policy_grid.py): it costs a few
seconds where an evaluation in the simulator costs minutes, and it needs validation demos that were
used neither for training nor for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from wm_pipeline.exit_codes import UsageError
from wm_pipeline.weights import from_pretrained


@torch.no_grad()
def held_out_action_error(
    folder: str | Path,
    data_dir: str | Path,
    *,
    every: int = 4,
    batch_size: int = 32,
    seed: int = 0,
    backend: str = "auto",
    tasks: Sequence[str] = (),
) -> dict[str, float]:
    """Score the decoder saved in ``folder`` (``config.json`` + ``model.safetensors``) on ``data_dir``
    (on the episodes of ``tasks`` only, when given)."""
    from decoders.decoder import ActionDecoder
    from shards.stream import WindowStream, collate_windows

    folder, data_dir = Path(folder), Path(data_dir)
    if not data_dir.is_dir():
        raise UsageError(f"validation data folder {data_dir} does not exist")
    model = from_pretrained(ActionDecoder, folder, what="decoder").eval()
    cfg = model.config
    stream = WindowStream(
        str(data_dir),
        window=cfg.window_length,
        mode="label",
        label_every=every,
        resize=list(cfg.image_size),
        backend=backend,
    )
    generator = torch.Generator().manual_seed(seed)
    now = cfg.n_obs_steps - 1
    sq, first_sq, n, n_first = 0.0, 0.0, 0, 0

    def score(windows):
        nonlocal sq, first_sq, n, n_first
        batch = collate_windows(windows)
        emb = model._embodiment_index(batch["embodiment"], len(windows))
        state = batch["state"][:, now] if cfg.state_dim else None
        pred = model.predict_action_chunk(
            batch["frames"][:, : cfg.n_obs_steps],
            state,
            batch["task"],
            generator=generator,
            embodiment=batch["embodiment"],
        )
        true = batch["action"][:, now : now + cfg.horizon].float()
        err = (model.action_normalizer.normalize(pred, emb) - model.action_normalizer.normalize(true, emb)) ** 2
        sq += float(err.sum())
        n += err.numel()
        first_sq += float(err[:, 0].sum())
        n_first += err[:, 0].numel()

    pending = []
    for w in stream:
        if not w["action_mask"] or w["embodiment"] not in model.embodiments:
            continue
        if tasks and w["task"] not in tasks:
            continue
        pending.append(w)
        if len(pending) == batch_size:
            score(pending)
            pending = []
    if pending:
        score(pending)
    if not n:
        which = f" of tasks {list(tasks)}" if tasks else ""
        raise UsageError(f"{data_dir}: no windows with actions{which} of the decoder's robot {model.embodiments}")
    windows = n // (cfg.horizon * cfg.action_dim)
    return {"action_mse": sq / n, "first_action_mse": first_sq / n_first, "windows": windows}
