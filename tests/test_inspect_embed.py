"""`eqmctl inspect-embed` and eqm.inspect: the numbers are checked against closed forms computed
here independently (numpy, float64), and against what a real EqMTransformer builds."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eqm import checkpoint as C
from eqm import embed as E
from eqm.errors import EqmError, ParamError
from eqm.inspect import (
    PLOT_FILES,
    EmbedView,
    adjacent_similarity,
    clip_timestamps,
    frequency_hz,
    inspect_embedding,
    temporal_code,
    view_from_checkpoint,
    view_from_recipe,
    write_plots,
)
from eqm.config import EqMConfig
from eqm.model import EqMTransformer
from eqmctl.cli import app

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-synthetic.yaml"


def omegas(d_t):
    """w_j = 10000^(-2j/d_t), j < d_t/2: the sin/cos frequencies of docs/embedding.md#choosing-ref_fps."""
    return 10000.0 ** (-2.0 * np.arange(d_t // 2) / d_t)


def expected_adjacent(d_t, step):
    """Cosine similarity of [sin(w tau) | cos(w tau)] at tau and tau + step: mean_j cos(w_j step)."""
    return float(np.mean(np.cos(omegas(d_t) * step)))


# Independent channel counts: sincos d_t = time_frac * D; rope d_t = time_frac * head_dim (even).
SINCOS = (EmbedView(EqMConfig(pos="sincos", hidden_size=384, num_heads=6)), 96)
ROPE = (EmbedView(EqMConfig(pos="rope", hidden_size=384, num_heads=6)), 16)


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("cfg,d_t", [SINCOS, ROPE], ids=["sincos", "rope"])
def test_adjacent_similarity_matches_closed_form(cfg, d_t):
    assert cfg.arch.time_channels == d_t
    fps = np.array([6.0, 12.0, 24.0, 60.0, 240.0])
    got = adjacent_similarity(cfg, fps)
    raw = adjacent_similarity(cfg.with_time("seconds", 1.0), fps)
    idx = adjacent_similarity(cfg.with_time("index"), fps)
    for i, f in enumerate(fps):
        # the model's codes are float32: agreement to ~1e-6 is its resolution
        assert got[i] == pytest.approx(expected_adjacent(d_t, 24.0 / f), abs=2e-6)
        assert raw[i] == pytest.approx(expected_adjacent(d_t, 1.0 / f), abs=2e-6)
        assert idx[i] == pytest.approx(expected_adjacent(d_t, 1.0), abs=2e-6)
    # the measurement eqm.embed documents for the ref_fps choice agrees too
    assert got[3] == pytest.approx(E.adjacent_frame_similarity(60, 24, d_t), abs=2e-6)


@pytest.mark.parametrize("cfg,d_t", [SINCOS, ROPE], ids=["sincos", "rope"])
def test_separability_trends(cfg, d_t):
    fps = [12, 24, 30, 60, 120, 240]
    sec = adjacent_similarity(cfg, fps)
    idx = adjacent_similarity(cfg.with_time("index"), fps)
    raw = adjacent_similarity(cfg.with_time("seconds", 1.0), fps)
    assert np.all(np.diff(sec) > 0), sec  # seconds: lower rate -> neighbours further apart in time -> less similar
    assert np.ptp(idx) == 0.0, idx        # index: a neighbour is one step away at every rate
    assert np.all(raw > sec)              # raw seconds separate neighbours far less than ref_fps 24
    # ref_fps 24: a 24 fps clip encodes like frame indices
    assert sec[1] == pytest.approx(idx[1], abs=1e-6)


@pytest.mark.parametrize("cfg", [SINCOS[0], ROPE[0]], ids=["sincos", "rope"])
def test_similarity_aligns_by_seconds_or_by_index(cfg):
    rep = inspect_embedding(cfg, [24, 60], compare=(24, 60), seconds=1.0)
    sim = rep.similarity
    assert sim.matrix.shape == (24, 60)
    for k, j in enumerate(sim.argmax):
        # frame k of 24 fps is at k/24 s; the 60 fps frame at that time is k*60/24 = 2.5k
        if k % 2 == 0:
            assert j == round(k * 60 / 24)
        else:  # 2.5k lies halfway between two frames: either nearest one is right
            assert j in (math.floor(k * 2.5), math.ceil(k * 2.5))
    assert sim.aligned_by_seconds().all()
    # the contrast panel (index positions) peaks on the diagonal
    assert rep.contrast.time_mode == "index"
    assert list(rep.contrast.argmax) == list(range(24))

    idx = inspect_embedding(cfg.with_time("index"), [24], compare=(24, 60), seconds=1.0).similarity
    assert list(idx.argmax) == list(range(24))
    assert idx.aligned_by_index().all() and not idx.aligned_by_seconds().all()


def test_frequencies_in_hz_and_aliasing():
    cfg, d_t = SINCOS
    w = omegas(d_t)
    for f in (6, 24, 60):
        np.testing.assert_allclose(frequency_hz(cfg, f), 24.0 * w / (2 * math.pi), rtol=1e-12)
        np.testing.assert_allclose(frequency_hz(cfg.with_time("index"), f), f * w / (2 * math.pi), rtol=1e-12)
    rep = inspect_embedding(cfg, [6, 7.5, 8, 60], seconds=0.5)
    rows = {float(r.fps): r for r in rep.rows}
    for f, r in rows.items():
        assert r.nyquist_hz == f / 2
        assert r.max_hz == pytest.approx(24.0 / (2 * math.pi))
        assert r.aliased == int(np.sum(24.0 * w / (2 * math.pi) > f / 2))
        assert r.num_frequencies == 48
        assert r.frames == round(0.5 * f)
    # by hand: 24/(2 pi) = 3.82 Hz and 24 * 10000^(-2/96) / (2 pi) = 3.15 Hz both exceed 3 Hz; the
    # third (2.60 Hz) does not.  Above 24/pi = 7.64 fps nothing aliases.
    assert rows[6.0].aliased == 2 and rows[7.5].aliased == 1 and rows[8.0].aliased == 0
    # index positions never alias: fps * w / (2 pi) <= fps / (2 pi) < fps / 2
    assert all(r.aliased == 0 for r in inspect_embedding(cfg.with_time("index"), [6, 60], seconds=0.5).rows)


def test_codes_are_what_the_model_computes():
    """The heatmap's values are the temporal part of model.positions(): sincos adds them to the
    tokens (frame 0 adds nothing), rope rotates q/k by them."""
    ts = clip_timestamps(30, 0.2)  # 6 frames
    for pos, order in (("sincos", "paired"), ("sincos", "aligned"), ("rope", "paired")):
        m = EqMTransformer(EqMConfig(input_size=8, num_frames=6, patch_size=4, hidden_size=32, depth=1, num_heads=2,
                           num_classes=2, pos=pos, ref_fps=24.0, time_order=order))
        cfg = EmbedView(m.config)
        code = temporal_code(cfg, ts, as_added=True)[0]  # (6, d_t), fastest frequency first
        P = m.positions(ts)
        tokens_per_frame = m.config.grid[0] * m.config.grid[1]
        first = torch.arange(6) * tokens_per_frame  # the (row 0, col 0) token of every frame
        if pos == "sincos":
            d_t = 8  # 0.25 * 32
            sin_at, cos_at = E.sincos_time_slices(32)
            time_part = (P.add[0] - m.pos_embed[0].repeat(6, 1))[first]
            want_sin, want_cos = code[:, : d_t // 2], code[:, d_t // 2:]
            if order == "paired":  # the model stores the fastest frequency on the last channel of each half
                want_sin, want_cos = want_sin.flip(-1), want_cos.flip(-1)
            torch.testing.assert_close(time_part[:, sin_at], want_sin, atol=1e-6, rtol=0)
            torch.testing.assert_close(time_part[:, cos_at], want_cos, atol=1e-6, rtol=0)
            assert torch.all(code[0] == 0)  # tau = 0 adds nothing: the image model's code
        else:
            n = 2  # head_dim 16 -> time group of 4 channels -> 2 rotated pairs
            cos, sin = P.rope
            torch.testing.assert_close(cos[0, 0, first, :n], code[:, :n])
            torch.testing.assert_close(sin[0, 0, first, :n], code[:, n:])


def test_temporal_patch_tokens_take_mean_time():
    base = EmbedView(EqMConfig(hidden_size=64, num_heads=4))
    # tokens of 2 frames at 48 fps are 2/48 s apart: like single frames at 24 fps
    got = adjacent_similarity(EmbedView(EqMConfig(hidden_size=64, num_heads=4, temporal_patch=2)), [48.0])
    assert got[0] == pytest.approx(adjacent_similarity(base, [24.0])[0], abs=1e-6)
    assert clip_timestamps(24, 0.25, temporal_patch=4).shape[0] == 8  # 6 frames rounded up to whole patches


def test_view_from_checkpoint_and_recipe(tmp_path):
    m = EqMTransformer(EqMConfig(input_size=8, num_frames=4, patch_size=4, hidden_size=32, depth=1, num_heads=2,
                       num_classes=2, pos="rope", time_mode="index", ref_fps=30.0, time_frac=0.5))
    C.save_checkpoint(tmp_path / "run", 5, model=m, config=m.config,
                      recipe={"data": {"fps_min": 8, "fps_max": 30}})
    view = view_from_checkpoint(tmp_path / "run")  # a run dir: its latest checkpoint
    assert view.arch == m.config
    assert view.arch.time_channels == 8 and view.train_fps == (8.0, 30.0) and "step_0000005" in view.source
    with pytest.raises(EqmError, match="checkpoint not found"):
        view_from_checkpoint(tmp_path / "nope")

    rc = view_from_recipe(RECIPE, ["model.time.ref_fps=1", "model.pos=rope"])
    a = rc.arch
    assert (a.pos, a.ref_fps, a.hidden_size, a.num_heads) == ("rope", 1.0, 64, 4)  # tiny: 64 wide, 4 heads
    assert rc.train_fps == (8.0, 30.0)


def test_bad_inputs_raise_one_line():
    with pytest.raises(EqmError, match="compare"):
        inspect_embedding(EmbedView(), [24], compare=(24,))
    with pytest.raises(EqmError, match="seconds"):
        inspect_embedding(EmbedView(), [24], seconds=0)
    with pytest.raises(ParamError, match="time_frac"):
        EqMConfig(time_frac=0.7)
    with pytest.raises(ParamError, match="divisible"):
        EqMConfig(hidden_size=100, num_heads=3)


def test_write_plots_atomic(tmp_path):
    rep = inspect_embedding(EmbedView(EqMConfig(pos="rope", hidden_size=64, num_heads=4)), [12, 24], seconds=0.5)
    out = tmp_path / "plots"
    out.mkdir()
    (out / "heatmap.png").write_text("stale")
    written = write_plots(rep, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(PLOT_FILES)  # no temp files left behind
    for p in written.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


# ----------------------------------------------------------------------------- CLI


def run(args):
    r = CliRunner().invoke(app, ["inspect-embed", *args])
    return r.exit_code, r.stdout, r.stderr


def table_rows(text):
    """{fps: [cells]} from the rich table (rows start with a box bar and a number)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 8 and re.fullmatch(r"[\d.]+", cells[0]):
            rows[cells[0]] = cells
    return rows


def test_cli_writes_plots_and_prints_table(tmp_path):
    out = tmp_path / "ins"
    code, stdout, stderr = run(["--rates", "6,24,60", "--compare", "24,60", "--seconds", "0.5", "--out", str(out)])
    assert code == 0, stderr
    for name in PLOT_FILES:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    rows = table_rows(stdout)
    assert set(rows) == {"6", "24", "60"}
    d_t = 96  # default: EqM-S width 384, time_frac 0.25
    for f, cells in rows.items():
        fps = float(f)
        assert int(cells[1]) == round(0.5 * fps)
        assert float(cells[2]) == pytest.approx(expected_adjacent(d_t, 24 / fps), abs=2e-6)
        assert float(cells[3]) == pytest.approx(expected_adjacent(d_t, 1 / fps), abs=2e-6)
        assert float(cells[4]) == pytest.approx(expected_adjacent(d_t, 1.0), abs=2e-6)
        assert float(cells[5]) == pytest.approx(24 / (2 * math.pi), abs=1e-3)
        assert float(cells[6]) == pytest.approx(fps / 2)
    assert rows["6"][7] == "2/48" and rows["24"][7] == "0/48"
    assert "nearest in time in 12/12 rows" in " ".join(stdout.split())


def test_cli_json_from_checkpoint_with_override(tmp_path):
    m = EqMTransformer(EqMConfig(input_size=8, num_frames=4, patch_size=4, hidden_size=64, depth=1, num_heads=4,
                       num_classes=2, pos="rope", time_mode="seconds", ref_fps=24.0))
    ck = C.save_checkpoint(tmp_path / "run", 3, model=m, config=m.config, recipe={"data": {"fps_min": 8, "fps_max": 30}})
    code, stdout, stderr = run(["--ckpt", str(ck), "--time-mode", "index", "--rates", "12,24", "--compare", "12,24",
                                "--seconds", "0.5", "--json", "--out", str(tmp_path / "o")])
    assert code == 0, stderr
    data = json.loads(stdout)
    assert data["config"]["pos"] == "rope" and data["config"]["time_mode"] == "index"
    assert data["config"]["time_channels"] == 4 and "time_mode=index" in data["config"]["source"]
    assert data["similarity"]["argmax"] == list(range(6))  # index mode: diagonal
    assert data["similarity"]["rows_aligned_by_index"] == 6
    for row in data["rates"]:
        assert row["adjacent_similarity"] == pytest.approx(expected_adjacent(4, 1.0), abs=2e-6)
        assert row["aliased"] == 0
    # rad/s of a RoPE pair at 12 fps in index mode: fps * w_j
    np.testing.assert_allclose(data["frequencies"]["rad_per_second"]["12"], 12 * omegas(4), rtol=1e-9)
    assert set(data["files"]) == {"heatmap", "similarity", "separability", "frequencies"}


@pytest.mark.parametrize("args,msg", [
    (["--rates", "12,abc"], "--rates"),
    (["--rates", "12,,24"], "--rates"),
    (["--rates", "0"], "--rates must be positive"),
    (["--compare", "24,30,60"], "--compare needs exactly two"),
    (["--ref-fps", "-1"], "--ref-fps"),
    (["--ckpt", "does/not/exist"], "checkpoint not found: does/not/exist"),
    (["--recipe", "missing.yaml"], "recipe file not found"),
    (["model.pos=rope"], "need --recipe"),
    (["--time-frac", "0.7"], "time_frac"),
])
def test_cli_errors_are_one_line(args, msg, tmp_path):
    code, stdout, stderr = run([*args, "--out", str(tmp_path / "o")])
    assert code == 2
    assert msg in stderr and "Traceback" not in stderr + stdout
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written on bad input
