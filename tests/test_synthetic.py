"""eqm.data.synthetic: analytic moving discs with known velocities, rendered and written to MP4."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from eqm.data.speed import estimate_velocity, relative_speed_error
from eqm.data.synthetic import SyntheticMotion
from eqm.errors import EqmError


def test_velocities_are_distinct_directions_in_pixels_per_second():
    m = SyntheticMotion(num_classes=4, height=32, width=32)
    assert m.velocity(0) == pytest.approx((16.0, 0.0))  # right
    assert m.velocity(1) == pytest.approx((0.0, 16.0))  # down (y grows downward)
    assert m.velocity(2) == pytest.approx((-16.0, 0.0))
    assert m.velocity(3) == pytest.approx((0.0, -16.0))
    assert m.class_names == ["class_0_000deg", "class_1_090deg", "class_2_180deg", "class_3_270deg"]
    m8 = SyntheticMotion(num_classes=8, height=32, width=32, speed=10.0)
    vels = {tuple(np.round(m8.velocity(k), 6)) for k in range(8)}
    assert len(vels) == 8 and all(math.hypot(*v) == pytest.approx(10.0) for v in vels)
    per_class = SyntheticMotion(num_classes=2, speed=[5.0, 9.0])
    assert per_class.speed(1) == 9.0 and per_class.velocity(1) == pytest.approx((-9.0, 0.0))
    with pytest.raises(EqmError, match="label"):
        m.velocity(4)


def test_render_shape_range_and_position():
    m = SyntheticMotion(num_classes=4, height=24, width=40, radius=3.0)
    t = torch.arange(5) / 10.0
    v = m.render(0, t, start=(10.0, 12.0))
    assert v.shape == (3, 5, 24, 40) and v.dtype == torch.float32
    assert v.min() >= -1.0 and v.max() <= 1.0
    # Centre pixel fully covered, far pixels background, rim pixels in between (anti-aliased).
    assert torch.all(v[:, 0, 12, 10] == 1.0) and torch.all(v[:, 0, 0, 0] == -1.0)
    rim = v[0, 0][(v[0, 0] > -1.0) & (v[0, 0] < 1.0)]
    assert rim.numel() > 0
    # After 0.4 s the disc's centre of mass is at start + v * 0.4 (default speed: half the
    # shorter side per second, 12 px/s here).
    assert m.velocity(0) == pytest.approx((12.0, 0.0))
    cov = (v[0, 4].double() + 1) / 2
    x = (cov.sum(0) * torch.arange(40)).sum() / cov.sum()
    y = (cov.sum(1) * torch.arange(24)).sum() / cov.sum()
    assert x.item() == pytest.approx(10.0 + 12.0 * 0.4, abs=0.02) and y.item() == pytest.approx(12.0, abs=0.02)
    # Coverage is radially symmetric and integrates to about the disc area.
    area = ((v[0, 0] + 1) / 2).sum().item()
    assert area == pytest.approx(math.pi * 3.0**2, rel=0.08)


def test_subpixel_motion_changes_the_image_smoothly():
    # Anti-aliasing: a 0.1 px shift must change pixel values (a hard-edged disc would not move).
    m = SyntheticMotion(num_classes=1, height=16, width=16, radius=3.0)
    a = m.render(0, [0.0], start=(7.0, 7.0))
    b = m.render(0, [0.1 / m.speed(0)], start=(7.0, 7.0))
    # Rim coverage changes by the shift (0.1 px -> 0.1 coverage -> 0.2 in [-1, 1] pixel values).
    assert 0.1 < (a - b).abs().max() <= 0.2 + 1e-6


def test_render_batch_matches_render_and_is_vectorised():
    m = SyntheticMotion(num_classes=4, height=16, width=16)
    labels = [0, 1, 2, 3]
    t = np.stack([np.arange(6) / f for f in (6, 12, 24, 60)])
    starts = [m.random_start(k, np.random.default_rng(k), duration=float(t[i, -1])) for i, k in enumerate(labels)]
    batch = m.render_batch(labels, t, starts)
    assert batch.shape == (4, 3, 6, 16, 16)
    for i, k in enumerate(labels):
        assert torch.equal(batch[i], m.render(k, t[i], start=starts[i]))


def test_random_starts_keep_the_disc_inside_for_the_duration():
    m = SyntheticMotion(num_classes=8, height=32, width=32, max_duration=1.2)
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1.2, 13)
    for k in range(8):
        for _ in range(20):
            v = m.render(k, t, start=m.random_start(k, rng))
            border = torch.cat([v[:, :, 0], v[:, :, -1], v[:, :, :, 0], v[:, :, :, -1]], dim=-1)
            assert torch.all(border == -1.0), k
    # The start positions are spread over the allowed range, not fixed.
    xs = [m.random_start(1, rng)[0] for _ in range(50)]
    assert max(xs) - min(xs) > 5


def test_per_class_starts_share_one_track_along_the_direction():
    m = SyntheticMotion(num_classes=8, height=32, width=32, max_duration=1.2, start="per-class")
    free = SyntheticMotion(num_classes=8, height=32, width=32, max_duration=1.2)
    rng = np.random.default_rng(0)
    for k in range(8):
        d = np.asarray(m.velocity(k)) / m.speed(k)
        across = np.array([-d[1], d[0]])
        for duration in (1.2, 0.5):
            t = np.linspace(0, duration, 7)
            starts = np.array([m.random_start(k, rng, duration=duration) for _ in range(30)])
            for s in starts:  # the disc stays inside the frame for the clip's duration
                v = m.render(k, t, start=tuple(s))
                border = torch.cat([v[:, :, 0], v[:, :, -1], v[:, :, :, 0], v[:, :, :, -1]], dim=-1)
                assert torch.all(border == -1.0), k
            along = starts @ d
            if k % 2 == 0:  # axis-aligned: every start on the track of the path centred over 1.2 s
                track = np.asarray(m.centered_start(k, 0.0, 1.2)) @ d
                np.testing.assert_allclose(along, track, atol=1e-9)
                assert np.ptp(starts @ across) > 5  # across the motion: anywhere
            free_along = np.array([free.random_start(k, rng, duration=duration) for _ in range(30)]) @ d
            assert np.ptp(along) < np.ptp(free_along)
    # the same random draws as "random": only the start along the direction moves
    a, b = (SyntheticMotion(4, 16, 16, max_duration=1.0, start=s).random_start(0, 3, duration=0.5)
            for s in ("random", "per-class"))
    assert a[1] == b[1] and a[0] != b[0]
    with pytest.raises(EqmError, match="start must be one of random, per-class"):
        SyntheticMotion(start="edge")


def test_speed_that_cannot_fit_is_refused_and_default_shrinks():
    with pytest.raises(EqmError, match="speed 40 px/s"):
        SyntheticMotion(num_classes=4, height=32, width=32, speed=40.0, max_duration=1.0)
    # Default speed (16 px/s at 32 px) would leave the frame in a 3 s clip: it shrinks to fit.
    m = SyntheticMotion(num_classes=4, height=32, width=32, max_duration=3.0)
    assert m.speed(0) < 16.0 and all(m.fits(k, 3.0) for k in range(4))
    with pytest.raises(EqmError, match="radius"):
        SyntheticMotion(height=8, width=8, radius=5.0)
    with pytest.raises(EqmError):
        SyntheticMotion(num_classes=0)
    with pytest.raises(EqmError, match="cannot stay inside"):
        SyntheticMotion().random_start(0, 0, duration=10.0)


def test_write_videos_mixed_rates_exact_and_ground_truth(tmp_path):
    from eqm.video.io import read_video
    from eqm.video.probe import probe_paths

    m = SyntheticMotion(num_classes=2, height=32, width=32, max_duration=1.0)
    paths = m.write_videos(tmp_path / "ds", [24, "30000/1001", 12], seconds=1.0, per_class=2)
    assert len(paths) == 4
    assert [p.parent.name for p in paths] == ["class_0_000deg"] * 2 + ["class_1_180deg"] * 2
    assert {p.name for p in paths} == {"clip_000_24fps.mp4", "clip_001_29.97fps.mp4", "clip_000_29.97fps.mp4",
                                      "clip_001_12fps.mp4"}
    results = {p.name + p.parent.name: r for p, r in zip(paths, probe_paths(paths))}
    for p in paths:
        r = results[p.name + p.parent.name]
        assert r.ok, r.reason
        want = Fraction(30000, 1001) if "29.97" in p.name else Fraction(int(p.name.split("_")[2][:-7]))
        assert r.fps_fraction == want
        assert r.frames == round(float(want) * 1.0)
        assert not r.vfr
    info = json.loads((tmp_path / "ds" / "motion.json").read_text())
    assert info["classes"][1]["vx"] == pytest.approx(-16.0)
    # The written pixels move at the class velocity (through H.264 coding).
    data = read_video(paths[1])
    from eqm.video.io import from_uint8

    est = estimate_velocity(from_uint8(data.frames), data.pts)
    assert relative_speed_error(est, m.velocity(0)) < 0.02
