"""`wm eval --policy RUN` for world-model runs: the world model in policy mode (``policy=uwm``).

``load_world_model_policy`` (the world model's policy face in ``wm_pipeline.recipes.MODELS``) accepts
``RUN`` or ``RUN/final`` of a ``wm train worldmodel`` run (``run_config.yaml``'s ``model_name`` is
``worldmodel``), or a ``save_pretrained`` folder whose ``config.json`` names ``WorldModel`` (``_class``; in
folders saved before that key: whose fields are a ``WorldModelConfig``'s); it
returns None for anything else, so the other loaders (the decoder's) get their turn. The embodiment
and state size are checked here, the action and image size by the harness, before any rollout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from wm_pipeline.jobs.closed_loop_eval import check_policy_fits
from wm_pipeline.run_folder import MODEL_CONFIG, model_folder
from wm_pipeline.weights import from_pretrained

log = logging.getLogger(__name__)

MODEL_NAME = "worldmodel"


def _is_legacy_world_model_config(folder: Path) -> bool:
    """A world-model folder saved before config.json named its class: its fields are a
    ``WorldModelConfig``'s, with the ones only a world model has."""
    from worldmodel.uwm import WorldModelConfig

    try:
        cfg = json.loads((folder / MODEL_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    own = {f.name for f in dataclasses.fields(WorldModelConfig)}
    return isinstance(cfg, dict) and {"variant", "n_future", "action_horizon", "embodiments"} <= set(cfg) <= own


def world_model_dir(spec: str) -> Path | None:
    """``RUN/final`` or a ``save_pretrained`` folder of a world model; None when ``spec`` is not one."""
    from worldmodel.uwm import WorldModel

    return model_folder(spec, MODEL_NAME, WorldModel, legacy=_is_legacy_world_model_config)


def load_world_model_policy(spec: str, info: dict[str, Any]):
    """A WorldModelPolicy for a world-model run, None for anything else.

    ``info`` is ``wm_pipeline.jobs.closed_loop_eval.env_info`` plus the command's policy options (``action_steps``,
    ``temporal_ensemble``, ``sampling_steps``)."""
    from decoders.world_model_policy import WorldModelPolicy
    from worldmodel.uwm import WorldModel

    folder = world_model_dir(spec)
    if folder is None:
        return None
    model = from_pretrained(WorldModel, folder, what="policy")
    cfg = model.config
    robots = sorted(n for n in cfg.embodiments if n != "latent")
    hint = "" if robots else " (it was never trained on actions: fine-tune it with `wm train worldmodel --init`)"
    spec_of = cfg.embodiments.get(info["embodiment"]) or {}
    check_policy_fits(spec, info, robots, int(spec_of.get("state_dim") or 0), cfg.action_horizon, hint)
    log.info("world model %s in policy mode (%s, horizon %d)", folder, info["embodiment"], cfg.action_horizon)
    return WorldModelPolicy(
        model,
        embodiment=info["embodiment"],
        n_action_steps=info.get("action_steps"),
        temporal_ensemble=info.get("temporal_ensemble"),
        n_steps=info.get("sampling_steps"),
    )
