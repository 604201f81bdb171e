"""The training loop: Hugging Face Accelerate, EMA, warmup, clipping, accumulation, checkpoints.

``train(recipe, run_dir=None, resume=None)`` is the whole thing; ``eqmctl train`` is a thin CLI
over it, and the same call works in a plain process, or under ``accelerate launch`` with several
processes, GPUs or nodes (DDP through Accelerate).  Randomness is a function of (seed, step,
micro-batch, rank), so a resumed run ends with the weights of an uninterrupted one; a loss or
gradient norm that is NaN/inf or far above its running level (:class:`DivergenceGuard`) stops the
run before the step is applied, naming a checkpoint whose weights still gave a healthy loss; only
the main process writes the run directory (:class:`eqm.rundir.RunDir`), which it locks for the
whole run.  Each design point and its reason: docs/design.md#training-loop.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from . import checkpoint as ckpt_io
from .config import EqMConfig
from .distributed import before_process_group
from .errors import EqmError, ParamError
from .timebase import format_eta
from .recipe import Recipe, check_memory
from .rundir import RunDir

PathLike = Union[str, Path]


# ============================================================================================
# Seeds and data order
# ============================================================================================


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. (seed, "noise", step, micro, rank))."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class StepBatchSampler(torch.utils.data.Sampler):
    """Micro-batch number -> dataset indices, with no state to replay.

    The stream of samples is the concatenation of epoch permutations (``randperm(n)`` seeded
    from (seed, epoch)); global micro-batch ``m`` covers stream positions
    ``[(m * world + rank) * B, ... + B)``, so ranks read disjoint slices and every epoch is
    visited without replacement.  Iteration starts at ``start_micro`` and stops at
    ``stop_micro`` (None = never: training is bounded by steps, not epochs).
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world: int = 1,
                 start_micro: int = 0, stop_micro: Optional[int] = None):
        if n < 1:
            raise EqmError("the dataset is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world
        self.start_micro, self.stop_micro = start_micro, stop_micro
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            perm = torch.randperm(self.n, generator=g)
            self._perm_cache = {epoch: perm}  # keep one: epochs are visited in order
        return perm

    def indices(self, micro: int) -> list[int]:
        first = (micro * self.world + self.rank) * self.batch_size
        out = []
        for pos in range(first, first + self.batch_size):
            epoch, i = divmod(pos, self.n)
            out.append(int(self._perm(epoch)[i]))
        return out

    def __iter__(self):
        m = self.start_micro
        while self.stop_micro is None or m < self.stop_micro:
            yield self.indices(m)
            m += 1

    def __len__(self):
        if self.stop_micro is None:
            raise TypeError("StepBatchSampler without stop_micro has no length")
        return max(0, self.stop_micro - self.start_micro)


# ============================================================================================
# Components
# ============================================================================================


def resolve_num_classes(recipe: Recipe, dataset) -> int:
    """model.num_classes, or the dataset's count when null; checks the labels fit."""
    have = int(getattr(dataset, "num_classes", 0) or 0)
    n = recipe.model.num_classes
    if n is None:
        return have
    if 0 < n < have:
        raise EqmError(f"model.num_classes={n} but the dataset has {have} classes (set it to {have} or null)")
    return n


def build_model(recipe: Recipe, num_classes: int, *, time_order: Optional[str] = None,
                shape: Optional[tuple] = None):
    """The model of a recipe, initialised from ``train.seed`` (identical on every rank).

    time_order: the sincos layout to use instead of the recipe's (a resumed run keeps its checkpoint's).
    shape: (C, T, H, W) of its input, see Recipe.model_config.
    """
    from .model import EqMTransformer

    config = recipe.model_config(num_classes, shape, **({} if time_order is None else {"time_order": time_order}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        return EqMTransformer(config)


def apply_init_from(model, recipe: Recipe):
    """``model.init_from``: initial weights mapped onto the freshly built model (eqm.adapt).

    Returns the :class:`eqm.adapt.InitReport` (its ``lines()`` are the start-up table), or None
    when the recipe has no init_from.
    """
    from .adapt import init_from

    path = recipe.model.init_from
    if not path:
        return None
    if not Path(path).exists():
        raise EqmError(f"model.init_from: {path} not found (an official EqM .pt, an eqmctl checkpoint or run directory, or a .safetensors file)")
    return init_from(model, path, recipe.model.init_weights)


def resume_time_order(recipe: Recipe, state: dict, ckpt) -> str:
    """The sincos layout a run resumed from ``ckpt`` keeps: the checkpoint's own.

    ``model.time.order: null`` means "new models get the default", not "change this run's layout";
    an explicit order that differs from the checkpoint's is an error, since the weights were
    trained against the other layout and would load without complaint.
    """
    saved = EqMConfig.from_dict(state["arch"], str(ckpt)).time_order
    asked = recipe.model.time.order
    if asked is not None and asked != saved:
        raise EqmError(
            f"model.time.order is {asked} but {ckpt} was trained with {saved}: "
            f"set it to {saved} (or null) to resume, or start a new run"
        )
    return saved


def build_optimizer(model, recipe: Recipe):
    """AdamW over the trainable parameters and its warmup/constant|cosine LambdaLR."""
    t = recipe.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=LRSchedule(t.warmup_steps, t.steps, t.lr_schedule, t.min_lr_ratio))
    return opt, sched


def resume_schedule(optimizer, recipe: Recipe, saved: dict):
    """The LR scheduler of a resumed run: the recipe's schedule, at the checkpoint's step.

    ``optimizer`` has had the checkpoint's state loaded, which brings back the checkpoint's lr and
    weight decay; loading the saved scheduler would also bring back its LRSchedule fields (LambdaLR
    restores a callable object's attributes).  Either would silently override the recipe: a run
    resumed with a raised ``train.steps`` would spend every added step at the first run's final lr,
    and "lower train.lr, then --resume" after a divergence would change nothing.  So the recipe's
    ``lr``, ``weight_decay`` and schedule are applied here, counted from the saved step.

    Returns ``(scheduler, note)``: note is None when every remaining step gets the lr the
    checkpoint's schedule would have given it, else one line saying what changed (for the log).
    """
    t = recipe.train
    step = int(saved["last_epoch"])
    saved_lr, saved_base = saved.get("_last_lr") or [None], saved.get("base_lrs") or [None]
    saved_fn = (saved.get("lr_lambdas") or [None])[0]  # the saved LRSchedule's attributes
    for g in optimizer.param_groups:
        g["initial_lr"] = t.lr
        g["weight_decay"] = t.weight_decay
    fn = LRSchedule(t.warmup_steps, t.steps, t.lr_schedule, t.min_lr_ratio)
    # last_epoch = step - 1: the constructor steps once, to `step`, and sets the lr of that step.
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=fn, last_epoch=step - 1)
    lr = optimizer.param_groups[0]["lr"]
    known = isinstance(saved_fn, dict) and saved_fn.keys() == {f.name for f in fields(LRSchedule)}
    if known and saved_lr[0] is not None and saved_base[0] is not None:
        was = LRSchedule(**saved_fn)
        # the same lr for every remaining step (a constant schedule's total does not matter)
        if all(math.isclose(saved_base[0] * was(k), t.lr * fn(k), rel_tol=1e-6) for k in range(step, max(step + 1, t.steps))):
            return sched, None
        old = f"{was.kind}" + (f" over {was.total} steps" if was.kind != "constant" else "") + f", lr {saved_lr[0]:.2e}"
    else:
        old = "unknown"
    new = f"{t.lr_schedule}" + (f" over {t.steps} steps" if t.lr_schedule != "constant" else "")
    return sched, (f"lr schedule from the recipe: {new}, peak {t.lr:.2e} (the checkpoint's: {old}); "
                   f"lr at step {step}: {lr:.2e}")


@dataclass
class LRSchedule:
    """Multiplier of the peak lr for the optimizer step ``step`` (0-based): linear warmup, then
    constant or cosine decay to ``min_ratio`` at the last step."""

    warmup: int
    total: int
    kind: str = "constant"
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total - self.warmup - 1)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's weights (float32, on the model's device).

    ``update(model)`` after each optimizer step: ema = decay * ema + (1 - decay) * weights.
    ``module`` is a full model copy (eval mode, no grads) used for previews and saved as
    ema.safetensors.
    """

    def __init__(self, model, decay: float):
        self.decay = float(decay)
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model) -> None:
        ema = list(self.module.state_dict().values())
        cur = list(model.state_dict().values())
        floats = [(e, c) for e, c in zip(ema, cur) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [c.detach().float() for _, c in floats], 1.0 - self.decay)
        for e, c in zip(ema, cur):
            if not e.is_floating_point():
                e.copy_(c)


@dataclass
class DivergenceGuard:
    """Tells a diverging optimizer step from a healthy one, before the step is applied.

    A step diverges when its loss or gradient norm is NaN/inf, or when it exceeds ``loss_factor``
    (``grad_factor``) times its running level: the geometric mean of the healthy steps so far,
    weighted towards the last ~50.  The loss is compared from the second step on (it only falls
    from its initial value in healthy training); the gradient norm, whose healthy values rise
    and jump by 10x early on, after ``warmup`` healthy steps.  A factor of 0 turns that
    comparison off.  ``check_grad=False`` (fp16: its GradScaler skips steps with inf gradients by
    design) ignores the gradient norm.  Only healthy steps move the levels; checkpoints save them
    (:meth:`state`), so a resumed run judges its first step by the levels it had.
    """

    loss_factor: float = 10.0
    grad_factor: float = 100.0
    warmup: int = 50
    check_grad: bool = True
    steps: int = 0
    log_loss: Optional[float] = None
    log_grad: Optional[float] = None

    DECAY = 0.98

    @classmethod
    def for_recipe(cls, recipe: Recipe, saved: Optional[dict] = None) -> "DivergenceGuard":
        t = recipe.train
        guard = cls(t.diverge_loss, t.diverge_grad_norm, t.diverge_warmup, check_grad=t.mixed_precision != "fp16")
        if isinstance(saved, dict):
            guard.steps = int(saved.get("steps", 0))
            guard.log_loss, guard.log_grad = saved.get("log_loss"), saved.get("log_grad")
        return guard

    def state(self) -> dict:
        return {"steps": self.steps, "log_loss": self.log_loss, "log_grad": self.log_grad}

    def verdict(self, loss: float, grad_norm: float) -> Optional[str]:
        """None for a healthy step (and the levels move), else what is wrong with it."""
        if not math.isfinite(loss):
            return f"loss {loss}"
        if self.check_grad and not math.isfinite(grad_norm):
            return f"gradient norm {grad_norm}"
        checks = [("loss", loss, self.log_loss, self.loss_factor)]
        if self.check_grad and self.steps >= self.warmup:
            checks.append(("gradient norm", grad_norm, self.log_grad, self.grad_factor))
        for name, value, level, factor in checks:
            if factor > 0 and level is not None and value > factor * math.exp(level):
                return (f"{name} {value:.4g} is {value / math.exp(level):.3g} times its running level "
                        f"{math.exp(level):.4g} (train.diverge_{'loss' if name == 'loss' else 'grad_norm'}={factor:g})")
        self.log_loss = self._move(self.log_loss, loss)
        self.log_grad = self._move(self.log_grad, grad_norm) if math.isfinite(grad_norm) else self.log_grad
        self.steps += 1
        return None

    def _move(self, level: Optional[float], value: float) -> float:
        v = math.log(max(value, 1e-30))
        return v if level is None else self.DECAY * level + (1.0 - self.DECAY) * v


def check_tracker(backend: Optional[str]) -> Optional[str]:
    """The Accelerate ``log_with`` name for tracking.backend, or EqmError when its package is missing."""
    if backend is None:
        return None
    import importlib.util

    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}[backend]
    if not any(importlib.util.find_spec(p) is not None for p in packages):
        raise EqmError(f"tracking.backend is {backend} but the '{packages[0]}' package is not installed (pip install {packages[0]}, or set tracking.backend: null)")
    return backend


# ============================================================================================
# Validate (dry run)
# ============================================================================================


def validate_recipe(recipe: Recipe, warn: Optional[Callable[[str], None]] = None) -> dict:
    """Build every component (dataset, model, optimizer; read one clip) without training.

    Returns a summary dict: dataset size/classes/skipped, parameter counts, tokens per clip,
    clip shape, global batch, epochs the run will cover, device and process count.
    """
    from .latent import model_batch, model_input_shape, recipe_dataset, training_space

    check_tracker(recipe.tracking.backend)
    check_memory(recipe, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = recipe_dataset(recipe, warn=warn)
    num_classes = resolve_num_classes(recipe, dataset)
    space = training_space(recipe, dataset)
    shape = model_input_shape(recipe, space, dataset)
    if space is not None:
        check_memory(recipe, torch.device("cuda" if torch.cuda.is_available() else "cpu"), shape=shape)
    model = build_model(recipe, num_classes, shape=shape)
    init_report = apply_init_from(model, recipe)
    if init_report is not None and warn is not None:
        for text in init_report.warnings:
            warn(text)
    opt, _ = build_optimizer(model, recipe)
    item = dataset[0]
    batch = torch.utils.data.default_collate([item])
    clip = tuple(model_batch(space, batch, "cpu", torch.Generator().manual_seed(0))[0].shape[1:])
    if clip != tuple(shape):
        raise EqmError(f"the dataset yields clips of shape {clip}, the model expects {tuple(shape)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    t = recipe.train
    global_batch = t.batch_size * t.grad_accum * world
    return {
        "name": recipe.name,
        "source": recipe.data.source,
        "dataset_size": len(dataset),
        "num_classes": num_classes,
        "class_names": list(getattr(dataset, "class_names", []) or []),
        "skipped_files": int(getattr(dataset, "skipped", 0) or 0),
        "clip_shape": list(clip),
        "latent_space": None if space is None else ("cache " if recipe.data.source == "latents" else "on the fly ")
        + space.identity.describe(),
        "first_clip_fps": float(item.get("fps", float("nan"))),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tokens_per_clip": (model.config.num_frames // recipe.model.temporal_patch) * model.config.grid[0] * model.config.grid[1],
        "arch": model.config.to_dict(),
        "init_from": None if init_report is None else {"source": init_report.source, "weights": init_report.weights,
                                                       "rows": init_report.rows()},
        "optimizer": f"AdamW(lr={t.lr:g}, weight_decay={t.weight_decay:g}) with {len(opt.param_groups[0]['params'])} tensors",
        "processes": world,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "global_batch": global_batch,
        "steps": t.steps,
        "epochs": t.steps * global_batch / len(dataset),
    }


# ============================================================================================
# Run directory
# ============================================================================================


def new_run_dir(runs_root: PathLike, name: str) -> Path:
    """runs_root/<name>-<YYYYmmdd-HHMMSS> (a -2, -3 suffix if taken)."""
    root = Path(runs_root)
    base = f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path, k = root / base, 2
    while path.exists():
        path, k = root / f"{base}-{k}", k + 1
    return path


def _plan_run(recipe: Recipe, run_dir: Optional[PathLike], resume: Optional[PathLike], runs_root: PathLike,
              warn: Callable[[str], None]):
    """(run_dir, checkpoint to resume or None), decided on the main process. "latest" and a run
    directory mean the newest checkpoint that can be read (a newer damaged one is passed over, with
    a warning)."""
    if resume is not None:
        if run_dir is not None and str(resume) == "latest":
            ck = ckpt_io.latest_readable(run_dir, training=True, warn=warn)
            if ck is None:
                raise ParamError("resume", f"resume 'latest': run directory {run_dir} has no checkpoint")
        elif str(resume) == "latest":
            ck = ckpt_io.resolve_checkpoint("latest", runs_root, run_prefix=recipe.name, warn=warn, training=True)
        else:
            ck = ckpt_io.resolve_checkpoint(resume, runs_root, warn=warn, training=True)
        return Path(run_dir) if run_dir is not None else ckpt_io.run_dir_of(ck), ck
    if run_dir is not None:
        run_dir = Path(run_dir)
        if ckpt_io.list_checkpoints(run_dir):
            raise EqmError(f"run directory {run_dir} already has checkpoints; resume='latest' continues it (eqmctl train --resume latest), or choose another run_dir")
        return run_dir, None
    return new_run_dir(runs_root, recipe.name or "run"), None


def _recipe_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _recipe_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


# ============================================================================================
# Logging
# ============================================================================================


class _Reporter:
    """Main-process output: rich progress on a TTY, plain lines otherwise; every line also goes
    to log.txt and metrics rows to metrics.jsonl.  With ``files=None`` (other ranks) it is silent."""

    def __init__(self, files: Optional[RunDir], total: int, start: int, log: Optional[Callable[[str], None]]):
        self.files = files
        self._log = log
        self.progress = None
        self.task = None
        if files is not None and log is None and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[sps]} samples/s"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=False,
            )
            self.task = self.progress.add_task("train", total=total, completed=start, loss="-", sps="-")
            self.progress.start()

    def line(self, text: str, echo: bool = True) -> None:
        """Append to log.txt and (echo) show it; echo=False for text the caller reports itself."""
        if self.files is None:
            return
        self.files.log(text)
        if not echo:
            return
        if self._log is not None:
            self._log(text)
        elif self.progress is not None:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, flush=True)

    def metrics(self, row: dict) -> None:
        if self.files is not None:
            self.files.metrics(row)

    def advance(self, step: int, loss: float, sps: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", sps=f"{sps:.1f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


# ============================================================================================
# Previews
# ============================================================================================


def write_preview(model, recipe: Recipe, path: Path, device, space=None) -> Path:
    """Sample ``train.preview_samples`` clips from ``model`` (the EMA) at ``train.preview_fps`` and
    write them side by side as one video (format from the suffix, MP4 by default).

    The noise is the same at every preview (seeded from train.seed), so successive previews
    show the model's progress on fixed inputs; labels cycle through the classes. In latent space
    (``space``, an eqm.latent.LatentSpace with its VAE loaded) the latents of T frames at the
    preview rate are sampled and decoded.
    """
    from .sampler import sample
    from .vae import plan_latents
    from .video.io import write_video

    t = recipe.train
    fps = recipe.preview_rate()
    T = t.preview_frames or recipe.data.num_frames
    n = t.preview_samples
    plan = plan_latents(fps, T, space.temporal if space is not None else 1)
    ts = plan.latent_timestamps.to(device=device, dtype=torch.float32)
    cfg = model.config
    y = torch.arange(n, device=device) % cfg.num_classes if cfg.num_classes > 0 else None
    gen = torch.Generator().manual_seed(derive_seed(t.seed, "preview"))
    shape = (n, cfg.in_channels, plan.num_latents, *cfg.input_size)
    settings = recipe.sampler_settings()
    if y is None:
        settings = dataclasses.replace(settings, cfg_scale=1.0)  # an unconditional model has nothing to guide
    out = sample(model, shape, ts.expand(n, -1), y, settings, generator=gen)
    x = out.x.float()
    x = (space.decode(x) if space is not None else x).clamp(-1, 1).cpu()  # (n, 3, T, H, W)
    tiled = torch.cat(list(x), dim=-1)  # (C, T, H, n*W)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, tiled, fps)
    return path


# ============================================================================================
# Training
# ============================================================================================


@dataclass
class TrainResult:
    """What a finished run left behind."""

    run_dir: Path
    step: int
    start_step: int
    last_checkpoint: Optional[Path]
    final_loss: Optional[float]
    world_size: int
    checksum: str
    elapsed: float
    previews: list[Path] = field(default_factory=list)


def native_bf16(cuda: bool) -> bool:
    """Whether bf16 autocast pays here: a CUDA device with bf16, or a CPU whose instruction set
    has bf16 arithmetic (AVX-512 BF16 or AMX; read from /proc/cpuinfo, so False off Linux).
    Elsewhere bf16 matrix products are emulated and slower than float32."""
    if cuda:
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_mixed_precision(setting: str, cuda: bool) -> str:
    """``train.mixed_precision`` as training runs it here: "bf16", "fp16" or "no".  auto = bf16
    where it is native (:func:`native_bf16`), else no; fp16 without a GPU = no (bf16 autocast
    runs on the CPU, fp16 does not)."""
    if setting == "auto":
        return "bf16" if native_bf16(cuda) else "no"
    return "no" if setting == "fp16" and not cuda else setting


def _build_accelerator(recipe: Recipe, run_dir: Optional[Path], warn: Callable[[str], None]):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    setting = recipe.train.mixed_precision
    mp = resolve_mixed_precision(setting, cuda)
    if setting == "fp16" and mp == "no":
        warn(f"train.mixed_precision={setting} needs a GPU; training in float32 on the CPU (bf16 works there)")
    log_with = check_tracker(recipe.tracking.backend)
    kwargs: dict[str, Any] = {}
    if log_with is not None:
        kwargs.update(log_with=log_with, project_dir=str(run_dir) if run_dir is not None else None)
    before_process_group()

    # Accelerate keeps one AcceleratorState per process and refuses a second Accelerator with
    # another mixed precision ("already been initialized"), so a library caller's second train()
    # could not switch precision; forget it (the process group, PartialState, is kept).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True without a GPU: under `accelerate launch --multi_gpu` this makes the ranks a real
    # gloo process group (a plain Accelerator() would train unrelated models, see module doc).
    return Accelerator(
        cpu=not cuda, mixed_precision=mp, gradient_accumulation_steps=recipe.train.grad_accum, **kwargs
    )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = "null" if v is None else v
    return out


def train(
    recipe: Recipe,
    run_dir: Optional[PathLike] = None,
    resume: Optional[PathLike] = None,
    *,
    runs_root: PathLike = "runs",
    log: Optional[Callable[[str], None]] = None,
    warn: Optional[Callable[[str], None]] = None,
) -> TrainResult:
    """Train ``recipe``; returns a :class:`TrainResult`.

    run_dir: where to write (default ``runs_root/<recipe.name>-<timestamp>``); a new run refuses a
    directory that already has checkpoints.  resume: a checkpoint directory, a run directory or
    ``"latest"`` (the latest checkpoint in ``run_dir`` if given, else of the newest run of this
    recipe name under ``runs_root``); training continues in that run's directory at the saved
    step, with the recipe passed here (changed keys are listed in a warning).  log / warn:
    callables for output lines (default: print / stderr).

    Raises EqmError: exit_code=1 when the training diverges (:class:`DivergenceGuard`; the
    message names the last good checkpoint) or a file cannot be written; 2 for bad input, or
    when another training holds the run directory's lock.
    """
    warn = warn or _warn_stderr
    t0 = time.time()
    accelerator = _build_accelerator(recipe, Path(run_dir) if run_dir is not None else None, warn)
    plan = _plan(accelerator, recipe, run_dir, resume, runs_root, warn)
    try:
        run = _setup_run(recipe, accelerator, plan, warn)
        if plan.resume_ckpt is not None:
            _restore(run, plan.resume_ckpt, warn)
        run.model, run.optimizer = accelerator.prepare(run.model, run.optimizer)
        run.raw_model = accelerator.unwrap_model(run.model)
        reporter = _open_run_dir(run, log, warn)
        loop = _Loop(run, reporter, t0)
        try:
            loop.train()
        finally:
            reporter.close()
            if run.files is not None and run.log_with:
                accelerator.end_training()
        return _finish(run, loop, reporter, t0)
    finally:
        if plan.files is not None:
            plan.files.unlock()


def _warn_stderr(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


@dataclass
class _Plan:
    """Where a run writes and which checkpoint it resumes, decided once on the main process.
    ``files``: the run directory, locked, on the main process; None on the other ranks."""

    run_dir: Path
    resume_ckpt: Optional[Path]
    files: Optional[RunDir] = None


def _plan(accelerator, recipe: Recipe, run_dir, resume, runs_root, warn: Callable[[str], None]) -> _Plan:
    """:func:`_locked_plan` on the main process, broadcast to every rank (its error raised on all)."""
    from accelerate.utils import broadcast_object_list

    msg: list[Any] = [None, None, None]
    files = None
    if accelerator.is_main_process:
        try:
            files, ck = _locked_plan(recipe, run_dir, resume, runs_root, warn)
            msg = [str(files.path), None if ck is None else str(ck), None]
        except EqmError as e:
            msg = [None, None, (str(e), e.exit_code)]
    if accelerator.num_processes > 1:
        broadcast_object_list(msg)
    if msg[2] is not None:
        raise EqmError(*msg[2])
    if check_tracker(recipe.tracking.backend):
        accelerator.project_configuration.set_directories(msg[0])
    return _Plan(Path(msg[0]), Path(msg[1]) if msg[1] else None, files)


def _locked_plan(recipe: Recipe, run_dir, resume, runs_root, warn: Callable[[str], None]) -> tuple[RunDir, Optional[Path]]:
    """:func:`_plan_run` with the run directory locked for this process.  A named ``run_dir`` is
    locked before its checkpoints are looked at, so two trainings never both decide on it."""
    given = RunDir(run_dir) if run_dir is not None else None
    if given is not None:
        given.lock()
    try:
        rd, ck = _plan_run(recipe, run_dir, resume, runs_root, warn)
        files = given or RunDir(rd)
        if given is None:
            files.lock()
        return files, ck
    except BaseException:
        if given is not None:
            given.unlock()
        raise


@dataclass
class _Run:
    """What the loop trains with.  ``files`` is the run directory's writer on the main process
    and None on the other ranks (only the main process writes)."""

    recipe: Recipe
    accelerator: Any
    run_dir: Path
    files: Optional[RunDir]
    dataset: Any
    num_classes: int
    model: Any  # after accelerator.prepare: DDP-wrapped under several processes
    ema: EMA
    optimizer: Any
    scheduler: Any
    resume_state: Optional[dict] = None
    raw_model: Any = None
    start_step: int = 0
    resume_ckpt: Optional[Path] = None
    sched_note: Optional[str] = None
    init_report: Any = None  # eqm.adapt.InitReport of model.init_from, None without it
    space: Any = None  # eqm.latent.LatentSpace in latent space, None on pixels

    @property
    def log_with(self) -> Optional[str]:
        return check_tracker(self.recipe.tracking.backend)


def _setup_run(recipe: Recipe, accelerator, plan: _Plan, warn: Callable[[str], None]) -> _Run:
    """Build the dataset, the model (keeping a resumed checkpoint's time layout), EMA and optimizer;
    on the CPU the process then keeps the memory it frees for the next step (eqm.allocator)."""
    from .allocator import keep_freed_memory
    from .latent import model_input_shape, recipe_dataset, training_space

    if accelerator.device.type == "cpu":
        keep_freed_memory()
    main = accelerator.is_main_process
    check_memory(recipe, accelerator.device)  # before anything is built
    dataset = recipe_dataset(recipe, warn=warn if main else (lambda _msg: None))
    num_classes = resolve_num_classes(recipe, dataset)
    space = training_space(recipe, dataset, accelerator.device)
    shape = model_input_shape(recipe, space, dataset)
    if space is not None:
        check_memory(recipe, accelerator.device, shape=shape)  # the latents' token count is known now
    if space is not None and recipe.train.preview_every:  # load it now: a missing VAE fails before training
        space.vae(None if recipe.data.source != "latents" else recipe.vae.path, accelerator.device)
    state = ckpt_io.load_state(plan.resume_ckpt) if plan.resume_ckpt is not None else None
    order = resume_time_order(recipe, state, plan.resume_ckpt) if state is not None else None
    model = build_model(recipe, num_classes, time_order=order, shape=shape).to(accelerator.device)
    init_report = apply_init_from(model, recipe) if plan.resume_ckpt is None else None
    ema = EMA(model, recipe.train.ema_decay)
    optimizer, scheduler = build_optimizer(model, recipe)
    return _Run(
        recipe=recipe, accelerator=accelerator, run_dir=plan.run_dir, files=plan.files,
        dataset=dataset, num_classes=num_classes, model=model, ema=ema, optimizer=optimizer,
        scheduler=scheduler, resume_state=state, raw_model=model, init_report=init_report, space=space,
    )


def _restore(run: _Run, ckpt: Path, warn: Callable[[str], None]) -> None:
    """Load a checkpoint into the built run: weights, EMA, Adam moments, RNG state and step;
    the lr schedule is the recipe's, counted from the saved step (see resume_schedule)."""
    device = run.accelerator.device
    model_file, ema_file = ckpt / ckpt_io.MODEL_FILE, ckpt / ckpt_io.EMA_FILE
    ckpt_io.load_into(run.model, ckpt_io.load_weights(model_file, device), model_file)
    ckpt_io.load_into(run.ema.module, ckpt_io.load_weights(ema_file if ema_file.is_file() else model_file, device), ema_file)
    tstate = ckpt_io.load_training_state(ckpt, map_location="cpu")
    try:  # the structure is checked on load; values that do not fit this model are refused here
        run.optimizer.load_state_dict(tstate["optimizer"])
        run.scheduler, run.sched_note = resume_schedule(run.optimizer, run.recipe, tstate["scheduler"])
        ckpt_io.set_rng_state(tstate["rng"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        text = " ".join(str(e).split())[:200]
        raise EqmError(f"training state {ckpt / ckpt_io.OPTIM_FILE} does not fit this run: {type(e).__name__}: {text}") from None
    run.start_step = int(run.resume_state["step"])
    run.resume_ckpt = ckpt
    if run.files is not None:
        changed = _recipe_diff(run.resume_state.get("recipe", {}), run.recipe.to_dict())
        if changed:
            warn(f"resuming {ckpt} with a recipe that differs in: {', '.join(changed)}")


def _open_run_dir(run: _Run, log: Optional[Callable[[str], None]], warn: Callable[[str], None]) -> "_Reporter":
    """Main process: create the run directory's files and trackers, and log the run's first line."""
    t = run.recipe.train
    reporter = _Reporter(run.files, t.steps, run.start_step, log)
    if run.files is None:
        return reporter
    aside = run.files.start(run.recipe.to_yaml(), run.start_step)
    if run.log_with:
        run.accelerator.init_trackers(run.recipe.tracking.project, config=_flat(run.recipe.to_dict()))
    acc = run.accelerator
    what = f"resuming from {run.resume_ckpt} at step {run.start_step}" if run.resume_ckpt else "new run"
    if run.start_step >= t.steps:
        what += f"; nothing to train: the checkpoint is at step {run.start_step} >= train.steps (raise train.steps to continue)"
    reporter.line(
        f"run {run.run_dir} ({what}): {sum(p.numel() for p in run.raw_model.parameters()):,} parameters, "
        f"{len(run.dataset)} clips, {acc.num_processes} process(es) on {acc.device.type} "
        f"({'float32' if acc.mixed_precision == 'no' else acc.mixed_precision + ' autocast'}), "
        f"global batch {t.batch_size * t.grad_accum * acc.num_processes}, {t.steps} steps"
    )
    if aside is not None:
        reporter.line(f"history after step {run.start_step} (an abandoned branch) moved to {aside}")
    if run.sched_note:
        reporter.line(run.sched_note)
    if run.init_report is not None:
        for text in run.init_report.lines():
            reporter.line(text)
        for text in run.init_report.warnings:
            warn(text)
    return reporter


class _Loop:
    """The optimizer-step loop over a built run; holds what changes from step to step."""

    def __init__(self, run: _Run, reporter: "_Reporter", t0: float):
        acc, t = run.accelerator, run.recipe.train
        self.run, self.reporter, self.t0 = run, reporter, t0
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        self.global_batch = t.batch_size * t.grad_accum * self.world
        # micro-batch m of this rank is a pure function of (seed, m, rank)
        sampler = StepBatchSampler(len(run.dataset), t.batch_size, seed=t.seed, rank=self.rank, world=self.world,
                                   start_micro=run.start_step * t.grad_accum, stop_micro=t.steps * t.grad_accum)
        self.loader = torch.utils.data.DataLoader(
            run.dataset, batch_sampler=sampler, num_workers=run.recipe.data.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )
        self.noise_gen = torch.Generator(device=self.device)
        self.posterior_gen = torch.Generator(device=self.device)  # latent space: the VAE posterior's draws
        self.shift_gen = torch.Generator()  # train.time_shift's own stream: turning it on changes nothing else
        self.step = run.start_step
        self.final_loss: Optional[float] = None
        self.last_ckpt = run.files.latest_checkpoint() if run.files is not None else None
        self.guard = DivergenceGuard.for_recipe(run.recipe, (run.resume_state or {}).get("guard"))
        # A checkpoint is good once the step after it had a healthy loss: that loss is its weights'.
        self.unproven: Optional[Path] = run.resume_ckpt
        self.good: Optional[tuple[Path, float]] = None  # (checkpoint, the loss that proved it)
        self.previews: list[Path] = []
        self.window_loss, self.window_steps, self.window_t = 0.0, 0, time.time()

    def train(self) -> None:
        """Optimizer steps from the start step to train.steps (the main process logs and saves)."""
        run, t = self.run, self.run.recipe.train
        data = iter(self.loader)
        run.model.train()
        while self.step < t.steps:
            loss_sum = sum(self._micro_batch(next(data), micro) for micro in range(t.grad_accum))
            assert run.accelerator.sync_gradients, "gradient accumulation is out of step with the micro-batch loop"
            lossf, gnf = self._reduce_and_clip(loss_sum)
            self._check(lossf, gnf)
            lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.ema.update(run.raw_model)
            self.step += 1
            self.final_loss = lossf
            self.window_loss += lossf
            self.window_steps += 1
            if run.files is not None:
                self._log(lr, gnf)
                self._save_and_preview()
        if run.files is not None:  # finished: the newest checkpoint no longer needs a proven one beside it
            run.files.prune(t.keep_last)

    def _micro_batch(self, batch: dict, micro: int) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its detached loss."""
        from .objective import eqm_loss

        from .latent import model_batch

        run, t, device = self.run, self.run.recipe.train, self.device
        # Everything random in this micro-batch is a function of (seed, step, micro, rank).
        torch.manual_seed(derive_seed(t.seed, "global", self.step, micro, self.rank))
        self.noise_gen.manual_seed(derive_seed(t.seed, "noise", self.step, micro, self.rank))
        self.posterior_gen.manual_seed(derive_seed(t.seed, "posterior", self.step, micro, self.rank))
        x, ts = model_batch(run.space, batch, device, self.posterior_gen)
        y = batch["label"].to(device, non_blocking=True) if run.num_classes > 0 else None
        pos = None
        if t.time_shift > 0:  # a random start time per clip, in tau units
            self.shift_gen.manual_seed(derive_seed(t.seed, "time_shift", self.step, micro, self.rank))
            shift = torch.rand(x.shape[0], generator=self.shift_gen) * (t.time_shift * run.raw_model.config.ref_fps)
            pos = run.raw_model.positions(ts, x.shape[2], tau_offset=shift.to(device))
        with run.accelerator.accumulate(run.model):
            loss, _ = eqm_loss(run.model, x, ts, y, a=run.recipe.objective.a, lam=run.recipe.objective.lam,
                               generator=self.noise_gen, pos=pos)
            run.accelerator.backward(loss)
        return loss.detach().float()

    def _reduce_and_clip(self, loss_sum: torch.Tensor) -> tuple[float, float]:
        """The step's loss (one reduction gives every rank the same value, so all ranks stop
        together on divergence) and its gradient norm, clipped to train.grad_clip."""
        acc, t = self.run.accelerator, self.run.recipe.train
        mean = loss_sum / t.grad_accum
        if self.world > 1:
            mean = acc.reduce(mean, reduction="mean")
        grad_norm = acc.clip_grad_norm_(self.run.model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        return float(mean), float(grad_norm)

    def _check(self, lossf: float, gnf: float) -> None:
        """Stop before applying a diverging step (DivergenceGuard)."""
        why = self.guard.verdict(lossf, gnf)
        if why is None:
            if self.unproven is not None:
                self.good, self.unproven = (self.unproven, lossf), None
            return
        msg = f"training diverged at step {self.step + 1}: {why}; stopped without applying this step; {self._after_divergence()}"
        self.reporter.line(f"error: {msg}", echo=False)  # the EqmError is the one visible line
        raise EqmError(msg, exit_code=1)

    def _after_divergence(self) -> str:
        """Main process: move the checkpoints after the last good one aside (so ``--resume latest``
        finds the good one) and say what to do next."""
        run, t = self.run, self.run.recipe.train
        good = self.good[0] if self.good else None
        keep_step = ckpt_io.checkpoint_step(good) if good else run.start_step
        aside = run.files.set_aside(keep_step) if run.files is not None else None
        moved = f"; the checkpoints after step {keep_step} were moved to {aside}" if aside else ""
        lower = f"lower train.lr (now {t.lr:g}) or raise train.warmup_steps (now {t.warmup_steps})"
        if good is not None:
            return (f"the last good checkpoint is {good} (the next step's loss was {self.good[1]:.4g}){moved}; "
                    f"{lower}, then resume from {good}")
        if run.resume_ckpt is None:
            return f"no checkpoint of this run was followed by a healthy step{moved}; {lower} and train again"
        return (f"the step after {run.resume_ckpt} was not healthy either{moved}; "
                f"resume from an earlier checkpoint with a lower train.lr (now {t.lr:g})")

    def _log(self, lr: float, gnf: float) -> None:
        """Progress every step; a metrics row, tracker values and a log line every train.log_every."""
        run, t, step = self.run, self.run.recipe.train, self.step
        now = time.time()
        sps = self.window_steps * self.global_batch / max(now - self.window_t, 1e-9)
        self.reporter.advance(step, self.final_loss, sps)
        if not (step % t.log_every == 0 or step == t.steps or step == run.start_step + 1):
            return
        row = {
            "step": step, "loss": self.window_loss / self.window_steps, "lr": lr, "grad_norm": gnf,
            "samples_per_s": sps, "time": now - self.t0, "epoch": step * self.global_batch / len(run.dataset),
        }
        self.reporter.metrics(row)
        if run.log_with:
            run.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        eta = (t.steps - step) * self.global_batch / max(sps, 1e-9)
        self.reporter.line(
            f"step {step}/{t.steps}  loss {row['loss']:.4f}  lr {lr:.2e}  grad_norm {gnf:.3f}  "
            f"{sps:.1f} samples/s  eta {format_eta(eta)}"
        )
        self.window_loss, self.window_steps, self.window_t = 0.0, 0, time.time()

    def _save_and_preview(self) -> None:
        """A checkpoint every train.ckpt_every steps and a preview every train.preview_every (both at the end)."""
        run, t, step = self.run, self.run.recipe.train, self.step
        if step % t.ckpt_every == 0 or step == t.steps:
            self.last_ckpt = self.unproven = self._save()
            run.files.prune(t.keep_last, protect=self.good[0] if self.good else None)
            self.reporter.line(f"checkpoint {self.last_ckpt}")
        if t.preview_every and (step % t.preview_every == 0 or step == t.steps):
            p = write_preview(run.ema.module, run.recipe, run.files.preview_path(step), self.device, run.space)
            self.previews.append(p)
            self.reporter.line(f"preview {p}")
            self.window_t = time.time()  # previews are not training time

    def _save(self) -> Path:
        run = self.run
        opt_state = {
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": ckpt_io.rng_state(),
            "step": self.step,
        }
        if run.accelerator.scaler is not None:
            opt_state["scaler"] = run.accelerator.scaler.state_dict()
        return run.files.save_checkpoint(
            self.step, model=run.raw_model, ema=run.ema.module, config=run.raw_model.config,
            recipe=run.recipe.to_dict(), optimizer_state=opt_state,
            extra={"world_size": self.world, "loss": self.final_loss, "guard": self.guard.state(),
                   "class_names": list(getattr(run.dataset, "class_names", []) or []),
                   "vae": None if run.space is None else run.space.record(),
                   "resumed_from": None if run.resume_ckpt is None else {"step": run.start_step, "checkpoint": str(run.resume_ckpt)}},
        )


def _finish(run: _Run, loop: _Loop, reporter: "_Reporter", t0: float) -> TrainResult:
    """Check that every replica ended with the same weights; the main process writes summary.json."""
    from accelerate.utils import gather_object

    acc = run.accelerator
    world = acc.num_processes
    checksum = ckpt_io.weights_checksum(run.raw_model)
    sums = gather_object([checksum]) if world > 1 else [checksum]
    acc.wait_for_everyone()
    if run.files is not None:
        run.files.write_summary({
            "step": loop.step, "start_step": run.start_step, "final_loss": loop.final_loss, "world_size": world,
            "device": acc.device.type, "rank_checksums": sums, "replicas_identical": len(set(sums)) == 1,
            "last_checkpoint": None if loop.last_ckpt is None else str(loop.last_ckpt), "elapsed_s": time.time() - t0,
        })
        trained = "no step trained" if loop.final_loss is None else f"loss {loop.final_loss:.4f}"
        reporter.line(f"done: step {loop.step}, {trained}, {time.time() - t0:.1f} s, run {run.run_dir}")
    if len(set(sums)) != 1:
        raise EqmError(f"the {world} processes ended with different weights ({', '.join(s[:12] for s in sums)}); the distributed setup is broken", exit_code=1)
    return TrainResult(
        run_dir=run.run_dir, step=loop.step, start_step=run.start_step,
        last_checkpoint=loop.last_ckpt if run.files is not None else None, final_loss=loop.final_loss,
        world_size=world, checksum=checksum, elapsed=time.time() - t0, previews=loop.previews,
    )
