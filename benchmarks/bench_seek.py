"""Benchmark `eqm.video.io.read_clip` (seek + decode forward) against decoding the whole file.

Writes one synthetic H.264 MP4 with `write_video` (default: 60 s at 30 fps, 64x64, a keyframe
about every second, which is write_video's default) to a temporary folder, then reads
`--repeats` clips of `--frames` consecutive frames from random positions (seeded) three ways:

  read_clip                    what the training data pipeline does: seek to the keyframe at or
                               before the first wanted frame, decode forward to the last one
  full decode, convert wanted  decode every frame of the file with PyAV, convert only the
                               wanted frames to RGB (the cheapest way to "decode it all")
  full decode (read_video)     eqm.video.io.read_video, then index the wanted frames

and prints the mean time per clip, the frames decoded per clip, and the ratio to read_clip side
by side. Every method's frames are checked against each other, so a wrong seek cannot look fast.
Runs on the CPU in well under a minute with the defaults.

    python benchmarks/bench_seek.py [--seconds 60] [--fps 30] [--size 64] [--frames 16]
                                    [--repeats 20] [--keyint N] [--seed 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_video(path: Path, seconds: float, fps, size: int, keyint, seed: int):
    from eqm.timebase import frames_for_duration, parse_fps
    from eqm.video.io import write_video

    rate = parse_fps(fps)
    n = frames_for_duration(seconds, rate)
    rng = np.random.default_rng(seed)
    # A drifting noise texture with a moving bright square: realistic enough that H.264 needs
    # P/B-frames with real content (flat frames would make decoding unrealistically cheap).
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    frames = np.empty((n, size, size, 3), np.uint8)
    side = max(4, size // 6)
    for k in range(n):
        f = np.roll(base, shift=k % size, axis=1)
        x = (k * 2) % (size - side)
        y = (k * 3) % (size - side)
        f[y : y + side, x : x + side] = 255
        frames[k] = f
    res = write_video(path, frames, rate, keyint=keyint, preset="veryfast")
    return res, rate


def full_decode_convert_wanted(path: Path, wanted: set[int]) -> tuple[list[np.ndarray], int]:
    import av

    out, decoded = [], 0
    with av.open(str(path)) as c:
        for k, frame in enumerate(c.decode(video=0)):
            decoded += 1
            if k in wanted:
                out.append(frame.to_ndarray(format="rgb24"))
    return out, decoded


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="video length in seconds (default 60)")
    ap.add_argument("--fps", default="30", help="frame rate, e.g. 30 or 30000/1001 (default 30)")
    ap.add_argument("--size", type=int, default=64, help="frame width and height in pixels (default 64)")
    ap.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    ap.add_argument("--repeats", type=int, default=20, help="clips read per method (default 20)")
    ap.add_argument("--keyint", type=int, default=None, help="frames between keyframes (default: write_video's, ~1 s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="write the video here and keep it")
    args = ap.parse_args(argv)

    from eqm.errors import EqmError
    from eqm.video.io import read_clip, read_video

    if args.size < 8 or args.frames < 1 or args.repeats < 1 or args.seconds <= 0:
        ap.error("--size >= 8, --frames >= 1, --repeats >= 1 and --seconds > 0 are required")

    tmp = None
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        folder = args.keep
    else:
        tmp = tempfile.mkdtemp(prefix="bench_seek_")
        folder = Path(tmp)
    try:
        path = folder / "bench_seek.mp4"
        t0 = time.perf_counter()
        try:
            res, rate = make_video(path, args.seconds, args.fps, args.size, args.keyint, args.seed)
        except EqmError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        write_s = time.perf_counter() - t0
        n = res.num_frames
        if args.frames > n:
            ap.error(f"--frames {args.frames} is longer than the video ({n} frames)")

        import av

        with av.open(str(path)) as c:
            keys = sum(1 for p in c.demux(video=0) if p.size and p.is_keyframe)
        print(
            f"video: {path.name}  {n} frames, {float(rate):g} fps ({rate}), {args.size}x{args.size}, "
            f"{res.duration:.2f} s, {keys} keyframes, {path.stat().st_size / 1e6:.2f} MB, written in {write_s:.1f} s"
        )

        rng = np.random.default_rng(args.seed)
        starts = rng.integers(0, n - args.frames + 1, size=args.repeats)
        step = 1 / rate

        times = {"read_clip": [], "full decode, convert wanted": [], "full decode (read_video)": []}
        decoded = {k: [] for k in times}
        for s in starts:
            idx = list(range(int(s), int(s) + args.frames))
            clip_times = [float(k * step) for k in idx]

            stats = {}
            t0 = time.perf_counter()
            clip = read_clip(path, clip_times, stats=stats)
            times["read_clip"].append(time.perf_counter() - t0)
            decoded["read_clip"].append(stats["decoded_frames"])

            t0 = time.perf_counter()
            wanted, count = full_decode_convert_wanted(path, set(idx))
            times["full decode, convert wanted"].append(time.perf_counter() - t0)
            decoded["full decode, convert wanted"].append(count)

            t0 = time.perf_counter()
            full = read_video(path)
            frames = full.frames[idx]
            times["full decode (read_video)"].append(time.perf_counter() - t0)
            decoded["full decode (read_video)"].append(len(full.frames))

            # Same decoder, same pixels: any mismatch means a seek went wrong.
            if not (np.array_equal(clip.frames, frames) and np.array_equal(np.stack(wanted), frames)):
                print(f"error: read_clip returned different frames than a full decode at frame {s}", file=sys.stderr)
                return 1

        base = statistics.mean(times["read_clip"])
        print(f"{args.repeats} clips of {args.frames} frames at random positions:")
        print(f"  {'method':<30} {'ms/clip':>10} {'median ms':>10} {'frames decoded':>15} {'x read_clip':>12}")
        for name, ts in times.items():
            mean = statistics.mean(ts)
            print(
                f"  {name:<30} {mean * 1e3:>10.2f} {statistics.median(ts) * 1e3:>10.2f} "
                f"{statistics.mean(decoded[name]):>15.1f} {mean / base:>11.1f}x"
            )
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
