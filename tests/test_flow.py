"""nets.flow: time samplers, the MeanFlow identity, samplers, dispersive loss, and learning a
two-mode toy distribution (the failure every regression-to-the-mean decoder shows)."""

import pytest
import torch
from torch import nn

from nets.flow import (
    dispersive_loss,
    flow_matching_loss,
    meanflow_loss,
    meanflow_target,
    sample_flow_matching,
    sample_flow_time,
    sample_meanflow,
    sample_meanflow_times,
)

# ----------------------------------------------------------------------------- time sampling


def test_flow_time_is_beta_1p5_1_and_reproducible():
    t = sample_flow_time(200_000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0.001 and t.max() <= 1.0
    # Beta(1.5, 1): mean 0.6, P(t < 0.5) = 0.5 ** 1.5; then scaled by 0.999 and shifted by 0.001.
    assert abs(t.mean().item() - (0.6 * 0.999 + 0.001)) < 0.005
    assert abs((t < 0.5).float().mean().item() - ((0.5 - 0.001) / 0.999) ** 1.5) < 0.005
    again = sample_flow_time(200_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_meanflow_times_are_sorted_with_a_share_of_equal_pairs():
    t, r = sample_meanflow_times(100_000, equal_fraction=0.5, generator=torch.Generator().manual_seed(0))
    assert (t >= r).all() and (r > 0).all() and (t < 1).all()
    assert abs((t == r).float().mean().item() - 0.5) < 0.01
    t, r = sample_meanflow_times(10_000, equal_fraction=0.0, generator=torch.Generator().manual_seed(0))
    assert (t > r).float().mean() > 0.99
    # sigmoid(N(-0.4, 1)) sits below 0.5 on average; the larger of two draws is t.
    assert t.mean() > r.mean() + 0.1


# ----------------------------------------------------------------------------- the MeanFlow identity


def _gaussian_sigma(t, s):
    """Std of z_t = (1-t) a + t e for a ~ N(0, s^2), e ~ N(0, 1)."""
    return ((1 - t) ** 2 * s**2 + t**2).sqrt()


def test_meanflow_target_equals_exact_average_velocity_on_a_gaussian():
    """For Gaussian data the ODE scales z linearly, so the exact average velocity is known:
    u(z, r, t) = z (1 - sigma(r)/sigma(t)) / (t - r). Feeding the marginal velocity as the tangent,
    the identity's target must reproduce u: this pins the JVP tangents and the sign convention."""
    s = 0.3

    def u_exact(z, t, r, cond=None):
        ratio = _gaussian_sigma(r, s) / _gaussian_sigma(t, s)
        return z * ((1 - ratio) / (t - r))[:, None]

    def v_marginal(z, t):
        sig = _gaussian_sigma(t, s)
        dsig = ((1 - t) * -(s**2) + t) / sig
        return z * (dsig / sig)[:, None]

    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 3, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.8 + 0.2
    r = t * torch.rand(64, generator=g, dtype=torch.float64) * 0.9
    v = v_marginal(z, t)
    u, u_tgt, feats = meanflow_target(u_exact, z, t, r, v)
    assert feats is None
    torch.testing.assert_close(u_tgt, u, atol=1e-8, rtol=1e-6)
    # The same check with the time tangent flipped (a sign slip) is far off.
    with torch.enable_grad():
        _, dudt_wrong = torch.func.jvp(lambda z_, t_: u_exact(z_, t_, r), (z, t), (v, -torch.ones_like(t)))
    wrong = v - (t - r)[:, None] * dudt_wrong
    assert (wrong - u).abs().max() > 1e-2


def test_samplers_integrate_from_noise_to_data():
    """A point mass at a0 has the exact velocity v = (z - a0) / t; it is also its own average
    velocity, and Euler steps along it are exact: every step count must land on a0."""
    a0 = torch.tensor([[1.5, -0.5]])

    def net(z, t, r, cond=None):
        return (z - a0) / t[:, None]

    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    for n in (1, 3, 10):
        torch.testing.assert_close(sample_flow_matching(net, noise, n_steps=n), a0.expand(16, 2))
        torch.testing.assert_close(sample_meanflow(net, noise, n_steps=n), a0.expand(16, 2))
    with pytest.raises(ValueError, match="n_steps"):
        sample_flow_matching(net, noise, n_steps=0)


# ----------------------------------------------------------------------------- dispersive loss


def test_dispersive_loss_is_zero_when_collapsed_and_rewards_spread():
    g = torch.Generator().manual_seed(0)
    collapsed = torch.ones(16, 8)
    spread = torch.randn(16, 8, generator=g)
    assert abs(dispersive_loss(collapsed).item()) < 1e-6
    assert dispersive_loss(spread).item() < -0.1
    # Scale-invariant: blowing features up is not rewarded.
    torch.testing.assert_close(dispersive_loss(spread * 10), dispersive_loss(spread))
    # Gradient descent on it spreads a nearly collapsed cloud.
    h = (torch.randn(16, 8, generator=g) * 0.01 + 1.0).requires_grad_()
    opt = torch.optim.SGD([h], lr=0.01)
    start = dispersive_loss(h).item()
    for _ in range(50):
        opt.zero_grad()
        dispersive_loss(h).backward()
        opt.step()
    assert dispersive_loss(h).item() < start - 0.05


# ----------------------------------------------------------------------------- learning a two-mode toy


class ToyNet(nn.Module):
    """net(z [B, 2], t, r) -> (velocity [B, 2], features [B, 64])."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(6, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.head = nn.Linear(hidden, 2)

    def forward(self, z, t, r, cond=None):
        x = torch.cat([z, t[:, None], (t - r)[:, None], torch.sin(3 * t)[:, None], torch.cos(3 * t)[:, None]], 1)
        h = self.body(x)
        return self.head(h), h


def two_modes(n, g):
    """Mixture of N((-2, 0), 0.1^2) and N((2, 0), 0.1^2) with equal weights."""
    side = torch.randint(0, 2, (n,), generator=g) * 4.0 - 2.0
    return torch.stack([side, torch.zeros(n)], 1) + 0.1 * torch.randn(n, 2, generator=g)


def mode_summary(x):
    left, right = x[:, 0] < -1, x[:, 0] > 1
    return {
        "left": left.float().mean().item(),
        "right": right.float().mean().item(),
        "middle": 1 - (left | right).float().mean().item(),
        "left_mean": x[left].mean(0),
        "right_mean": x[right].mean(0),
    }


def train_toy(objective, steps, seed=0, **kw):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = ToyNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        a = two_modes(256, g)
        out = objective(net, a, generator=g, **kw)
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
        losses.append(out.mse.mean().item())
    return net, losses


def assert_two_balanced_modes(s, max_middle):
    assert s["middle"] < max_middle, s
    assert 0.35 < s["left"] < 0.65 and 0.35 < s["right"] < 0.65, s
    assert (s["left_mean"] - torch.tensor([-2.0, 0.0])).abs().max() < 0.3, s
    assert (s["right_mean"] - torch.tensor([2.0, 0.0])).abs().max() < 0.3, s


def test_flow_matching_learns_two_modes_without_averaging():
    net, losses = train_toy(flow_matching_loss, steps=800)
    assert sum(losses[-50:]) < 0.8 * sum(losses[:50])
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    assert_two_balanced_modes(mode_summary(sample_flow_matching(net, noise, n_steps=10)), max_middle=0.05)
    # One Euler step from t = 1 sees z = e, independent of the data: it can only return the mean,
    # i.e. the gap between the modes. This is what MeanFlow's one step must avoid.
    assert mode_summary(sample_flow_matching(net, noise, n_steps=1))["middle"] > 0.5


def test_meanflow_one_step_matches_its_multi_step_samples():
    net, _ = train_toy(meanflow_loss, steps=1000)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    one = mode_summary(sample_meanflow(net, noise, n_steps=1))
    four = mode_summary(sample_meanflow(net, noise, n_steps=4))
    assert_two_balanced_modes(one, max_middle=0.15)
    assert_two_balanced_modes(four, max_middle=0.05)
    assert abs(one["left"] - four["left"]) < 0.1 and abs(one["right"] - four["right"]) < 0.1
    assert (one["left_mean"] - four["left_mean"]).abs().max() < 0.25
    assert (one["right_mean"] - four["right_mean"]).abs().max() < 0.25


def test_meanflow_loss_weights_and_passes_features():
    net = ToyNet()
    a = two_modes(32, torch.Generator().manual_seed(0))
    out = meanflow_loss(net, a, generator=torch.Generator().manual_seed(0), adaptive_power=0.5)
    assert out.features.shape == (32, 128) and out.loss.shape == (32,)
    # With p = 0.5 the weighted loss is ~ the error norm: sq / sqrt(sq + eps).
    sq = out.mse * 2  # mse is the mean over 2 dims; the weight uses the sum
    torch.testing.assert_close(out.loss, sq / (sq + 1e-3).sqrt(), rtol=1e-4, atol=1e-6)
    out.loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_interpolate_and_uniform_time_are_the_world_models_draws():
    from nets.flow import interpolate, sample_uniform_time

    x, e = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    z = interpolate(x, e, t)
    assert torch.equal(z[0], x[0]) and torch.equal(z[3], e[3])
    torch.testing.assert_close(z[1], 0.75 * x[1] + 0.25 * e[1])
    g = torch.Generator().manual_seed(0)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    drawn = sample_uniform_time(1000, p_noise=0.3, generator=g)
    pinned = drawn != u
    assert torch.all(drawn[pinned] == 1.0) and 0.2 < pinned.float().mean() < 0.4
    assert torch.equal(
        sample_uniform_time(8, generator=torch.Generator().manual_seed(1)),
        torch.rand(8, generator=torch.Generator().manual_seed(1)),
    )
