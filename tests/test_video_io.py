"""eqm.video.io: exact-rate MP4/MKV/GIF writing and seek-based clip reading, on real files.

Every video here is written to tmp_path by the code under test and read back with PyAV (or
Pillow for GIF delays). Frames carry their own index as 8 black/white stripes (one bit each),
which survives lossy H.264 coding, so a test can tell exactly which frame came back.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from eqm.errors import EqmError
from eqm.video.io import (
    Clip,
    from_uint8,
    read_clip,
    read_video,
    to_uint8,
    write_grid_png,
    write_png_frames,
    write_video,
)

H, W = 32, 64  # 8 stripes of 8 px: wide enough that 4:2:0 chroma and DCT blur cannot flip a bit


def coded_frames(n: int, h: int = H, w: int = W) -> np.ndarray:
    """uint8 (n, h, w, 3): the top half shows the frame index in binary, the bottom a ramp."""
    assert n <= 256
    sw = w // 8
    a = np.zeros((n, h, w, 3), np.uint8)
    a[:, h // 2 :, :, :] = np.linspace(0, 255, w, dtype=np.float32).astype(np.uint8)[None, None, :, None]
    for k in range(n):
        for b in range(8):
            if (k >> b) & 1:
                a[k, : h // 2, b * sw : (b + 1) * sw] = 255
    return a


def frame_index(frame: np.ndarray) -> int:
    h, w = frame.shape[:2]
    sw = w // 8
    bits = [frame[2 : h // 2 - 2, b * sw + 2 : (b + 1) * sw - 2].mean() > 128 for b in range(8)]
    return sum(int(bit) << b for b, bit in enumerate(bits))


def packets(path):
    """(pts seconds, is_keyframe) of every video packet, in file order."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return [(float(p.pts * p.time_base), p.is_keyframe, p.pts, p.dts) for p in c.demux(s) if p.size]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------
# MP4 / MKV writing at exact rates
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [Fraction(24), Fraction(30000, 1001), Fraction(24000, 1001), Fraction(60)])
def test_mp4_round_trip_exact_rate(tmp_path, fps):
    n = 30
    out = tmp_path / "clip.mp4"
    res = write_video(out, coded_frames(n), fps)
    assert res.path == out and res.fps == fps and res.num_frames == n and res.warnings == []
    assert res.duration == pytest.approx(float(n / fps), abs=1e-12)
    assert out.exists() and no_temp_files(tmp_path)

    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert s.average_rate == fps  # exact Fraction, 30000/1001 and not 29.97
        assert s.frames == n
        assert Fraction(s.duration) * s.time_base == Fraction(n) / fps  # exact duration T / fps
        decoded = [(f.time, frame_index(f.to_ndarray(format="rgb24"))) for f in c.decode(s)]
    assert [k for _, k in decoded] == list(range(n))
    for k, (t, _) in enumerate(decoded):
        assert t == pytest.approx(k / float(fps), abs=1e-6)


def test_mkv_ntsc_rate_and_float_spelling(tmp_path):
    out = tmp_path / "clip.mkv"
    # float(30000/1001) must come back as the exact fraction, not 2997002997002997/10^14.
    res = write_video(out, coded_frames(20), float(Fraction(30000, 1001)))
    assert res.fps == Fraction(30000, 1001)
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert s.average_rate == Fraction(30000, 1001)
        assert c.format.name.startswith("matroska")
        assert len(list(c.decode(s))) == 20
    assert read_video(out).fps == Fraction(30000, 1001)


def test_keyframe_interval_default_about_one_second_and_explicit(tmp_path):
    n = 75
    default = tmp_path / "default.mp4"
    write_video(default, coded_frames(n), 24)
    key_frames = [round(t * 24) for t, key, *_ in packets(default) if key]
    assert key_frames[0] == 0
    gaps = np.diff(key_frames + [n])
    assert gaps.max() <= 24, key_frames  # x264's default would be a single keyframe here
    assert len(key_frames) >= math.ceil(n / 24)

    explicit = tmp_path / "k10.mp4"
    write_video(explicit, coded_frames(n), 24, keyint=10)
    key_frames = [round(t * 24) for t, key, *_ in packets(explicit) if key]
    assert np.diff(key_frames + [n]).max() <= 10 and len(key_frames) >= 8


def test_odd_size_is_padded_with_a_warning(tmp_path):
    frames = coded_frames(4, 31, 67)
    res = write_video(tmp_path / "odd.mp4", frames, 12)
    assert any("padded 67x31 frames to 68x32" in w for w in res.warnings)
    back = read_video(tmp_path / "odd.mp4")
    assert back.frames.shape == (4, 32, 68, 3)
    # The padding repeats the last column / row, so the ramp's last value continues.
    assert abs(int(back.frames[0, -1, -1, 0]) - int(back.frames[0, -2, -2, 0])) < 12


def test_float_tensor_input_and_uint8_conversions(tmp_path):
    u = coded_frames(6)
    video = from_uint8(u)
    assert video.shape == (3, 6, H, W) and video.dtype == torch.float32
    assert float(video.min()) == -1.0 and float(video.max()) == 1.0
    assert np.array_equal(to_uint8(video), u)  # exact round trip
    # Rounding and clamping: 0 -> 127.5 rounds to 128; out-of-range values clamp; NaN -> 0.
    t = torch.tensor([0.0, -3.0, 2.0, float("nan"), 1 / 127.5 - 1]).view(1, 5, 1, 1)
    assert to_uint8(t)[:, 0, 0, 0].tolist() == [128, 0, 255, 0, 1]
    assert to_uint8(t).shape == (5, 1, 1, 3)  # one channel repeated to RGB

    res = write_video(tmp_path / "t.mp4", video, 10)
    assert res.num_frames == 6
    back = read_video(tmp_path / "t.mp4")
    assert [frame_index(f) for f in back.frames] == list(range(6))


def test_file_permissions_follow_umask(tmp_path):
    out = tmp_path / "perm.mp4"
    write_video(out, coded_frames(2), 24)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# Variable frame rate
# ---------------------------------------------------------------------------------------------

VFR_PTS = [0.0, 0.1, 0.15, 0.5, 0.52, 0.9, 1.3]


def test_vfr_mp4_keeps_pts(tmp_path):
    out = tmp_path / "vfr.mp4"
    res = write_video(out, coded_frames(len(VFR_PTS)), 30, pts=np.array(VFR_PTS) + 2.0)  # shifted to start at 0
    assert res.duration == pytest.approx(VFR_PTS[-1] + 1 / 30, abs=1e-4)
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        got = [(f.time, frame_index(f.to_ndarray(format="rgb24"))) for f in c.decode(s)]
        assert float(s.duration * s.time_base) == pytest.approx(VFR_PTS[-1] + 1 / 30, abs=1e-4)
    assert [k for _, k in got] == list(range(len(VFR_PTS)))
    assert [t for t, _ in got] == pytest.approx(VFR_PTS, abs=1 / 90000)
    data = read_video(out)
    assert data.pts == pytest.approx(VFR_PTS, abs=1 / 90000)
    clip = read_clip(out, [0.12, 0.13, 0.51, 1.0])
    assert clip.pts == pytest.approx([0.1, 0.15, 0.5, 0.9], abs=1 / 90000)


def test_vfr_mkv_pts_in_milliseconds(tmp_path):
    out = tmp_path / "vfr.mkv"
    write_video(out, coded_frames(len(VFR_PTS)), 30, pts=torch.tensor(VFR_PTS, dtype=torch.float64))
    assert read_video(out).pts == pytest.approx(VFR_PTS, abs=1e-3)
    with pytest.raises(EqmError, match="strictly increasing"):
        write_video(tmp_path / "bad.mkv", coded_frames(3), 30, pts=[0.0, 0.2, 0.1])
    with pytest.raises(EqmError, match="1 ms"):
        write_video(tmp_path / "bad.mkv", coded_frames(3), 30, pts=[0.0, 0.0004, 0.1])
    assert not (tmp_path / "bad.mkv").exists() and no_temp_files(tmp_path)


# ---------------------------------------------------------------------------------------------
# read_clip: seeking, nearest-frame selection, real pts, bounded decoding
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_seconds(tmp_path_factory):
    """90 frames at 30 fps (H.264 with B-frames), a keyframe every 30 frames."""
    path = tmp_path_factory.mktemp("clips") / "three.mp4"
    write_video(path, coded_frames(90), 30, keyint=30)
    return path


def test_file_has_reordered_frames(three_seconds):
    # The default x264 preset uses B-frames: packets arrive out of presentation order, which is
    # what read_clip must cope with.
    pk = packets(three_seconds)
    assert any(p[2] != p[3] for p in pk)
    assert [p[2] for p in pk] != sorted(p[2] for p in pk)


def test_read_clip_returns_nearest_frames_with_real_pts(three_seconds):
    full = read_video(three_seconds)
    assert len(full.frames) == 90 and full.fps == 30 and not full.has_audio
    # Every other frame from 1.5 s (a 15 fps clip), each time slightly off the frame grid.
    want = [45 + 2 * j for j in range(8)]
    times = [k / 30 + (0.3 if j % 2 else -0.3) / 30 for j, k in enumerate(want)]
    stats = {}
    clip = read_clip(three_seconds, times, stats=stats)
    assert isinstance(clip, Clip) and clip.frames.shape == (8, H, W, 3) and clip.frames.dtype == np.uint8
    assert [frame_index(f) for f in clip.frames] == want
    assert clip.pts == pytest.approx([k / 30 for k in want], abs=1e-6)
    # Same decoder, same pixels: the seek path returns exactly what a full decode gives.
    for f, k in zip(clip.frames, want):
        assert np.array_equal(f, full.frames[k])
    # Decoded from the keyframe at 1.0 s (frame 30) up to frame 60, the first one past the last
    # wanted time (59.3 frames), not the whole 90 frames.
    assert stats["seeks"] >= 1
    assert 16 <= stats["decoded_frames"] <= 60 - 30 + 1, stats


def test_read_clip_rounding_order_and_repeats(three_seconds):
    # 0.4 of a frame past frame 10 -> frame 10; 0.6 past -> frame 11; exactly half -> earlier.
    times = [(20 + 0.6) / 30, (10 + 0.4) / 30, (10 + 0.4) / 30, (12 + 0.5) / 30]
    clip = read_clip(three_seconds, times)
    assert [frame_index(f) for f in clip.frames] == [21, 10, 10, 12]
    assert clip.pts == pytest.approx([21 / 30, 10 / 30, 10 / 30, 12 / 30], abs=1e-6)


def test_read_clip_early_frames_decode_little(three_seconds):
    stats = {}
    clip = read_clip(three_seconds, [0.0, 0.1], stats=stats)
    assert [frame_index(f) for f in clip.frames] == [0, 3]
    assert stats["decoded_frames"] <= 4  # stops right after the last wanted time


def test_read_clip_end_tolerance_and_errors(three_seconds):
    last = 89 / 30
    clip = read_clip(three_seconds, [last, last + 0.9 / 30])  # within the last frame's duration
    assert [frame_index(f) for f in clip.frames] == [89, 89]
    with pytest.raises(EqmError, match="beyond the end of .*three.mp4"):
        read_clip(three_seconds, [2.0, last + 3 / 30])
    with pytest.raises(EqmError, match="before the first frame of .*three.mp4"):
        read_clip(three_seconds, [-1.0, 0.5])
    with pytest.raises(EqmError, match="three.mp4"):
        read_clip(three_seconds, [])
    with pytest.raises(EqmError, match="finite"):
        read_clip(three_seconds, [float("nan")])


def test_read_clip_matches_full_decode_at_every_keyframe_boundary(three_seconds):
    # Times just before, at and after the keyframes at 1 s and 2 s: the frame just before a
    # keyframe belongs to the previous group of pictures and must still be found.
    full = read_video(three_seconds)
    for k in (29, 30, 31, 59, 60, 61):
        for off in (-0.45, 0.0, 0.45):
            clip = read_clip(three_seconds, [(k + off) / 30])
            assert np.array_equal(clip.frames[0], full.frames[k]), (k, off)


# ---------------------------------------------------------------------------------------------
# GIF
# ---------------------------------------------------------------------------------------------


def gif_delays_cs(path) -> list[int]:
    """Per-frame delays as stored, read with Pillow (milliseconds, always multiples of 10)."""
    out = []
    with Image.open(path) as im:
        for i in range(im.n_frames):
            im.seek(i)
            out.append(im.info["duration"])
    assert all(d % 10 == 0 for d in out)
    return [d // 10 for d in out]


@pytest.mark.parametrize("fps,n", [(24, 16), (30, 10), (Fraction(30000, 1001), 37)])
def test_gif_total_duration_exact(tmp_path, fps, n):
    out = tmp_path / "anim.gif"
    res = write_video(out, coded_frames(n), fps)
    exact = Fraction(n) / Fraction(fps)
    assert res.warnings == [] and res.num_frames == n
    delays = gif_delays_cs(out)
    assert len(delays) == n
    assert abs(Fraction(sum(delays), 100) - exact) <= Fraction(1, 200)  # total within 0.5 cs
    assert res.duration == pytest.approx(sum(delays) / 100)
    # Start times never drift: frame k starts within 0.5 cs of k / fps.
    starts = np.cumsum([0] + delays[:-1])
    for k, s in enumerate(starts):
        assert abs(Fraction(int(s), 100) - Fraction(k) / Fraction(fps)) <= Fraction(1, 200)
    # PyAV reads the same timing, and the frames in order.
    with av.open(str(out)) as c:
        st = c.streams.video[0]
        fr = list(c.decode(st))
        assert [frame_index(f.to_ndarray(format="rgb24")) for f in fr] == list(range(n))
        assert int(fr[-1].pts) + int(fr[-1].duration) == sum(delays)


def test_gif_warns_above_50_fps(tmp_path):
    res = write_video(tmp_path / "fast.gif", coded_frames(30), 60)
    assert len(res.warnings) == 1 and "10/100 s" in res.warnings[0] and "60 fps" in res.warnings[0]
    delays = gif_delays_cs(tmp_path / "fast.gif")
    assert sum(delays) == 50 and set(delays) == {1, 2}  # 0.5 s exactly, 1-2 cs per frame
    assert write_video(tmp_path / "fifty.gif", coded_frames(10), 50).warnings == []


def test_gif_drops_zero_delay_frames_at_very_high_rates(tmp_path):
    res = write_video(tmp_path / "x.gif", coded_frames(20), 200)
    assert res.num_frames == 10 and res.duration == pytest.approx(0.1)
    assert any("dropped" in w for w in res.warnings)
    assert sum(gif_delays_cs(tmp_path / "x.gif")) == 10


# ---------------------------------------------------------------------------------------------
# Atomicity and errors
# ---------------------------------------------------------------------------------------------


def test_failed_encode_leaves_target_untouched_and_no_temp(tmp_path):
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"previous contents")
    # An unknown x264 preset makes the encoder fail to open after the temp file exists.
    with pytest.raises(EqmError, match="keep.mp4"):
        write_video(out, coded_frames(5), 24, preset="no-such-preset")
    assert out.read_bytes() == b"previous contents"
    assert no_temp_files(tmp_path)
    fresh = tmp_path / "fresh.mp4"
    with pytest.raises(EqmError):
        write_video(fresh, coded_frames(5), 24, preset="no-such-preset")
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]


@pytest.mark.parametrize(
    "name,frames,fps,match",
    [
        ("a.mp4", np.zeros((0, 8, 8, 3), np.uint8), 24, "no frames"),
        ("a.mp4", np.zeros((8, 8, 3, 3, 3), np.uint8), 24, r"\(T, H, W, 3\)"),
        ("a.mp4", np.zeros((2, 8, 8, 3), np.int32), 24, "uint8"),
        ("a.gif", torch.zeros(2, 3, 8, 8), 24, r"\(C, T, H, W\)"),
        ("a.mp4", np.zeros((2, 8, 8, 3), np.uint8), "abc", "fps"),
        ("a.mp4", np.zeros((2, 8, 8, 3), np.uint8), 0, "positive"),
        ("a.avi", np.zeros((2, 8, 8, 3), np.uint8), 24, "unknown video format"),
        ("a", np.zeros((2, 8, 8, 3), np.uint8), 24, "unknown video format"),
    ],
)
def test_write_validation_errors_name_the_file(tmp_path, name, frames, fps, match):
    with pytest.raises(EqmError, match=match) as e:
        write_video(tmp_path / name, frames, fps)
    assert name in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_unknown_codec(tmp_path):
    with pytest.raises(EqmError, match="encoder 'nope'"):
        write_video(tmp_path / "a.mkv", coded_frames(2), 24, codec="nope")
    assert list(tmp_path.iterdir()) == []


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(EqmError, match="not found: .*missing.mp4"):
        read_clip(tmp_path / "missing.mp4", [0.0])
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(EqmError, match="cannot read video .*notes.mp4"):
        read_clip(text, [0.0])
    with pytest.raises(EqmError, match="notes.mp4"):
        read_video(text)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(EqmError, match="empty"):
        read_video(empty)
    with pytest.raises(EqmError, match="folder"):
        read_video(tmp_path)
    still = write_png_frames(tmp_path / "png", coded_frames(1))[0]
    with pytest.raises(EqmError, match="still image"):
        read_clip(still, [0.0])


def test_read_video_max_frames(three_seconds):
    data = read_video(three_seconds, max_frames=7)
    assert data.frames.shape[0] == 7 and data.pts == pytest.approx(np.arange(7) / 30)
    with pytest.raises(EqmError, match="max_frames"):
        read_video(three_seconds, max_frames=0)


# ---------------------------------------------------------------------------------------------
# PNG frames and grid
# ---------------------------------------------------------------------------------------------


def test_png_frames_and_grid(tmp_path):
    clips = torch.rand(2, 3, 4, 8, 6) * 2 - 1  # (B, C, T, H, W)
    paths = write_png_frames(tmp_path / "frames", to_uint8(clips[0]))
    assert [p.name for p in paths] == [f"frame_{k:05d}.png" for k in range(4)]
    for k, p in enumerate(paths):
        assert np.array_equal(np.asarray(Image.open(p).convert("RGB")), to_uint8(clips[0])[k])

    grid = write_grid_png(tmp_path / "grid.png", clips, pad=2)
    img = np.asarray(Image.open(grid).convert("RGB"))
    assert img.shape == (2 + 2 * (8 + 2), 2 + 4 * (6 + 2), 3)
    for b in range(2):
        u = to_uint8(clips[b])
        for t in range(4):
            y, x = 2 + b * 10, 2 + t * 8
            assert np.array_equal(img[y : y + 8, x : x + 6], u[t])
    assert (img[0] == 255).all()  # padding row

    # A list of clips of different lengths; max_columns subsamples evenly.
    ragged = write_grid_png(tmp_path / "ragged.png", [coded_frames(9), coded_frames(3)], max_columns=5, pad=0)
    img = np.asarray(Image.open(ragged).convert("RGB"))
    assert img.shape == (2 * H, 5 * W, 3)
    assert [frame_index(img[:H, j * W : (j + 1) * W]) for j in range(5)] == [0, 2, 4, 6, 8]
    assert (img[H:, 3 * W :] == 255).all()  # the short row is blank after its 3 frames
    with pytest.raises(EqmError, match="grid.jpg"):
        write_grid_png(tmp_path / "grid.jpg", clips)
    assert no_temp_files(tmp_path)


# ---------------------------------------------------------------------------------------------
# read_clip on containers this module does not write (user files)
# ---------------------------------------------------------------------------------------------


def write_with_pyav(path, fmt, n=60, fps=30, gop=20):
    """H.264 with B-frames in another container, written directly with PyAV."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"preset": "medium", "sc_threshold": "0"}
        s.codec_context.gop_size = gop
        for k, a in enumerate(coded_frames(n)):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts, f.time_base = k, Fraction(1, fps)
            for pkt in s.encode(f):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


@pytest.mark.parametrize("name,fmt", [("v.avi", "avi"), ("v.flv", "flv"), ("v.ts", "mpegts")])
def test_read_clip_other_containers_match_full_decode(tmp_path, name, fmt):
    # AVI and FLV index keyframes by decode time, so with B-frames a seek can land after the
    # wanted time; MPEG-TS cannot seek back to its first keyframe. read_clip must notice, seek
    # again (or start over) and still return exactly the frames a full decode gives.
    path = tmp_path / name
    write_with_pyav(path, fmt)
    full = read_video(path)
    with av.open(str(path)) as c:
        origin = next(c.decode(video=0)).time  # absolute time of the first frame
    extra_seeks = 0
    n = len(full.frames)
    for k in sorted({0, 1, 18, 19, 20, 21, 39, 40, 41, n - 1}):
        for off in (-0.45, 0.0, 0.45):
            stats = {}
            clip = read_clip(path, [origin + full.pts[k] + off / 30], stats=stats)
            assert np.array_equal(clip.frames[0], full.frames[k]), (k, off)
            assert clip.pts[0] == pytest.approx(origin + full.pts[k], abs=1e-6)
            extra_seeks += max(0, stats["seeks"] - 1)
            assert stats["decoded_frames"] <= 2 * 20 + 4  # never the whole file
    if fmt in ("avi", "flv"):
        assert extra_seeks > 0  # the re-seek path was exercised, not just the happy path
