"""The PyAV rules that probing (eqm.video.probe) and reading (eqm.video.io) share.

One place decides how an input file is opened, what counts as a video (not a still image, not
text, not cover art), which header frame rate is preferred, and how a PyAV error reads in a
message, so that ``eqmctl probe-fps`` and training / retiming never disagree about a file.
"""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Optional

from eqm.timebase import MAX_FPS

#: Stream header rates in order of preference: the mean rate of the stream, then libavformat's
#: "real base rate" (the smallest rate that represents every timestamp), then its guess.
RATE_ATTRS = ("average_rate", "base_rate", "guessed_rate")

# Demuxers for single images or text: they expose a "video" stream but are not videos. Every
# "*_pipe" demuxer reads single images (png_pipe, jpeg_pipe, webp_pipe, ...) except gif_pipe, an
# animated GIF without a .gif name. Animated PNG opens with the "apng" demuxer, a video. Animated
# WebP opens with webp_pipe, whose decoder reads single images only (no frame decodes).
_STILL_IMAGE_FORMATS = {"image2"}
_TEXT_FORMATS = {"tty"}
_ANIMATED_PIPES = {"gif_pipe"}


def open_input(path) -> "av.container.InputContainer":  # noqa: F821
    """av.open for reading a local file: the "file:" prefix keeps a name such as "pipe:0",
    "http:clip.mp4" or "concat:a|b" from being taken as a protocol, and metadata in a legacy
    encoding is replaced instead of failing the open.  Raises PyAV / OS errors unchanged."""
    import av

    return av.open("file:" + os.path.abspath(path), "r", metadata_errors="replace")


def error_text(err: BaseException) -> str:
    """A PyAV or OS error as one line: its strerror (PyAV messages repeat the file name and the
    errno, which the caller's message already has), whitespace collapsed."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())


def _is_animated_webp(path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(21)
    except OSError:
        return False
    # RIFF....WEBPVP8X with the animation flag (bit 1 of the first flags byte)
    return len(head) == 21 and head[:4] == b"RIFF" and head[8:16] == b"WEBPVP8X" and bool(head[20] & 0x02)


def not_video_reason(container, path) -> Optional[str]:
    """Why an opened file is not a video ("a still image (png_pipe), not a video", ...), or None.
    Judged by the demuxer alone; a container without a video stream is the caller's case."""
    fmt = container.format.name or ""
    names = set(fmt.split(","))
    if names & _TEXT_FORMATS:
        return f"a text file ({fmt}), not a video"
    if names & _STILL_IMAGE_FORMATS or any(n.endswith("_pipe") and n not in _ANIMATED_PIPES for n in names):
        if "webp_pipe" in names and _is_animated_webp(path):
            return "an animated WebP, which FFmpeg reads as a single image only; convert it (e.g. to .mp4 or .gif)"
        return f"a still image ({fmt}), not a video"
    return None


def video_streams(container) -> list:
    """The container's video streams, without cover art (an attached picture in an mp3 or m4a)
    and still-image streams."""
    import av

    disp = getattr(av.stream, "Disposition", None)
    skip = int(getattr(disp, "attached_pic", 0)) | int(getattr(disp, "still_image", 0))
    return [s for s in container.streams.video if not (int(s.disposition) & skip)]


def _valid_rate(r) -> Optional[Fraction]:
    try:
        if r is None:
            return None
        r = Fraction(r)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return r if 0 < r <= MAX_FPS else None


def header_rates(stream) -> list[tuple[Fraction, str]]:
    """The stream's usable header rates as (exact rate, "stream.<attr>"), in RATE_ATTRS order;
    a rate that is unset, zero or above MAX_FPS is left out."""
    out = []
    for attr in RATE_ATTRS:
        try:
            rate = _valid_rate(getattr(stream, attr, None))
        except Exception:  # noqa: BLE001 - some PyAV builds raise on unset rates
            rate = None
        if rate is not None:
            out.append((rate, f"stream.{attr}"))
    return out


def header_rate(stream) -> Optional[Fraction]:
    """The preferred header rate of a stream (first of :func:`header_rates`), None if none."""
    rates = header_rates(stream)
    return rates[0][0] if rates else None


__all__ = ["RATE_ATTRS", "error_text", "header_rate", "header_rates", "not_video_reason", "open_input", "video_streams"]
