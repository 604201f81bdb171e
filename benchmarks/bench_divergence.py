"""How far healthy training strays from the running levels that DivergenceGuard compares against.

Trains short real runs (the synthetic source, the 16x16x4 model of tests/test_train.py) with
metrics every step, replays each step's loss and gradient norm through ``DivergenceGuard`` (the
level before the step, as the guard sees it), and prints the largest ratio value / level over the
run, the way ``train.diverge_loss`` (10) and ``train.diverge_grad_norm`` (100) are applied: the
loss from the second step, the gradient norm after ``train.diverge_warmup`` (50) steps.  The margin
column is default factor / largest healthy ratio.  Then one blow-up: six healthy steps, then
``train.lr=1`` without clipping, and the ratio of the first blown-up loss.  CPU, a few minutes.

    python benchmarks/bench_divergence.py            # batch 1 and 4, 400 steps
    python benchmarks/bench_divergence.py --steps 100
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from eqm.errors import EqmError
from eqm.recipe import load_recipe
from eqm.train import DivergenceGuard, train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny-synthetic.yaml"
FAST = [
    "data.height=16", "data.width=16", "model.patch_size=4", "data.num_frames=4", "model.depth=2",
    "data.synthetic.length=64", "train.log_every=1", "train.warmup_steps=0", "train.preview_every=0",
    "train.lr_schedule=constant", "train.lr=1e-3", "train.ckpt_every=100000",
]


def worst_ratios(rows: list[dict], warmup: int) -> tuple[float, float]:
    """Largest loss / level (from step 2) and gradient norm / level (after warmup) of healthy rows."""
    guard = DivergenceGuard(loss_factor=0, grad_factor=0, warmup=warmup)  # factors 0: measure, never stop
    worst_loss = worst_grad = 0.0
    for row in rows:
        if guard.log_loss is not None:
            worst_loss = max(worst_loss, row["loss"] / math.exp(guard.log_loss))
        if guard.log_grad is not None and guard.steps >= warmup:
            worst_grad = max(worst_grad, row["grad_norm"] / math.exp(guard.log_grad))
        guard.verdict(row["loss"], row["grad_norm"])
    return worst_loss, worst_grad


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batches", default="1,4", help="comma-separated train.batch_size values")
    args = ap.parse_args()
    quiet = lambda _line: None  # noqa: E731
    d = DivergenceGuard()
    print(f"{'run':<18} {'steps':>5} {'max loss/level':>15} {'margin':>7} {'max grad/level':>15} {'margin':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for b in [int(x) for x in args.batches.split(",")]:
            run = Path(tmp) / f"b{b}"
            train(load_recipe(TINY, FAST + [f"train.batch_size={b}", f"train.steps={args.steps}"]), run, log=quiet)
            wl, wg = worst_ratios(metrics(run), d.warmup)
            print(f"{f'healthy batch {b}':<18} {args.steps:>5} {wl:>15.3g} {d.loss_factor / wl:>7.3g} "
                  f"{wg:>15.3g} {d.grad_factor / wg:>7.3g}")
        run = Path(tmp) / "blow-up"
        train(load_recipe(TINY, FAST + ["train.batch_size=4", "train.steps=6"]), run, log=quiet)
        off = ["train.diverge_loss=0", "train.diverge_grad_norm=0"]  # let it run to see the loss
        try:
            train(load_recipe(TINY, FAST + ["train.batch_size=4", "train.steps=9", "train.lr=1", "train.grad_clip=0", *off]),
                  run, resume="latest", log=quiet, warn=quiet)
        except EqmError as e:  # NaN/inf still stops it
            print(f"(the blow-up run ended: {str(e)[:80]}...)")
        rows = metrics(run)
        levels = DivergenceGuard(loss_factor=0, grad_factor=0)
        for row in rows[:6]:
            levels.verdict(row["loss"], row["grad_norm"])
        ratios = [f"{r['loss'] / math.exp(levels.log_loss):.3g}" for r in rows[6:]]
        print(f"{'lr=1 after 6 steps':<18} loss / level at steps 7..: {', '.join(ratios)}  (stops above {d.loss_factor:g})")


if __name__ == "__main__":
    main()
