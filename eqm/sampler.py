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
    device = _model_device(model)
    x = _start(shape_or_noise, generator, device)
    T = x.shape[2] if x.ndim == 5 else 1
    timestamps, y = _check_conditioning(timestamps, y, x.shape[0], T, device)
    _check_guidance(settings, y, x.shape[1])
    clamp = _Clamp.build(known, known_mask, x)
    if clamp is not None:
        x = clamp.apply(x)
    field = _Field(model, timestamps, y, settings, T, x.shape[0], clamp)
    return _descend(model, x, field, clamp, settings, callback)


def _start(shape_or_noise, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """The starting point: a copy of the given tensor, or noise of the given shape on ``device``."""
    if torch.is_tensor(shape_or_noise):
        return shape_or_noise.detach().to(device).clone()
    # Drawn on the generator's device, then moved: a CPU generator gives the same noise on any device.
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(int(s) for s in shape_or_noise), generator=generator, device=gen_device).to(device)


def _check_conditioning(timestamps, y, B: int, T: int, device):
    """Timestamps as (B, T) and labels as (B,) long on ``device``; EqmError when a batch does not match."""
    if timestamps is not None:
        timestamps = check_timestamps(timestamps.to(device), T)
        timestamps = timestamps.expand(B, -1) if timestamps.shape[0] == 1 else timestamps
        if timestamps.shape[0] != B:
            raise EqmError(f"timestamps have batch {timestamps.shape[0]} but {B} samples were requested")
    if y is not None:
        y = y.to(device).long().reshape(-1)
        if y.shape[0] != B:
            raise EqmError(f"labels have batch {y.shape[0]} but {B} samples were requested")
    return timestamps, y


def _check_guidance(settings: SamplerSettings, y, channels: int) -> None:
    gc = settings.guidance_channels
    if gc is not None and not 1 <= int(gc) <= channels:
        raise ParamError("guidance_channels", f"guidance_channels must be between 1 and the model's {channels} channels, got {gc}")
    if settings.guidance != 1.0 and y is None:
        raise EqmError("classifier-free guidance (cfg_scale != 1) needs class labels")


@dataclass
class _Clamp:
    """Known frames of a conditional run: mask5 (B, 1, T, 1, 1) marks them, known holds their values,
    free (B,) counts each sample's unknown elements (the RMS is taken over those only)."""

    known: torch.Tensor
    mask5: torch.Tensor
    free: torch.Tensor

    @staticmethod
    def build(known, known_mask, x: torch.Tensor) -> Optional["_Clamp"]:
        if known is None and known_mask is None:
            return None
        if known is None or known_mask is None or x.ndim != 5:
            raise EqmError("conditional sampling needs both known (B, C, T, H, W) and known_mask (B, T)")
        B, T = x.shape[0], x.shape[2]
        known = known.to(device=x.device, dtype=x.dtype)
        known_mask = known_mask.to(x.device).bool()
        if known.shape != x.shape or known_mask.shape != (B, T):
            raise EqmError(
                f"known must be {tuple(x.shape)} and known_mask ({B}, {T}); "
                f"got {tuple(known.shape)} and {tuple(known_mask.shape)}"
            )
        free = (~known_mask).sum(1) * (x[0, :, 0].numel())
        return _Clamp(known=known, mask5=known_mask[:, None, :, None, None], free=free)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x with the known frames reset exactly to their data values."""
        return torch.where(self.mask5, self.known, x)


class _Field:
    """f(x) for the samples ``idx`` still moving: one model pass, or the conditional and null-label
    passes combined by guidance.  Positional encodings are built once here (for guidance, for the
    [cond; uncond] double batch); with ``cfg_every`` > 1 the null pass runs every cfg_every-th step
    and the steps between rebuild f_u from the last stored f_c - f_u."""

    def __init__(self, model, timestamps, y, settings: SamplerSettings, T: int, B: int, clamp: Optional[_Clamp]):
        self.model, self.y, self.settings, self.B, self.clamp = model, y, settings, B, clamp
        self.guided = settings.guidance != 1.0
        if self.guided:
            self.pos = model.positions(None if timestamps is None else torch.cat([timestamps, timestamps]), T)
            self.y_null = torch.full_like(y, model.config.num_classes)
        else:
            self.pos = model.positions(timestamps, T)
        self.diff: Optional[torch.Tensor] = None  # (B, ...) the last f_c - f_u of every sample

    def __call__(self, xs: torch.Tensor, idx: torch.Tensor, step: int) -> torch.Tensor:
        s, model, y = self.settings, self.model, self.y
        if self.guided and step % s.cfg_every == 0:
            out = model(torch.cat([xs, xs]), None, torch.cat([y[idx], self.y_null[idx]]),
                        pos=self.pos.select(torch.cat([idx, idx + self.B])))
            f_c, f_u = out.chunk(2)
            if s.cfg_every > 1:
                if self.diff is None:
                    self.diff = xs.new_zeros((self.B, *xs.shape[1:]), dtype=out.dtype)
                self.diff[idx] = f_c - f_u
            f = guide(f_c, f_u, s.guidance, s.guidance_channels)
        elif self.guided:  # f_u rebuilt from this step's f_c and the stored difference
            f_c = model(xs, None, y[idx], pos=self.pos.select(idx))
            f = guide(f_c, f_c - self.diff[idx].to(f_c.dtype), s.guidance, s.guidance_channels)
        else:
            f = model(xs, None, None if y is None else y[idx], pos=self.pos.select(idx))
        if self.clamp is not None:
            f = f.masked_fill(self.clamp.mask5[idx], 0.0)
        return f


def _descend(model, x: torch.Tensor, field: _Field, clamp: Optional[_Clamp], settings: SamplerSettings,
             callback: Optional[Callable]) -> SampleOutput:
    """The GD / NAG-GD loop with per-sample adaptive stop; the model runs in eval mode without grad."""
    B, device = x.shape[0], x.device
    eta, mu, tol = settings.step_size, settings.momentum, settings.stop_tol
    free = clamp.free if clamp is not None else torch.full((B,), x[0].numel(), device=device)
    evals = torch.zeros(B, dtype=torch.long, device=device)
    last_rms = torch.full((B,), float("nan"), device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    m = torch.zeros_like(x) if settings.method == "nag" else None
    steps_run = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for step in range(settings.steps):
                idx = active.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                steps_run += 1
                xa = x[idx]
                f = field(xa + (eta * mu) * m[idx] if m is not None else xa, idx, step)
                evals[idx] += 1
                rms = (f.float().pow(2).flatten(1).sum(1) / free[idx].clamp(min=1)).sqrt()
                _check_finite(rms, idx, step)
                last_rms[idx] = rms
                moving = torch.ones_like(rms, dtype=torch.bool) if tol is None else ~(rms < tol)
                if m is not None:
                    m[idx] = f
                x[idx] = torch.where(moving.reshape(-1, *([1] * (x.ndim - 1))), xa + eta * f, xa)
                if clamp is not None:  # known frames stay exactly at their data values
                    x = clamp.apply(x)
                if tol is not None:
                    active[idx[~moving]] = False
                if callback is not None:
                    callback(step, x, last_rms, active)
    finally:
        model.train(was_training)
    return SampleOutput(x=x, evals=evals, final_rms=last_rms, steps=steps_run)
