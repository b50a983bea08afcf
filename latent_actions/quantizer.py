"""Bottlenecks for latent actions: a small VQ codebook, or a low-dimensional Gaussian.

A latent action is only useful if it cannot carry the next frame itself, so the encoder's
output goes through a narrow bottleneck before the decoder sees it:

- ``VectorQuantizer``: nearest-code lookup in a codebook of a few codes (Genie uses 8),
  straight-through gradients, commitment loss, codebook updated by EMA (or learned by
  gradient), data-dependent initialisation, and dead-code restart. Index collapse (every
  input mapped to one or two codes) is the most reported failure of latent-action models;
  the restart re-initialises a code that no input chose for ``dead_after`` training steps
  from an encoder output of the current batch, so it lands where the data is.
- ``GaussianBottleneck``: a continuous latent of a few dimensions (LAOM-style), sampled with
  the reparameterisation trick during training and penalised by KL to N(0, I); the KL weight
  sets how many bits get through.

Both map ``[..., D_in]`` to a ``BottleneckOutput`` and report their health as metrics
(perplexity, dead codes / KL, latent std). Under DDP the codebook statistics are summed over
ranks and the restart vectors come from rank 0, so every rank keeps the same codebook.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BottleneckOutput:
    """latent ``[..., D]`` (what the decoder sees), codes ``[...]`` int64 or None, loss (scalar)."""

    latent: torch.Tensor
    codes: torch.Tensor | None
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _from_rank0(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(t, src=0)
    return t


class VectorQuantizer(nn.Module):
    """Nearest-neighbour VQ over a codebook of ``num_codes`` vectors of size ``dim``.

    Args:
        num_codes: codebook size K (8-16 keeps latent actions coarse and interpretable).
        dim: code dimension D (small: 8-32; lookups in a low dimension use more codes).
        commitment: weight of ``||z - sg(q)||^2``, which keeps the encoder near its codes.
        ema_decay: EMA decay of the codebook statistics; ``0`` learns the codebook by
            gradient instead (adds the codebook loss ``||sg(z) - q||^2``).
        dead_after: a code that no input chose for this many training steps is re-initialised
            from the current batch (``0`` turns the restart off).
        data_init: initialise the codebook from the first training batch's encoder outputs.
        estimator: how gradients cross the lookup. ``"straight_through"``: the decoder sees the
            code, the encoder gets the decoder's gradient unchanged. ``"nsvq"`` (noise-substitution,
            used by LAPA / ViPRA): during training the decoder sees ``z + ||z - q|| * u`` with
            ``u`` a random unit vector, so the encoder is trained as if continuous while the noise
            has exactly the quantisation error's size; the codebook is learned by gradient (no EMA).

    Metrics: ``perplexity`` (exp of the entropy of code usage in the batch; K is perfect, 1 is
    collapse), ``codes_used`` in the batch, ``dead_codes`` (unused for ``dead_after`` steps, or
    unused in the batch when the restart is off), ``restarted_codes``, ``quant_error``.

    Updates (EMA, restart, init) happen only in training mode with gradients enabled, so
    labelling (``eval`` / ``no_grad``) never moves the codebook.
    """

    def __init__(
        self,
        num_codes: int = 8,
        dim: int = 16,
        commitment: float = 0.25,
        ema_decay: float = 0.99,
        dead_after: int = 100,
        data_init: bool = True,
        estimator: str = "straight_through",
        eps: float = 1e-5,
    ):
        super().__init__()
        if num_codes < 2:
            raise ValueError(f"num_codes must be >= 2, got {num_codes}")
        self.num_codes, self.dim = num_codes, dim
        self.commitment, self.ema_decay, self.dead_after = commitment, ema_decay, dead_after
        if estimator not in ("straight_through", "nsvq"):
            raise ValueError(f"estimator must be 'straight_through' or 'nsvq', got {estimator!r}")
        if estimator == "nsvq":
            ema_decay = 0.0  # NSVQ learns the codebook by gradient
        self.ema_decay, self.estimator = ema_decay, estimator
        self.data_init, self.eps = data_init, eps
        init = torch.randn(num_codes, dim)
        if ema_decay > 0:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        # training steps since each code was last chosen (dead-code detection)
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(not data_init))

    @property
    def uses_ema(self) -> bool:
        return self.ema_decay > 0

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[...]`` int64 -> code vectors ``[..., D]``."""
        return F.embedding(codes, self.codebook)

    def forward(self, z: torch.Tensor) -> BottleneckOutput:
        """z ``[..., D]`` -> latent ``[..., D]`` (the code, or NSVQ's noisy z in training), codes ``[...]``."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer expects [..., {self.dim}], got {tuple(z.shape)}")
        in_dtype = z.dtype
        flat = z.reshape(-1, self.dim).float()  # distances in fp32 even under bf16 autocast
        update = self.training and torch.is_grad_enabled()
        if update and not bool(self.initialised):
            self._init_from(flat.detach())

        codebook = self.codebook.float()
        with torch.no_grad():  # the choice of code is not differentiable
            dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None]
            codes = dist2.argmin(1)
        quant = F.embedding(codes, codebook)

        loss = self.commitment * F.mse_loss(flat, quant.detach())
        if self.estimator == "nsvq":
            loss = torch.zeros((), device=z.device)
        elif not self.uses_ema:
            loss = loss + F.mse_loss(quant, flat.detach())

        if self.estimator == "nsvq" and self.training:
            # NSVQ: the decoder sees z moved by exactly the quantisation error, in a random
            # direction; gradients reach the encoder directly and the codebook through ||z - q||
            noise = torch.randn_like(flat)
            err = (flat - quant).norm(dim=1, keepdim=True)
            latent = flat + err * noise / noise.norm(dim=1, keepdim=True).clamp_min(1e-8)
        elif torch.is_grad_enabled() and flat.requires_grad:
            # straight-through: forward value is the code, gradient flows to the encoder output
            latent = flat + (quant - flat).detach()
        else:
            latent = quant  # exactly the code (z + (q - z) is only equal up to rounding)

        counts = torch.bincount(codes, minlength=self.num_codes).float()
        # codebook maintenance last: the latent above is computed from the codebook it was matched to
        if update:
            counts = _all_reduce_sum(counts.clone())
            if self.uses_ema:
                self._ema_update(flat.detach(), codes, counts)
            restarted = self._restart_dead(flat.detach(), counts)
        else:
            restarted = torch.zeros((), device=z.device)

        probs = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        dead = (self.steps_unused >= self.dead_after).sum() if self.dead_after > 0 else (counts == 0).sum()
        metrics = {
            "perplexity": perplexity.detach(),
            "codes_used": (counts > 0).sum().float(),
            "dead_codes": dead.float(),
            "restarted_codes": restarted.float(),
            "quant_error": F.mse_loss(flat.detach(), quant.detach()),
        }
        return BottleneckOutput(latent.to(in_dtype).reshape(z.shape), codes.reshape(z.shape[:-1]), loss, metrics)

    # -- codebook maintenance ------------------------------------------------------------
    @torch.no_grad()
    def _sample_rows(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """n encoder outputs of this batch (with replacement if the batch is small), same on all ranks."""
        idx = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        rows = flat[idx].clone()
        if flat.shape[0] < n:  # duplicates would stay tied forever: break ties with a little noise
            rows += 1e-3 * rows.std().clamp_min(1e-3) * torch.randn_like(rows)
        return _from_rank0(rows.contiguous())

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        rows = self._sample_rows(flat, self.num_codes).to(self.codebook.dtype)
        self.codebook.data.copy_(rows)
        if self.uses_ema:
            self.ema_sum.copy_(rows)
            self.ema_count.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros(self.num_codes, self.dim, device=flat.device).index_add_(0, codes, flat)
        sums = _all_reduce_sum(sums)
        d = self.ema_decay
        self.ema_count.mul_(d).add_(counts, alpha=1 - d)
        self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
        # Laplace smoothing keeps unused codes from dividing by ~0
        n = self.ema_count.sum()
        count = (self.ema_count + self.eps) / (n + self.num_codes * self.eps) * n
        self.codebook.copy_(self.ema_sum / count[:, None])

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        self.steps_unused.add_(1)
        self.steps_unused[counts > 0] = 0
        if self.dead_after <= 0:
            return torch.zeros((), device=flat.device)
        dead = self.steps_unused >= self.dead_after
        n_dead = dead.sum()
        if n_dead == 0:
            return n_dead
        # sample a full codebook's worth so every rank draws (and broadcasts) the same shape
        rows = self._sample_rows(flat, self.num_codes).to(self.codebook.dtype)
        self.codebook.data[dead] = rows[dead]
        if self.uses_ema:
            self.ema_sum[dead] = rows[dead]
            self.ema_count[dead] = 1.0
        self.steps_unused[dead] = 0
        return n_dead


class GaussianBottleneck(nn.Module):
    """Continuous latent action: ``[..., 2 * D]`` (mean, log-variance) -> ``[..., D]``.

    Training samples ``mu + sigma * eps`` and adds ``kl_weight * KL(N(mu, sigma) || N(0, I))``
    (per latent dimension, averaged); evaluation returns ``mu``. A small ``D`` and a KL
    weight around 1e-3..1e-2 keep the latent from smuggling the next frame to the decoder.
    """

    def __init__(self, dim: int = 16, kl_weight: float = 1e-3):
        super().__init__()
        self.dim, self.kl_weight = dim, kl_weight

    def forward(self, stats: torch.Tensor) -> BottleneckOutput:
        if stats.shape[-1] != 2 * self.dim:
            raise ValueError(f"GaussianBottleneck expects [..., {2 * self.dim}], got {tuple(stats.shape)}")
        mu, logvar = stats.float().chunk(2, dim=-1)
        logvar = logvar.clamp(-10.0, 5.0)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        if self.training:
            latent = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        else:
            latent = mu
        metrics = {
            "kl": kl.detach(),
            "latent_std": mu.detach().flatten(0, -2).std(0).mean(),
            "posterior_std": (0.5 * logvar.detach()).exp().mean(),
        }
        return BottleneckOutput(latent.to(stats.dtype), None, self.kl_weight * kl, metrics)
