"""`eqmctl probe-fps` and reading (eqm.video.io) agree on every file: one rule (eqm.video.av_util)
for what is a video, which header rate counts, and how errors read.

Real files: MP4 / MKV / GIF written by our writer, an animated PNG and an animated and a still WebP
written by Pillow, a still PNG, an audio-only M4A written with PyAV, and text named .mp4.
"""

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from eqm.errors import EqmError
from eqm.video import av_util
from eqm.video.io import read_video, write_video
from eqmctl.cli import app


def _frames(n):
    return np.stack([np.full((16, 16, 3), 20 * k, np.uint8) for k in range(n)])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("agree")
    write_video(d / "ntsc.mp4", _frames(12), "30000/1001")
    write_video(d / "pal.mkv", _frames(10), 25)
    write_video(d / "anim.gif", _frames(8), 10)
    images = [Image.fromarray(f) for f in _frames(5)]
    images[0].save(d / "anim.png", save_all=True, append_images=images[1:], duration=100, loop=0)  # APNG
    images[0].save(d / "anim.webp", save_all=True, append_images=images[1:], duration=100, loop=0)
    images[0].save(d / "still.png")
    images[0].save(d / "still.webp")
    with av.open(str(d / "voice.m4a"), "w", format="mp4") as c:
        a = c.add_stream("aac", rate=8000)
        for k in range(4):
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            af.sample_rate, af.pts = 8000, k * 1024
            for pkt in a.encode(af):
                c.mux(pkt)
        for pkt in a.encode():
            c.mux(pkt)
    (d / "text.mp4").write_text("not a video\n" * 50)
    return sorted(p for p in d.iterdir())


def _read(path):
    try:
        return read_video(path), None
    except EqmError as e:
        return None, str(e)


def test_probe_fps_and_reading_agree_on_every_file(files):
    res = CliRunner().invoke(app, ["probe-fps", "--json", *map(str, files)])
    assert res.exit_code == 1  # some are not videos
    probed = {Path(f["path"]).name: f for f in json.loads(res.stdout)["files"]}
    assert set(probed) == {p.name for p in files}
    for path in files:
        got, err = _read(path)
        p = probed[path.name]
        assert (p["status"] == "ok") == (got is not None), (path.name, p, err)
        if got is not None:
            assert Fraction(p["fps"]) == got.fps, path.name  # the same header rate
            assert p["frames"] == len(got.frames), path.name
        elif p["status"] == "not-video" and "cannot read" not in err:
            assert p["reason"] in err, (path.name, p["reason"], err)  # the same words
    ok = sorted(n for n, p in probed.items() if p["status"] == "ok")
    assert ok == ["anim.gif", "anim.png", "ntsc.mp4", "pal.mkv"]  # an animated PNG is a video
    assert probed["ntsc.mp4"]["fps"] == "30000/1001" and probed["anim.png"]["fps"] == "10"
    assert "animated WebP" in probed["anim.webp"]["reason"]
    assert probed["still.png"]["reason"] == "a still image (png_pipe), not a video"
    assert probed["still.webp"]["reason"] == "a still image (webp_pipe), not a video"
    voice = next(p for p in files if p.name == "voice.m4a")
    assert probed["voice.m4a"]["status"] == "audio-only" and _read(voice)[1] == f"{voice} has no video stream"


def test_header_rate_order_and_error_text():
    class Stream:
        average_rate = None
        base_rate = Fraction(30)
        guessed_rate = Fraction(25)

    assert av_util.header_rates(Stream()) == [(Fraction(30), "stream.base_rate"), (Fraction(25), "stream.guessed_rate")]
    assert av_util.header_rate(Stream()) == 30
    Stream.average_rate, Stream.base_rate = Fraction(30000, 1001), Fraction(10**6)  # above MAX_FPS: ignored
    assert [a for _, a in av_util.header_rates(Stream())] == ["stream.average_rate", "stream.guessed_rate"]
    err = OSError(2, "No such file or directory\n  twice", "clip.mp4")
    assert av_util.error_text(err) == "No such file or directory twice"


def test_a_name_that_looks_like_a_protocol_is_opened_as_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_video(tmp_path / "pipe:0.mp4", _frames(3), 10)  # without "file:" FFmpeg would read stdin
    assert len(read_video("pipe:0.mp4").frames) == 3
