"""Generation at a chosen frame rate, and writing the result so it plays at that rate.

The frame timestamps of a generated clip are ``k / fps`` seconds (docs/reference.md#timestamps):
the requested rate changes the positional encoding of a seconds-mode model, so the same noise gives
a clip whose motion per *second* is the one learned, sampled ``fps`` times a second. An index-mode
model cannot see the rate (its positions are 0, 1, 2, ...), which is the failure this project
fixes.

Noise is drawn per sample from its own generator seeded by ``(seed, sample index)``: sample i is
the same clip whatever the batch size, and a run of 8 samples starts with the 4 of a run of 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import fsio
from .config import SamplerSettings
from .errors import EqmError, NonFiniteError, ParamError
from .timebase import format_fps, fps_tag, frames_for_duration, parse_fps

FORMATS = ("mp4", "mkv", "gif")

#: Hard cap on frames per clip: a typo like --seconds 6000 should be an error, not an hour of compute.
MAX_FRAMES = 4096
#: Largest --upscale factor (nearest-neighbour enlargement of the written frames).
MAX_UPSCALE = 64


@dataclass
class Generation:
    """Generated clips and how they were made.

    videos: (N, C, T, H, W) float32 in [-1, 1] on the CPU; labels: (N,) long or None;
    evals: (N,) model evaluations per sample (fewer than ``steps`` under adaptive stop);
    final_rms: (N,) RMS of each sample's last gradient; timestamps: (T,) seconds, k / fps.
    """

    videos: torch.Tensor
    labels: Optional[torch.Tensor]
    evals: torch.Tensor
    final_rms: torch.Tensor
    timestamps: torch.Tensor
    fps: Fraction
    settings: SamplerSettings = field(default_factory=lambda: SamplerSettings().resolved())
    seed: int = 0
    dtype: str = "fp32"  # the autocast the model ran under
    latent_timestamps: Optional[torch.Tensor] = None  # (T',) seconds, in latent space: what the model saw

    @property
    def num_frames(self) -> int:
        return int(self.videos.shape[2])

    @property
    def duration(self) -> float:
        return self.num_frames / float(self.fps)


def resolve_num_frames(fps: Fraction, frames: Optional[int] = None, seconds: Optional[float] = None, default: int = 16, temporal_patch: int = 1) -> int:
    """Frames of a clip from --frames or --seconds (at most one), else ``default``.

    With ``seconds`` the count is round(seconds * fps), at least one frame; the result is rounded
    up to a multiple of the model's temporal patch (a clip the model can tokenise).
    """
    if frames is not None and seconds is not None:
        raise EqmError("give either frames or seconds, not both")
    if frames is not None:
        if isinstance(frames, bool) or int(frames) != frames or frames < 1:
            raise ParamError("frames", f"frames must be a positive integer, got {frames}")
        n = int(frames)
    elif seconds is not None:
        s = float(seconds)
        if not math.isfinite(s) or s <= 0:
            raise ParamError("seconds", f"seconds must be a positive finite number, got {seconds}")
        n = max(1, frames_for_duration(s, fps))
    else:
        n = int(default)
    if temporal_patch > 1 and n % temporal_patch:
        n += temporal_patch - n % temporal_patch
    if n > MAX_FRAMES:
        raise EqmError(f"{n} frames requested (fps {format_fps(fps)}); the limit is {MAX_FRAMES} frames per clip")
    return n


@dataclass(frozen=True)
class TrainedSpan:
    """How far in time a model's training clips reached, read from its checkpoint's recipe.

    A clip's positions run from tau 0 to ``tau_max`` in training (the longest clip: ``num_frames``
    frames at ``fps_min``, plus ``train.time_shift``).  Past that the model meets positions it never
    saw, and the calibration (docs/calibration.md) measured what happens: the motion stalls on the
    frames beyond the span.  tau is seconds * ref_fps in seconds mode, the frame index otherwise.
    """

    mode: str
    ref_fps: float
    num_frames: int
    fps_min: float
    shift: float  # train.time_shift, seconds

    @property
    def tau_max(self) -> float:
        if self.mode == "seconds":
            return ((self.num_frames - 1) / self.fps_min + self.shift) * self.ref_fps
        return (self.num_frames - 1) + self.shift * self.ref_fps

    @property
    def seconds(self) -> float:
        """Longest span in seconds (seconds mode)."""
        return self.tau_max / self.ref_fps

    def tau_last(self, fps, num_frames: int) -> float:
        """tau of the last frame of a clip of ``num_frames`` frames at ``fps``."""
        if self.mode == "seconds":
            return (num_frames - 1) / float(fps) * self.ref_fps
        return float(num_frames - 1)

    def frames_within(self, fps, limit: int) -> int:
        """Most frames (at most ``limit``, at least 1) whose last one stays inside the span."""
        n = limit
        while n > 1 and self.tau_last(fps, n) > self.tau_max * (1 + 1e-9):
            n -= 1
        return n

    def beyond(self, fps, num_frames: int) -> Optional[str]:
        """A one-line warning when a clip reaches past the span, else None."""
        if self.tau_last(fps, num_frames) <= self.tau_max * (1 + 1e-9):
            return None
        rate = format_fps(fps)
        trained = f"{self.num_frames} frames at {self.fps_min:g} fps"
        if self.shift:
            trained += f" shifted by up to {self.shift:g} s"
        if self.mode == "seconds":
            reach = f"{num_frames} frames at {rate} fps last {(num_frames - 1) / float(fps):.3g} s"
            span = f"the {self.seconds:.3g} s"
        else:
            reach = f"{num_frames} frames reach position {num_frames - 1}"
            span = f"position {self.tau_max:g}, the last"
        return (f"{reach}, past {span} the model was trained on ({trained}); the frames beyond are "
                f"extrapolated and their motion tends to stall ({self.frames_within(fps, num_frames)} frames "
                "stay inside)")


def trained_span(model, recipe: Optional[dict]) -> Optional[TrainedSpan]:
    """The :class:`TrainedSpan` of a model from its checkpoint's recipe; None if the recipe does not say."""
    data = (recipe or {}).get("data") or {}
    train = (recipe or {}).get("train") or {}
    try:
        n, fps_min = int(data["num_frames"]), float(data["fps_min"])
        shift = float(train.get("time_shift") or 0.0)
    except (KeyError, TypeError, ValueError):
        return None
    if n < 1 or not (math.isfinite(fps_min) and fps_min > 0) or not (math.isfinite(shift) and shift >= 0):
        return None
    return TrainedSpan(mode=str(model.config.time_mode), ref_fps=float(model.config.ref_fps),
                       num_frames=n, fps_min=fps_min, shift=shift)


def plan_frames(model, recipe: Optional[dict], fps, frames: Optional[int] = None,
                seconds: Optional[float] = None, *, temporal: int = 1) -> tuple[int, Optional[str]]:
    """Frames of a clip for ``eqmctl sample`` and a warning if the clip leaves the trained span.

    --frames / --seconds are taken as given (with a warning when they reach past the span).
    Without them the default is the model's training clip length, shortened at rates below the
    training range so that the clip stays within the seconds the model was trained on: a 6 fps
    request of a model trained on 11-frame clips at 8-30 fps gets 8 frames (1.17 s of the 1.25 s).
    temporal: the VAE's temporal compression s of a latent-space model (frames then come in s*k + 1:
    the default and --seconds are rounded to such a count, an explicit --frames must be one).
    """
    from .vae import check_num_frames, num_decoded_frames

    tp = int(model.config.temporal_patch) if temporal == 1 else 1
    limit = num_decoded_frames(int(model.config.num_frames), temporal)
    span = trained_span(model, recipe)
    if frames is None and seconds is None and span is not None:
        n = span.frames_within(parse_fps(fps), limit)
        if tp > 1:
            n = max(tp, n - n % tp)
        n = 1 + (n - 1) // temporal * temporal
        T = resolve_num_frames(fps, frames=n, temporal_patch=tp)
    else:
        T = resolve_num_frames(fps, frames, seconds, default=limit, temporal_patch=tp)
        if frames is None:
            T = 1 + round((T - 1) / temporal) * temporal
        check_num_frames(T, temporal, what="the requested clip")
    return T, (span.beyond(parse_fps(fps), T) if span is not None else None)


def recipe_cfg_scale(recipe: Optional[dict]) -> float:
    """The guidance scale a checkpoint's recipe samples with (``sample.cfg_scale``; 1 = none).

    `eqmctl sample` uses it when --cfg-scale is not given, so a model is sampled the way its recipe
    (and its training previews) say; it reads the recipe dict a checkpoint carries.  A recipe without
    the key (or a checkpoint without a recipe) gives 1.
    """
    value = ((recipe or {}).get("sample") or {}).get("cfg_scale", 1.0)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 1.0
    return value if math.isfinite(value) and value >= 0 else 1.0


def parse_labels(spec: Optional[str], num_classes: int, num_samples: int, class_names: Sequence[str] = (),
                 *, param: str = "labels") -> Optional[torch.Tensor]:
    """Class label per sample from ``"0,2"`` or class names; cycled over the samples.

    None: labels cycle through all classes (0, 1, ..., n-1, 0, ...); a model without classes
    gets None (its null label).  Errors name the bad entry.
    """
    if num_classes <= 0:
        if spec:
            raise ParamError(param, f"{param} given but the model was trained without classes")
        return None
    if not spec:
        return torch.arange(num_samples) % num_classes
    names = {n: i for i, n in enumerate(class_names)}
    out = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise ParamError(param, f"{param} has an empty entry: {spec!r}")
        if item in names:
            out.append(names[item])
            continue
        try:
            k = int(item)
        except ValueError:
            known = f" (classes: {', '.join(class_names)})" if class_names else ""
            raise ParamError(param, f"{param} entry {item!r} is neither a class index nor a class name{known}") from None
        if not 0 <= k < num_classes:
            raise ParamError(param, f"{param} entry {k} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
        out.append(k)
    reps = -(-num_samples // len(out))
    return torch.tensor((out * reps)[:num_samples], dtype=torch.long)


def sample_noise(num_samples: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """(N, *shape) standard normal noise, sample i from its own generator seeded by (seed, i)."""
    out = torch.empty((num_samples, *shape))
    for i in range(num_samples):
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + i) % (2**63))
        out[i] = torch.randn(tuple(shape), generator=g)
    return out


def resolve_device(device: Optional[str] = None) -> torch.device:
    """``device``, or cuda when available; a clear error when CUDA is asked for and absent."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ParamError("device", f"device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ParamError("device", f"device {device!r}: eqmctl runs on cpu or cuda devices")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParamError("device", f"device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ParamError("device", f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _autocast(device: torch.device, dtype: Optional[str]):
    """The model's autocast: bf16 on CUDA or the CPU (AVX-512 BF16 / AMX CPUs run it natively),
    fp16 on CUDA only; the weights stay float32."""
    import contextlib

    if dtype in (None, "fp32", "float32", "no"):
        return contextlib.nullcontext()
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ParamError("dtype", f"dtype must be fp32, bf16 or fp16, got {dtype!r}")
    if device.type != "cuda" and table[dtype] is torch.float16:
        raise ParamError("dtype", f"dtype {dtype} needs a CUDA device (running on {device.type}); use bf16 there")
    return torch.autocast(device_type=device.type, dtype=table[dtype])


def generate(
    model,
    *,
    fps,
    num_frames: int,
    num_samples: int = 1,
    labels: Optional[torch.Tensor] = None,
    settings: Optional[SamplerSettings] = None,
    seed: int = 0,
    batch_size: Optional[int] = None,
    dtype: Optional[str] = None,
    progress: Optional[Callable[[int], None]] = None,
    vae=None,
    window: Optional[int] = None,
) -> Generation:
    """Sample ``num_samples`` clips of ``num_frames`` frames at timestamps k / fps.

    settings: the sampler (default ``SamplerSettings()``; what is not chosen takes the measured
    defaults, guidance none; the resolved settings are in the result).  Batches of ``batch_size``
    (default: all at once) go through :func:`eqm.sampler.sample`; ``progress(n)`` is called with
    the number of samples finished after each batch.  ``dtype`` "bf16" runs the model under
    autocast (CUDA or CPU), "fp16" under CUDA autocast.  vae (an eqm.vae.Vae): a latent-space model; the latents of those frames are sampled at the
    latent timestamps of k / fps (eqm.vae.plan_latents) and decoded.  window: model frames per
    model call (latent frames for a latent model); a longer clip is made window by window, each
    window with the frames it shares with the one before clamped (:func:`window_spans`); None =
    the whole clip in one call.
    """
    from .vae import plan_latents

    fps = parse_fps(fps, name="fps")
    settings = (settings or SamplerSettings()).resolved()
    check_batch_options(num_samples, batch_size)
    if settings.guidance != 1.0 and labels is None:
        raise ParamError("cfg_scale", "cfg_scale needs a class-conditional model (this one has no classes)")

    device = next(model.parameters()).device
    C = model.config.in_channels
    H, W = model.config.input_size
    plan = plan_latents(fps, num_frames, 1 if vae is None else vae.temporal)
    ts = plan.latent_timestamps
    bs = num_samples if batch_size is None else batch_size
    spans = window_spans(plan.num_latents, window, model.config.temporal_patch)
    _check_work(model, spans[0][1] - spans[0][0], min(bs, num_samples), device, settings)
    noise = sample_noise(num_samples, (C, plan.num_latents, H, W), seed)

    outs, evals, rms = [], [], []
    for start in range(0, num_samples, bs):
        stop = min(num_samples, start + bs)
        n = stop - start
        y = None if labels is None else labels[start:stop].to(device)
        res = _sample_windows(model, noise[start:stop].to(device), ts.to(device).expand(n, -1), y, settings, spans, dtype)
        x = res.x.float().cpu()
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"sampling diverged (non-finite values) with step_size {settings.step_size}; "
                                 "try a smaller step_size")
        outs.append((x if vae is None else vae.decode(x)).clamp(-1, 1))
        evals.append(res.evals.cpu())
        rms.append(res.final_rms.float().cpu())
        if progress is not None:
            progress(stop)
    return Generation(
        videos=torch.cat(outs), labels=labels, evals=torch.cat(evals), final_rms=torch.cat(rms),
        timestamps=plan.frame_timestamps, fps=fps, settings=settings, seed=seed, dtype=dtype or "fp32",
        latent_timestamps=None if vae is None else ts,
    )


def window_spans(num_frames: int, window: Optional[int] = None, temporal_patch: int = 1) -> list:
    """Frame ranges [a, b) of the model calls that make a clip of ``num_frames`` frames.

    One call when ``window`` is None or covers the clip; else windows of ``window`` frames, each
    starting where the one before is half done (so half of every later window is clamped to
    frames already made), the last one ending at the clip's end.  A model trained on short clips
    then meets its training length at any clip length, and attention stays window-sized.
    """
    if window is None or window >= num_frames:
        return [(0, num_frames)]
    if isinstance(window, bool) or not isinstance(window, int) or window < 2 or window % temporal_patch:
        raise ParamError("window", f"window must be an integer >= 2 and a multiple of the model's temporal patch "
                                   f"({temporal_patch}), got {window!r}")
    advance = max(temporal_patch, (window // 2) // temporal_patch * temporal_patch)
    spans = [(0, window)]
    while spans[-1][1] < num_frames:
        a = min(spans[-1][0] + advance, num_frames - window)
        spans.append((a, a + window))
    return spans


def _sample_windows(model, noise: torch.Tensor, ts: torch.Tensor, y, settings: SamplerSettings, spans: list,
                    dtype: Optional[str]):
    """eqm.sampler.sample over the windows ``spans`` of one batch: the first window from its noise,
    each later one with its frames made so far clamped (conditional generation); evals add up."""
    from .sampler import sample

    x, done_to, total = noise.clone(), 0, None
    for a, b in spans:
        known = mask = None
        if done_to > a:
            mask = torch.zeros(x.shape[0], b - a, dtype=torch.bool, device=x.device)
            mask[:, : done_to - a] = True
            known = x[:, :, a:b]
        with _autocast(x.device, dtype):
            res = sample(model, x[:, :, a:b], ts[:, a:b], y, settings, known=known, known_mask=mask)
        x[:, :, a:b] = res.x.to(x.dtype)
        evals = res.evals if total is None else total.evals + res.evals
        total = replace(res, x=x, evals=evals)
        done_to = b
    return total


def _check_work(model, num_frames: int, batch: int, device, settings: SamplerSettings) -> None:
    """Refuse (with the estimate) a clip with too many tokens or a batch that cannot fit in memory;
    with guidance the sampler runs the conditional and null-label passes as one double batch."""
    from . import budget

    cfg = model.config
    grid = cfg.grid[0] * cfg.grid[1]
    batch = batch * (2 if settings.guidance != 1.0 else 1)
    budget.check_activations(f"{num_frames} frames of {cfg.input_size[0]}x{cfg.input_size[1]}", batch=batch,
                             tokens=num_frames // cfg.temporal_patch * grid, hidden_size=cfg.hidden_size,
                             depth=cfg.depth, device=device)


def upscale(videos: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour enlargement of (N, C, T, H, W) clips by an integer factor (tiny models
    make 24-pixel clips that players show as a speck; nearest keeps the pixels honest).  The
    factor is checked by :func:`check_output_options`."""
    if factor == 1:
        return videos
    return videos.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


@dataclass
class WrittenSample:
    index: int
    path: Path
    label: Optional[int]
    frames: int
    duration: float
    evals: int
    final_rms: float
    png_dir: Optional[Path] = None


@dataclass
class WriteSummary:
    out_dir: Path
    fps: Fraction
    samples: list
    grid: Optional[Path]
    manifest: Path
    warnings: list


def write_generation(
    gen: Generation,
    out_dir,
    *,
    fmt: str = "mp4",
    prefix: str = "sample",
    png: bool = False,
    grid: bool = False,
    scale: int = 1,
    class_names: Sequence[str] = (),
    meta: Optional[dict] = None,
) -> WriteSummary:
    """Write each clip as ``<prefix>_<i>_<label>_<fps>fps.<fmt>`` (plus PNG frames and a grid)
    and ``<prefix>s.json`` describing them.

    Every file is written atomically, so an interrupted run leaves complete files only.
    """
    from .video.io import to_uint8, write_grid_png, write_png_frames, write_video

    check_output_options(out_dir, fmt, scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    videos = upscale(gen.videos, scale)
    tag = fps_tag(gen.fps)
    written, warnings = [], []
    for i in range(videos.shape[0]):
        label = None if gen.labels is None else int(gen.labels[i])
        lname = "" if label is None else f"_{class_names[label] if label < len(class_names) else f'class{label}'}"
        stem = f"{prefix}_{i:03d}{lname}_{tag}fps"
        res = write_video(out_dir / f"{stem}.{fmt}", videos[i], gen.fps)
        for w in res.warnings:
            w = w.replace(f"{Path(res.path).name}: ", "")  # the same note for every clip: say it once
            if w not in warnings:
                warnings.append(w)
        png_dir = None
        if png:
            png_dir = out_dir / f"{stem}_frames"
            write_png_frames(png_dir, to_uint8(videos[i]))
        written.append(WrittenSample(
            index=i, path=Path(res.path), label=label, frames=res.num_frames, duration=float(res.duration),
            evals=int(gen.evals[i]), final_rms=float(gen.final_rms[i]), png_dir=png_dir,
        ))
    grid_path = None
    if grid:
        grid_path = out_dir / f"{prefix}_grid_{tag}fps.png"
        write_grid_png(grid_path, videos)
    manifest = out_dir / f"{prefix}s.json"
    doc = {
        "fps": str(gen.fps),
        "fps_float": float(gen.fps),
        "num_frames": gen.num_frames,
        "duration": gen.duration,
        "timestamps": [round(float(t), 9) for t in gen.timestamps],
        **({} if gen.latent_timestamps is None
           else {"latent_timestamps": [round(float(t), 9) for t in gen.latent_timestamps]}),
        "settings": {**gen.settings.to_dict(), "seed": gen.seed, "dtype": gen.dtype},
        **(meta or {}),
        "samples": [
            {"file": w.path.name, "label": w.label, "frames": w.frames, "duration": w.duration,
             "evals": w.evals, "final_rms": w.final_rms, "png_dir": None if w.png_dir is None else w.png_dir.name}
            for w in written
        ],
        "grid": None if grid_path is None else grid_path.name,
    }
    fsio.write_json(manifest, doc)
    return WriteSummary(out_dir=out_dir, fps=gen.fps, samples=written, grid=grid_path, manifest=manifest, warnings=warnings)


def load_for_sampling(ckpt=None, *, use_ema: bool = True, device: Optional[str] = None, runs_root="runs"):
    """The model of a checkpoint, in eval mode on ``device``, and notes for the user.

    ckpt: what :func:`eqm.checkpoint.resolve_checkpoint` takes (None: the latest run under
    ``runs_root``; a run's damaged newest checkpoint is passed over).  Returns (model, state,
    notes); the notes say when a checkpoint was passed over, and when the EMA weights were asked
    for and the checkpoint has none, so the raw weights are used.  On the CPU the process keeps
    the memory it frees for the next sampler step (eqm.allocator).
    """
    from .allocator import keep_freed_memory
    from .checkpoint import EMA_FILE, load_model, resolve_checkpoint

    notes: list = []
    dev = resolve_device(device)
    if dev.type == "cpu":
        keep_freed_memory()
    path = resolve_checkpoint(ckpt, runs_root, warn=notes.append)
    model, state = load_model(path, use_ema=use_ema, device=dev)
    if use_ema and Path(state["weights"]).name != EMA_FILE:
        notes.append(f"{path} has no EMA weights; using the raw weights")
    return model, state, notes


@dataclass
class SampleRun:
    """What :func:`sample_checkpoint` did: the checkpoint, the clips, the files, and the notes
    (warnings) it had for the user."""

    checkpoint: Path
    state: dict
    generation: Generation
    written: WriteSummary
    notes: list


def sample_checkpoint(
    ckpt=None,
    *,
    fps,
    out_dir="samples",
    frames: Optional[int] = None,
    seconds: Optional[float] = None,
    num_samples: int = 4,
    labels: Optional[str] = None,
    settings: Optional[SamplerSettings] = None,
    seed: int = 0,
    use_ema: bool = True,
    runs_root="runs",
    fmt: str = "mp4",
    png: bool = False,
    grid: bool = False,
    upscale: int = 1,
    batch_size: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    vae_path=None,
    window: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
    on_note: Optional[Callable[[str], None]] = None,
) -> SampleRun:
    """Everything ``eqmctl sample`` does: load a checkpoint, sample clips at ``fps``, write them.

    * ckpt: a checkpoint or run directory (None: the latest run under ``runs_root``); the EMA
      weights unless ``use_ema`` is False (raw weights, with a note, when it has no EMA file).
    * frames / seconds (at most one): clip length; default the model's training clip length,
      shortened at rates below its training range so the clip stays inside the seconds it was
      trained on (:func:`plan_frames`; a note when a clip given reaches past them).
    * labels: "0,2" or class names, cycled over the samples (None: every class in turn).
    * window: model frames per model call for long clips (:func:`generate`); None = one call.
    * settings: the sampler; guidance not chosen = the recipe's ``sample.cfg_scale``.
    * A latent-space checkpoint is decoded with the VAE it recorded (``vae_path`` when its folder
      moved; eqm.latent.checkpoint_vae).
    * Files: ``out_dir/<prefix>_<i>_<label>_<fps>fps.<fmt>`` and ``samples.json``.

    Notes (warnings) go to ``on_note`` as they arise and into the result.  Every argument is
    checked before the checkpoint is read; nothing is written unless sampling succeeds.
    """
    from .checkpoint import EMA_FILE
    from .latent import checkpoint_vae

    notes: list = []

    def note(text: str) -> None:
        notes.append(text)
        if on_note is not None:
            on_note(text)

    rate = parse_fps(fps, name="fps")
    settings = settings or SamplerSettings()
    check_output_options(out_dir, fmt, upscale)
    check_batch_options(num_samples, batch_size)
    model, state, load_notes = load_for_sampling(ckpt, use_ema=use_ema, device=device, runs_root=runs_root)
    for text in load_notes:
        note(text)
    decoder = checkpoint_vae(state, vae_path, next(model.parameters()).device, where=state["checkpoint"])
    recipe, class_names = state.get("recipe"), list(state.get("class_names") or [])
    T, beyond = plan_frames(model, recipe, rate, frames, seconds, temporal=1 if decoder is None else decoder.temporal)
    if beyond:
        note(beyond)
    y = parse_labels(labels, model.config.num_classes, num_samples, class_names)
    settings = settings.with_default_guidance(recipe_cfg_scale(recipe) if y is not None else 1.0)
    try:
        gen = generate(model, fps=rate, num_frames=T, num_samples=num_samples, labels=y, settings=settings,
                       seed=seed, batch_size=batch_size, dtype=dtype, progress=progress, vae=decoder, window=window)
    except NonFiniteError as e:  # the model is what broke: name its checkpoint
        raise NonFiniteError(f"checkpoint {state['checkpoint']}: {e}") from None
    weights = "ema" if Path(state["weights"]).name == EMA_FILE else "raw"
    written = write_generation(
        gen, out_dir, fmt=fmt, png=png, grid=grid, scale=upscale, class_names=class_names,
        meta={"checkpoint": state["checkpoint"], "step": state.get("step"), "weights": weights,
              "time_mode": model.config.time_mode, "window": window,
              "vae": None if decoder is None else decoder.identity.to_dict()},
    )
    for text in written.warnings:
        note(text)
    return SampleRun(checkpoint=Path(state["checkpoint"]), state=state, generation=gen, written=written, notes=notes)


def check_output_options(out_dir, fmt: str = "mp4", scale: int = 1) -> None:
    """The write options of :func:`write_generation` (also checked before sampling starts)."""
    if fmt not in FORMATS:
        raise ParamError("fmt", f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ParamError("out_dir", f"out_dir {out_dir} exists and is not a folder")
    if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= MAX_UPSCALE:
        raise ParamError("upscale", f"upscale must be an integer between 1 and {MAX_UPSCALE}, got {scale}")


def check_batch_options(num_samples: int, batch_size: Optional[int]) -> None:
    """The counts of :func:`generate` (also checked before the checkpoint is read)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ParamError("num_samples", f"num_samples must be an integer >= 1, got {num_samples}")
    if batch_size is not None and batch_size < 1:
        raise ParamError("batch_size", f"batch_size must be >= 1, got {batch_size}")
