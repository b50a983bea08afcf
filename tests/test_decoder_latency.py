"""The decoder's inference path (issue 18, item 4): the fast path gives the same chunks as the plain
computation, and the samplers still integrate the ODE they are meant to."""

import pytest
import torch

from decoders.decoder import ActionDecoder, DecoderConfig
from nets.flow import sample_flow_matching, sample_meanflow
from nets.normalize import stats_of

TASK = "reach-v3"


def _decoder(objective: str) -> ActionDecoder:
    g = torch.Generator().manual_seed(0)
    stats = {
        "sawyer": {
            "action": stats_of(torch.rand(50, 4, generator=g) * 2 - 1),
            "state": stats_of(torch.randn(50, 6, generator=g)),
        }
    }
    cfg = DecoderConfig.from_preset(
        "tiny", action_dim=4, state_dim=6, image_size=[32, 32], tasks=[TASK], stats=stats, objective=objective
    )
    torch.manual_seed(0)
    model = ActionDecoder(cfg).eval()
    with torch.no_grad():  # the output layers start at zero: make the velocity depend on its inputs
        for p in model.velocity.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _reference_chunk(model: ActionDecoder, frames, state, task, seed: int, n_steps: int) -> torch.Tensor:
    """The chunk computed step by step the plain way: condition, noise, one Euler / MeanFlow jump per
    step with the times and step sizes taken from the grid at each step, unnormalise."""
    cfg = model.config
    with torch.no_grad():
        emb = model._embodiment_index(None, frames.shape[0])
        cond = model.encode_condition(frames[:, -cfg.n_obs_steps :], state, task, None, emb)
        z = torch.randn((frames.shape[0], cfg.horizon, cfg.action_dim), generator=torch.Generator().manual_seed(seed))
        ts = torch.linspace(1.0, 0.0, n_steps + 1)
        for i in range(n_steps):
            t = ts[i].expand(z.shape[0])
            r = t if cfg.objective == "fm" else ts[i + 1].expand(z.shape[0])
            v, _ = model.velocity(z, t, r, cond)
            z = z - (ts[i] - ts[i + 1]) * v
        return model.action_normalizer.unnormalize(z, emb).float()


@pytest.mark.parametrize("objective", ["fm", "meanflow"])
def test_predict_action_chunk_equals_the_plain_computation(objective):
    model = _decoder(objective)
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (3, 3, 3, 32, 32), dtype=torch.uint8, generator=g)
    state = torch.randn(3, 6, generator=g)
    tasks = [TASK, "unknown-task", TASK]
    for n_steps in (1, 2, 10):
        got = model.predict_action_chunk(
            frames, state, tasks, generator=torch.Generator().manual_seed(7), n_steps=n_steps
        )
        want = _reference_chunk(model, frames, state, tasks, 7, n_steps)
        assert torch.equal(got, want), (objective, n_steps, (got - want).abs().max().item())
    # a different seed gives a different chunk (the comparison above can fail)
    other = model.predict_action_chunk(frames, state, tasks, generator=torch.Generator().manual_seed(8), n_steps=1)
    assert not torch.allclose(other, want)


def test_given_noise_is_the_noise_the_generator_would_draw():
    """``noise=`` (the batched policy path: one row per episode, each from its own generator) gives the
    chunk that drawing the same noise from ``generator`` gives; a wrong shape is a one-line error."""
    model = _decoder("fm")
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (2, 2, 3, 32, 32), dtype=torch.uint8, generator=g)
    state = torch.randn(2, 6, generator=g)
    cfg = model.config
    noise = torch.randn((2, cfg.horizon, cfg.action_dim), generator=torch.Generator().manual_seed(7))
    got = model.predict_action_chunk(frames, state, TASK, noise=noise, n_steps=2)
    want = model.predict_action_chunk(frames, state, TASK, generator=torch.Generator().manual_seed(7), n_steps=2)
    assert torch.equal(got, want)
    assert not torch.allclose(got, model.predict_action_chunk(frames, state, TASK, noise=noise * 0, n_steps=2))
    with pytest.raises(
        ValueError, match=rf"noise is \[1, {cfg.horizon}, 4\], the decoder needs \[2, {cfg.horizon}, 4\]"
    ):
        model.predict_action_chunk(frames, state, TASK, noise=noise[:1], n_steps=2)


def test_predicted_chunk_is_an_ordinary_tensor():
    """inference_mode inside, but callers get a tensor they can modify in place and use with autograd."""
    model = _decoder("meanflow")
    frames = torch.randint(0, 256, (1, 2, 3, 32, 32), dtype=torch.uint8)
    chunk = model.predict_action_chunk(frames, torch.zeros(1, 6), TASK, generator=torch.Generator().manual_seed(0))
    assert not chunk.is_inference() and not chunk.requires_grad
    chunk.clamp_(-1, 1)
    w = torch.ones_like(chunk, requires_grad=True)
    (w * chunk).sum().backward()
    assert torch.equal(w.grad, chunk)


@pytest.mark.parametrize("n_steps", [1, 2, 5, 10])
def test_samplers_integrate_a_time_dependent_velocity(n_steps):
    """v(z, t) = t (per sample, times a per-sample scale) is integrated by Euler steps from t = 1 as
    the left Riemann sum ``sum_i dt * t_i = (N + 1) / (2N)``; MeanFlow with the exact average velocity
    ``u(t, r) = (t + r) / 2`` lands on the exact integral 1/2 for any number of steps."""
    scale = torch.tensor([1.0, -2.0, 0.5])[:, None, None]
    noise = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    calls = []

    def fm_net(z, t, r, cond):
        calls.append((t.clone(), r.clone()))
        assert torch.equal(t, r) and t.shape == (3,)
        return cond * t[:, None, None] * torch.ones_like(z)

    def mf_net(z, t, r, cond):
        assert t.shape == r.shape == (3,) and bool((t > r).all())
        return cond * ((t + r) / 2)[:, None, None] * torch.ones_like(z)

    fm = sample_flow_matching(fm_net, noise, scale, n_steps=n_steps)
    torch.testing.assert_close(fm, noise - scale * (n_steps + 1) / (2 * n_steps), rtol=0, atol=1e-6)
    assert [float(t[0]) for t, _ in calls] == pytest.approx([1 - i / n_steps for i in range(n_steps)])
    mf = sample_meanflow(mf_net, noise, scale, n_steps=n_steps)
    torch.testing.assert_close(mf, noise - scale * 0.5, rtol=0, atol=1e-6)
