"""The world model's contract, for both variants: modes and shapes, masked action loss, learning,
use of the actions, checkpoints. Tiny models on tiny synthetic data; DUST specifics in test_dust.py."""

import dataclasses
import json

import pytest
import torch

from worldmodel.uwm import PRESETS, WorldModel, WorldModelConfig, embodiment_spec

VARIANTS = ["uwm", "dust"]


def toy_config(variant="uwm", **kw) -> WorldModelConfig:
    """16 px frames, 1 current + 1 future frame, 4-step chunks of a 2-dim action; window of 5 frames."""
    base = dict(
        variant=variant,
        image_size=16,
        patch_size=4,
        n_obs=1,
        n_future=1,
        action_horizon=4,
        width=64,
        depth=2,
        heads=2,
        registers=2,
        encoder_channels=[16, 32],
        action_steps=4,
        video_steps=4,
        embodiments={"toy": embodiment_spec({"action": {"mean": [0.0, 0.0], "std": [0.5, 0.5]}})},
    )
    return WorldModelConfig(**{**base, **kw})


def action_dependent_batch(n: int, seed: int) -> dict:
    """Current frame: a random grey level. Action: a constant 2-dim chunk in [-1, 1]. Future frame (index 4):
    top half = action[0], bottom half = action[1] (in [-1, 1] pixel units): the future depends only on the action."""
    g = torch.Generator().manual_seed(seed)
    grey = torch.randint(0, 256, (n, 1, 1, 1, 1), generator=g, dtype=torch.uint8)
    frames = grey.expand(n, 5, 3, 16, 16).clone()
    a = torch.rand(n, 2, generator=g) * 2 - 1
    future = torch.empty(n, 3, 16, 16)
    future[:, :, :8] = a[:, 0, None, None, None]
    future[:, :, 8:] = a[:, 1, None, None, None]
    frames[:, 4] = ((future + 1) * 127.5).round().to(torch.uint8)
    return {
        "frames": frames,
        "action": a[:, None].expand(n, 5, 2).clone(),
        "action_mask": torch.ones(n, dtype=torch.bool),
        "embodiment": ["toy"] * n,
        "task": [""] * n,
    }


def random_batch(cfg: WorldModelConfig, n: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s, t = cfg.image_size, cfg.window
    return {
        "frames": torch.randint(0, 256, (n, t, 3, s, s), generator=g, dtype=torch.uint8),
        "action": torch.randn(n, t, 2, generator=g),
        "action_mask": torch.ones(n, dtype=torch.bool),
        "embodiment": ["toy"] * n,
        "task": ["push"] * n,
    }


def subset(batch: dict, idx) -> dict:
    return {k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx]) for k, v in batch.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_mode_has_the_documented_shapes(variant):
    cfg = toy_config(
        variant,
        n_obs=2,
        n_future=2,
        action_horizon=4,
        frame_gap=2,
        latent_action_dim=3,
        embodiments={"toy": embodiment_spec(action_dim=2, state_dim=5)},
    )
    model = WorldModel(cfg).eval()
    assert cfg.window == 2 + max(3, 4) and cfg.future_indices() == [3, 5]
    assert model.num_tokens == 4 + 2 * 16 + 2
    b = 3
    obs = torch.randint(0, 256, (b, 2, 3, 16, 16), dtype=torch.uint8)
    nxt = torch.randint(0, 256, (b, 2, 3, 16, 16), dtype=torch.uint8)
    state = torch.randn(b, 2, 5)
    assert model.sample_policy(obs, "toy", state=state, steps=2).shape == (b, 4, 2)
    assert model.sample_policy(obs, "latent", steps=2).shape == (b, 4, 3)
    assert model.sample_forward_dynamics(obs, torch.randn(b, 4, 2), "toy", steps=2).shape == (b, 2, 3, 16, 16)
    assert model.sample_inverse_dynamics(obs, nxt, "toy", steps=2).shape == (b, 4, 2)
    for emb in (None, "toy"):
        video = model.sample_video(obs, emb, steps=2)
        assert video.shape == (b, 2, 3, 16, 16) and video.min() >= -1 and video.max() <= 1
    actions, video = model.sample_joint(obs, "toy", action_steps=2, video_steps=3)
    assert actions.shape == (b, 4, 2) and video.shape == (b, 2, 3, 16, 16)
    with pytest.raises(ValueError, match="unknown embodiment 'arm'"):
        model.sample_policy(obs, "arm")


@pytest.mark.parametrize("variant", VARIANTS)
def test_action_free_samples_contribute_exactly_zero_through_the_action_loss(variant):
    cfg = toy_config(variant)
    model = WorldModel(cfg)
    batch = random_batch(cfg)
    batch["action_mask"] = torch.tensor([True, False, True])
    batch["embodiment"] = ["toy", "video", "toy"]
    batch["action"][1] = float("nan")  # an action-free sample's actions are never read
    batch["action"].requires_grad_(True)
    out = model.losses(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and out["loss_action"] > 0 and out["action_fraction"] == pytest.approx(2 / 3)
    out["loss_action"].backward()
    grad = batch["action"].grad
    assert torch.all(grad[1] == 0) and grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0

    # a batch of action-free samples only: the action loss is exactly zero, and the total loss has exactly
    # the gradients of the video loss alone
    free = subset({**batch, "action": batch["action"].detach()}, [1])
    params = [p for p in model.parameters()]

    def grads(key):
        out = model.losses(free, generator=torch.Generator().manual_seed(0))
        g = torch.autograd.grad(out[key], params, allow_unused=True)
        return out, [torch.zeros_like(p) if x is None else x for p, x in zip(params, g)]

    out, total = grads("loss")
    _, video = grads("loss_video")
    assert out["loss_action"].item() == 0.0 and out["action_fraction"].item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(total, video))

    # with a latent-action sidecar, action-free samples train the "latent" embodiment instead
    model = WorldModel(dataclasses.replace(cfg, latent_action_dim=3))
    out = model.losses(
        {**free, "lam.latent": torch.randn(1, cfg.window, 3)}, generator=torch.Generator().manual_seed(0)
    )
    assert out["loss_action"] > 0 and out["action_fraction"].item() == 1.0


def test_bad_batches_raise_clear_errors():
    cfg = toy_config()
    model = WorldModel(cfg)
    batch = random_batch(cfg)
    with pytest.raises(ValueError, match="windows of 5 frames"):
        model(subset({**batch, "frames": batch["frames"][:, :3]}, [0, 1, 2]))
    with pytest.raises(ValueError, match="embodiment 'arm'.*config.embodiments"):
        model({**batch, "embodiment": ["toy", "arm", "toy"]})


def fit_one_batch(model: WorldModel, batch: dict, steps: int, bf16: bool = False) -> list[dict]:
    """AdamW on one batch with one draw of noise and timesteps (memorising it drives both losses towards
    zero); ``bf16``: under CPU autocast. -> the metrics of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, metrics = model(batch, generator=torch.Generator().manual_seed(0))
        history.append(metrics)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return history


def test_a_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = toy_config(p_marginal=0.0)
    model = WorldModel(cfg)
    batch = random_batch(cfg, n=8)
    first = fit_one_batch(model, batch, 80)[0]
    _, metrics = model(batch, generator=torch.Generator().manual_seed(0))
    assert metrics["loss_action"] < first["loss_action"] / 10
    assert metrics["loss_video"] < first["loss_video"] / 10


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast_trains_and_samples(variant):
    """The runtime trains under bf16 autocast on CUDA (precision=auto); CPU autocast runs the same casts.
    With robot state, as the Meta-World demos have it. Both losses must fall, and every mode must return
    float32 of the right shape."""
    torch.manual_seed(0)
    spec = embodiment_spec(
        {"action": {"mean": [0.0, 0.0], "std": [0.5, 0.5]}, "state": {"mean": [0.0] * 3, "std": [1.0] * 3}}
    )
    cfg = toy_config(
        variant,
        p_marginal=0.0,
        video_target="residual",
        video_prediction="x0",
        video_context="last_frame",
        embodiments={"toy": spec},
    )
    model = WorldModel(cfg)
    batch = random_batch(cfg, n=8)
    batch.update(state=torch.randn(8, cfg.window, 3), state_mask=torch.ones(8, dtype=torch.bool))
    history = fit_one_batch(model, batch, 60, bf16=True)
    assert history[-1]["loss_action"] < history[0]["loss_action"] / 5
    assert history[-1]["loss_video"] < history[0]["loss_video"] / 5
    obs, nxt = batch["frames"][:2, : cfg.n_obs], batch["frames"][:2, cfg.future_indices()]
    kw = {"state": batch["state"][:2, : cfg.n_obs]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        samples = {
            "policy": model.sample_policy(obs, "toy", **kw),
            "inverse": model.sample_inverse_dynamics(obs, nxt, "toy"),
            "forward": model.sample_forward_dynamics(obs, batch["action"][:2, : cfg.action_horizon], "toy"),
            "video": model.sample_video(obs),
        }
    for name, x in samples.items():
        assert x.dtype in (torch.float32, torch.uint8) and torch.isfinite(x.float()).all(), name
    assert samples["policy"].shape == (2, cfg.action_horizon, 2)
    assert samples["video"].shape == nxt.shape


@pytest.mark.parametrize("variant", VARIANTS)
def test_p_inverse_pins_the_future_clean_and_leaves_it_unscored(variant):
    """p_inverse = 1: every sample with actions sees its clean future (t_v = 0, the input is the target) and
    adds nothing to the video loss; an action-free sample is still noised and scored."""
    cfg = toy_config(variant, p_inverse=1.0, video_target="residual", video_prediction="x0", video_context="last_frame")
    model = WorldModel(cfg)
    seen = {}
    velocity = model._velocity

    def spy(cond, t_a, t_v, z_a, z_v, names, last=None):
        seen.update(t_v=t_v, z_v=z_v, last=last)
        return velocity(cond, t_a, t_v, z_a, z_v, names, last)

    model._velocity = spy
    batch = random_batch(cfg, n=4)
    _, metrics = model(batch, generator=torch.Generator().manual_seed(0))
    assert metrics["loss_video"] == 0.0 and metrics["loss_action"] > 0
    assert (seen["t_v"] == 0).all()
    residual = model._video_data(batch["frames"][:, cfg.future_indices()]) - seen["last"]
    torch.testing.assert_close(seen["z_v"], residual)
    batch["action_mask"] = torch.tensor([True, False, True, True])
    batch["embodiment"] = ["toy", "video", "toy", "toy"]
    _, metrics = model(batch, generator=torch.Generator().manual_seed(0))
    assert seen["t_v"][1] > 0 and (seen["t_v"][[0, 2, 3]] == 0).all()
    assert metrics["loss_video"] > 0
    with pytest.raises(ValueError, match="probabilities"):
        toy_config(p_inverse=1.5)


def test_without_state_the_model_reads_no_state():
    spec = embodiment_spec(
        {"action": {"mean": [0.0, 0.0], "std": [0.5, 0.5]}, "state": {"mean": [0.0] * 3, "std": [1.0] * 3}}
    )
    with_state = WorldModel(toy_config(embodiments={"toy": spec}))
    without = WorldModel(toy_config(embodiments={"toy": spec}, use_state=False))
    assert with_state.adapters["toy"].state_in is not None and with_state.config.embodiments["toy"]["state_dim"] == 3
    assert without.adapters["toy"].state_in is None and without.config.embodiments["toy"]["state_dim"] == 0
    obs = torch.randint(0, 256, (2, 1, 3, 16, 16), dtype=torch.uint8)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    s1, s2 = torch.randn(2, 1, 3), torch.randn(2, 1, 3)
    with torch.no_grad():  # DiT's zero-initialised modulation and heads ignore the condition: perturb all
        for model in (with_state, without):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    assert not torch.allclose(
        with_state.sample_policy(obs, "toy", state=s1, generator=g()),
        with_state.sample_policy(obs, "toy", state=s2, generator=g()),
    )
    torch.testing.assert_close(
        without.sample_policy(obs, "toy", state=s1, generator=g()),
        without.sample_policy(obs, "toy", state=s2, generator=g()),
    )  # given anyway, not read


def train(model: WorldModel, data: dict, steps: int, batch_size: int = 16, lr: float = 2e-3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    n = data["frames"].shape[0]
    for _ in range(steps):
        loss, _ = model(subset(data, torch.randint(0, n, (batch_size,), generator=g)))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_the_video_prediction_uses_the_actions():
    """Where the future depends only on the action, forward dynamics (actions clean) must beat video
    prediction (actions at full noise), and inverse dynamics must recover the actions from the frames."""
    torch.manual_seed(0)
    model = WorldModel(toy_config())
    train(model, action_dependent_batch(256, seed=0), steps=300, batch_size=32)
    model.eval()
    test = action_dependent_batch(32, seed=1)
    obs, future, actions = test["frames"][:, :1], test["frames"][:, 4:5], test["action"][:, :4]
    truth = future.float() / 127.5 - 1
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    err_fd = ((model.sample_forward_dynamics(obs, actions, "toy", generator=g()) - truth) ** 2).mean()
    err_video = ((model.sample_video(obs, "toy", generator=g()) - truth) ** 2).mean()
    assert err_fd < 0.5 * err_video, (err_fd, err_video)
    err_idm = ((model.sample_inverse_dynamics(obs, future, "toy", generator=g()) - actions) ** 2).mean()
    err_policy = ((model.sample_policy(obs, "toy", generator=g()) - actions) ** 2).mean()
    assert err_idm < 0.5 * err_policy, (err_idm, err_policy)


@pytest.mark.parametrize("target,scale", [("residual", 4.0), ("residual", 8.0), ("frames", 4.0)])
def test_video_target_and_scale_set_where_sampling_starts(target, scale):
    """With a zero velocity the sampler returns its starting noise: divided by video_scale, around the
    last observed frame (residual target) or around grey (frames target)."""
    cfg = toy_config(video_target=target, video_scale=scale)
    model = WorldModel(cfg).eval()
    model._velocity = lambda cond, t_a, t_v, z_a, z_v, names, last=None: (torch.zeros_like(z_a), torch.zeros_like(z_v))
    batch = random_batch(cfg, n=64, seed=1)
    obs = batch["frames"][:, :1]
    actions = batch["action"][:, :4]
    pred = model.sample_forward_dynamics(obs, actions, "toy", generator=torch.Generator().manual_seed(0))
    last = obs.float() / 127.5 - 1
    centre = last if target == "residual" else torch.zeros_like(last)
    noise = pred - centre  # clamped to [-1, 1] at the output: compare where the centre is mid-range
    inside = (centre.abs() < 0.2).expand_as(noise)
    assert abs(noise[inside].mean().item()) < 0.03
    assert noise[inside].std().item() == pytest.approx(1 / scale, rel=0.15)


@pytest.mark.parametrize("variant", VARIANTS)
def test_x0_prediction_of_zero_residual_returns_the_last_frame_exactly(variant):
    """video_prediction="x0": a head that outputs zero predicts 'nothing moves', and the sampler lands
    exactly on the last observed frame (velocity prediction would have to reproduce the noise)."""
    cfg = toy_config(variant, video_target="residual", video_prediction="x0")
    model = WorldModel(cfg).eval()
    for p in model.net.final_video.parameters():
        torch.nn.init.zeros_(p)
    batch = random_batch(cfg, n=4, seed=2)
    obs = batch["frames"][:, :1]
    pred = model.sample_forward_dynamics(obs, batch["action"][:, :4], "toy", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pred, (obs.float() / 127.5 - 1).expand_as(pred), atol=1e-5, rtol=0)
    loss, metrics = model(batch)  # the video loss is the error of the clean target: finite and bounded
    assert 0 < metrics["loss_video"] < 10 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="video_prediction"):
        toy_config(video_prediction="eps")


@pytest.mark.parametrize("variant", VARIANTS)
def test_x0_action_head_samples_its_output_and_learns(variant):
    """action_prediction="x0": the head's output is the clean chunk, so a head that outputs zero samples
    exactly the action mean whatever the noise; and the model still overfits a batch's actions."""
    cfg = toy_config(variant, action_prediction="x0", p_marginal=0.0)
    model = WorldModel(cfg).eval()  # action_out starts at zero
    batch = random_batch(cfg, n=4, seed=4)
    obs = batch["frames"][:, :1]
    got = model.sample_policy(obs, "toy", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, torch.zeros_like(got), atol=1e-5, rtol=0)  # the toy embodiment's mean is 0
    torch.manual_seed(0)
    model = WorldModel(cfg)
    history = fit_one_batch(model, random_batch(cfg, n=8), 80)
    assert history[-1]["loss_action"] < history[0]["loss_action"] / 10
    with pytest.raises(ValueError, match="action_prediction"):
        toy_config(action_prediction="eps")


@pytest.mark.parametrize("variant", VARIANTS)
def test_frame_context_shows_the_last_frame_to_the_video_tokens(variant):
    """video_context="last_frame": with the pooled condition vector blind to the frames (obs_proj zeroed) and
    the future denoised as frames (no residual added back), the prediction still depends on the last frame;
    without the context it cannot."""
    preds = {}
    for context in ("none", "last_frame"):
        torch.manual_seed(0)
        model = WorldModel(toy_config(variant, video_context=context)).eval()
        for p in model.obs_proj.parameters():
            torch.nn.init.zeros_(p)
        for p in [*model.net.final_video.parameters(), *model.tokenizer.out.parameters()]:  # zero-initialised heads
            torch.nn.init.normal_(p, std=0.1)
        obs = torch.stack([torch.zeros(1, 3, 16, 16), torch.full((1, 3, 16, 16), 255.0)]).to(torch.uint8)
        act = torch.zeros(2, 4, 2)
        out = [
            model.sample_forward_dynamics(obs[i : i + 1], act[:1], "toy", generator=torch.Generator().manual_seed(1))
            for i in range(2)
        ]
        preds[context] = (out[0] - out[1]).abs().max().item()
    assert preds["none"] < 1e-6
    assert preds["last_frame"] > 1e-3
    with pytest.raises(ValueError, match="video_context"):
        toy_config(video_context="all_frames")


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_load_give_identical_samples(variant, tmp_path):
    cfg = toy_config(variant, tasks=["push", "reach"])
    model = WorldModel(cfg)
    train(model, random_batch(cfg, n=4), steps=3, batch_size=4, lr=1e-2)  # move the zero-initialised heads
    model.eval()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors"}
    loaded = WorldModel.from_pretrained(tmp_path, strict=True).eval()
    assert loaded.config == model.config
    obs = random_batch(cfg, n=2, seed=5)["frames"][:, :1]
    a1, v1 = model.sample_joint(obs, "toy", task=["push", "reach"], generator=torch.Generator().manual_seed(3))
    a2, v2 = loaded.sample_joint(obs, "toy", task=["push", "reach"], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and torch.equal(v1, v2)
    a3, _ = (
        WorldModel(cfg)
        .eval()
        .sample_joint(obs, "toy", task=["push", "reach"], generator=torch.Generator().manual_seed(3))
    )
    assert not torch.equal(a1, a3)  # the comparison can fail: other weights give other samples


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_folder_saved_before_the_network_split_loads(variant, tmp_path):
    """Format 1 kept the transformer's parameters on the model itself (``blocks.0...``, ``null_action``);
    format 2 has them under ``net.``. An old folder loads strictly (from_pretrained, a plain
    load_state_dict, --init's copy-what-fits) into the same weights and the same samples."""
    from safetensors.torch import save_file

    from wm_pipeline.training.checkpoint import load_init_weights

    cfg = toy_config(variant, video_context="last_frame", video_target="residual")
    torch.manual_seed(0)
    model = WorldModel(cfg).eval()
    with torch.no_grad():  # non-zero heads, so a key that failed to load would show in the samples
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    old = {k.removeprefix("net."): v.contiguous() for k, v in model.state_dict().items()}
    assert {
        "null_action",
        "register_tokens",
        "context_embed.weight",
        "blocks.1.stream.adaln.weight" if variant == "uwm" else "blocks.1.video.adaln.weight",
        "final_video.adaln.weight",
    } <= set(old)
    model.save_pretrained(tmp_path / "final")
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["_format_version"] == WorldModel.FORMAT_VERSION == 2
    (tmp_path / "final" / "config.json").write_text(json.dumps({**config, "_format_version": 1}))
    save_file(old, str(tmp_path / "final" / "model.safetensors"))

    obs = random_batch(cfg, n=2, seed=5)["frames"][:, :1]

    def joint(m):
        return m.sample_joint(obs, "toy", generator=torch.Generator().manual_seed(3))

    want = joint(model)
    loaded = WorldModel.from_pretrained(tmp_path / "final", strict=True).eval()
    plain = WorldModel(cfg).eval()
    plain.load_state_dict(old, strict=True)
    torch.manual_seed(123)
    warm = WorldModel(cfg).eval()
    load_init_weights(warm, tmp_path)
    for m in (loaded, plain, warm):
        for key, value in model.state_dict().items():
            assert torch.equal(m.state_dict()[key], value), key
        assert all(torch.equal(a, b) for a, b in zip(joint(m), want))


def test_task_conditioning_with_a_local_text_encoder(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "push", "the", "red", "block", "open", "door"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    text_dir = tmp_path / "text"
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(text_dir)
    BertModel(
        BertConfig(
            vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(text_dir)
    cfg = toy_config(text_encoder_path=str(text_dir))
    model = WorldModel(cfg)
    assert not any(k.startswith("_frozen") or "text_model" in k for k in model.state_dict())
    obs = random_batch(cfg, n=1)["frames"][:, :1].repeat(2, 1, 1, 1, 1)
    c = model._condition(obs, ["toy"] * 2, None, None, ["push the red block", "open the door"])
    assert not torch.allclose(c[0], c[1])  # same frames, different instructions
    loss, _ = model(random_batch(cfg))
    assert torch.isfinite(loss)


def test_presets_build_and_report_their_token_counts():
    for name, cfg in PRESETS.items():
        if name == "base":
            continue  # 137 M parameters: built by benchmarks/world_model.py, not in the unit tests
        model = WorldModel(cfg)
        per_frame = (cfg.image_size // cfg.patch_size) ** 2
        assert model.num_tokens == cfg.action_horizon + cfg.n_future * per_frame + cfg.registers
