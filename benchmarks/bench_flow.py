"""The optical-flow speed estimator's own error (eqm.calibrate), where the true ratio is 1.

Real clips: matplotlib's sample photograph panned at known speeds (eqm.data.pan), written as
60 fps H.264 files with PyAV, read back as training reads them: the reference at 8-30 fps (the
tiny recipe's training rates), then the same files resampled at each rate. Printed per rate: the
median measured speed over the reference's (the ratio `eqmctl calibrate` reports; 1 is right)
and over the true speed. Synthetic discs: the flow ratio next to the centroid tracker's
(eqm.data.speed) for discs moving at 0.5x-1.5x the data's speed.

    python benchmarks/bench_flow.py                 # 64 px pans and 16 px discs, a minute on CPU
    python benchmarks/bench_flow.py --size 32
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

RATES = (6, 12, 24, 30, 48, 60)
PANS = ((20.0, 0.0), (0.0, -12.0), (9.0, 7.0), (-30.0, 10.0))


def write_pans(root: Path, size: int, seconds: float, scale: float):
    """One 60 fps file per pan velocity, each in its own class folder; returns true speeds."""
    from eqm.data.pan import load_photo, pan_frames
    from eqm.video.io import write_video

    photo = load_photo()
    ts = np.arange(round(60 * seconds)) / 60.0
    speeds = []
    for k, v in enumerate(PANS):
        (root / f"pan{k}").mkdir(parents=True)
        write_video(root / f"pan{k}" / "photo.mp4", pan_frames(photo, ts, height=size, width=size, velocity=v, scale=scale), 60)
        speeds.append(math.hypot(*v))
    return speeds


def pan_speeds(root: Path, size: int, lo: float, hi: float, frames: int, clips: int):
    """Median measured speed per pan (class) of `clips` clips each at rates lo-hi."""
    from eqm.calibrate import measure_dataset
    from eqm.data.clips import ClipPolicy, VideoFolderDataset

    ds = VideoFolderDataset(root, ClipPolicy(num_frames=frames, fps_min=lo, fps_max=hi, height=size, width=size),
                            seed=0, clips_per_file=clips)
    got = measure_dataset(ds, len(ds))
    return [float(np.median(got.speeds[got.labels == k])) for k in range(len(PANS))]


def disc_rows():
    """(factor, fps, flow ratio, centroid ratio) for synthetic discs at 0.5x, 1x, 1.5x speed."""
    import torch

    from eqm.calibrate import measure_clips
    from eqm.data.clips import ClipPolicy, synthetic_motion
    from eqm.data.speed import estimate_velocities

    rng = np.random.default_rng(0)
    data = synthetic_motion(ClipPolicy(num_frames=11, fps_min=8, fps_max=30, height=16, width=16), 4)
    ref_ts = np.arange(11) / 12.0
    starts = [data.random_start(k % 4, rng, duration=ref_ts[-1]) for k in range(16)]
    ref = float(np.median(measure_clips(data.render_batch([k % 4 for k in range(16)], ref_ts, starts), ref_ts).speeds))
    rows = []
    for factor in (0.5, 1.0, 1.5):
        for fps in RATES:
            n = 5 if fps == 6 else 11
            ts = np.arange(n) / fps
            m = synthetic_motion(ClipPolicy(num_frames=n, fps_min=fps, fps_max=fps, height=16, width=16), 4,
                                 speed=factor * data.speed(0))
            labels = [k % 4 for k in range(16)]
            clips = m.render_batch(labels, ts, [m.random_start(k, rng, duration=ts[-1]) for k in labels])
            flow = float(np.median(measure_clips(clips, ts).speeds)) / ref
            cen = float(estimate_velocities(clips, torch.tensor(ts)).norm(dim=1).median()) / data.speed(0)
            rows.append((factor, fps, flow, cen))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="pan frame size in pixels")
    p.add_argument("--scale", type=float, default=4.0, help="photograph pixels per frame pixel")
    p.add_argument("--clips", type=int, default=4, help="clips per pan and rate")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        true = write_pans(root, args.size, 2.0, args.scale)
        ref = pan_speeds(root, args.size, 8, 30, 6, args.clips)
        print(f"real clips: {args.size} px pans of a photograph at {', '.join(f'{s:.1f}' for s in true)} px/s, "
              f"60 fps H.264; reference read at 8-30 fps")
        print("| fps | " + " | ".join(f"pan {s:.1f} px/s: ratio (vs true)" for s in true) + " | worst |ratio - 1| |")
        print("|---:|" + "---:|" * (len(true) + 1))
        print("| ref 8-30 | " + " | ".join(f"1 ({r / t:.3f})" for r, t in zip(ref, true)) + " | |")
        for fps in RATES:
            frames = max(2, min(12, round(fps / 6) + 2))  # at least one pair 1/6 s apart
            got = pan_speeds(root, args.size, fps, fps, frames, args.clips)
            ratios = [g / r for g, r in zip(got, ref)]
            print(f"| {fps} | " + " | ".join(f"{q:.3f} ({g / t:.3f})" for q, g, t in zip(ratios, got, true))
                  + f" | {max(abs(q - 1) for q in ratios) * 100:.1f} % |")
    print()
    print("synthetic discs (16 px, 8 px/s data): flow ratio vs centroid ratio")
    print("| speed | fps | flow | centroid | difference |")
    print("|---:|---:|---:|---:|---:|")
    for factor, fps, flow, cen in disc_rows():
        print(f"| {factor:g}x | {fps} | {flow:.3f} | {cen:.3f} | {abs(flow - cen) * 100:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
