"""Flow-matching and MeanFlow objectives and samplers, independent of the network.

Convention (pi0 / SmolVLA / MeanFlow): time runs from t = 1 (pure noise ``e``) to t = 0 (data ``a``)::

    z_t = (1 - t) a + t e            v = dz_t/dt = e - a

A velocity network is any callable ``net(z, t, r, cond)``:

- ``z``: noisy sample ``[B, ...]`` (an action chunk ``[B, H, A]``, or ``[B, 2]`` for a toy);
- ``t``, ``r``: times ``[B]``; flow matching passes ``r = t`` (the average velocity over an empty
  interval is the instantaneous one, so one network can serve both objectives);
- ``cond``: whatever the network needs (passed through untouched, never differentiated);
- returns the velocity ``[B, ...]`` shaped like ``z``, or a tuple ``(velocity, features [B, D])``
  where ``features`` are intermediate activations for the optional dispersive loss.

Objectives return a per-sample loss ``[B]`` so the caller can mask samples (action-free clips)
and average as it likes; samplers return the clean sample at t = 0.

- Flow matching: regress ``v`` at ``t ~ Beta(1.5, 1) * 0.999 + 0.001`` (more weight near noise),
  sample with N Euler steps from t = 1 to t = 0.
- MeanFlow: the network predicts the average velocity ``u(z_t, r, t) = 1/(t-r) int_r^t v dtau``,
  so that ``z_r = z_t - (t - r) u``. Differentiating ``(t - r) u = int_r^t v`` in t gives the
  MeanFlow identity ``u = v - (t - r) du/dt`` with ``du/dt = v . d_z u + d_t u`` (the total
  derivative along the path, whose direction of increasing t is ``v``). One ``torch.func.jvp``
  with tangents ``(v, 1 for t, 0 for r)`` gives ``u`` and ``du/dt`` in a single pass.
  One-step sampling: ``a = e - u(e, r=0, t=1)``.
- Dispersive loss (Diffuse and Disperse / MP1): an InfoNCE-style repulsion between the features
  of different samples in a batch, with no positive pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nets.attention import math_attention

VelocityNet = Callable[..., Any]  # net(z, t, r, cond) -> v [B, ...] or (v, features [B, D])


@dataclass
class FlowLoss:
    """What an objective returns.

    loss: per-sample training loss ``[B]`` (already weighted; average it over kept samples);
    mse: per-sample plain mean squared error of the prediction ``[B]`` (for logging);
    features: the network's intermediate features ``[B, D]`` or None.
    """

    loss: torch.Tensor
    mse: torch.Tensor
    features: torch.Tensor | None


def _split(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A network output -> (velocity, features or None)."""
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...] -> [B]`` mean over everything but the batch axis."""
    return x.flatten(1).mean(1)


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B] -> [B, 1, ..., 1]`` so a time broadcasts over a sample."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def interpolate(x: torch.Tensor, e: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The point on the straight path at time ``t [B]``: ``z_t = (1 - t) x + t e`` (``x`` data, ``e`` noise)."""
    tb = _bcast(t, x)
    return (1 - tb) * x + tb * e


# ----------------------------------------------------------------------------- time sampling


def sample_uniform_time(
    batch: int, *, p_noise: float = 0.0, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``t ~ U(0, 1)`` as ``[B]``, each pinned to 1 (pure noise) with probability ``p_noise``: UWM's draw,
    which trains the marginal modes (a modality at full noise) exactly."""
    u = torch.rand(batch, device=device, generator=generator)
    pin = torch.rand(batch, device=device, generator=generator) < p_noise
    return torch.where(pin, torch.ones_like(u), u)


def sample_flow_time(batch: int, *, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``t ~ Beta(1.5, 1) * 0.999 + 0.001`` as ``[B]``.

    Beta(a, 1) has CDF ``t**a``, so ``u**(1/a)`` with ``u ~ U(0, 1)`` samples it exactly and
    honours ``generator`` (torch.distributions.Beta cannot take one).
    """
    u = torch.rand(batch, device=device, generator=generator)
    return u.pow(1.0 / 1.5) * 0.999 + 0.001


def sample_meanflow_times(
    batch: int,
    *,
    equal_fraction: float = 0.5,
    mean: float = -0.4,
    std: float = 1.0,
    device=None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, r)`` each ``[B]`` with ``t >= r``: a sorted pair of logit-normal draws
    ``sigmoid(N(mean, std))``; a random ``equal_fraction`` of the batch gets ``r = t``
    (plain flow matching on those samples, which anchors the instantaneous velocity)."""
    draws = torch.sigmoid(torch.randn(2, batch, device=device, generator=generator) * std + mean)
    t, r = draws.max(0).values, draws.min(0).values
    equal = torch.rand(batch, device=device, generator=generator) < equal_fraction
    r = torch.where(equal, t, r)
    return t, r


# ----------------------------------------------------------------------------- objectives


def flow_matching_loss(
    net: VelocityNet,
    action: torch.Tensor,
    cond: Any = None,
    *,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> FlowLoss:
    """Conditional flow matching: MSE between ``net(z_t, t, t, cond)`` and ``e - a``.

    action: clean (normalised) samples ``a`` ``[B, ...]``; noise / t: optional fixed draws.
    """
    b = action.shape[0]
    e = torch.randn(action.shape, device=action.device, generator=generator) if noise is None else noise
    t = sample_flow_time(b, device=action.device, generator=generator) if t is None else t
    z = interpolate(action, e, t)
    pred, feats = _split(net(z, t, t, cond))
    mse = _per_sample((pred - (e - action)) ** 2)
    return FlowLoss(loss=mse, mse=mse, features=feats)


def meanflow_target(
    net: VelocityNet,
    z: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    v: torch.Tensor,
    cond: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One JVP: returns ``(u, u_tgt, features)``.

    ``u = net(z, t, r, cond)`` keeps its graph (the loss backpropagates through it);
    ``u_tgt = v - (t - r) * (v . d_z u + d_t u)`` is detached (stop-gradient target).
    z, v: ``[B, ...]``; t, r: ``[B]``.
    """

    def fn(z_, t_, r_):
        u_, feats_ = _split(net(z_, t_, r_, cond))
        return u_, (() if feats_ is None else (feats_,))  # jvp's aux must hold only tensors

    # Forward-mode AD is not implemented for flash-attn or the fused SDPA kernels; the math kernel has it.
    with math_attention():
        u, dudt, aux = torch.func.jvp(fn, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)), has_aux=True)
    feats = aux[0] if aux else None
    u_tgt = (v - _bcast(t - r, z) * dudt).detach()
    return u, u_tgt, feats


def meanflow_loss(
    net: VelocityNet,
    action: torch.Tensor,
    cond: Any = None,
    *,
    equal_fraction: float = 0.5,
    adaptive_power: float = 0.5,
    adaptive_eps: float = 1e-3,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    r: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> FlowLoss:
    """MeanFlow: regress ``u(z_t, r, t)`` onto the stop-gradient identity target.

    The per-sample loss is ``w * ||u - u_tgt||^2`` with the adaptive weight
    ``w = sg(1 / (||u - u_tgt||^2 + eps) ** p)`` (p = 0.5 makes it behave like an L2 norm of the
    error, which tames the heavy-tailed JVP targets). ``||.||^2`` is summed over the sample.
    """
    b = action.shape[0]
    e = torch.randn(action.shape, device=action.device, generator=generator) if noise is None else noise
    if t is None or r is None:
        t, r = sample_meanflow_times(b, equal_fraction=equal_fraction, device=action.device, generator=generator)
    z = interpolate(action, e, t)
    v = e - action
    u, u_tgt, feats = meanflow_target(net, z, t, r, v, cond)
    sq = ((u - u_tgt) ** 2).flatten(1).sum(1)
    w = (sq.detach() + adaptive_eps).pow(-adaptive_power)
    return FlowLoss(loss=w * sq, mse=_per_sample((u - u_tgt) ** 2), features=feats)


def dispersive_loss(features: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """InfoNCE with no positives: ``log mean_ij exp(-D_ij / tau)`` (a scalar).

    features: ``[B, D]``. ``D_ij = ||h_i - h_j||^2 / max(D)``; dividing by the largest distance
    (with its gradient) makes the loss scale-invariant, so it spreads the features apart without
    rewarding a mere blow-up of their norm. 0 for collapsed features, negative when spread.
    """
    h = features.flatten(1).float()
    d = torch.cdist(h, h).pow(2)
    d = d / d.max().clamp_min(1e-8)
    n = d.numel()
    return torch.logsumexp(-d.flatten() / tau, 0) - torch.log(torch.tensor(float(n), device=h.device))


# ----------------------------------------------------------------------------- samplers


def _times(n_steps: int, device) -> torch.Tensor:
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    return torch.linspace(1.0, 0.0, n_steps + 1, device=device)


def _grid(n_steps: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling grid once per call: times ``[n_steps + 1, B]`` (row i is ``t_i`` for every
    sample, a view) and step sizes ``t_i - t_{i+1}`` ``[n_steps]``, the same float32 values the
    per-step arithmetic would give, so the loop only indexes."""
    ts = _times(n_steps, device)
    return ts[:, None].expand(n_steps + 1, batch), ts[:-1] - ts[1:]


@torch.no_grad()
def sample_flow_matching(net: VelocityNet, noise: torch.Tensor, cond: Any = None, n_steps: int = 10) -> torch.Tensor:
    """Euler from t = 1 (``noise`` ``[B, ...]``) to t = 0 in ``n_steps`` equal steps; returns ``[B, ...]``."""
    z = noise
    times, dts = _grid(n_steps, z.shape[0], noise.device)
    for i in range(n_steps):
        t = times[i]
        v, _ = _split(net(z, t, t, cond))
        z = z - dts[i] * v
    return z


@torch.no_grad()
def sample_meanflow(net: VelocityNet, noise: torch.Tensor, cond: Any = None, n_steps: int = 1) -> torch.Tensor:
    """MeanFlow jumps ``z_r = z_t - (t - r) u(z_t, r, t)`` on an even grid from 1 to 0.

    ``n_steps = 1`` is the one-step sampler ``a = e - u(e, 0, 1)``.
    """
    z = noise
    times, dts = _grid(n_steps, z.shape[0], noise.device)
    for i in range(n_steps):
        u, _ = _split(net(z, times[i], times[i + 1], cond))
        z = z - dts[i] * u
    return z
