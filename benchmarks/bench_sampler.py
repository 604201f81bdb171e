"""Sampler step sizes on a toy: distance to the data after N steps, per method and step size.

Trains the tiny model of tests/test_sampler.py (hidden 64, depth 2, patch 4) with the EqM loss on
four fixed 3x4x8x8 clips in [-0.8, 0.8] (AdamW, batch 32, --train-steps steps), then samples
--samples clips from the same noise with GD and NAG-GD at several step sizes and step counts and
prints, side by side, the mean RMS distance of a sample to its nearest data clip (noise and the
fully converged distance are printed for scale), plus the evaluations the adaptive stop uses.
docs/sampler.md quotes its output. CPU, a minute or two with the defaults.

    python benchmarks/bench_sampler.py [--train-steps 3000] [--samples 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch

#: (method, step size, momentum, step counts to report)
SWEEP = [
    ("gd", 0.003, 0.0, (40, 100, 250)),
    ("gd", 0.02, 0.0, (10, 20, 30, 40)),
    ("gd", 0.03, 0.0, (10, 15, 20, 25, 40)),
    ("gd", 0.05, 0.0, (10, 15, 40)),
    ("gd", 0.08, 0.0, (10, 40)),
    ("nag", 0.02, 0.3, (10, 15, 20, 30)),
    ("nag", 0.03, 0.3, (10, 20, 25)),
    ("nag", 0.08, 0.3, (10, 40)),
]


def toy_clips(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, 3, 4, 8, 8, generator=g) * 1.6 - 0.8


def nearest_rms(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    return (x[:, None] - data[None]).pow(2).flatten(2).mean(-1).sqrt().min(1).values


def train_toy(data: torch.Tensor, steps: int, seed: int):
    from eqm.config import EqMConfig
    from eqm.model import EqMTransformer
    from eqm.objective import eqm_loss
    from eqm.timebase import uniform_timestamps

    torch.manual_seed(seed)
    model = EqMTransformer(EqMConfig(input_size=8, in_channels=3, num_frames=4, patch_size=4, hidden_size=64, depth=2,
                           num_heads=4, num_classes=0, class_dropout_prob=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    ts = uniform_timestamps(4, 24).expand(32, -1)
    for _ in range(steps):
        loss, _ = eqm_loss(model, data[torch.randint(0, len(data), (32,), generator=g)], ts, None, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-steps", type=int, default=3000, help="EqM training steps of the toy model (default 3000)")
    ap.add_argument("--samples", type=int, default=64, help="samples per setting, all from the same noise (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from eqm.config import SamplerSettings
    from eqm.sampler import sample
    from eqm.timebase import uniform_timestamps

    data = toy_clips(args.seed)
    t0 = time.perf_counter()
    model = train_toy(data, args.train_steps, args.seed)
    print(f"trained {args.train_steps} steps in {time.perf_counter() - t0:.0f} s")
    noise = torch.randn(args.samples, 3, 4, 8, 8, generator=torch.Generator().manual_seed(args.seed + 1))
    ts = uniform_timestamps(4, 24)
    dist = lambda out: float(nearest_rms(out.x, data).mean())  # noqa: E731
    run = lambda method, n, eta, mu, tol=0.0: sample(  # noqa: E731  (tol 0: every step runs)
        model, noise, ts, settings=SamplerSettings(method, steps=n, step_size=eta, momentum=mu, tol=tol))
    converged = dist(run("gd", 250, 0.03, 0.0))
    print(f"mean RMS distance to the nearest data clip: noise {float(nearest_rms(noise, data).mean()):.3f}, "
          f"converged (GD eta 0.03, 250 steps) {converged:.3f}")
    print(f"{'sampler':<22} distance after N steps (final gradient RMS, mean)")
    for method, eta, mu, counts in SWEEP:
        cells = []
        for n in counts:
            out = run(method, n, eta, mu)
            cells.append(f"{n}: {dist(out):.3f} ({float(out.final_rms.mean()):.2f})")
        label = f"{method} eta {eta:g}" + (f" mu {mu:g}" if mu else "")
        print(f"{label:<22} " + "   ".join(cells))
    print("adaptive stop (cap 200 steps): evaluations per sample, mean (max), and distance")
    for method, eta, mu in (("gd", 0.03, 0.0), ("nag", 0.02, 0.3)):
        for tol in (0.01, 0.1):
            out = run(method, 200, eta, mu, tol)
            print(f"  {method} eta {eta:g} tol {tol:g}: {float(out.evals.float().mean()):.1f} ({int(out.evals.max())}), "
                  f"distance {dist(out):.3f}")


if __name__ == "__main__":
    main()
