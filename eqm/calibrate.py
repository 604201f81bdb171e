"""Motion-speed calibration against real data: is generated motion as fast as the training data's?

The speed of motion in pixels per second does not depend on the rate a clip is sampled at, so a
model that knows real time should reproduce its training data's speeds at every requested rate;
a time-blind one scales them with the rate. This measures that for any checkpoint and dataset,
without ground truth (docs/calibration.md has the estimator's error and the measurements).

* Estimator (`clip_flow`): dense optical flow (OpenCV's Farneback, no weights) between pairs of
  frames a fixed real time apart (`DEFAULT_GAP`, chosen by the frames' timestamps), divided by
  the pair's real time difference; a clip's speed is the median flow magnitude over its moving
  pixels. Pairing by time, not adjacent frames, measures a 60 fps clip and a 6 fps one over the
  same displacement, so sub-pixel steps and large jumps get the same estimator error.
* Reference (`measure_dataset`): the same measure on clips of the training data, cut as training
  cuts them (the recipe's clip policy at the model's frame size, real timestamps), per class.
* Generated (`measure_rate`): the checkpoint sampled at each rate and guidance scale, same
  classes and sizes, clip lengths as `eqmctl sample` picks them. A clip's ratio is its speed over
  the reference median of its class; per rate: median speed, median ratio and its quartiles, and
  the share of clips whose mean flow points within 45 degrees of their class's direction in the
  reference (speed alone cannot tell a model that ignores its labels: its clips move, but
  wherever their noise leads).

It works on decoded RGB frames in [-1, 1], whatever produced them: a latent checkpoint is sampled
with the VAE it recorded and measured decoded, against its source videos in pixels.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .config import SamplerSettings
from .errors import EqmError

#: Seconds between the two frames of a flow pair: one frame apart at 6 fps, ten at 60 fps.
DEFAULT_GAP = 1.0 / 6.0
#: Pairs whose gap is within this share of the target of the clip's best pair are used too.
PAIR_SLACK = 0.02
#: At most this many pairs per clip (evenly spread over the clip).
MAX_PAIRS = 8
#: A pixel moves when its brightness (0-255) changes by more than this share of the pair's
#: largest change, and by more than MIN_DIFF levels (noise floor).
REL_DIFF = 0.2
MIN_DIFF = 5.0
#: Farneback window (pixels): OpenCV's usual 15; measured on 16-64 px frames in docs/calibration.md.
FLOW_WINDOW = 15
#: Scales counted as reproducing the data's speed: worst |ratio - 1| over the rates below this.
TARGET_ERROR = 0.10
#: A reference class has a direction when its clips' mean flow is at least this share of their
#: speed (clips of one class moving every which way have none).
DIRECTION_SHARE = 0.5


# =============================================================================================
# The estimator
# =============================================================================================


def _brightness(video) -> np.ndarray:
    """(C, T, H, W) in [-1, 1] (torch or numpy) -> (T, H, W) float32 brightness in 0-255.

    Farneback's polynomial expansion has fixed regularisation tuned for 8-bit levels: on [0, 1]
    images it returns almost no flow, hence 0-255."""
    v = video.detach().cpu().float().numpy() if hasattr(video, "detach") else np.asarray(video, dtype=np.float32)
    if v.ndim != 4:
        raise EqmError(f"a clip must have shape (C, T, H, W), got {tuple(v.shape)}")
    return np.ascontiguousarray(np.clip((v.mean(axis=0) + 1.0) * 127.5, 0.0, 255.0), dtype=np.float32)


def frame_pairs(timestamps, gap: float = DEFAULT_GAP) -> list[tuple[int, int]]:
    """Frame index pairs (i, j), i < j, whose time difference is closest to ``gap`` seconds.

    All pairs within PAIR_SLACK * gap of the best one (variable-rate files jitter), at most
    MAX_PAIRS spread over the clip; empty for a clip of one frame. Timestamps must increase.
    """
    t = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if t.size < 2:
        return []
    if not np.all(np.diff(t) > 0):
        raise EqmError("frame timestamps must be strictly increasing seconds")
    idx = np.arange(t.size)
    after = np.searchsorted(t, t + gap)  # first frame at least gap after frame i
    cand = np.clip(np.stack([after - 1, after], axis=1), 0, t.size - 1)  # the frames either side
    err = np.where(cand > idx[:, None], np.abs(t[cand] - t[:, None] - gap), np.inf)
    pick = err.argmin(axis=1)
    j, e = cand[idx, pick], err[idx, pick]
    i = np.nonzero(e <= e.min() + PAIR_SLACK * gap)[0]
    keep = i[np.unique(np.linspace(0, len(i) - 1, min(MAX_PAIRS, len(i))).round().astype(int))]
    return [(int(a), int(j[a])) for a in keep]


def pair_flow(a: np.ndarray, b: np.ndarray, seconds: float) -> np.ndarray:
    """Flow vectors (M, 2) as (x, y) pixels per second at the M moving pixels between brightness
    maps a, b."""
    import cv2

    levels = max(0, min(5, int(math.log2(max(1, min(a.shape)) / 8))))
    flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, levels, FLOW_WINDOW, 3, 5, 1.1, 0)
    change = np.abs(b - a)
    moving = change > max(MIN_DIFF, REL_DIFF * float(change.max()))
    return flow[moving].astype(np.float64) / float(seconds)


def clip_flow(video, timestamps, gap: float = DEFAULT_GAP) -> tuple[float, float, np.ndarray]:
    """(speed in pixels per second, median pair gap in seconds, mean flow vector (x, y) in pixels
    per second) of one clip (C, T, H, W) in [-1, 1].  The speed is the median flow magnitude; the
    vector says where the clip moves on the whole (its direction is what a class's motion shares).

    NaN speed and vector when the clip has fewer than two frames or nothing moves.
    """
    g = _brightness(video)
    t = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if t.size != g.shape[0]:
        raise EqmError(f"a clip of {g.shape[0]} frames needs {g.shape[0]} timestamps, got {t.size}")
    pairs = frame_pairs(t, gap)
    nan2 = np.full(2, np.nan)
    if not pairs:
        return float("nan"), float("nan"), nan2
    vecs = np.concatenate([pair_flow(g[i], g[j], t[j] - t[i]) for i, j in pairs])
    used = float(np.median([t[j] - t[i] for i, j in pairs]))
    if not len(vecs):
        return float("nan"), used, nan2
    return float(np.median(np.hypot(vecs[:, 0], vecs[:, 1]))), used, vecs.mean(axis=0)


@dataclass
class ClipSpeeds:
    """Speeds (px/s, NaN where unmeasurable), labels (or None), pair gaps (s) and mean flow vectors
    of a set of clips."""

    speeds: np.ndarray
    labels: Optional[np.ndarray]
    gaps: np.ndarray
    vectors: Optional[np.ndarray] = None  # (N, 2) mean flow of each clip, px/s (clip_flow)

    @classmethod
    def of(cls, flows: list, labels: Optional[np.ndarray]) -> "ClipSpeeds":
        """From one :func:`clip_flow` result per clip."""
        return cls(np.array([f[0] for f in flows]), labels, np.array([f[1] for f in flows]),
                   np.array([f[2] for f in flows]).reshape(-1, 2))

    @property
    def measured(self) -> int:
        return int(np.isfinite(self.speeds).sum())


def measure_clips(videos, timestamps, labels=None, gap: float = DEFAULT_GAP) -> ClipSpeeds:
    """`clip_flow` of every clip of a batch; videos (N, C, T, H, W), timestamps (N, T) or (T,)."""
    t = np.asarray(timestamps.cpu() if hasattr(timestamps, "cpu") else timestamps, dtype=np.float64)
    out = [clip_flow(videos[n], t if t.ndim == 1 else t[n], gap) for n in range(len(videos))]
    lab = None if labels is None else np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels, dtype=np.int64)
    return ClipSpeeds.of(out, lab)


# =============================================================================================
# The reference: the training data's clips
# =============================================================================================


def reference_recipe(recipe: Optional[dict], data: Union[str, Path, None], size: tuple[int, int], vae_path=None):
    """The Recipe whose dataset is the reference: the checkpoint's, or ``data`` (a recipe YAML, a
    probe-fps manifest or a folder of class subfolders) cut with the checkpoint's clip policy;
    frames resized to ``size`` (h, w: the model's, decoded for a latent model) so speeds compare in
    the same pixels. Reference clips are pixels: a latent cache stands for the videos it was made
    from (`pixel_data`). vae_path: a latent model's VAE (the recipe is then checked as latent)."""
    from .recipe import load_recipe, recipe_from_dict

    d = copy.deepcopy(recipe or {})
    p = None if data is None else Path(data)
    if p is not None and p.suffix.lower() in (".yaml", ".yml"):
        d = load_recipe(p).to_dict()
    elif p is not None:
        if not p.exists():
            raise EqmError(f"data not found: {p} (a recipe .yaml, a probe-fps manifest or a folder of class subfolders)")
        src = {"source": "folder", "root": str(p)} if p.is_dir() else {"source": "manifest", "manifest": str(p)}
        d.setdefault("data", {}).update(src)
    elif not d:
        raise EqmError("the checkpoint carries no recipe to find its training data; pass data (a recipe, manifest or folder)")
    if (d.get("data") or {}).get("source") == "latents":
        d["data"] = pixel_data(d["data"])
    d.setdefault("data", {}).update(height=int(size[0]), width=int(size[1]))
    if vae_path is not None:
        d.setdefault("vae", {})["path"] = str(vae_path)
    return recipe_from_dict(d, where=str(p) if p is not None else "the checkpoint's recipe")


def pixel_data(data: dict) -> dict:
    """The data section a latent cache (``data.latents``) was made from, as its cache.json records
    it: the source videos, cut with the same clip policy. EqmError asking for ``data`` (--data)
    when the cache or the videos it names are not there."""
    from .cache import read_cache_info

    cache = data.get("latents")
    ask = "pass data (--data: a recipe, manifest or folder of the source videos)"
    try:
        made = dict(read_cache_info(cache)["settings"]["data"])
    except (EqmError, KeyError, TypeError) as e:
        raise EqmError(f"reference clips are read from the source videos, but the latent cache {cache} cannot say "
                       f"which ({e}); {ask}") from None
    where = {"folder": made.get("root"), "manifest": made.get("manifest")}.get(made.get("source"))
    if made.get("source") in ("folder", "manifest") and not (where and Path(where).exists()):
        raise EqmError(f"the latent cache {cache} was made from {made.get('source')} {where}, which is not there; {ask}")
    return made


def data_name(recipe) -> str:
    """A few words naming where a recipe's clips come from."""
    src = recipe.data.source
    return {"folder": f"folder {recipe.data.root}", "manifest": f"manifest {recipe.data.manifest}"}.get(src, f"{src} source")


def measure_dataset(dataset, clips: int, gap: float = DEFAULT_GAP) -> ClipSpeeds:
    """Speeds of the first ``clips`` items of a training dataset (balanced: items cycle through
    the files / classes), each at its real timestamps."""
    n = min(int(clips), len(dataset))
    out, labels = [], []
    for i in range(n):
        item = dataset[i]
        video = item["video"]
        if video.shape[0] != 3:
            raise EqmError(f"reference clips must be RGB frames, got {video.shape[0]} channels "
                           "(for latent data pass the source videos as data)")
        out.append(clip_flow(video, item["timestamps"], gap))
        labels.append(int(item["label"]))
    return ClipSpeeds.of(out, np.array(labels, dtype=np.int64))


@dataclass
class Reference:
    """Median speed (px/s) of the reference clips, overall and per class, and how it was measured."""

    data: str
    clips: int
    measured: int
    gap: float
    speed: float
    class_speed: dict[int, float]
    #: unit (x, y) of each class whose clips share a direction (their mean flow is at least half
    #: their speed); classes of mixed directions are left out
    class_direction: dict[int, tuple[float, float]] = field(default_factory=dict)


def summarize_reference(ref: ClipSpeeds, name: str) -> Reference:
    ok = np.isfinite(ref.speeds)
    if not ok.any():
        raise EqmError(f"no motion could be measured in the {len(ref.speeds)} reference clips of {name}")
    per_class = {int(k): float(np.median(ref.speeds[ok & (ref.labels == k)]))
                 for k in np.unique(ref.labels[ok])}
    return Reference(data=name, clips=len(ref.speeds), measured=int(ok.sum()), gap=float(np.nanmedian(ref.gaps)),
                     speed=float(np.median(ref.speeds[ok])), class_speed=per_class,
                     class_direction=_class_directions(ref, ok, per_class))


def _class_directions(ref: ClipSpeeds, ok: np.ndarray, class_speed: dict) -> dict:
    if ref.vectors is None:
        return {}
    out = {}
    for k, speed in class_speed.items():
        mean = ref.vectors[ok & (ref.labels == k)].mean(axis=0)
        norm = float(np.hypot(*mean))
        if norm >= DIRECTION_SHARE * speed > 0:
            out[k] = (float(mean[0] / norm), float(mean[1] / norm))
    return out


def direction_share(gen: ClipSpeeds, ref: Reference) -> float:
    """Share of measured clips whose mean flow lies within 45 degrees of their class's direction
    in the reference (NaN when no generated clip's class has one)."""
    if gen.labels is None or gen.vectors is None:
        return float("nan")
    from .data.speed import along

    pairs = [(v, ref.class_direction[int(k)]) for v, k in zip(gen.vectors, gen.labels)
             if int(k) in ref.class_direction and np.isfinite(v).all() and np.hypot(*v) > 0]
    if not pairs:
        return float("nan")
    return float(np.mean(along(np.array([v for v, _ in pairs]), np.array([d for _, d in pairs]))))


# =============================================================================================
# Generated clips
# =============================================================================================


@dataclass
class RateResult:
    """One requested rate at one guidance scale: median speed (px/s), median ratio to the
    reference of each clip's class, the ratio's quartiles, and the median ratio per class."""

    rate: Fraction
    cfg_scale: float
    frames: int
    clips: int
    measured: int
    gap: float
    speed: float
    ratio: float
    ratio_q25: float
    ratio_q75: float
    class_ratio: dict[int, float] = field(default_factory=dict)
    direction: float = float("nan")  # share of clips moving within 45 degrees of their class's direction


def summarize_rate(gen: ClipSpeeds, ref: Reference, rate: Fraction, cfg_scale: float, frames: int) -> RateResult:
    if gen.labels is None:
        base = np.full(len(gen.speeds), ref.speed)
    else:
        base = np.array([ref.class_speed.get(int(k), np.nan) for k in gen.labels])
    ratio = gen.speeds / base
    ok = np.isfinite(ratio)
    nan = float("nan")
    q25, q50, q75 = np.percentile(ratio[ok], [25, 50, 75]) if ok.any() else (nan, nan, nan)
    per_class = {} if gen.labels is None else {
        int(k): float(np.median(ratio[ok & (gen.labels == k)])) for k in np.unique(gen.labels[ok])}
    return RateResult(rate=rate, cfg_scale=float(cfg_scale), frames=int(frames), clips=len(ratio), measured=int(ok.sum()),
                      gap=float(np.nanmedian(gen.gaps)) if np.isfinite(gen.gaps).any() else nan,
                      speed=float(np.median(gen.speeds[ok])) if ok.any() else nan,
                      ratio=float(q50), ratio_q25=float(q25), ratio_q75=float(q75), class_ratio=per_class,
                      direction=direction_share(gen, ref))


def generation_labels(num_classes: int, samples: int):
    """Labels cycling through every class, ``samples`` clips each (None for a model without classes:
    ``samples`` clips of its null label)."""
    import torch

    if num_classes <= 0:
        return None, samples
    return torch.arange(num_classes * samples) % num_classes, num_classes * samples


def measure_rate(model, recipe: Optional[dict], rate: Fraction, cfg_scale: float, *, samples: int, seed: int,
                 sampler: SamplerSettings, batch_size: Optional[int], gap: float, vae=None,
                 seconds: Optional[float] = None):
    """Sample the model at ``rate`` and measure every clip: (ClipSpeeds, frames, warning or None,
    the sampler settings used, defaults resolved).

    Clip length as `eqmctl sample` picks it (the training length, shortened at rates where it
    would reach past the trained seconds), or ``seconds`` long at every rate (its frame count
    then grows with the rate); noise per sample from ``seed``, the same at every rate.
    vae: a latent model's VAE (eqm.latent.checkpoint_vae); its samples are measured decoded.
    """
    from .generate import generate, plan_frames

    frames, beyond = plan_frames(model, recipe, rate, seconds=seconds, temporal=1 if vae is None else vae.temporal)
    labels, n = generation_labels(int(model.config.num_classes), samples)
    gen = generate(model, fps=rate, num_frames=frames, num_samples=n, labels=labels,
                   settings=replace(sampler, cfg_scale=cfg_scale), seed=seed, batch_size=batch_size, vae=vae)
    if gen.videos.shape[1] != 3:
        raise EqmError(f"calibration measures RGB frames; this model generates {gen.videos.shape[1]}-channel frames")
    return measure_clips(gen.videos, gen.timestamps, labels, gap), frames, beyond, gen.settings


# =============================================================================================
# The whole calibration
# =============================================================================================


@dataclass
class Calibration:
    """What `calibrate` measured; `to_dict` is its JSON form (non-finite numbers as null)."""

    checkpoint: str
    step: Optional[int]
    weights: str
    time_mode: Optional[str]
    train_fps: Optional[tuple[float, float]]
    class_names: list[str]
    sampler: dict  # the SamplerSettings used, defaults resolved, without the guidance scale (per result)
    samples_per_class: int
    seed: int
    reference: Reference
    results: list[RateResult]
    warnings: list[str] = field(default_factory=list)
    vae: Optional[dict] = None  # a latent model's VAE identity (its samples were measured decoded)

    @property
    def rates(self) -> list[Fraction]:
        return list(dict.fromkeys(r.rate for r in self.results))

    @property
    def cfg_scales(self) -> list[float]:
        return list(dict.fromkeys(r.cfg_scale for r in self.results))

    def worst_error(self, cfg_scale: float) -> float:
        """Largest |median ratio - 1| over the rates at one guidance scale (inf if a rate has none)."""
        errs = [abs(r.ratio - 1.0) if math.isfinite(r.ratio) else math.inf for r in self.results if r.cfg_scale == cfg_scale]
        return max(errs) if errs else math.inf

    @property
    def best_cfg_scale(self) -> float:
        """The guidance scale whose worst rate is closest to the data's speed."""
        return min(self.cfg_scales, key=self.worst_error)

    def to_dict(self) -> dict:
        from .jsonio import finite
        from .timebase import format_fps

        results = []
        for r in self.results:
            row = asdict(r)
            row["rate"] = format_fps(r.rate)
            row["class_ratio"] = {str(k): v for k, v in r.class_ratio.items()}
            results.append(row)
        ref = asdict(self.reference)
        ref["class_speed"] = {str(k): v for k, v in self.reference.class_speed.items()}
        ref["class_direction"] = {str(k): list(v) for k, v in self.reference.class_direction.items()}
        doc = {
            "checkpoint": self.checkpoint, "step": self.step, "weights": self.weights, "time_mode": self.time_mode,
            "train_fps": None if self.train_fps is None else list(self.train_fps), "class_names": self.class_names,
            "sampler": self.sampler, "samples_per_class": self.samples_per_class, "seed": self.seed,
            "estimator": {"method": "farneback", "gap": DEFAULT_GAP, "rel_diff": REL_DIFF, "min_diff": MIN_DIFF,
                          "window": FLOW_WINDOW},
            "reference": ref, "rates": [format_fps(r) for r in self.rates], "cfg_scales": self.cfg_scales,
            "results": results, "worst_error": {f"{s:g}": self.worst_error(s) for s in self.cfg_scales},
            "best_cfg_scale": self.best_cfg_scale, "warnings": self.warnings, "vae": self.vae,
        }
        return finite(doc)


def parse_rates(rates: Union[str, Sequence]) -> list[Fraction]:
    """Requested rates from "6,12,29.97" or a sequence; each must be a positive rate."""
    from .timebase import parse_fps

    items = [r.strip() for r in rates.split(",")] if isinstance(rates, str) else list(rates)
    out = [parse_fps(r, name="rates") for r in items if str(r) != ""]
    if not out:
        raise EqmError(f"rates: give at least one frame rate, got {rates!r}")
    return list(dict.fromkeys(out))


def parse_scales(scales: Union[str, Sequence, None]) -> Optional[list[float]]:
    """Guidance scales from "1,1.5,2" or a sequence (None = the recipe's); each finite and >= 0."""
    if scales is None:
        return None
    items = [s.strip() for s in scales.split(",") if s.strip()] if isinstance(scales, str) else list(scales)
    out = []
    for s in items:
        try:
            v = float(s)
        except (TypeError, ValueError):
            raise EqmError(f"cfg_scales: {s!r} is not a number") from None
        if not math.isfinite(v) or v < 0:
            raise EqmError(f"cfg_scales: each scale must be a finite number >= 0, got {s!r}")
        out.append(v)
    if not out:
        raise EqmError("cfg_scales: give at least one guidance scale")
    return list(dict.fromkeys(out))


def frame_size(model, vae=None) -> tuple[int, int]:
    """(h, w) of the frames a model's samples end up as: its input size, times the VAE's spatial
    compression for a latent model."""
    h, w = model.config.input_size
    k = 1 if vae is None else int(vae.spatial)
    return int(h) * k, int(w) * k


def _train_fps(recipe: Optional[dict]) -> Optional[tuple[float, float]]:
    data = (recipe or {}).get("data") or {}
    try:
        return float(data["fps_min"]), float(data["fps_max"])
    except (KeyError, TypeError, ValueError):
        return None


def calibrate(ckpt, rates, *, data=None, samples: int = 8, ref_clips: int = 64, cfg_scales=None, seed: int = 0,
              ema: bool = True, sampler: Optional[SamplerSettings] = None, batch_size: Optional[int] = None, device="cpu",
              gap: float = DEFAULT_GAP, runs_root="runs", vae_path=None, seconds: Optional[float] = None,
              log: Optional[Callable[[str], None]] = None) -> Calibration:
    """Measure a checkpoint's motion speed at each rate and guidance scale against its data's.

    ckpt: what `eqm.checkpoint.resolve_checkpoint` accepts; rates: "6,12,24" or a list; data: a
    recipe, manifest or folder instead of the checkpoint's own training data; samples: clips per
    class per rate; ref_clips: reference clips; cfg_scales: default the recipe's sample.cfg_scale;
    sampler: the SamplerSettings (its cfg_scale is replaced by each scale); seconds: generated clips
    of this duration at every rate instead of the training clip length. ``log`` receives one line per step.
    A latent-space checkpoint is sampled with the VAE it recorded (``vae_path`` when its folder
    moved) and measured on the decoded frames, against reference clips in pixels.
    """
    from .generate import load_for_sampling, recipe_cfg_scale
    from .latent import checkpoint_vae, recipe_dataset

    say = log or (lambda _line: None)
    rates = parse_rates(rates)
    scales = parse_scales(cfg_scales)
    for name, v in (("samples", samples), ("ref_clips", ref_clips)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise EqmError(f"{name} must be a positive integer, got {v!r}")
    model, state, warnings = load_for_sampling(ckpt, use_ema=ema, device=device, runs_root=runs_root)
    vae = checkpoint_vae(state, vae_path, device, where=str(state["checkpoint"]))
    recipe = state.get("recipe")
    classes = int(model.config.num_classes)
    if scales is None:
        scales = [recipe_cfg_scale(recipe) if classes > 0 else 1.0]
    if classes <= 0 and any(s != 1.0 for s in scales):
        raise EqmError("cfg_scales: guidance needs a class-conditional model (this one has no classes)")

    ref_recipe = reference_recipe(recipe, data, frame_size(model, vae), None if vae is None else vae.identity.path)
    dataset = recipe_dataset(ref_recipe, warn=warnings.append)
    if classes > 0 and int(getattr(dataset, "num_classes", 0) or 0) != classes:
        raise EqmError(f"the model has {classes} classes but the reference data ({data_name(ref_recipe)}) has "
                       f"{getattr(dataset, 'num_classes', 0)}")
    say(f"measuring {min(ref_clips, len(dataset))} reference clips of {data_name(ref_recipe)}")
    ref = summarize_reference(measure_dataset(dataset, ref_clips, gap), data_name(ref_recipe))

    results = []
    opts = (sampler or SamplerSettings()).resolved()
    for scale in scales:
        for rate in rates:
            say(f"sampling at {float(rate):g} fps, guidance {scale:g}")
            gen, frames, beyond, used = measure_rate(model, recipe, rate, scale, samples=samples, seed=seed,
                                                     sampler=opts, batch_size=batch_size, gap=gap, vae=vae,
                                                     seconds=seconds)
            if beyond and beyond not in warnings:
                warnings.append(beyond)
            results.append(summarize_rate(gen, ref, rate, scale, frames))
    return Calibration(
        checkpoint=str(state["checkpoint"]), step=state.get("step"),
        weights="ema" if str(state["weights"]).endswith("ema.safetensors") else "raw",
        time_mode=model.config.time_mode, train_fps=_train_fps(recipe),
        class_names=list(state.get("class_names") or []), samples_per_class=samples, seed=seed,
        sampler={k: v for k, v in used.to_dict().items() if k != "cfg_scale"},  # guidance: per result
        reference=ref, results=results, warnings=warnings, vae=None if vae is None else vae.identity.to_dict(),
    )


# =============================================================================================
# Output files
# =============================================================================================


def plot_calibration(cal: Calibration, path: Path) -> Path:
    """Median speed ratio (quartiles as error bars) against the requested rate, one line per
    guidance scale; the training rates shaded, +-10 % band. Written atomically (PNG)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    from . import fsio

    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    xs = [float(r) for r in cal.rates]
    if cal.train_fps is not None:
        ax.axvspan(*cal.train_fps, color="0.9", label="training rates")
    ax.axhspan(1 - TARGET_ERROR, 1 + TARGET_ERROR, color="C0", alpha=0.1, label="within 10 %")
    ax.axhline(1.0, color="k", lw=0.8)
    for k, scale in enumerate(cal.cfg_scales):
        rows = [r for r in cal.results if r.cfg_scale == scale]
        ys = np.array([r.ratio for r in rows])
        err = np.array([[r.ratio - r.ratio_q25 for r in rows], [r.ratio_q75 - r.ratio for r in rows]])
        ax.errorbar([float(r.rate) for r in rows], ys, yerr=err, marker="o", capsize=3, color=f"C{k % 10}",
                    label=f"guidance {scale:g}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.set_xlabel("requested frame rate (fps)")
    ax.set_ylabel("speed ratio, generated / data (median, quartiles)")
    ax.set_title(f"{Path(cal.checkpoint).parent.parent.name} step {cal.step}: motion speed vs {cal.reference.data}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_calibration(cal: Calibration, out_dir) -> tuple[Path, Path]:
    """calibration.json (standard JSON: unmeasurable numbers are null) and calibration.png in
    ``out_dir`` (created), each written atomically; returns their paths."""
    from . import fsio

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EqmError(f"output path {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    fsio.write_json(out / "calibration.json", cal.to_dict())
    return out / "calibration.json", plot_calibration(cal, out / "calibration.png")


__all__ = [
    "DEFAULT_GAP", "Calibration", "ClipSpeeds", "RateResult", "Reference", "calibrate", "clip_flow", "direction_share", "frame_pairs",
    "measure_clips", "measure_dataset", "pair_flow", "parse_rates", "parse_scales", "plot_calibration",
    "reference_recipe", "write_calibration",
]
