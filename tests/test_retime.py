"""`eqmctl retime`: resample / speed / model modes on real files written and read back with PyAV."""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eqm import checkpoint as C
from eqm.errors import EqmError, ParamError
from eqm.config import EqMConfig, SamplerSettings
from eqm.timebase import frames_for_duration
from eqm.model import EqMTransformer
from eqm.retime import (
    interpolate_frames,
    model_slots,
    plan_windows,
    resample_frames,
    resample_indices,
    retime_checkpoint,
    retime_video,
    video_duration,
)
from eqm.video.io import write_video
from eqmctl.cli import app

SIZE = 16  # frame side in pixels: tiny keeps encode/decode fast


def levels(n, step=8, base=4):
    """n flat frames whose grey level encodes the frame index (base + step * i): after H.264
    the index is still readable from the mean, so tests can tell which input frame was used."""
    v = (base + step * np.arange(n)).astype(np.uint8)
    return np.broadcast_to(v[:, None, None, None], (n, SIZE, SIZE, 3)).copy()


def index_of(frames, step=8, base=4):
    return np.rint((frames.reshape(len(frames), -1).mean(1) - base) / step).astype(int)


def smooth_frames(n, seed=0):
    """n smooth colour gradients (H.264 at crf 0 keeps them within a few levels, unlike noise)."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(30, 220, 3)
        dx, dy = rng.uniform(-25, 25, 2)
        for ch, base in enumerate((a, b, c)):
            out[i, :, :, ch] = np.clip(base + dx * xx + dy * yy, 0, 255).astype(np.uint8)
    return out


def read_back(path):
    """(rate, time_base, pts seconds, frames uint8, has audio, duration seconds) of a written file."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        rate = Fraction(s.average_rate.numerator, s.average_rate.denominator)
        tb = s.time_base
        dur = float(s.duration * tb) if s.duration else None
        frames, pts = [], []
        for f in c.decode(video=0):
            pts.append(float(f.pts * f.time_base))
            frames.append(f.to_ndarray(format="rgb24"))
        has_audio = len(c.streams.audio) > 0
    pts = np.asarray(pts) - pts[0]
    return rate, pts, np.stack(frames), has_audio, dur


def run(args):
    r = CliRunner().invoke(app, ["retime", *map(str, args)])
    return r.exit_code, r.stdout, r.stderr


# ------------------------------------------------------------------------------ pure functions


def test_resample_indices_nearest_ties_and_blend():
    pts = np.array([0.0, 0.1, 0.2])
    times = np.array([0.0, 0.04, 0.05, 0.06, 0.1 - 1e-9, 0.25])
    i0, i1, w = resample_indices(pts, times)
    assert list(i0) == [0, 0, 0, 1, 1, 2] and np.array_equal(i0, i1) and not w.any()  # tie -> earlier frame
    j0, j1, w = resample_indices(pts, times, blend=True)
    assert list(j0) == [0, 0, 0, 0, 1, 2] and list(j1) == [1, 1, 1, 1, 2, 2]
    assert np.allclose(w, [0, 0.4, 0.5, 0.6, 0, 0])  # within 1 us of a pts counts as on it; past the end holds


def test_resample_frames_counts_times_and_blend_values():
    f = levels(2, step=100)  # grey 4 and 104
    out, t = resample_frames(f, [0.0, 0.1], 20, duration=0.2)
    assert len(out) == 4 and np.allclose(t, np.arange(4) / 20)
    assert list(out[:, 0, 0, 0]) == [4, 4, 104, 104]
    out, _ = resample_frames(f, [0.0, 0.1], 20, duration=0.2, blend=True)
    assert list(out[:, 0, 0, 0]) == [4, 54, 104, 104]  # t = 0.05 is halfway: a new, intermediate value
    assert frames_for_duration(Fraction(24, 24), Fraction(30000, 1001)) == 30
    assert frames_for_duration(Fraction(30, 30), 12) == 12


def test_video_duration_cfr_exact_and_vfr_tail():
    d, vfr = video_duration(np.arange(30) / 30, Fraction(30))
    assert d == Fraction(1) and not vfr
    d, vfr = video_duration([0, 0.1, 0.15, 0.4, 0.45, 0.7], Fraction(15, 2), last_duration=0.1)
    assert vfr and d == pytest.approx(0.8)
    d, vfr = video_duration([0, 0.1, 0.15, 0.4, 0.45, 0.7], None)
    assert d == pytest.approx(0.95)  # no rate, no packet duration: the last gap


def test_model_slots_multiple_required_for_cfr_snapped_for_vfr():
    slots, notes = model_slots(np.arange(15) / 15, 60, vfr=False, fps_in=15)
    assert list(slots) == list(range(0, 60, 4)) and notes == []
    with pytest.raises(EqmError, match="whole multiple.*48 or 72.*resample"):
        model_slots(np.arange(24) / 24, 60, vfr=False, fps_in=24)
    with pytest.raises(EqmError, match="same output frame.*resample"):
        model_slots(np.arange(30) / 30, 12, vfr=False, fps_in=30)
    slots, notes = model_slots([0, 0.1, 0.15, 0.41], 20, vfr=True)
    assert list(slots) == [0, 2, 3, 8] and "largest shift" in notes[0]


def test_plan_windows_anchor_on_originals_and_chain_the_tail():
    wins = plan_windows(np.arange(0, 60, 4), 60, 16)
    assert [(w.start, w.stop) for w in wins] == [(0, 12), (12, 24), (24, 36), (36, 48), (48, 60)]
    assert not any(w.chained for w in wins)
    # every generated slot is covered exactly once
    covered = sorted(k for w in wins for k in range(w.start, w.stop) if k % 4)
    assert covered == [k for k in range(60) if k % 4]
    # long tail after the last original (a VFR file whose last frame lasts long): chained windows
    wins = plan_windows([0, 2, 3], 20, 4)
    assert [(w.start, w.stop, w.chained) for w in wins] == [(0, 3, False), (3, 7, False), (5, 9, True),
                                                             (7, 11, True), (9, 13, True), (11, 15, True),
                                                             (13, 17, True), (15, 19, True), (17, 20, True)]
    with pytest.raises(EqmError, match="^window 4 is too short"):
        plan_windows([0, 4, 8], 12, 4)


# ------------------------------------------------------------------------------ files: resample / speed


def test_resample_30_to_12_same_duration(tmp_path):
    src = tmp_path / "in.mp4"
    write_video(src, levels(30), 30, crf=0)
    code, out, err = run([src, "--fps", 12, "--out", tmp_path / "out.mp4"])
    assert code == 0, err
    assert "12" in out and "1.000 s" in out
    rate, pts, frames, _, dur = read_back(tmp_path / "out.mp4")
    assert rate == 12 and len(frames) == 12
    assert np.allclose(pts, np.arange(12) / 12, atol=1e-6)
    assert dur == pytest.approx(1.0)
    idx = index_of(frames)
    # even k: t = k/12 is exactly input frame 2.5k (odd k are ties between two frames)
    assert list(idx[::2]) == [round(2.5 * k) for k in range(0, 12, 2)]
    assert np.all(np.diff(idx) >= 2)


def test_resample_24_to_60_picks_nearest_frame(tmp_path):
    src = tmp_path / "in.mkv"
    write_video(src, levels(24), 24, crf=0)
    res = retime_video(src, tmp_path / "out.mp4", 60)
    assert (res.frames_in, res.frames_out) == (24, 60)
    assert res.duration_in == pytest.approx(1.0) and res.duration_out == pytest.approx(1.0)
    rate, pts, frames, _, _ = read_back(res.path)
    assert rate == 60 and len(frames) == 60
    assert np.allclose(pts, np.arange(60) / 60, atol=1e-6)
    assert list(index_of(frames)) == [min(23, int(np.floor(0.4 * k + 0.5))) for k in range(60)]  # no ties; the end holds


def test_resample_blend_makes_intermediate_frames(tmp_path):
    src = tmp_path / "in.mp4"
    write_video(src, levels(12, step=16), 12, crf=0)
    code, _, err = run([src, "--fps", 24, "--blend", "--out", tmp_path / "out.mp4"])
    assert code == 0, err
    _, pts, frames, _, _ = read_back(tmp_path / "out.mp4")
    assert len(frames) == 24
    means = frames.reshape(24, -1).mean(1)
    # odd output frames sit halfway between two inputs: their level is the average (base + 16 i + 8)
    assert np.allclose(means[1:22:2], 4 + 16 * np.arange(11) + 8, atol=2)
    assert np.allclose(means[0::2], 4 + 16 * np.arange(12), atol=2)


def test_speed_24_to_48_same_frames_half_duration(tmp_path):
    src = tmp_path / "in.mp4"
    write_video(src, levels(24), 24, crf=0)
    res = retime_video(src, tmp_path / "fast.mp4", 48, "speed")
    assert res.frames_out == 24 and res.duration_out == pytest.approx(0.5) and res.duration_in == pytest.approx(1.0)
    rate, pts, frames, _, dur = read_back(res.path)
    assert rate == 48 and len(frames) == 24 and dur == pytest.approx(0.5)
    assert np.allclose(pts, np.arange(24) / 48, atol=1e-6)
    assert list(index_of(frames)) == list(range(24))


def test_ntsc_output_rate_is_exact(tmp_path):
    src = tmp_path / "in.mp4"
    write_video(src, levels(30), 30, crf=0)
    code, out, err = run([src, "--fps", "29.97", "--out", tmp_path / "ntsc.mp4"])
    assert code == 0, err
    rate, pts, frames, _, _ = read_back(tmp_path / "ntsc.mp4")
    assert rate == Fraction(30000, 1001)
    assert len(frames) == 30  # round(1 s * 29.97)
    assert np.allclose(pts, np.arange(30) * 1001 / 30000, atol=1e-6)


def test_vfr_input_is_resampled_by_its_real_timestamps(tmp_path):
    src = tmp_path / "vfr.mp4"
    pts_in = np.array([0.0, 0.1, 0.15, 0.4, 0.45, 0.7])
    write_video(src, levels(6, step=40), 10, pts=pts_in, crf=0)  # last frame lasts 1/10 s: 0.8 s in all
    res = retime_video(src, tmp_path / "out.mp4", 20)
    assert res.vfr_in and res.duration_in == pytest.approx(0.8, abs=1e-3)
    assert res.frames_out == 16
    _, pts, frames, _, _ = read_back(res.path)
    assert np.allclose(pts, np.arange(16) / 20, atol=1e-6)
    expected, _, _ = resample_indices(pts_in, np.arange(16) / 20)
    assert list(index_of(frames, step=40)) == list(expected)
    assert list(expected[:8]) == [0, 0, 1, 2, 2, 2, 3, 3]  # real times, not one-frame-per-slot
    # speed mode on VFR input says it flattens the timing
    res = retime_video(src, tmp_path / "speed.mp4", 12, "speed")
    assert res.frames_out == 6 and res.duration_out == pytest.approx(0.5)
    assert any("variable-rate" in n for n in res.notices)


def _write_with_audio(path, frames, fps):
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = SIZE, SIZE, "yuv420p"
        aus = c.add_stream("aac", rate=44100)
        aus.layout = "mono"
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        n = int(44100 * len(frames) / fps)
        for k in range(0, n, 1024):
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            af.sample_rate, af.pts = 44100, k
            for p in aus.encode(af):
                c.mux(p)
        for p in aus.encode():
            c.mux(p)


def test_audio_is_dropped_with_a_notice(tmp_path):
    src = tmp_path / "talk.mp4"
    _write_with_audio(src, levels(12), 12)
    with av.open(str(src)) as c:
        assert len(c.streams.audio) == 1
    code, _, err = run([src, "--fps", 24, "--out", tmp_path / "out.mp4"])
    assert code == 0, err
    assert "audio" in err and "dropped" in err
    _, _, frames, has_audio, _ = read_back(tmp_path / "out.mp4")
    assert not has_audio and len(frames) == 24


def test_default_output_name_and_gif(tmp_path):
    src = tmp_path / "clip.mp4"
    write_video(src, levels(6), 6)
    code, _, err = run([src, "--fps", 12])
    assert code == 0, err
    assert (tmp_path / "clip_resample_12fps.mp4").is_file()
    res = retime_video(src, tmp_path / "clip.gif", 12)
    assert res.frames_out == 12 and res.duration_out == pytest.approx(1.0)


# ------------------------------------------------------------------------------ model mode

ARCH = dict(input_size=8, num_frames=4, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=3,
            class_dropout_prob=0.1)


def make_model(seed=0):
    """Tiny model with perturbed (non-zero) weights: adaLN-Zero starts at zero output, which would
    leave every in-between at its noise and prove nothing about the model being used."""
    torch.manual_seed(seed)
    m = EqMTransformer(EqMConfig(**ARCH))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    m = make_model()
    run_dir = tmp_path_factory.mktemp("run")
    return C.save_checkpoint(run_dir, 10, model=m, ema=m, config=m.config, recipe={"name": "t"})


def test_model_mode_keeps_originals_bit_identical(ckpt):
    model, _ = C.load_model(ckpt)
    frames = smooth_frames(6)  # 16x16 frames, model size 8x8: resized in, generated frames resized back
    res = interpolate_frames(model, frames, np.arange(6) / 6, 12, seed=1, settings=SamplerSettings(steps=5))
    assert res.frames.shape == (12, SIZE, SIZE, 3)
    assert np.allclose(res.times, np.arange(12) / 12)
    assert list(res.source) == [0, -1, 1, -1, 2, -1, 3, -1, 4, -1, 5, -1]
    assert np.array_equal(res.frames[0::2], frames)  # the originals, untouched
    gen = res.frames[1::2].astype(int)
    for k in range(6):  # in-betweens are new frames, not copies of a neighbour
        assert np.abs(gen[k] - frames[k]).mean() > 2
        if k < 5:
            assert np.abs(gen[k] - frames[k + 1]).mean() > 2
    assert res.generated == 6 and len(res.evals) == len(res.windows) == 5 and all(e == 5 for e in res.evals)
    # same seed -> same result, whatever the batch size (noise is per window)
    again = interpolate_frames(model, frames, np.arange(6) / 6, 12, seed=1, batch_size=2, settings=SamplerSettings(steps=5))
    assert np.array_equal(again.frames, res.frames)


def test_model_mode_vfr_gaps_long_tail_and_nothing_to_do(ckpt):
    model, _ = C.load_model(ckpt)
    frames = smooth_frames(4, seed=3)
    # VFR: slots 0, 2, 3, 8 at 20 fps; the 5-slot gap does not fit the 4-frame clip -> widened window
    res = interpolate_frames(model, frames, [0.0, 0.1, 0.15, 0.4], 20, duration=0.5, vfr=True, settings=SamplerSettings(steps=2))
    assert list(np.nonzero(res.known)[0]) == [0, 2, 3, 8] and len(res.frames) == 10
    assert np.array_equal(res.frames[[0, 2, 3, 8]], frames)
    assert any("widened to 6 frames" in n for n in res.notices)
    # a last frame that lasts a second: the tail is extrapolated by chained windows
    res = interpolate_frames(model, frames[:2], [0.0, 0.1], 20, duration=1.0, settings=SamplerSettings(steps=2))
    assert len(res.frames) == 20 and res.generated == 18 and any(w.chained for w in res.windows)
    assert np.array_equal(res.frames[[0, 2]], frames[:2])
    assert len({res.frames[k].tobytes() for k in range(20)}) == 20  # every slot got its own frame
    # same rate: nothing to generate, no model call
    res = interpolate_frames(model, frames, np.arange(4) / 8, 8, settings=SamplerSettings(steps=2))
    assert res.generated == 0 and res.windows == [] and np.array_equal(res.frames, frames)


def test_model_mode_cli_writes_exact_rate_with_originals(tmp_path, ckpt):
    src = tmp_path / "in.mkv"
    frames = smooth_frames(6)
    write_video(src, frames, 6, crf=0)
    out = tmp_path / "out.mkv"
    code, stdout, err = run([src, "--fps", 12, "--mode", "model", "--ckpt", ckpt, "--out", out, "--steps", 5,
                             "--crf", 0, "--device", "cpu"])
    assert code == 0, err
    assert "6 original frames kept, 6 generated" in stdout
    rate, pts, got, _, _ = read_back(out)
    assert rate == 12 and len(got) == 12
    assert np.allclose(pts, np.arange(12) / 12, atol=2e-3)  # matroska stores milliseconds
    src_frames = read_back(src)[2]  # the input as a player decodes it
    err_orig = np.abs(got[0::2].astype(int) - src_frames.astype(int)).max()
    assert err_orig <= 6  # two crf-0 yuv420p encodes of smooth gradients
    assert np.abs(got[1::2].astype(int) - src_frames.astype(int)).mean() > 2


def test_retime_checkpoint_is_what_the_cli_does(tmp_path, ckpt):
    """The library call (a label given by index here) writes the same frames as `eqmctl retime
    --mode model` with the same options, and names the checkpoint it used."""
    src = tmp_path / "in.mkv"
    write_video(src, smooth_frames(6), 6, crf=0)
    cli_out, lib_out = tmp_path / "cli.mkv", tmp_path / "lib.mkv"
    code, _, err = run([src, "--fps", 12, "--mode", "model", "--ckpt", ckpt, "--out", cli_out, "--steps", 3,
                        "--label", 2, "--seed", 4, "--crf", 0, "--device", "cpu"])
    assert code == 0, err
    got = retime_checkpoint(src, lib_out, 12, ckpt, label=2, seed=4, settings=SamplerSettings(steps=3), crf=0, device="cpu")
    assert got.checkpoint == Path(ckpt) and got.result.generated == 6 and got.notes == []
    assert np.array_equal(read_back(lib_out)[2], read_back(cli_out)[2])
    with pytest.raises(ParamError, match="label"):
        retime_checkpoint(src, tmp_path / "bad.mkv", 12, ckpt, label=7, device="cpu")
    assert not (tmp_path / "bad.mkv").exists()


def test_model_mode_needs_a_multiple_of_the_input_rate(tmp_path, ckpt):
    src = tmp_path / "in.mp4"
    write_video(src, levels(8), 8)
    code, _, err = run([src, "--fps", 12, "--mode", "model", "--ckpt", ckpt, "--out", tmp_path / "o.mp4"])
    assert code == 2 and "whole multiple" in err and "resample" in err
    assert not (tmp_path / "o.mp4").exists()


# ------------------------------------------------------------------------------ errors


def _not_a_video(tmp_path):
    p = tmp_path / "notes.mp4"
    p.write_text("this is not a video\n")
    return p


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("missing", lambda d, v: [d / "nope.mp4", "--fps", 12, "--out", d / "o.mp4"], "not found"),
        ("not a video", lambda d, v: [_not_a_video(d), "--fps", 12, "--out", d / "o.mp4"], "cannot read video"),
        ("fps 0", lambda d, v: [v, "--fps", 0, "--out", d / "o.mp4"], "--fps must be positive"),
        ("model without ckpt", lambda d, v: [v, "--fps", 12, "--mode", "model", "--out", d / "o.mp4"], "--ckpt"),
        ("out is input", lambda d, v: [v, "--fps", 12, "--out", v], "is the input file"),
        ("bad suffix", lambda d, v: [v, "--fps", 12, "--out", d / "o.avi"], "unknown video format"),
        ("bad mode", lambda d, v: [v, "--fps", 12, "--mode", "warp", "--out", d / "o.mp4"], "--mode must be one of"),
    ],
)
def test_errors_are_one_line_and_write_nothing(tmp_path, case, args, message):
    video = tmp_path / "in.mp4"
    write_video(video, levels(6), 6)
    before = video.read_bytes()
    files_before = set(tmp_path.iterdir())
    code, _, err = run(args(tmp_path, video))
    assert code == 2, (case, err)
    assert message in err, (case, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    new = set(tmp_path.iterdir()) - files_before
    assert all(p.name == "notes.mp4" for p in new), new  # no output, no temporary file left
    assert video.read_bytes() == before
