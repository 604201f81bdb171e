"""Synthetic moving shapes: the zero-download data source and the ground truth for motion speed.

Each class is a motion with a known velocity in pixels per SECOND, so a clip can be rendered at
any frame rate and a generated clip can be checked against the true speed
(docs/reference.md#synthetic-source, docs/reference.md#speed-on-synthetic-data).

Choices (each one keeps the ground truth clean for `eqm.data.speed.estimate_velocity`):

* One bright disc on a dark background, rendered analytically with anti-aliasing: the coverage
  of a pixel is clamp(radius + 0.5 - distance, 0, 1), a one-pixel linear ramp at the rim. The disc
  moves by sub-pixel amounts between frames at high rates, and a hard-edged disc would move in
  whole-pixel jumps (positions quantised, the centroid biased); the ramp makes the intensity-
  weighted centroid follow the true centre to a small fraction of a pixel.
* Class k moves at angle 2*pi*k/n (image coordinates: x to the right, y DOWN, so with 4 classes:
  right, down, left, up), all at the same speed unless per-class speeds are given. Directions
  are what tells classes apart; the speed magnitude is what the calibration measures.
* No wrap-around and no bouncing: a wrap or a bounce inside a clip makes the centroid track jump
  or fold, and the least-squares speed becomes meaningless. Instead the start position of every
  clip is drawn so that the whole disc stays inside the frame for the clip's duration
  (`random_start`). That needs the travel speed * duration to fit in the frame: the class checks
  it against `max_duration` (the longest clip the caller will ask for) and refuses a speed that
  cannot fit, and the default speed shrinks to fit when the frame is small or the clips long.
* `start="per-class"` pins the start along the class's direction (across it, anywhere): every
  clip of a class then follows one track, so the class says where the disc is at each moment
  and not only which way it goes. A small model learns to follow its label far sooner on such
  data (docs/demo.md#why-the-discs-did-not-follow-their-class); "random" is the general case.
* Pixel (row i, column j) has its centre at (x, y) = (j, i). The disc centre must stay within
  [radius + 0.5, size - 1.5 - radius] on each axis, so every pixel the rim ramp touches is in
  the frame (half a pixel of slack on both sides).
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from eqm import fsio
from eqm.errors import EqmError

#: Default speed in frame sizes per second (of the shorter side): 0.5 -> 16 px/s at 32 px, so a
#: shape crosses a visible part of the frame in a 1 s clip (14 px in a 0.875 s clip of 8 frames
#: at 8 fps) yet moves less than a pixel per frame at 30 fps.
DEFAULT_SPEED_FRACTION = 0.5
#: Default radius as a fraction of the shorter side (4 px at 32 px), at least 1.5 px.
DEFAULT_RADIUS_FRACTION = 0.125
#: Half a pixel kept free at both ends of the path, beyond the radius (see the module docstring).
EDGE_SLACK = 0.5
#: Share of the free path the default speed may use when it has to shrink to fit max_duration.
_FIT_SHARE = 0.9
#: Where a clip starts: anywhere its path fits, or on its class's track (see the module docstring).
START_MODES = ("random", "per-class")


class SyntheticMotion:
    """Analytic moving discs, one velocity (pixels per second) per class.

    num_classes: number of motions; class k moves at angle 2*pi*k/num_classes.
    height, width: frame size in pixels.
    speed: pixels per second, one number for all classes or one per class; None = the default
      (0.5 * the shorter side per second, reduced if needed so a clip of max_duration fits).
    radius: disc radius in pixels; None = 0.125 * the shorter side (at least 1.5).
    max_duration: the longest clip (seconds, first to last frame) the caller will render; random
      starts keep the disc inside the frame for this long. EqmError if the speed cannot fit.
    background, foreground: pixel values in [-1, 1] of the background and of the disc.
    start: "random" (a start anywhere the clip fits) or "per-class" (every clip of a class starts
      at the same point along its direction, the start of its path centred over max_duration).
    """

    def __init__(
        self,
        num_classes: int = 4,
        height: int = 32,
        width: int = 32,
        speed: Union[None, float, Sequence[float]] = None,
        radius: Optional[float] = None,
        *,
        max_duration: float = 1.0,
        background: float = -1.0,
        foreground: float = 1.0,
        start: str = "random",
    ):
        if start not in START_MODES:
            raise EqmError(f"synthetic start must be one of {', '.join(START_MODES)}, got {start!r}")
        self.start = start
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise EqmError(f"synthetic num_classes must be a positive integer, got {num_classes!r}")
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 4:
                raise EqmError(f"synthetic {name} must be an integer of at least 4 pixels, got {v!r}")
        if not (isinstance(max_duration, (int, float)) and math.isfinite(max_duration) and max_duration >= 0):
            raise EqmError(f"synthetic max_duration must be a non-negative number of seconds, got {max_duration!r}")
        for name, v in (("background", background), ("foreground", foreground)):
            if not (-1.0 <= float(v) <= 1.0):
                raise EqmError(f"synthetic {name} must be a pixel value in [-1, 1], got {v!r}")
        self.num_classes, self.height, self.width = num_classes, height, width
        self.max_duration = float(max_duration)
        self.background, self.foreground = float(background), float(foreground)
        short = min(height, width)

        if radius is None:
            radius = max(1.5, DEFAULT_RADIUS_FRACTION * short)
        if not (isinstance(radius, (int, float)) and not isinstance(radius, bool) and math.isfinite(radius)
                and radius > 0):
            raise EqmError(f"synthetic radius must be a positive number of pixels, got {radius!r}")
        self.radius = float(radius)
        if self._room(width) <= 0 or self._room(height) <= 0:
            raise EqmError(
                f"synthetic radius {self.radius:g} px leaves no room to move in a {width}x{height} frame"
            )

        angles = [2.0 * math.pi * k / num_classes for k in range(num_classes)]
        # cos/sin of multiples of 90 degrees come out as 6e-17 instead of 0; round them so a
        # "right-moving" class really has vy == 0.
        dirs = [(round(math.cos(a), 12) + 0.0, round(math.sin(a), 12) + 0.0) for a in angles]  # + 0.0: no -0.0
        if speed is None:
            speeds = [DEFAULT_SPEED_FRACTION * short] * num_classes
            limit = self._max_speed(dirs)
            if speeds[0] > limit:
                speeds = [_FIT_SHARE * limit] * num_classes
            explicit = False
        else:
            if isinstance(speed, (int, float)) and not isinstance(speed, bool):
                speeds = [float(speed)] * num_classes
            else:
                speeds = [float(s) for s in speed]
                if len(speeds) != num_classes:
                    raise EqmError(f"synthetic speed needs one value per class ({num_classes}), got {len(speeds)}")
            explicit = True
        for s in speeds:
            if not (math.isfinite(s) and s > 0):
                raise EqmError(f"synthetic speed must be a positive number of pixels per second, got {s!r}")
        self.speeds = speeds
        self.angles = angles
        self._vel = np.array([(s * c, s * n) for s, (c, n) in zip(speeds, dirs)], dtype=np.float64)
        if explicit:
            for k in range(num_classes):
                if not self.fits(k, self.max_duration):
                    vx, vy = self.velocity(k)
                    raise EqmError(
                        f"synthetic speed {speeds[k]:g} px/s moves the shape ({abs(vx) * self.max_duration:.1f}, "
                        f"{abs(vy) * self.max_duration:.1f}) px in the longest clip ({self.max_duration:.3f} s) but a "
                        f"{width}x{height} frame with radius {self.radius:g} leaves ({self._room(width):.1f}, "
                        f"{self._room(height):.1f}) px; lower the speed or the clip duration (raise fps_min)"
                    )

    # ------------------------------------------------------------------------------------------
    # Ground truth

    def _room(self, size: int) -> float:
        """Length of the segment the disc centre may travel along an axis of `size` pixels."""
        return (size - 1.0 - EDGE_SLACK - self.radius) - (self.radius + EDGE_SLACK)

    def _max_speed(self, dirs) -> float:
        if self.max_duration <= 0:
            return math.inf
        lim = math.inf
        for c, s in dirs:
            if abs(c) > 0:
                lim = min(lim, self._room(self.width) / (abs(c) * self.max_duration))
            if abs(s) > 0:
                lim = min(lim, self._room(self.height) / (abs(s) * self.max_duration))
        return lim

    def _check_label(self, label) -> int:
        k = int(label)
        if not 0 <= k < self.num_classes:
            raise EqmError(f"synthetic label must be in 0..{self.num_classes - 1}, got {label!r}")
        return k

    def velocity(self, label: int) -> tuple[float, float]:
        """(vx, vy) of class `label` in pixels per second (x to the right, y down)."""
        vx, vy = self._vel[self._check_label(label)]
        return float(vx), float(vy)

    def speed(self, label: int) -> float:
        """|velocity| of class `label` in pixels per second."""
        return float(self.speeds[self._check_label(label)])

    @property
    def class_names(self) -> list[str]:
        """Folder-style names, zero-padded so that sorting them keeps label order."""
        w = len(str(self.num_classes - 1))
        return [f"class_{k:0{w}d}_{round(math.degrees(a)) % 360:03d}deg" for k, a in enumerate(self.angles)]

    def fits(self, label: int, duration: float) -> bool:
        """Whether the disc of class `label` can stay inside the frame for `duration` seconds."""
        vx, vy = self.velocity(label)
        eps = 1e-9
        return abs(vx) * duration <= self._room(self.width) + eps and abs(vy) * duration <= self._room(self.height) + eps

    def start_range(self, label: int, duration: Optional[float] = None) -> tuple[tuple[float, float], tuple[float, float]]:
        """((x_lo, x_hi), (y_lo, y_hi)): start centres (at t = 0) keeping the disc inside the frame
        over [0, duration] (default max_duration). EqmError if the path cannot fit."""
        d = self.max_duration if duration is None else float(duration)
        if not self.fits(label, d):
            raise EqmError(
                f"synthetic class {label} at {self.speed(label):g} px/s cannot stay inside a "
                f"{self.width}x{self.height} frame for {d:.3f} s"
            )
        vx, vy = self.velocity(label)
        out = []
        for v, size in ((vx, self.width), (vy, self.height)):
            lo, hi = self.radius + EDGE_SLACK, size - 1.0 - EDGE_SLACK - self.radius
            # p(t) = p0 + v t must stay in [lo, hi] for t in [0, d]: both ends of the path.
            a, b = lo - min(0.0, v * d), hi - max(0.0, v * d)
            out.append((a, max(a, b)))
        return out[0], out[1]

    def random_start(self, label: int, rng: Union[np.random.Generator, int, None] = None,
                     duration: Optional[float] = None) -> tuple[float, float]:
        """A start centre (x0, y0) drawn uniformly from `start_range` with a numpy Generator (or a
        seed); the disc stays fully visible over [0, duration]."""
        g = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        (x_lo, x_hi), (y_lo, y_hi) = self.start_range(label, duration)
        x, y = float(g.uniform(x_lo, x_hi)), float(g.uniform(y_lo, y_hi))
        if self.start == "random":
            return x, y
        return self._onto_track(label, (x, y), ((x_lo, x_hi), (y_lo, y_hi)))

    def _onto_track(self, label: int, point, ranges) -> tuple[float, float]:
        """``point`` moved along the class's direction onto its track: the line across the motion
        through the start of the path centred over [0, max_duration]; kept inside ``ranges``."""
        d = self._vel[label] / np.linalg.norm(self._vel[label])
        p, track = np.asarray(point, dtype=np.float64), np.asarray(self.centered_start(label, 0.0, self.max_duration))
        q = p + float(np.dot(track - p, d)) * d
        return tuple(float(np.clip(v, lo, hi)) for v, (lo, hi) in zip(q, ranges))

    def centered_start(self, label: int, t0: float, t1: float) -> tuple[float, float]:
        """The start (centre at t = 0) whose path over [t0, t1] is centred in the frame."""
        vx, vy = self.velocity(label)
        tm = 0.5 * (t0 + t1)
        return (self.width - 1) / 2.0 - vx * tm, (self.height - 1) / 2.0 - vy * tm

    def positions(self, label: int, timestamps, start=None) -> np.ndarray:
        """True disc centres (T, 2) as (x, y) pixels at `timestamps` (seconds)."""
        t = np.asarray(_to_numpy(timestamps), dtype=np.float64).reshape(-1)
        k = self._check_label(label)
        if start is None:
            start = self.centered_start(k, float(t.min()), float(t.max()))
        return np.asarray(start, dtype=np.float64)[None, :] + self._vel[k][None, :] * t[:, None]

    # ------------------------------------------------------------------------------------------
    # Rendering

    def render(self, label: int, timestamps, start=None):
        """One clip: float32 tensor (3, T, H, W) in [-1, 1].

        timestamps: seconds (sequence, numpy or tensor (T,)); the disc centre is start + v * t.
        start: (x0, y0) centre at t = 0 in pixels; None centres the path over the timestamps.
        """
        t = np.asarray(_to_numpy(timestamps), dtype=np.float64).reshape(-1)
        if t.size == 0:
            raise EqmError("synthetic render needs at least one timestamp")
        k = self._check_label(label)
        if start is None:
            start = self.centered_start(k, float(t.min()), float(t.max()))
        return self.render_batch([k], t[None, :], [start])[0]

    def render_batch(self, labels, timestamps, starts=None):
        """A batch of clips: float32 tensor (B, 3, T, H, W) in [-1, 1], vectorised over B and T.

        labels: (B,) ints; timestamps: (B, T) or (T,) seconds; starts: (B, 2) centres at t = 0,
        None = each path centred over its own timestamps.
        """
        import torch

        lab = np.asarray(_to_numpy(labels), dtype=np.int64).reshape(-1)
        for k in lab:
            self._check_label(k)
        t = np.asarray(_to_numpy(timestamps), dtype=np.float64)
        if t.ndim == 1:
            t = np.broadcast_to(t, (lab.size, t.size))
        if t.ndim != 2 or t.shape[0] != lab.size or t.shape[1] == 0:
            raise EqmError(f"synthetic timestamps must have shape (B, T) with B={lab.size}, got {tuple(t.shape)}")
        if not np.all(np.isfinite(t)):
            raise EqmError("synthetic timestamps must be finite seconds")
        vel = self._vel[lab]  # (B, 2)
        if starts is None:
            tm = 0.5 * (t.min(axis=1) + t.max(axis=1))
            p0 = np.array([(self.width - 1) / 2.0, (self.height - 1) / 2.0])[None, :] - vel * tm[:, None]
        else:
            p0 = np.asarray(_to_numpy(starts), dtype=np.float64).reshape(lab.size, 2)
        centres = p0[:, None, :] + vel[:, None, :] * t[:, :, None]  # (B, T, 2)

        # float64 for the geometry (sub-pixel positions of fast 60 fps clips differ by ~0.1 px),
        # float32 for the image.
        c = torch.from_numpy(centres)
        xs = torch.arange(self.width, dtype=torch.float64)
        ys = torch.arange(self.height, dtype=torch.float64)
        dx = xs.view(1, 1, 1, -1) - c[..., 0].reshape(*c.shape[:2], 1, 1)
        dy = ys.view(1, 1, -1, 1) - c[..., 1].reshape(*c.shape[:2], 1, 1)
        dist = torch.sqrt(dx * dx + dy * dy)  # (B, T, H, W)
        cover = (self.radius + 0.5 - dist).clamp_(0.0, 1.0).float()
        img = self.background + (self.foreground - self.background) * cover
        return img.unsqueeze(1).expand(-1, 3, -1, -1, -1).contiguous()

    # ------------------------------------------------------------------------------------------
    # Writing a dataset of real files

    def write_videos(self, out_dir, fps_list: Sequence, seconds: float, per_class: int, *,
                     seed: int = 0, suffix: str = ".mp4", crf: float = 18, codec: Optional[str] = None) -> list[Path]:
        """Write `per_class` videos per class as real files in class subfolders; returns their paths.

        Layout: out_dir/<class_name>/clip_<i>_<fps>fps.mp4 (class names from `class_names`, so a
        folder dataset over out_dir gets label k for class k). Video i of class k is written at
        fps_list[(i + k) % len(fps_list)] (mixed rates; 30000/1001, "29.97" and other NTSC rates
        are stored exactly), lasts `seconds` (round(seconds * fps) frames) and starts at a random
        position (seeded) from which the disc stays inside the frame for the whole video.
        out_dir/motion.json records the velocities (pixels per second) of every class.
        """
        from eqm.timebase import fps_tag, frames_for_duration, parse_fps
        from eqm.video.io import write_video

        if not fps_list:
            raise EqmError("write_videos needs at least one frame rate")
        rates = [parse_fps(f) for f in fps_list]
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise EqmError(f"write_videos per_class must be a positive integer, got {per_class!r}")
        out = Path(out_dir)
        rng = np.random.default_rng([abs(int(seed)), 0x5EED])
        paths: list[Path] = []
        names = self.class_names
        for k in range(self.num_classes):
            for i in range(per_class):
                fps = rates[(i + k) % len(rates)]
                n = frames_for_duration(seconds, fps)
                t = np.arange(n, dtype=np.float64) * (fps.denominator / fps.numerator)
                # The last frame is shown until n / fps; keep the disc inside up to its own time.
                start = self.random_start(k, rng, duration=float(t[-1]))
                video = self.render(k, t, start=start)
                p = out / names[k] / f"clip_{i:03d}_{fps_tag(fps)}fps{suffix}"
                write_video(p, video, fps, crf=crf, codec=codec)
                paths.append(p)
        info = {
            "height": self.height, "width": self.width, "radius": self.radius, "start": self.start,
            "units": "pixels per second; x to the right, y down",
            "classes": [
                {"label": k, "folder": names[k], "vx": self.velocity(k)[0], "vy": self.velocity(k)[1],
                 "speed": self.speed(k)}
                for k in range(self.num_classes)
            ],
        }
        fsio.write_json(out / "motion.json", info)
        return paths

    def __repr__(self) -> str:
        return (f"SyntheticMotion(num_classes={self.num_classes}, height={self.height}, width={self.width}, "
                f"speed={self.speeds if len(set(self.speeds)) > 1 else self.speeds[0]:}, radius={self.radius:g}, "
                f"max_duration={self.max_duration:g}, start={self.start!r})")


def _to_numpy(x):
    if type(x).__module__.startswith("torch") and hasattr(x, "detach"):
        return x.detach().to("cpu").double().numpy()
    return x



__all__ = ["SyntheticMotion", "DEFAULT_SPEED_FRACTION", "DEFAULT_RADIUS_FRACTION"]
