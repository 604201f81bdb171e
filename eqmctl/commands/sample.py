"""`eqmctl sample --fps N`: generate clips at a chosen frame rate and write them to play at it.
`eqmctl sample --ckpt official.pt`: images from an official EqM image checkpoint (PNGs and a grid)."""

from pathlib import Path
from typing import Optional

import typer

from eqmctl.common import console, err_console, is_tty, progress_bar, user_errors, warn, with_sampler_settings


@with_sampler_settings(official={
    "steps": " The paper's 250 for an official .pt (whose sample_gd.py --num-sampling-steps N runs N - 1).",
    "step_size": " The paper's 0.003 GD / 0.0017 NAG for an official .pt.",
    "tol": " 0 for an official .pt, as the paper samples.",
    "cfg_scale": " 1 for an official .pt.",
})
def sample(
    fps: Optional[str] = typer.Option(None, "--fps", help="Frame rate to generate at, e.g. 60, 29.97 or 30000/1001. Frame k is at k/fps seconds. Required for video checkpoints."),
    ckpt: Optional[str] = typer.Option(
        None, "--ckpt", metavar="CKPT|RUN|PT",
        help="Checkpoint directory or run directory (its latest checkpoint), or an official EqM .pt (images: T = 1, PNGs and a grid). Default: the latest checkpoint of the latest run under --runs-root.",
    ),
    frames: Optional[int] = typer.Option(None, "--frames", "-n", help="Frames per clip (default: the model's training length, fewer at rates below its training range so the clip stays within the seconds it was trained on)."),
    seconds: Optional[float] = typer.Option(None, "--seconds", "-s", help="Clip duration in seconds instead of --frames (frames = seconds * fps, halves rounded up)."),
    num_samples: int = typer.Option(4, "--num-samples", "-N", help="Number of clips."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated class indices or names, cycled over the samples (default: all classes in turn)."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="Local folder of the VAE that decodes the model's latents (default for an eqmctl latent checkpoint: the folder it recorded, which must hold the same VAE; required for an official EqM .pt: a local folder of stabilityai/sd-vae-ft-ema)."),
    seed: int = typer.Option(0, "--seed", help="Noise seed; sample i always gets the same noise for a given seed."),
    ema: bool = typer.Option(True, "--ema/--raw", help="Use the EMA weights (default) or the raw training weights."),
    out: Path = typer.Option(Path("samples"), "--out", "-o", help="Output folder."),
    fmt: str = typer.Option("mp4", "--format", "-f", help="mp4 (H.264, exact frame rate), mkv or gif."),
    png: bool = typer.Option(False, "--png", help="Also write every frame as PNG."),
    grid: bool = typer.Option(False, "--grid", help="Also write a grid image (rows: samples, columns: frames)."),
    upscale: int = typer.Option(1, "--upscale", help="Enlarge the written frames by this integer factor (nearest neighbour)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Samples generated together (default: all)."),
    window: Optional[int] = typer.Option(None, "--window", "-w", help="Frames per model call: a longer clip is made window by window, each half clamped to the frames before it, so a model trained on short clips samples long ones at its training length (default: the whole clip in one call; latent frames for a latent model)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32; bf16 autocast (CUDA or CPU); fp16 autocast (CUDA)."),
    runs_root: Path = typer.Option(Path("runs"), "--runs-root", help="Where to look for the latest run when --ckpt is omitted."),
    json_out: bool = typer.Option(False, "--json", help="Print the written samples as JSON on stdout."),
    settings=None,
) -> None:
    """Generate clips at --fps and write them so they play at that rate.

    The same model generates at any rate: the timestamps k/fps go into its positional encoding,
    so a seconds-mode model keeps the motion speed (pixels per second) it learned.
    """
    with user_errors():
        import json as _json

        from eqm.official import is_official_file

        if ckpt is not None and is_official_file(ckpt):
            ignored = [flag for flag, v in (("--fps", fps), ("--frames", frames), ("--seconds", seconds), ("--window", window))
                       if v is not None]
            if ignored:
                warn(f"{', '.join(ignored)} ignored: {ckpt} is an image model (T = 1)")
            return _sample_official(
                ckpt, out, weights="ema" if ema else "model", vae_path=vae, num_samples=num_samples, labels=labels,
                settings=settings, seed=seed, batch_size=batch_size, device=device, dtype=dtype, json_out=json_out,
            )
        from eqm.checkpoint import resolve_checkpoint
        from eqm.errors import EqmError
        from eqm.generate import sample_checkpoint
        from eqm.timebase import format_fps, parse_fps

        if fps is None:
            raise EqmError("--fps is required to sample a video checkpoint (e.g. --fps 24)")
        rate = parse_fps(fps, name="--fps")
        if ckpt is None:  # say which one before the (long) sampling starts
            ckpt = resolve_checkpoint(None, runs_root, warn=warn)  # a damaged newest checkpoint: the one before
            err_console.print(f"using the latest checkpoint: [bold]{ckpt}[/]", highlight=False)
        with progress_bar("sampling", num_samples, enabled=is_tty() and not json_out) as progress_cb:
            run = sample_checkpoint(
                ckpt, fps=rate, out_dir=out, frames=frames, seconds=seconds, num_samples=num_samples, labels=labels,
                settings=settings, seed=seed, use_ema=ema, runs_root=runs_root, fmt=fmt, png=png, grid=grid,
                upscale=upscale, batch_size=batch_size, device=device, dtype=dtype, vae_path=vae, window=window,
                progress=progress_cb, on_note=warn,
            )
        if json_out:
            print(_json.dumps(_json.loads(run.written.manifest.read_text()), indent=2))
            return
        _print_summary(run.written, run.generation, format_fps(rate), run.state)


def _print_summary(summary, gen, rate: str, state) -> None:
    from rich.table import Table

    steps = gen.settings.steps
    cfg = gen.settings.guidance
    guidance = "" if cfg == 1.0 else f", cfg {cfg:g}"
    table = Table(
        title=f"{len(summary.samples)} clips at {rate} fps, {gen.num_frames} frames ({gen.duration:.3f} s) each "
        f"in {summary.out_dir}/ (step {state.get('step')}, {gen.settings.method}{guidance})",
        title_justify="left",
    )
    for col in ("file", "label", "frames", "duration", "evals", "final rms"):
        table.add_column(col, justify="left" if col == "file" else "right", overflow="fold")
    for w in summary.samples:
        table.add_row(
            w.path.name, "-" if w.label is None else str(w.label), str(w.frames), f"{w.duration:.3f} s",
            f"{w.evals}/{steps}", f"{w.final_rms:.4f}",
        )
    console.print(table)
    extra = [f"details: {summary.manifest}"]
    if summary.grid is not None:
        extra.append(f"grid: {summary.grid}")
    console.print("  ".join(extra), highlight=False)


def _sample_official(ckpt, out, *, json_out: bool, device, **options) -> None:
    """Images from an official EqM checkpoint (eqm.images.sample_official), and their summary."""
    import json as _json

    from eqm.generate import resolve_device
    from eqm.images import sample_official

    with progress_bar("sampling", options["num_samples"], enabled=is_tty() and not json_out) as progress_cb:
        summary, gen, loaded = sample_official(ckpt, out, device=resolve_device(device), progress=progress_cb, **options)
    for note in loaded.notes:
        warn(note)
    if json_out:
        print(_json.dumps(_json.loads(summary.manifest.read_text()), indent=2))
        return
    from rich.table import Table

    st = gen.settings
    how = f"{st.method}, {st.steps} steps of {st.step_size:g}" + (f", momentum {st.momentum:g}" if st.method == "nag" else "")
    if st.guidance != 1.0:
        how += f", cfg {st.guidance:g}" + (f" on {st.guidance_channels} channels" if st.guidance_channels else "")
    table = Table(title=f"{len(summary.files)} images in {summary.out_dir}/ from {ckpt} ({loaded.weights}; {how})", title_justify="left")
    for col in ("file", "label", "evals", "final rms"):
        table.add_column(col, justify="left" if col == "file" else "right")
    labels = [None] * len(summary.files) if gen.labels is None else gen.labels.tolist()
    for f, lab, e, r in zip(summary.files, labels, gen.evals.tolist(), gen.final_rms.tolist()):
        table.add_row(f.name, "-" if lab is None else str(lab), f"{e}/{st.steps}", f"{r:.4f}")
    console.print(table)
    console.print(f"details: {summary.manifest}  grid: {summary.grid}", highlight=False)


