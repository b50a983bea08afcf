"""Frames to tokens and back: the patch stem, and a frozen diffusers AutoencoderKL loaded from a local
folder (a tiny randomly initialised one that the test saves), with latents precomputed or on the fly."""

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from worldmodel.tokenizer import PatchTokenizer, decode_latents, encode_frames, load_vae, unit_to_uint8
from worldmodel.uwm import WorldModel, WorldModelConfig, embodiment_spec


@pytest.fixture
def vae_dir(tmp_path):
    """A tiny AutoencoderKL: 32 px -> 4 x 16 x 16 latents (two encoder blocks: one halving)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    )
    path = tmp_path / "vae"
    vae.save_pretrained(path)
    return path


def test_patch_tokenizer_unpatchify_inverts_patchify():
    tok = PatchTokenizer(channels=3, size=8, patch=4, width=48)
    with torch.no_grad():  # make both maps the identity on patch contents to check the token order
        tok.embed.weight.copy_(torch.eye(48).view(48, 3, 4, 4))
        tok.embed.bias.zero_()
        tok.out.weight.copy_(torch.eye(48))
        tok.out.bias.zero_()
    x = torch.randn(2, 3, 3, 8, 8)
    tokens = tok.patchify(x)
    assert tokens.shape == (2, 3 * 4, 48)
    assert torch.allclose(tok.unpatchify(tokens), x, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, F, 3, 8, 8\]"):
        tok.patchify(torch.randn(1, 1, 3, 16, 16))


def test_vae_round_trip_shapes(vae_dir, tmp_path):
    vae = load_vae(vae_dir)
    assert not any(p.requires_grad for p in vae.parameters())
    frames = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    latents = encode_frames(vae, frames, batch_size=2)
    assert latents.shape == (5, 4, 16, 16) and latents.dtype == torch.float32
    assert torch.allclose(latents, encode_frames(vae, frames), atol=1e-5)  # posterior mean: deterministic
    decoded = decode_latents(vae, latents, batch_size=3)
    assert decoded.shape == (5, 3, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1
    assert unit_to_uint8(decoded).dtype == torch.uint8
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(tmp_path / "missing")


def test_world_model_on_vae_latents_precomputed_or_on_the_fly(vae_dir, tmp_path):
    cfg = WorldModelConfig(
        image_size=32,
        frame_space="vae",
        vae_path=str(vae_dir),
        patch_size=4,
        n_obs=1,
        n_future=1,
        action_horizon=4,
        width=32,
        depth=1,
        heads=2,
        registers=1,
        encoder_channels=[8, 16],
        embodiments={"toy": embodiment_spec(action_dim=2)},
    )
    model = WorldModel(cfg)
    assert (cfg.vae_latent_channels, cfg.vae_downsample) == (4, 2)  # read from the VAE
    assert model.num_tokens == 4 + (16 // 4) ** 2 + 1
    b = 2
    frames = torch.randint(0, 256, (b, cfg.window, 3, 32, 32), dtype=torch.uint8)
    batch = {
        "frames": frames,
        "action": torch.randn(b, cfg.window, 2),
        "action_mask": torch.ones(b, dtype=torch.bool),
        "embodiment": ["toy"] * b,
    }
    # a labelling pass stores latents of every frame; the model picks the future ones from the window
    latents = encode_frames(load_vae(vae_dir), frames.flatten(0, 1)).view(b, cfg.window, 4, 16, 16)
    on_the_fly, _ = model(batch, generator=torch.Generator().manual_seed(0))
    precomputed, _ = model({**batch, "vae.latent": latents}, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(on_the_fly, precomputed, atol=1e-5)
    shifted, _ = model({**batch, "vae.latent": latents + 1}, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(precomputed, shifted)  # the latents from the batch are the ones used

    obs = frames[:, :1]
    video = model.sample_video(obs, steps=2)
    assert video.shape == (b, 1, 3, 32, 32) and video.min() >= -1 and video.max() <= 1

    # the frozen VAE is loaded from its folder, never saved with the model's weights
    model.save_pretrained(tmp_path / "wm")
    assert not any("vae" in k or "decoder" in k for k in load_file(tmp_path / "wm" / "model.safetensors"))
    loaded = WorldModel.from_pretrained(tmp_path / "wm", strict=True)
    assert torch.equal(
        loaded.sample_video(obs, steps=2, generator=torch.Generator().manual_seed(1)),
        model.sample_video(obs, steps=2, generator=torch.Generator().manual_seed(1)),
    )

    # latents only (no VAE folder): training needs them in the batch, sampling returns latents
    bare = WorldModel(WorldModelConfig(**{**cfg.__dict__, "vae_path": None}))
    bare({**batch, "vae.latent": latents})
    with pytest.raises(ValueError, match="'vae.latent'"):
        bare(batch)
    assert bare.sample_video(obs, steps=2).shape == (b, 1, 4, 16, 16)
