"""eqm.data.clips: clip policy and the synthetic / folder / manifest datasets, on real files.

The videos are written by eqm.video.io.write_video (PyAV, H.264) from SyntheticMotion, so every
clip read back can be checked against a known velocity in pixels per second.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from eqm.data.clips import (
    ClipPolicy,
    DataWarning,
    ManifestDataset,
    SyntheticClipDataset,
    VideoFolderDataset,
    build_dataset,
    item_rng,
    select_frames,
)
from eqm.data.speed import estimate_velocity, relative_speed_error
from eqm.data.synthetic import SyntheticMotion
from eqm.errors import EqmError

POLICY = ClipPolicy(num_frames=8, fps_min=8, fps_max=30, height=32, width=32)
RATES = [24, "30000/1001", 12, 60]
SOURCE_RATE = {"24": 24.0, "29.97": 30000 / 1001, "12": 12.0, "60": 60.0}


def source_rate(path) -> float:
    return SOURCE_RATE[Path(path).name.split("_")[2][: -len("fps.mp4")]]


@pytest.fixture(scope="module")
def motion():
    return SyntheticMotion(num_classes=3, height=32, width=32, max_duration=1.2)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory, motion):
    """3 classes x 2 videos of 1.2 s at 24, 29.97, 12 and 60 fps (mixed within each class)."""
    root = tmp_path_factory.mktemp("videos") / "ds"
    motion.write_videos(root, RATES, seconds=1.2, per_class=2, seed=1)
    return root


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return fn(*a, **kw)


# ------------------------------------------------------------------------------------------------
# Policy


def test_policy_validation_and_rate_range():
    with pytest.raises(EqmError, match="fps_min"):
        ClipPolicy(8, 30, 8, 32, 32)
    with pytest.raises(EqmError, match="num_frames"):
        ClipPolicy(0, 8, 30, 32, 32)
    p = POLICY
    assert p.max_duration == pytest.approx(7 / 8)
    assert p.rate_range() == (8.0, 30.0)
    assert p.rate_range(24.0, 10.0) == (8.0, 24.0)  # never above the source
    assert p.rate_range(5.0, 10.0) == (5.0, 5.0)  # slower than fps_min: its own rate
    lo, hi = p.rate_range(60.0, 0.5)  # 8 frames must fit in 0.5 s: at least 14 fps
    assert lo == pytest.approx(14.0) and hi == 30.0
    assert p.rate_range(60.0, 0.2) is None  # 7 / 0.2 = 35 fps needed > fps_max
    rng = np.random.default_rng(0)
    draws = [p.choose_rate(rng, 12.0, 5.0) for _ in range(200)]
    assert min(draws) >= 8.0 and max(draws) <= 12.0 and max(draws) - min(draws) > 3


def test_select_frames_nearest_real_frames_strictly_increasing():
    rng = np.random.default_rng(0)
    pts = np.arange(30) / 24
    for _ in range(20):
        fps = rng.uniform(8, 24)
        idx = select_frames(pts, 8, fps, rng)
        assert np.all(np.diff(idx) > 0) and idx[-1] < 30
        want = pts[idx[0]] + np.arange(8) / fps
        assert np.all(np.abs(pts[idx] - want) <= 0.5 / 24 + 1e-9)
    # Variable rate with a gap wider than 1/fps: still distinct, increasing frames inside the file.
    vfr = np.array([0, 0.01, 0.02, 0.5, 0.51, 0.52, 0.53, 0.54, 0.55])
    for seed in range(10):
        idx = select_frames(vfr, 8, 30.0, np.random.default_rng(seed))
        assert np.all(np.diff(idx) > 0) and 0 <= idx[0] and idx[-1] <= 8
    with pytest.raises(EqmError):
        select_frames(np.arange(5) / 24, 8, 12.0, rng)


def test_apply_spatial_same_crop_and_flip_for_every_frame():
    p = ClipPolicy(4, 8, 30, 16, 24, random_flip=True)
    base = torch.rand(3, 1, 40, 48) * 2 - 1
    video = base.expand(3, 4, 40, 48).clone()  # four identical frames
    seen_flip = set()
    for seed in range(12):
        sp = p.choose_spatial(item_rng(0, seed), 40, 48)
        assert sp.size == (20, 24)  # the smallest scale (0.5) at which 40 x 48 covers 16 x 24
        out = p.apply_spatial(video, sp)
        assert out.shape == (3, 4, 16, 24)
        assert all(torch.equal(out[:, 0], out[:, k]) for k in range(4))
        seen_flip.add(sp.flip)
    assert seen_flip == {True, False}
    no_flip = ClipPolicy(4, 8, 30, 16, 24)
    assert not any(no_flip.choose_spatial(item_rng(0, s), 40, 48).flip for s in range(12))


# ------------------------------------------------------------------------------------------------
# Synthetic dataset


def test_synthetic_items_shapes_rates_and_speed():
    ds = build_dataset("synthetic", policy=POLICY, num_classes=4, length=40, seed=3)
    assert isinstance(ds, SyntheticClipDataset) and len(ds) == 40 and ds.num_classes == 4 and ds.skipped == 0
    fps_seen = []
    for i in range(12):
        it = ds[i]
        assert it["video"].shape == (3, 8, 32, 32) and it["video"].dtype == torch.float32
        assert it["timestamps"].dtype == torch.float32 and it["timestamps"][0] == 0
        assert it["label"].dtype == torch.long and it["label"].item() == i % 4
        assert 8 <= it["fps"] <= 30
        assert torch.allclose(it["timestamps"], torch.arange(8) / it["fps"], atol=1e-6)
        est = estimate_velocity(it["video"], it["timestamps"])
        assert relative_speed_error(est, ds.motion.velocity(i % 4)) < 0.02
        fps_seen.append(it["fps"])
    assert max(fps_seen) - min(fps_seen) > 5  # rates differ per clip


def test_synthetic_deterministic_per_index_and_across_workers():
    ds = build_dataset("synthetic", policy=POLICY, num_classes=4, length=16, seed=7)
    again = build_dataset("synthetic", policy=POLICY, num_classes=4, length=16, seed=7)
    other = build_dataset("synthetic", policy=POLICY, num_classes=4, length=16, seed=8)
    assert torch.equal(ds[5]["video"], again[5]["video"]) and ds[5]["fps"] == again[5]["fps"]
    assert ds[5]["fps"] != other[5]["fps"]
    # Two DataLoader workers (separate processes) produce exactly what this process does.
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert batches[0]["video"].shape == (4, 3, 8, 32, 32) and batches[0]["timestamps"].shape == (4, 8)
    assert batches[0]["label"].shape == (4,) and batches[0]["fps"].shape == (4,)
    for b, batch in enumerate(batches):
        for j in range(4):
            assert torch.equal(batch["video"][j], ds[4 * b + j]["video"])
            assert torch.equal(batch["timestamps"][j], ds[4 * b + j]["timestamps"])


def test_synthetic_speed_and_radius_from_recipe_and_too_fast():
    ds = build_dataset("synthetic", policy=POLICY, num_classes=2, length=4, seed=0, speed=10.0, radius=3.0)
    assert ds.motion.speed(0) == 10.0 and ds.motion.radius == 3.0
    with pytest.raises(EqmError, match="speed 50 px/s"):
        build_dataset("synthetic", policy=POLICY, num_classes=2, length=4, seed=0, speed=50.0)
    with pytest.raises(EqmError, match="empty"):
        build_dataset("synthetic", policy=POLICY, num_classes=2, length=0, seed=0)


def test_synthetic_start_from_the_recipe_key():
    from eqm.latent import recipe_dataset
    from eqm.recipe import load_recipe

    demo = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    pinned = recipe_dataset(load_recipe(demo))
    assert pinned.motion.start == "per-class"  # what make demo trains on
    ds = recipe_dataset(load_recipe(demo, ["data.synthetic.start=random"]))
    assert ds.motion.start == "random"
    # item i: the same rate and the same position across the motion, pinned along it
    first = lambda d, k: d[k]["video"][0, 0].add(1).nonzero().float().mean(0)  # noqa: E731 (row, col)
    for k in (0, 4):  # class 0 moves right: the column is pinned, the row is not
        assert torch.equal(ds[k]["timestamps"], pinned[k]["timestamps"])
    assert abs(first(pinned, 0)[1] - first(pinned, 4)[1]) < 0.1
    assert abs(first(pinned, 0)[0] - first(ds, 0)[0]) < 0.1
    with pytest.raises(EqmError, match="data.synthetic.start"):
        load_recipe(demo, ["data.synthetic.start=edge"])


# ------------------------------------------------------------------------------------------------
# Folder dataset


def test_folder_dataset_real_timestamps_never_above_source(video_root, motion):
    ds = VideoFolderDataset(video_root, POLICY, seed=0, clips_per_file=4)
    assert ds.class_names == motion.class_names and ds.num_classes == 3
    assert ds.skipped == 0 and len(ds) == 24
    by_rate = {}
    for i in range(len(ds)):
        it = ds[i]
        src = ds.sources[i % len(ds.sources)]
        rate = source_rate(src.path)
        assert it["label"].item() == src.label
        assert it["fps"] <= rate + 1e-9 and it["fps"] >= 8 - 1e-9
        t = it["timestamps"].double().numpy()
        assert t[0] == 0 and np.all(np.diff(t) > 0)
        # Real frame times (multiples of the source frame duration) within half a source frame
        # of k / fps.
        assert np.allclose(t * rate, np.round(t * rate), atol=1e-3)
        assert np.all(np.abs(t - np.arange(8) / it["fps"]) <= 0.5 / rate + 1e-4)
        assert relative_speed_error(estimate_velocity(it["video"], t), motion.velocity(src.label)) < 0.03
        by_rate.setdefault(round(rate, 2), []).append(it["fps"])
    assert set(by_rate) == {24.0, 29.97, 12.0, 60.0}
    assert max(by_rate[12.0]) <= 12.0 and max(by_rate[60.0]) > 12.0


def test_folder_dataset_is_deterministic_and_flip_covers_whole_clip(video_root):
    a = VideoFolderDataset(video_root, POLICY, seed=5, clips_per_file=2)
    b = VideoFolderDataset(video_root, POLICY, seed=5, clips_per_file=2)
    for i in (0, 3, 7, 11):
        x, y = a[i], b[i]
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["timestamps"], y["timestamps"])
    c = VideoFolderDataset(video_root, POLICY, seed=6, clips_per_file=2)
    assert any(not torch.equal(a[i]["timestamps"], c[i]["timestamps"]) for i in range(len(a)))
    # Same seed with random_flip: the same draws, so a flipped item is the unflipped one mirrored
    # in every frame (one decision per clip), and both decisions occur.
    flip_policy = ClipPolicy(8, 8, 30, 32, 32, random_flip=True)
    f = VideoFolderDataset(video_root, flip_policy, seed=5, clips_per_file=2)
    flipped = 0
    for i in range(len(f)):
        plain, maybe = a[i]["video"], f[i]["video"]
        if torch.equal(plain, maybe):
            continue
        assert torch.equal(plain.flip(-1), maybe)
        flipped += 1
    assert 0 < flipped < len(f)


def test_folder_dataset_resizes_and_crops(video_root, motion):
    small = ClipPolicy(6, 8, 30, 16, 16)
    ds = VideoFolderDataset(video_root, small, seed=0)
    it = ds[0]
    assert it["video"].shape == (3, 6, 16, 16)
    # Half the size: half the speed in pixels per second.
    est = estimate_velocity(it["video"], it["timestamps"])
    assert relative_speed_error(est, np.array(motion.velocity(0)) * 0.5) < 0.05


def test_broken_and_too_short_files_are_skipped_and_counted(tmp_path, video_root):
    root = tmp_path / "ds"
    shutil.copytree(video_root, root)
    from eqm.video.io import write_video

    (root / "class_0_000deg" / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(200))
    (root / "class_1_120deg" / "empty.mp4").write_bytes(b"")
    write_video(root / "class_2_240deg" / "short.mp4", np.zeros((4, 32, 32, 3), np.uint8), 24)  # < 8 frames
    # 9 frames at 60 fps span 0.133 s: 8 frames at <= 30 fps need 0.233 s.
    write_video(root / "class_2_240deg" / "brief.mp4", np.zeros((9, 32, 32, 3), np.uint8), 60)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a class")
    with pytest.warns(DataWarning, match="skipped 4 of 10 videos"):
        ds = VideoFolderDataset(root, POLICY, seed=0)
    assert ds.skipped == 4 and len(ds) == 6
    assert ds.class_names == ["class_0_000deg", "class_1_120deg", "class_2_240deg"]
    reasons = dict((Path(p).name, why) for p, why in ds.skipped_files)
    assert reasons["empty.mp4"].startswith("empty") and "too short" in reasons["short.mp4"]
    assert "too short" in reasons["brief.mp4"]
    assert all(ds[i]["video"].shape == (3, 8, 32, 32) for i in range(len(ds)))


def test_read_failure_mid_epoch_falls_back_deterministically(tmp_path, video_root):
    root = tmp_path / "ds"
    shutil.copytree(video_root, root)
    ds = quiet(VideoFolderDataset, root, POLICY, seed=0)
    twin = quiet(VideoFolderDataset, root, POLICY, seed=0)  # another worker's copy, built before the damage
    victim = ds.sources[0]
    Path(victim.path).write_bytes(b"broken after probing")
    with pytest.warns(DataWarning, match="cannot read a clip"):
        it = ds[0]
    # Replaced by the other file of the same class, and the same replacement every time.
    assert it["label"].item() == victim.label
    assert it["video"].shape == (3, 8, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # warned once per file: no second warning
        again = ds[0]
    assert torch.equal(it["video"], again["video"])
    # A copy that discovers the damage itself, later, falls back to the identical clip.
    with pytest.warns(DataWarning):
        assert torch.equal(twin[0]["video"], it["video"])
    # Once every file is unreadable there is nothing to fall back to: a one-line EqmError.
    for src in ds.sources:
        Path(src.path).write_bytes(b"")
    with pytest.raises(EqmError, match="could be read"):
        quiet(ds.__getitem__, 1)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EqmError, match=str(tmp_path / "empty")):
        VideoFolderDataset(tmp_path / "empty", POLICY)
    with pytest.raises(EqmError, match="data.root"):
        VideoFolderDataset(tmp_path / "nope", POLICY)
    with pytest.raises(EqmError, match="data.root"):
        build_dataset("folder", policy=POLICY, num_classes=4, length=1, seed=0)
    with pytest.raises(EqmError, match="data.manifest"):
        build_dataset("manifest", policy=POLICY, num_classes=4, length=1, seed=0)
    with pytest.raises(EqmError, match="data.source"):
        build_dataset("webdataset", policy=POLICY, num_classes=4, length=1, seed=0)
    bad = tmp_path / "bad" / "cls"
    bad.mkdir(parents=True)
    (bad / "x.mp4").write_bytes(b"nothing")
    with pytest.raises(EqmError, match="no usable videos"):
        quiet(VideoFolderDataset, tmp_path / "bad", POLICY)


# ------------------------------------------------------------------------------------------------
# Manifest dataset


def test_manifest_dataset_uses_metadata_without_probing(tmp_path, video_root, monkeypatch):
    from eqm.video import probe as probe_mod

    root = tmp_path / "ds"
    shutil.copytree(video_root, root)
    (root / "class_1_120deg" / "broken.mp4").write_bytes(b"junk")
    results = probe_mod.probe_paths([root])
    probe_mod.write_manifest(results, root / "manifest.jsonl")
    # The dataset and its manifest move together: relative paths resolve against the manifest.
    moved = tmp_path / "moved"
    shutil.move(str(root), moved)

    def no_probe(*a, **k):
        raise AssertionError("ManifestDataset must not probe files again")

    monkeypatch.setattr(probe_mod, "probe_file", no_probe)
    monkeypatch.setattr(probe_mod, "probe_paths", no_probe)
    with pytest.warns(DataWarning, match="skipped 1 of 7"):
        ds = build_dataset("manifest", manifest=str(moved / "manifest.jsonl"), policy=POLICY, num_classes=4,
                           length=1, seed=0)
    assert isinstance(ds, ManifestDataset) and ds.skipped == 1 and len(ds) == 6
    assert ds.class_names == ["class_0_000deg", "class_1_120deg", "class_2_240deg"]
    for i in range(len(ds)):
        it = ds[i]
        src = ds.sources[i]
        assert src.path.startswith(str(moved))
        rate = source_rate(src.path)
        t = it["timestamps"].double().numpy()
        assert it["fps"] <= rate + 1e-9
        assert np.all(np.abs(t - np.arange(8) / it["fps"]) <= 0.5 / rate + 1e-4)


def test_manifest_matches_folder_dataset(tmp_path, video_root):
    from eqm.video.probe import probe_paths, write_manifest

    write_manifest(probe_paths([video_root]), tmp_path / "m.jsonl")
    m = ManifestDataset(tmp_path / "m.jsonl", POLICY, seed=2)
    f = VideoFolderDataset(video_root, POLICY, seed=2)
    assert m.class_names == f.class_names and len(m) == len(f)
    for i in range(len(m)):
        assert torch.equal(m[i]["video"], f[i]["video"])
        assert torch.equal(m[i]["timestamps"], f[i]["timestamps"])


def test_missing_manifest_is_a_one_line_error(tmp_path):
    with pytest.raises(EqmError, match="manifest not found"):
        ManifestDataset(tmp_path / "none.jsonl", POLICY)


# ------------------------------------------------------------------------------------------------
# Variable frame rate


def test_vfr_source_keeps_real_pts(tmp_path):
    from eqm.video.io import write_video

    motion = SyntheticMotion(num_classes=1, height=32, width=32, max_duration=1.5)
    # Irregular gaps (20, 50, 100, 33 ms): a "30 fps" mkv whose frames really come at ~20 fps.
    gaps = np.tile([0.020, 0.050, 0.100, 0.033], 8)[:29]
    pts = np.round(np.concatenate([[0.0], np.cumsum(gaps)]), 3)
    frames = motion.render(0, pts, start=motion.random_start(0, 1, duration=float(pts[-1])))
    write_video(tmp_path / "ds" / "moving" / "vfr.mkv", frames, 30, pts=pts)
    ds = VideoFolderDataset(tmp_path / "ds", POLICY, seed=0, clips_per_file=6)
    src = ds.sources[0]
    assert src.vfr and src.rate == pytest.approx(29 / pts[-1], rel=1e-3)
    for i in range(len(ds)):
        it = ds[i]
        assert it["fps"] <= src.rate + 1e-9
        t = it["timestamps"].double().numpy()
        # Every timestamp is one of the file's real (irregular) frame times, relative to the
        # clip's first frame.
        worst = [np.abs(pts[None, :] - (p0 + t)[:, None]).min(axis=1).max() for p0 in pts]
        assert min(worst) < 1.5e-3, t
        assert np.all(np.diff(t) > 0)
        # With the real times the speed is right; pretending the clip is uniform would be wrong.
        est = estimate_velocity(it["video"], t)
        assert relative_speed_error(est, motion.velocity(0)) < 0.03


def test_build_dataset_folder_reports_through_warn_callback(tmp_path, video_root):
    root = tmp_path / "ds"
    shutil.copytree(video_root, root)
    (root / "class_2_240deg" / "zero.mp4").write_bytes(b"")
    messages: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # everything goes to the callback instead
        ds = build_dataset("folder", root=str(root), policy=POLICY, num_classes=4, length=1, seed=0,
                           warn=messages.append)
    assert isinstance(ds, VideoFolderDataset) and ds.skipped == 1 and len(ds) == 6
    assert len(messages) == 1 and "zero.mp4 (empty" in messages[0] and "\n" not in messages[0]
    # The synthetic ground truth of a run is reproducible from its policy alone.
    from eqm.data.clips import synthetic_motion

    long_policy = ClipPolicy(16, 8, 30, 32, 32)  # 1.875 s clips: the default speed shrinks to fit
    ds_syn = build_dataset("synthetic", policy=long_policy, num_classes=4, length=4, seed=0)
    assert synthetic_motion(long_policy, 4).velocity(1) == ds_syn.motion.velocity(1)
    assert ds_syn.motion.speed(0) < 16.0
