"""Benchmark `eqmctl probe-fps` (eqm.video.probe.probe_paths) against one ffprobe process per file.

Writes N tiny videos (default 200; mixed H.264 mp4, H.264 mkv, VP9 webm and MPEG-4 avi at
24000/1001, 25, 30000/1001 and 60 fps, 32x32, --seconds long) to a temporary folder, then times,
over the same files and with the same number of workers W:

  probe_paths (auto)        what `eqmctl probe-fps` runs: header + every video packet's timestamp
  probe_paths (processes)   forced process pool with W workers
  probe_paths (threads)     thread pool with W workers, to justify not using threads
  probe_paths (serial)      one file after another in this thread
  ffprobe per file          `ffprobe -v error -show_streams -show_format -of json FILE`, one
                            process per file, W at a time
  ffprobe per file, serial  the same, one at a time

ffprobe here does less work than probe_paths: it reads the header only, not every packet's
timestamp. Runs on the CPU, in well under a minute for the defaults; `--files 100 --seconds 300`
(files of 7500-18000 packets, a few minutes) repeats the thread/process comparison of
docs/probe.md on longer files.

    python benchmarks/bench_probe.py [--files N] [--seconds S] [--workers W] [--repeat R] [--keep DIR]

Exits with status 1 and an install hint if ffprobe is not on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np

# (suffix, codec, rate)
VARIANTS = [
    (".mp4", "libx264", Fraction(24000, 1001)),
    (".mkv", "libx264", Fraction(25)),
    (".webm", "libvpx-vp9", Fraction(30000, 1001)),
    (".avi", "mpeg4", Fraction(60)),
]


def write_tiny(path: Path, codec: str, rate: Fraction, frames: int, seed: int) -> None:
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        if codec == "libx264":
            s.options = {"preset": "ultrafast"}
        elif codec == "libvpx-vp9":
            s.options = {"deadline": "realtime", "cpu-used": "8"}
        base = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        for i in range(frames):
            img = np.roll(base, i, axis=1)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def generate(folder: Path, n: int, seconds: float) -> list[Path]:
    import av

    variants = []
    for suffix, codec, rate in VARIANTS:
        try:
            av.codec.Codec(codec, "w")
        except Exception:
            print(f"(encoder {codec} not in this PyAV build; skipping {suffix})", file=sys.stderr)
            continue
        variants.append((suffix, codec, rate))
    files = []
    for i in range(n):
        suffix, codec, rate = variants[i % len(variants)]
        p = folder / f"class{i % 4}" / f"clip{i:05d}{suffix}"
        p.parent.mkdir(parents=True, exist_ok=True)
        write_tiny(p, codec, rate, frames=max(2, round(float(rate) * seconds)), seed=i)
        files.append(p)
    return files


def time_probe(folder: Path, workers: int, executor: str) -> tuple[float, int]:
    from eqm.video.probe import probe_paths

    t0 = time.perf_counter()
    res = probe_paths([folder], workers=workers, executor=executor)
    dt = time.perf_counter() - t0
    bad = [r for r in res if not r.ok]
    if bad:
        raise SystemExit(f"benchmark files failed to probe: {bad[0].path}: {bad[0].reason}")
    return dt, len(res)


def time_ffprobe(files: list[Path], workers: int) -> float:
    cmd = ["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json"]

    def one(p: Path) -> None:
        out = subprocess.run(cmd + [str(p)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"ffprobe failed on {p}: {out.stderr.strip()}")

    t0 = time.perf_counter()
    if workers == 1:
        for p in files:
            one(p)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, files))
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=200, help="number of tiny videos to generate (default 200)")
    ap.add_argument("--seconds", type=float, default=1.0, help="length of each video in seconds (default 1)")
    ap.add_argument("--workers", type=int, default=None, help="parallel workers for every parallel method (default: the usable CPUs)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per method; the median is reported (default 3)")
    ap.add_argument("--keep", type=Path, default=None, help="write the videos here and keep them (default: a temp dir)")
    args = ap.parse_args(argv)

    if shutil.which("ffprobe") is None:
        print("ffprobe not found on PATH: install FFmpeg's command-line tools to run this benchmark, "
              "e.g. `apt-get install ffmpeg` (Debian/Ubuntu) or `brew install ffmpeg` (macOS).", file=sys.stderr)
        return 1
    if args.files < 1 or args.repeat < 1 or not args.seconds > 0:
        ap.error("--files and --repeat must be at least 1, --seconds positive")

    from eqm.video.probe import _default_workers

    workers = args.workers or _default_workers("process")
    tmp = None
    if args.keep is not None:
        folder = args.keep
        folder.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_probe_")
        folder = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        files = generate(folder, args.files, args.seconds)
        print(f"generated {len(files)} files in {time.perf_counter() - t0:.1f} s under {folder}; "
              f"{os.cpu_count()} CPU(s), W={workers} workers, median of {args.repeat} runs")
        # Warm the page cache and the imports so every method reads from memory.
        time_probe(folder, 1, "thread")
        time_ffprobe(files[: min(4, len(files))], 1)

        rows = []
        for name, fn in [
            ("probe_paths (auto)", lambda: time_probe(folder, workers, "auto")[0]),
            ("probe_paths (processes)", lambda: time_probe(folder, workers, "process")[0]),
            ("probe_paths (threads)", lambda: time_probe(folder, workers, "thread")[0]),
            ("probe_paths (serial)", lambda: time_probe(folder, 1, "thread")[0]),
            ("ffprobe per file", lambda: time_ffprobe(files, workers)),
            ("ffprobe per file, serial", lambda: time_ffprobe(files, 1)),
        ]:
            times = [fn() for _ in range(args.repeat)]
            rows.append((name, statistics.median(times)))
        ref = dict(rows)["ffprobe per file"]
        print(f"\n{'method':<28}{'seconds':>10}{'files/s':>12}{'vs ffprobe':>12}")
        for name, dt in rows:
            print(f"{name:<28}{dt:>10.3f}{len(files) / dt:>12.1f}{ref / dt:>11.2f}x")
        print("\n(ffprobe reads headers only; probe_paths also demuxes every video packet's timestamp.)")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
