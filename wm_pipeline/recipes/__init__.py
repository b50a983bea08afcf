"""The built-in models: one table of model specs, each with its train, label and policy faces.

``MODELS`` is what ``wm train`` can train, ``wm label --labeller RUN`` can label with and ``wm eval
--policy RUN`` can drive, one row per model; ``LABELLERS`` the labeller kinds that are not trained
models (a frozen VAE). The registry (wm_pipeline.training.registry) reads this table by name when a
model, a labeller kind or a policy loader is first looked up; no module registers anything by being
imported. Each recipe module holds one model's pieces (how it fills its config from the data, its
stream, its labeller or policy loader).
"""

from decoders.decoder import PRESETS as DECODER_PRESETS, ActionDecoder, DecoderConfig
from latent_actions.frame_autoencoder import PRESETS as AE_PRESETS, FrameAutoencoder, FrameAutoencoderConfig
from latent_actions.idm import PRESETS as IDM_PRESETS, IDMConfig, InverseDynamicsModel
from latent_actions.lam import PRESETS as LAM_PRESETS, LAMConfig, LatentActionModel
from shards.batch_keys import ACTION, ACTION_MASK, EMBODIMENT, FRAMES
from wm_pipeline.jobs import vae_labeller
from wm_pipeline.recipes import decoder, frame_autoencoder, idm, lam, worldmodel, worldmodel_policy
from wm_pipeline.training.registry import LabellerFace, ModelSpec
from worldmodel.uwm import PRESETS as WORLD_MODEL_PRESETS, WorldModel, WorldModelConfig

MODELS = (
    ModelSpec(
        "decoder",
        DecoderConfig,
        ActionDecoder,
        DECODER_PRESETS,
        prepare=decoder.prepare,
        build_stream=decoder.build_stream,
        run_presets=decoder.RUN_PRESETS,
        required_keys=(FRAMES, ACTION, ACTION_MASK),
        reads_init=decoder.reads_init,
        load_policy=decoder.load_decoder_policy,
    ),
    ModelSpec(
        "idm",
        IDMConfig,
        InverseDynamicsModel,
        IDM_PRESETS,
        prepare=idm.prepare,
        run_presets=idm.RUN_PRESETS,
        required_keys=(FRAMES, ACTION, ACTION_MASK),
        labeller=LabellerFace(idm.load_labeller, idm.label_windows),
    ),
    ModelSpec(
        "lam",
        LAMConfig,
        LatentActionModel,
        LAM_PRESETS,
        prepare=lam.prepare,
        run_presets=lam.RUN_PRESETS,
        required_keys=(FRAMES,),
        labeller=LabellerFace(lam.load_labeller, lam.label_windows),
    ),
    ModelSpec(
        "autoencoder",
        FrameAutoencoderConfig,
        FrameAutoencoder,
        AE_PRESETS,
        prepare=frame_autoencoder.prepare,
        run_presets=frame_autoencoder.RUN_PRESETS,
        required_keys=(FRAMES,),
        labeller=LabellerFace(frame_autoencoder.load_labeller, frame_autoencoder.label_windows),
    ),
    ModelSpec(
        "worldmodel",
        WorldModelConfig,
        WorldModel,
        WORLD_MODEL_PRESETS,
        prepare=worldmodel.prepare,
        build_stream=worldmodel.build_stream,
        run_presets=worldmodel.RUN_PRESETS,
        required_keys=(FRAMES, ACTION, ACTION_MASK, EMBODIMENT),
        warm_start=True,  # `--init PRETRAINED` fine-tunes (the uwm recipe)
        load_policy=worldmodel_policy.load_world_model_policy,
    ),
)

LABELLERS = (vae_labeller.SPEC,)
