"""probe-fps: real videos written with PyAV in a temporary folder, probed without decoding.

Covers several codecs and containers (H.264 mp4, MPEG-4 avi / mkv, VP9 or VP8 webm, GIF), NTSC
rates, 60 fps, a variable-frame-rate mkv whose header lies, audio, audio-only, and broken files
(truncated mp4 with and without an index, truncated mkv, empty, text renamed .mp4, dangling
symlink), then the manifest round trip and the CLI (table, --json, --manifest, exit codes).
"""

import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from eqm.errors import EqmError
from eqm.video.probe import (
    STATUSES,
    ProbeResult,
    collect_videos,
    probe_file,
    probe_paths,
    read_manifest,
    summarize,
    write_manifest,
)
from eqmctl.cli import app

VFR_PTS_MS = [0, 40, 80, 200, 240, 280, 400, 440, 480, 600, 640, 680, 800, 1000]  # 14 frames in 1 s


def _has_encoder(name):
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


WEBM_CODEC = "libvpx-vp9" if _has_encoder("libvpx-vp9") else "libvpx" if _has_encoder("libvpx") else None


def write_video(path, codec, rate, n, *, pts_ms=None, audio=False, noise=False, pix_fmt="yuv420p", container_options=None, gop=None):
    """Write n frames of 32x32 video; pts_ms gives irregular presentation times in milliseconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options=container_options or {}) as c:
        s = c.add_stream(codec, rate=rate)
        s.width = s.height = 32
        s.pix_fmt = pix_fmt
        if codec == "libx264":
            s.options = {"preset": "ultrafast", "sc_threshold": "0"}  # keyframes only every `gop`
        if gop is not None:
            s.codec_context.gop_size = gop
        if pts_ms is not None:
            # Both the stream and the encoder need the millisecond time base, otherwise PyAV
            # rescales the pts to 1/rate and snaps the irregular times onto the nominal grid.
            s.time_base = Fraction(1, 1000)
            s.codec_context.time_base = Fraction(1, 1000)
        a = c.add_stream("aac", rate=8000) if audio else None
        for i in range(n):
            img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) if noise else np.full((32, 32, 3), (i * 17) % 255, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts_ms is not None:
                frame.pts = pts_ms[i]
                frame.time_base = Fraction(1, 1000)
            for pkt in s.encode(frame):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
        if a is not None:
            write_audio_frames(c, a, 4)


def write_audio_frames(c, a, count):
    for k in range(count):
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        af.sample_rate = 8000
        af.pts = k * 1024
        for pkt in a.encode(af):
            c.mux(pkt)
    for pkt in a.encode():
        c.mux(pkt)


def write_audio_only(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as c:
        write_audio_frames(c, c.add_stream("aac", rate=8000), 8)


def truncate(src, dst, fraction=0.5):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A small collection: good videos under good/<label>/, broken ones under bad/."""
    root = tmp_path_factory.mktemp("videos")
    good, bad = root / "good", root / "bad"
    write_video(good / "alpha" / "ntsc24.mp4", "libx264", Fraction(24000, 1001), 12)
    write_video(good / "alpha" / "ntsc30.mp4", "libx264", Fraction(30000, 1001), 12)
    write_video(good / "alpha" / "sixty.mp4", "libx264", 60, 30, gop=10)
    write_video(good / "beta" / "mpeg4.avi", "mpeg4", 25, 10)
    write_video(good / "beta" / "mpeg4.mkv", "mpeg4", 25, 10)
    write_video(good / "beta" / "vfr.mkv", "libx264", 30, len(VFR_PTS_MS), pts_ms=VFR_PTS_MS)
    write_video(good / "gamma" / "talk.mp4", "libx264", 30, 12, audio=True)
    write_video(good / "gamma" / "anim.gif", "gif", 10, 8, pix_fmt="rgb8")
    if WEBM_CODEC:
        write_video(good / "gamma" / "web.webm", WEBM_CODEC, 30, 12)
    (good / "gamma" / "notes.txt").write_text("not a video, and not picked up when walking\n")
    (good / "gamma" / "._ntsc24.mp4").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # hidden: skipped

    # header (mkv default duration) says 30 fps, the packets are regular at 12 fps
    write_video(root / "odd" / "lying.mkv", "libx264", 30, 12, pts_ms=[round(k * 1000 / 12) for k in range(12)])

    write_audio_only(bad / "voice.mp4")
    write_video(root / "src" / "long.mp4", "libx264", 30, 60, noise=True)  # moov atom at the end
    truncate(root / "src" / "long.mp4", bad / "cut.mp4")
    write_video(root / "src" / "fast.mp4", "libx264", 30, 60, noise=True, container_options={"movflags": "faststart"})
    truncate(root / "src" / "fast.mp4", bad / "cut_faststart.mp4")
    write_video(root / "src" / "long.mkv", "libx264", 30, 60, noise=True)
    truncate(root / "src" / "long.mkv", bad / "cut.mkv")
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "text.mp4").write_text("hello, I am a text file with a video extension\n" * 20)
    os.symlink(bad / "gone.mp4", bad / "dangling.mp4")
    return root


def by_name(results):
    return {Path(r.path).name: r for r in results}


# ------------------------------------------------------------------------------------------------
# probe_file: every field


def test_h264_mp4_ntsc_24_every_field(media):
    p = media / "good" / "alpha" / "ntsc24.mp4"
    r = probe_file(p)
    assert r.status == "ok" and r.reason == ""
    assert r.path == str(p) and r.label == "alpha"
    assert (r.container, r.codec, r.width, r.height) == ("mp4", "h264", 32, 32)
    assert r.fps == "24000/1001" and r.fps_fraction == Fraction(24000, 1001)
    assert r.fps_float == pytest.approx(23.976023976)
    assert r.fps_source == "stream.average_rate"
    assert (r.frames, r.frames_source) == (12, "header")
    assert r.duration == pytest.approx(12 * 1001 / 24000, abs=1e-6)
    assert r.vfr is False and r.measured_fps == pytest.approx(24000 / 1001, rel=1e-5)
    assert r.has_audio is False
    assert r.time_base == "1/24000" and r.start == 0.0 and r.size == p.stat().st_size
    assert r.pts == pytest.approx([k * 1001 / 24000 for k in range(12)], abs=1e-6)
    assert r.keyframes[0] == 0.0 and set(r.keyframes) <= set(r.pts)


def test_ntsc_30_and_60(media):
    r30 = probe_file(media / "good" / "alpha" / "ntsc30.mp4")
    assert r30.ok and r30.fps == "30000/1001" and r30.fps_float == pytest.approx(29.97003, abs=1e-5)
    assert r30.duration == pytest.approx(12 * 1001 / 30000, abs=1e-6)
    r60 = probe_file(media / "good" / "alpha" / "sixty.mp4")
    assert r60.ok and r60.fps == "60" and r60.fps_float == 60.0 and r60.frames == 30
    assert r60.pts == pytest.approx([k / 60 for k in range(30)], abs=1e-6)
    assert r60.measured_fps == pytest.approx(60.0, rel=1e-6) and not r60.vfr
    assert r60.keyframes == pytest.approx([0.0, 10 / 60, 20 / 60], abs=1e-6)  # gop 10: seek points


def test_mpeg4_avi_header_counts_frames(media):
    r = probe_file(media / "good" / "beta" / "mpeg4.avi")
    assert r.ok and (r.container, r.codec) == ("avi", "mpeg4")
    assert r.fps == "25" and r.frames == 10 and r.frames_source == "header"
    assert r.duration == pytest.approx(0.4, abs=1e-6)
    assert r.keyframes[0] == 0.0 and set(r.keyframes) <= set(r.pts)


def test_mkv_has_no_frame_count_so_packets_are_counted(media):
    r = probe_file(media / "good" / "beta" / "mpeg4.mkv")
    assert r.ok and (r.container, r.codec) == ("mkv", "mpeg4")
    assert r.fps == "25" and r.fps_source == "stream.average_rate"
    assert (r.frames, r.frames_source) == (10, "packets")
    assert r.time_base == "1/1000"
    assert r.pts == pytest.approx([k * 0.04 for k in range(10)], abs=1e-6)
    assert r.duration == pytest.approx(0.4, abs=1e-3)


@pytest.mark.skipif(WEBM_CODEC is None, reason="no VP8/VP9 encoder in this PyAV build")
def test_webm(media):
    r = probe_file(media / "good" / "gamma" / "web.webm")
    assert r.ok and r.container == "webm" and r.codec == ("vp9" if WEBM_CODEC == "libvpx-vp9" else "vp8")
    assert r.fps == "30" and (r.frames, r.frames_source) == (12, "packets")
    # 1/1000 time base: 33/34 ms gaps are rounding, not a variable rate
    assert not r.vfr and r.measured_fps == pytest.approx(30, rel=5e-3)


def test_vfr_mkv_header_says_30_packets_say_13(media):
    r = probe_file(media / "good" / "beta" / "vfr.mkv")
    assert r.ok
    assert r.fps == "30" and r.fps_source == "stream.average_rate"  # what the container claims
    assert r.vfr is True
    assert r.measured_fps == pytest.approx(13.0, abs=1e-6)  # 13 gaps in exactly 1 s
    assert r.pts == pytest.approx([t / 1000 for t in VFR_PTS_MS], abs=1e-9)
    assert (r.frames, r.frames_source) == (14, "packets")
    assert "variable frame rate" in r.reason and "13.000" in r.reason


def test_regular_packets_overrule_a_wrong_header(media):
    r = probe_file(media / "odd" / "lying.mkv")
    assert r.ok and not r.vfr
    assert r.fps == "12" and r.fps_source == "packet timestamps" and r.fps_float == 12.0
    assert r.measured_fps == pytest.approx(12, rel=2e-3)  # millisecond-rounded pts
    assert "header says 30" in r.reason


def test_audio_stream_is_reported(media):
    r = probe_file(media / "good" / "gamma" / "talk.mp4")
    assert r.ok and r.has_audio is True and r.fps == "30" and r.frames == 12


def test_gif_centisecond_delays(media):
    r = probe_file(media / "good" / "gamma" / "anim.gif")
    assert r.ok and r.container == "gif" and r.fps == "10" and r.frames == 8 and not r.vfr
    assert r.duration == pytest.approx(0.8)


@pytest.mark.parametrize(
    "name, status, words",
    [
        ("voice.mp4", "audio-only", "no video stream"),
        ("cut.mp4", "truncated", "moov"),
        ("cut_faststart.mp4", "truncated", "header lists 60 frames"),
        ("cut.mkv", "truncated", "packets end at"),
        ("empty.mp4", "empty", "zero bytes"),
        ("text.mp4", "not-video", "not a recognised media container"),
        ("dangling.mp4", "missing", "broken symlink"),
    ],
)
def test_broken_inputs_get_a_status_and_reason(media, name, status, words):
    r = probe_file(media / "bad" / name)
    assert r.status == status and status in STATUSES
    assert words in r.reason and "\n" not in r.reason
    assert r.label == "bad" and not r.ok


def test_audio_only_sets_has_audio(media):
    assert probe_file(media / "bad" / "voice.mp4").has_audio is True


def test_truncated_keeps_what_was_readable(media):
    r = probe_file(media / "bad" / "cut_faststart.mp4")
    assert r.fps == "30" and r.frames == 60 and 0 < len(r.pts) < 60


def test_fifo_is_unreadable_without_blocking(tmp_path):
    fifo = tmp_path / "stream.mp4"
    os.mkfifo(fifo)
    r = probe_file(fifo)  # opening a FIFO for reading would block forever
    assert r.status == "unreadable" and r.reason == "not a regular file"


def test_explicit_non_video_file_is_probed(media):
    r = probe_file(media / "good" / "gamma" / "notes.txt")
    assert r.status == "not-video"


# ------------------------------------------------------------------------------------------------
# collect_videos / probe_paths / summarize


def test_collect_walks_recursively_skips_hidden_and_non_videos(media):
    files = collect_videos([media / "good"])
    names = [f.name for f in files]
    assert "notes.txt" not in names and "._ntsc24.mp4" not in names
    assert {"ntsc24.mp4", "mpeg4.avi", "vfr.mkv", "anim.gif"} <= set(names)
    assert names == [f.name for f in sorted(files, key=lambda f: (str(f.parent), f.name))]
    # an explicit file is kept whatever its extension, duplicates dropped
    again = collect_videos([media / "good" / "gamma" / "notes.txt", media / "good", media / "good" / "alpha" / "ntsc24.mp4"])
    assert again[0].name == "notes.txt" and len(again) == len(files) + 1
    with pytest.raises(EqmError, match="no such file or folder"):
        collect_videos([media / "nope"])


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_parallel_matches_serial(media, executor):
    serial = probe_paths([media], workers=1)
    seen = []
    parallel = probe_paths([media], workers=2, progress=seen.append, executor=executor)
    assert [r.to_dict() for r in parallel] == [r.to_dict() for r in serial]
    assert len(seen) == len(serial) and {r.path for r in seen} == {r.path for r in serial}


def test_summary_counts(media):
    results = probe_paths([media / "good", media / "bad"])
    s = summarize(results)
    n_good = 8 + (1 if WEBM_CODEC else 0)
    assert s["files"] == n_good + 7 and s["ok"] == n_good and s["broken"] == 7
    assert s["by_status"] == {"audio-only": 1, "empty": 1, "missing": 1, "not-video": 1, "ok": n_good, "truncated": 3}
    assert s["vfr"] == 1
    assert s["by_fps"]["24000/1001"]["files"] == 1 and s["by_fps"]["25"]["files"] == 2
    assert s["by_fps"]["30"]["files"] == 1 + (1 if WEBM_CODEC else 0)  # the VFR file is not counted at 30
    assert list(s["by_fps"]) == sorted(s["by_fps"], key=lambda k: Fraction(k))
    total = sum(r.duration for r in results if r.ok)
    assert s["total_hours"] == pytest.approx(total / 3600, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# manifest


def test_manifest_round_trip_with_relative_paths(media, tmp_path):
    results = probe_paths([media / "good", media / "bad"])
    out = write_manifest(results, media / "manifest.jsonl")
    try:
        lines = out.read_text().splitlines()
        assert len(lines) == len(results)
        assert json.loads(lines[0])["path"].startswith("good/")  # relative to the manifest's folder
        back = read_manifest(out)
        assert [r.to_dict() for r in back] == [r.to_dict() for r in results]
        ok = read_manifest(out, only_ok=True)
        assert ok and all(r.ok for r in ok) and len(ok) == summarize(results)["ok"]
        # outside the manifest's folder: absolute paths
        other = write_manifest(results[:2], tmp_path / "m.jsonl")
        assert json.loads(other.read_text().splitlines()[0])["path"] == str(Path(results[0].path).absolute())
        assert read_manifest(other)[0].pts == results[0].pts
    finally:
        out.unlink()


def test_manifest_write_is_atomic(media, tmp_path, monkeypatch):
    results = probe_paths([media / "good" / "alpha"])
    target = tmp_path / "m.jsonl"
    target.write_text("previous content\n")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(EqmError, match=f"cannot write manifest {target}: disk full"):
        write_manifest(results, target, force=True)  # force: the previous content is not a manifest
    assert target.read_text() == "previous content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temporary left behind
    with pytest.raises(EqmError, match="does not exist"):
        write_manifest(results, tmp_path / "no" / "m.jsonl")


def test_manifest_gets_the_permissions_of_a_plain_write(media, tmp_path):
    old = os.umask(0o022)
    try:
        out = write_manifest(probe_paths([media / "good" / "alpha"]), tmp_path / "m.jsonl")
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o644  # not mkstemp's 0600


def _good_line(**changes):
    d = ProbeResult(path="a.mp4", fps="30", frames=3, duration=0.1, pts=[0.0, 0.033, 0.067], keyframes=[0.0]).to_dict()
    d.update(changes)
    return json.dumps(d)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        (_good_line() + "\n{not json\n", "line 2: invalid JSON"),
        ("[1, 2]\n", "line 1: expected a JSON object"),
        (json.dumps({"path": "a.mp4"}) + "\n", "line 1: missing key 'status'"),
        (_good_line(frames="3"), "key 'frames' must be int"),
        (_good_line(vfr=1), "key 'vfr' must be bool"),
        (_good_line(fps="thirty"), "key 'fps' must be a fraction"),
        (_good_line(fps="0/1"), "key 'fps' must be positive"),
        (_good_line(pts=[0.0, 0.2, 0.1]), "key 'pts' must be sorted"),
        (_good_line(pts=[0.5, 0.6]), "key 'pts' must start at 0"),
        (_good_line(pts=[]), "needs its packet timestamps"),
        (_good_line(status="fine"), "unknown status 'fine'"),
        ("\n" + _good_line(duration=-1.0), "line 2: key 'duration' must be a non-negative"),
    ],
)
def test_read_manifest_one_line_errors(tmp_path, content, message):
    mp = tmp_path / "bad.jsonl"
    mp.write_text(content)
    with pytest.raises(EqmError) as e:
        read_manifest(mp)
    text = str(e.value)
    assert message in text and str(mp) in text and "\n" not in text


def test_read_manifest_ignores_unknown_keys_and_blank_lines(tmp_path):
    mp = tmp_path / "m.jsonl"
    mp.write_text(_good_line(future_field=1) + "\n\n")
    (r,) = read_manifest(mp)
    assert r.path == str(tmp_path / "a.mp4") and r.fps_fraction == 30
    with pytest.raises(EqmError, match="manifest not found"):
        read_manifest(tmp_path / "none.jsonl")


# ------------------------------------------------------------------------------------------------
# CLI


def _runner():
    return CliRunner()


def test_cli_table_and_summary_exit_0_when_all_ok(media):
    res = _runner().invoke(app, ["probe-fps", str(media / "good" / "alpha"), str(media / "good" / "beta")],
                           env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "24000/1001 (23.976)" in out and "30000/1001 (29.970)" in out
    assert "~13.0" in out  # the VFR column shows the measured mean rate
    assert "6 files: 6 ok, 0 broken; 1 variable frame rate" in out
    assert max(len(line) for line in out.splitlines()) <= 100
    row = next(line for line in out.splitlines() if "ntsc24.mp4" in line)  # one line per file at 100
    assert row.split() == ["alpha/ntsc24.mp4", "mp4", "h264", "32x32", "24000/1001", "(23.976)", "12", "0.50s", "ok"]


def test_cli_table_keeps_every_column_at_80(media):
    res = _runner().invoke(app, ["probe-fps", str(media / "good" / "alpha")], env={"COLUMNS": "80"})
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "status" in next(line for line in lines if line.lstrip().startswith("file"))


def test_cli_json_is_the_only_stdout_and_exit_1_on_broken(media):
    res = _runner().invoke(app, ["probe-fps", "--json", str(media / "good"), str(media / "bad")])
    assert res.exit_code == 1
    doc = json.loads(res.stdout)  # nothing but JSON on stdout
    names = {Path(f["path"]).name: f for f in doc["files"]}
    assert names["ntsc24.mp4"]["fps"] == "24000/1001" and "pts" not in names["ntsc24.mp4"]
    assert names["cut.mp4"]["status"] == "truncated" and names["empty.mp4"]["status"] == "empty"
    assert names["text.mp4"]["status"] == "not-video" and names["voice.mp4"]["status"] == "audio-only"
    assert doc["summary"]["broken"] == 7 and doc["summary"]["vfr"] == 1
    with_pts = json.loads(_runner().invoke(app, ["probe-fps", "--json", "--pts", str(media / "good" / "alpha")]).stdout)
    assert with_pts["files"][0]["pts"][:2] == pytest.approx([0.0, 1001 / 24000], abs=1e-6)


def test_cli_manifest(media, tmp_path):
    mp = tmp_path / "train.jsonl"
    res = _runner().invoke(app, ["probe-fps", str(media / "good"), "--manifest", str(mp), "--summary-only"])
    assert res.exit_code == 0, res.output
    assert "wrote manifest" in res.stdout
    entries = read_manifest(mp)
    assert {r.label for r in entries} == {"alpha", "beta", "gamma"}
    vfr = [r for r in entries if r.vfr]
    assert len(vfr) == 1 and vfr[0].pts == pytest.approx([t / 1000 for t in VFR_PTS_MS])


def test_cli_bad_usage_exit_2(media, tmp_path):
    res = _runner().invoke(app, ["probe-fps", str(media / "does-not-exist")])
    assert res.exit_code == 2 and "no such file or folder" in res.stderr and "Traceback" not in res.output
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    res = _runner().invoke(app, ["probe-fps", str(empty_dir)])
    assert res.exit_code == 2 and "no video files found" in res.stderr


def test_cli_help_documents_exit_codes():
    res = _runner().invoke(app, ["probe-fps", "--help"], env={"COLUMNS": "100"})
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())
    assert "Exit status: 0" in text and "1 at least one file is broken" in text and "2 bad usage" in text
