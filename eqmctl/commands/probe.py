"""`eqmctl probe-fps`: audit the frame rates of a video collection (eqm.video.probe does the work)."""

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from eqmctl.common import console, err_console, user_errors, warn


def probe_fps(
    paths: List[Path] = typer.Argument(
        ..., metavar="PATH...", show_default=False,
        help="Video files or folders. Folders are searched recursively for video extensions "
        "(.mp4 .mkv .webm .mov .avi .gif ...); files named here are always probed.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (files + summary) to stdout and nothing else."),
    manifest: Optional[Path] = typer.Option(
        None, "--manifest", "-m", metavar="FILE", dir_okay=False,
        help="Write a JSONL manifest (one file per line, with packet pts and keyframe times) "
        "for the training data pipeline. Written atomically; an existing file is replaced only if it "
        "is empty or a manifest (see --force); never a probed video, a folder, a FIFO or a device.",
    ),
    force: bool = typer.Option(False, "--force", help="Let --manifest replace an existing regular file that is not a manifest."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1, help="Most parallel worker processes (default: the usable CPUs; a few files are probed serially)."),
    summary_only: bool = typer.Option(False, "--summary-only", "-s", help="Skip the per-file table; print the summary and problems only."),
    with_pts: bool = typer.Option(False, "--pts", help="Include per-file pts and keyframe times in --json output."),
    show_progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr (only when stderr is a terminal)."),
) -> None:
    """Audit the frame rates of a video collection before training.

    Reads container metadata and demuxed packet timestamps with PyAV (no frame is decoded):
    exact frame rate (24000/1001, not 23.976) and where it came from, frame count, duration,
    variable-frame-rate files (with their measured mean rate), audio, and a status with a reason
    for every broken file. Labels come from the parent folder names.

    Exit status: 0 every file probed ok; 1 at least one file is broken (truncated, empty, not a
    video, audio only, unreadable, ...: see its status); 2 bad usage (a path that does not
    exist, no video files found, a bad option, a --manifest it must not replace); 3 an internal
    error (a bug in eqmctl, never a verdict on a file).
    """
    with user_errors():
        from eqm.errors import EqmError
        from eqm.video.probe import check_manifest_target, collect_videos, summarize, write_manifest

        files = collect_videos(paths)
        for p in paths:
            if p.is_dir() and not any(_is_under(f, p) for f in files):
                warn(f"no video files under {p}")
        if not files:
            raise EqmError("no video files found in " + ", ".join(str(p) for p in paths))
        if manifest is not None:  # before probing: a wrong --manifest fails in a second, not after an hour
            check_manifest_target(manifest, files, force=force)

        results = _run(files, workers, show_progress and err_console.is_terminal)
        summary = summarize(results)
        if manifest is not None:
            write_manifest(results, manifest, force=force)
        out = err_console if json_out else console
        if json_out:
            doc = {"files": [r.to_dict(timestamps=with_pts) for r in results], "summary": summary}
            sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")
            sys.stdout.flush()
        else:
            root = _common_root(files)
            if not summary_only:
                console.print(_table(results, root))
            _print_problems(results, root)
            _print_summary(summary)
        if manifest is not None:
            out.print(f"wrote manifest {manifest} ({len(results)} entries, {summary['ok']} ok)", highlight=False)
    if summary["broken"]:
        raise typer.Exit(1)


def _is_under(f: Path, root: Path) -> bool:
    try:
        f.absolute().relative_to(root.absolute())
        return True
    except ValueError:
        return False


def _run(files, workers, show_progress: bool):
    from eqm.video.probe import probe_paths

    if not show_progress or len(files) < 20:  # a bar for a handful of files is only flicker
        return probe_paths(files, workers=workers)
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # auto_refresh=False: no refresh thread, so the probe pool may fork safely (see
    # eqm.video.probe._mp_context); the bar is redrawn from the progress callback instead.
    with Progress(
        TextColumn("probing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err_console, transient=True, auto_refresh=False,
    ) as bar:
        task = bar.add_task("probe", total=len(files))
        last = [0.0]

        def step(_result) -> None:
            bar.advance(task)
            now = time.monotonic()
            if now - last[0] > 0.1:  # thousands of files a second: redraw ten times a second
                last[0] = now
                bar.refresh()

        return probe_paths(files, workers=workers, progress=step)


def _common_root(files) -> Path:
    import os

    parents = [str(Path(f).absolute().parent) for f in files]
    try:
        return Path(os.path.commonpath(parents))
    except ValueError:  # different drives
        return Path("/")


def _rel(path: str, root: Path) -> str:
    try:
        return Path(path).absolute().relative_to(root).as_posix()
    except ValueError:
        return path


def _duration(seconds) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _table(results, root: Path):
    from fractions import Fraction

    from rich import box
    from rich.table import Table

    from eqm.timebase import format_fps

    # Budgeted for a 100-column terminal: the other columns take ~75 and every row stays on one
    # line for paths up to ~22 characters; longer paths fold. On narrower terminals the exact
    # rate wraps under its fraction ("24000/1001" / "(23.976)") rather than a column vanishing.
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True, show_edge=False,
                  title=f"frame rates under {root}", title_justify="left")
    table.add_column("file", overflow="fold", min_width=12, ratio=1)
    table.add_column("format", overflow="ellipsis", max_width=12)
    table.add_column("size", no_wrap=True, justify="right")
    table.add_column("fps", justify="right")
    table.add_column("frames", no_wrap=True, justify="right")
    table.add_column("time", no_wrap=True, justify="right")
    table.add_column("VFR", no_wrap=True, justify="right")
    table.add_column("aud", no_wrap=True)
    table.add_column("status", overflow="fold")
    for r in results:
        cont = (r.container or "").replace("matroska", "mkv")
        fmt = cont if r.codec in (None, cont) else f"{cont} {r.codec}"
        size = f"{r.width}x{r.height}" if r.width and r.height else ""
        fps = format_fps(Fraction(r.fps)) if r.fps else ""
        if r.fps and r.fps_source == "packet timestamps":
            fps += "*"
        vfr = f"~{r.measured_fps:.1f}" if r.vfr and r.measured_fps else ""
        status = "[green]ok[/]" if r.ok else f"[red]{r.status}[/]"
        table.add_row(_rel(r.path, root), fmt, size, fps, "" if r.frames is None else str(r.frames),
                      _duration(r.duration), f"[yellow]{vfr}[/]" if vfr else "", "yes" if r.has_audio else "", status)
    if any(r.fps_source == "packet timestamps" for r in results):
        table.caption = "* rate measured from packet timestamps (header missing or contradicted)"
        table.caption_justify = "left"
    return table


def _print_problems(results, root: Path) -> None:
    notes = [r for r in results if not r.ok or r.reason]
    if not notes:
        return
    console.print()
    for r in notes:
        mark = "[red]✗[/]" if not r.ok else "[yellow]![/]"
        label = r.status if not r.ok else ("VFR" if r.vfr else "note")
        console.print(f"{mark} {_rel(r.path, root)} [dim]({label})[/]: {r.reason}", highlight=False, soft_wrap=False)


def _print_summary(summary) -> None:
    from fractions import Fraction

    from rich import box
    from rich.table import Table

    from eqm.timebase import format_fps

    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title="summary", title_justify="left")
    t.add_column("frame rate", no_wrap=True)
    t.add_column("files", justify="right")
    t.add_column("duration", justify="right")
    for key, slot in summary["by_fps"].items():
        name = format_fps(Fraction(key)) if key != "unknown" else "unknown"
        t.add_row(name, str(slot["files"]), _duration(slot["hours"] * 3600.0))
    if summary["vfr"]:
        t.add_row("[yellow]variable (VFR)[/]", str(summary["vfr"]), _duration(summary["vfr_hours"] * 3600.0))
    console.print()
    console.print(t)
    broken = ", ".join(f"{k} {v}" for k, v in summary["by_status"].items() if k != "ok")
    line = (f"{summary['files']} files: {summary['ok']} ok, {summary['broken']} broken"
            + (f" ({broken})" if broken else "")
            + f"; {summary['vfr']} variable frame rate; {summary['total_hours']:.2f} hours of ok video"
            + f" ({_duration(summary['total_hours'] * 3600.0)})")
    console.print(line, highlight=False)
