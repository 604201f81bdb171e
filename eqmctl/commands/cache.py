"""`eqmctl cache RECIPE.yaml --out DIR [key=value ...]`: encode a recipe's clips into a latent cache (eqm.cache)."""

from pathlib import Path
from typing import List, Optional

import typer

from eqmctl.common import err_console, user_errors, warn


def cache(
    recipe: Path = typer.Argument(..., metavar="RECIPE.yaml", show_default=False,
                                  help="Recipe whose data section and vae.path say what to encode."),
    overrides: Optional[List[str]] = typer.Argument(
        None, metavar="[KEY=VALUE]...", show_default=False,
        help="Recipe overrides such as vae.path=models/sd-vae-ft-ema data.clips_per_file=4.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Cache directory (new, or one to resume)."),
    shard_size: int = typer.Option(64, "--shard-size", min=1, help="Clips per shard file."),
) -> None:
    """Encode the recipe's dataset through its VAE into safetensors shards plus an index.

    Each clip is the one training would read (rate drawn per clip, real timestamps, crop); the
    index records per clip the source file, label, effective fps, the real timestamps of the
    source and latent frames and the crop. Several clips per file (data.clips_per_file) keep the
    mix of frame rates. Runs under `accelerate launch` (processes split the shards). Interrupted,
    rerun the same command: finished shards are kept. Unreadable videos are skipped and counted.
    Train from it with data.source=latents data.latents=DIR.

    Exit status: 0 done; 2 bad input (recipe, VAE folder, a cache of other settings in --out).
    """
    with user_errors():
        from eqm.cache import build_cache
        from eqm.recipe import load_recipe
        from eqm.distributed import shutdown_distributed

        rec = load_recipe(recipe, overrides or [])
        try:
            result = build_cache(rec, out, shard_size=shard_size, warn=warn,
                                 log=lambda line: err_console.print(line, highlight=False, markup=False))
        finally:
            shutdown_distributed()
        err_console.print(f"[green]cached[/] {result.num_clips} clips in {result.out} "
                          f"({result.clips_per_s:.1f} clips/s)", highlight=False)
