"""`eqmctl train RECIPE.yaml [key.sub=value ...]`: train from a validated recipe (eqm.train does the work)."""

from pathlib import Path
from typing import List, Optional

import typer

from eqmctl.common import console, err_console, user_errors, warn


def train(
    recipe: Optional[Path] = typer.Argument(
        None, metavar="RECIPE.yaml", show_default=False, help="Recipe file (see recipes/ and --schema).",
    ),
    overrides: Optional[List[str]] = typer.Argument(
        None, metavar="[KEY=VALUE]...", show_default=False,
        help="Recipe overrides such as train.lr=3e-4 model.time.mode=index (values are YAML scalars, type-checked).",
    ),
    run_dir: Optional[Path] = typer.Option(
        None, "--run-dir", "-o", help="Run directory (default: RUNS_ROOT/<recipe name>-<timestamp>).",
    ),
    resume: Optional[str] = typer.Option(
        None, "--resume", metavar="CKPT|RUN|latest",
        help="Continue from a checkpoint directory, a run directory (its latest checkpoint) or 'latest' "
        "(in --run-dir, else the newest run of this recipe's name). Weights, EMA, Adam moments and the data "
        "position come from the checkpoint; lr, weight decay and the schedule from the recipe (raise "
        "train.steps to train longer).",
    ),
    validate: bool = typer.Option(
        False, "--validate", "--dry-run",
        help="Build the dataset, model and optimizer, read one clip, print a summary and exit without training.",
    ),
    runs_root: Path = typer.Option(Path("runs"), "--runs-root", help="Parent of new run directories."),
    schema: bool = typer.Option(False, "--schema", help="Print every recipe key with its type, default and meaning, and exit."),
) -> None:
    """Train an EqM video model from a YAML recipe, with real per-frame timestamps.

    Works as a plain command and under `accelerate launch` (several processes, GPUs or nodes):
    only the main process writes. The run directory gets recipe.yaml (resolved), metrics.jsonl,
    log.txt, checkpoints/step_N/ (safetensors model + EMA, state.json, optim.pt), previews/*.mp4
    and summary.json.

    Exit status: 0 done; 1 the run failed (the loss or gradient norm diverged -- NaN/inf or far
    above its running level, see train.diverge_loss: the message names the last good checkpoint,
    later ones are moved to checkpoints/abandoned-*); 2 bad input (recipe key, type or value;
    missing files; the run directory is in use by another training); 3 an internal error (a bug).
    """
    with user_errors():
        from eqm.errors import EqmError

        if schema:
            _print_schema()
            return
        if recipe is None:
            raise EqmError("missing RECIPE.yaml (e.g. eqmctl train recipes/tiny-synthetic.yaml); --schema lists the recipe keys")
        from eqm.recipe import load_recipe

        rec = load_recipe(recipe, overrides or [])
        if validate:
            _validate(rec)
            return

        from eqm.distributed import shutdown_distributed
        from eqm.train import train as run_training

        try:
            result = run_training(rec, run_dir, resume, runs_root=runs_root, warn=warn)
        finally:
            shutdown_distributed()
        if result.last_checkpoint is not None:
            err_console.print(f"[green]trained[/] {result.step} steps; checkpoint {result.last_checkpoint}", highlight=False)


def _validate(rec) -> None:
    from rich.table import Table

    from eqm.train import validate_recipe

    s = validate_recipe(rec, warn=warn)
    table = Table(title=f"recipe {s['name']}: valid", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("data", f"{s['source']}: {s['dataset_size']} clips, {s['num_classes']} classes"
                 + (f", {s['skipped_files']} files skipped" if s["skipped_files"] else "")),
        ("clip", f"{' x '.join(map(str, s['clip_shape']))} (C x T x H x W), first clip at {s['first_clip_fps']:.3g} fps"),
        *([("latents", s["latent_space"])] if s.get("latent_space") else []),
        ("model", f"{s['params']:,} parameters ({s['trainable_params']:,} trainable), {s['tokens_per_clip']} tokens per clip"),
        ("arch", ", ".join(f"{k}={v}" for k, v in s["arch"].items())),
        ("optimizer", s["optimizer"]),
        ("schedule", f"{s['steps']} steps x global batch {s['global_batch']} = {s['epochs']:.2f} epochs"),
        ("device", f"{s['device']}, {s['processes']} process(es)"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    if s["init_from"]:
        _print_init(s["init_from"])


def _print_init(init: dict) -> None:
    """The model.init_from report: one row per status (loaded / adapted / new / dropped)."""
    from rich.table import Table

    table = Table(title=f"initial weights from {init['source']} ({init['weights']})", title_justify="left")
    for col in ("status", "count", "parameters"):
        table.add_column(col, overflow="fold", justify="right" if col == "count" else "left")
    for status, count, names in init["rows"]:
        table.add_row(status, str(count), names)
    console.print(table)


def _print_schema() -> None:
    from rich.table import Table

    from eqm.recipe import schema_lines

    table = Table(title="recipe keys", title_justify="left")
    for col in ("key", "type", "default", "meaning"):
        table.add_column(col, overflow="fold")
    for key, tp, default, doc in schema_lines():
        table.add_row(key, tp, default, doc)
    console.print(table)


__all__ = ["train", "warn"]
