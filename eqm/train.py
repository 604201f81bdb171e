"""The training loop: Hugging Face Accelerate, EMA, warmup, clipping, accumulation, checkpoints.

``train(recipe, run_dir=None, resume=None)`` is the whole thing; ``eqmctl train`` is a thin CLI
over it, and the same call works in a plain process, or under ``accelerate launch`` with several
processes, GPUs or nodes (DDP through Accelerate).

Design points, each of which a test checks:

* **One Accelerator for every setting.**  It is built with ``cpu=not torch.cuda.is_available()``:
  ``accelerate launch --multi_gpu --num_processes 2`` on a machine without GPUs then gives two
  gloo ranks that train one model together, whereas a plain ``Accelerator()`` there trains two
  unrelated models without a word (and ``accelerate launch --cpu --num_processes 2`` silently runs
  a single process).  At the end every rank hashes its weights; the main process records the
  hashes in ``summary.json`` and fails the run if the replicas differ.
* **Randomness is a function of (seed, step, micro-batch, rank).**  Before every micro-batch the
  global torch RNG (label dropout) and the noise generator (gamma, x0) are re-seeded from
  ``derive_seed(seed, step, micro, rank)``, and the data order comes from
  :class:`StepBatchSampler`, which maps a micro-batch number straight to dataset indices
  (epoch-wise permutations seeded from (seed, epoch), ranks take disjoint slices).  Resuming
  therefore needs no replay of the loader, and an interrupted-and-resumed run ends with exactly the
  weights of an uninterrupted one (on CPU; GPU kernels may be non-deterministic).  Model init
  uses ``seed`` on every rank, so all replicas start equal even before DDP's broadcast.
* **Once per optimizer step, not per micro-batch:** clipping, the optimizer and LR-scheduler
  steps, the EMA update, step counting, logging, checkpoints and previews.  Micro-batches run
  inside ``accelerator.accumulate`` (no gradient all-reduce until the last one; Accelerate
  scales the loss by 1/grad_accum).
* **Divergence stops the run.**  The loss (averaged over micro-batches and ranks, so every rank
  takes the same decision) and the gradient norm are checked before the optimizer step; a NaN or
  inf ends the run with exit code 1 *without* applying the step, and nothing is saved after it:
  the checkpoints already on disk are the last good ones and the message names the newest.
  (fp16 is the exception for the gradient norm: its GradScaler skips steps with inf gradients
  by design, so only the loss is checked there.)  This costs one scalar host sync per step.
* **Only the main process writes** (run dir, recipe.yaml, metrics.jsonl, log.txt, checkpoints,
  previews, trackers).  The run directory is chosen on the main process and broadcast.
* **Mixed precision** (``train.mixed_precision`` bf16/fp16) is Accelerate's autocast on GPU;
  weights, optimizer state and EMA stay float32.  On CPU the run is float32 and a warning says so.
* **LR schedule**: linear warmup from 0 over ``warmup_steps``, then constant or cosine to
  ``min_lr_ratio * lr``; a ``LambdaLR`` stepped once per optimizer step, not passed through
  ``accelerator.prepare`` (whose scheduler wrapper steps it once per process).  A resumed run
  keeps the checkpoint's step and Adam moments but takes ``lr``, ``weight_decay`` and the schedule
  from the recipe (raising ``train.steps`` extends the cosine; the log says when the lr changes).

Outputs in the run directory: see :mod:`eqm.checkpoint` for checkpoints; ``metrics.jsonl``
(step, loss, lr, grad_norm, samples_per_s, time, epoch), ``log.txt`` (the plain log lines),
``previews/step_XXXXXXX.mp4`` (EMA samples at ``train.preview_fps``), ``summary.json`` (final
step, loss, world size, per-rank weight hashes).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from . import checkpoint as ckpt_io
from .embed import DEFAULT_TIME_ORDER, arch_time_order
from .errors import EqmError
from .recipe import Recipe, recipe_from_dict

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

    def epoch_of(self, micro: int) -> float:
        return (micro * self.world + self.rank) * self.batch_size / self.n

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


def build_dataset(recipe: Recipe, seed: Optional[int] = None, warn: Optional[Callable[[str], None]] = None):
    """The training dataset of a recipe (eqm.data.clips.build_dataset); ``warn`` gets the data
    warnings (skipped files) as one line each."""
    from .data.clips import ClipPolicy, build_dataset as _build

    d = recipe.data
    policy = ClipPolicy(
        num_frames=d.num_frames, fps_min=d.fps_min, fps_max=d.fps_max,
        height=d.height, width=d.width, random_flip=d.random_flip,
    )
    synth = {k: v for k, v in (("speed", d.synthetic.speed), ("radius", d.synthetic.radius)) if v is not None}
    return _build(
        d.source, root=d.root, manifest=d.manifest, policy=policy,
        num_classes=d.synthetic.num_classes, length=d.synthetic.length,
        seed=recipe.train.seed if seed is None else seed, clips_per_file=d.clips_per_file, warn=warn, **synth,
    )


def resolve_num_classes(recipe: Recipe, dataset) -> int:
    """model.num_classes, or the dataset's count when null; checks the labels fit."""
    have = int(getattr(dataset, "num_classes", 0) or 0)
    n = recipe.model.num_classes
    if n is None:
        return have
    if 0 < n < have:
        raise EqmError(f"model.num_classes={n} but the dataset has {have} classes (set it to {have} or null)")
    return n


def model_kwargs(recipe: Recipe, num_classes: int) -> dict:
    """EqMTransformer kwargs from a recipe (frame size and count come from `data`)."""
    m, d = recipe.model, recipe.data
    kw: dict[str, Any] = dict(
        input_size=(d.height, d.width), in_channels=3, num_frames=d.num_frames,
        patch_size=m.patch_size, temporal_patch=m.temporal_patch, mlp_ratio=m.mlp_ratio,
        class_dropout_prob=m.class_dropout_prob, num_classes=num_classes, learn_sigma=m.learn_sigma,
        pos=m.pos, time_mode=m.time.mode, energy=recipe.objective.energy,
    )
    if m.time.ref_fps is not None:
        kw["ref_fps"] = float(m.time.ref_fps)
    if m.time.frac is not None:
        kw["time_frac"] = float(m.time.frac)
    kw["time_order"] = m.time.order or DEFAULT_TIME_ORDER
    for k in ("hidden_size", "depth", "num_heads"):
        if getattr(m, k) is not None:
            kw[k] = getattr(m, k)
    return kw


def build_model(recipe: Recipe, num_classes: int, *, time_order: Optional[str] = None):
    """The model of a recipe, initialised from ``train.seed`` (identical on every rank).

    time_order: the sincos layout to use instead of the recipe's (a resumed run keeps its checkpoint's).
    """
    from .model import create_model

    kw = model_kwargs(recipe, num_classes)
    if time_order is not None:
        kw["time_order"] = time_order
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        return create_model(recipe.model.size, **kw)


def resume_time_order(recipe: Recipe, state: dict, ckpt) -> str:
    """The sincos layout a run resumed from ``ckpt`` keeps: the checkpoint's own.

    ``model.time.order: null`` means "new models get the default", not "change this run's layout";
    an explicit order that differs from the checkpoint's is an error, since the weights were
    trained against the other layout and would load without complaint.
    """
    saved = arch_time_order(state["arch"])
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
    check_tracker(recipe.tracking.backend)
    dataset = build_dataset(recipe, warn=warn)
    num_classes = resolve_num_classes(recipe, dataset)
    model = build_model(recipe, num_classes)
    opt, _ = build_optimizer(model, recipe)
    item = dataset[0]
    clip = tuple(item["video"].shape)
    expect = (3, recipe.data.num_frames, recipe.data.height, recipe.data.width)
    if clip != expect:
        raise EqmError(f"the dataset yields clips of shape {clip}, the recipe expects {expect}")
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
        "first_clip_fps": float(item.get("fps", float("nan"))),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tokens_per_clip": (recipe.data.num_frames // recipe.model.temporal_patch) * model.grid[0] * model.grid[1],
        "arch": model.arch_config(),
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


def _plan_run(recipe: Recipe, run_dir: Optional[PathLike], resume: Optional[PathLike], runs_root: PathLike):
    """(run_dir, checkpoint to resume or None), decided on the main process."""
    if resume is not None:
        if run_dir is not None and str(resume) == "latest":
            ck = ckpt_io.latest_checkpoint(run_dir)
            if ck is None:
                raise EqmError(f"--resume latest: run directory {run_dir} has no checkpoint")
        elif str(resume) == "latest":
            ck = ckpt_io.resolve_checkpoint("latest", runs_root, run_prefix=recipe.name)
        else:
            ck = ckpt_io.resolve_checkpoint(resume, runs_root)
        return Path(run_dir) if run_dir is not None else ckpt_io.run_dir_of(ck), ck
    if run_dir is not None:
        run_dir = Path(run_dir)
        if ckpt_io.list_checkpoints(run_dir):
            raise EqmError(f"run directory {run_dir} already has checkpoints; pass --resume latest to continue it, or choose another --run-dir")
        return run_dir, None
    return new_run_dir(runs_root, recipe.name or "run"), None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint we resume from."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    _atomic_write_text(path, "".join(line + "\n" for line in keep))


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
    """Main-process output: rich progress on a TTY, plain lines otherwise; metrics.jsonl; log.txt."""

    def __init__(self, run_dir: Path, total: int, start: int, enabled: bool, log: Optional[Callable[[str], None]]):
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.log_path = run_dir / "log.txt"
        self.total, self.start = total, start
        self._log = log
        self.progress = None
        self.task = None
        if enabled and log is None and sys.stderr.isatty():
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
        if not self.enabled:
            return
        with open(self.log_path, "a") as f:
            f.write(text + "\n")
        if not echo:
            return
        if self._log is not None:
            self._log(text)
        elif self.progress is not None:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, flush=True)

    def metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def advance(self, step: int, loss: float, sps: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", sps=f"{sps:.1f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


# ============================================================================================
# Previews
# ============================================================================================


def write_preview(model, recipe: Recipe, path: Path, device) -> Path:
    """Sample ``train.preview_samples`` clips from ``model`` (the EMA) at ``train.preview_fps`` and
    write them side by side as one video (format from the suffix, MP4 by default).

    The noise is the same at every preview (seeded from train.seed), so successive previews
    show the model's progress on fixed inputs; labels cycle through the classes.
    """
    from .sampler import sample
    from .timebase import parse_fps, uniform_timestamps
    from .video.io import write_video

    t, s = recipe.train, recipe.sample
    fps = parse_fps(t.preview_fps, name="train.preview_fps")
    T = t.preview_frames or recipe.data.num_frames
    n = t.preview_samples
    ts = uniform_timestamps(T, float(fps)).to(device=device, dtype=torch.float32)
    y = torch.arange(n, device=device) % model.num_classes if model.num_classes > 0 else None
    gen = torch.Generator().manual_seed(derive_seed(t.seed, "preview"))
    shape = (n, model.in_channels, T, *model.input_size)
    out = sample(
        model, shape, ts.expand(n, -1), y, method=s.method, steps=s.steps, step_size=s.step_size,
        momentum=s.momentum, tol=s.tol, cfg_scale=s.cfg_scale if y is not None else 1.0, generator=gen,
    )
    x = out.x.float().clamp(-1, 1).cpu()  # (n, C, T, H, W)
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


def _build_accelerator(recipe: Recipe, run_dir: Optional[Path], warn: Callable[[str], None]):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    mp = recipe.train.mixed_precision
    if mp != "no" and not cuda:
        warn(f"train.mixed_precision={mp} needs a GPU; training in float32 on the CPU")
        mp = "no"
    log_with = check_tracker(recipe.tracking.backend)
    kwargs: dict[str, Any] = {}
    if log_with is not None:
        kwargs.update(log_with=log_with, project_dir=str(run_dir) if run_dir is not None else None)
    # Imported before the process group exists: importing torch._dynamo (which the first
    # optimizer does) after init_process_group leaves references to the group that
    # destroy_process_group cannot drop, so its worker threads outlive it (see shutdown_distributed).
    importlib.import_module("torch._dynamo")

    # cpu=True without a GPU: under `accelerate launch --multi_gpu` this makes the ranks a real
    # gloo process group (a plain Accelerator() would train unrelated models, see module doc).
    return Accelerator(
        cpu=not cuda, mixed_precision=mp, gradient_accumulation_steps=recipe.train.grad_accum, **kwargs
    )


def shutdown_distributed() -> None:
    """Tear down the process group that ``accelerate launch`` set up, if there is one.

    For the process that owns the run (the CLI), at its very end. Left to interpreter exit, a gloo
    worker thread can still be releasing the last collective's tensors while Python finalizes; it
    then dies in std::terminate and the rank exits with SIGABRT after a run that finished
    correctly, failing the whole launch (about 1 launch in 20 on 2 CPU ranks). Destroying the
    group joins those threads first. Library callers that train several times in one process
    should not call this between runs.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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

    Raises EqmError with exit_code=1 when the loss diverges (NaN/inf).
    """
    from accelerate.utils import broadcast_object_list, gather_object

    from .objective import eqm_loss

    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr, flush=True))
    t0 = time.time()
    t = recipe.train

    accelerator = _build_accelerator(recipe, Path(run_dir) if run_dir is not None else None, warn)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    device = accelerator.device

    # ---- where to write, what to resume: decided once, on the main process ------------------
    plan: list[Any] = [None, None, None]
    if main:
        try:
            rd, ck = _plan_run(recipe, run_dir, resume, runs_root)
            plan = [str(rd), None if ck is None else str(ck), None]
        except EqmError as e:
            plan = [None, None, (str(e), e.exit_code)]
    if world > 1:
        broadcast_object_list(plan)
    if plan[2] is not None:
        raise EqmError(*plan[2])
    run_dir = Path(plan[0])
    resume_ckpt = Path(plan[1]) if plan[1] else None
    if log_with := check_tracker(recipe.tracking.backend):
        accelerator.project_configuration.set_directories(str(run_dir))

    # ---- components -------------------------------------------------------------------------
    dataset = build_dataset(recipe, warn=warn if main else (lambda _msg: None))
    num_classes = resolve_num_classes(recipe, dataset)
    state = ckpt_io.load_state(resume_ckpt) if resume_ckpt is not None else None
    order = resume_time_order(recipe, state, resume_ckpt) if state is not None else None
    model = build_model(recipe, num_classes, time_order=order).to(device)
    arch = model.arch_config()
    ema = EMA(model, t.ema_decay)
    optimizer, scheduler = build_optimizer(model, recipe)

    start_step = 0
    sched_note = None
    if resume_ckpt is not None:
        ckpt_io.load_into(model, ckpt_io.load_weights(resume_ckpt / ckpt_io.MODEL_FILE, device), resume_ckpt / ckpt_io.MODEL_FILE)
        ema_file = resume_ckpt / ckpt_io.EMA_FILE
        ckpt_io.load_into(ema.module, ckpt_io.load_weights(ema_file if ema_file.is_file() else resume_ckpt / ckpt_io.MODEL_FILE, device), ema_file)
        tstate = ckpt_io.load_training_state(resume_ckpt, map_location="cpu")
        optimizer.load_state_dict(tstate["optimizer"])
        scheduler, sched_note = resume_schedule(optimizer, recipe, tstate["scheduler"])
        ckpt_io.set_rng_state(tstate["rng"])
        start_step = int(state["step"])
        if main:
            changed = _recipe_diff(state.get("recipe", {}), recipe.to_dict())
            if changed:
                warn(f"resuming {resume_ckpt} with a recipe that differs in: {', '.join(changed)}")

    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    # ---- run directory ----------------------------------------------------------------------
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_io.clean_stale(run_dir)
        _atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
        if resume_ckpt is not None:
            _truncate_metrics(run_dir / "metrics.jsonl", start_step)
        if log_with:
            accelerator.init_trackers(recipe.tracking.project, config=_flat(recipe.to_dict()))
    reporter = _Reporter(run_dir, t.steps, start_step, main, log)

    # ---- data: micro-batch m of this rank is a pure function of (seed, m, rank) -------------
    accum = t.grad_accum
    sampler = StepBatchSampler(len(dataset), t.batch_size, seed=t.seed, rank=rank, world=world,
                               start_micro=start_step * accum, stop_micro=t.steps * accum)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=recipe.data.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    global_batch = t.batch_size * accum * world
    if main:
        what = f"resuming from {resume_ckpt} at step {start_step}" if resume_ckpt else "new run"
        if start_step >= t.steps:
            what += f"; nothing to train: the checkpoint is at step {start_step} >= train.steps (raise train.steps to continue)"
        reporter.line(
            f"run {run_dir} ({what}): {sum(p.numel() for p in raw_model.parameters()):,} parameters, "
            f"{len(dataset)} clips, {world} process(es) on {device.type}, global batch {global_batch}, "
            f"{t.steps} steps"
        )
        if sched_note:
            reporter.line(sched_note)

    noise_gen = torch.Generator(device=device)
    shift_gen = torch.Generator()  # train.time_shift's own stream: turning it on changes nothing else
    last_ckpt = ckpt_io.latest_checkpoint(run_dir) if main else None
    previews: list[Path] = []
    final_loss: Optional[float] = None
    window_loss, window_steps, window_t = 0.0, 0, time.time()
    data_iter = iter(loader)
    step = start_step

    def save(step_now: int) -> None:
        nonlocal last_ckpt
        opt_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": ckpt_io.rng_state(),
            "step": step_now,
        }
        if accelerator.scaler is not None:
            opt_state["scaler"] = accelerator.scaler.state_dict()
        last_ckpt = ckpt_io.save_checkpoint(
            run_dir, step_now, model=raw_model, ema=ema.module, arch=arch, recipe=recipe.to_dict(),
            optimizer_state=opt_state, keep_last=t.keep_last,
            extra={"world_size": world, "loss": final_loss,
                   "class_names": list(getattr(dataset, "class_names", []) or [])},
        )

    try:
        model.train()
        while step < t.steps:
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                batch = next(data_iter)
                x = batch["video"].to(device, non_blocking=True)
                ts = batch["timestamps"].to(device, dtype=torch.float32, non_blocking=True)
                y = batch["label"].to(device, non_blocking=True) if num_classes > 0 else None
                # Everything random in this micro-batch is a function of (seed, step, micro, rank).
                torch.manual_seed(derive_seed(t.seed, "global", step, micro, rank))
                noise_gen.manual_seed(derive_seed(t.seed, "noise", step, micro, rank))
                pos = None
                if t.time_shift > 0:  # a random start time per clip, in tau units
                    shift_gen.manual_seed(derive_seed(t.seed, "time_shift", step, micro, rank))
                    shift = torch.rand(x.shape[0], generator=shift_gen) * (t.time_shift * raw_model.ref_fps)
                    pos = raw_model.positions(ts, x.shape[2], tau_offset=shift.to(device))
                with accelerator.accumulate(model):
                    loss, _ = eqm_loss(model, x, ts, y, a=recipe.objective.a, lam=recipe.objective.lam,
                                       generator=noise_gen, pos=pos)
                    accelerator.backward(loss)
                loss_sum += loss.detach().float()
            assert accelerator.sync_gradients, "gradient accumulation is out of step with the micro-batch loop"

            # Once per optimizer step: one reduction gives every rank the same loss, so all ranks
            # stop together on divergence.
            mean_loss = accelerator.reduce(loss_sum / accum, reduction="mean") if world > 1 else loss_sum / accum
            max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            lossf, gnf = float(mean_loss), float(grad_norm)
            if not math.isfinite(lossf) or (t.mixed_precision != "fp16" and not math.isfinite(gnf)):
                what = f"loss {lossf}" if not math.isfinite(lossf) else f"gradient norm {gnf}"
                keep = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint had been saved yet"
                msg = (f"training diverged at step {step + 1}: {what}; stopped without applying this step; "
                       f"{keep} (lower train.lr or raise train.warmup_steps, then --resume)")
                reporter.line(f"error: {msg}", echo=False)  # the EqmError is the one visible line
                raise EqmError(msg, exit_code=1)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(raw_model)
            step += 1
            final_loss = lossf
            window_loss += lossf
            window_steps += 1

            if main:
                now = time.time()
                sps = window_steps * global_batch / max(now - window_t, 1e-9)
                reporter.advance(step, lossf, sps)
                if step % t.log_every == 0 or step == t.steps or step == start_step + 1:
                    row = {
                        "step": step, "loss": window_loss / window_steps, "lr": lr, "grad_norm": gnf,
                        "samples_per_s": sps, "time": now - t0,
                        "epoch": step * global_batch / len(dataset),
                    }
                    reporter.metrics(row)
                    if log_with:
                        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
                    eta = (t.steps - step) * global_batch / max(sps, 1e-9)
                    reporter.line(
                        f"step {step}/{t.steps}  loss {row['loss']:.4f}  lr {lr:.2e}  grad_norm {gnf:.3f}  "
                        f"{sps:.1f} samples/s  eta {_fmt_eta(eta)}"
                    )
                    window_loss, window_steps, window_t = 0.0, 0, time.time()
                if step % t.ckpt_every == 0 or step == t.steps:
                    save(step)
                    reporter.line(f"checkpoint {last_ckpt}")
                if t.preview_every and (step % t.preview_every == 0 or step == t.steps):
                    p = write_preview(ema.module, recipe, run_dir / "previews" / f"step_{step:07d}.mp4", device)
                    previews.append(p)
                    reporter.line(f"preview {p}")
                    window_t = time.time()  # previews are not training time
    finally:
        reporter.close()
        if main and log_with:
            accelerator.end_training()

    # ---- the replicas must agree ------------------------------------------------------------
    checksum = ckpt_io.weights_checksum(raw_model)
    sums = gather_object([checksum]) if world > 1 else [checksum]
    accelerator.wait_for_everyone()
    if main:
        summary = {
            "step": step, "start_step": start_step, "final_loss": final_loss, "world_size": world,
            "device": device.type, "rank_checksums": sums, "replicas_identical": len(set(sums)) == 1,
            "last_checkpoint": None if last_ckpt is None else str(last_ckpt), "elapsed_s": time.time() - t0,
        }
        _atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        trained = "no step trained" if final_loss is None else f"loss {final_loss:.4f}"
        reporter.line(f"done: step {step}, {trained}, {time.time() - t0:.1f} s, run {run_dir}")
    if len(set(sums)) != 1:
        raise EqmError(f"the {world} processes ended with different weights ({', '.join(s[:12] for s in sums)}); the distributed setup is broken", exit_code=1)
    return TrainResult(
        run_dir=run_dir, step=step, start_step=start_step, last_checkpoint=last_ckpt if main else None,
        final_loss=final_loss, world_size=world, checksum=checksum, elapsed=time.time() - t0, previews=previews,
    )


def load_run_recipe(run_dir: PathLike) -> Recipe:
    """The resolved recipe saved in a run directory (recipe.yaml)."""
    import yaml

    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise EqmError(f"run recipe not found: {path}")
    return recipe_from_dict(yaml.safe_load(path.read_text()), where=str(path))
