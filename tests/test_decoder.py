"""nets.normalize and decoders.decoder: exact normalisation round trips, the ActionDecoder
learning a tiny batch of contract-shaped windows (both objectives), checkpoints that reproduce
actions, masking of action-free samples, latent conditioning, and clear errors for bad input."""

import json

import numpy as np
import pytest
import torch

from decoders.decoder import PRESETS, ActionDecoder, DecoderConfig
from nets.normalize import MODES, Normalizer, stats_of

B, A, S, N_OBS, H, PX = 8, 4, 39, 2, 4, 32
T = N_OBS - 1 + H
TASKS = ["reach-v3", "push-v3"]


# ----------------------------------------------------------------------------- normalisation


def _raw_with_degenerate_dims(n=500):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g) * torch.tensor([1.0, 30.0, 0.01, 1.0, 1.0])
    x[:, 3] = 7.0  # zero range and zero std: a joint that never moves
    x[:, 4] = 0.0
    return x.float()


@pytest.mark.parametrize("mode", MODES)
def test_normalize_round_trip_is_exact_and_safe_on_constant_dims(mode):
    x = _raw_with_degenerate_dims()
    raw = torch.cat([x[:250], x[250:] * 2 + 1])  # two robots, different ranges
    stats = {"robot_a": {"action": stats_of(raw[:250])}, "robot_b": {"action": stats_of(raw[250:])}}
    norm = Normalizer(stats, ["robot_a", "robot_b"], "action", 5, mode)
    index = torch.tensor([0, 1]).repeat_interleave(250)
    n = norm.normalize(raw, index)
    assert torch.isfinite(n).all()
    torch.testing.assert_close(norm.unnormalize(n, index), raw, atol=1e-5, rtol=1e-5)
    # Constant dims map to 0 (their center) and do not blow up values that differ from the constant.
    assert n[:, 3].abs().max() < 1e-5 and n[:, 4].abs().max() < 1e-5
    off = raw.clone()
    off[:, 3] += 0.5
    assert norm.normalize(off, index)[:, 3].abs().max() < 1.0
    if mode == "min_max":
        assert n.min() >= -1 - 1e-5 and n.max() <= 1 + 1e-5
        assert (n.amax(0)[:3] > 0.99).all()
    if mode == "mean_std":
        for rows in (slice(0, 250), slice(250, 500)):
            assert n[rows, :3].mean(0).abs().max() < 1e-4
            assert (n[rows, :3].std(0, unbiased=False) - 1).abs().max() < 1e-3


def test_normalize_works_on_chunks_and_names_bad_stats():
    x = torch.randn(100, 3)
    norm = Normalizer({"r": {"action": stats_of(x)}}, ["r"], "action", 3)
    chunk = torch.randn(2, 7, 3)
    index = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(norm.unnormalize(norm.normalize(chunk, index), index), chunk)
    with pytest.raises(ValueError, match=r"stats\['r'\]\['action'\].*4"):
        Normalizer({"r": {"action": stats_of(x)}}, ["r"], "action", 4)
    with pytest.raises(ValueError, match=r"stats\['r'\]\['state'\]: missing"):
        Normalizer({"r": {"action": stats_of(x)}}, ["r"], "state", 3)
    with pytest.raises(ValueError, match="needs stats"):
        Normalizer({"r": {"action": {"mean": [0.0] * 3}}}, ["r"], "action", 3, "mean_std")


# ----------------------------------------------------------------------------- the decoder


def make_batch(seed=0, b=B, t=T):
    """A contract-shaped window batch: per-sample smooth action trajectories in raw units far from
    [-1, 1] (so normalisation matters), distinct frames, 39-d states, two tasks."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.arange(t, dtype=torch.float32)
    phase = torch.rand(b, 1, A, generator=g) * 6.28
    action = 5.0 + 3.0 * torch.sin(0.4 * steps[None, :, None] + phase)
    return {
        "frames": torch.randint(0, 256, (b, t, 3, PX, PX), dtype=torch.uint8, generator=g),
        "action": action,
        "action_mask": torch.ones(b, dtype=torch.bool),
        "state": torch.randn(b, t, S, generator=g) * 4 + 2,
        "state_mask": torch.ones(b, dtype=torch.bool),
        "embodiment": ["sawyer"] * b,
        "task": [TASKS[i % 2] for i in range(b)],
        "key": [f"ep{i}" for i in range(b)],
        "start": torch.zeros(b, dtype=torch.long),
    }


def make_config(batch, **overrides):
    # numpy arrays, as shards.stats.embodiment_stats returns them: the model stores plain lists
    stats = {
        "sawyer": {
            key: {k: np.asarray(v, np.float32) for k, v in stats_of(batch[key].flatten(0, 1)).items()}
            for key in ("action", "state")
        }
    }
    fields = dict(
        action_dim=A,
        state_dim=S,
        image_size=[PX, PX],
        tasks=TASKS,
        stats=stats,
        n_obs_steps=N_OBS,
        horizon=H,
        encoder_channels=[8, 16, 32],
        obs_dim=32,
    )
    fields.update(overrides)
    return DecoderConfig.from_preset("tiny", **fields)


def train(model, batch, steps, lr):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        loss, metrics = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(metrics)
    return history


def wake_zero_layers(model):
    """Give the zero-initialised layers (AdaLN-Zero, the output) random weights: at init they hide the
    condition from the output and stop every gradient into the encoder."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model


def mean_of(history, key, rows):
    """The mean of ``key`` over ``rows`` (a slice) of a training history."""
    return sum(m[key] for m in history[rows]) / len(history[rows])


def predict(model, batch, seed=1, **kw):
    return model.predict_action_chunk(
        batch["frames"][:, :N_OBS],
        batch["state"][:, N_OBS - 1],
        batch["task"],
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


def test_presets_and_config_validation():
    assert set(PRESETS) == {"tiny", "small", "base"}
    assert PRESETS["tiny"].width < PRESETS["small"].width < PRESETS["base"].width
    cfg = DecoderConfig.from_preset("small", horizon=8, n_obs_steps=2)
    assert cfg.window_length == 9 and PRESETS["small"].horizon == 16  # presets are not mutated
    with pytest.raises(ValueError, match="action_dim"):
        ActionDecoder(DecoderConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="unknown decoder preset"):
        DecoderConfig.from_preset("huge")


def test_flow_matching_decoder_overfits_and_checkpoint_reproduces_actions(tmp_path):
    torch.manual_seed(0)
    batch = make_batch()
    model = ActionDecoder(make_config(batch, objective="fm"))
    history = train(model, batch, steps=250, lr=3e-3)
    first = sum(m["mse"] for m in history[:20]) / 20
    last = sum(m["mse"] for m in history[-20:]) / 20
    assert last < 0.35 * first, (first, last)

    target = batch["action"][:, N_OBS - 1 : N_OBS - 1 + H]
    chunk = predict(model, batch)
    assert chunk.shape == (B, H, A) and chunk.dtype == torch.float32
    # Raw units: the memorised chunk beats the best constant guess (the per-dim mean) by far.
    err = (chunk - target).abs().mean()
    baseline = (target - target.mean((0, 1))).abs().mean()
    assert err < 0.5 * baseline, (err, baseline)
    # Only the last n_obs_steps frames count as the observation.
    longer = torch.cat([batch["frames"][:, :1], batch["frames"][:, :N_OBS]], 1)
    same = model.predict_action_chunk(
        longer, batch["state"][:, N_OBS - 1], batch["task"], generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(same, chunk)

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert isinstance(model.config.stats["sawyer"]["action"]["max"], list)
    assert saved["stats"]["sawyer"]["action"]["max"] == model.config.stats["sawyer"]["action"]["max"]
    assert saved["tasks"] == TASKS and saved["objective"] == "fm"
    loaded = ActionDecoder.from_pretrained(tmp_path)
    assert isinstance(loaded.config, DecoderConfig)
    torch.testing.assert_close(predict(loaded, batch), chunk, atol=0, rtol=0)
    assert not torch.equal(predict(loaded, batch, seed=2), chunk)  # the generator really drives the noise


def test_meanflow_decoder_learns_and_trains_the_image_encoder():
    torch.manual_seed(0)
    batch = make_batch()
    model = ActionDecoder(make_config(batch, objective="meanflow", dispersive_weight=0.5))
    history = train(model, batch, steps=150, lr=1e-3)
    first = sum(m["mse"] for m in history[:15]) / 15
    last = sum(m["mse"] for m in history[-15:]) / 15
    assert last < 0.5 * first, (first, last)
    assert "dispersive" in history[-1] and history[-1]["dispersive"] < 0
    # The condition is computed outside the JVP; its gradient must still reach the encoder.
    loss, _ = model(batch)
    model.zero_grad()
    loss.backward()
    assert model.image_encoder.proj.weight.grad.abs().sum() > 0
    target = batch["action"][:, N_OBS - 1 : N_OBS - 1 + H]
    err = (predict(model, batch, n_steps=1) - target).abs().mean()
    assert err < (target - target.mean((0, 1))).abs().mean()


def test_spatial_softmax_encoder_learns_and_round_trips(tmp_path):
    torch.manual_seed(0)
    batch = make_batch()
    model = ActionDecoder(make_config(batch, objective="fm", encoder_pool="spatial_softmax", keypoints=8))
    assert model.image_encoder.proj.in_features == 16  # 8 keypoints x (x, y)
    history = train(model, batch, steps=150, lr=1e-3)
    first = sum(m["mse"] for m in history[:15]) / 15
    last = sum(m["mse"] for m in history[-15:]) / 15
    assert last < 0.5 * first, (first, last)
    assert model.image_encoder.pool.heat.weight.grad.abs().sum() > 0
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = ActionDecoder.from_pretrained(tmp_path)
    assert loaded.config.encoder_pool == "spatial_softmax"
    torch.testing.assert_close(predict(loaded, batch), predict(model, batch), atol=0, rtol=0)
    with pytest.raises(ValueError, match="encoder_pool"):
        ActionDecoder(make_config(batch, encoder_pool="max"))


def test_action_free_samples_do_not_touch_the_loss():
    torch.manual_seed(0)
    batch = make_batch()
    model = ActionDecoder(make_config(batch))
    train(model, batch, steps=3, lr=1e-3)  # leave the zero-initialised output layer
    batch["action_mask"][4:] = False
    torch.manual_seed(5)
    loss_a, metrics = model(batch)
    garbage = dict(batch, action=batch["action"].clone(), embodiment=["sawyer"] * 4 + ["video"] * 4)
    garbage["action"][4:] = 1e6
    torch.manual_seed(5)
    loss_b, _ = model(garbage)
    assert metrics["action_samples"] == 4
    torch.testing.assert_close(loss_a, loss_b)
    none = dict(batch, action_mask=torch.zeros(B, dtype=torch.bool))
    loss, _ = model(none)
    loss.backward()
    assert loss.item() == 0.0


def test_latent_action_chunk_conditions_the_decoder():
    torch.manual_seed(0)
    batch = make_batch()
    batch["lam.latent"] = torch.randn(B, T, 6)
    model = ActionDecoder(make_config(batch, latent_dim=6, latent_key="lam.latent"))
    train(model, batch, steps=20, lr=3e-3)
    obs, state = batch["frames"][:, :N_OBS], batch["state"][:, N_OBS - 1]
    latent = batch["lam.latent"][:, N_OBS - 1 : N_OBS - 1 + H]
    a = model.predict_action_chunk(obs, state, batch["task"], latent=latent, generator=torch.Generator().manual_seed(0))
    b = model.predict_action_chunk(
        obs, state, batch["task"], latent=-latent, generator=torch.Generator().manual_seed(0)
    )
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="latent-action chunk"):
        model.predict_action_chunk(obs, state, batch["task"])
    with pytest.raises(ValueError, match="lam.latent"):
        model({k: v for k, v in batch.items() if k != "lam.latent"})


def test_bad_input_gets_clear_errors():
    batch = make_batch()
    model = ActionDecoder(make_config(batch))
    with pytest.raises(ValueError, match=f"set the stream's window to {T}"):
        model(make_batch(t=T - 1))
    with pytest.raises(ValueError, match="'ur5' has no normalisation stats"):
        model(dict(batch, embodiment=["ur5"] * B))
    with pytest.raises(ValueError, match="image_size"):
        model(dict(batch, frames=batch["frames"][..., :16, :16]))
    with pytest.raises(ValueError, match="action_dim=4"):
        model(dict(batch, action=batch["action"][..., :3]))
    with pytest.raises(ValueError, match="n_obs_steps=2"):
        model.predict_action_chunk(batch["frames"][:, :1], batch["state"][:, 0], batch["task"])
