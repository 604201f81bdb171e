"""Reading clips by seeking, and writing videos that play at exactly the requested rate.

`read_clip` seeks to the keyframe before the first wanted frame and decodes forward only to the
last one, returning the frames' real presentation times; `read_video` decodes a whole file (for
retiming, never for training clips).  `write_video` picks the format from the suffix: ``.mp4`` /
``.mkv`` (H.264, time base 1/fps with fps an exact fraction, or 1/90000 for explicit pts) and
``.gif`` (delays in whole 1/100 s, rounded so the total duration is exact; written with Pillow for
its per-frame palette).  Every write is atomic.  Frames for I/O are numpy uint8 (T, H, W, 3); model
tensors float (C, T, H, W) in [-1, 1] (`to_uint8` / `from_uint8`); the writers accept either.
The rules: docs/reference.md#outputs; the choices and why: docs/design.md#video-io.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from eqm import fsio
from eqm.errors import EqmError
from eqm.timebase import parse_fps
from eqm.video.av_util import error_text, header_rate, not_video_reason, open_input, video_streams

__all__ = [
    "Clip",
    "VideoData",
    "WriteResult",
    "read_clip",
    "read_video",
    "write_video",
    "write_png_frames",
    "write_grid_png",
    "to_uint8",
    "from_uint8",
    "WRITE_FORMATS",
]

#: Output suffix -> libavformat muxer name ("gif" is written by Pillow: docs/design.md#video-io).
WRITE_FORMATS = {".mp4": "mp4", ".mkv": "matroska", ".gif": "gif"}

#: Time base for variable-rate output: 90 kHz is the MPEG system clock, fine enough that any
#: realistic frame time (and every NTSC rate) lands within 6 microseconds of what was asked.
VFR_TIME_BASE = Fraction(1, 90000)

#: Above this rate a GIF needs delays below 2/100 s, which browsers raise to 10/100 s.
GIF_MAX_EXACT_FPS = 50

#: Default H.264 encoder settings. "medium" is x264's own default; outputs here are small (a few
#: seconds at <= 256 px), so the slower presets cost little and CRF 18 is visually lossless.
DEFAULT_CODEC = "libx264"
DEFAULT_PRESET = "medium"

# Codecs that store chroma at half resolution need even frame sizes.
_SUBSAMPLED_PIX_FMTS = {"yuv420p", "yuvj420p", "nv12", "nv21", "yuv420p10le"}


# =============================================================================================
# Data types
# =============================================================================================


@dataclass
class Clip:
    """Frames read by `read_clip`.

    frames: uint8 (T, H, W, 3), one per requested time, in request order.
    pts: float64 (T,), absolute stream time in seconds of each returned frame (what the frame's
    own presentation timestamp says, not the requested time). Subtract pts[0] for the
    clip-relative timestamps a model uses.
    """

    frames: np.ndarray
    pts: np.ndarray

    def __len__(self) -> int:
        return int(self.frames.shape[0])


@dataclass
class VideoData:
    """A whole decoded video: frames uint8 (T, H, W, 3), pts float64 (T,) seconds from the first
    frame, fps the stream's header rate (eqm.video.av_util.header_rate) as an exact fraction (None
    when the file declares none),
    has_audio whether the container also holds audio."""

    frames: np.ndarray
    pts: np.ndarray
    fps: Optional[Fraction]
    has_audio: bool


@dataclass
class WriteResult:
    """What `write_video` wrote.

    fps is the exact rate the file declares (for variable-rate output: the nominal rate passed
    in, used for the last frame's duration). duration is the playing time in seconds: T / fps for
    a constant rate, the span of the written pts plus the last frame's duration otherwise, and
    the sum of the centisecond delays for a GIF. num_frames is the number of frames stored (a GIF
    drops frames whose delay rounds to 0 cs; a warning says so).
    """

    path: Path
    fps: Fraction
    num_frames: int
    duration: float
    warnings: list[str] = field(default_factory=list)


# =============================================================================================
# Pixel conversion
# =============================================================================================


def to_uint8(video) -> np.ndarray:
    """(C, T, H, W) float in [-1, 1] (torch tensor or numpy array) -> numpy uint8 (T, H, W, 3).

    Values are mapped with (x + 1) * 127.5, rounded to the nearest integer and clamped, so
    `to_uint8(from_uint8(f))` returns `f` exactly. NaN becomes 0 (black would hide the pixel;
    mid-grey would too, but 0 is what a clamp of -inf gives). One channel is repeated to three.
    """
    if _is_tensor(video):
        arr = video.detach().to("cpu").float().numpy()
    else:
        arr = np.asarray(video)
    if arr.ndim != 4:
        raise EqmError(f"video must have shape (C, T, H, W), got {tuple(arr.shape)}")
    if arr.shape[0] not in (1, 3):
        raise EqmError(f"video must have 1 or 3 channels in dimension 0 of (C, T, H, W), got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise EqmError(f"video must be float in [-1, 1], got dtype {arr.dtype}")
    x = np.nan_to_num(arr.astype(np.float32, copy=False), nan=-1.0)
    x = np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0))


def from_uint8(frames):
    """numpy uint8 (T, H, W, 3) -> torch float32 (3, T, H, W) in [-1, 1] (x / 127.5 - 1)."""
    import torch

    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise EqmError(f"frames must be uint8 with shape (T, H, W, 3), got {arr.dtype} {tuple(arr.shape)}")
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(3, 0, 1, 2).float()
    return t.div_(127.5).sub_(1.0)


def _is_tensor(x) -> bool:
    # Checked by name so that importing this module never imports torch.
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _as_frames(frames, path: Path) -> np.ndarray:
    """Normalise writer input to a contiguous uint8 (T, H, W, 3) array, or raise naming `path`."""
    if frames is None:
        raise EqmError(f"cannot write {path}: no frames given")
    if _is_tensor(frames) and not frames.is_floating_point():
        frames = frames.detach().to("cpu").numpy()
    if _is_tensor(frames) or (isinstance(frames, np.ndarray) and np.issubdtype(frames.dtype, np.floating)):
        shape = tuple(frames.shape)
        if len(shape) != 4 or shape[0] not in (1, 3):
            raise EqmError(f"cannot write {path}: float frames must have shape (C, T, H, W) with C = 1 or 3, got {shape}")
        if 0 in shape:
            raise EqmError(f"cannot write {path}: no frames to write (shape {shape})")
        return to_uint8(frames)
    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        raise EqmError(f"cannot write {path}: frames must be uint8 (T, H, W, 3) or float (C, T, H, W) in [-1, 1], got dtype {arr.dtype}")
    if arr.ndim == 3:  # (T, H, W) greyscale
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise EqmError(f"cannot write {path}: uint8 frames must have shape (T, H, W, 3), got {tuple(arr.shape)}")
    if 0 in arr.shape:
        raise EqmError(f"cannot write {path}: no frames to write (shape {tuple(arr.shape)})")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


# =============================================================================================
# Reading
# =============================================================================================


def _check_input(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise EqmError(f"video file not found: {p}")
    if p.is_dir():
        raise EqmError(f"{p} is a folder, not a video file")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise EqmError(f"cannot read video {p}: {e.strerror or e}") from None
    if size == 0:
        raise EqmError(f"cannot read video {p}: the file is empty")
    return p


def _open_video(p: Path):
    """Open `p` and return (container, video stream); one-line EqmError for anything unreadable.
    What counts as a video is eqm.video.av_util's rule, the one probe-fps applies."""
    import av

    try:
        container = open_input(p)
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise EqmError(f"cannot read video {p}: {error_text(e)}") from None
    try:
        why = not_video_reason(container, p)
        if why is not None:
            raise EqmError(f"{p} is {why}")
        videos = video_streams(container)
        if not videos:
            raise EqmError(f"{p} has no video stream")
    except BaseException:
        container.close()
        raise
    return container, videos[0]


def _frame_time(frame, stream) -> Optional[float]:
    if frame.pts is None:
        return None
    tb = frame.time_base or stream.time_base
    return float(frame.pts * tb)


def _seek(container, stream, target: float, stats: dict) -> bool:
    """Seek to the keyframe at or before `target` seconds; False if the demuxer cannot seek."""
    import av

    tb = stream.time_base
    try:
        container.seek(int(math.floor(target / tb)) if tb else 0, stream=stream, backward=True, any_frame=False)
    except av.error.FFmpegError:
        stats["seek_failures"] += 1
        return False
    stats["seeks"] += 1
    return True


def _decode(container, stream, stats: dict) -> Iterator:
    """Decoded frames of `stream` in presentation order, counted in stats["decoded_frames"]."""
    for frame in container.decode(stream):
        stats["decoded_frames"] += 1
        yield frame


def read_clip(path, times: Sequence[float], *, stats: Optional[dict] = None) -> Clip:
    """Read the frames nearest to `times` (absolute stream seconds) from the video at `path`.

    Seeks to the keyframe at or before min(times), decodes forward until a frame at or after
    max(times) has come out, and returns, for each requested time in the order given, the
    decoded frame whose presentation time is nearest (ties go to the earlier frame, the one on
    screen at that instant). The decoder hands frames out in presentation order, so B-frame
    reordering needs no extra care; frames whose pts go backwards (broken files) are ignored.

    A time up to one frame duration past the last frame (or before the first) still gets the
    last (first) frame: the last frame is on screen until the end of the video. Further out is an
    EqmError naming the file, as are missing, empty or undecodable files and files without a
    video stream.

    `stats`, if given, is a dict that receives "decoded_frames" (frames the decoder produced,
    including those between the keyframe and the first wanted time), "seeks" and
    "seek_failures": the measurable proof that a clip does not decode the whole file.
    """
    import av

    p = _check_input(path)
    req = np.asarray(list(times) if not isinstance(times, np.ndarray) else times, dtype=np.float64)
    if req.ndim != 1 or req.size == 0:
        raise EqmError(f"clip times for {p} must be a non-empty list of seconds, got shape {tuple(req.shape)}")
    if not np.all(np.isfinite(req)):
        raise EqmError(f"clip times for {p} must be finite numbers of seconds")
    st = stats if stats is not None else {}
    st.update(decoded_frames=0, seeks=0, seek_failures=0)

    container, stream = _open_video(p)
    try:
        rate = header_rate(stream)
        step = 1.0 / float(rate) if rate else 0.0
        container, stream, first, frames = _decode_from(container, stream, p, float(req.min()), step, st)
        kept_frames, kept_times, chosen = _nearest_frames(first, frames, stream, req, step, p)
    except av.error.FFmpegError as e:
        raise EqmError(f"cannot decode video {p}: {error_text(e)}") from None
    finally:
        container.close()

    shapes = {f.shape for f in kept_frames}
    if len(shapes) != 1:
        raise EqmError(f"frames of {p} change size mid-stream ({sorted(shapes)}); cannot form a clip")
    out = np.stack([kept_frames[k] for k in chosen])
    pts = np.asarray([kept_times[k] for k in chosen], dtype=np.float64)
    return Clip(frames=out, pts=pts)


def _decode_from(container, stream, p: Path, lo: float, step: float, st: dict):
    """Seek so that the first decoded frame is at or before ``lo`` seconds; returns
    (container, stream, that first frame, the iterator of the frames after it).  The container
    may be a reopened one (the caller closes whichever is returned; on error it is closed here).

    A demuxer whose index is keyed by decode time (AVI and FLV with B-frames, for instance) can
    land on a keyframe whose presentation time is after the target, which would silently skip
    the frames just before it; so back off further and seek again until that cannot happen.
    """
    tb = stream.time_base
    start = float(stream.start_time * tb) if (stream.start_time is not None and tb) else 0.0
    target, back = lo, max(0.5, 2 * step)
    fresh = True  # nothing demuxed yet: the container sits at the start of the file
    try:
        while True:
            if target > start and not _seek(container, stream, target, st):
                target = start  # a demuxer that cannot seek: read from the start (slow, correct)
            if target <= start and not fresh:
                # Start over from a freshly opened file rather than seeking to time zero: some
                # demuxers (MPEG-TS) cannot reliably seek back to their very first keyframe.
                container.close()
                container, stream = _open_video(p)
            fresh = False
            frames = _decode(container, stream, st)
            first = next((f for f in frames if _frame_time(f, stream) is not None), None)
            at_start = target <= start
            if first is None:
                if at_start:
                    raise EqmError(f"no frames could be decoded from {p}")
            elif _frame_time(first, stream) <= lo or at_start:
                return container, stream, first, frames
            target = max(start, min(target, _frame_time(first, stream) if first is not None else target) - back)
            back *= 2
    except BaseException:
        container.close()
        raise


class _Picked:
    """Frames chosen for a clip, each converted to RGB once, only when some time picks it."""

    def __init__(self):
        self.frames: list[np.ndarray] = []
        self.times: list[float] = []

    def keep(self, cand: list) -> int:
        """cand = [time, av frame, index into self.frames or None]; returns the index."""
        if cand[2] is None:
            self.frames.append(cand[1].to_ndarray(format="rgb24"))
            self.times.append(cand[0])
            cand[2] = len(self.frames) - 1
        return cand[2]


def _nearest_frames(first, frames, stream, req: np.ndarray, step: float, p: Path):
    """For each requested time, the decoded frame nearest to it (ties to the earlier one);
    decoding stops once the last wanted time has passed.  Returns (RGB frames, their times,
    index of the frame for each requested time, in the order requested)."""
    order = np.argsort(req, kind="stable")
    sorted_req = req[order]
    chosen: list[Optional[int]] = [None] * len(req)
    picked = _Picked()
    first_time = _frame_time(first, stream)
    if sorted_req[0] < first_time - step - 1e-6:
        raise EqmError(f"clip time {sorted_req[0]:.4f} s is before the first frame of {p} (at {first_time:.4f} s)")
    i, prev, last_gap = 0, None, 0.0
    for frame in itertools.chain([first], frames):
        t = _frame_time(frame, stream)
        if t is None or (prev is not None and t <= prev[0]):
            continue
        cur = [t, frame, None]
        while i < len(sorted_req) and sorted_req[i] <= t:
            r = sorted_req[i]
            chosen[order[i]] = picked.keep(prev if (prev is not None and r - prev[0] <= t - r) else cur)
            i += 1
        if i == len(sorted_req):
            break  # the last wanted time has been passed: stop decoding here
        if prev is not None:
            last_gap = t - prev[0]
        prev = cur
    if i < len(sorted_req):
        # End of stream before the last wanted time: the last frame covers one frame duration
        # (or the last gap when the rate is unknown) past its own time.
        last_t = prev[0]
        if sorted_req[-1] > last_t + (step or last_gap) + 1e-6:
            raise EqmError(f"clip time {sorted_req[-1]:.4f} s is beyond the end of {p} (last frame at {last_t:.4f} s)")
        for j in range(i, len(sorted_req)):
            chosen[order[j]] = picked.keep(prev)
    return picked.frames, picked.times, chosen


@dataclass
class FrameReader:
    """A video opened for decoding one frame at a time (`open_frames`): ``fps`` (the header rate,
    eqm.video.av_util.header_rate, as an exact Fraction; None if unknown) and ``has_audio`` are
    known at once; ``frames`` yields (seconds, uint8 (H, W, 3)) in presentation order, seconds from
    the stream's start (duplicate or backwards timestamps of a broken file are dropped)."""

    fps: Optional[Fraction]
    has_audio: bool
    frames: Iterator


@contextlib.contextmanager
def open_frames(path) -> Iterator[FrameReader]:
    """Open ``path`` for streaming decode (one frame in memory at a time); one-line EqmError for
    an unreadable file or a decode error."""
    p = _check_input(path)
    container, stream = _open_video(p)
    try:
        fps = header_rate(stream)
        yield FrameReader(fps=fps, has_audio=len(container.streams.audio) > 0, frames=_decoded(container, stream, fps, p))
    finally:
        container.close()


def _decoded(container, stream, fps: Optional[Fraction], p: Path) -> Iterator:
    import av

    step = 1.0 / float(fps) if fps else 0.0
    last = None
    try:
        for frame in container.decode(stream):
            t = _frame_time(frame, stream)
            if t is None:  # no timestamp at all: assume the nominal rate
                t = (last + step) if last is not None else 0.0
            if last is not None and t <= last:
                continue  # duplicate or backwards pts in a broken file
            last = t
            yield t, frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
        raise EqmError(f"cannot decode video {p}: {error_text(e)}") from None


def read_video(path, max_frames: Optional[int] = None) -> VideoData:
    """Decode a whole video (or its first `max_frames` frames) into memory (`open_frames`).

    pts are seconds relative to the first decoded frame, in presentation order; fps is the
    stream's header rate (average, else base, else guessed: eqm.video.av_util.header_rate) as an
    exact Fraction, None if unknown.
    Meant for retiming user files; training clips use `read_clip`, streaming `open_frames`.
    """
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise EqmError(f"max_frames must be a positive integer, got {max_frames!r} (reading {path})")
    frames: list[np.ndarray] = []
    times: list[float] = []
    with open_frames(path) as video:
        for t, image in itertools.islice(video.frames, max_frames):
            frames.append(image)
            times.append(t)
    if not frames:
        raise EqmError(f"no frames could be decoded from {path}")
    if len({f.shape for f in frames}) != 1:
        raise EqmError(f"frames of {path} change size mid-stream; cannot read it as one video")
    pts = np.asarray(times, dtype=np.float64)
    return VideoData(frames=np.stack(frames), pts=pts - pts[0], fps=video.fps, has_audio=video.has_audio)


# =============================================================================================
# Writing
# =============================================================================================


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """eqm.fsio.atomic_path, with one-line errors naming `path` for an unusable destination."""
    folder = path.absolute().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EqmError(f"cannot write {path}: cannot create folder {folder} ({e.strerror or e})") from None
    if path.is_dir():
        raise EqmError(f"cannot write {path}: it is a folder")
    try:
        with fsio.atomic_path(path) as tmp:
            yield tmp
    except OSError as e:
        raise EqmError(f"cannot write {path}: {e.strerror or e}") from None


def _exact_rate(fps, path: Path, warnings: list[str]) -> Fraction:
    """parse_fps, then keep the denominator small enough for a container time base.

    A float spelling of an exact rate (float(Fraction(30000, 1001))) comes back from parse_fps
    as a fraction with a 10^14 denominator; snap it to the nearby rate with denominator <= 1001
    when that is the same number to float precision. Anything else is rounded to a denominator
    <= 10000 (a 32-bit time base) with a warning.
    """
    try:
        r = parse_fps(fps)
    except EqmError as e:
        raise EqmError(f"cannot write {path}: {e}") from None
    if r.denominator > 1001:
        snapped = r.limit_denominator(1001)
        if abs(snapped - r) <= r * Fraction(1, 10**9):
            return snapped
        approx = r.limit_denominator(10000)
        if approx != r:
            warnings.append(f"fps {float(r):.9g} stored as {approx} (a container time base needs a small denominator)")
        return approx
    return r


def _check_pts(pts, n: int, path: Path) -> np.ndarray:
    arr = np.asarray(pts.detach().cpu().numpy() if _is_tensor(pts) else pts, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise EqmError(f"cannot write {path}: pts must be a list of {n} times in seconds (one per frame), got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise EqmError(f"cannot write {path}: pts must be finite numbers of seconds")
    if n > 1 and np.any(np.diff(arr) <= 0):
        raise EqmError(f"cannot write {path}: pts must be strictly increasing")
    return arr - arr[0]  # the file starts at its first frame


def write_video(
    path,
    frames,
    fps,
    *,
    pts=None,
    codec: Optional[str] = None,
    crf: float = 18,
    keyint: Optional[int] = None,
    preset: str = DEFAULT_PRESET,
) -> WriteResult:
    """Write `frames` to `path` (.mp4, .mkv or .gif, chosen by suffix) at exactly `fps`.

    frames: uint8 (T, H, W, 3) or float (C, T, H, W) in [-1, 1] (numpy or torch), or an iterator
      of uint8 (H, W, 3) frames, encoded as they come (.mp4 / .mkv at a constant rate: memory
      stays one frame whatever the length; GIF and ``pts`` collect them first).
    fps: anything `eqm.timebase.parse_fps` accepts; stored as an exact fraction.
    pts: optional per-frame presentation times in seconds (strictly increasing, shifted so the
      first is 0) for variable-rate output; the last frame lasts 1 / fps.
    codec: PyAV encoder for .mp4/.mkv (default libx264); crf / preset apply to libx264/libx265.
    keyint: frames between keyframes (default round(fps), about one second, so clips seek fast).
    H.264 in yuv420p needs even sizes: odd frames are padded by repeating the last row/column,
    and the result's warnings say so.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in WRITE_FORMATS:
        known = ", ".join(WRITE_FORMATS)
        raise EqmError(f"cannot write {p}: unknown video format {suffix or '(no suffix)'!r}; use one of {known}")
    warnings: list[str] = []
    rate = _exact_rate(fps, p, warnings)
    streamed = _is_frame_iterator(frames)
    if streamed and (pts is not None or suffix == ".gif"):
        frames, streamed = list(frames), False  # GIF delays and pts need every frame up front
    arr = _FrameStream(frames, p) if streamed else _as_frames(frames, p)
    rel_pts = _check_pts(pts, arr.shape[0], p) if pts is not None else None
    if keyint is not None and (isinstance(keyint, bool) or not isinstance(keyint, int) or keyint < 1):
        raise EqmError(f"cannot write {p}: keyint must be a positive number of frames, got {keyint!r}")
    if isinstance(crf, bool) or not isinstance(crf, (int, float)) or not (0 <= crf <= 51):
        raise EqmError(f"cannot write {p}: crf must be a number from 0 to 51, got {crf!r}")

    if suffix == ".gif":
        if codec not in (None, "gif"):
            raise EqmError(f"cannot write {p}: codec {codec!r} does not apply to GIF")
        return _write_gif(p, arr, rate, rel_pts, warnings)
    return _write_av(p, WRITE_FORMATS[suffix], arr, rate, rel_pts, codec or DEFAULT_CODEC, crf, keyint, preset, warnings)


def _is_frame_iterator(frames) -> bool:
    return not (frames is None or _is_tensor(frames) or isinstance(frames, (np.ndarray, list, tuple)))


class _FrameStream:
    """An iterator of uint8 (H, W, 3) frames seen through the array interface `_write_av` uses:
    ``shape`` from the first frame (T unknown: -1), iteration checks every frame's type and size."""

    def __init__(self, frames, path: Path):
        self._it, self.path = iter(frames), path
        try:
            self._first = self._check(next(self._it), None)
        except StopIteration:
            raise EqmError(f"cannot write {path}: no frames to write") from None
        self.shape = (-1, *self._first.shape)

    def _check(self, frame, shape) -> np.ndarray:
        a = np.asarray(frame)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3 or 0 in a.shape:
            raise EqmError(f"cannot write {self.path}: streamed frames must be uint8 (H, W, 3), got {a.dtype} {a.shape}")
        if shape is not None and a.shape != shape:
            raise EqmError(f"cannot write {self.path}: frames change size mid-stream ({shape[1]}x{shape[0]} "
                           f"to {a.shape[1]}x{a.shape[0]})")
        return np.ascontiguousarray(a)

    def __iter__(self):
        yield self._first
        for frame in self._it:
            yield self._check(frame, self._first.shape)


def _pad_even(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    if frame.shape[0] == h and frame.shape[1] == w:
        return frame
    return np.pad(frame, ((0, h - frame.shape[0]), (0, w - frame.shape[1]), (0, 0)), mode="edge")


def _write_av(p: Path, fmt: str, arr, rate: Fraction, rel_pts, codec: str, crf, keyint, preset, warnings) -> WriteResult:
    import av

    try:
        enc = av.codec.Codec(codec, "w")
    except Exception:  # noqa: BLE001 - PyAV raises different types for unknown / decoder-only
        raise EqmError(f"cannot write {p}: video encoder {codec!r} is not available in this PyAV build") from None
    if enc.type != "video":
        raise EqmError(f"cannot write {p}: {codec!r} is not a video encoder")
    formats = [f.name for f in (enc.video_formats or [])]
    pix_fmt = "yuv420p" if (not formats or "yuv420p" in formats) else formats[0]

    n, h, w, _ = arr.shape  # n is -1 for a stream: counted while encoding
    if pix_fmt in _SUBSAMPLED_PIX_FMTS and (h % 2 or w % 2):
        h2, w2 = h + h % 2, w + w % 2
        warnings.append(f"{p.name}: padded {w}x{h} frames to {w2}x{h2} by repeating the last row/column ({pix_fmt} needs even sizes)")
        h, w = h2, w2

    if keyint is None:
        keyint = max(1, round(rate))  # about one keyframe per second: bounded seek cost

    if rel_pts is None:
        # Constant rate: time base 1/fps, frame k at pts k. The muxer may rescale (mp4 uses a
        # timescale that is a multiple of fps's numerator, matroska 1/1000) but the declared
        # rate stays the exact fraction.
        time_base = 1 / rate
        ticks = durations = None  # frame k: pts k, duration 1
    else:
        time_base = VFR_TIME_BASE
        ticks = np.rint(rel_pts / float(time_base)).astype(np.int64)
        last = max(1, round(Fraction(1) / rate / time_base))
        durations = np.append(np.diff(ticks), last)
        if n > 1 and np.any(durations[:-1] <= 0):
            raise EqmError(f"cannot write {p}: pts closer together than 1/90000 s")
        if fmt == "matroska":
            ms = np.rint(rel_pts * 1000)
            if n > 1 and np.any(np.diff(ms) <= 0):
                raise EqmError(f"cannot write {p}: matroska stores times in milliseconds and some pts are less than 1 ms apart; use .mp4")
        duration = float((int(ticks[-1]) + int(last)) * time_base)

    options = {"movflags": "+faststart"} if fmt == "mp4" else {}
    codec_options = {"crf": f"{crf:g}", "preset": str(preset)} if codec in ("libx264", "libx265") else {}
    if rel_pts is not None:
        # No B-frames for variable-rate output: x264 derives decode times for reordered frames
        # on a uniform grid, and an mp4 track's duration is the sum of decode-time steps, so
        # with B-frames irregular pts give a file whose declared duration is wrong.
        codec_options["bf"] = "0"
    with _atomic_path(p) as tmp:
        try:
            with av.open(str(tmp), "w", format=fmt, options=options) as c:
                s = c.add_stream(codec, rate=rate)
                s.width, s.height, s.pix_fmt = w, h, pix_fmt
                s.time_base = time_base
                cc = s.codec_context
                cc.time_base = time_base
                cc.gop_size = int(keyint)
                s.options = codec_options
                count = 0
                for k, image in enumerate(arr):
                    frame = av.VideoFrame.from_ndarray(_pad_even(image, h, w), format="rgb24")
                    frame.pts = k if ticks is None else int(ticks[k])
                    frame.time_base = time_base
                    # The encoder copies this to the packet: it is the last sample's duration
                    # in mp4, so the file's duration is T/fps and not (T-1)/fps.
                    frame.duration = 1 if durations is None else int(durations[k])
                    for packet in s.encode(frame):
                        c.mux(packet)
                    count += 1
                for packet in s.encode():
                    c.mux(packet)
        except (av.error.FFmpegError, ValueError) as e:
            raise EqmError(f"cannot write {p}: {codec} encoding failed: {error_text(e)}") from None
    if ticks is None:
        duration = float(count / rate)
    return WriteResult(path=p, fps=rate, num_frames=count, duration=duration, warnings=warnings)


def _gif_edges(n: int, rate: Fraction, rel_pts) -> list[int]:
    """Start of each frame in centiseconds, plus the end of the last one (n + 1 values).

    Rounding the cumulative start times (not each delay) keeps every frame within 0.5 cs of its
    true time and the total within 0.5 cs of the true duration.
    """

    def cs(x: Fraction) -> int:
        return math.floor(x * 100 + Fraction(1, 2))

    if rel_pts is None:
        return [cs(Fraction(k) / rate) for k in range(n + 1)]
    times = [Fraction(float(t)).limit_denominator(10**6) for t in rel_pts]
    return [cs(t) for t in times] + [cs(times[-1] + 1 / rate)]


def _write_gif(p: Path, arr: np.ndarray, rate: Fraction, rel_pts, warnings: list[str]) -> WriteResult:
    from PIL import Image

    edges = _gif_edges(arr.shape[0], rate, rel_pts)
    delays = [b - a for a, b in zip(edges, edges[1:])]
    # A frame whose delay rounds to 0 cs would be replaced in the same instant (and players show
    # 0-delay frames for 10 cs): drop it; the next frame starts at the same rounded time.
    keep = [k for k, d in enumerate(delays) if d > 0]
    if len(keep) < len(delays):
        warnings.append(f"{p.name}: {len(delays) - len(keep)} frames dropped: GIF delays are whole 1/100 s and they would last 0")
    delays = [delays[k] for k in keep]
    if rate > GIF_MAX_EXACT_FPS or any(d < 2 for d in delays):
        why = (
            f"{float(rate):g} fps is above {GIF_MAX_EXACT_FPS} fps" if rate > GIF_MAX_EXACT_FPS
            else "some pts are less than 20 ms apart"
        )
        warnings.append(
            f"{p.name}: {why}: GIF stores delays in whole 1/100 s, so some frames last under 2/100 s, "
            "which many players raise to 10/100 s (slow motion); use .mp4 for exact playback"
        )
    images = [Image.fromarray(arr[k]) for k in keep]
    with _atomic_path(p) as tmp:
        try:
            images[0].save(
                tmp,
                format="GIF",
                save_all=True,
                append_images=images[1:],
                # Milliseconds, but Pillow stores int(ms / 10): pass exact multiples of 10.
                duration=[10 * d for d in delays],
                loop=0,
            )
        except (OSError, ValueError) as e:
            raise EqmError(f"cannot write {p}: {e}") from None
    return WriteResult(path=p, fps=rate, num_frames=len(keep), duration=sum(delays) / 100, warnings=warnings)


# =============================================================================================
# PNG frames and grids
# =============================================================================================


def _save_png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    with _atomic_path(path) as tmp:
        try:
            Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
        except (OSError, ValueError) as e:
            raise EqmError(f"cannot write {path}: {e}") from None
    return path


def write_png_frames(folder, frames, *, prefix: str = "frame_") -> list[Path]:
    """Write each frame as `<folder>/<prefix>00000.png`, ... (each file atomically).

    frames: uint8 (T, H, W, 3) or float (C, T, H, W) in [-1, 1]. Returns the paths in order.
    """
    d = Path(folder)
    if d.exists() and not d.is_dir():
        raise EqmError(f"cannot write PNG frames to {d}: it exists and is not a folder")
    arr = _as_frames(frames, d)
    digits = max(5, len(str(arr.shape[0] - 1)))
    return [_save_png(d / f"{prefix}{k:0{digits}d}.png", arr[k]) for k in range(arr.shape[0])]


def write_grid_png(path, videos, *, pad: int = 2, pad_value: int = 255, max_columns: Optional[int] = None) -> Path:
    """One PNG with a row per sample and a column per frame, `pad` pixels of `pad_value` between.

    videos: float (B, C, T, H, W) or (C, T, H, W) in [-1, 1], uint8 (B, T, H, W, 3) or
    (T, H, W, 3), or a list of clips in either single-clip form (clips may differ in length and
    size; short rows are left blank). max_columns: show at most this many frames per row, evenly
    spaced from first to last (long clips would otherwise make an unviewably wide image).
    """
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise EqmError(f"cannot write grid {p}: the file name must end in .png")
    if not isinstance(pad, int) or pad < 0 or not (0 <= int(pad_value) <= 255):
        raise EqmError(f"cannot write grid {p}: pad must be >= 0 and pad_value in 0..255")
    if max_columns is not None and (not isinstance(max_columns, int) or max_columns < 1):
        raise EqmError(f"cannot write grid {p}: max_columns must be a positive integer, got {max_columns!r}")
    if isinstance(videos, (list, tuple)):
        clips = list(videos)
    else:
        ndim = len(videos.shape)
        is_float = videos.is_floating_point() if _is_tensor(videos) else np.issubdtype(np.asarray(videos).dtype, np.floating)
        if ndim not in (4, 5):
            kind = "(B, C, T, H, W) float" if is_float else "(B, T, H, W, 3) uint8"
            raise EqmError(f"cannot write grid {p}: expected {kind} videos, got shape {tuple(videos.shape)}")
        clips = list(videos) if ndim == 5 else [videos]
    if not clips:
        raise EqmError(f"cannot write grid {p}: no videos given")
    rows = [_as_frames(c, p) for c in clips]
    if max_columns is not None:
        rows = [r[np.unique(np.rint(np.linspace(0, len(r) - 1, min(max_columns, len(r)))).astype(int))] for r in rows]
    ch = max(r.shape[1] for r in rows)
    cw = max(r.shape[2] for r in rows)
    ncols = max(r.shape[0] for r in rows)
    grid = np.full((pad + len(rows) * (ch + pad), pad + ncols * (cw + pad), 3), int(pad_value), np.uint8)
    for i, r in enumerate(rows):
        for j in range(r.shape[0]):
            y, x = pad + i * (ch + pad), pad + j * (cw + pad)
            grid[y : y + r.shape[1], x : x + r.shape[2]] = r[j]
    return _save_png(p, grid)
