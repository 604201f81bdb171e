"""What `make demo` shows, measured: one coherent disc per frame, and the right speed at every rate.

For a trained synthetic-source model (default: the latest run under runs/, as `make demo` leaves
it), clips of every class are generated the way the demo generates them (``--seconds`` long, the
demo's sampler settings) at each rate of ``--rates``, and for each rate the benchmark prints

* **coherent frames**: the share of frames that hold exactly ONE connected shape (8-connected
  pixels above mid-grey) whose area is within 50 % of the training disc's (pi r^2), and the share
  of clips in which every frame does (eqm.data.speed.coherent_frames);
* **direction**: the share of clips whose tracked velocity is within 45 degrees of their class's
  direction (a model that ignores its label moves each clip wherever its noise leads);
* **speed error**: the median | |v_hat| - |v| | / |v| of the tracked disc against its class's
  true speed (eqm.data.speed.estimate_velocities), and the median ratio |v_hat| / |v|.

``--levers`` then times sampling 16 clips of ``--seconds`` at 60 fps side by side under each
sampler setting the demo could use (fp32 vs bf16 autocast, guidance every step vs every 2nd,
40 vs 20 steps, and the demo's own combination), each with its coherence and 60 fps speed error,
as ratios to the first (the `eqmctl sample` defaults).  ``--train-levers`` times training steps
of the checkpoint's recipe in fp32, under bf16 autocast, and under torch.compile (warm-up counted
separately).  ``--strip PATH.png`` writes one clip per class of the demo's 60 fps result as a
frame strip.  Numbers on a shared CPU are noisy: read the ratios of one run.

    python benchmarks/bench_demo.py                                # the latest run, the demo's settings
    python benchmarks/bench_demo.py --ckpt runs/demo-<stamp> --levers --train-levers --strip docs/demo-strip.png
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The sampler settings `make demo` samples with (Makefile DEMO_SAMPLE); --dtype, --cfg-every,
#: --steps, --step-size and --tol override them.
DEMO_SAMPLER = dict(dtype="fp32", cfg_every=2, steps=20, step_size=0.05, tol=0.0, window=None)
#: `eqmctl sample`'s own defaults, the baseline of --levers.
CLI_SAMPLER = dict(dtype="fp32", cfg_every=1, steps=40, step_size=0.03, tol=0.01, window=None)


def lever_settings() -> list:
    """(name, sampler kwargs) compared by --levers, the CLI defaults first (the ratios' base)."""
    return [
        ("eqmctl sample defaults (fp32, 40 steps, guidance every step)", dict(CLI_SAMPLER)),
        ("bf16 autocast", dict(CLI_SAMPLER, dtype="bf16")),
        ("guidance pass every 2nd step", dict(CLI_SAMPLER, cfg_every=2)),
        ("20 steps at step size 0.05", dict(CLI_SAMPLER, steps=20, step_size=0.05)),
        ("the demo's (guidance every 2nd step, 20 steps of 0.05)", dict(DEMO_SAMPLER)),
        ("the demo's + bf16 autocast", dict(DEMO_SAMPLER, dtype="bf16")),
        ("the demo's + 8-frame windows (--window 8)", dict(DEMO_SAMPLER, window=8)),
    ]


def load(ckpt):
    """(model, recipe, SyntheticMotion) of a checkpoint trained on the synthetic source."""
    from eqm.checkpoint import load_model
    from eqm.recipe import recipe_from_dict
    from eqm.latent import recipe_dataset

    model, state = load_model(ckpt, use_ema=True)
    recipe = recipe_from_dict(state["recipe"], where=str(state["checkpoint"]))
    motion = getattr(recipe_dataset(recipe), "motion", None)
    if motion is None:
        raise SystemExit(f"{state['checkpoint']}: this benchmark needs a model trained on data.source=synthetic")
    return model, recipe, motion, state


def run(model, recipe, motion, rate, *, seconds: float, per_class: int, seed: int, sampler: dict, frames=None):
    """Generate per_class clips of every class at `rate`; returns (Generation, seconds taken)."""
    import torch

    from eqm.generate import generate, resolve_num_frames

    C = motion.num_classes
    labels = torch.arange(C * per_class) % C
    frames = frames or resolve_num_frames(rate, seconds=seconds)
    t0 = time.perf_counter()
    from eqm.config import SamplerSettings

    options = dict(sampler)
    dtype, window = options.pop("dtype"), options.pop("window")
    settings = SamplerSettings(recipe.sample.method, cfg_scale=recipe.sample.cfg_scale, **options)
    gen = generate(model, fps=rate, num_frames=frames, num_samples=len(labels), labels=labels, seed=seed,
                   settings=settings, dtype=dtype, window=window)
    return gen, time.perf_counter() - t0


def score(gen, motion) -> dict:
    """Coherence and speed figures of generated clips (see the module docstring)."""
    import torch

    from eqm.data.speed import along, coherent_frames, estimate_velocities

    ok = coherent_frames(gen.videos, math.pi * motion.radius ** 2)
    vel = estimate_velocities(gen.videos, gen.timestamps)
    ratios = [float(torch.linalg.vector_norm(vel[i])) / motion.speed(int(k)) for i, k in enumerate(gen.labels)]
    found = [r for r in ratios if math.isfinite(r)]
    heading = along(vel.numpy(), [motion.velocity(int(k)) for k in gen.labels])  # within 45 degrees of the class's
    return {
        "coherent_frames": float(ok.float().mean()),
        "coherent_clips": float(ok.all(dim=1).float().mean()),
        "speed_error": statistics.median(abs(r - 1) for r in found) if found else float("nan"),
        "speed_ratio": statistics.median(found) if found else float("nan"),
        "direction": float(heading.mean()),
        "evals": float(gen.evals.float().mean()),
    }


def quality(model, recipe, motion, rates, args) -> None:
    from eqm.timebase import format_fps

    length = f"{args.frames} frames" if args.frames else f"{args.seconds:g} s"
    print(f"demo samples: {args.per_class} clips per class, {length} each, sampler {args.sampler}")
    print(f"{'fps':>6}  {'frames':>6}  {'coherent frames':>15}  {'coherent clips':>14}  {'direction':>9}  "
          f"{'speed error':>11}  {'ratio':>6}  {'time':>7}")
    for rate in rates:
        gen, secs = run(model, recipe, motion, rate, seconds=args.seconds, per_class=args.per_class,
                        seed=args.seed, sampler=args.sampler, frames=args.frames)
        s = score(gen, motion)
        print(f"{format_fps(rate).split(' ')[0]:>6}  {gen.num_frames:>6}  {s['coherent_frames'] * 100:>14.1f}%  "
              f"{s['coherent_clips'] * 100:>13.1f}%  {s['direction'] * 100:>8.1f}%  {s['speed_error'] * 100:>10.1f}%  "
              f"{s['speed_ratio']:>5.2f}x  {secs:>6.1f}s",
              flush=True)
        if args.strip and float(rate) == 60:
            write_strip(gen, motion, args.strip)


def write_strip(gen, motion, path) -> None:
    """One clip per class (the first of each), every 6th frame, 4x enlarged, as one PNG."""
    from eqm.generate import upscale
    from eqm.video.io import write_grid_png

    first = [int((gen.labels == k).nonzero()[0]) for k in range(motion.num_classes)]
    clips = upscale(gen.videos[first][:, :, ::6], 4)
    print(f"frame strip: {write_grid_png(path, clips)} (rows: {', '.join(motion.class_names)}; every 6th frame)")


def levers(model, recipe, motion, args) -> None:
    from fractions import Fraction

    per_class = max(1, args.lever_clips // motion.num_classes)
    length = f"{args.frames} frames" if args.frames else f"{args.seconds:g} s"
    print(f"\nsampling levers: {per_class * motion.num_classes} clips, {length} at 60 fps, side by side")
    print(f"{'setting':<62}  {'time':>7}  {'speedup':>7}  {'evals':>5}  {'coherent':>8}  {'60 fps error':>12}")
    base = None
    for name, sampler in lever_settings():
        gen, secs = run(model, recipe, motion, Fraction(60), seconds=args.seconds, per_class=per_class,
                        seed=args.seed, sampler=sampler, frames=args.frames)
        s = score(gen, motion)
        base = base or secs
        print(f"{name:<62}  {secs:>6.1f}s  {base / secs:>6.2f}x  {s['evals']:>5.1f}  "
              f"{s['coherent_frames'] * 100:>7.1f}%  {s['speed_error'] * 100:>11.1f}%", flush=True)


def training_step(model, batch: dict, lr: float, bf16: bool, forward=None):
    """A function running one training step (EqM loss, backward, AdamW) on a fixed batch;
    ``forward``: what computes the loss (e.g. torch.compile(model)), default the model."""
    import torch

    from eqm.objective import eqm_loss

    x, ts, y = batch["video"], batch["timestamps"].float(), batch["label"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    fwd = model if forward is None else forward  # not `or`: a compiled module has no truth value

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = eqm_loss(fwd, x, ts, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def recipe_batch(recipe) -> tuple:
    """(dataset, one collated batch of train.batch_size clips) of a recipe's training data."""
    import torch

    from eqm.latent import recipe_dataset

    ds = recipe_dataset(recipe)
    return ds, torch.utils.data.default_collate([ds[i] for i in range(recipe.train.batch_size)])


def train_levers(recipe, args) -> None:
    """Seconds per training step (loss, backward, AdamW) of the recipe's model and batch size."""
    import torch

    from eqm.train import build_model

    ds, batch = recipe_batch(recipe)
    x = batch["video"]
    print(f"\ntraining levers: {recipe.name}, batch {recipe.train.batch_size}, {tuple(x.shape[1:])} clips, "
          f"{args.train_iters} steps each after warm-up")
    rows = []
    for name, bf16, compiled in (("fp32", False, False), ("bf16 autocast", True, False), ("torch.compile fp32", False, True)):
        model = build_model(recipe, int(ds.num_classes)).train()
        step = training_step(model, batch, recipe.train.lr, bf16, torch.compile(model) if compiled else None)
        t0 = time.perf_counter()
        step()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.train_iters):
            step()
        rows.append((name, warm, (time.perf_counter() - t0) / args.train_iters))
    for name, warm, per in rows:
        print(f"  {name:<20} {per:.3f} s/step  ({rows[0][2] / per:.2f}x fp32)  first step {warm:.1f} s")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="run or checkpoint directory (default: the latest run under --runs-root)")
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--rates", default="6,24,60")
    p.add_argument("--seconds", type=float, default=1.0, help="clip length, as `make demo` samples (--seconds 1)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip at every rate instead of --seconds")
    p.add_argument("--per-class", type=int, default=4, help="clips per class and rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=DEMO_SAMPLER["dtype"])
    p.add_argument("--cfg-every", type=int, default=DEMO_SAMPLER["cfg_every"])
    p.add_argument("--steps", type=int, default=DEMO_SAMPLER["steps"])
    p.add_argument("--step-size", type=float, default=DEMO_SAMPLER["step_size"])
    p.add_argument("--tol", type=float, default=DEMO_SAMPLER["tol"])
    p.add_argument("--window", type=int, default=DEMO_SAMPLER["window"],
                   help="frames per model call (eqmctl sample --window); 0 = the whole clip in one call")
    p.add_argument("--levers", action="store_true", help="also time the sampler levers side by side")
    p.add_argument("--lever-clips", type=int, default=16)
    p.add_argument("--train-levers", action="store_true", help="also time training steps: fp32, bf16, compile")
    p.add_argument("--train-iters", type=int, default=10)
    p.add_argument("--strip", type=Path, default=None, help="write a frame strip of the 60 fps clips (PNG)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.sampler = dict(dtype=args.dtype, cfg_every=args.cfg_every, steps=args.steps, step_size=args.step_size, tol=args.tol,
                        window=args.window or None)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from eqm.checkpoint import resolve_checkpoint
    from eqm.errors import EqmError
    from eqm.timebase import parse_fps

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rates = [parse_fps(r.strip(), name="--rates") for r in args.rates.split(",") if r.strip()]
        ckpt = resolve_checkpoint(args.ckpt, args.runs_root)
        model, recipe, motion, state = load(ckpt)
    except EqmError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"checkpoint {ckpt} (step {state.get('step')}), {torch.get_num_threads()} threads, "
          f"guidance {recipe.sample.cfg_scale:g}, disc radius {motion.radius:g} px, {motion.speed(0):g} px/s")
    quality(model, recipe, motion, rates, args)
    if args.levers:
        levers(model, recipe, motion, args)
    if args.train_levers:
        train_levers(recipe, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
