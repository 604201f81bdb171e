"""eqm.data.speed: centroid tracking + least squares recover the synthetic ground-truth speed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eqm.data.speed import (
    estimate_velocities,
    estimate_velocity,
    relative_speed_error,
    signed_speed_error,
    track_centroids,
    velocity_error,
)
from eqm.data.synthetic import SyntheticMotion
from eqm.errors import EqmError


@pytest.fixture(scope="module")
def motion():
    return SyntheticMotion(num_classes=8, height=32, width=32, max_duration=1.0)


@pytest.mark.parametrize("fps", [6, 12, 24, 60])
def test_speed_within_two_percent_at_every_rate(motion, fps):
    # T frames at `fps` cover T / fps seconds: at 60 fps and 8 frames the disc moves < 2 px in
    # total, so this also checks sub-pixel accuracy of the anti-aliased rendering + centroid.
    rng = np.random.default_rng(fps)
    for T in (6, 8):
        t = np.arange(T) / fps
        for k in range(motion.num_classes):
            v = motion.render(k, t, start=motion.random_start(k, rng, duration=float(t[-1])))
            est = estimate_velocity(v, t)
            assert relative_speed_error(est, motion.velocity(k)) < 0.02, (fps, T, k, est)
            assert velocity_error(est, motion.velocity(k)) < 0.03


def test_per_frame_centroid_is_the_true_centre(motion):
    t = np.arange(10) / 24
    start = motion.random_start(3, 0, duration=float(t[-1]))
    c = track_centroids(motion.render(3, t, start=start))
    truth = motion.positions(3, t, start=start)
    assert c.shape == (10, 2)
    assert np.abs(c.numpy() - truth).max() < 0.05


def test_noise_does_not_pull_the_speed_toward_zero(motion):
    # Background noise would drag a raw-brightness centroid to the frame centre and shrink the
    # measured speed; the per-frame background + threshold must keep the estimate honest.
    g = torch.Generator().manual_seed(0)
    t = np.arange(12) / 12
    errs = []
    for k in range(motion.num_classes):
        v = motion.render(k, t)
        noisy = (v + 0.25 * torch.randn(v.shape, generator=g)).clamp(-1, 1)
        errs.append(relative_speed_error(estimate_velocity(noisy, t), motion.velocity(k)))
    assert max(errs) < 0.05, errs
    # The naive estimator (raw brightness weights) is visibly biased on the same clip: this is
    # what the background subtraction is for.
    v = motion.render(0, t)
    noisy = (v + 0.25 * torch.randn(v.shape, generator=g)).clamp(-1, 1)
    b = ((noisy.mean(0) + 1) / 2).double()
    xs = torch.arange(32, dtype=torch.float64)
    cx = (b.sum(-2) * xs).sum(-1) / b.sum((-1, -2))
    naive = np.polyfit(t, cx.numpy(), 1)[0]
    assert abs(naive) < 0.8 * motion.speed(0)


def test_uses_the_given_timestamps_not_frame_indices(motion):
    # Irregular (variable-rate) frame times: the estimate is in px per second of real time.
    t = np.array([0.0, 0.02, 0.07, 0.17, 0.20, 0.33, 0.36, 0.5])
    v = motion.render(1, t)
    assert relative_speed_error(estimate_velocity(v, t), motion.velocity(1)) < 0.02
    wrong = estimate_velocity(v, np.arange(8) / 16)  # same frames, uniform times
    assert relative_speed_error(wrong, motion.velocity(1)) > 0.1


def test_batched_matches_single_and_accepts_grey_and_numpy(motion):
    labels = np.arange(8)
    t = np.tile(np.arange(8) / 10, (8, 1))
    videos = motion.render_batch(labels, t)
    batch = estimate_velocities(videos, t)
    assert batch.shape == (8, 2)
    for k in range(8):
        single = estimate_velocity(videos[k], t[k])
        assert np.allclose(batch[k].numpy(), single)
        grey = estimate_velocity(videos[k][0].numpy(), t[k])  # (T, H, W) numpy
        assert np.allclose(grey, single)


def test_empty_clip_gives_nan_and_bad_shapes_raise():
    t = np.arange(4) / 8
    blank = -torch.ones(3, 4, 16, 16)
    vx, vy = estimate_velocity(blank, t)
    assert math.isnan(vx) and math.isnan(vy)
    assert math.isnan(relative_speed_error((vx, vy), (1.0, 0.0)))
    with pytest.raises(EqmError):
        estimate_velocity(torch.zeros(16, 16), [0.0])
    with pytest.raises(EqmError, match="timestamps"):
        estimate_velocity(blank, np.arange(5) / 8)


def test_error_definitions():
    assert relative_speed_error((3.0, 4.0), (0.0, 10.0)) == pytest.approx(0.5)
    assert signed_speed_error((3.0, 4.0), (0.0, 10.0)) == pytest.approx(-0.5)
    assert signed_speed_error((0.0, 12.0), (10.0, 0.0)) == pytest.approx(0.2)
    # Direction does not enter the speed error, but does enter the velocity error.
    assert relative_speed_error((-10.0, 0.0), (10.0, 0.0)) == 0.0
    assert velocity_error((-10.0, 0.0), (10.0, 0.0)) == pytest.approx(2.0)
    with pytest.raises(EqmError):
        relative_speed_error((1.0, 0.0), (0.0, 0.0))


def test_frame_shapes_counts_connected_shapes_and_their_area():
    from eqm.data.speed import coherent_frames, frame_shapes

    motion = SyntheticMotion(4, 16, 16, max_duration=1.0)
    t = np.arange(12) / 12.0
    clips = motion.render_batch([0, 1, 2, 3], t, [motion.random_start(k, 0, duration=1.0) for k in range(4)])
    count, largest = frame_shapes(clips)
    assert count.shape == (4, 12) and bool((count == 1).all())
    area = math.pi * motion.radius ** 2
    assert bool(((largest - area).abs() <= 2).all())  # the anti-aliased disc: pi r^2 to a pixel or two
    assert bool(coherent_frames(clips, area).all())

    frames = torch.full((1, 3, 16, 16), -1.0)  # (B, T, H, W): empty / two blobs / a diagonal line / scattered
    frames[0, 1, 2:4, 2:4] = 1.0
    frames[0, 1, 10:13, 10:13] = 1.0
    frames[0, 2, range(8), range(8)] = 1.0  # diagonal neighbours are one 8-connected shape
    count, largest = frame_shapes(frames)
    assert count.tolist() == [[0, 2, 1]] and largest.tolist() == [[0, 9, 8]]
    speckle = torch.full((1, 1, 16, 16), -1.0)
    speckle[0, 0, ::3, ::3] = 1.0
    assert frame_shapes(speckle)[0].item() == 36
    assert not coherent_frames(speckle, area).any()
    big = torch.full((1, 1, 16, 16), -1.0)
    big[0, 0, 2:10, 2:10] = 1.0  # one shape, 64 pixels: not a disc of radius 2
    assert not coherent_frames(big, area).any()


def test_along_is_within_the_angle_and_false_for_nothing():
    from eqm.data.speed import along

    est = [[1.0, 0.0], [1.0, 0.9], [1.0, 1.1], [-1.0, 0.0], [0.0, 0.0], [float("nan"), 1.0]]
    true = [[2.0, 0.0]] * 6
    assert along(est, true).tolist() == [True, True, False, False, False, False]
    assert along([[0.0, 1.0]], [[1.0, 0.0]], degrees=95).tolist() == [True]
