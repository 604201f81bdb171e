"""Measuring motion speed in a clip: centroid track + least squares vs time.

How the central claim is measured with it: docs/reference.md#speed-on-synthetic-data.

`estimate_velocity(video, timestamps)` finds the bright shape in every frame by its intensity-
weighted centroid and fits position = p0 + v * t by least squares against the frames' real
timestamps, so the result is in pixels per SECOND whatever the frame rate.

Why the weights are not just the brightness: generated clips have a noisy background. With raw
brightness as weights, every background pixel pulls the centroid toward the frame centre, and the
pull shrinks the measured displacement (the speed comes out too low, by an amount that depends on
the noise, not on the model's motion). So each frame's brightness b in [0, 1] is measured above
its own background level (the median pixel, since the shape covers a small part of the frame),
and only the part above `rel_threshold` of the frame's peak contrast counts:
w = max(0, b - bg - rel_threshold * (peak - bg)). A symmetric shape keeps its centroid under a
symmetric threshold, so this removes the noise without biasing the track. Frames without any
contrast (peak == background) are left out of the fit.

Coordinates match `eqm.data.synthetic`: pixel (row i, column j) is at (x, y) = (j, i), y down.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np

from eqm.errors import EqmError

#: Share of each frame's peak contrast below which pixels do not count (noise floor).
DEFAULT_REL_THRESHOLD = 0.3
#: A frame whose peak is less than this above its background (in [0, 1] brightness) has no shape.
MIN_CONTRAST = 0.05


def _as_tensor(x, dtype=None):
    import torch

    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu")
    else:
        t = torch.as_tensor(np.asarray(x))
    return t.to(dtype or torch.float64)


def _brightness(videos):
    """(B, C, T, H, W) or (B, T, H, W) in [-1, 1] -> (B, T, H, W) brightness in [0, 1]."""
    if videos.dim() == 5:
        videos = videos.mean(dim=1)
    return ((videos + 1.0) * 0.5).clamp(0.0, 1.0)


def _batch_centroids(b, rel_threshold: float):
    """Centroids (B, T, 2) of brightness maps b (B, T, H, W) in [0, 1]; NaN for empty frames."""
    import torch

    B, T, H, W = b.shape
    flat = b.reshape(B, T, H * W)
    bg = flat.median(dim=-1).values
    peak = flat.max(dim=-1).values
    contrast = peak - bg
    w = (flat - (bg + rel_threshold * contrast).unsqueeze(-1)).clamp_(min=0.0).reshape(B, T, H, W)
    mass = w.sum(dim=(-1, -2))
    xs = torch.arange(W, dtype=w.dtype)
    ys = torch.arange(H, dtype=w.dtype)
    cx = (w.sum(dim=-2) * xs).sum(dim=-1) / mass
    cy = (w.sum(dim=-1) * ys).sum(dim=-1) / mass
    c = torch.stack([cx, cy], dim=-1)
    c[(contrast < MIN_CONTRAST) | (mass <= 0)] = float("nan")
    return c


def track_centroids(video, *, rel_threshold: float = DEFAULT_REL_THRESHOLD):
    """Intensity-weighted centroids (x, y) of one clip's frames: float64 tensor (T, 2), NaN where
    a frame shows no shape. video: (C, T, H, W) or (T, H, W) in [-1, 1]."""
    v = _as_tensor(video)
    if v.dim() not in (3, 4):
        raise EqmError(f"video must have shape (C, T, H, W) or (T, H, W), got {tuple(v.shape)}")
    return _batch_centroids(_brightness(v.unsqueeze(0)), rel_threshold)[0]


def estimate_velocities(videos, timestamps, *, rel_threshold: float = DEFAULT_REL_THRESHOLD):
    """Velocities (vx, vy) in pixels per second of a batch: float64 tensor (B, 2).

    videos: (B, C, T, H, W) or (B, T, H, W) in [-1, 1]; timestamps: (B, T) or (T,) seconds.
    Least-squares slope of each centroid coordinate against time over the frames that show the
    shape; NaN when fewer than two such frames (or no spread in time) remain.
    """
    import torch

    v = _as_tensor(videos)
    if v.dim() not in (4, 5):
        raise EqmError(f"videos must have shape (B, C, T, H, W) or (B, T, H, W), got {tuple(v.shape)}")
    c = _batch_centroids(_brightness(v), rel_threshold)  # (B, T, 2)
    B, T = c.shape[:2]
    t = _as_tensor(timestamps)
    if t.dim() == 1:
        t = t.unsqueeze(0).expand(B, -1)
    if tuple(t.shape) != (B, T):
        raise EqmError(f"timestamps must have shape ({B}, {T}) or ({T},) to match the video, got {tuple(t.shape)}")
    ok = ~torch.isnan(c[..., 0])  # (B, T)
    n = ok.sum(dim=1).to(t.dtype)
    okf = ok.to(t.dtype)
    tm = (t * okf).sum(dim=1) / n
    dt = (t - tm[:, None]) * okf
    var = (dt * dt).sum(dim=1)
    cz = torch.where(ok.unsqueeze(-1), c, torch.zeros_like(c))
    cm = cz.sum(dim=1) / n[:, None]
    cov = (dt.unsqueeze(-1) * (cz - cm[:, None, :]) * okf.unsqueeze(-1)).sum(dim=1)  # (B, 2)
    vel = cov / var[:, None]
    vel[(n < 2) | (var <= 0)] = float("nan")
    return vel


def estimate_velocity(video, timestamps, *, rel_threshold: float = DEFAULT_REL_THRESHOLD) -> tuple[float, float]:
    """(vx, vy) in pixels per second of the bright shape in one clip.

    video: (C, T, H, W) or (T, H, W) in [-1, 1] (torch or numpy); timestamps: (T,) seconds (the
    clip's real frame times). Returns (nan, nan) when fewer than two frames show a shape.
    """
    v = _as_tensor(video)
    if v.dim() not in (3, 4):
        raise EqmError(f"video must have shape (C, T, H, W) or (T, H, W), got {tuple(v.shape)}")
    t = _as_tensor(timestamps).reshape(-1)
    vel = estimate_velocities(v.unsqueeze(0), t.unsqueeze(0), rel_threshold=rel_threshold)[0]
    return float(vel[0]), float(vel[1])


#: Pixel value (in [-1, 1]) above which a pixel belongs to a shape: halfway between the synthetic
#: source's background (-1) and disc (+1).
SHAPE_LEVEL = 0.0


def frame_shapes(videos, *, level: float = SHAPE_LEVEL):
    """Connected shapes in every frame: (count, largest) long tensors of shape (B, T).

    videos: (B, C, T, H, W) or (B, T, H, W) in [-1, 1] (channels averaged).  A pixel is "on" when
    its value exceeds ``level``; shapes are the 8-connected groups of on pixels (found by
    propagating the largest pixel index through each group), ``count`` how many a frame holds and
    ``largest`` the pixel area of the biggest (0 for an empty frame).
    """
    import torch
    import torch.nn.functional as F

    v = _as_tensor(videos, torch.float32)
    if v.dim() == 5:
        v = v.mean(dim=1)
    if v.dim() != 4:
        raise EqmError(f"videos must have shape (B, C, T, H, W) or (B, T, H, W), got {tuple(v.shape)}")
    B, T, H, W = v.shape
    on = (v > level).reshape(B * T, 1, H, W)
    index = torch.arange(1, H * W + 1, dtype=torch.float32).reshape(1, 1, H, W)
    labels = torch.where(on, index, torch.zeros(()))
    for _ in range(H * W):  # each pass spreads a group's largest index one pixel further
        spread = torch.where(on, F.max_pool2d(labels, 3, stride=1, padding=1), torch.zeros(()))
        if torch.equal(spread, labels):
            break
        labels = spread
    flat = labels.reshape(B * T, H * W).long()
    count = ((flat == index.reshape(1, -1).long()) & on.reshape(B * T, -1)).sum(dim=1)
    areas = torch.zeros(B * T, H * W + 1, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    largest = areas[:, 1:].max(dim=1).values
    return count.reshape(B, T), largest.reshape(B, T)


def coherent_frames(videos, area: float, *, tolerance: float = 0.5, level: float = SHAPE_LEVEL):
    """(B, T) bool: the frame holds exactly ONE shape whose area is within ``tolerance`` (relative)
    of ``area`` pixels (e.g. the synthetic disc's pi * r^2) -- what a person sees as "one disc"."""
    count, largest = frame_shapes(videos, level=level)
    return (count == 1) & ((largest.double() - area).abs() <= tolerance * area)


Vec = Union[Sequence[float], np.ndarray]


def _norm(v: Vec) -> float:
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if a.size != 2:
        raise EqmError(f"a velocity is a pair (vx, vy), got {a.size} numbers")
    return float(math.hypot(a[0], a[1]))


def signed_speed_error(est: Vec, true: Vec) -> float:
    """(|est| - |true|) / |true|: negative when the clip moves too slowly, positive too fast."""
    t = _norm(true)
    if t <= 0:
        raise EqmError("the true velocity must be non-zero to measure a relative speed error")
    return (_norm(est) - t) / t


def relative_speed_error(est: Vec, true: Vec) -> float:
    """| |est| - |true| | / |true|: the error of the speed MAGNITUDE only (the calibration's measure).

    Direction is not part of it (a time-blind model gets the direction right and the speed wrong;
    that is what this number isolates); see `velocity_error` for the full vector error. NaN when
    the estimate is NaN (no shape found).
    """
    return abs(signed_speed_error(est, true))


def velocity_error(est: Vec, true: Vec) -> float:
    """|est - true| / |true|: relative error of the velocity vector (direction and speed)."""
    t = _norm(true)
    if t <= 0:
        raise EqmError("the true velocity must be non-zero to measure a relative velocity error")
    e = np.asarray(est, dtype=np.float64).reshape(-1) - np.asarray(true, dtype=np.float64).reshape(-1)
    return float(math.hypot(e[0], e[1])) / t


def along(est, true, degrees: float = 45.0) -> np.ndarray:
    """(N,) bool: each estimated velocity (N, 2) points within ``degrees`` of its true one (N, 2);
    False where either is zero or NaN.  Speed says how fast; this says whether the right way."""
    e = np.asarray(est, dtype=np.float64).reshape(-1, 2)
    t = np.asarray(true, dtype=np.float64).reshape(-1, 2)
    norms = np.hypot(e[:, 0], e[:, 1]) * np.hypot(t[:, 0], t[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (e * t).sum(axis=1) / norms
    return np.nan_to_num(cos, nan=-1.0) > math.cos(math.radians(degrees))


__all__ = [
    "along",
    "frame_shapes",
    "coherent_frames",
    "track_centroids",
    "estimate_velocity",
    "estimate_velocities",
    "relative_speed_error",
    "signed_speed_error",
    "velocity_error",
]
