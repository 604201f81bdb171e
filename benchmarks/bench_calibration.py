"""Motion-speed calibration: does generated motion play at the right speed at every requested
frame rate?  (docs/reference.md#measuring-the-claim; results in docs/calibration.md)

Three models with the same size, data, steps and seed are trained on the synthetic moving-disc
source at mixed rates (the recipe's fps range, 8-30 fps for tiny-synthetic):

* ``seconds``   tau = t * ref_fps from real timestamps (the product);
* ``index``     tau = frame index (the time-blind baseline);
* ``fps-embed`` index positions plus a learned embedding of the clip's fps (the ablation).

Each model then samples clips of every class at rates inside and outside the training range
(6, 12, 24, 48, 60 fps by default); the disc is tracked in every clip (intensity-weighted
centroid per frame, least-squares slope against the frames' timestamps, eqm.data.speed) and
compared with its class's true speed in pixels per second.  Printed: the median relative speed
error |v_hat - v| / v and the median speed ratio v_hat / v per rate and mode, plus the same
measurement on real synthetic clips (the estimator's own floor).  A time-blind model keeps pixels
per frame constant, so its ratio follows fps / (the rate it learned): too slow below the training
rates, too fast above.  Written to --out: results.json, calibration.png and the three run
directories (checkpoints included, so `eqmctl sample` can be pointed at them).

    python benchmarks/bench_calibration.py                   # CPU: the recipe's 1200 steps per mode
    python benchmarks/bench_calibration.py --long            # longer training, more samples
    python benchmarks/bench_calibration.py --steps 200 --samples 2 --modes seconds,index   # quick look

The test suite runs a miniature of this pipeline (tests/test_calibration.py) as a smoke check.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "tiny-synthetic.yaml"
MODES = ("seconds", "index", "fps-embed")


def parse_rates(text: str) -> list:
    from eqm.timebase import parse_fps

    return [parse_fps(r.strip(), name="--rates") for r in text.split(",") if r.strip()]


def train_mode(recipe_path: Path, mode: str, out: Path, overrides: Sequence[str], *, log=None, resume: bool = True):
    """Train (or reuse) the run of one time mode; returns its run directory."""
    from eqm.checkpoint import latest_checkpoint, load_state
    from eqm.recipe import load_recipe
    from eqm.train import train

    recipe = load_recipe(recipe_path, list(overrides) + [f"model.time.mode={mode}", f"name=calib-{mode}"])
    run_dir = out / mode
    ck = latest_checkpoint(run_dir)
    if ck is not None and resume:
        state = load_state(ck)
        if state["step"] >= recipe.train.steps and _training_part(state.get("recipe")) == _training_part(recipe.to_dict()):
            return run_dir, recipe, 0.0  # already trained with exactly this recipe (sampling settings aside)
    t0 = time.time()
    train(recipe, run_dir, resume=str(ck) if ck is not None and resume else None, log=log or (lambda _l: None))
    return run_dir, recipe, time.time() - t0


def _training_part(recipe: Optional[dict]) -> Optional[dict]:
    """A recipe without its ``sample`` section: how a run samples does not change what it trained."""
    return None if recipe is None else {k: v for k, v in recipe.items() if k != "sample"}


def motion_of(recipe):
    """The SyntheticMotion the recipe's dataset renders (same speeds, radius and frame size)."""
    from eqm.latent import recipe_dataset

    ds = recipe_dataset(recipe)
    motion = getattr(ds, "motion", None)
    if motion is None:
        raise SystemExit(f"recipe {recipe.name}: calibration needs data.source=synthetic")
    return motion


def clip_frames(recipe, rates) -> int:
    """One frame count for every rate and mode: the training clip length, or fewer if the clip at the
    lowest rate would otherwise reach past the longest training clip in seconds (past it the motion
    stalls and the table would measure extrapolation in time, not in rate)."""
    return min(rate_frames(recipe, rates).values())


def rate_frames(recipe, rates) -> dict:
    """Frames per rate as `eqmctl sample` picks them by default (eqm.generate.plan_frames): the
    training clip length, shortened only at rates where it would reach past the trained seconds."""
    from eqm.generate import TrainedSpan

    span = TrainedSpan(mode="seconds", ref_fps=1.0, num_frames=recipe.data.num_frames,
                       fps_min=recipe.data.fps_min, shift=recipe.train.time_shift)
    return {r: span.frames_within(r, recipe.data.num_frames) for r in rates}


def measure(model, motion, rate, *, frames: int, per_class: int, seed: int, sampler, batch_size: Optional[int]):
    """Generate per_class clips of every class at `rate`; return per-sample rows."""
    import torch

    from eqm.data.speed import estimate_velocities
    from eqm.generate import generate

    C = motion.num_classes
    labels = torch.arange(C * per_class) % C
    gen = generate(model, fps=rate, num_frames=frames, num_samples=len(labels), labels=labels, seed=seed,
                   batch_size=batch_size, settings=sampler)
    vel = estimate_velocities(gen.videos, gen.timestamps)
    rows = []
    for i, k in enumerate(labels.tolist()):
        true = motion.speed(k)
        est = float(torch.linalg.vector_norm(vel[i]))
        rows.append({"label": k, "true": true, "est": est, "ratio": est / true, "evals": int(gen.evals[i])})
    return rows


def measure_data(motion, rate, *, frames: int, per_class: int, seed: int):
    """The estimator on real synthetic clips at `rate` (random starts): its error floor."""
    import numpy as np
    import torch

    from eqm.data.speed import estimate_velocities
    from eqm.timebase import uniform_timestamps

    C = motion.num_classes
    labels = [k % C for k in range(C * per_class)]
    ts = uniform_timestamps(frames, rate).double()
    rng = np.random.default_rng(seed)
    dur = float(ts[-1])
    starts = [motion.random_start(k, rng, duration=dur) if motion.fits(k, dur) else None for k in labels]
    if any(s is None for s in starts):
        return None  # the path does not fit in the frame at this rate and length
    clips = motion.render_batch(labels, ts.numpy(), starts)
    vel = estimate_velocities(clips, ts)
    return [{"label": k, "true": motion.speed(k), "est": float(torch.linalg.vector_norm(vel[i])),
             "ratio": float(torch.linalg.vector_norm(vel[i])) / motion.speed(k)} for i, k in enumerate(labels)]


def summarize(rows):
    import statistics

    ratios = [r["ratio"] for r in rows if math.isfinite(r["ratio"])]
    if not ratios:
        return {"n": len(rows), "found": 0, "median_error": float("nan"), "median_ratio": float("nan"),
                "mean_error": float("nan")}
    errs = [abs(x - 1.0) for x in ratios]
    return {
        "n": len(rows), "found": len(ratios),
        "median_error": statistics.median(errs), "mean_error": statistics.fmean(errs),
        "median_ratio": statistics.median(ratios),
    }


def markdown_table(results: dict, rates, cols, train_range) -> str:
    """The printed table as Markdown (for docs/calibration.md)."""
    from eqm.timebase import format_fps

    names = {"data": "estimator on real clips"}
    lines = ["| fps | " + " | ".join(names.get(c, c) for c in cols) + " |", "|---:|" + "---:|" * len(cols)]
    for r in rates:
        cells = []
        for c in cols:
            s = results[c].get(str(r))
            cells.append("n/a" if not s else f"{s['median_error'] * 100:.1f} % ({s['median_ratio']:.2f}x)")
        inside = train_range[0] <= float(r) <= train_range[1]
        lines.append(f"| {format_fps(r).split(' ')[0]}{' (train)' if inside else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, rates, train_range, path: Path) -> None:
    """Two panels: median speed ratio v_hat / v (log scale, 1 = right speed, band = +-10 %) and
    median relative speed error, per requested rate and mode."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(10, 4.2), dpi=110)
    xs = [float(r) for r in rates]
    styles = {"seconds": ("C0", "o"), "index": ("C3", "s"), "fps-embed": ("C2", "^"), "data": ("0.4", "x")}
    for i, (key, label) in enumerate((("median_ratio", "median speed ratio  v_hat / v"),
                                       ("median_error", "median relative speed error (%)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.axvspan(train_range[0], train_range[1], color="0.92", label="training rates")
        for mode, per_rate in results.items():
            scale = 100.0 if key == "median_error" else 1.0
            ys = [per_rate[str(r)][key] * scale if per_rate.get(str(r)) else float("nan") for r in rates]
            color, marker = styles.get(mode, ("k", "."))
            ax.plot(xs, ys, marker=marker, color=color, label=mode if mode != "data" else "estimator on real clips")
        if key == "median_ratio":
            ax.set_yscale("log")
            ax.axhspan(0.9, 1.1, color="C0", alpha=0.12, label="within 10 %")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_yticks([0.25, 0.5, 1, 2, 4])
            ax.set_yticklabels(["0.25", "0.5", "1", "2", "4"])
        else:
            ax.axhline(10, color="k", lw=0.8, ls="--", label="10 % target")
            ax.set_ylim(bottom=0)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
        ax.set_xlabel("requested frame rate (fps)")
        ax.set_ylabel(label)
        if i == 0:
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Generated motion speed vs requested frame rate (synthetic discs, same data/steps per mode)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rates", default="6,12,24,48,60", help="sampling rates (fps)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: the recipe's)")
    p.add_argument("--samples", type=int, default=8, help="generated clips per class and rate")
    p.add_argument("--frames", type=int, default=None, help="frames per generated clip (default: the training clip length, shortened so that "
                   "the clip at the lowest rate stays within the seconds the models were trained on)")
    p.add_argument("--frames-per-rate", action="store_true",
                   help="each rate gets the clip `eqmctl sample` makes by default: the training clip length, shortened "
                        "only at rates where it would reach past the trained seconds (instead of one count for all rates)")
    p.add_argument("--sampler", default="gd")
    p.add_argument("--sample-steps", type=int, default=None)
    p.add_argument("--step-size", type=float, default=None)
    p.add_argument("--tol", type=float, default=None)
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance at sampling, 1 = none (default: the recipe's sample.cfg_scale, "
                        "as `eqmctl sample` uses it; the class sets the direction of motion)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--long", action="store_true", help="4x the training steps and 2x the samples")
    p.add_argument("--retrain", action="store_true", help="train again even if --out has finished runs")
    p.add_argument("--out", type=Path, default=Path("runs/calibration"))
    p.add_argument("overrides", nargs="*", help="recipe overrides key.sub=value (applied to all three models)")
    args = p.parse_args(argv)

    import torch

    from eqm.checkpoint import load_model
    from eqm.errors import EqmError
    from eqm.timebase import format_fps

    torch.set_num_threads(max(1, torch.get_num_threads()))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"error: unknown mode {bad[0]!r} (choose from {', '.join(MODES)})", file=sys.stderr)
        return 2
    try:
        rates = parse_rates(args.rates)
        overrides = list(args.overrides) + ["train.preview_every=0"]
        from eqm.recipe import load_recipe

        base = load_recipe(args.recipe, overrides)
        steps = args.steps if args.steps is not None else base.train.steps
        if args.long:
            steps *= 4
            args.samples *= 2
        overrides.append(f"train.steps={steps}")
        overrides.append(f"train.seed={args.seed}")
        base = load_recipe(args.recipe, overrides)
    except EqmError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if args.frames and args.frames_per_rate:
        print("error: --frames and --frames-per-rate exclude each other", file=sys.stderr)
        return 2
    if args.frames_per_rate:
        frames_at = rate_frames(base, rates)
    else:
        frames_at = dict.fromkeys(rates, args.frames or clip_frames(base, rates))
    counts = [frames_at[r] for r in rates]
    frames_text = f"{counts[0] if len(set(counts)) == 1 else '/'.join(map(str, counts))} frames"
    cfg_scale = base.sample.cfg_scale if args.cfg_scale is None else args.cfg_scale
    from eqm.config import SamplerSettings

    sampler = SamplerSettings(method=args.sampler, steps=args.sample_steps, step_size=args.step_size, tol=args.tol, cfg_scale=cfg_scale)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"calibration: {', '.join(modes)}; {steps} steps each on {base.data.source} clips at "
          f"{base.data.fps_min:g}-{base.data.fps_max:g} fps; sampling {frames_text} at "
          f"{', '.join(format_fps(r) for r in rates)} fps, {args.samples} clips per class, guidance {cfg_scale:g}", flush=True)

    motion = motion_of(base)
    results: dict = {"data": {}}
    for r in rates:
        rows = measure_data(motion, r, frames=frames_at[r], per_class=args.samples, seed=args.seed)
        results["data"][str(r)] = None if rows is None else summarize(rows)
    timings = {}
    for mode in modes:
        log = lambda line, m=mode: print(f"  [{m}] {line}", flush=True) if ("step" in line and "/" in line) or line.startswith("done") else None  # noqa: E731
        run_dir, recipe, secs = train_mode(args.recipe, mode, args.out, overrides, log=log, resume=not args.retrain)
        timings[mode] = secs
        model, _ = load_model(run_dir, use_ema=True)
        results[mode] = {}
        t0 = time.time()
        for r in rates:
            rows = measure(model, motion, r, frames=frames_at[r], per_class=args.samples, seed=args.seed,
                           sampler=sampler, batch_size=args.batch_size)
            results[mode][str(r)] = summarize(rows) | {"rows": rows}
        print(f"  [{mode}] trained in {secs:.0f} s, sampled in {time.time() - t0:.0f} s", flush=True)

    # ---- table ------------------------------------------------------------------------------
    cols = ["data"] + modes
    head = f"{'fps':>8} | " + " | ".join(f"{c:>18}" for c in cols)
    print()
    print("median relative speed error (median speed ratio v_hat/v)")
    print(head)
    print("-" * len(head))
    for r in rates:
        cells = []
        for c in cols:
            s = results[c].get(str(r))
            cells.append(f"{'n/a':>18}" if not s else f"{s['median_error'] * 100:7.1f} % ({s['median_ratio']:5.2f}x)")
        inside = base.data.fps_min <= float(r) <= base.data.fps_max
        print(f"{format_fps(r).split(' ')[0]:>7}{'*' if inside else ' '} | " + " | ".join(cells))
    print("* inside the training range")
    worst = {m: max(results[m][str(r)]["median_error"] for r in rates) for m in modes}
    print("worst median error per mode: " + ", ".join(f"{m} {w * 100:.1f} %" for m, w in worst.items()))

    doc = {
        "command": "python benchmarks/bench_calibration.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "recipe": str(args.recipe), "steps": steps, "frames": {str(r): n for r, n in frames_at.items()}, "samples_per_class": args.samples,
        "sampler": sampler.to_dict(),
        "train_fps": [base.data.fps_min, base.data.fps_max], "rates": [str(r) for r in rates],
        "speeds_px_per_s": [motion.speed(k) for k in range(motion.num_classes)],
        "train_seconds": timings, "results": results, "worst_median_error": worst,
    }
    from eqm.jsonio import dumps

    (args.out / "results.json").write_text(dumps(doc, indent=2) + "\n")
    (args.out / "table.md").write_text(markdown_table(results, rates, cols, (base.data.fps_min, base.data.fps_max)))
    plot({k: v for k, v in results.items()}, rates, (base.data.fps_min, base.data.fps_max), args.out / "calibration.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'calibration.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
