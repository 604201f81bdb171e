"""Film a small real-footage dataset with a known motion speed: a photograph panned per class.

Matplotlib's sample photograph (eqm.data.pan) seen through a small window that pans in one
direction per class folder (right, down, left, up) at one speed, written with PyAV as H.264 files
at mixed real rates, NTSC ones included (8, 12 and 15 fps, 24000/1001 and 30000/1001), in MP4
and MKV. It is the data of docs/calibration.md's real-footage section: train on it through
`eqmctl probe-fps` and a manifest as a user would, then ask `eqmctl calibrate` whether the
model's motion keeps the footage's speed at every requested rate.

    python benchmarks/pan_footage.py --out pans            # 4 classes x 5 files, 16x16, 4 px/s
    eqmctl probe-fps pans --manifest pans.jsonl
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

#: Class folder -> unit direction of the content's motion in the frame (x right, y down).
DIRECTIONS = {"right": (1.0, 0.0), "down": (0.0, 1.0), "left": (-1.0, 0.0), "up": (0.0, -1.0)}
#: (rate, container) per file of a class: mixed real rates, NTSC included, both containers.
FILES = (("8", ".mp4"), ("12", ".mkv"), ("15", ".mp4"), ("24000/1001", ".mkv"), ("30000/1001", ".mp4"))
#: Offsets (photo pixels, across the direction of motion) of each file's path, so that the files of
#: a class show different stripes of the photograph.
ACROSS = (-4.0, -2.0, 0.0, 2.0, 4.0)


def film(out: Path, *, size: int, speed: float, seconds: float, scale: float) -> int:
    """Write the dataset under ``out`` (which must not exist); returns the number of files."""
    from fractions import Fraction

    from eqm.data.pan import load_photo, pan_frames
    from eqm.video.io import write_video

    photo = load_photo()
    sh, sw = (round(n / scale) for n in photo.shape[:2])
    count = 0
    for name, (dx, dy) in DIRECTIONS.items():
        (out / name).mkdir(parents=True)
        for (rate, ext), across in zip(FILES, ACROSS):
            fps = Fraction(rate)
            ts = np.arange(math.floor(seconds * fps)) / float(fps)
            # The window moves opposite to the content; its path is centred, then shifted across.
            vx, vy = -dx * speed, -dy * speed
            tm = 0.5 * ts[-1]
            origin = ((sw - size) / 2 - vx * tm + abs(dy) * across, (sh - size) / 2 - vy * tm + abs(dx) * across)
            frames = pan_frames(photo, ts, height=size, width=size, velocity=(vx, vy), scale=scale, origin=origin)
            write_video(out / name / f"pan_{rate.replace('/', '_')}fps{ext}", frames, rate)
            count += 1
    return count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder to create (class subfolders inside)")
    p.add_argument("--size", type=int, default=16, help="frame size in pixels")
    p.add_argument("--speed", type=float, default=4.0, help="pan speed in frame pixels per second")
    p.add_argument("--seconds", type=float, default=3.0, help="length of every file")
    p.add_argument("--scale", type=float, default=12.0, help="photograph pixels per frame pixel")
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; give a new folder", file=sys.stderr)
        return 2
    n = film(args.out, size=args.size, speed=args.speed, seconds=args.seconds, scale=args.scale)
    print(f"{n} files under {args.out}: {len(DIRECTIONS)} classes ({', '.join(DIRECTIONS)}), {args.size}x{args.size}, "
          f"{args.speed:g} px/s, {args.seconds:g} s each at {', '.join(r for r, _ in FILES)} fps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
