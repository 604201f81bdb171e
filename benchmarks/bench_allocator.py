"""The CPU allocator setting (eqm.allocator.keep_freed_memory), measured side by side.

Each measurement runs in a fresh Python process, since the setting is process-wide and cannot
be undone: glibc's default malloc, then with freed memory kept, alternating, `--repeats` times
each. Timed: training steps of a recipe's model and batch (loss, backward, AdamW, under the
recipe's mixed precision as `eqmctl train` resolves it), and sampling clips at 60 fps with the
demo's sampler settings from an untrained model (the work does not depend on the weights).
Printed: seconds per step or per sampling call, the minor page faults of the timed part, and
the ratio of the default's time to the setting's.

    python benchmarks/bench_allocator.py                       # the demo recipe, about a minute
    python benchmarks/bench_allocator.py --recipe recipes/tiny-synthetic.yaml --steps 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _worker(recipe_path: str, kind: str, keep: bool, steps: int) -> dict:
    import resource

    import torch
    from bench_demo import recipe_batch, training_step  # a sibling script: benchmarks/ is sys.path[0]

    from eqm.allocator import keep_freed_memory
    from eqm.recipe import load_recipe
    from eqm.train import build_model, resolve_mixed_precision

    applied = keep_freed_memory() if keep else False
    recipe = load_recipe(recipe_path)
    ds, batch = recipe_batch(recipe)
    model = build_model(recipe, int(ds.num_classes))
    bf16 = resolve_mixed_precision(recipe.train.mixed_precision, cuda=False) == "bf16"
    if kind == "train":
        once = training_step(model.train(), batch, recipe.train.lr, bf16)
    else:
        from eqm.config import SamplerSettings
        from eqm.generate import generate

        settings = SamplerSettings(steps=20, step_size=0.05, cfg_scale=2.0, cfg_every=2, tol=0.0)
        labels = torch.arange(4) % max(1, model.config.num_classes)

        def once():
            generate(model.eval(), fps=60, num_frames=60, num_samples=4, labels=labels, settings=settings)
    once()  # warm-up
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(steps):
        once()
    per = (time.perf_counter() - t0) / steps
    return {"per": per, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps, "applied": applied}


def _measure(recipe: str, kind: str, keep: bool, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--recipe", recipe, "--steps", str(steps)] + (["--keep"] if keep else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/demo.yaml")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per process")
    p.add_argument("--sample-calls", type=int, default=2, help="timed sampling calls (4 clips, 1 s at 60 fps) per process")
    p.add_argument("--repeats", type=int, default=2, help="processes per setting and kind, alternating")
    p.add_argument("--worker", choices=("train", "sample"), help=argparse.SUPPRESS)
    p.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.recipe, args.worker, args.keep, args.steps)))
        return 0
    print(f"{args.recipe}: glibc malloc's defaults against eqm.allocator.keep_freed_memory(), "
          f"{args.repeats} fresh processes each, alternating")
    print("| work | default | freed memory kept | speed-up | minor faults per step, default / kept |")
    print("|---|---:|---:|---:|---:|")
    for kind, steps in (("train", args.steps), ("sample", args.sample_calls)):
        rows = {False: [], True: []}
        for _ in range(args.repeats):
            for keep in (False, True):
                rows[keep].append(_measure(args.recipe, kind, keep, steps))
        if not all(r["applied"] for r in rows[True]):
            print(f"| {kind} | not glibc here: the setting does not apply | | | |")
            continue
        base, kept = (statistics.median(r["per"] for r in rows[k]) for k in (False, True))
        fb, fk = (statistics.median(r["faults"] for r in rows[k]) for k in (False, True))
        what = "training step" if kind == "train" else "sampling 4 clips, 1 s at 60 fps"
        print(f"| {what} | {base:.3f} s | {kept:.3f} s | {base / kept:.2f}x | {fb:,.0f} / {fk:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
