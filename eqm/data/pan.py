"""Real footage with a known speed and no download: a photograph panned at a set velocity.

A camera window of ``height x width`` pixels slides over a real photograph at ``velocity``
pixels per second (of the output frame), so every frame is real image content and the true
motion speed is known at any frame rate. The photograph is first shrunk by ``scale`` with area
averaging (an anti-aliased, camera-like view), then each frame is a sub-pixel translation of it
(bilinear), so slow pans at high rates move by fractions of a pixel as a real camera would.

The default photograph is ``grace_hopper.jpg``, which matplotlib (a dependency) ships in its
wheel. The content moves at ``-velocity`` in the frame (the window moves at ``+velocity``); the
speed is ``|velocity|`` either way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from eqm.errors import EqmError

#: The photograph matplotlib ships (mpl-data/sample_data), a real 512x600 colour photo.
DEFAULT_PHOTO = "grace_hopper.jpg"


def load_photo(path: Union[str, Path, None] = None) -> np.ndarray:
    """A photograph as uint8 (H, W, 3) RGB; ``None`` = matplotlib's sample photograph."""
    import cv2

    if path is None:
        import matplotlib.cbook

        path = matplotlib.cbook.get_sample_data(DEFAULT_PHOTO, asfileobj=False)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise EqmError(f"cannot read a photograph from {path}")
    return np.ascontiguousarray(img[..., ::-1])


def pan_frames(photo: np.ndarray, timestamps: Sequence[float], *, height: int, width: int,
               velocity: tuple[float, float], scale: float = 1.0,
               origin: Optional[tuple[float, float]] = None) -> np.ndarray:
    """Frames uint8 (T, height, width, 3) of a window panning over ``photo`` at ``velocity``.

    velocity: (vx, vy) pixels per second of the output frame (x right, y down); scale: how many
    photograph pixels one output pixel covers; origin: the window's top-left corner at t = 0 in
    shrunk-photo pixels (default: the path centred in the photo). EqmError if the window would
    leave the photograph at any timestamp.
    """
    import cv2

    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise EqmError(f"pan scale must be a positive number, got {scale!r}")
    ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    h0, w0 = photo.shape[:2]
    small = cv2.resize(photo, (max(1, round(w0 / scale)), max(1, round(h0 / scale))), interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    vx, vy = (float(v) for v in velocity)
    if origin is None:
        tm = 0.5 * (ts.min() + ts.max())
        origin = ((sw - width) / 2.0 - vx * tm, (sh - height) / 2.0 - vy * tm)
    x0, y0 = (float(o) for o in origin)
    xs, ys = x0 + vx * ts, y0 + vy * ts
    if xs.min() < 0 or ys.min() < 0 or xs.max() + width > sw - 1 or ys.max() + height > sh - 1:
        raise EqmError(f"a {width}x{height} window panning at ({vx:g}, {vy:g}) px/s for {ts.max() - ts.min():.3g} s "
                       f"leaves the {sw}x{sh} photograph (scale {scale:g}); lower the speed, the scale or the duration")
    out = np.empty((ts.size, height, width, 3), dtype=np.uint8)
    for k, (x, y) in enumerate(zip(xs, ys)):
        m = np.array([[1.0, 0.0, x], [0.0, 1.0, y]])
        out[k] = cv2.warpAffine(small, m, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    return out


__all__ = ["DEFAULT_PHOTO", "load_photo", "pan_frames"]
