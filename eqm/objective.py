"""The Equilibrium Matching objective (docs/reference.md#eqm-objective).

x1 data, x0 ~ N(0, I), gamma ~ U[0, 1] per sample:

    x_gamma = gamma * x1 + (1 - gamma) * x0                  (gamma = 0 noise, 1 data)
    target  = (x1 - x0) * c(gamma),  c(gamma) = lam * min(1, (1 - gamma) / (1 - a))
    loss    = mean over all elements of (f(x_gamma) - target)^2

a = 0.8, lam = 4 are the paper's values.  The model is never told gamma.  Explicit-energy models
(model.energy = "dot" | "l2") need no special handling here: their forward returns grad_x E with
create_graph=True whenever gradients are enabled, so ``loss.backward()`` differentiates through
the gradient (see eqm.model).
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import EqmError


def c_gamma(gamma: torch.Tensor, a: float = 0.8, lam: float = 4.0) -> torch.Tensor:
    """Gradient magnitude c(gamma) = lam * min(1, (1 - gamma) / (1 - a)): lam up to a, then linear to 0 at 1."""
    if not 0.0 <= a < 1.0:
        raise EqmError(f"objective.a must be in [0, 1), got {a}")
    return lam * torch.clamp((1.0 - gamma) / (1.0 - a), max=1.0)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def eqm_target(x0: torch.Tensor, x1: torch.Tensor, gamma: torch.Tensor, a: float = 0.8, lam: float = 4.0) -> torch.Tensor:
    """The EqM target (x1 - x0) * c(gamma), gamma (B,) broadcast over each sample."""
    return (x1 - x0) * _per_sample(c_gamma(gamma, a, lam), x1)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """x_gamma = gamma * x1 + (1 - gamma) * x0."""
    g = _per_sample(gamma, x1)
    return g * x1 + (1.0 - g) * x0


def eqm_loss(
    model,
    x1: torch.Tensor,
    timestamps: Optional[torch.Tensor],
    y: Optional[torch.Tensor],
    *,
    a: float = 0.8,
    lam: float = 4.0,
    generator: Optional[torch.Generator] = None,
    gamma: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    pos=None,
):
    """One EqM loss evaluation on a batch of clips x1 (B, C, T, H, W) (or images).

    gamma (B,) and noise (like x1) are drawn with ``generator`` (on its own device, then moved to
    x1's) unless given.
    Returns (loss, stats) where stats holds detached scalar tensors (call float() to log them;
    no host sync happens here): loss, pred_rms, target_rms, gamma_mean.
    """
    B = x1.shape[0]
    draw_on = generator.device if generator is not None else x1.device
    if gamma is None:
        gamma = torch.rand(B, generator=generator, device=draw_on, dtype=x1.dtype).to(x1.device)
    if noise is None:
        noise = torch.randn(x1.shape, generator=generator, device=draw_on, dtype=x1.dtype).to(x1.device)
    if noise.shape != x1.shape or gamma.shape != (B,):
        raise EqmError(f"noise must match x1 {tuple(x1.shape)} and gamma must be ({B},)")
    x_gamma = interpolate(noise, x1, gamma)
    target = eqm_target(noise, x1, gamma, a, lam)
    pred = model(x_gamma, timestamps, y, pos=pos)
    loss = (pred - target).pow(2).mean()
    stats = {
        "loss": loss.detach(),
        "pred_rms": pred.detach().pow(2).mean().sqrt(),
        "target_rms": target.pow(2).mean().sqrt(),
        "gamma_mean": gamma.mean(),
    }
    return loss, stats
