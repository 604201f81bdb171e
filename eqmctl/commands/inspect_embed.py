"""`eqmctl inspect-embed`: plots and a table of what the time-aware positional encoding does."""

from pathlib import Path
from typing import List, Optional

import typer

from eqmctl.common import console, user_errors


def _rate_list(text: str, option: str) -> list:
    """'12,24,29.97' -> exact Fractions; one-line EqmError naming the option on any bad item."""
    from eqm.errors import EqmError
    from eqm.timebase import parse_fps

    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise EqmError(f"{option} must be comma-separated frame rates like 12,24,60, got {text!r}")
    return [parse_fps(p, name=option) for p in parts]


def inspect_embed(
    overrides: Optional[List[str]] = typer.Argument(
        None, metavar="[KEY=VALUE]...", show_default=False,
        help="Recipe overrides with --recipe, e.g. model.time.ref_fps=1 model.pos=rope.",
    ),
    ckpt: Optional[str] = typer.Option(
        None, "--ckpt", metavar="CKPT|RUN",
        help="Checkpoint or run directory: its architecture (state.json) sets the encoding; no weights are loaded.",
    ),
    recipe: Optional[Path] = typer.Option(None, "--recipe", metavar="RECIPE.yaml", help="Take the encoding from a training recipe (plus KEY=VALUE overrides)."),
    pos: Optional[str] = typer.Option(None, "--pos", help="sincos or rope (default sincos). Given with --ckpt/--recipe, overrides their setting."),
    time_mode: Optional[str] = typer.Option(None, "--time-mode", help="seconds, index or fps-embed (default seconds)."),
    ref_fps: Optional[str] = typer.Option(None, "--ref-fps", help="Reference rate r in tau = t * r (default 24); 1 = raw seconds."),
    time_frac: Optional[float] = typer.Option(None, "--time-frac", help="Share of channels carrying time (sincos: of the hidden size; rope: of each head; default 0.25)."),
    hidden_size: Optional[int] = typer.Option(None, "--hidden-size", help="Hidden width D (default 384, EqM-S)."),
    num_heads: Optional[int] = typer.Option(None, "--num-heads", help="Attention heads; sets the RoPE head dimension (default 6)."),
    rates: str = typer.Option("6,12,24,60", "--rates", help="Frame rates to show, comma-separated (29.97 and 30000/1001 are exact)."),
    compare: str = typer.Option("24,60", "--compare", help="Two rates for the frame-to-frame similarity matrix."),
    seconds: float = typer.Option(1.0, "--seconds", "-s", help="Clip duration in seconds for the heatmap and similarity plots."),
    out: Path = typer.Option(Path("embed-inspect"), "--out", "-o", help="Folder for the PNG files."),
    json_out: bool = typer.Option(False, "--json", help="Print the numbers as JSON on stdout instead of the table."),
) -> None:
    """Plot the temporal positional encoding of a checkpoint, a recipe or the given options.

    Writes four PNG files into --out and prints the numbers per frame rate:

    heatmap.png: the code (channels x frames) at each rate, against time in seconds;
    similarity.png: frame-to-frame similarity of two rates (aligned by time or by index);
    separability.png: similarity of neighbouring frames against the frame rate;
    frequencies.png: each temporal frequency in Hz against each rate's Nyquist limit.
    """
    with user_errors():
        from dataclasses import replace

        from eqm.errors import EqmError
        from eqm.inspect import EmbedView, inspect_embedding, view_from_checkpoint, view_from_recipe, write_plots
        from eqm.jsonio import dumps
        from eqm.timebase import parse_fps

        # Cheap checks first: a typo in --rates should not wait for a checkpoint to be read.
        rate_list = _rate_list(rates, "--rates")
        pair = _rate_list(compare, "--compare")
        if len(pair) != 2:
            raise EqmError(f"--compare needs exactly two frame rates like 24,60, got {compare!r}")
        if out.exists() and not out.is_dir():
            raise EqmError(f"--out {out} exists and is not a folder")
        if ckpt is not None and recipe is not None:
            raise EqmError("give either --ckpt or --recipe, not both")
        if overrides and recipe is None:
            raise EqmError(f"KEY=VALUE overrides ({overrides[0]}) need --recipe; use --pos/--ref-fps/... to change a checkpoint's settings")

        if ckpt is not None:
            view = view_from_checkpoint(ckpt)
        elif recipe is not None:
            view = view_from_recipe(recipe, overrides or [])
        else:
            view = EmbedView()
        # Options given explicitly override the source: "what would this checkpoint look like with
        # ref_fps 1?" is a question the plots should answer without retraining.
        given = {k: v for k, v in dict(
            pos=pos, time_mode=time_mode, time_frac=time_frac, hidden_size=hidden_size, num_heads=num_heads,
            ref_fps=None if ref_fps is None else float(parse_fps(ref_fps, name="--ref-fps")),
        ).items() if v is not None}
        if given:
            changed = ", ".join(f"{k}={v}" for k, v in given.items())
            source = view.source if view.source == "options" else f"{view.source} with {changed}"
            try:
                view = replace(view, arch=replace(view.arch, **given), source=source)
            except EqmError as e:
                raise EqmError(f"{source}: {e}") from None

        report = inspect_embedding(view, rate_list, compare=pair, seconds=seconds)
        write_plots(report, out)
        if json_out:
            print(dumps(report.to_dict(), indent=2))
            return
        _print_report(report)


def _short(fps) -> str:
    """'23.976' rather than '24000/1001 (23.976)': the table has eight columns to fit (JSON keeps the exact form)."""
    return f"{float(fps):.6g}"


def _print_report(report) -> None:
    from rich.table import Table

    cfg = report.config
    table = Table(title=f"temporal code: {cfg.describe()}\nfrom {cfg.source}", title_justify="left", show_edge=False)
    # Headers broken by hand and cells never wrapped: the eight columns fit 80 characters, and a
    # number is never folded over two lines or cut short by rich's automatic column shrinking.
    headers = ("fps", "frames", "adjacent\nsim.", "raw secs\n(r=1)", "index\nmode", "max Hz", "Nyquist\nHz", "aliased")
    for name in headers:
        table.add_column(name, justify="right", no_wrap=True)
    for r in report.rows:
        table.add_row(
            _short(r.fps), str(r.frames), f"{r.adjacent:.6f}", f"{r.adjacent_raw_seconds:.6f}",
            f"{r.adjacent_index:.6f}", "-" if r.max_hz is None else f"{r.max_hz:.3f}", f"{r.nyquist_hz:.6g}",
            f"{r.aliased}/{r.num_frequencies}",
        )
    console.print(table)
    sim = report.similarity
    n = sim.matrix.shape[0]
    a, b = _short(sim.fps_a), _short(sim.fps_b)
    console.print(
        f"similarity {a} vs {b} fps ({sim.time_mode} positions): each {a} fps frame is most like the {b} fps "
        f"frame nearest in time in {int(sim.aligned_by_seconds().sum())}/{n} rows, the one with the same index "
        f"in {int(sim.aligned_by_index().sum())}/{n}",
        highlight=False,
    )
    console.print(
        "adjacent sim. = cosine similarity of neighbouring frames' temporal codes (1 = indistinguishable); "
        "aliased = frequencies above Nyquist (fps/2)", highlight=False, style="dim",
    )
    if cfg.arch.time_mode == "fps-embed":
        console.print("fps-embed: positions are frame indices; the rate reaches the model through a learned "
                      "embedding of the clip's fps, which these plots do not show", highlight=False)
    console.print("wrote " + "  ".join(report.files.values()), highlight=False)
