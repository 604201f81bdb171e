"""Smoke check of benchmarks/bench_demo.py on a briefly trained demo-recipe model: the quality
table (coherence, direction, speed), the sampler levers and the frame strip all run through the
real sampling and tracking code.  No quality is asserted: the model is untrained (docs/demo.md
has the measured figures)."""

from bench_import import REPO, load_benchmark


def test_bench_demo_runs_on_a_demo_checkpoint(tmp_path, capsys):
    from eqm.recipe import load_recipe
    from eqm.train import train

    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [
        "train.steps=2", "train.batch_size=2", "train.warmup_steps=0", "train.log_every=1",
        "train.mixed_precision=no", "model.depth=1", "data.synthetic.length=8",
    ])
    run = tmp_path / "run"
    train(recipe, run_dir=run)
    strip = tmp_path / "strip.png"
    code = load_benchmark("bench_demo").main(["--ckpt", str(run), "--per-class", "1", "--rates", "6,60", "--seconds", "0.5",
                              "--steps", "2", "--levers", "--lever-clips", "1", "--strip", str(strip)])
    assert code == 0
    out = capsys.readouterr().out
    assert "coherent frames" in out and "direction" in out and "speed error" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["6"], ["60"])]
    assert [r[:2] for r in rows[:2]] == [["6", "3"], ["60", "30"]]  # 0.5 s at each rate
    assert "the demo's" in out  # the lever table
    assert strip.stat().st_size > 100
