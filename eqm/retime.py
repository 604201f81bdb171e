"""Change the frame rate of an existing video: resample, speed change, or model in-betweens.

``resample``: new rate, same duration and real motion speed (nearest frame by time, or a blend
of the two around it).  ``speed``: the same frames at the new rate, so motion speeds up or slows
down.  ``model``: the time-aware model generates the new frames at their timestamps with the
original frames clamped (docs/reference.md#clamped-frames), in windows that each start at an
original and contain the next; for a constant-rate input the new rate must be a whole multiple of
the old.  Original frames in the output are the decoded input frames, never the model's copies;
audio is not carried over.  The design of each mode and why: docs/design.md#retime.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .config import SamplerSettings
from .errors import EqmError, NonFiniteError, ParamError
from .timebase import format_fps, frames_for_duration, is_variable_rate, parse_fps

MODES = ("resample", "speed", "model")

#: Refuse outputs whose decoded frames would need more memory than this: retime holds the whole
#: output in memory before encoding, and a typo like --fps 6000 on a long 4K file should be an
#: error, not an out-of-memory kill.
MAX_OUTPUT_BYTES = 8 * 1024**3

#: A constant-rate original counts as "on" an output slot when it is within this fraction of a
#: slot of it (container time bases round pts; 1 % is far above that rounding and far below
#: anything a viewer would see).
SLOT_TOLERANCE = 0.01

#: Output times within this many seconds of a frame's pts count as exactly on it (float rounding
#: of k / fps against container time bases; a microsecond is far below any frame period).
_TIME_EPS = 1e-6


# =============================================================================================
# Results
# =============================================================================================


@dataclass
class RetimeResult:
    """What :func:`retime_video` wrote.

    fps_in: the input's declared (average) rate, None when the file declares none; vfr_in: the
    input's frame times are irregular.  duration_in / duration_out in seconds; frames_out and
    duration_out are what the writer stored (a GIF can drop 0-cs frames).  generated: frames
    synthesized by the model (model mode); windows / evals: sampler windows and the model
    evaluations each used.  notices: things the user should know (audio dropped, snapping, ...).
    """

    path: Path
    mode: str
    fps_in: Optional[Fraction]
    fps_out: Fraction
    frames_in: int
    frames_out: int
    duration_in: float
    duration_out: float
    notices: list = field(default_factory=list)
    vfr_in: bool = False
    generated: int = 0
    windows: int = 0
    evals: list = field(default_factory=list)


@dataclass
class Interpolation:
    """Output of :func:`interpolate_frames`.

    frames: uint8 (n_out, H, W, 3) at the input's size; times: (n_out,) seconds, k / fps;
    source: (n_out,) index of the original frame placed in each slot, -1 for generated frames;
    evals: model evaluations used by each window; notices: snapping and similar remarks.
    """

    frames: np.ndarray
    times: np.ndarray
    source: np.ndarray
    evals: list
    windows: list
    notices: list = field(default_factory=list)

    @property
    def known(self) -> np.ndarray:
        return self.source >= 0

    @property
    def generated(self) -> int:
        return int((self.source < 0).sum())


# =============================================================================================
# Timing helpers (pure)
# =============================================================================================


def output_times(num_frames: int, fps) -> np.ndarray:
    """t_k = k / fps seconds for k = 0 .. num_frames - 1, float64 (k * den / num, exact for NTSC)."""
    fps = _rate(fps)
    return np.arange(int(num_frames), dtype=np.float64) * (fps.denominator / fps.numerator)


def video_duration(pts, fps=None, *, last_duration: Optional[float] = None):
    """Playing time of a video whose frames are shown at ``pts`` (seconds from the first frame).

    Constant rate (regular pts and a declared ``fps`` that matches them): exactly n / fps, as a
    Fraction.  Otherwise (variable rate): pts[-1] + the last frame's display time, which is
    ``last_duration`` when known (the container's packet duration), else 1 / fps, else the last
    gap between frames.  Returns (duration, vfr).
    """
    pts = np.asarray(pts, dtype=np.float64)
    n = int(pts.shape[0])
    if n == 0:
        raise EqmError("a video needs at least one frame")
    vfr = is_variable_rate(pts)
    rate = Fraction(fps) if fps else None
    if rate is not None and not vfr and abs(pts[-1] - (n - 1) / float(rate)) <= 0.5 / float(rate):
        return Fraction(n) / rate, False
    if last_duration is not None and last_duration > 0:
        tail = float(last_duration)
    elif rate is not None:
        tail = 1.0 / float(rate)
    elif n > 1:
        tail = float(pts[-1] - pts[-2])
    else:
        raise EqmError("cannot tell how long a single frame without a frame rate lasts")
    return float(pts[-1]) + tail, vfr


def resample_indices(pts, times, *, blend: bool = False):
    """For each output time, the input frames it is made of.

    Returns (i0, i1, w): output = (1 - w) * frame[i0] + w * frame[i1].  Without blending i0 == i1
    is the frame whose pts is nearest (ties go to the earlier one, which is on screen at that
    instant) and w = 0.  With blending i0 is the frame on screen at t (last pts <= t), i1 the next
    one and w = (t - pts[i0]) / (pts[i1] - pts[i0]).  Times after the last frame hold it; times
    within a microsecond of a pts count as exactly on it.
    """
    pts = np.asarray(pts, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    n = pts.shape[0]
    if n == 0:
        raise EqmError("cannot resample a video without frames")
    if n > 1 and np.any(np.diff(pts) <= 0):
        raise EqmError("frame times must be strictly increasing")
    j = np.clip(np.searchsorted(pts, times + _TIME_EPS, side="right") - 1, 0, n - 1)
    nxt = np.minimum(j + 1, n - 1)
    gap = pts[nxt] - pts[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(gap > 0, (times - pts[j]) / np.where(gap > 0, gap, 1.0), 0.0)
    w = np.clip(w, 0.0, 1.0)
    if blend:
        return j, nxt, w
    nearest = np.where(w > 0.5, nxt, j)
    return nearest, nearest, np.zeros_like(w)


def resample_frames(frames: np.ndarray, pts, fps, *, duration=None, blend: bool = False):
    """Resample uint8 frames (T, H, W, 3) shown at ``pts`` to ``fps`` over the same duration.

    duration: seconds (or an exact Fraction) the input plays; default :func:`video_duration`
    without a declared rate (pts[-1] + the last gap).  Returns (frames_out uint8 (n, H, W, 3),
    times (n,) float64 = k / fps) with n = round(duration * fps).
    """
    frames = _check_frames(frames)
    pts = np.asarray(pts, dtype=np.float64)
    if pts.shape != (frames.shape[0],):
        raise EqmError(f"need one pts per frame: {frames.shape[0]} frames, pts shape {tuple(pts.shape)}")
    fps = _rate(fps)
    if duration is None:
        duration, _ = video_duration(pts, None, last_duration=None if len(pts) > 1 else 1.0 / float(fps))
    n = frames_for_duration(duration, fps)
    _check_memory(n, frames.shape[1:])
    times = output_times(n, fps)
    i0, i1, w = resample_indices(pts, times, blend=blend)
    if not blend:
        return frames[i0], times
    out = np.empty((n, *frames.shape[1:]), dtype=np.uint8)
    for a in range(0, n, 64):  # chunks: a float copy of a whole long video would not fit in memory
        b = min(n, a + 64)
        ww = w[a:b, None, None, None].astype(np.float32)
        mix = (1.0 - ww) * frames[i0[a:b]].astype(np.float32) + ww * frames[i1[a:b]].astype(np.float32)
        out[a:b] = np.clip(np.rint(mix), 0, 255).astype(np.uint8)
    return out, times


def model_slots(pts, fps_out, *, vfr: bool, fps_in=None):
    """Output slot of every original frame for model mode, and notices.

    Slot i = round(pts_i * fps_out).  A constant-rate input must land on the grid
    (docs/design.md#retime): otherwise an EqmError suggests whole multiples of its rate.  A
    variable-rate input is snapped, with a notice giving the largest shift.  Originals sharing a
    slot are an error.
    """
    pts = np.asarray(pts, dtype=np.float64)
    fps_out = _rate(fps_out)
    pos = pts * float(fps_out)
    slots = np.rint(pos).astype(np.int64)
    off = np.abs(pos - slots)
    # Collisions first: a lower rate is the commonest cause and deserves the clearer message.
    if len(slots) > 1 and np.any(np.diff(slots) <= 0):
        where = int(np.nonzero(np.diff(slots) <= 0)[0][0])
        raise ParamError(
            "fps", f"fps {format_fps(fps_out)} is too low for mode 'model', which adds frames and cannot drop any: "
            f"original frames {where} and {where + 1} ({pts[where]:.4f} s, {pts[where + 1]:.4f} s) fall on the same "
            "output frame; use a higher rate, or mode 'resample' to lower it"
        )
    notices = []
    if off.max(initial=0.0) > SLOT_TOLERANCE:
        if not vfr:
            rate = Fraction(fps_in) if fps_in else None
            if rate is None and len(pts) > 1:
                rate = Fraction(1 / float(np.median(np.diff(pts)))).limit_denominator(1001)
            hint = ""
            if rate:
                k = max(1, math.floor(fps_out / rate))
                hint = f" (e.g. {format_fps(rate * k)} or {format_fps(rate * (k + 1))})"
            src = format_fps(rate) if rate else "the input rate"
            raise ParamError(
                "fps", f"fps must be a whole multiple of the input rate {src}{hint} for mode 'model', which keeps "
                f"every original frame; use mode 'resample' for {format_fps(fps_out)} fps"
            )
        shift_ms = off.max() / float(fps_out) * 1000
        notices.append(
            f"variable-rate input: original frames moved to the nearest output frame time at {format_fps(fps_out)} fps "
            f"(largest shift {shift_ms:.1f} ms)"
        )
    return slots, notices


def slot_done_all(slots, start: int, stop: int) -> bool:
    """True when every output slot in [start, stop) holds an original frame."""
    return bool(np.isin(np.arange(start, stop), slots).all())


@dataclass
class Window:
    """One model call: output slots [start, start + length); generated frames in [start, stop)
    are kept.  chained: its clamped frames include frames generated by an earlier window."""

    start: int
    stop: int
    chained: bool = False


def plan_windows(slots, num_out: int, length: int) -> list:
    """Windows covering num_out output slots, given the slots of the originals (slots[0] == 0).

    docs/design.md#retime: anchored windows start at an original and keep their in-betweens
    up to the last original inside them; a tail beyond the last original that one window cannot
    reach is covered by chained windows overlapping the previous one by half a window.
    """
    slots = np.asarray(slots, dtype=np.int64)
    if length < 2:
        raise ParamError("window", f"window must be at least 2 frames, got {length}")
    if slots.size == 0 or slots[0] != 0:
        raise EqmError("the first original frame must sit on output slot 0")
    gaps = np.diff(slots)
    if gaps.size and gaps.max() >= length:
        g = int(gaps.max())
        raise ParamError(
            "window", f"window {length} is too short: original frames are {g} output frames apart, so a window "
            f"needs at least {g + 1} frames to hold two of them (a longer window or a lower fps)"
        )
    wins: list[Window] = []
    s = 0
    while True:
        if s + length >= num_out:
            wins.append(Window(s, num_out))
            return wins
        inside = slots[(slots > s) & (slots < s + length)]
        if inside.size == 0:
            break  # beyond the last original: the tail needs chained windows
        wins.append(Window(s, int(inside[-1])))
        s = int(inside[-1])
    # Tail: the first window from the last original keeps everything it generates; each further
    # window overlaps the previous one by half a window of clamped (generated) frames.
    wins.append(Window(s, s + length))
    overlap = max(1, length // 2)
    covered = s + length
    while covered < num_out:
        start = covered - overlap
        wins.append(Window(start, min(num_out, start + length), chained=True))
        covered = start + length
    return wins


# =============================================================================================
# Model mode
# =============================================================================================


def _resize(x, size):
    """(N, C, h, w) float -> (N, C, H, W): bilinear with antialiasing (identity at equal size)."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def interpolate_frames(
    model,
    frames: np.ndarray,
    pts,
    fps,
    *,
    duration=None,
    vfr: Optional[bool] = None,
    fps_in=None,
    window: Optional[int] = None,
    label: Optional[int] = None,
    settings: Optional[SamplerSettings] = None,
    seed: int = 0,
    batch_size: Optional[int] = None,
    dtype: Optional[str] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    vae=None,
) -> Interpolation:
    """Raise the frame rate of uint8 frames (T, H, W, 3) shown at ``pts`` to ``fps`` with the model.

    The original frames are placed unchanged in their output slots (``frames[i]`` is bit-identical
    in the result); the other slots are generated by :func:`eqm.sampler.sample` with the
    originals clamped.  duration: seconds the input plays (default: :func:`video_duration`).
    vfr: whether pts are irregular (default: detected).  fps_in: the declared input rate (for
    the error message when a constant-rate input does not fit the new grid).  window: output
    frames per model call (default model.config.num_frames, widened with a notice when originals are
    further apart; a multiple of the model's temporal patch).  label: class id for a
    class-conditional model (None: the null label, i.e. unconditional).  settings: the sampler
    (default ``SamplerSettings()``; guidance not chosen = none).  progress(done, total) is called
    after each window batch.  vae: the per-frame VAE (eqm.vae.Vae) of a latent-space model:
    originals are encoded and clamped in latent space, in-betweens decoded (:func:`check_retime_vae`
    says which VAEs work).
    """
    import torch

    from .timebase import uniform_timestamps
    from .video.io import from_uint8

    frames = _check_frames(frames)
    pts = np.asarray(pts, dtype=np.float64)
    if pts.shape != (frames.shape[0],):
        raise EqmError(f"need one pts per frame: {frames.shape[0]} frames, pts shape {tuple(pts.shape)}")
    fps = _rate(fps)
    settings = (settings or SamplerSettings()).with_default_guidance(1.0)
    check_retime_vae(model, vae)
    L = _check_interp_args(model, window, label, batch_size)
    slots, n_out, wins, L, notices = _plan_interpolation(model, pts, fps, duration, vfr, fps_in, window, L)
    _check_memory(n_out, frames.shape[1:])

    # Model-space values (pixels, or latents of a VAE) of every decided slot (originals resized
    # and encoded, then generated frames), the source of each window's clamped frames.
    n_total = max([n_out] + [w.start + L for w in wins])  # windows may run past the end: extra slots are discarded
    h, w_ = model.config.input_size
    px = (h, w_) if vae is None else (h * vae.spatial, w_ * vae.spatial)  # the model's frame size in pixels
    buf = torch.zeros((n_total, model.config.in_channels, h, w_), dtype=torch.float32)
    done = np.zeros(n_total, dtype=bool)
    for a in range(0, len(slots), 64):  # chunks: the float copy of a whole video at full size is big
        chunk = _resize(from_uint8(frames[a : a + 64]).permute(1, 0, 2, 3), px).clamp(-1, 1)  # (N, 3, ph, pw)
        buf[slots[a : a + 64]] = chunk if vae is None else vae.encode(chunk.permute(1, 0, 2, 3)[None])[0].permute(1, 0, 2, 3).cpu()
    done[slots] = True

    source = np.full(n_out, -1, dtype=np.int64)
    source[slots] = np.arange(len(slots))
    out = np.empty((n_out, *frames.shape[1:]), dtype=np.uint8)
    out[slots] = frames
    ts = uniform_timestamps(L, fps, dtype=torch.float32)
    run = _WindowRun(model, settings, vae, ts, label, seed, dtype, progress)
    evals = run.fill(wins, buf, done, out, n_out, batch_size)
    if not done[:n_out].all():  # a planning bug, never a user error: fail loudly
        raise RuntimeError(f"retime left {int((~done[:n_out]).sum())} output frames ungenerated")
    return Interpolation(
        frames=out, times=output_times(n_out, fps), source=source, evals=evals, windows=wins, notices=notices,
    )


def _check_interp_args(model, window, label, batch_size) -> int:
    """The model window length L (window, or the model's clip length) after checking the arguments."""
    tp = int(model.config.temporal_patch)
    if window is not None and (isinstance(window, bool) or int(window) != window):
        raise ParamError("window", f"window must be a whole number of frames, got {window!r}")
    L = int(model.config.num_frames if window is None else window)
    if L < 2:
        raise ParamError("window", f"window must be at least 2 frames, got {L}")
    if L % tp:
        raise ParamError("window", f"window {L} must be a multiple of the model's temporal patch ({tp} frames)")
    if label is not None:
        if model.config.num_classes <= 0:
            raise ParamError("label", "label given but the model was trained without classes")
        if not 0 <= int(label) < model.config.num_classes:
            raise ParamError(
                "label", f"label {label} is out of range: the model has {model.config.num_classes} classes (0..{model.config.num_classes - 1})"
            )
    if batch_size is not None and batch_size < 1:
        raise ParamError("batch_size", f"batch_size must be >= 1, got {batch_size}")
    return L


def _plan_interpolation(model, pts, fps, duration, vfr, fps_in, window, L):
    """Output slots of the originals, output length, model windows (and their length) and notices."""
    if vfr is None:
        vfr = is_variable_rate(pts)
    if duration is None:
        duration, _ = video_duration(pts, fps_in)
    slots, notices = model_slots(pts, fps, vfr=vfr, fps_in=fps_in)
    n_out = max(frames_for_duration(duration, fps), int(slots[-1]) + 1)
    if model.config.time_mode == "index":
        notices.append(
            "this model numbers frames by index (time_mode=index): it cannot see the new rate, so its in-betweens "
            "move at the speed of its training clips"
        )
    if window is None:
        # The default window is the model's clip length; when originals are further apart than
        # that (high ratios, VFR gaps) widen it just enough to hold two of them, rather than fail:
        # the positional encoding takes any length, only quality away from the training length
        # is uncertain, so say so.  An explicit --window is taken as given (plan_windows errors).
        tp = int(model.config.temporal_patch)
        gap = int(np.diff(slots).max(initial=0))
        need = -(-(gap + 1) // tp) * tp
        if need > L:
            notices.append(
                f"originals are {gap} output frames apart: model windows widened to {need} frames "
                f"(the model was trained on {L}-frame clips)"
            )
            L = need
    wins = plan_windows(slots, n_out, L)
    # A window with nothing to generate (fps_out == the input rate) would only burn compute.
    wins = [w for w in wins if w.chained or not slot_done_all(slots, w.start, min(w.stop, n_out))]
    if not wins:
        notices.append(f"the input already has a frame at every output time at {format_fps(fps)} fps: nothing to generate")
    return slots, n_out, wins, L, notices


class _WindowRun:
    """Generates the in-betweens window by window with the decided frames clamped.

    Anchored windows depend only on originals and are batched; chained windows depend on the
    one before, so they go one at a time.  Every generated frame is written into ``buf`` (model
    space, the next windows' clamped input) and, decoded and resized, into ``out``.
    """

    def __init__(self, model, settings, vae, ts, label, seed, dtype, progress):
        self.model, self.settings, self.vae, self.ts = model, settings, vae, ts
        self.label, self.seed, self.dtype, self.progress = label, seed, dtype, progress
        self.device = next(model.parameters()).device

    def fill(self, wins, buf, done, out, n_out, batch_size) -> list:
        from .generate import _check_work, sample_noise

        L = self.ts.shape[0]
        noise = sample_noise(len(wins), (buf.shape[1], L, *buf.shape[2:]), self.seed)
        evals = [0] * len(wins)
        anchored = [i for i, win in enumerate(wins) if not win.chained]
        chained = [i for i, win in enumerate(wins) if win.chained]
        bs = max(1, len(anchored)) if batch_size is None else batch_size
        _check_work(self.model, L, min(bs, max(1, len(anchored))), self.device, self.settings)
        groups = [anchored[i : i + bs] for i in range(0, len(anchored), bs)] + [[i] for i in chained]
        finished = 0
        for group in groups:
            res = self._sample(group, wins, buf, done, noise, L)
            for b, i in enumerate(group):
                evals[i] = int(res.evals[b])
                self._keep(wins[i], res.x[b], buf, done, out, n_out)
            finished += len(group)
            if self.progress is not None:
                self.progress(finished, len(wins))
        return evals

    def _sample(self, group, wins, buf, done, noise, L):
        import torch

        from .generate import _autocast
        from .sampler import sample

        known = torch.stack([buf[wins[i].start : wins[i].start + L] for i in group]).permute(0, 2, 1, 3, 4)
        mask = torch.from_numpy(np.stack([done[wins[i].start : wins[i].start + L] for i in group]))
        n, dev = len(group), self.device
        y = None if self.label is None else torch.full((n,), int(self.label), dtype=torch.long, device=dev)
        with _autocast(dev, self.dtype):
            res = sample(self.model, noise[group].to(dev), self.ts.to(dev).expand(n, -1), y, self.settings,
                         known=known.to(dev), known_mask=mask.to(dev))
        res.x = res.x.float().cpu()
        if not torch.isfinite(res.x).all():
            raise NonFiniteError(
                f"sampling diverged (non-finite values) with step_size {self.settings.step_size}; try a smaller step_size"
            )
        if self.vae is None:
            res.x = res.x.clamp(-1, 1)
        return res

    def _keep(self, win, x, buf, done, out, n_out) -> None:
        """Store the window's frames for the slots not decided yet (x: (C, L, h, w) model space)."""
        import torch

        from .video.io import to_uint8

        keep = [k for k in range(win.start, win.stop) if k < n_out and not done[k]]
        if not keep:
            return
        gen = x[:, torch.tensor([k - win.start for k in keep])]  # (C, K, h, w) model space
        buf[keep] = gen.permute(1, 0, 2, 3)
        done[keep] = True
        pix = gen if self.vae is None else self.vae.decode(gen[None])[0]  # (3, K, ph, pw)
        full = _resize(pix.permute(1, 0, 2, 3), out.shape[1:3]).clamp(-1, 1)  # back to the video's size
        out[keep] = to_uint8(full.permute(1, 0, 2, 3))


def check_retime_vae(model, vae) -> None:
    """EqmError unless ``model`` can make in-betweens: a pixel RGB model, or a latent model with
    its per-frame VAE. A temporally compressing VAE is refused: one latent frame stands for
    several frames, so an original can neither be kept and clamped on its own nor an in-between
    be placed at its own timestamp."""
    if vae is None:
        if model.config.in_channels != 3:
            raise ParamError("vae", f"vae is needed: this model works in a VAE's latent space ({model.config.in_channels} "
                                    "channels); pass the VAE it was trained with (eqm.vae.load_vae of its folder)")
        return
    if vae.temporal > 1:
        raise ParamError("mode", f"mode 'model' needs a per-frame VAE, and this model's ({vae.describe()}) turns "
                         f"{vae.temporal} frames into one latent frame, so original frames cannot be kept and clamped "
                         f"one by one; use mode 'resample', or a model trained through a per-frame VAE such as SD-VAE")
    if vae.latent_channels != model.config.in_channels:
        raise EqmError(f"the VAE {vae.identity.describe()} makes {vae.latent_channels}-channel latents, the model takes "
                       f"{model.config.in_channels}")


# =============================================================================================
# Files
# =============================================================================================


def check_paths(src, dst) -> tuple[Path, Path]:
    """Validate the output path before any work: known suffix, not the input file, not a folder."""
    from .video.io import WRITE_FORMATS

    s, d = Path(src), Path(dst)
    if d.suffix.lower() not in WRITE_FORMATS:
        raise EqmError(f"output {d}: unknown video format {d.suffix or '(no suffix)'!r}; use one of {', '.join(WRITE_FORMATS)}")
    if d.is_dir():
        raise EqmError(f"output {d} is a folder; give a file name like {d / (s.stem + '_retimed.mp4')}")
    same = s.resolve() == d.resolve()
    if not same and s.exists() and d.exists():
        try:
            same = os.path.samefile(s, d)
        except OSError:
            same = False
    if same:
        raise EqmError(f"output {d} is the input file; retime never overwrites its input, choose another name")
    return s, d


def retime_video(
    src,
    dst,
    fps,
    mode: str = "resample",
    *,
    blend: bool = False,
    model=None,
    crf: float = 18,
    codec: Optional[str] = None,
    window: Optional[int] = None,
    label: Optional[int] = None,
    settings: Optional[SamplerSettings] = None,
    seed: int = 0,
    batch_size: Optional[int] = None,
    dtype: Optional[str] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    vae=None,
) -> RetimeResult:
    """Read ``src`` (any file PyAV decodes), change its rate to ``fps`` by ``mode`` and write ``dst``.

    mode: "resample" (``blend`` for linear blending), "speed", or "model" (needs ``model``, an
    EqMTransformer; window / label / settings and a latent model's ``vae`` go to
    :func:`interpolate_frames`).
    The output format follows dst's suffix (.mp4 / .mkv / .gif); crf / codec go to the writer.
    Audio is dropped with a notice.  Raises EqmError (exit code 2) for bad input before writing
    anything; the output is written atomically.
    """
    from .video.io import read_video, write_video

    if mode not in MODES:
        raise ParamError("mode", f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    fps_out = _rate(fps)
    if mode == "model" and model is None:
        raise ParamError("model", "model is needed for mode 'model' (a trained EqMTransformer, e.g. from eqm.checkpoint.load_model)")
    if mode == "model":
        check_retime_vae(model, vae)  # before reading the input: a refusal costs nothing
    src, dst = check_paths(src, dst)
    if mode == "speed":
        return _retime_speed(src, dst, fps_out, codec=codec, crf=crf)

    video = read_video(src)
    n_in = int(video.frames.shape[0])
    notices = _audio_notice(src, video.has_audio)
    duration_in, vfr = _input_duration(src, video.pts, video.fps)
    fps_in = video.fps

    generated, windows, evals = 0, 0, []
    if mode == "resample":
        out, _ = resample_frames(video.frames, video.pts, fps_out, duration=duration_in, blend=blend)
    else:
        res = interpolate_frames(
            model, video.frames, video.pts, fps_out, duration=duration_in, vfr=vfr, fps_in=fps_in, window=window,
            label=label, settings=settings, seed=seed,
            batch_size=batch_size, dtype=dtype, progress=progress, vae=vae,
        )
        out = res.frames
        notices.extend(res.notices)
        generated, windows, evals = res.generated, len(res.windows), res.evals

    written = write_video(dst, out, fps_out, codec=codec, crf=crf)
    notices.extend(written.warnings)
    return RetimeResult(
        path=Path(written.path), mode=mode, fps_in=fps_in, fps_out=written.fps, frames_in=n_in,
        frames_out=written.num_frames, duration_in=float(duration_in), duration_out=float(written.duration),
        notices=notices, vfr_in=vfr, generated=generated, windows=windows, evals=evals,
    )


@dataclass
class CheckpointRetime:
    """What :func:`retime_checkpoint` did: the checkpoint it used, the retime, and the notes
    (warnings) it had for the user."""

    checkpoint: Path
    state: dict
    result: RetimeResult
    notes: list


def retime_checkpoint(src, dst, fps, ckpt, *, use_ema: bool = True, device: Optional[str] = None, label=None,
                      vae=None, runs_root="runs", **options) -> CheckpointRetime:
    """`eqmctl retime --mode model` as a function: the checkpoint loaded as sampling loads it
    (EMA weights, or the raw ones with a note), ``label`` as a class index or name, a latent
    model's VAE (the recorded one, or the folder ``vae``), then :func:`retime_video` in mode
    model with ``options`` (window, settings, seed, batch_size, dtype, crf, codec, progress).
    A diverged window is a NonFiniteError that names the checkpoint.
    """
    from .generate import load_for_sampling, parse_labels
    from .latent import checkpoint_vae

    model, state, notes = load_for_sampling(ckpt, use_ema=use_ema, device=device, runs_root=runs_root)
    y = None
    if label is not None:
        names = list(state.get("class_names") or [])
        y = int(parse_labels(str(label), model.config.num_classes, 1, names, param="label")[0])
    vae = checkpoint_vae(state, vae, next(model.parameters()).device, where=state["checkpoint"])
    try:
        result = retime_video(src, dst, fps, "model", model=model, label=y, vae=vae, **options)
    except NonFiniteError as e:
        raise NonFiniteError(f"checkpoint {state.get('checkpoint')}: {e}") from None
    return CheckpointRetime(checkpoint=Path(state["checkpoint"]), state=state, result=result, notes=notes)


def _retime_speed(src: Path, dst: Path, fps_out: Fraction, *, codec, crf) -> RetimeResult:
    """--mode speed: the same frames at ``fps_out``, streamed from the decoder to the encoder (one
    frame in memory, whatever the input's length; a GIF output collects its frames first)."""
    from .video.io import open_frames, write_video

    pts: list[float] = []
    with open_frames(src) as video:
        first = next(video.frames, None)
        if first is None:
            raise EqmError(f"no frames could be decoded from {src}")

        def frames():
            for t, image in itertools.chain([first], video.frames):
                pts.append(t)
                yield image

        written = write_video(dst, frames(), fps_out, codec=codec, crf=crf)
    rel = np.asarray(pts, dtype=np.float64) - pts[0]
    duration_in, vfr = _input_duration(src, rel, video.fps)
    notices = _audio_notice(src, video.has_audio)
    if vfr:
        notices.append(f"variable-rate input: its irregular frame times are replaced by a constant {format_fps(fps_out)} fps")
    notices.extend(written.warnings)
    return RetimeResult(
        path=Path(written.path), mode="speed", fps_in=video.fps, fps_out=written.fps, frames_in=len(pts),
        frames_out=written.num_frames, duration_in=float(duration_in), duration_out=float(written.duration),
        notices=notices, vfr_in=vfr,
    )


def _audio_notice(src: Path, has_audio: bool) -> list[str]:
    return [f"{src.name} has an audio track; retime writes video only, so the audio was dropped"] if has_audio else []


def _input_duration(src: Path, pts: np.ndarray, fps: Optional[Fraction]):
    """(duration, vfr) of the input; a variable-rate file's last frame lasts its real packet duration."""
    last = None
    if is_variable_rate(pts):
        from .video.probe import probe_file  # the last frame's real display time (packet duration)

        pr = probe_file(src)
        if pr.status == "ok" and pr.duration and pr.duration > pts[-1]:
            last = pr.duration - float(pts[-1])
    return video_duration(pts, fps, last_duration=last)


# =============================================================================================
# Small checks
# =============================================================================================


def _rate(fps) -> Fraction:
    return fps if isinstance(fps, Fraction) and fps > 0 else parse_fps(fps)


def _check_frames(frames) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise EqmError(f"frames must be uint8 with shape (T, H, W, 3) and T >= 1, got {arr.dtype} {tuple(arr.shape)}")
    return arr


def _check_memory(n: int, frame_shape) -> None:
    need = int(n) * int(np.prod(frame_shape))
    if need > MAX_OUTPUT_BYTES:
        raise EqmError(
            f"the output would be {n} frames of {frame_shape[1]}x{frame_shape[0]} ({need / 1024**3:.1f} GiB decoded); "
            f"retime holds a video in memory, the limit is {MAX_OUTPUT_BYTES / 1024**3:.0f} GiB: cut the input or lower the output rate"
        )
