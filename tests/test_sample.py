"""`eqmctl sample`: generation at a chosen rate, written so it plays at that rate (real files, PyAV)."""

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eqm import checkpoint as C
from eqm.errors import EqmError
from eqm.generate import (
    generate, parse_labels, plan_frames, resolve_num_frames, sample_checkpoint, sample_noise, trained_span,
)
from eqm.config import EqMConfig, SamplerSettings
from eqm.model import EqMTransformer
from eqmctl.cli import app

ARCH = dict(input_size=8, num_frames=4, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=3,
            class_dropout_prob=0.1)


def make_model(time_mode="seconds", seed=0, **kw):
    """A small model with random (non-zero) weights: adaLN-Zero starts at zero output, which would
    make every sample equal its noise whatever the rate."""
    torch.manual_seed(seed)
    m = EqMTransformer(EqMConfig(**{**ARCH, "time_mode": time_mode, **kw}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


def save_run(run_dir, model, step=10, recipe=None, **extra):
    return C.save_checkpoint(run_dir, step, model=model, ema=model, config=model.config,
                             recipe=recipe or {"name": "t"}, extra=extra or None)


#: a recipe's data/train sections as state.json carries them: 4-frame clips at 8-30 fps
SPAN_RECIPE = {"name": "t", "data": {"num_frames": 4, "fps_min": 8.0, "fps_max": 30.0}, "train": {"time_shift": 0.0}}


def run(args):
    r = CliRunner().invoke(app, args)
    return r.exit_code, r.stdout, r.stderr


def read_back(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        rate = s.average_rate
        pts = [float(f.pts * f.time_base) for f in c.decode(video=0)]
    return Fraction(rate.numerator, rate.denominator), pts


# ----------------------------------------------------------------------------- library


def test_rate_changes_a_seconds_model_not_an_index_model():
    """Same seed, same frame count, two rates: a seconds-mode model's sample changes (the rate
    is in its positional encoding); an index-mode model cannot tell the rates apart."""
    for mode, should_differ in (("seconds", True), ("index", False), ("fps-embed", True)):
        m = make_model(mode)
        a = generate(m, fps=12, num_frames=4, num_samples=2, seed=3, settings=SamplerSettings(steps=5))
        b = generate(m, fps=48, num_frames=4, num_samples=2, seed=3, settings=SamplerSettings(steps=5))
        diff = (a.videos - b.videos).abs().max().item()
        if should_differ:
            assert diff > 1e-3, mode
        else:
            assert diff == 0.0, mode
        assert torch.allclose(a.timestamps, torch.arange(4) / 12.0)
        assert torch.allclose(b.timestamps, torch.arange(4) / 48.0)


def test_noise_per_sample_independent_of_batch_size():
    m = make_model()
    full = generate(m, fps=24, num_frames=4, num_samples=3, seed=5, settings=SamplerSettings(steps=3))
    split = generate(m, fps=24, num_frames=4, num_samples=3, seed=5, batch_size=2, settings=SamplerSettings(steps=3))
    assert torch.allclose(full.videos, split.videos, atol=1e-5)
    assert torch.equal(sample_noise(2, (3, 4, 8, 8), 5), sample_noise(3, (3, 4, 8, 8), 5)[:2])
    other = generate(m, fps=24, num_frames=4, num_samples=3, seed=6, settings=SamplerSettings(steps=3))
    assert not torch.allclose(full.videos, other.videos)


def test_adaptive_stop_reports_evaluations():
    m = make_model()
    loose = generate(m, fps=24, num_frames=4, num_samples=3, settings=SamplerSettings(steps=30, tol=1e9))
    assert loose.evals.tolist() == [1, 1, 1]
    full = generate(m, fps=24, num_frames=4, num_samples=3, settings=SamplerSettings(steps=7, tol=None))
    assert full.evals.tolist() == [7, 7, 7]


def test_bf16_autocast_on_the_cpu_stays_close_to_fp32():
    m = make_model(num_classes=3)
    y = torch.tensor([0, 1, 2])
    kw = dict(fps=24, num_frames=4, num_samples=3, labels=y, settings=SamplerSettings(cfg_scale=2.0, steps=6))
    full = generate(m, **kw)
    half = generate(m, dtype="bf16", **kw)
    assert half.videos.dtype == torch.float32 and half.dtype == "bf16"
    assert 0 < (half.videos - full.videos).abs().max() < 0.1  # bf16 really ran, and agrees
    assert all(p.dtype == torch.float32 for p in m.parameters())
    with pytest.raises(EqmError, match="fp16 needs a CUDA device"):
        generate(m, dtype="fp16", **kw)


def test_frames_from_seconds_and_labels():
    assert resolve_num_frames(Fraction(60), seconds=1.0) == 60
    assert resolve_num_frames(Fraction(30000, 1001), seconds=2.0) == 60
    assert resolve_num_frames(Fraction(24), frames=5, temporal_patch=2) == 6
    assert resolve_num_frames(Fraction(24), default=16) == 16
    with pytest.raises(EqmError, match="either frames or seconds"):
        resolve_num_frames(Fraction(24), frames=4, seconds=1)
    with pytest.raises(EqmError, match="^seconds must be a positive finite number"):
        resolve_num_frames(Fraction(24), seconds=float("nan"))
    with pytest.raises(EqmError, match="limit"):
        resolve_num_frames(Fraction(60), seconds=1e6)
    assert parse_labels(None, 3, 5).tolist() == [0, 1, 2, 0, 1]
    assert parse_labels("2,left", 3, 3, ["up", "left", "down"]).tolist() == [2, 1, 2]
    assert parse_labels(None, 0, 2) is None
    with pytest.raises(EqmError, match="out of range"):
        parse_labels("3", 3, 1)
    with pytest.raises(EqmError, match="neither"):
        parse_labels("sideways", 3, 1, ["up", "left", "down"])


def test_default_frames_stay_inside_the_trained_seconds():
    """A seconds model trained on 4-frame clips at >= 8 fps saw at most 3/8 s: at 4 fps the default
    clip is 2 frames (1/4 s); inside the training rates it is the full 4.  Explicit counts are
    kept and warned about; an index model's positions do not depend on the rate."""
    m = make_model()
    assert trained_span(m, SPAN_RECIPE).seconds == pytest.approx(3 / 8)
    assert plan_frames(m, SPAN_RECIPE, Fraction(24)) == (4, None)
    assert plan_frames(m, SPAN_RECIPE, Fraction(8)) == (4, None)
    assert plan_frames(m, SPAN_RECIPE, Fraction(4)) == (2, None)
    assert plan_frames(m, SPAN_RECIPE, Fraction(1)) == (1, None)
    T, warning = plan_frames(m, SPAN_RECIPE, Fraction(4), frames=4)
    assert T == 4 and "0.75 s" in warning and "0.375 s" in warning and "2 frames stay inside" in warning
    T, warning = plan_frames(m, SPAN_RECIPE, Fraction(6), seconds=1.0)
    assert T == 6 and "3 frames stay inside" in warning
    # train.time_shift widens the span: 3/8 + 0.5 s
    shifted = {**SPAN_RECIPE, "train": {"time_shift": 0.5}}
    assert plan_frames(m, shifted, Fraction(4)) == (4, None)
    T, warning = plan_frames(m, shifted, Fraction(4), frames=5)
    assert "shifted by up to 0.5 s" in warning
    # index mode: positions 0..3 whatever the rate; more frames than trained is what warns
    idx = make_model("index")
    assert plan_frames(idx, SPAN_RECIPE, Fraction(4)) == (4, None)
    T, warning = plan_frames(idx, SPAN_RECIPE, Fraction(60), frames=6)
    assert T == 6 and "position 5" in warning and "4 frames stay inside" in warning
    # a checkpoint whose recipe does not say: the training length, no warning
    assert plan_frames(m, {"name": "t"}, Fraction(4)) == (4, None)
    assert plan_frames(m, {"data": {"num_frames": "x", "fps_min": 8}}, Fraction(4)) == (4, None)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture()
def ckpt(tmp_path):
    return save_run(tmp_path / "runs" / "r1", make_model(), class_names=["a", "b", "c"])


@pytest.mark.parametrize("fps", ["60", "30000/1001", "24"])
def test_cli_mp4_plays_at_the_exact_rate(tmp_path, ckpt, fps):
    out = tmp_path / "out"
    code, stdout, stderr = run(["sample", "--ckpt", str(ckpt), "--fps", fps, "--frames", "6", "-N", "2",
                                "--steps", "4", "--out", str(out), "--json"])
    assert code == 0, stderr
    doc = json.loads(stdout)
    rate = Fraction(fps)
    assert Fraction(doc["fps"]) == rate and doc["num_frames"] == 6
    assert [s["label"] for s in doc["samples"]] == [0, 1]
    assert all(1 <= s["evals"] <= 4 for s in doc["samples"])
    for s in doc["samples"]:
        got_rate, pts = read_back(out / s["file"])
        assert got_rate == rate
        assert len(pts) == 6
        assert np.allclose(pts, [k / float(rate) for k in range(6)], atol=1e-4)
        assert s["duration"] == pytest.approx(6 / float(rate), rel=1e-6)
    assert sorted(p.name for p in out.iterdir()) == sorted([s["file"] for s in doc["samples"]] + ["samples.json"])


def test_cli_seconds_gif_png_grid(tmp_path, ckpt):
    out = tmp_path / "gif"
    code, stdout, stderr = run(["sample", "--ckpt", str(ckpt), "--fps", "24", "--seconds", "0.5", "-N", "1",
                                "--steps", "2", "--format", "gif", "--png", "--grid", "--upscale", "2",
                                "--labels", "c", "--out", str(out)])
    assert code == 0, stderr
    doc = json.loads((out / "samples.json").read_text())
    assert doc["num_frames"] == 12 and doc["samples"][0]["label"] == 2
    gif = out / doc["samples"][0]["file"]
    assert gif.suffix == ".gif" and "_c_" in gif.name
    with av.open(str(gif)) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 12 and frames[0].width == 16  # upscaled 8 -> 16
    pngs = sorted((out / doc["samples"][0]["png_dir"]).glob("*.png"))
    assert len(pngs) == 12
    assert (out / doc["grid"]).is_file()
    assert "clips at 24 fps" in stdout


def test_cli_gif_warns_above_50fps(tmp_path, ckpt):
    code, _, stderr = run(["sample", "--ckpt", str(ckpt), "--fps", "60", "--frames", "4", "-N", "2",
                           "--steps", "1", "--format", "gif", "--out", str(tmp_path / "g")])
    assert code == 0
    warnings = [ln for ln in stderr.splitlines() if ln.startswith("warning")]
    assert len(warnings) == 1 and "GIF" in warnings[0] and "60 fps" in warnings[0]


def test_cli_default_frames_and_span_warning(tmp_path):
    """Through the CLI and a real checkpoint: the 4 fps default stays inside the trained 3/8 s and
    says nothing; an explicit longer clip is written as asked, with a one-line warning."""
    ck = save_run(tmp_path / "runs" / "r", make_model(), recipe=SPAN_RECIPE)
    out = tmp_path / "o"
    code, stdout, stderr = run(["sample", "--ckpt", str(ck), "--fps", "4", "-N", "1", "--steps", "1",
                                "--out", str(out), "--json"])
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["num_frames"] == 2 and len(read_back(out / doc["samples"][0]["file"])[1]) == 2
    assert "warning" not in stderr
    code, stdout, stderr = run(["sample", "--ckpt", str(ck), "--fps", "4", "--frames", "4", "-N", "1",
                                "--steps", "1", "--out", str(tmp_path / "o2"), "--json"])
    assert code == 0, stderr
    assert json.loads(stdout)["num_frames"] == 4
    warnings = [ln for ln in stderr.splitlines() if ln.startswith("warning")]
    assert len(warnings) == 1 and "past the 0.375 s" in warnings[0]


def test_cli_latest_run_is_used_and_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_run(tmp_path / "runs" / "old", make_model(seed=1), step=5)
    newest = save_run(tmp_path / "runs" / "new", make_model(seed=2), step=7)
    code, _, stderr = run(["sample", "--fps", "12", "--frames", "4", "-N", "1", "--steps", "1", "--out", "o"])
    assert code == 0, stderr
    assert "latest checkpoint" in stderr and str(newest.relative_to(tmp_path)) in stderr.replace("\n", "")
    assert json.loads((tmp_path / "o" / "samples.json").read_text())["step"] == 7


@pytest.mark.parametrize("fps", ["0", "-24", "nan", "inf", "1e9", "abc"])
def test_cli_bad_fps_one_line(tmp_path, ckpt, fps):
    out = tmp_path / "o"
    code, stdout, stderr = run(["sample", "--ckpt", str(ckpt), f"--fps={fps}", "--out", str(out)])
    assert code == 2
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "fps" in lines[0]
    assert "Traceback" not in stderr and not out.exists()


def test_cli_bad_checkpoints(tmp_path, ckpt):
    out = tmp_path / "o"
    code, _, stderr = run(["sample", "--ckpt", str(tmp_path / "nope"), "--fps", "24", "--out", str(out)])
    assert code == 2 and "not found" in stderr and "nope" in stderr and not out.exists()

    # a checkpoint whose weights belong to another architecture
    other = make_model(hidden_size=64)
    bad = C.save_checkpoint(tmp_path / "bad", 1, model=other, config=make_model().config, recipe={})
    code, _, stderr = run(["sample", "--ckpt", str(bad), "--fps", "24", "--raw", "--out", str(out)])
    assert code == 2 and "do not match the model architecture" in stderr and "Traceback" not in stderr
    assert not out.exists()

    code, _, stderr = run(["sample", "--ckpt", str(ckpt), "--fps", "24", "--labels", "7", "--out", str(out)])
    assert code == 2 and "out of range" in stderr and not out.exists()
    code, _, stderr = run(["sample", "--ckpt", str(ckpt), "--fps", "24", "--format", "avi", "--out", str(out)])
    assert code == 2 and "--format" in stderr


def test_cli_guidance_defaults_to_the_recipe(tmp_path):
    """Without --cfg-scale a model is sampled with its recipe's sample.cfg_scale (as its training
    previews were); the flag overrides it; a recipe without the key means no guidance."""
    guided = save_run(tmp_path / "runs" / "g", make_model(), recipe={"name": "t", "sample": {"cfg_scale": 2.5}})
    plain = save_run(tmp_path / "runs" / "p", make_model(), recipe={"name": "t"})
    got = {}
    for name, ck, extra in (("recipe", guided, []), ("flag", guided, ["--cfg-scale", "1"]), ("none", plain, [])):
        code, stdout, stderr = run(["sample", "--ckpt", str(ck), "--fps", "24", "--frames", "4", "-N", "2",
                                    "--steps", "2", "--tol", "0", "--out", str(tmp_path / name), "--json", *extra])
        assert code == 0, stderr
        got[name] = json.loads(stdout)["settings"]["cfg_scale"]
    assert got == {"recipe": 2.5, "flag": 1.0, "none": 1.0}
    code, stdout, stderr = run(["sample", "--ckpt", str(guided), "--fps", "24", "--frames", "4", "-N", "1",
                                "--steps", "1", "--out", str(tmp_path / "table")])
    assert code == 0, stderr
    assert "cfg 2.5" in stdout.replace("\n", " ")


def test_recipe_cfg_scale_reads_only_valid_values():
    from eqm.generate import recipe_cfg_scale

    assert recipe_cfg_scale({"sample": {"cfg_scale": 1.5}}) == 1.5
    assert recipe_cfg_scale({"sample": {"cfg_scale": 0}}) == 0.0
    for bad in (None, {}, {"sample": None}, {"sample": {}}, {"sample": {"cfg_scale": "x"}},
                {"sample": {"cfg_scale": float("nan")}}, {"sample": {"cfg_scale": -1}}):
        assert recipe_cfg_scale(bad) == 1.0


# ----------------------------------------------------------------------------- library = CLI


def test_readme_library_example_runs_as_written_and_matches_the_cli(tmp_path, monkeypatch):
    """The README's "As a library" block, executed as it stands against a run under runs/, writes
    what `eqmctl sample` writes with the options its comment names (recipe guidance included)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## As a library", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    save_run(tmp_path / "runs" / "r1", make_model(), recipe={"name": "t", "sample": {"cfg_scale": 2.0}},
             class_names=["a", "b", "c"])
    exec(compile(block, "README.md", "exec"), {})
    lib = json.loads((tmp_path / "out" / "samples.json").read_text())
    code, _, stderr = run(["sample", "--fps", "60", "-N", "4", "--steps", "20", "--out", "cli"])
    assert code == 0, stderr
    cli = json.loads((tmp_path / "cli" / "samples.json").read_text())
    assert lib == cli
    assert lib["settings"]["cfg_scale"] == 2.0 and [s["label"] for s in lib["samples"]] == [0, 1, 2, 0]
    assert Fraction(lib["fps"]) == 60 and all(len(read_back(tmp_path / "out" / s["file"])[1]) == 4 for s in lib["samples"])


def test_sample_checkpoint_errors_name_parameters_and_write_nothing(tmp_path, ckpt):
    out = tmp_path / "o"
    cases = [
        (dict(num_samples=0), "^num_samples must be an integer >= 1"),
        (dict(batch_size=0), "^batch_size must be >= 1"),
        (dict(fmt="avi"), "^fmt must be one of mp4, mkv, gif"),
        (dict(upscale=0), "^upscale must be an integer between 1 and 64"),
        (dict(labels="7"), "^labels entry 7 is out of range"),
        (dict(frames=2, seconds=1.0), "either frames or seconds"),
        (dict(frames=0), "^frames must be a positive integer"),
    ]
    for kw, msg in cases:
        with pytest.raises(EqmError, match=msg):
            sample_checkpoint(ckpt, fps=24, out_dir=out, **kw)
        assert not out.exists(), kw
    code, _, stderr = run(["sample", "--ckpt", str(ckpt), "--fps", "24", "-N", "0", "--out", str(out)])
    assert code == 2 and "--num-samples must be an integer >= 1" in stderr and not out.exists()


def test_sample_checkpoint_notes_the_ema_fallback(tmp_path):
    ck = C.save_checkpoint(tmp_path / "run", 3, model=make_model(), config=make_model().config, recipe={"name": "t"})
    seen = []
    res = sample_checkpoint(ck, fps=12, frames=2, num_samples=1, settings=SamplerSettings(steps=1),
                            out_dir=tmp_path / "o", on_note=seen.append)
    assert seen == res.notes and len(seen) == 1 and "no EMA weights" in seen[0]
    assert json.loads(res.written.manifest.read_text())["weights"] == "raw"


# ----------------------------------------------------------------------------- windows


def test_window_spans_cover_the_clip_with_half_window_overlaps():
    from eqm.errors import ParamError
    from eqm.generate import window_spans

    assert window_spans(10) == [(0, 10)] and window_spans(10, 10) == [(0, 10)] and window_spans(10, 16) == [(0, 10)]
    spans = window_spans(60, 8)
    assert spans[0] == (0, 8) and spans[-1] == (52, 60)
    assert all(b - a == 8 for a, b in spans)
    assert all(a2 - a1 == 4 for (a1, _), (a2, _) in zip(spans, spans[1:]))
    assert window_spans(11, 8) == [(0, 8), (3, 11)]  # the last window ends at the clip's end
    assert window_spans(12, 4, temporal_patch=2) == [(0, 4), (2, 6), (4, 8), (6, 10), (8, 12)]
    for bad, tp in ((1, 1), (3, 2), (2.5, 1), (True, 1)):
        with pytest.raises(ParamError, match="window"):
            window_spans(20, bad, temporal_patch=tp)


def test_windowed_generation_clamps_each_window_to_the_frames_before(monkeypatch):
    """Every window after the first gets the frames already made as clamped known frames, and the
    clip is exactly what the windows left (no frame regenerated after it was made)."""
    import eqm.sampler as S
    from eqm.generate import generate

    model = make_model()
    calls, real = [], S.sample

    def spy(model_, x, ts, y, settings, *, known=None, known_mask=None, **kw):
        out = real(model_, x, ts, y, settings, known=known, known_mask=known_mask, **kw)
        calls.append((None if known_mask is None else known_mask.clone(), None if known is None else known.clone(), out.x.clone()))
        return out

    monkeypatch.setattr(S, "sample", spy)
    settings = SamplerSettings(steps=3, tol=0.0)
    gen = generate(model, fps=24, num_frames=10, num_samples=2, labels=torch.tensor([0, 1]), settings=settings, window=4)
    assert gen.num_frames == 10 and len(calls) == 4  # windows [0,4) [2,6) [4,8) [6,10)
    assert calls[0][0] is None
    for mask, known, out in calls[1:]:
        assert mask[:, :2].all() and not mask[:, 2:].any()
        assert torch.equal(out[:, :, :2], known[:, :, :2])  # clamped frames come back unchanged
    assert gen.evals.tolist() == [12, 12]  # 3 steps in each of 4 windows
    assert torch.equal(gen.videos[:, :, 8:], calls[-1][2][:, :, 2:].clamp(-1, 1))


def test_cli_window_writes_the_whole_clip_and_records_it(tmp_path, ckpt):
    out = tmp_path / "out"
    code, stdout, stderr = run(["sample", "--ckpt", str(ckpt), "--fps", "30", "--frames", "9", "-N", "1",
                                "--steps", "2", "--window", "4", "--out", str(out), "--json"])
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["window"] == 4 and doc["num_frames"] == 9
    assert len(read_back(out / doc["samples"][0]["file"])[1]) == 9
    code, _, stderr = run(["sample", "--ckpt", str(ckpt), "--fps", "30", "--frames", "9", "--window", "1",
                           "--out", str(tmp_path / "bad")])
    assert code == 2 and "window" in stderr and len(stderr.strip().splitlines()) == 1


def test_the_cli_progress_bar_takes_updates_and_can_be_off(monkeypatch):
    import io

    from rich.console import Console

    import eqmctl.common as common

    stream = io.StringIO()
    monkeypatch.setattr(common, "err_console", Console(file=stream, force_terminal=True, width=80))
    with common.progress_bar("sampling", 3) as update:
        update(1)
        update(2, 5)  # a total given with the update replaces the first one
    assert "2/5" in stream.getvalue()
    with common.progress_bar("sampling", 3, enabled=False) as update:
        assert update is None
