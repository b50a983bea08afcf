"""The shared network pieces in nets/, and checkpoints saved before the model packages used them."""

import re

import pytest
import torch

from nets.spatial_softmax import SpatialSoftmax


def test_spatial_softmax_finds_the_peak():
    x = torch.full((2, 3, 5, 7), -30.0)
    x[0, 0, 0, 0] = 30.0  # top-left
    x[0, 1, 4, 6] = 30.0  # bottom-right
    x[0, 2, 2, 3] = 30.0  # centre
    x[1] = 0.0  # flat: the mean position, the centre
    out = SpatialSoftmax()(x)
    assert out.shape == (2, 6)
    xs, ys = out[:, :3], out[:, 3:]
    assert torch.allclose(xs[0], torch.tensor([-1.0, 1.0, 0.0]), atol=1e-4)
    assert torch.allclose(ys[0], torch.tensor([-1.0, 1.0, 0.0]), atol=1e-4)
    assert torch.allclose(out[1], torch.zeros(6), atol=1e-6)


def test_keypoints_follow_an_object_and_learn():
    """Learned keypoints: a bright square's position is regressed from the keypoints of a 1x1 conv."""
    torch.manual_seed(0)
    layer = SpatialSoftmax(channels=1, keypoints=4)
    head = torch.nn.Linear(8, 2)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=3e-2)

    def batch(n=64):
        pos = torch.randint(0, 12, (n, 2))
        img = torch.zeros(n, 1, 16, 16)
        for i, (r, c) in enumerate(pos.tolist()):
            img[i, 0, r : r + 4, c : c + 4] = 1.0
        target = (pos.float() + 1.5) / 7.5 - 1.0  # the square's centre in [-1, 1]
        return img, target.flip(-1)  # (x, y)

    losses = []
    for _ in range(300):
        img, target = batch()
        loss = torch.nn.functional.mse_loss(head(layer(img)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.02 < losses[0]


def test_spatial_softmax_rejects_keypoints_without_channels():
    with pytest.raises(ValueError, match="channels"):
        SpatialSoftmax(0, keypoints=4)


# ----------------------------------------------------------------------------- old checkpoints

# The velocity network's keys before it used nets.dit_block: written out, as the old code named them.
OLD_DECODER_NAMES = {
    "blocks.{i}.stream.qkv.": "blocks.{i}.qkv.",
    "blocks.{i}.stream.proj.": "blocks.{i}.out.",
    "blocks.{i}.stream.mlp.": "blocks.{i}.mlp.",
    "blocks.{i}.stream.adaln.": "blocks.{i}.ada.1.",
}


def _as_old_decoder(state: dict, depth: int) -> dict:
    """A current decoder state dict under the key names the code before nets/ saved."""
    old = {}
    for key, value in state.items():
        for i in range(depth):
            for new, was in OLD_DECODER_NAMES.items():
                new, was = "velocity." + new.format(i=i), "velocity." + was.format(i=i)
                if key.startswith(new):
                    key = was + key[len(new) :]
        key = key.replace("velocity.final.adaln.", "velocity.ada.1.")
        # the encoder's residual conv before nets.conv: body = conv, GroupNorm, SiLU, conv, GroupNorm
        key = re.sub(
            r"^image_encoder\.stages\.(\d+)\.(conv1|norm1|conv2|norm2)\.",
            lambda m: f"image_encoder.stages.{m[1]}.body.{OLD_RESCONV[m[2]]}.",
            key,
        )
        old[key] = value
    return old


OLD_RESCONV = {"conv1": 0, "norm1": 1, "conv2": 3, "norm2": 4}


def _decoder_and_batch():
    from decoders.decoder import ActionDecoder
    from tests.test_decoder import make_batch, make_config

    batch = make_batch()
    torch.manual_seed(0)
    model = ActionDecoder(make_config(batch, objective="meanflow")).eval()
    with torch.no_grad():  # non-zero AdaLN weights, so a key that failed to load would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, batch


def _predict(model, batch):
    return model.predict_action_chunk(
        batch["frames"],
        batch["state"][:, 1],
        batch["task"],
        generator=torch.Generator().manual_seed(1),
        embodiment="sawyer",
    )


def test_decoder_checkpoint_saved_with_old_block_names_loads(tmp_path):
    from safetensors.torch import save_file

    from decoders.decoder import ActionDecoder

    model, batch = _decoder_and_batch()
    old = _as_old_decoder(model.state_dict(), model.config.depth)
    assert {"velocity.blocks.0.out.weight", "velocity.ada.1.weight", "image_encoder.stages.3.body.4.weight"} <= set(old)
    model.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in old.items()}, str(tmp_path / "model.safetensors"))
    loaded = ActionDecoder.from_pretrained(str(tmp_path)).eval()  # strict: every key found a home
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(_predict(loaded, batch), _predict(model, batch))
    fresh = ActionDecoder(model.config)
    fresh.load_state_dict(old, strict=True)  # a plain load_state_dict renames too
    assert torch.equal(_predict(fresh.eval(), batch), _predict(model, batch))


def test_warm_start_from_a_checkpoint_with_old_block_names_copies_every_tensor(tmp_path):
    """--init (copy what fits by name) sees old-layout names through the model's rename rules."""
    from safetensors.torch import save_file

    from decoders.decoder import ActionDecoder
    from wm_pipeline.training.checkpoint import load_init_weights

    model, batch = _decoder_and_batch()
    old = _as_old_decoder(model.state_dict(), model.config.depth)
    (tmp_path / "final").mkdir()
    save_file({k: v.contiguous() for k, v in old.items()}, str(tmp_path / "final" / "model.safetensors"))
    torch.manual_seed(123)
    fresh = ActionDecoder(model.config).eval()
    load_init_weights(fresh, tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_rename_keys_leaves_current_names_alone():
    from nets.state_dict import rename_keys

    rules = [(r"blocks\.(\d+)\.out\.(.*)", r"blocks.\1.stream.proj.\2")]
    sd = {"v.blocks.3.out.weight": 1, "v.blocks.4.stream.proj.weight": 2, "blocks.0.out.bias": 3}
    assert rename_keys(sd, rules, prefix="v.") == {
        "v.blocks.3.stream.proj.weight": 1,
        "v.blocks.4.stream.proj.weight": 2,
        "blocks.0.out.bias": 3,
    }


# ----------------------------------------------------------------------------- DiT block, attention


def test_decoder_and_world_model_share_the_dit_block():
    from decoders.decoder import ChunkTransformer
    from nets.dit_block import Block
    from worldmodel.uwm import WorldModel, WorldModelConfig, embodiment_spec

    net = ChunkTransformer(3, 4, 16, 2, 2, 2.0)
    wm = WorldModel(
        WorldModelConfig(
            image_size=16,
            patch_size=8,
            width=16,
            depth=1,
            heads=2,
            registers=1,
            encoder_channels=[8],
            action_horizon=2,
            n_future=1,
            embodiments={"a": embodiment_spec(action_dim=2)},
        )
    )
    assert all(type(b) is Block for b in net.blocks) and type(wm.net.blocks[0]) is Block


def test_math_attention_lets_jvp_through_a_block():
    from nets.attention import attention, math_attention
    from nets.dit_block import Block

    torch.manual_seed(0)
    block = Block(8, 2)
    torch.nn.init.normal_(block.stream.adaln.weight, std=0.1)
    x, c = torch.randn(2, 5, 8), torch.randn(2, 8)
    with math_attention():
        out, tangent = torch.func.jvp(lambda x_: block(x_, c), (x,), (torch.ones_like(x),))
    torch.testing.assert_close(out, block(x, c))
    assert torch.isfinite(tangent).all() and tangent.abs().sum() > 0
    q = torch.randn(1, 2, 3, 4)
    assert torch.equal(attention(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q))


# ----------------------------------------------------------------------------- timestep embedding


def test_timestep_embedding_scale_is_the_one_difference():
    from nets.timestep import MEANFLOW_SCALE, TimestepEmbedding, timestep_embedding

    t = torch.tensor([0.0, 0.25, 1.0])
    low, high = timestep_embedding(t, 8, MEANFLOW_SCALE), timestep_embedding(t, 8)
    assert low.shape == high.shape == (3, 8)
    assert torch.equal(low[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos 0, sin 0
    assert torch.equal(timestep_embedding(t * 50, 8, MEANFLOW_SCALE), high)  # 20 * 50 t = 1000 t
    torch.manual_seed(0)
    emb = TimestepEmbedding(16, freq_dim=8, scale=MEANFLOW_SCALE)
    torch.testing.assert_close(emb(t), emb.mlp(low))


# ----------------------------------------------------------------------------- residual conv block


def test_res_conv_block_both_variants():
    import torch.nn.functional as F

    from nets.conv import ResConvBlock

    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    post = ResConvBlock(8, 16, stride=2, groups=4)
    assert post(x).shape == (2, 16, 3, 3) and post.skip is not None and post.conv1.bias is None
    h = post.norm2(post.conv2(F.silu(post.norm1(post.conv1(x)))))
    torch.testing.assert_close(post(x), F.silu(h + post.skip(x)))
    pre = ResConvBlock(8, groups=8, bias=True, preact=True)
    torch.testing.assert_close(pre(x), x + pre.conv2(F.silu(pre.norm2(pre.conv1(F.silu(pre.norm1(x)))))))
    with pytest.raises(ValueError, match="pre-activation"):
        ResConvBlock(8, 16, preact=True)


def test_idm_checkpoint_saved_with_its_own_residual_block_loads(tmp_path):
    from safetensors.torch import save_file

    from latent_actions.idm import IDMConfig, InverseDynamicsModel

    torch.manual_seed(0)
    model = InverseDynamicsModel(
        IDMConfig(
            image_size=32,
            channels=(8, 16),
            width=32,
            depth=1,
            n_heads=2,
            action_dim=2,
            stats={"sq": {"action": {"mean": [0, 1], "std": [2, 1]}}},
        )
    )
    old_index = {"norm1": 0, "conv1": 2, "norm2": 3, "conv2": 5}  # net = GN, SiLU, conv, GN, SiLU, conv
    old = {
        re.sub(
            r"^features\.stages\.(\d+)\.(norm1|conv1|norm2|conv2)\.",
            lambda m: f"features.stages.{m[1]}.net.{old_index[m[2]]}.",
            k,
        ): v.contiguous()
        for k, v in model.state_dict().items()
    }
    assert "features.stages.0.net.5.weight" in old and "features.stages.2.net.0.bias" in old
    model.save_pretrained(tmp_path)
    save_file(old, str(tmp_path / "model.safetensors"))
    loaded = InverseDynamicsModel.from_pretrained(str(tmp_path))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    frames = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(loaded.predict_actions(frames, "sq"), model.predict_actions(frames, "sq"))


# ----------------------------------------------------------------------------- normalisation


def test_world_model_reads_the_flat_stats_of_configs_saved_before(tmp_path):
    import json

    from worldmodel.uwm import WorldModel, WorldModelConfig, embodiment_spec

    stats = {
        "action": {"mean": [0.0, 0.1], "std": [0.5, 0.0]},
        "state": {"mean": [1.0, 2.0, 3.0], "std": [1.0, 2.0, 0.0]},
    }
    flat = {
        "action_dim": 2,
        "action_mean": [0.0, 0.1],
        "action_std": [0.5, 0.0],  # the encoding saved before
        "state_dim": 3,
        "state_mean": [1.0, 2.0, 3.0],
        "state_std": [1.0, 2.0, 0.0],
    }
    small = dict(
        image_size=16,
        patch_size=8,
        width=16,
        depth=1,
        heads=2,
        registers=1,
        encoder_channels=[8],
        action_horizon=2,
        n_future=1,
    )
    assert embodiment_spec(stats)["stats"] == stats
    torch.manual_seed(0)
    new = WorldModel(WorldModelConfig(**small, embodiments={"arm": embodiment_spec(stats)}))
    new.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["embodiments"]["arm"]["stats"] == stats
    cfg["embodiments"]["arm"] = flat
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old = WorldModel.from_pretrained(str(tmp_path))
    assert old.config.embodiments == new.config.embodiments
    for a, b in ((old.adapters["arm"], new.adapters["arm"]),):
        for name in ("action_mean", "action_std", "state_mean", "state_std"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(new.adapters["arm"].action_std, torch.tensor([0.5, 1e-3]))  # the std floor
    no_state = WorldModelConfig(**small, embodiments={"arm": flat}, use_state=False).embodiments["arm"]
    assert no_state["state_dim"] == 0 and "state" not in no_state["stats"]


def test_normalizer_floor_is_the_world_model_and_idm_rule():
    from nets.normalize import MIN_STD, Normalizer

    stats = {"a": {"action": {"mean": [1.0, 2.0], "std": [0.0, 4.0]}}}
    floored = Normalizer(stats, ["a"], "action", 2, "mean_std", min_scale=MIN_STD)
    plain = Normalizer(stats, ["a"], "action", 2, "mean_std")
    assert torch.equal(floored.scale, torch.tensor([[MIN_STD, 4.0]]))
    assert torch.equal(plain.scale, torch.tensor([[1.0, 4.0]]))  # the decoder's rule: a constant dim gets 1


def test_nets_imports_nothing_of_the_project_but_itself():
    """The ground floor: nets/ imports torch, numpy and the standard library, never a model package."""
    import ast
    import sys
    from pathlib import Path

    allowed = {"torch", "numpy", "nets", "__future__"} | set(sys.stdlib_module_names)
    optional = {"flash_attn"}  # the GPU extra, imported under try
    for path in sorted(Path(__file__).parents[1].joinpath("nets").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            for name in names:
                assert name.split(".")[0] in allowed | optional, f"{path.name} imports {name}"
