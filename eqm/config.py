"""The model architecture as one value: :class:`EqMConfig`, and the size registry that builds it.

An ``EqMConfig`` is everything :class:`eqm.model.EqMTransformer` needs to build its modules, and
everything a checkpoint stores about them (``state.json`` ``"arch"`` is ``config.to_dict()``).
It is validated once, when it is made, with messages that name the field; the recipe, the
checkpoint loader and ``inspect-embed`` all build one instead of re-checking options themselves.
:meth:`EqMConfig.from_dict` is the one reader of saved architectures: it rejects unknown keys and
applies the defaults of checkpoints written before a field existed.

This module does not import torch (the recipe validates architectures before torch is loaded), so
the pure arithmetic of the positional channel split lives here and :mod:`eqm.embed` re-exports it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Optional

from . import budget
from .errors import EqmError

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


class ConfigError(EqmError):
    """An impossible architecture; ``field`` is the EqMConfig field at fault (the message starts with it)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# ============================================================================================
# Channel split of the positional code (pure arithmetic, shared with eqm.embed)
# ============================================================================================


def sincos_time_channels(dim: int, time_frac: float = DEFAULT_TIME_FRAC) -> int:
    """Number d_t of channels carrying tau in the sincos code; checks the layout is possible."""
    if dim % 4:
        raise ConfigError("hidden_size", f"hidden_size must be divisible by 4 for sincos positions, got {dim}")
    if not 0.0 <= time_frac <= 0.5:
        raise ConfigError("time_frac", f"time_frac for sincos must be in [0, 0.5], got {time_frac}")
    d_t = int(round(time_frac * dim))
    if d_t % 2:
        raise ConfigError("time_frac", f"time_frac={time_frac} of hidden_size {dim} gives {d_t} time channels; it must be even")
    return d_t


def rope_split(head_dim: int, time_frac: float = DEFAULT_TIME_FRAC) -> tuple[int, int, int]:
    """Per-head channel split (d_t, d_row, d_col) for 3D RoPE; every group even and non-empty."""
    if head_dim % 2:
        raise ConfigError("hidden_size", f"hidden_size / num_heads must be even for rope, got a head dimension of {head_dim}")
    if not 0.0 < time_frac < 1.0:
        raise ConfigError("time_frac", f"time_frac for rope must be in (0, 1), got {time_frac}")
    d_t = max(2, 2 * int(round(time_frac * head_dim / 2)))
    rest = head_dim - d_t
    d_row = 2 * math.ceil(rest / 4)
    d_col = rest - d_row
    if d_col < 2 or d_row < 2:
        raise ConfigError(
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

    def __post_init__(self):
        size = self.input_size
        if _is_int(size):
            size = (size, size)
        if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(s) and s >= 1 for s in size)):
            raise ConfigError("input_size", f"input_size must be a positive int or (height, width), got {self.input_size!r}")
        object.__setattr__(self, "input_size", tuple(size))
        for name in ("mlp_ratio", "class_dropout_prob", "ref_fps", "time_frac"):
            value = getattr(self, name)
            if not _is_number(value):
                raise ConfigError(name, f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, name: str, problem: str):
            if not ok:
                raise ConfigError(name, f"{name} {problem}, got {getattr(self, name)!r}")

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
            raise ConfigError("size", f"size must be one of {', '.join(EQM_SIZES)}, got {size!r}{hint}")
        return cls(**{**EQM_SIZES[size], **fields})

