"""Training from a latent cache vs encoding on the fly, and cache throughput, measured side by side.

The same synthetic clips, model and VAE in three runs, all through the library (eqm.cache,
eqm.train), each in its own temporary folder:

1. ``cache``: ``build_cache`` encodes ``--clips`` clips; reported as clips/s (read + encode +
   write, this process).
2. ``train from cache``: ``--steps`` optimizer steps with ``data.source: latents``.
3. ``train on the fly``: the same steps with ``vae.path`` and the pixel source, each batch
   rendered and encoded in the training loop.

Printed: samples/s of both training runs (median of the per-step rates in metrics.jsonl, first
two steps dropped as warm-up), their ratio, and the cache's clips/s. The VAE is built from the
diffusers classes with random weights (throughput does not depend on the weights) and saved
and loaded like a downloaded one: ``tiny`` (a few thousand parameters; the CPU default),
``sd`` (the architecture of stabilityai/sd-vae-ft-ema), ``wan-tiny`` and ``wan`` (the Wan2.1
VAE's; both need --frames 4k+1). Runs on the GPU when there is one. Compare numbers from one
invocation: a shared CPU is noisy.

    python benchmarks/bench_latent.py
    python benchmarks/bench_latent.py --vae sd --height 256 --frames 16 --clips 256 --steps 50 --batch 8 --model B
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from eqm.cache import build_cache
from eqm.recipe import load_recipe
from eqm.train import train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny-synthetic.yaml"


def save_vae(kind: str, folder: Path) -> Path:
    """A VAE of the named architecture with random weights, saved like a downloaded one."""
    from diffusers import AutoencoderKL, AutoencoderKLWan

    torch.manual_seed(0)
    if kind in ("tiny", "sd"):
        width, layers, groups = ((8, 8, 8, 8), 1, 4) if kind == "tiny" else ((128, 256, 512, 512), 2, 32)
        AutoencoderKL(block_out_channels=width, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=layers, latent_channels=4,
                      norm_num_groups=groups, sample_size=256).save_pretrained(folder)
    elif kind == "wan-tiny":
        AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                         latents_mean=[0.0] * 4, latents_std=[1.0] * 4).save_pretrained(folder)
    else:
        AutoencoderKLWan().save_pretrained(folder)
    return folder


def step_rate(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if r["step"] > 2] or [rows[-1]["samples_per_s"]]
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae", choices=("tiny", "sd", "wan-tiny", "wan"), default="tiny")
    ap.add_argument("--height", type=int, default=64, help="frame height and width in pixels")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--clips", type=int, default=64, help="clips in the dataset (all cached)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--model", default="tiny", help="model.size (tiny, mini, S, B, L, XL)")
    args = ap.parse_args()

    quiet = lambda _line: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae = save_vae(args.vae, tmp / "vae")
        common = [f"data.height={args.height}", f"data.width={args.height}", f"data.num_frames={args.frames}",
                  f"data.synthetic.length={args.clips}", f"vae.path={vae}", f"vae.batch_size={args.batch}",
                  f"model.size={args.model}", "model.patch_size=2", f"train.batch_size={args.batch}",
                  f"train.steps={args.steps}", "train.log_every=1", "train.preview_every=0",
                  f"train.ckpt_every={args.steps}", "train.warmup_steps=0"]
        cached = build_cache(load_recipe(TINY, common), tmp / "cache", log=quiet)
        train(load_recipe(TINY, common + ["data.source=latents", f"data.latents={tmp / 'cache'}"]),
              tmp / "from-cache", log=quiet, warn=quiet)
        train(load_recipe(TINY, common), tmp / "on-the-fly", log=quiet, warn=quiet)
        from_cache, on_the_fly = step_rate(tmp / "from-cache"), step_rate(tmp / "on-the-fly")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"VAE {args.vae}, {args.clips} clips of {args.frames} x {args.height} x {args.height}, model {args.model}, "
          f"batch {args.batch}, {args.steps} steps, {device}")
    print(f"cache:            {cached.clips_per_s:8.1f} clips/s ({cached.num_clips} clips)")
    print(f"train from cache: {from_cache:8.1f} samples/s")
    print(f"train on the fly: {on_the_fly:8.1f} samples/s")
    print(f"ratio cache / on the fly: {from_cache / on_the_fly:.2f}x")


if __name__ == "__main__":
    main()
