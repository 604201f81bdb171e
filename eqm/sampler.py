"""Sampling by optimisation on the learned equilibrium landscape (docs/reference.md#sampling).

Start at x ~ N(0, I) and follow f (which points towards data):

    GD:      x <- x + eta * f(x)
    NAG-GD:  x~ = x + eta * mu * m;  m <- f(x~);  x <- x + eta * m        (m starts at 0)

Adaptive compute: with ``tol`` set, a sample whose gradient RMS (over its unknown frames) falls
below tol stops moving; only the samples still moving are sent through the model, evaluations are
counted per sample, and the loop ends once every sample has stopped.

Classifier-free guidance: f = f_u + s * (f_c - f_u) on ALL channels, the conditional and null-label
passes batched together.  The official EqM/DiT image code guides only the first 3 of the 4 latent
channels and keeps f_c on the 4th; ``guidance_channels=3`` reproduces that exactly (for comparing
with the paper's numbers); all channels stay the default.

Conditional generation: frames flagged in ``known_mask`` are set to ``known`` at the start and
reset to it after every step; their gradient is zeroed so they do not feed NAG momentum and do
not count towards the RMS.

Positional encodings are built once per run (``model.positions``) and passed to every call.
Step sizes: the paper's (eqm.config.PAPER_SETTINGS, for large latent models) and ours for small
pixel-space models (SMALL_MODEL_SETTINGS, the default); :class:`eqm.config.SamplerSettings` holds
the settings of a run; how ours were measured: docs/sampler.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .config import SamplerSettings
from .embed import check_timestamps
from .errors import EqmError, NonFiniteError, ParamError

@dataclass
class SampleOutput:
    """x: final samples; evals (B,) long: model evaluations per sample; final_rms (B,): RMS of the
    last gradient evaluated for each sample; steps: loop iterations run."""

    x: torch.Tensor
    evals: torch.Tensor
    final_rms: torch.Tensor
    steps: int


def guide(f_c: torch.Tensor, f_u: torch.Tensor, scale: float, channels: Optional[int] = None) -> torch.Tensor:
    """Classifier-free guidance f_u + s (f_c - f_u); with ``channels`` only on the first n channels
    and f_c on the others (the official EqM/DiT sampler, n = 3)."""
    f = f_u + scale * (f_c - f_u)
    if channels is None or channels >= f.shape[1]:
        return f
    return torch.cat([f[:, :channels], f_c[:, channels:]], dim=1)


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_finite(rms: torch.Tensor, idx: torch.Tensor, step: int) -> None:
    """NonFiniteError when the field of any sample is NaN/inf: such a sample is noise, not converged."""
    bad = ~torch.isfinite(rms)
    if bad.any():
        which = idx[bad].tolist()
        shown = ", ".join(str(i) for i in which[:5]) + (", ..." if len(which) > 5 else "")
        raise NonFiniteError(f"the model's output is not finite (NaN or inf) at sampler step {step + 1} "
                             f"for sample {shown}: its weights or the step size are broken")


def sample(
    model,
    shape_or_noise: Union[Sequence[int], torch.Tensor],
    timestamps: Optional[torch.Tensor] = None,
    y: Optional[torch.Tensor] = None,
    settings: Optional[SamplerSettings] = None,
    *,
    known: Optional[torch.Tensor] = None,
    known_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callable] = None,
) -> SampleOutput:
    """Generate clips (B, C, T, H, W) (or images) by GD / NAG-GD on the model's gradient field.

    shape_or_noise: the output shape (noise drawn with ``generator``, then moved to the model's
    device) or the starting tensor.  timestamps: (B, T) or (T,) seconds (None: frame-index positions).
    y: (B,) labels or None (null label).  settings: method, steps, step size, momentum, adaptive
    tol, guidance scale and channels (default ``SamplerSettings()``; what is not chosen takes the
    measured small-model defaults, :meth:`eqm.config.SamplerSettings.resolved`).
    With guidance, the null-label pass runs on every ``cfg_every``-th step (the first included)
    and the other steps reuse the last guidance term (f_c - f_u): one model pass instead of two.
    known (B, C, T, H, W) and known_mask (B, T) bool: frames to clamp.
    callback(step, x, rms, active) is called after every step (rms (B,): last RMS per sample).
    """
    settings = (settings or SamplerSettings()).resolved()
    method, steps, eta, mu = settings.method, settings.steps, settings.step_size, settings.momentum
    tol, cfg_scale, guidance_channels = settings.stop_tol, settings.guidance, settings.guidance_channels
    cfg_every = settings.cfg_every

    device = _model_device(model)
    if torch.is_tensor(shape_or_noise):
        x = shape_or_noise.detach().to(device).clone()
    else:
        # Drawn on the generator's device, then moved: a CPU generator gives the same noise on any device.
        gen_device = generator.device if generator is not None else device
        x = torch.randn(tuple(int(s) for s in shape_or_noise), generator=generator, device=gen_device).to(device)
    B = x.shape[0]
    T = x.shape[2] if x.ndim == 5 else 1

    if timestamps is not None:
        timestamps = check_timestamps(timestamps.to(device), T)
        timestamps = timestamps.expand(B, -1) if timestamps.shape[0] == 1 else timestamps
        if timestamps.shape[0] != B:
            raise EqmError(f"timestamps have batch {timestamps.shape[0]} but {B} samples were requested")
    if y is not None:
        y = y.to(device).long().reshape(-1)
        if y.shape[0] != B:
            raise EqmError(f"labels have batch {y.shape[0]} but {B} samples were requested")
    guided = cfg_scale != 1.0
    if guidance_channels is not None and not 1 <= int(guidance_channels) <= x.shape[1]:
        raise ParamError("guidance_channels", f"guidance_channels must be between 1 and the model's {x.shape[1]} channels, got {guidance_channels}")
    if guided and y is None:
        raise EqmError("classifier-free guidance (cfg_scale != 1) needs class labels")

    mask5 = None
    if known is not None or known_mask is not None:
        if known is None or known_mask is None or x.ndim != 5:
            raise EqmError("conditional sampling needs both known (B, C, T, H, W) and known_mask (B, T)")
        known = known.to(device=device, dtype=x.dtype)
        known_mask = known_mask.to(device).bool()
        if known.shape != x.shape or known_mask.shape != (B, T):
            raise EqmError(
                f"known must be {tuple(x.shape)} and known_mask ({B}, {T}); "
                f"got {tuple(known.shape)} and {tuple(known_mask.shape)}"
            )
        mask5 = known_mask[:, None, :, None, None]
        x = torch.where(mask5, known, x)
        free = (~known_mask).sum(1) * (x[0, :, 0].numel())  # unknown elements per sample
    else:
        free = torch.full((B,), x[0].numel(), device=device)

    # Positional encodings: once per run; for guidance, for the [cond; uncond] double batch.
    if guided:
        pos = model.positions(None if timestamps is None else torch.cat([timestamps, timestamps]), T)
        y_null = torch.full_like(y, model.config.num_classes)
    else:
        pos = model.positions(timestamps, T)

    diff = None  # (B, ...) the last f_c - f_u of every sample (cfg_every > 1)

    def field(xs: torch.Tensor, idx: torch.Tensor, step: int) -> torch.Tensor:
        nonlocal diff
        if guided and step % cfg_every == 0:
            out = model(torch.cat([xs, xs]), None, torch.cat([y[idx], y_null[idx]]), pos=pos.select(torch.cat([idx, idx + B])))
            f_c, f_u = out.chunk(2)
            if cfg_every > 1:
                diff = torch.zeros_like(x, dtype=out.dtype) if diff is None else diff
                diff[idx] = f_c - f_u
            f = guide(f_c, f_u, cfg_scale, guidance_channels)
        elif guided:  # f_u rebuilt from this step's f_c and the stored difference
            f_c = model(xs, None, y[idx], pos=pos.select(idx))
            f = guide(f_c, f_c - diff[idx].to(f_c.dtype), cfg_scale, guidance_channels)
        else:
            f = model(xs, None, None if y is None else y[idx], pos=pos.select(idx))
        if mask5 is not None:
            f = f.masked_fill(mask5[idx], 0.0)
        return f

    evals = torch.zeros(B, dtype=torch.long, device=device)
    last_rms = torch.full((B,), float("nan"), device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    m = torch.zeros_like(x) if method == "nag" else None
    steps_run = 0

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for step in range(steps):
                idx = active.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                steps_run += 1
                xa = x[idx]
                xq = xa + (eta * mu) * m[idx] if m is not None else xa
                f = field(xq, idx, step)
                evals[idx] += 1
                rms = (f.float().pow(2).flatten(1).sum(1) / free[idx].clamp(min=1)).sqrt()
                _check_finite(rms, idx, step)
                last_rms[idx] = rms
                moving = torch.ones_like(rms, dtype=torch.bool) if tol is None else ~(rms < tol)
                if m is not None:
                    m[idx] = f
                keep = moving.reshape(-1, *([1] * (x.ndim - 1)))
                x[idx] = torch.where(keep, xa + eta * f, xa)
                if mask5 is not None:  # clamp: known frames stay exactly at their data values
                    x = torch.where(mask5, known, x)
                if tol is not None:
                    active[idx[~moving]] = False
                if callback is not None:
                    callback(step, x, last_rms, active)
    finally:
        model.train(was_training)
    return SampleOutput(x=x, evals=evals, final_rms=last_rms, steps=steps_run)
