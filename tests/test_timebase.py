from fractions import Fraction

import pytest
import torch

from eqm.errors import EqmError
from eqm.timebase import (
    format_fps,
    fps_tag,
    frames_for_duration,
    is_variable_rate,
    mean_rate,
    parse_fps,
    uniform_timestamps,
)


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("30", Fraction(30)),
        (60, Fraction(60)),
        ("29.97", Fraction(30000, 1001)),
        (23.976, Fraction(24000, 1001)),
        ("30000/1001", Fraction(30000, 1001)),
        ("12.5", Fraction(25, 2)),
        (Fraction(60000, 1001), Fraction(60000, 1001)),
    ],
)
def test_parse_fps_exact(raw, expected):
    assert parse_fps(raw) == expected


@pytest.mark.parametrize("raw", ["0", -5, "nan", float("inf"), "abc", "1/0", "100000", True])
def test_parse_fps_rejects(raw):
    with pytest.raises(EqmError) as e:
        parse_fps(raw, name="--fps")
    assert "--fps" in str(e.value)
    assert "\n" not in str(e.value)


def test_uniform_timestamps_ntsc_exact():
    t = uniform_timestamps(3001, Fraction(30000, 1001), dtype=torch.float64)
    assert t[0] == 0
    assert t[3000].item() == pytest.approx(3000 * 1001 / 30000, abs=1e-12)
    assert torch.allclose(t[1:] - t[:-1], torch.full((3000,), 1001 / 30000, dtype=torch.float64))


def test_frames_for_duration_and_format():
    assert frames_for_duration(1.0, 60) == 60
    assert frames_for_duration(2.0, Fraction(30000, 1001)) == 60
    assert format_fps(Fraction(24000, 1001)) == "24000/1001 (23.976)"
    assert format_fps(Fraction(25)) == "25"
    with pytest.raises(EqmError):
        frames_for_duration(0, 30)


def test_one_frame_count_rule_rounds_halves_up():
    """sample, retime and inspect-embed all count frames with frames_for_duration: halves round up
    whatever the parity (Python's round would give 2 frames for 0.25 s at 10 fps and 4 for 0.35 s)."""
    assert frames_for_duration(0.25, 10) == 3 and frames_for_duration(0.35, 10) == 4
    assert frames_for_duration(Fraction(1, 4), Fraction(10)) == 3
    assert frames_for_duration(0.24, 10) == 2 and frames_for_duration(0.01, 10) == 1  # at least one frame
    assert frames_for_duration(1001 / 30000 * 45, Fraction(30000, 1001)) == 45  # float seconds of an NTSC clip
    for bad in (float("nan"), float("inf"), -1.0, "2"):
        with pytest.raises(EqmError, match="duration"):
            frames_for_duration(bad, 30)


def test_rate_spellings_for_people_files_and_json():
    ntsc = Fraction(30000, 1001)
    assert format_fps(ntsc) == "30000/1001 (29.970)" and fps_tag(ntsc) == "29.97" and str(ntsc) == "30000/1001"
    assert fps_tag(Fraction(24000, 1001)) == "23.976" and fps_tag(Fraction(60)) == "60" and str(Fraction(60)) == "60"
    for rate in (ntsc, Fraction(60), Fraction(25, 2)):
        assert parse_fps(str(rate)) == rate  # the JSON spelling reads back exactly


def test_vfr_detection():
    cfr = [k / 30 for k in range(60)]
    assert not is_variable_rate(cfr)
    assert mean_rate(cfr) == pytest.approx(30)
    ms_rounded = [round(k * 1001 / 30000, 3) for k in range(100)]  # mkv 1/1000 time base
    assert not is_variable_rate(ms_rounded)
    vfr = [0, 0.05, 0.07, 0.2, 0.21, 0.4]
    assert is_variable_rate(vfr)
