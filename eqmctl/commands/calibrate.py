"""`eqmctl calibrate`: a checkpoint's motion speed per requested rate and guidance scale, against
the speed of its training data (optical flow; eqm.calibrate does the work)."""

from pathlib import Path
from typing import Optional

import typer

from eqmctl.common import console, err_console, user_errors, warn, with_sampler_settings


@with_sampler_settings(only=("method", "steps", "step_size", "momentum", "tol"))
def calibrate(
    ckpt: Optional[str] = typer.Option(
        None, "--ckpt", metavar="CKPT|RUN",
        help="Checkpoint directory or run directory (its latest checkpoint). Default: the latest run under --runs-root.",
    ),
    rates: str = typer.Option("6,12,24,48,60", "--rates", help="Comma-separated frame rates to sample at, e.g. 6,12,29.97,60."),
    data: Optional[Path] = typer.Option(
        None, "--data", metavar="RECIPE|MANIFEST|FOLDER",
        help="Reference clips: a recipe's data, a probe-fps manifest or a folder of class subfolders, cut with the "
        "checkpoint's clip policy at the model's frame size (default: the checkpoint's own training data).",
    ),
    samples: int = typer.Option(8, "--samples", "-N", help="Generated clips per class (per clip for a model without classes) at every rate."),
    ref_clips: int = typer.Option(64, "--ref-clips", help="Reference clips measured from the data."),
    seconds: Optional[float] = typer.Option(
        None, "--seconds", help="Generated clips of this duration at every rate (default: the training clip length, "
        "as `eqmctl sample` picks it).",
    ),
    cfg_scales: Optional[str] = typer.Option(
        None, "--cfg-scales", help="Comma-separated guidance scales to compare, e.g. 1,1.5,2 (default: the recipe's sample.cfg_scale).",
    ),
    per_class: bool = typer.Option(False, "--per-class", help="Also print the median ratio of every class."),
    seed: int = typer.Option(0, "--seed", help="Noise seed (the same noise at every rate)."),
    ema: bool = typer.Option(True, "--ema/--raw", help="Use the EMA weights (default) or the raw training weights."),
    batch_size: Optional[int] = typer.Option(64, "--batch-size", "-b", help="Samples generated together."),
    vae: Optional[Path] = typer.Option(
        None, "--vae", help="Local folder of the VAE that decodes a latent model's samples (default: the folder the "
        "checkpoint recorded, which must hold the same VAE).",
    ),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    runs_root: Path = typer.Option(Path("runs"), "--runs-root", help="Where to look for the latest run when --ckpt is omitted."),
    out: Path = typer.Option(Path("calibration"), "--out", "-o", help="Folder for calibration.json and calibration.png."),
    json_out: bool = typer.Option(False, "--json", help="Print calibration.json on stdout instead of the table."),
    settings=None,
) -> None:
    """Measure whether generated motion is as fast as the training data's, at every requested rate.

    Speed is dense optical flow (OpenCV Farneback) between frames 1/6 s apart, divided by that
    time, median over moving pixels: pixels per second, comparable across rates. A time-aware
    model keeps the ratio near 1 at every rate; a time-blind one scales it with the rate.
    """
    with user_errors():
        import json as _json

        from eqm.calibrate import calibrate as run, parse_rates, parse_scales, write_calibration
        from eqm.errors import EqmError
        from eqm.generate import resolve_device

        parse_rates(rates)
        parse_scales(cfg_scales)
        if out.exists() and not out.is_dir():
            raise EqmError(f"--out {out} exists and is not a folder")
        dev = resolve_device(device)
        log = None if json_out else (lambda line: err_console.print(f"[dim]{line}[/]", highlight=False))
        cal = run(ckpt, rates, data=data, samples=samples, ref_clips=ref_clips, cfg_scales=cfg_scales, seed=seed,
                  ema=ema, sampler=settings, batch_size=batch_size, device=dev, runs_root=runs_root, vae_path=vae,
                  seconds=seconds, log=log)
        for w in cal.warnings:
            warn(w)
        json_path, png_path = write_calibration(cal, out)
        if json_out:
            print(_json.dumps(_json.loads(json_path.read_text()), indent=2))
            return
        _print_table(cal)
        if per_class:
            _print_classes(cal)
        _print_verdict(cal)
        console.print(f"wrote {json_path} and {png_path}", highlight=False)


def _fmt(x: float, spec: str) -> str:
    return "n/a" if x != x else format(x, spec)  # NaN: nothing measurable


def _print_table(cal) -> None:
    from rich.table import Table

    from eqm.timebase import format_fps

    ref = cal.reference
    lo_hi = cal.train_fps
    table = Table(
        title=f"{cal.checkpoint} (step {cal.step}, {cal.weights} weights) vs {ref.data}: "
        f"{ref.speed:.2f} px/s (median of {ref.measured} clips)",
        title_justify="left",
    )
    for col in ("fps", "cfg", "frames", "clips", "gap", "px/s", "ratio", "quartiles", "direction"):
        table.add_column(col, justify="right")
    for r in cal.results:
        inside = lo_hi is not None and lo_hi[0] <= float(r.rate) <= lo_hi[1]
        table.add_row(
            format_fps(r.rate) + (" *" if inside else ""), f"{r.cfg_scale:g}", str(r.frames), f"{r.measured}/{r.clips}",
            _fmt(r.gap, ".3f") + " s", _fmt(r.speed, ".2f"), _fmt(r.ratio, ".2f") + "x",
            f"{_fmt(r.ratio_q25, '.2f')}-{_fmt(r.ratio_q75, '.2f')}x",
            _fmt(100 * r.direction, ".0f") + " %",
        )
    console.print(table)
    if lo_hi is not None:
        console.print(f"* inside the training rates ({lo_hi[0]:g}-{lo_hi[1]:g} fps)", highlight=False)


def _print_classes(cal) -> None:
    from rich.table import Table

    from eqm.timebase import format_fps

    classes = sorted(cal.reference.class_speed)
    names = [cal.class_names[k] if k < len(cal.class_names) else str(k) for k in classes]
    table = Table(title="median ratio per class (data speed in px/s in the header)", title_justify="left")
    table.add_column("fps", justify="right")
    table.add_column("guidance", justify="right")
    for k, name in zip(classes, names):
        table.add_column(f"{name} ({cal.reference.class_speed[k]:.2f})", justify="right")
    for r in cal.results:
        table.add_row(format_fps(r.rate), f"{r.cfg_scale:g}", *(_fmt(r.class_ratio.get(k, float("nan")), ".2f") + "x" for k in classes))
    console.print(table)


def _print_verdict(cal) -> None:
    from eqm.calibrate import TARGET_ERROR

    lines = [f"guidance {s:g}: worst |ratio - 1| over the rates {cal.worst_error(s) * 100:.1f} %" for s in cal.cfg_scales]
    best = cal.best_cfg_scale
    ok = cal.worst_error(best) <= TARGET_ERROR
    verdict = (f"guidance {best:g} reproduces the data's motion speed within {TARGET_ERROR * 100:.0f} % at every rate"
               if ok else f"no guidance scale tried is within {TARGET_ERROR * 100:.0f} % at every rate; closest: {best:g}")
    console.print("\n".join(lines + [verdict]), highlight=False)
