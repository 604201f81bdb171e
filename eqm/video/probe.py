"""Frame-rate probing of video files from container metadata and demuxed packet timestamps.

Frame rates come from container metadata read without decoding (docs/reference.md#probing).
`probe_file` opens a file with PyAV, reads the stream header (average / base / guessed rate, time
base, frame count) and then demuxes the video packets -- reads their timestamps, never decodes a
frame -- to get the real presentation times. The packet timestamps are the ground truth: a PyAV-written
variable-frame-rate mkv declares 30 fps while its frames really arrive at ~13 fps, and only the
packets tell. (libavformat's own `avformat_find_stream_info`, which `av.open` always runs, may
decode a frame or two internally to fill in codec parameters; that is bounded and independent of
the file's length.)

The results go to a JSONL manifest (`write_manifest` / `read_manifest`) that the training data
pipeline reads instead of probing again: per-file `pts` (sorted seconds relative to the first
video packet) and `keyframes` (same origin) let it choose frames and seek without opening the
file twice. `start` is the absolute stream time of that first packet, so the absolute time of a
frame is `start + pts[i]` (what a seek or a decoded frame's `frame.time` uses).

Broken inputs never raise: each gets a `status` other than "ok" and a one-line `reason`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from eqm import fsio
from eqm.errors import EqmError
from eqm.jsonio import dumps
from eqm.video.av_util import error_text, header_rates, not_video_reason, open_input, video_streams
from eqm.timebase import format_fps, is_variable_rate, mean_rate

#: Extensions treated as video when walking folders (compared lower-case). Files named on the
#: command line are probed whatever their extension.
VIDEO_EXTENSIONS = frozenset(
    {
        ".mp4", ".m4v", ".mkv", ".webm", ".mov", ".qt", ".avi", ".gif", ".flv", ".f4v", ".wmv",
        ".asf", ".mpg", ".mpeg", ".m2v", ".ts", ".m2ts", ".mts", ".3gp", ".3g2", ".ogv", ".vob",
        ".mxf", ".y4m", ".dv", ".divx", ".apng",
    }
)

#: Every status a result can have. Everything except "ok" counts as broken (CLI exit code 1).
STATUS_OK = "ok"
STATUSES = {
    "ok": "probed; the video stream and its packet timestamps are readable",
    "missing": "the path does not exist (or is a broken symlink)",
    "unreadable": "the file exists but cannot be read (permissions, not a regular file, I/O error)",
    "empty": "the file has zero bytes",
    "not-video": "not a media container, a still image, or a container without a video stream",
    "audio-only": "a media file with audio streams but no video stream",
    "truncated": "the file is cut short: its index or its last packets are missing",
    "corrupt": "a recognised container that cannot be demuxed cleanly",
    "no-frames": "a video stream with no packets",
}

# Where the frame rate came from when no header rate (eqm.video.av_util.RATE_ATTRS) fits.
SOURCE_PACKETS = "packet timestamps"

# Magic numbers of containers, used only to tell "a video file that is cut short" apart from "not
# a video at all" when libavformat refuses to open a file.
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")


@dataclass
class ProbeResult:
    """What `probe_file` learned about one file; one JSON object per line in a manifest.

    fps is the exact rate as a fraction string ("30000/1001", "24") and fps_float its value;
    fps_source names where it came from ("stream.average_rate", "stream.base_rate",
    "stream.guessed_rate" or "packet timestamps"). For a variable-frame-rate file (vfr=True) fps is
    what the container declares and measured_fps the mean rate of the packet timestamps, which is
    what the frames really do. pts / keyframes: seconds relative to the first video packet,
    sorted; start: absolute stream time of that packet in seconds.
    """

    path: str
    status: str = STATUS_OK
    reason: str = ""
    label: str = ""
    container: str | None = None
    codec: str | None = None
    width: int | None = None
    height: int | None = None
    fps: str | None = None
    fps_float: float | None = None
    fps_source: str | None = None
    frames: int | None = None
    frames_source: str | None = None
    duration: float | None = None
    vfr: bool = False
    measured_fps: float | None = None
    has_audio: bool = False
    time_base: str | None = None
    start: float | None = None
    size: int | None = None
    pts: list[float] = field(default_factory=list)
    keyframes: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def fps_fraction(self) -> Fraction | None:
        return Fraction(self.fps) if self.fps is not None else None

    def to_dict(self, *, timestamps: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not timestamps:
            d.pop("pts")
            d.pop("keyframes")
        return d


# ------------------------------------------------------------------------------------------------
# Finding files


def _is_hidden(name: str) -> bool:
    # Dot files include macOS "._clip.mp4" AppleDouble files, which carry a video extension but
    # hold resource-fork metadata; probing them would only add noise to the broken count.
    return name.startswith(".")


def collect_videos(paths: Iterable[str | os.PathLike], *, extensions: Iterable[str] = VIDEO_EXTENSIONS) -> list[Path]:
    """Expand files and folders into the list of files to probe.

    Folders are walked recursively, keeping files whose extension is in `extensions` and skipping
    hidden files and folders; the files of a folder come out sorted. Symlinked folders are
    followed after the real ones, each real folder once, so a file with a real folder in the tree
    is listed (and labelled) there, not under a link into it; a file reached a second time (a
    symlink or hard link to one already found, plain files first) is listed once. A file given
    directly is always kept, whatever its extension, so that a non-video named on the command
    line gets the status "not-video" instead of vanishing. Raises EqmError (exit code 2) for a
    path that does not exist.
    """
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    out: list[Path] = []
    seen: set[str] = set()
    inodes: set[tuple[int, int]] = set()

    def add(p: Path) -> None:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in _unique_files(_walk_videos(p, exts), inodes):
                add(f)
        elif p.exists() or p.is_symlink():
            add(p)
        else:
            raise EqmError(f"no such file or folder: {raw}")
    return out


def _walk_videos(root: Path, exts: set[str]) -> list[Path]:
    """Video files under ``root``: its real folders first, then folders reached only through
    symlinks (each real folder once: loops and second routes are cut)."""
    visited: set[tuple[int, int]] = set()
    files: list[Path] = []
    links: list[Path] = []
    tops = [root]
    while tops:
        for dirpath, dirnames, filenames in os.walk(tops.pop(0)):  # followlinks=False: links queue up
            try:
                st = os.stat(dirpath)
                key = (st.st_dev, st.st_ino)
            except OSError:
                key = None
            if key is not None and key in visited:
                dirnames[:] = []
                continue
            if key is not None:
                visited.add(key)
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            links.extend(Path(dirpath) / d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
            files.extend(Path(dirpath) / n for n in sorted(filenames)
                         if not _is_hidden(n) and os.path.splitext(n)[1].lower() in exts)
        if not tops:
            tops, links = links, []
    return files


def _unique_files(files: list[Path], inodes: set[tuple[int, int]]) -> list[Path]:
    """``files`` without a second route to the same file (by inode; plain files win over symlinks),
    in their order; ``inodes`` collects what was kept (shared across the folders named)."""
    keep: set[int] = set()
    for i in sorted(range(len(files)), key=lambda i: files[i].is_symlink()):
        try:
            st = os.stat(files[i])
        except OSError:  # a dangling link: kept, the probe reports it as missing
            keep.add(i)
            continue
        if (st.st_dev, st.st_ino) not in inodes:
            inodes.add((st.st_dev, st.st_ino))
            keep.add(i)
    return [f for i, f in enumerate(files) if i in keep]


# ------------------------------------------------------------------------------------------------
# Probing one file


def _sniff_container(head: bytes) -> str | None:
    """Name of the container family whose magic number `head` starts with, else None."""
    if len(head) >= 8 and head[4:8] in _ISO_BOXES:
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith(b"RIFF") and head[8:12] in (b"AVI ", b"AVIX"):
        return "avi"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"FLV"):
        return "flv"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"\x00\x00\x01\xba") or head.startswith(b"\x00\x00\x01\xb3"):
        return "mpeg"
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return "asf"
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:
        return "mpegts"
    return None


def _open_failure(result: ProbeResult, path: Path, err: BaseException) -> ProbeResult:
    """Classify a file libavformat refused to open: cut-short video, corrupt video, or not a video."""
    msg = error_text(err)
    if isinstance(err, PermissionError):
        return _broken(result, "unreadable", f"permission denied ({msg})")
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as e:
        return _broken(result, "unreadable", error_text(e))
    family = _sniff_container(head)
    if family == "mp4":
        # The usual way an MP4 breaks: the writer puts the index (moov atom) at the end, so a copy
        # or download that stops early leaves frames without the table that locates them.
        return _broken(result, "truncated", "MP4/MOV file without a readable index (moov atom): cut short or never finalised")
    if family is not None:
        return _broken(result, "corrupt", f"looks like {family} but libavformat cannot open it: {msg}")
    return _broken(result, "not-video", f"not a recognised media container ({msg})")


def _broken(result: ProbeResult, status: str, reason: str) -> ProbeResult:
    result.status = status
    result.reason = reason
    return result


def _container_name(fmt, suffix: str) -> str:
    """Short container name: the file's extension when the detected format claims it
    ("mp4" rather than "mov,mp4,m4a,3gp,3g2,mj2"), else the format's first name (so a .mp4 that
    is really Matroska shows "matroska")."""
    names = fmt.name.split(",")
    try:
        exts = set(fmt.extensions)
    except Exception:  # pragma: no cover - older PyAV
        exts = set()
    ext = suffix.lower().lstrip(".")
    if ext and (ext in exts or ext in names):
        return ext
    return names[0]


def _snap_rate(rate: float, tol: float) -> Fraction:
    """Exact fraction for a rate measured from timestamps: the nearest integer or NTSC rate
    (n*1000/1001) within relative tolerance `tol`, else a fraction with a small denominator."""
    cands = [Fraction(round(rate)), Fraction(round(rate * 1.001) * 1000, 1001)]
    cands = [c for c in cands if c > 0]
    best = min(cands, key=lambda c: abs(float(c) - rate), default=None)
    if best is not None and abs(float(best) - rate) <= tol * rate:
        return best
    return Fraction(rate).limit_denominator(1001)


def probe_file(path: str | os.PathLike) -> ProbeResult:
    """Probe one file; never raises for a broken input (see `STATUSES` for what it reports)."""
    p = Path(path)
    result = ProbeResult(path=str(p), label=p.absolute().parent.name)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if p.is_symlink():
            return _broken(result, "missing", f"broken symlink to {os.readlink(p)}")
        return _broken(result, "missing", "no such file")
    except OSError as e:
        return _broken(result, "unreadable", error_text(e))
    if not stat.S_ISREG(st.st_mode):
        return _broken(result, "unreadable", "not a regular file")
    result.size = st.st_size
    if st.st_size == 0:
        return _broken(result, "empty", "file has zero bytes")
    if not os.access(p, os.R_OK):
        return _broken(result, "unreadable", "permission denied")

    try:
        container = open_input(p)
    except Exception as e:  # av.error.* (InvalidDataError, ...) and OSError
        return _open_failure(result, p, e)
    try:
        return _probe_container(container, p, result)
    except Exception as e:  # anything unforeseen in a hostile file is one broken file, not a crash
        return _broken(result, "corrupt", f"{type(e).__name__}: {error_text(e)}")
    finally:
        container.close()


def _probe_container(container, p: Path, r: ProbeResult) -> ProbeResult:
    """Fill ``r`` from an opened container: streams, packet timestamps, rate, integrity."""
    fmt = container.format
    r.container = _container_name(fmt, p.suffix)
    why = not_video_reason(container, p)
    if why is not None:
        return _broken(r, "not-video", why)
    videos = video_streams(container)  # cover art in an mp3 / m4a is not a video
    audios = list(container.streams.audio)
    r.has_audio = bool(audios)
    if not videos:
        if audios:
            n = len(audios)
            return _broken(r, "audio-only", f"{n} audio stream{'s' if n > 1 else ''}, no video stream")
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        return _broken(r, "not-video", "no video stream (" + ", ".join(kinds) + ")")

    v = videos[0]
    cc = v.codec_context
    r.codec = cc.name if cc is not None else getattr(getattr(v, "codec", None), "name", None) or "unknown"
    if cc is not None:
        r.width = cc.width or None
        r.height = cc.height or None
    tb = v.time_base
    if not tb:
        return _broken(r, "corrupt", "video stream has no time base")
    r.time_base = f"{tb.numerator}/{tb.denominator}"
    scan = _demux(container, v, audios)
    exact = _fill_times(r, scan, v, container, float(tb))
    notes = _choose_rate(r, header_rates(v), exact, float(tb))
    broken = _integrity(r, scan, v, container, float(tb))
    if broken is not None:
        return broken
    r.reason = "; ".join(notes)
    return r


@dataclass
class _Scan:
    """What demuxing the video (and audio) packets of a file found."""

    demuxed_streams: int
    ticks: list[int] = field(default_factory=list)  # video pts, in the stream's time base
    keys: list[int] = field(default_factory=list)  # keyframe pts
    n_packets: int = 0  # including discarded (edit-list) packets, to compare with the header count
    corrupt: int = 0
    last_corrupt: bool = False
    end_tick: int | None = None  # largest video pts (presentation time of the last frame)
    last_dur: int = 0
    byte_end: int = 0
    audio_end: float = 0.0
    error: BaseException | None = None


def _demux(container, v, audios) -> _Scan:
    """Read the packets (never decode) of video stream ``v`` and the audio streams; the other
    streams are discarded in libavformat so their packets are never read into Python."""
    import av

    wanted = [v, *audios]
    wanted_idx = {s.index for s in wanted}
    for s in container.streams:
        if s.index not in wanted_idx:
            try:
                s.discard = av.stream.Discard.all
            except (AttributeError, ValueError):  # pragma: no cover - PyAV without Stream.discard
                pass
    scan = _Scan(demuxed_streams=len(wanted))
    try:
        for pkt in container.demux(wanted):
            ts = pkt.pts if pkt.pts is not None else pkt.dts
            if ts is None:  # the empty flush packet at the end of each stream
                continue
            if pkt.stream_index != v.index:
                if pkt.time_base:
                    scan.audio_end = max(scan.audio_end, float((ts + (pkt.duration or 0)) * pkt.time_base))
                continue
            scan.n_packets += 1
            scan.last_corrupt = pkt.is_corrupt
            scan.corrupt += int(pkt.is_corrupt)
            if pkt.pos is not None and pkt.pos >= 0:
                scan.byte_end = max(scan.byte_end, pkt.pos + pkt.size)
            if pkt.is_discard:
                continue
            scan.ticks.append(ts)
            if scan.end_tick is None or ts >= scan.end_tick:
                # The duration of the frame shown last; with B-frames the packet order is the
                # decode order, so this is not simply the last packet read.
                scan.end_tick, scan.last_dur = ts, pkt.duration or 0
            if pkt.is_keyframe:
                scan.keys.append(ts)
    except Exception as e:  # a demux error part-way: keep what was read, report it
        scan.error = e
    scan.ticks.sort()
    scan.keys.sort()
    return scan


def _fill_times(r: ProbeResult, scan: _Scan, v, container, tbf: float) -> list[float]:
    """pts, keyframes, start, frame count and duration; returns the unrounded pts (seconds)."""
    exact: list[float] = []
    if scan.ticks:
        first = scan.ticks[0]
        exact = [(t - first) * tbf for t in scan.ticks]
        r.start = round(first * tbf, 6)
        # Microseconds are plenty to pick the nearest frame and keep the manifest small.
        r.pts = [round(t, 6) for t in exact]
        r.keyframes = [round((t - first) * tbf, 6) for t in scan.keys]
    # Frame count: the header's when it has one (mp4, avi); mkv/webm have none, count packets.
    if (v.frames or 0) > 0:
        r.frames, r.frames_source = v.frames, "header"
    elif scan.ticks:
        r.frames, r.frames_source = len(scan.ticks), "packets"
    # Duration of the video stream: packet span plus the last packet's duration (the median gap
    # when the container stores none); header durations only when there are no packets.
    gaps = sorted(b - a for a, b in zip(exact, exact[1:]))
    median_gap = gaps[len(gaps) // 2] if gaps else 0.0
    if scan.ticks:
        r.duration = round(exact[-1] + (scan.last_dur * tbf if scan.last_dur > 0 else median_gap), 6)
    elif v.duration:
        r.duration = round(v.duration * tbf, 6)
    elif container.duration:
        r.duration = round(container.duration / 1e6, 6)
    return exact


def _choose_rate(r: ProbeResult, header: list, exact: list[float], tbf: float) -> list[str]:
    """fps, fps_source, measured_fps and vfr from the header rates and the packet times;
    returns notes for the reason column.

    Tolerances account for timestamp quantisation: with a 1/1000 time base (mkv, webm) a
    12-frame 30000/1001 clip spans 367 ms instead of 366.3 ms, 0.2 % off.
    """
    measured = mean_rate(exact)
    r.measured_fps = round(measured, 6) if measured is not None else None
    # A gap that differs from the others by one tick of the time base is quantisation, not
    # variable rate: GIF stores delays in 1/100 s, so 30 fps is 3,3,4,3,3,4 hundredths.
    r.vfr = is_variable_rate(exact, abs_tol=max(1.5e-3, 1.01 * tbf))
    total_span = exact[-1] if exact else 0.0
    quant_tol = max(1e-3, 1.5 * tbf / total_span) if total_span > 0 else 1e-3
    fps: Fraction | None = None
    notes: list[str] = []
    if r.vfr:
        if header:
            fps, r.fps_source = header[0]
            notes.append(f"variable frame rate: packets average {measured:.3f} fps, header says {format_fps(fps)}")
        elif measured is not None:
            fps, r.fps_source = _snap_rate(measured, quant_tol), SOURCE_PACKETS
            notes.append(f"variable frame rate: packets average {measured:.3f} fps")
    elif measured is not None:
        # Regular packets: they are what a player shows. Take the first header rate that agrees
        # with them to within timestamp rounding (a phone's average_rate of 29.87 from an
        # audio-padded duration loses to its base_rate of 30), else one within 1 %, else the
        # packets' own rate.
        agree = [h for h in header if abs(float(h[0]) - measured) <= quant_tol * measured]
        near = [h for h in header if abs(float(h[0]) - measured) <= max(0.01, quant_tol) * measured]
        if agree or near:
            fps, r.fps_source = (agree or near)[0]
        else:
            fps, r.fps_source = _snap_rate(measured, quant_tol), SOURCE_PACKETS
            if header:
                notes.append(f"header says {format_fps(header[0][0])} ({header[0][1]}) but packets are regular at {format_fps(fps)}")
    elif header:  # a single frame: nothing to measure
        fps, r.fps_source = header[0]
    if fps is not None:
        r.fps = str(fps)
        r.fps_float = float(fps)
    return notes


def _integrity(r: ProbeResult, scan: _Scan, v, container, tbf: float) -> ProbeResult | None:
    """``r`` marked broken when the packets show the file is cut short or corrupt, else None.
    Order matters: the most specific explanation wins."""
    header_frames = v.frames or 0
    if scan.error is not None:
        return _broken(r, "truncated" if scan.last_corrupt else "corrupt",
                       f"demuxing stopped after {scan.n_packets} video packets: {error_text(scan.error)}")
    if scan.n_packets == 0:
        return _broken(r, "no-frames", "video stream has no packets")
    if r.size is not None and scan.byte_end > r.size:
        return _broken(r, "truncated", f"packet data runs past the end of the file ({scan.byte_end} > {r.size} bytes)")
    if header_frames > scan.n_packets:
        return _broken(r, "truncated", f"header lists {header_frames} frames but only {scan.n_packets} packets are in the file")
    if scan.corrupt:
        if scan.last_corrupt:
            return _broken(r, "truncated", "the last video packet is cut short")
        return _broken(r, "corrupt", f"{scan.corrupt} corrupt video packet(s)")
    # Containers without a frame count (mkv, webm): compare where the packets end with the
    # duration written in the header. Only when every stream was demuxed (a subtitle stream may
    # legitimately run longer) and with slack for audio priming and rounding.
    declared = container.duration / 1e6 if container.duration else None
    if header_frames == 0 and declared and len(container.streams) == scan.demuxed_streams and scan.end_tick is not None:
        c_start = (container.start_time or 0) / 1e6
        covered = max((scan.end_tick + scan.last_dur) * tbf, scan.audio_end) - c_start
        if covered + max(0.5, 0.02 * declared) < declared:
            return _broken(r, "truncated", f"header says {declared:.2f} s but packets end at {covered:.2f} s")
    return None


# ------------------------------------------------------------------------------------------------
# Many files


def _default_workers(executor: str) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(32, cpus))


#: With fewer files than this per worker, starting a process pool costs more than it saves.
_MIN_FILES_PER_PROCESS = 8


def _mp_context():
    """"fork" where it is safe and cheap (Linux, no other Python thread alive: a fork copies locks
    held by other threads, which can deadlock the child), else "spawn". fork starts a worker in
    milliseconds and needs no `if __name__ == "__main__"` guard in the caller's script; spawn
    costs ~0.1-0.3 s per worker (a fresh interpreter importing PyAV)."""
    import multiprocessing as mp
    import sys
    import threading

    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _probe_chunk(files: Sequence[str]) -> list[ProbeResult]:
    return [probe_file(f) for f in files]


def probe_paths(
    paths: Iterable[str | os.PathLike],
    workers: int | None = None,
    progress: Callable[[ProbeResult], None] | None = None,
    *,
    executor: str = "auto",
    extensions: Iterable[str] = VIDEO_EXTENSIONS,
) -> list[ProbeResult]:
    """Probe files and folders (walked with `collect_videos`) in parallel; results in input order.

    workers: parallel workers (default: the CPUs this process may use); 1 probes serially in
    the calling thread. progress, if given, is called in the calling thread once per finished
    file with its result.

    executor: "process" (a process pool), "thread" (a thread pool) or "auto" (the default: a
    process pool when there are at least 8 files per worker, else serial; `workers` is then an
    upper bound). Threads do not speed demuxing up (the GIL is held for most of each packet);
    the measurement is in docs/probe.md.
    """
    files = collect_videos(paths, extensions=extensions)
    if executor not in ("auto", "process", "thread"):
        raise EqmError(f"executor must be 'auto', 'process' or 'thread', got {executor!r}")
    n = len(files)
    if workers is None:
        workers = _default_workers(executor)
    if workers < 1:
        raise EqmError(f"workers must be at least 1, got {workers}")
    if executor == "auto":
        executor = "process"
        workers = min(workers, n // _MIN_FILES_PER_PROCESS)
    workers = max(1, min(workers, n))
    results: list[ProbeResult | None] = [None] * n
    if workers == 1:
        for i, f in enumerate(files):
            results[i] = probe_file(f)
            if progress is not None:
                progress(results[i])
        return results  # type: ignore[return-value]

    if executor == "thread":
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe")
        chunk = 1
    else:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context())
        # Several files per task amortise the inter-process round trip; small enough chunks
        # that the progress bar still moves and the workers stay evenly loaded.
        chunk = max(1, min(32, n // (workers * 8)))
    names = [str(f) for f in files]
    try:
        futures: dict[Future, range] = {
            pool.submit(_probe_chunk, names[a : a + chunk]): range(a, min(a + chunk, n)) for a in range(0, n, chunk)
        }
        for fut in as_completed(futures):
            idx = futures[fut]
            try:
                chunk_results = fut.result()
            except Exception as e:  # a crashed worker process: report its files, keep going
                chunk_results = [
                    ProbeResult(path=names[i], label=files[i].absolute().parent.name, status="unreadable",
                                reason=f"probe worker failed: {type(e).__name__}: {error_text(e)}")
                    for i in idx
                ]
            for i, res in zip(idx, chunk_results):
                results[i] = res
                if progress is not None:
                    progress(res)
    except BaseException:  # Ctrl-C or a failing progress callback: do not wait for the queue
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results  # type: ignore[return-value]


def summarize(results: Sequence[ProbeResult]) -> dict[str, Any]:
    """Counts for a report: files, ok, broken, per status, per frame rate (constant-rate ok files,
    keyed by the exact fraction string, sorted by rate, with their hours), variable-frame-rate
    files (count and hours, not in by_fps since their declared rate is not what they play at)
    and total hours of ok video."""
    by_status: dict[str, int] = {}
    by_fps: dict[str, dict[str, float]] = {}
    vfr = 0
    vfr_seconds = 0.0
    seconds = 0.0
    for r in results:
        by_status[r.status] = by_status.get(r.status, 0) + 1
        if not r.ok:
            continue
        seconds += r.duration or 0.0
        if r.vfr:
            vfr += 1
            vfr_seconds += r.duration or 0.0
            continue
        key = r.fps if r.fps is not None else "unknown"
        slot = by_fps.setdefault(key, {"files": 0, "hours": 0.0})
        slot["files"] += 1
        slot["hours"] += (r.duration or 0.0) / 3600.0
    order = sorted(by_fps, key=lambda k: (k == "unknown", float(Fraction(k)) if k != "unknown" else 0.0))
    ok = by_status.get(STATUS_OK, 0)
    return {
        "files": len(results),
        "ok": ok,
        "broken": len(results) - ok,
        "by_status": dict(sorted(by_status.items())),
        "by_fps": {k: {"files": int(by_fps[k]["files"]), "hours": round(by_fps[k]["hours"], 6)} for k in order},
        "vfr": vfr,
        "vfr_hours": round(vfr_seconds / 3600.0, 6),
        "total_hours": round(seconds / 3600.0, 6),
    }


# ------------------------------------------------------------------------------------------------
# Manifest (JSONL, one ProbeResult per line)


#: How much of an existing file `check_manifest_target` reads to recognise one of our manifests.
_MANIFEST_SNIFF_BYTES = 64 * 1024


def _is_our_manifest(path: Path) -> bool:
    """True when the file's first line is a manifest entry as `write_manifest` writes it."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_MANIFEST_SNIFF_BYTES)
    except OSError:
        return False
    first, newline, _ = head.partition(b"\n")
    if not first.startswith(b'{"path":'):
        return False
    if not newline:  # a first line longer than the sniff (thousands of pts): judge by its keys
        return b'"status":' in first
    try:
        d = json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(d, dict) and all(k in d for k in _REQUIRED)


def check_manifest_target(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *,
                          force: bool = False) -> None:
    """Refuse a manifest path whose replacement would destroy data (EqmError, exit code 2).

    Never replaced: a folder, anything that is not a regular file (FIFO, device, socket), or one
    of ``inputs`` (the files being probed, compared by inode so symlinks and hard links count).
    A regular file is replaced only when it is empty or already a manifest written by
    `write_manifest`, or when ``force`` is given.
    """
    out = Path(path)
    folder = out.absolute().parent
    if not folder.is_dir():
        raise EqmError(f"cannot write manifest {out}: folder {folder} does not exist")
    try:
        st = os.stat(out)
    except FileNotFoundError:
        return
    except OSError as e:
        raise EqmError(f"cannot write manifest {out}: {error_text(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise EqmError(f"manifest path {out} is a folder; give a file name such as {out / 'manifest.jsonl'}")
    if not stat.S_ISREG(st.st_mode):
        raise EqmError(f"manifest path {out} is not a regular file (a FIFO, device or socket); refusing to replace it")
    for f in inputs:
        with contextlib.suppress(OSError):
            fs = os.stat(f)
            if (fs.st_dev, fs.st_ino) == (st.st_dev, st.st_ino):
                raise EqmError(f"manifest path {out} is one of the files being probed ({f}); refusing to replace it")
    if not force and st.st_size > 0 and not _is_our_manifest(out):
        raise EqmError(f"{out} exists and is not a manifest written by eqmctl; refusing to replace it "
                       "(pass --force to overwrite it)")


def write_manifest(results: Iterable[ProbeResult], path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write results as JSONL, atomically (temporary file in the same folder, then rename).

    Every result is written, broken ones included, so a reader can report how many files it
    skips; readers use only status == "ok" lines. A file inside the manifest's folder is stored
    with a path relative to that folder (the dataset and its manifest can move together); others
    keep an absolute path. `read_manifest` resolves both. What is already at ``path`` is replaced
    only when `check_manifest_target` allows it (``force`` as there).
    """
    out = Path(path)
    folder = out.absolute().parent
    results = list(results)
    check_manifest_target(out, [r.path for r in results], force=force)
    lines = []
    for r in results:
        d = r.to_dict()
        ap = Path(os.path.abspath(r.path))
        try:
            d["path"] = ap.relative_to(folder).as_posix()
        except ValueError:
            d["path"] = str(ap)
        lines.append(dumps(d, separators=(",", ":")))
    try:
        return fsio.write_text(out, "\n".join(lines) + ("\n" if lines else ""))
    except OSError as e:
        raise EqmError(f"cannot write manifest {out}: {error_text(e)}") from None


_NUM = (int, float)
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    # name: (accepted JSON types, may be null)
    "path": ((str,), False),
    "status": ((str,), False),
    "reason": ((str,), False),
    "label": ((str,), False),
    "container": ((str,), True),
    "codec": ((str,), True),
    "width": ((int,), True),
    "height": ((int,), True),
    "fps": ((str,), True),
    "fps_float": (_NUM, True),
    "fps_source": ((str,), True),
    "frames": ((int,), True),
    "frames_source": ((str,), True),
    "duration": (_NUM, True),
    "vfr": ((bool,), False),
    "measured_fps": (_NUM, True),
    "has_audio": ((bool,), False),
    "time_base": ((str,), True),
    "start": (_NUM, True),
    "size": ((int,), True),
    "pts": ((list,), False),
    "keyframes": ((list,), False),
}
_REQUIRED = ("path", "status", "fps", "frames", "duration", "vfr", "pts", "keyframes")


def _check_entry(d: Any, where: str) -> ProbeResult:
    if not isinstance(d, dict):
        raise EqmError(f"{where}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise EqmError(f"{where}: missing key {missing[0]!r}")
    kwargs: dict[str, Any] = {}
    for name, (types, nullable) in _FIELD_TYPES.items():
        if name not in d:
            continue
        val = d[name]
        if val is None and nullable:
            kwargs[name] = None
            continue
        # bool is an int in Python; a JSON true is not a frame count.
        if not isinstance(val, types) or (isinstance(val, bool) and bool not in types):
            raise EqmError(f"{where}: key {name!r} must be {'/'.join(t.__name__ for t in types)}, got {json.dumps(val)[:40]}")
        kwargs[name] = val
    if not kwargs["path"]:
        raise EqmError(f"{where}: key 'path' is empty")
    if kwargs["status"] not in STATUSES:
        raise EqmError(f"{where}: unknown status {kwargs['status']!r}")
    if kwargs.get("fps") is not None:
        try:
            fr = Fraction(kwargs["fps"])
        except (ValueError, ZeroDivisionError):
            raise EqmError(f"{where}: key 'fps' must be a fraction like \"30000/1001\", got {kwargs['fps']!r}") from None
        if fr <= 0:
            raise EqmError(f"{where}: key 'fps' must be positive, got {kwargs['fps']!r}")
    for name in ("frames", "width", "height", "size"):
        if kwargs.get(name) is not None and kwargs[name] < 0:
            raise EqmError(f"{where}: key {name!r} must not be negative")
    if kwargs.get("duration") is not None and not (math.isfinite(kwargs["duration"]) and kwargs["duration"] >= 0):
        raise EqmError(f"{where}: key 'duration' must be a non-negative number of seconds")
    for name in ("pts", "keyframes"):
        seq = kwargs[name]
        if not all(isinstance(x, _NUM) and not isinstance(x, bool) and math.isfinite(x) for x in seq):
            raise EqmError(f"{where}: key {name!r} must be a list of numbers (seconds)")
        if any(b < a for a, b in zip(seq, seq[1:])):
            raise EqmError(f"{where}: key {name!r} must be sorted")
    if kwargs["pts"] and kwargs["pts"][0] != 0:
        raise EqmError(f"{where}: key 'pts' must start at 0 (seconds relative to the first frame)")
    if kwargs["status"] == STATUS_OK and not kwargs["pts"]:
        raise EqmError(f"{where}: an 'ok' entry needs its packet timestamps in 'pts'")
    return ProbeResult(**kwargs)


def read_manifest(path: str | os.PathLike, *, only_ok: bool = False) -> list[ProbeResult]:
    """Read and validate a JSONL manifest written by `write_manifest`.

    Relative paths are resolved against the manifest's folder. Blank lines are skipped and
    unknown keys ignored (newer writers may add fields). Any bad content raises a one-line
    EqmError naming the file and line. only_ok keeps just the entries with status "ok".
    """
    mp = Path(path)
    try:
        text = mp.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EqmError(f"manifest not found: {mp}") from None
    except UnicodeDecodeError:
        raise EqmError(f"manifest {mp} is not UTF-8 text") from None
    except OSError as e:
        raise EqmError(f"cannot read manifest {mp}: {error_text(e)}") from None
    folder = mp.absolute().parent
    out: list[ProbeResult] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{mp} line {lineno}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise EqmError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        r = _check_entry(d, where)
        p = Path(r.path)
        r.path = str(p if p.is_absolute() else folder / p)
        if not only_ok or r.ok:
            out.append(r)
    if not text.strip():
        raise EqmError(f"manifest {mp} is empty")
    return out


__all__ = [
    "ProbeResult",
    "STATUSES",
    "STATUS_OK",
    "VIDEO_EXTENSIONS",
    "check_manifest_target",
    "collect_videos",
    "probe_file",
    "probe_paths",
    "read_manifest",
    "summarize",
    "write_manifest",
]
