"""Time-aware positional encodings from per-token coordinates (tau, row, col).

Every token gets (tau, row, col): its patch-grid row and column, and tau, its time -- the real
timestamp times ``ref_fps`` (mode ``seconds``) or the frame index (``index``, and ``fps-embed``,
which adds a learned embedding of the clip's rate elsewhere).  ``sincos`` adds a fixed code to the
tokens, ``rope`` rotates q and k; both take (B, N, 3) coordinates, so each sample of a mixed-rate
batch keeps its own timestamps, and both reduce to the image model's 2D code for a single frame.
Channel layouts, the choice of ``ref_fps`` and their measurements: docs/embedding.md; the rules:
docs/reference.md#time-aware-encoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from .config import (  # noqa: F401  (the channel split and its constants are part of this module's API)
    DEFAULT_REF_FPS,
    DEFAULT_TIME_FRAC,
    DEFAULT_TIME_ORDER,
    POS_KINDS,
    TIME_MODES,
    TIME_ORDERS,
    rope_split,
    sincos_time_channels,
)
from .errors import EqmError

#: Frequency base of every sin/cos and rotary code (DiT/MAE and RoPE use 10000).
BASE = 10000.0


def check_time_order(order: str) -> str:
    if order not in TIME_ORDERS:
        raise EqmError(f"time_order must be one of {', '.join(TIME_ORDERS)}, got {order!r}")
    return order


def _in_layout(half: torch.Tensor, order: str) -> torch.Tensor:
    """One half of the temporal code (fastest frequency first) in channel order, and back: "paired"
    reverses it, which is its own inverse."""
    return half.flip(-1) if order == "paired" else half


# --------------------------------------------------------------------------------------------
# 1D building block
# --------------------------------------------------------------------------------------------

def frequencies(dim: int, *, base: float = BASE, device=None, dtype=torch.float32) -> torch.Tensor:
    """The dim/2 angular frequencies w_i = base^(-2i/dim) of a dim-channel sin/cos code (w_0 = 1)."""
    if dim % 2:
        raise EqmError(f"a sin/cos code needs an even number of channels, got {dim}")
    i = torch.arange(dim // 2, device=device, dtype=torch.float64)
    return (base ** (-2.0 * i / dim)).to(dtype)


def sincos_1d(pos: torch.Tensor, dim: int, *, base: float = BASE) -> torch.Tensor:
    """[sin(w_i pos) | cos(w_i pos)] for positions of any shape -> (..., dim) (MAE/DiT 1D layout)."""
    omega = frequencies(dim, base=base, device=pos.device, dtype=torch.float32)
    arg = pos.to(torch.float32)[..., None] * omega
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


# --------------------------------------------------------------------------------------------
# Coordinates
# --------------------------------------------------------------------------------------------

def _check_mode(time_mode: str) -> None:
    if time_mode not in TIME_MODES:
        raise EqmError(f"time_mode must be one of {', '.join(TIME_MODES)}, got {time_mode!r}")


def check_timestamps(timestamps: torch.Tensor, num_frames: Optional[int] = None) -> torch.Tensor:
    """Validate timestamps (B, T) or (T,) seconds and return them as (B, T) (a view, no copy)."""
    if not torch.is_tensor(timestamps):
        raise EqmError(f"timestamps must be a tensor of seconds, got {type(timestamps).__name__}")
    if timestamps.ndim == 1:
        timestamps = timestamps[None]
    if timestamps.ndim != 2:
        raise EqmError(f"timestamps must have shape (B, T) or (T,), got {tuple(timestamps.shape)}")
    if num_frames is not None and timestamps.shape[1] != num_frames:
        raise EqmError(f"timestamps have {timestamps.shape[1]} frames but the clip has {num_frames}")
    if not timestamps.is_floating_point():
        timestamps = timestamps.float()
    return timestamps


def temporal_coords(
    timestamps: Optional[torch.Tensor],
    num_frames: int,
    *,
    time_mode: str = "seconds",
    ref_fps: float = DEFAULT_REF_FPS,
    temporal_patch: int = 1,
    device=None,
    offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """tau for every temporal token: (B, T // temporal_patch), or (1, ...) when timestamps is None.

    ``seconds``: tau = (t - min t) * ref_fps, relative to each clip's own first frame.
    ``index`` / ``fps-embed``: tau = frame index.  timestamps=None means index positions in every
    mode (an image or a clip of unknown rate is treated as if sampled at ref_fps).
    offset: (B,) tau added to every token of each clip (training's random time shift,
    ``train.time_shift``); None = clips start at tau 0 (always the case at sampling).
    """
    _check_mode(time_mode)
    if timestamps is not None:
        timestamps = check_timestamps(timestamps, num_frames)
        device = timestamps.device
    if num_frames % temporal_patch:
        raise EqmError(f"{num_frames} frames cannot be cut into temporal patches of {temporal_patch}")
    if time_mode == "seconds" and timestamps is not None:
        # Relative to the clip's first (earliest) frame -- min, not column 0, so listing the
        # frames in another order permutes the tokens and nothing else.  float32 seconds in,
        # float32 tau out: frame k of an f-fps clip encodes exactly like time k/f in any clip.
        tau = (timestamps - timestamps.amin(1, keepdim=True)) * float(ref_fps)
    else:
        tau = torch.arange(num_frames, device=device, dtype=torch.float32)[None]
        if timestamps is not None:
            tau = tau.expand(timestamps.shape[0], -1)
    tau = tau.float()
    if temporal_patch > 1:  # a token covering several frames takes their mean time
        tau = tau.reshape(tau.shape[0], num_frames // temporal_patch, temporal_patch).mean(-1)
    if offset is not None:
        offset = offset.to(device=tau.device, dtype=torch.float32).reshape(-1, 1)
        if tau.shape[0] != 1 and offset.shape[0] != tau.shape[0]:
            raise EqmError(f"time offset has {offset.shape[0]} values for a batch of {tau.shape[0]} clips")
        tau = tau + offset
    return tau


def token_coords(tau: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Per-token (tau, row, col) for tokens ordered (time, row, col), time outermost: (B, T'*gh*gw, 3).

    This is the token order of the model (frames patchified like DiT's PatchEmbed, which
    flattens rows then columns).
    """
    B, Tp = tau.shape
    rows = torch.arange(grid_h, device=tau.device, dtype=torch.float32)
    cols = torch.arange(grid_w, device=tau.device, dtype=torch.float32)
    t = tau[:, :, None, None].expand(B, Tp, grid_h, grid_w)
    r = rows[None, None, :, None].expand(B, Tp, grid_h, grid_w)
    c = cols[None, None, None, :].expand(B, Tp, grid_h, grid_w)
    return torch.stack([t, r, c], dim=-1).reshape(B, Tp * grid_h * grid_w, 3)


def clip_fps(timestamps: Optional[torch.Tensor], default_fps: float, batch: int = 1, device=None) -> torch.Tensor:
    """Each clip's own mean frame rate (T - 1) / (t_max - t_min): (B,) float.

    A single frame (T = 1) or timestamps=None has no rate; it gets ``default_fps`` (the model
    uses its ref_fps).  Clips whose timestamps span no time (T > 1, all equal) raise.
    """
    if timestamps is None:
        return torch.full((batch,), float(default_fps), device=device)
    timestamps = check_timestamps(timestamps)
    B, T = timestamps.shape
    if T == 1:
        return torch.full((B,), float(default_fps), device=timestamps.device)
    span = timestamps.amax(1) - timestamps.amin(1)
    if bool((span <= 0).any()):
        raise EqmError("timestamps of a clip with several frames span no time; cannot derive its fps")
    return (T - 1) / span.float()


# --------------------------------------------------------------------------------------------
# sincos
# --------------------------------------------------------------------------------------------

def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int, *, base: float = BASE) -> torch.Tensor:
    """DiT/MAE 2D code: [sincos(col, dim/2) | sincos(row, dim/2)] -> (..., dim)."""
    if dim % 4:
        raise EqmError(f"sincos positions need hidden_size divisible by 4, got {dim}")
    return torch.cat([sincos_1d(cols, dim // 2, base=base), sincos_1d(rows, dim // 2, base=base)], dim=-1)


def sincos_time(
    tau: torch.Tensor, dim: int, time_frac: float = DEFAULT_TIME_FRAC, *, base: float = BASE,
    order: str = DEFAULT_TIME_ORDER,
) -> torch.Tensor:
    """The temporal part of the sincos code, laid out over all dim channels: (..., dim), 0 at tau=0."""
    check_time_order(order)
    d_t = sincos_time_channels(dim, time_frac)
    out = tau.new_zeros(*tau.shape, dim, dtype=torch.float32)
    if d_t == 0:
        return out
    m = d_t // 2
    sin_at, cos_at = sincos_time_slices(dim, time_frac)
    code = sincos_1d(tau, d_t, base=base)
    out[..., sin_at] = _in_layout(code[..., :m], order)        # sin(v tau) on col's cos channels
    out[..., cos_at] = _in_layout(code[..., m:], order) - 1.0  # cos(v tau) - 1 on row's cos channels
    return out


def read_sincos_time(code: torch.Tensor, dim: int, time_frac: float = DEFAULT_TIME_FRAC, *, order: str = DEFAULT_TIME_ORDER):
    """Invert the layout of :func:`sincos_time`: (..., dim) -> (sin part, cos - 1 part), each (..., d_t/2), fastest first."""
    check_time_order(order)
    sin_at, cos_at = sincos_time_slices(dim, time_frac)
    return _in_layout(code[..., sin_at], order), _in_layout(code[..., cos_at], order)


def sincos_time_slices(dim: int, time_frac: float = DEFAULT_TIME_FRAC) -> tuple[slice, slice]:
    """Channels of the dim-wide code that :func:`sincos_time` writes: (sin(v tau) part, cos(v tau) - 1 part).

    One definition of the layout, shared by sincos_time and by tools that read the temporal code
    back out of it (``eqmctl inspect-embed``).  Empty slices when d_t = 0.
    """
    m = sincos_time_channels(dim, time_frac) // 2
    return slice(dim // 2 - m, dim // 2), slice(dim - m, dim)


def sincos_3d(
    coords: torch.Tensor, dim: int, time_frac: float = DEFAULT_TIME_FRAC, *, base: float = BASE,
    order: str = DEFAULT_TIME_ORDER,
) -> torch.Tensor:
    """Full sincos code of per-token coordinates (..., 3) = (tau, row, col) -> (..., dim)."""
    tau, rows, cols = coords.unbind(-1)
    return sincos_2d(rows, cols, dim, base=base) + sincos_time(tau, dim, time_frac, base=base, order=order)


def sincos_grid_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """The image model's fixed table (grid_h*grid_w, dim), row-major -- DiT's pos_embed[0]."""
    rows = torch.arange(grid_h, dtype=torch.float32).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float32).repeat(grid_h)
    return sincos_2d(rows, cols, dim)


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------

def rope_angles(coords: torch.Tensor, head_dim: int, time_frac: float = DEFAULT_TIME_FRAC, *, base: float = BASE) -> torch.Tensor:
    """Rotation angle of every channel pair: coords (..., 3) -> (..., head_dim / 2), groups [t | row | col]."""
    split = rope_split(head_dim, time_frac)
    parts = []
    for axis, d in enumerate(split):  # three axes, not samples or heads
        omega = frequencies(d, base=base, device=coords.device, dtype=torch.float32)
        parts.append(coords[..., axis, None].float() * omega)
    return torch.cat(parts, dim=-1)


def rope_cos_sin(coords: torch.Tensor, head_dim: int, time_frac: float = DEFAULT_TIME_FRAC, *, base: float = BASE):
    """(cos, sin) of the rotary angles, shaped (B, 1, N, head_dim/2) to broadcast over heads."""
    ang = rope_angles(coords, head_dim, time_frac, base=base)[:, None]
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, H, N, hd) by the angles behind cos/sin (B|1, 1, N, hd/2)."""
    work = torch.promote_types(x.dtype, torch.float32)  # rotate in >= float32 (bf16 is too coarse)
    xp = x.to(work).unflatten(-1, (-1, 2))
    cos, sin = cos.to(work), sin.to(work)
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


# --------------------------------------------------------------------------------------------
# Precomputed positions: built once per sampling run, passed to the model as pos=
# --------------------------------------------------------------------------------------------

@dataclass
class Positions:
    """Everything the model derives from coordinates, computed once (``model.positions``).

    add:   (B|1, N, D) sincos code added to the tokens, or None (rope)
    rope:  (cos, sin), each (B|1, 1, N, head_dim/2), or None (sincos)
    fps:   (B|1,) clip frame rates for fps-embed conditioning, or None
    num_frames: T of the clip these positions were built for; num_tokens: N.
    """

    add: Optional[torch.Tensor]
    rope: Optional[tuple[torch.Tensor, torch.Tensor]]
    fps: Optional[torch.Tensor]
    num_frames: int
    num_tokens: int

    @property
    def batch(self) -> int:
        for t in (self.add, None if self.rope is None else self.rope[0], self.fps):
            if t is not None:
                return t.shape[0]
        return 1

    def select(self, index: torch.Tensor) -> "Positions":
        """Rows ``index`` of every per-sample tensor (broadcast rows of size 1 are kept)."""

        def pick(t):
            return t if t is None or t.shape[0] == 1 else t.index_select(0, index)

        rope = None if self.rope is None else (pick(self.rope[0]), pick(self.rope[1]))
        return replace(self, add=pick(self.add), rope=rope, fps=pick(self.fps))

    @staticmethod
    def cat(items: Sequence["Positions"]) -> "Positions":
        """Concatenate along the batch (e.g. the cond and uncond halves of a CFG batch)."""
        first = items[0]
        n = [p.batch for p in items]

        def join(ts):
            if ts[0] is None:
                return None
            return torch.cat([t.expand(k, *t.shape[1:]) for t, k in zip(ts, n)], dim=0)

        rope = None
        if first.rope is not None:
            rope = (join([p.rope[0] for p in items]), join([p.rope[1] for p in items]))
        return replace(first, add=join([p.add for p in items]), rope=rope, fps=join([p.fps for p in items]))


# --------------------------------------------------------------------------------------------
# Measurement used to choose ref_fps (also used by `eqmctl inspect-embed`)
# --------------------------------------------------------------------------------------------

def adjacent_frame_similarity(fps: float, ref_fps: float, time_dim: int, *, base: float = BASE) -> float:
    """Cosine similarity of the temporal sin/cos codes of two adjacent frames at ``fps``.

    For [sin(v tau), cos(v tau)] the similarity depends only on the step d = ref_fps / fps:
    mean_j cos(v_j d).  1 means indistinguishable.
    """
    d = torch.tensor([0.0, float(ref_fps) / float(fps)], dtype=torch.float64)
    omega = frequencies(time_dim, base=base, dtype=torch.float64)
    arg = d[:, None] * omega
    e = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
    return float(torch.nn.functional.cosine_similarity(e[0], e[1], dim=0))
