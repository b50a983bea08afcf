"""`wm train decoder` and `wm eval --policy RUN` for chunked flow-matching action decoders.

Training (few-shot fine-tuning on demos)::

    wm train decoder --data DEMOS --out RUN [--preset tiny|small|base] [--episodes-per-task K]
                     [policy=scratch] [model.objective=fm|meanflow]

``prepare`` fills the data-dependent fields of ``DecoderConfig`` from the manifests (action / state
dims, image size, task vocabulary, normalisation stats) and sets ``data.window`` to the decoder's
``n_obs_steps - 1 + horizon``. ``--episodes-per-task K`` keeps the first K successful episodes with
actions of each task, in (data dir, shard, key) order, so the subset is deterministic and K=5 is a
prefix of K=10; episodes whose ``success`` is unknown (None) count as demos, failed ones do not.
Action-free samples are not demos and pass through unfiltered.

Policies (``policy=``): ``scratch`` (default) is the image encoder + decoder trained only on the
demos. ``idm-bc`` also trains on action-free video pseudo-labelled by an IDM (``wm label --labeller
RUN_IDM --data VIDEO``: sidecar ``labels/idm``, field ``pseudo_action`` [n, A] raw units; another
sidecar name with ``--labels NAME``, e.g. one IDM per K: ``wm label ... --name idm-k2``): the demos
need no sidecar (the stream's ``optional_labels``), and ``idm_targets`` turns each action-free window
whose pseudo-labels are all valid into a sample of the robot's embodiment with the pseudo-actions as
its target. ``latent`` (ViPRA-style) needs ``--init RUN_WM``, a world model pretrained with LAM latent
actions (``wm train worldmodel --labels lam``), and the same LAM's sidecar on the demos (``wm label
--labeller RUN_LAM --data DEMOS``): the decoder learns robot actions from frames + state + the LAM's
latent chunk of the demo (teacher latents), and in closed loop the world model in policy mode
predicts that chunk from the current frames (``decoders.world_model_policy.WorldModelLatentSource``;
the world-model folder is recorded as ``model.latent_model``). ``uwm`` is the world model itself
(wm_pipeline/recipes/worldmodel_policy.py) and is refused here with a message saying how to train it.

Evaluation: ``load_decoder_policy`` (the decoder's policy face in ``wm_pipeline.recipes.MODELS``)
turns ``RUN`` (or ``RUN/final``) into a ``decoders.policy.DecoderPolicy``; the embodiment and state
size are checked here, the action size and image size by the harness, all before any rollout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from decoders.decoder import ActionDecoder, DecoderConfig
from shards.batch_keys import ACTION, ACTION_MASK, EMBODIMENT, PRESENT, PSEUDO_ACTION, VALID, label_key
from shards.dataset_info import DatasetInfo
from shards.stats import file_sha256
from wm_pipeline.exit_codes import UsageError
from wm_pipeline.jobs.closed_loop_eval import check_policy_fits
from wm_pipeline.run_folder import MODEL_CONFIG, WEIGHTS, model_folder
from wm_pipeline.training.few_shot import few_shot_keys
from wm_pipeline.training.registry import ModelDataMismatch, default_stream
from wm_pipeline.weights import from_pretrained, read_json

log = logging.getLogger(__name__)

POLICIES = ("scratch", "latent", "uwm", "idm-bc")
NOT_READY = {
    "uwm": "is the world model fine-tuned on actions: train it with `wm train worldmodel --init RUN`",
}
IDM_LABELS = "idm"  # the sidecar idm-bc reads: labels/idm, fields pseudo_action [n, A] and valid [n]


# ---------------------------------------------------------------- registration


def prepare(cfg, info: DatasetInfo):
    """The run config with ``model`` (a DecoderConfig) filled from the data (a new config; ``cfg`` is not
    changed); ModelDataMismatch when they disagree."""
    policy = cfg.recipe or "scratch"
    if policy not in POLICIES:
        raise UsageError(f"unknown policy '{policy}' for the decoder; choose from {', '.join(POLICIES)}")
    if policy in NOT_READY:
        raise UsageError(f"policy={policy} {NOT_READY[policy]}")
    m, paths = cfg.model, list(cfg.data.paths)
    robots = info.robots()  # embodiment -> its dims and stats, from the first data dir that has it
    if not robots:
        raise ModelDataMismatch(f"no episodes with actions in {paths}: the decoder learns from demos")
    dims = {(e.action_dim, e.state_dim) for e in robots.values()}
    if len(dims) > 1:
        listed = ", ".join(f"{n} (action {e.action_dim}, state {e.state_dim})" for n, e in robots.items())
        raise ModelDataMismatch(f"a decoder acts for one robot layout, but the demos mix {listed}")
    ((action_dim, state_dim),) = dims
    for key, mine, data in (("action_dim", m.action_dim, action_dim), ("state_dim", m.state_dim, state_dim)):
        if mine and mine != data:
            raise ModelDataMismatch(f"model.{key}={mine} but the demos in {paths} have {key}={data}")
    sizes = info.resolutions()
    if cfg.data.resize:
        size = tuple(cfg.data.resize)
    elif len(sizes) == 1:
        size = sizes.pop()
    else:
        raise ModelDataMismatch(
            f"the data folders {paths} have different resolutions {sorted(sizes)}: set data.resize=H,W"
        )
    stats = {name: e.stats_f32() for name, e in robots.items()}
    if cfg.data.episodes_per_task or cfg.data.tasks:
        _, counts = few_shot_keys(paths, cfg.data.episodes_per_task, cfg.data.tasks)
        tasks = sorted(counts)
    else:
        tasks = info.tasks()
    # a config given back with --config keeps its vocabulary (embedding rows)
    m = replace(
        m,
        action_dim=action_dim,
        state_dim=state_dim,
        image_size=[int(v) for v in size],
        stats=stats,
        tasks=m.tasks or tasks,
    )
    if m.encoder_init:
        m = _prepare_encoder_init(m)
    labels = list(cfg.data.labels)
    if m.feature_key:
        labels = _prepare_cached_features(m, paths, labels)
    if policy == "latent":
        m, labels = _prepare_latent(cfg, m, paths)
    if policy == "idm-bc":
        labels = _prepare_idm_bc(cfg, paths, robots)
    data = replace(cfg.data, window=m.window_length, labels=labels)
    return replace(cfg, recipe=policy, model=m, data=data)


def _prepare_encoder_init(m: DecoderConfig) -> DecoderConfig:
    """model.encoder_init: the pretrained frame autoencoder's weights folder, and its encoder layout
    (encoder_channels) copied into the decoder's config; a one-line UsageError when it does not fit."""
    from wm_pipeline.recipes.frame_autoencoder import encoder_init

    folder, ae = encoder_init(m.encoder_init, m.image_size, m.image_channels)
    channels = [int(c) for c in ae["encoder_channels"]]
    if channels != list(m.encoder_channels):
        log.info(
            "encoder_init %s: encoder_channels %s (the autoencoder's) instead of %s",
            folder,
            channels,
            list(m.encoder_channels),
        )
    return replace(m, encoder_init=folder, encoder_channels=channels)


def _prepare_cached_features(m: DecoderConfig, paths: list[str], labels: list[str]) -> list[str]:
    """model.feature_key=NAME.features: the sidecar NAME must be on every data folder (``wm label
    --labeller RUN_AE``), written by the autoencoder the decoder starts from; returns data.labels with it."""
    from shards.sidecar import has_sidecar

    name = m.feature_key.split(".")[0]
    if not m.encoder_init or not m.freeze_encoder:
        raise UsageError(
            f"model.feature_key={m.feature_key} reads cached features of a frozen pretrained encoder: "
            f"set model.encoder_init=RUN_AE and model.freeze_encoder=true"
        )
    missing = [p for p in paths if not has_sidecar(p, name)]
    if missing:
        raise UsageError(
            f"model.feature_key={m.feature_key}: no '{name}' labels in {missing}; run "
            f"`wm label --labeller {m.encoder_init} --data DIR` first"
        )
    want = file_sha256(Path(m.encoder_init) / WEIGHTS)
    for p in paths:
        made_by = _sidecar_checkpoint(p, name)
        if made_by is not None and made_by[1] != want:
            raise UsageError(
                f"model.feature_key={m.feature_key}: the '{name}' labels in {p} were made by "
                f"{made_by[0]}, not by model.encoder_init={m.encoder_init} (other weights)"
            )
    return labels if name in labels else [*labels, name]


def _sidecar_checkpoint(data: str, name: str) -> tuple[str, str] | None:
    """(checkpoint folder, its weights' sha256) recorded in a local sidecar's labeller.json; None when
    the record is not there to read (a remote folder): nothing to compare."""
    from shards.sidecar import sidecar_dir

    path = sidecar_dir(data, name) / "labeller.json"
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return None
    return str(info.get("checkpoint")), str(info.get("checkpoint_sha256"))


def _prepare_latent(cfg, m: DecoderConfig, paths: list[str]) -> tuple[DecoderConfig, list[str]]:
    """policy=latent: take the latent-action layout from the world model given by ``--init`` and
    join the LAM sidecar it was trained on (the model config and ``data.labels`` that follow)."""
    from shards.sidecar import has_sidecar
    from wm_pipeline.recipes.worldmodel_policy import world_model_dir

    if not cfg.init:
        raise UsageError(
            "policy=latent needs --init RUN_WM: a world model pretrained with LAM latent actions "
            "(`wm train worldmodel --labels lam`), which predicts the latent chunk in closed loop"
        )
    folder = world_model_dir(str(cfg.init))
    if folder is None:
        raise UsageError(
            f"policy=latent: --init {cfg.init} is not a world-model run (need `wm train worldmodel` output with final/)"
        )
    wm = read_json(folder / MODEL_CONFIG, context=f"policy=latent: --init {cfg.init}: ")
    latent_dim = int(wm.get("latent_action_dim") or 0)
    if not latent_dim:
        raise UsageError(
            f"policy=latent: the world model {folder} was trained without latent actions; "
            f"pretrain it with `wm train worldmodel --labels lam`"
        )
    key = wm["latent_action_key"]
    name = key.split(".")[0]
    missing = [p for p in paths if not has_sidecar(p, name)]
    if missing:
        raise UsageError(
            f"policy=latent: no '{name}' labels in {missing} (the world model's latent actions); "
            f"run `wm label --labeller RUN_LAM --data DIR` on the demos first"
        )
    if list(m.image_size) != [wm["image_size"]] * 2:
        raise ModelDataMismatch(
            f"policy=latent: the demos are {m.image_size[0]}x{m.image_size[1]} px but the "
            f"world model {folder} sees {wm['image_size']} px frames"
        )
    n_obs_steps = m.n_obs_steps
    if n_obs_steps < wm["n_obs"]:
        log.info("policy=latent: n_obs_steps %d -> %d (the world model's context)", n_obs_steps, wm["n_obs"])
        n_obs_steps = int(wm["n_obs"])
    m = replace(
        m,
        n_obs_steps=n_obs_steps,
        latent_dim=latent_dim,
        latent_key=key,
        latent_model=str(folder.resolve()),
        latent_horizon=min(m.latent_horizon or m.horizon, int(wm["action_horizon"])),
    )
    labels = list(cfg.data.labels) if name in cfg.data.labels else [*cfg.data.labels, name]
    log.info("policy=latent: latent chunk [%d, %d] from %s (labels '%s')", m.latent_horizon, latent_dim, folder, name)
    return m, labels


def idm_labels_name(cfg) -> str:
    """The IDM sidecar idm-bc reads: the one name given with ``--labels`` (default ``idm``)."""
    if len(cfg.data.labels) > 1:
        raise UsageError(f"policy=idm-bc reads one IDM sidecar; --labels names {cfg.data.labels}")
    return cfg.data.labels[0] if cfg.data.labels else IDM_LABELS


def _prepare_idm_bc(cfg, paths: list[str], robots: dict) -> list[str]:
    """The IDM sidecar to join (``data.labels``: present in at least one data dir) for one robot embodiment."""
    from shards.sidecar import has_sidecar

    if len(robots) != 1:
        raise UsageError(f"policy=idm-bc labels video as one robot, but the demos have embodiments {sorted(robots)}")
    name = idm_labels_name(cfg)
    if not any(has_sidecar(p, name) for p in paths):
        raise UsageError(
            f"policy=idm-bc: no IDM pseudo-labels ({name}/) in any of {paths}; run "
            f"`wm label --labeller RUN_IDM --data VIDEO --name {name}` first"
        )
    return [name]


def idm_targets(batch: dict, embodiment: str, action_dim: int, name: str = IDM_LABELS) -> dict:
    """idm-bc: action-free windows with all-valid IDM pseudo-labels (sidecar ``name``) become action
    samples of ``embodiment``: ``action`` [B, T, A] <- ``<name>.pseudo_action``, ``action_mask`` True."""
    import torch

    key = label_key(name, PSEUDO_ACTION)
    if key not in batch:
        return batch
    pseudo, present = batch[key].float(), batch[label_key(name, PRESENT)].bool()
    if pseudo.shape[-1] != action_dim:
        raise ValueError(f"IDM pseudo-actions have {pseudo.shape[-1]} dims, the demos {action_dim}")
    valid = batch[label_key(name, VALID)].bool().flatten(1).all(1)  # a tail row without label: skip window
    use = present & valid & ~batch[ACTION_MASK].bool()
    if use.any():
        batch[ACTION] = torch.where(use[:, None, None], pseudo, batch[ACTION])
        batch[ACTION_MASK] = batch[ACTION_MASK].bool() | use
        batch[EMBODIMENT] = [embodiment if u else e for u, e in zip(use.tolist(), batch[EMBODIMENT])]
    return batch


def build_stream(cfg, seed: int):
    """The default window stream (few-shot subset included); idm-bc reads action-free windows through
    their IDM pseudo-labels."""
    loader = default_stream(cfg, seed, optional_labels=cfg.recipe == "idm-bc")
    if cfg.recipe != "idm-bc":
        return loader
    (robot,) = cfg.model.stats
    name = idm_labels_name(cfg)
    return (idm_targets(batch, robot, cfg.model.action_dim, name) for batch in loader)


RUN_PRESETS = {
    "tiny": {
        "data": {"batch_size": 16, "windows_per_episode": 8, "shuffle_buffer": 32},
        "optim": {"lr": 1e-3, "warmup_steps": 20},
        "train": {"max_steps": 300, "ckpt_every": 300},
    },
    "small": {
        "data": {"batch_size": 32, "num_workers": 1, "windows_per_episode": 8, "shuffle_buffer": 128},
        "optim": {"lr": 5e-4, "warmup_steps": 100},
        "train": {"max_steps": 2000, "eval_every": 0},
    },
}


def reads_init(cfg) -> bool:
    """policy=latent reads ``--init``: the world model that predicts the latents."""
    return cfg.recipe == "latent"


# ---------------------------------------------------------------- evaluation


def _is_legacy_decoder_config(folder: Path) -> bool:
    """A decoder folder saved before config.json named its class: a decoder config has ``horizon``."""
    path = folder / MODEL_CONFIG
    config = read_json(path) if path.stat().st_size else {}
    return isinstance(config, dict) and "horizon" in config


def _decoder_dir(spec: str) -> Path | None:
    """``RUN/final`` or a ``save_pretrained`` folder of a decoder; None when ``spec`` is not one
    (another model's save_pretrained folder, e.g. a world model, is left to its own loader)."""
    return model_folder(spec, "decoder", ActionDecoder, legacy=_is_legacy_decoder_config)


def load_decoder_policy(spec: str, info: dict[str, Any]):
    """``wm eval --policy RUN``: a DecoderPolicy for a decoder run, None for anything else.

    ``info`` is ``wm_pipeline.jobs.closed_loop_eval.env_info`` plus the command's policy options (``action_steps``,
    ``temporal_ensemble``, ``sampling_steps``)."""
    from decoders.policy import DecoderPolicy

    folder = _decoder_dir(spec)
    if folder is None:
        return None
    decoder = from_pretrained(ActionDecoder, folder, what="policy")
    cfg = decoder.config
    check_policy_fits(spec, info, list(cfg.stats), cfg.state_dim, cfg.horizon)
    latent_source = _latent_source(spec, cfg) if cfg.latent_dim else None
    return DecoderPolicy(
        decoder,
        n_action_steps=info.get("action_steps"),
        temporal_ensemble=info.get("temporal_ensemble"),
        n_steps=info.get("sampling_steps"),
        embodiment=info["embodiment"],
        latent_source=latent_source,
    )


def _latent_source(spec: str, cfg):
    """policy=latent: the recorded world model as a latent-action predictor, checked against the decoder."""
    from decoders.world_model_policy import WorldModelLatentSource
    from wm_pipeline.recipes.worldmodel_policy import world_model_dir
    from worldmodel.uwm import WorldModel

    folder = world_model_dir(cfg.latent_model) if cfg.latent_model else None
    if folder is None:
        raise UsageError(
            f"policy {spec} is conditioned on latent actions from the world model "
            f"'{cfg.latent_model}', which is not there (moved or deleted?)"
        )
    model = from_pretrained(WorldModel, folder, what="the latent-action world model", context=f"policy {spec}: ")
    dim = int(model.config.latent_action_dim)
    if dim != cfg.latent_dim or model.config.n_obs > cfg.n_obs_steps:
        raise UsageError(
            f"policy {spec} expects {cfg.latent_dim}-dim latents from {cfg.n_obs_steps} frames but the "
            f"world model {folder} gives {dim}-dim latents from {model.config.n_obs} frames"
        )
    log.info("latent actions from world model %s (chunk [%d, %d])", folder, cfg.latent_horizon or cfg.horizon, dim)
    return WorldModelLatentSource(model, horizon=cfg.latent_horizon or cfg.horizon)
