"""Configuration values: the model architecture (:class:`EqMConfig`, with the size registry that
builds it) and the sampler settings (:class:`SamplerSettings`).

An ``EqMConfig`` is everything :class:`eqm.model.EqMTransformer` needs to build its modules, and
everything a checkpoint stores about them (``state.json`` ``"arch"`` is ``config.to_dict()``).
It is validated once, when it is made, with messages that name the field; the recipe, the
checkpoint loader and ``inspect-embed`` all build one instead of re-checking options themselves.
:meth:`EqMConfig.from_dict` is the one reader of saved architectures: it rejects unknown keys and
applies the defaults of checkpoints written before a field existed.

A :class:`SamplerSettings` is how to sample (method, steps, step size, momentum, tolerance,
guidance), with the per-method defaults resolved and every value checked when it is made; every
sampling entry point (``eqm.sampler.sample``, ``eqm.generate``, ``eqm.retime``, training previews)
takes one, built once from CLI flags or from a recipe's ``sample`` section.

This module does not import torch (the recipe validates both before torch is loaded), so the pure
arithmetic of the positional channel split lives here and :mod:`eqm.embed` re-exports it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Optional

from . import budget
from .errors import EqmError, ParamError

#: Reference rate r: tau = t_seconds * r (measured choice: docs/embedding.md#choosing-ref_fps).
DEFAULT_REF_FPS = 24.0
#: Default share of channels used by the temporal coordinate (sincos: of D; rope: of head_dim).
DEFAULT_TIME_FRAC = 0.25

TIME_MODES = ("seconds", "index", "fps-embed")
POS_KINDS = ("sincos", "rope")
#: Where the sincos temporal frequencies sit on the spatial code's channels (docs/embedding.md#sincos).
TIME_ORDERS = ("paired", "aligned")
DEFAULT_TIME_ORDER = "aligned"
ENERGY_KINDS = (None, "dot", "l2")
#: Attention layouts: one softmax over every token of the clip, or DiT's spatial attention per
#: frame followed by attention across frames at each patch position (docs/design.md#attention).
ATTENTION_KINDS = ("full", "divided")

#: Values for fields that saved architectures may lack because they predate the field.  A
#: missing field of any other name takes the dataclass default.
LEGACY_DEFAULTS = {
    "time_order": "aligned",  # the only sincos layout there was before the key existed
}

#: Registered widths: CPU sizes (tests, the tiny synthetic recipe), then the EqM / SiT / DiT family.
EQM_SIZES = {
    "tiny": dict(hidden_size=64, depth=4, num_heads=4),
    "mini": dict(hidden_size=128, depth=6, num_heads=4),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}


# ============================================================================================
# Channel split of the positional code (pure arithmetic, shared with eqm.embed)
# ============================================================================================


def sincos_time_channels(dim: int, time_frac: float = DEFAULT_TIME_FRAC) -> int:
    """Number d_t of channels carrying tau in the sincos code; checks the layout is possible."""
    if dim % 4:
        raise ParamError("hidden_size", f"hidden_size must be divisible by 4 for sincos positions, got {dim}")
    if not 0.0 <= time_frac <= 0.5:
        raise ParamError("time_frac", f"time_frac for sincos must be in [0, 0.5], got {time_frac}")
    d_t = int(round(time_frac * dim))
    if d_t % 2:
        raise ParamError("time_frac", f"time_frac={time_frac} of hidden_size {dim} gives {d_t} time channels; it must be even")
    return d_t


def rope_split(head_dim: int, time_frac: float = DEFAULT_TIME_FRAC) -> tuple[int, int, int]:
    """Per-head channel split (d_t, d_row, d_col) for 3D RoPE; every group even and non-empty."""
    if head_dim % 2:
        raise ParamError("hidden_size", f"hidden_size / num_heads must be even for rope, got a head dimension of {head_dim}")
    if not 0.0 < time_frac < 1.0:
        raise ParamError("time_frac", f"time_frac for rope must be in (0, 1), got {time_frac}")
    d_t = max(2, 2 * int(round(time_frac * head_dim / 2)))
    rest = head_dim - d_t
    d_row = 2 * math.ceil(rest / 4)
    d_col = rest - d_row
    if d_col < 2 or d_row < 2:
        raise ParamError(
            "time_frac",
            f"time_frac={time_frac} with a head dimension of {head_dim} leaves no even split for rows and "
            f"columns (t={d_t}, row={d_row}, col={d_col})",
        )
    return d_t, d_row, d_col


# ============================================================================================
# The architecture
# ============================================================================================


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class EqMConfig:
    """The architecture of an EqM transformer (defaults: the EqM-S shape on 32x32 RGB clips).

    Frozen and validated on construction; ``dataclasses.replace(cfg, ...)`` gives a checked copy.
    ``input_size`` accepts an int (square) or (height, width) and is stored as a tuple.
    """

    input_size: tuple[int, int] = (32, 32)
    in_channels: int = 3
    num_frames: int = 16
    patch_size: int = 2
    temporal_patch: int = 1
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = False
    pos: str = "sincos"
    time_mode: str = "seconds"
    ref_fps: float = DEFAULT_REF_FPS
    time_frac: float = DEFAULT_TIME_FRAC
    time_order: str = DEFAULT_TIME_ORDER
    energy: Optional[str] = None
    attention: str = "full"

    def __post_init__(self):
        size = self.input_size
        if _is_int(size):
            size = (size, size)
        if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(s) and s >= 1 for s in size)):
            raise ParamError("input_size", f"input_size must be a positive int or (height, width), got {self.input_size!r}")
        object.__setattr__(self, "input_size", tuple(size))
        for name in ("mlp_ratio", "class_dropout_prob", "ref_fps", "time_frac"):
            value = getattr(self, name)
            if not _is_number(value):
                raise ParamError(name, f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, name: str, problem: str):
            if not ok:
                raise ParamError(name, f"{name} {problem}, got {getattr(self, name)!r}")

        for name, low in (("in_channels", 1), ("num_frames", 1), ("patch_size", 1), ("temporal_patch", 1),
                          ("hidden_size", 1), ("depth", 0), ("num_heads", 1), ("num_classes", 0)):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= low, name, f"must be an integer >= {low}")
        H, W = self.input_size
        need(H % self.patch_size == 0 and W % self.patch_size == 0, "input_size",
             f"must be divisible by patch_size ({self.patch_size})")
        need(self.num_frames % self.temporal_patch == 0, "num_frames", f"must be a multiple of temporal_patch ({self.temporal_patch})")
        need(self.hidden_size % self.num_heads == 0, "hidden_size", f"must be divisible by num_heads ({self.num_heads})")
        need(self.mlp_ratio > 0, "mlp_ratio", "must be > 0")
        need(0.0 <= self.class_dropout_prob <= 1.0, "class_dropout_prob", "must be in [0, 1]")
        need(isinstance(self.learn_sigma, bool), "learn_sigma", "must be true or false")
        need(self.pos in POS_KINDS, "pos", f"must be one of {', '.join(POS_KINDS)}")
        need(self.time_mode in TIME_MODES, "time_mode", f"must be one of {', '.join(TIME_MODES)}")
        need(self.ref_fps > 0, "ref_fps", "must be > 0")
        need(self.time_order in TIME_ORDERS, "time_order", f"must be one of {', '.join(TIME_ORDERS)}")
        need(self.energy in ENERGY_KINDS, "energy", "must be None, 'dot' or 'l2'")
        need(self.attention in ATTENTION_KINDS, "attention", f"must be one of {', '.join(ATTENTION_KINDS)}")
        self.time_channels  # the channel split must exist (raises naming hidden_size or time_frac)
        budget.check_model("model", hidden_size=self.hidden_size, depth=self.depth, mlp_ratio=self.mlp_ratio,
                           in_channels=self.in_channels, patch_size=self.patch_size, temporal_patch=self.temporal_patch,
                           num_classes=self.num_classes, grid_tokens=self.grid[0] * self.grid[1])  # before allocating

    # ---------------------------------------------------------------- derived quantities

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols) of one frame."""
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def time_channels(self) -> int:
        """d_t: sincos channels carrying tau (of hidden_size), or the RoPE time group of one head."""
        if self.pos == "sincos":
            return sincos_time_channels(self.hidden_size, self.time_frac)
        return rope_split(self.head_dim, self.time_frac)[0]

    # ---------------------------------------------------------------- (de)serialisation

    def to_dict(self) -> dict:
        """JSON-able fields (what checkpoints store as ``arch``); ``from_dict`` reads it back."""
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, arch: Any, source: str = "arch") -> "EqMConfig":
        """Read a saved architecture (a checkpoint's ``arch``): unknown keys are an error, fields
        the saver predates take :data:`LEGACY_DEFAULTS`; errors are prefixed with ``source``."""
        if not isinstance(arch, dict):
            raise EqmError(f"{source}: 'arch' must be a mapping of model options, got {type(arch).__name__}")
        names = cls.field_names()
        unknown = [k for k in arch if k not in names]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise EqmError(f"{source}: model option {unknown[0]!r} is not understood by this eqmctl{hint}")
        try:
            return cls(**{**LEGACY_DEFAULTS, **arch})
        except EqmError as e:
            raise EqmError(f"{source}: {e}") from None

    @classmethod
    def from_size(cls, size: str, **fields: Any) -> "EqMConfig":
        """The config of a registered size ("tiny", "mini", "S", "B", "L", "XL"); ``fields`` override."""
        if size not in EQM_SIZES:
            lower = {k.lower(): k for k in EQM_SIZES}
            close = [lower[size.lower()]] if isinstance(size, str) and size.lower() in lower else (
                difflib.get_close_matches(str(size), list(EQM_SIZES), n=1, cutoff=0.5))
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ParamError("size", f"size must be one of {', '.join(EQM_SIZES)}, got {size!r}{hint}")
        return cls(**{**EQM_SIZES[size], **fields})



# ============================================================================================
# Sampler settings
# ============================================================================================

SAMPLER_METHODS = ("gd", "nag")

#: Measured defaults for small pixel-space models (docs/sampler.md): what a field not chosen takes.
SMALL_MODEL_SETTINGS = {
    "gd": dict(steps=40, step_size=0.03, momentum=0.0, tol=0.01),
    "nag": dict(steps=30, step_size=0.02, momentum=0.3, tol=0.01),
}

#: The paper's settings for its large latent image models (official checkpoints sample with these).
PAPER_SETTINGS = {
    "gd": dict(steps=250, step_size=0.003, momentum=0.0, tol=0.0),
    "nag": dict(steps=250, step_size=0.0017, momentum=0.3, tol=0.0),
}


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample: GD or NAG-GD on the model's gradient field (eqm.sampler).

    A field left None is "not chosen": :meth:`resolved` fills steps / step_size / momentum / tol
    from the method's defaults (:data:`SMALL_MODEL_SETTINGS`, or :data:`PAPER_SETTINGS` for
    official checkpoints), and cfg_scale with 1 (no guidance) -- sampling a checkpoint first takes
    its recipe's ``sample.cfg_scale`` (:meth:`with_default_guidance`).  ``tol``: adaptive stop when
    a sample's gradient RMS falls below it (0 = run every step).  ``guidance_channels``: guide only
    the first n channels, the others follow the conditional field (the official sampler: 3;
    None = all).  ``cfg_every``: with guidance, the null-label pass every n-th step only, its
    guidance term reused in between (not chosen: 1, every step).  Every value given is checked on construction, with a message naming the field.
    """

    method: str = "gd"
    steps: Optional[int] = None
    step_size: Optional[float] = None
    momentum: Optional[float] = None
    tol: Optional[float] = None
    cfg_scale: Optional[float] = None
    guidance_channels: Optional[int] = None
    cfg_every: Optional[int] = None

    def __post_init__(self):
        if self.method not in SAMPLER_METHODS:
            raise ParamError("method", f"method must be one of {', '.join(SAMPLER_METHODS)}, got {self.method!r}")
        for name in ("steps", "guidance_channels", "cfg_every"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value >= 1):
                raise ParamError(name, f"{name} must be an integer >= 1, got {value!r}")
        for name in ("step_size", "momentum", "tol", "cfg_scale"):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                raise ParamError(name, f"{name} must be a finite number, got {value!r}")
            if value is not None:
                object.__setattr__(self, name, float(value))
        if self.step_size is not None and self.step_size <= 0:
            raise ParamError("step_size", f"step_size must be > 0, got {self.step_size!r}")
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            raise ParamError("momentum", f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.tol is not None and self.tol < 0:
            raise ParamError("tol", f"tol must be >= 0 (0 = run every step), got {self.tol!r}")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise ParamError("cfg_scale", f"cfg_scale must be >= 0, got {self.cfg_scale!r}")

    def resolved(self, defaults: dict = SMALL_MODEL_SETTINGS) -> "SamplerSettings":
        """Every field set: the ones not chosen from ``defaults[method]``, guidance 1 on every step."""
        filled = {k: v for k, v in defaults[self.method].items() if getattr(self, k) is None}
        if self.cfg_scale is None:
            filled["cfg_scale"] = 1.0
        if self.cfg_every is None:
            filled["cfg_every"] = 1
        return dataclasses.replace(self, **filled) if filled else self

    def with_default_guidance(self, scale: float) -> "SamplerSettings":
        """These settings with ``scale`` as the guidance when none was chosen."""
        return self if self.cfg_scale is not None else dataclasses.replace(self, cfg_scale=float(scale))

    @property
    def guidance(self) -> float:
        """The guidance scale that runs: cfg_scale, or 1 (none) when it was not chosen."""
        return 1.0 if self.cfg_scale is None else self.cfg_scale

    @property
    def stop_tol(self) -> Optional[float]:
        """The adaptive-stop tolerance that runs (None: every step, as tol 0 or not chosen)."""
        return self.tol or None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
