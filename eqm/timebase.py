"""Frame rates as exact fractions, timestamps in seconds, and unit conversion.

Frame rates are `fractions.Fraction` everywhere a rate is stored or written: NTSC rates are
30000/1001 etc., never 29.97 as a float.  A rate is parsed once where it enters (a CLI option, a
recipe, a file header: :func:`parse_fps`) and travels as a Fraction from there.  Three spellings,
one for each reader: :func:`format_fps` for people ("30000/1001 (29.970)"), :func:`fps_tag` for
file names ("29.97"), and ``str(fps)`` (Fraction's own, "30000/1001") for JSON, which
:func:`parse_fps` reads back exactly.  :func:`frames_for_duration` is the one rule that turns
seconds into a frame count.  Timestamps are float tensors of seconds relative to a clip's first
frame, shape (T,) or (B, T).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

from .errors import EqmError

#: Rates above this are refused as input: no container or display uses them and they are almost
#: always a typo (e.g. 6000 for 60). Override by passing max_fps.
MAX_FPS = 1000
#: Slowest rate accepted: one frame per 100 s (GIF's longest frame is 655 s; container time bases
#: overflow somewhere below 1/100000).
MIN_FPS = Fraction(1, 100)

# Decimal spellings people use for the NTSC family, mapped to their exact fractions.
_NTSC = {
    "23.976": Fraction(24000, 1001),
    "23.98": Fraction(24000, 1001),
    "29.97": Fraction(30000, 1001),
    "47.952": Fraction(48000, 1001),
    "59.94": Fraction(60000, 1001),
    "119.88": Fraction(120000, 1001),
}


def parse_fps(value: str | int | float | Fraction, *, name: str = "fps", max_fps: float = MAX_FPS) -> Fraction:
    """Parse a frame rate: "30", "29.97", "30000/1001", 24, 23.976, Fraction(24000, 1001).

    NTSC decimal spellings map to their exact fractions. Raises EqmError naming `name` for zero,
    negative, nan, inf, non-numeric or absurd (> max_fps) values.
    """
    raw = value
    try:
        if isinstance(value, Fraction):
            fps = value
        elif isinstance(value, bool):
            raise ValueError
        elif isinstance(value, int):
            fps = Fraction(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise EqmError(f"{name} must be a finite number of frames per second, got {value!r}")
            fps = _NTSC.get(repr(value)) or Fraction(repr(value))
        else:
            text = str(value).strip().lower()
            if text in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
                raise EqmError(f"{name} must be a finite number of frames per second, got {raw!r}")
            if text in _NTSC:
                fps = _NTSC[text]
            elif "/" in text:
                num, den = text.split("/", 1)
                fps = Fraction(int(num), int(den))
            else:
                f = float(text)
                if not math.isfinite(f):
                    raise EqmError(f"{name} must be a finite number of frames per second, got {raw!r}")
                fps = Fraction(text)
    except EqmError:
        raise
    except (ValueError, ZeroDivisionError, TypeError):
        raise EqmError(f"{name} must be a number of frames per second like 24, 29.97 or 30000/1001, got {raw!r}") from None
    if fps <= 0:
        raise EqmError(f"{name} must be positive, got {raw!r}")
    if fps > max_fps:
        raise EqmError(f"{name}={raw!r} is above the supported maximum of {max_fps} fps")
    if fps < MIN_FPS:
        raise EqmError(f"{name}={raw!r} is below the supported minimum of {float(MIN_FPS):g} fps (one frame per 100 s)")
    return fps


def format_fps(fps: Fraction) -> str:
    """For people: '30000/1001 (29.970)' for non-integer rates, '30' for integer ones."""
    fps = Fraction(fps)
    if fps.denominator == 1:
        return str(fps.numerator)
    return f"{fps.numerator}/{fps.denominator} ({float(fps):.3f})"


def fps_tag(fps: Fraction) -> str:
    """For file names: 24 -> '24', 30000/1001 -> '29.97', 24000/1001 -> '23.976' (no slash, no spaces)."""
    fps = Fraction(fps)
    if fps.denominator == 1:
        return str(fps.numerator)
    return f"{float(fps):.3f}".rstrip("0").rstrip(".")


def uniform_timestamps(num_frames: int, fps: Fraction | float, *, device=None, dtype=None):
    """Timestamps t_k = k / fps in seconds for k = 0..num_frames-1, as a float tensor (T,).

    Computed as k * den / num in float64 before casting, so 30000/1001 stays exact to float32
    precision however long the clip.
    """
    import torch

    if num_frames < 1:
        raise EqmError(f"number of frames must be at least 1, got {num_frames}")
    fps = parse_fps(fps) if not isinstance(fps, Fraction) else fps
    k = torch.arange(num_frames, dtype=torch.float64, device=device)
    t = k * (fps.denominator / fps.numerator)
    return t.to(dtype or torch.get_default_dtype())


def frames_for_duration(seconds: float | Fraction, fps: Fraction) -> int:
    """The frame count of ``seconds`` at ``fps``: seconds * fps rounded half up, at least 1.

    The one rule for every clip length (sampling, retiming, plots): 0.25 s at 10 fps is 3
    frames.  Half up rather than Python's half-to-even, whose result for an exact half depends on
    the parity of the count (2.5 -> 2 but 3.5 -> 4).  A float duration is read as the nearest
    fraction with a denominator up to 10^6, so 0.1 s is exactly 1/10 s; a Fraction (a constant-
    rate video's n / fps_in) is used as it is.
    """
    if isinstance(seconds, Fraction):
        d = seconds
    else:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
            raise EqmError(f"duration must be a positive number of seconds, got {seconds!r}")
        d = Fraction(seconds).limit_denominator(10**6)
    if d <= 0:
        raise EqmError(f"duration must be a positive number of seconds, got {float(d)!r}")
    return max(1, math.floor(d * Fraction(fps) + Fraction(1, 2)))


def mean_rate(pts: Sequence[float]) -> float | None:
    """Mean frame rate of sorted presentation times: (n - 1) / (last - first); None if undefined."""
    if len(pts) < 2:
        return None
    span = float(pts[-1]) - float(pts[0])
    return (len(pts) - 1) / span if span > 0 else None


def is_variable_rate(pts: Sequence[float], *, rel_tol: float = 0.05, abs_tol: float = 1.5e-3) -> bool:
    """True when the gaps between sorted presentation times are irregular.

    A gap counts as irregular when it differs from the median gap by more than
    max(rel_tol * median, abs_tol); the absolute floor absorbs millisecond rounding of containers
    with a 1/1000 time base (mkv, webm), which would otherwise flag every NTSC file.
    """
    if len(pts) < 3:
        return False
    s = sorted(float(p) for p in pts)
    gaps = [b - a for a, b in zip(s, s[1:])]
    med = sorted(gaps)[len(gaps) // 2]
    if med <= 0:
        return True
    tol = max(rel_tol * med, abs_tol)
    return any(abs(g - med) > tol for g in gaps)


def format_eta(seconds: float) -> str:
    """A remaining time for progress lines: 'H:MM:SS' (negative times read as 0)."""
    m, s = divmod(max(0, int(round(seconds))), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
