"""Training recipes: a typed, documented schema loaded from YAML, with ``key.sub=value`` overrides.

A recipe is data (torchtune style): one YAML file in ``recipes/`` describes the model, the
objective, the data, the optimisation, the sampler defaults and the tracker.  Every field below
is a dataclass field with a type and a one-line doc (``metadata["doc"]``); ``eqmctl train
--schema`` prints them all.  Loading is strict (LTX-Video-Trainer style):

* an unknown key anywhere is an error that names the dotted key and suggests a close match;
* a value of the wrong type is an error naming the key, the expected type and what was found;
* impossible values (negative learning rates, fps_min > fps_max, a patch that does not divide
  the frame size, ...) are errors naming the key.

All of them are :class:`eqm.errors.EqmError` with one line of text (exit code 2 in the CLI).

Overrides ``train.lr=3e-4 model.time.mode=index`` are applied on top of the file before
validation; each value is parsed as a YAML scalar (``null``, ``true``, ``1e-4``, ``[a, b]``) and
then type-checked like a value in the file.

Two small conveniences, documented because they bend "strict" on purpose:

* PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a *string*; float fields accept strings
  that spell a float, because ``lr: 1e-4`` is what everybody writes.
* ``objective.energy``, ``data.root`` and the other optional fields take YAML ``null``; for
  ``objective.energy`` and ``tracking.backend`` the string ``none`` is accepted as well.

This module does not import torch (the CLI validates recipes before loading heavy modules); the
architecture is checked by building its :class:`eqm.config.EqMConfig`, which is torch-free too.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import EqmError, ParamError, brief

if typing.TYPE_CHECKING:
    from fractions import Fraction

    from .config import EqMConfig, SamplerSettings


def _f(default: Any = dataclasses.MISSING, doc: str = "", factory: Any = None):
    """A dataclass field carrying its documentation in ``metadata["doc"]``."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


# ============================================================================================
# Schema
# ============================================================================================


@dataclass
class TimeConfig:
    """How the model turns frame timestamps into temporal positions (docs/reference.md#time-modes)."""

    mode: Literal["seconds", "index", "fps-embed"] = _f(
        "seconds",
        "seconds: tau = t * ref_fps from real timestamps (the product); index: tau = frame index "
        "(time-blind baseline); fps-embed: index positions + a learned embedding of the clip's fps",
    )
    ref_fps: Optional[float] = _f(
        None, "reference rate r in tau = t_seconds * r; null = the model's measured default (24)"
    )
    frac: Optional[float] = _f(
        None,
        "share of channels carrying the temporal code (sincos: of hidden_size, at most 1/2; rope: of "
        "each head's dim); the rest is split between rows and columns; null = model default (0.25)",
    )
    order: Optional[Literal["paired", "aligned"]] = _f(
        None,
        "sincos only: where the temporal frequencies sit on the spatial code's channels. aligned: "
        "fastest temporal on the fastest of the channels used (at frac 0.5 on the fastest spatial "
        "frequency); paired: fastest temporal on the flattest spatial channel (measured slower "
        "motion at 48-60 fps, docs/calibration.md); null = aligned for a new model, the "
        "checkpoint's own layout when resuming",
    )


@dataclass
class ModelConfig:
    """The EqM transformer (eqm.model.EqMTransformer).  Frame size and count come from `data`."""

    size: str = _f("tiny", "size from eqm.config.EQM_SIZES: tiny, mini (CPU), S, B, L, XL (EqM family)")
    patch_size: int = _f(2, "spatial patch size p (DiT '/2' = 2); must divide data.height and data.width")
    temporal_patch: int = _f(1, "frames per token p_t; must divide data.num_frames; 1 keeps image weights usable")
    pos: Literal["sincos", "rope"] = _f(
        "sincos", "positional encoding: sincos (fixed 3D sin/cos added to tokens) or rope (3D rotary on q/k)"
    )
    time: TimeConfig = _f(doc="temporal coordinate settings", factory=TimeConfig)
    num_classes: Optional[int] = _f(
        None, "number of classes; null = the dataset's class count; 0 = unconditional"
    )
    class_dropout_prob: float = _f(0.1, "probability of dropping a label to the null class (classifier-free guidance)")
    learn_sigma: bool = _f(False, "double the output channels like SiT/DiT checkpoints (second half unused by EqM)")
    hidden_size: Optional[int] = _f(None, "override the size's hidden width D; null = from `size`")
    depth: Optional[int] = _f(None, "override the size's number of blocks; null = from `size`")
    num_heads: Optional[int] = _f(None, "override the size's attention heads; null = from `size`")
    mlp_ratio: float = _f(4.0, "MLP hidden width as a multiple of D")
    attention: Literal["full", "divided"] = _f(
        "full", "full (one attention over all tokens of a clip, as DiT over an image) or divided (attention "
        "within each frame, then across frames at each patch position; cheaper, and a frame's attention "
        "does not depend on the clip length): docs/design.md#attention"
    )
    init_from: Optional[str] = _f(
        None,
        "initial weights: an official EqM .pt (e.g. the EqM-XL/2 ImageNet checkpoint), an eqmctl checkpoint "
        "or run directory, or a .safetensors file, mapped onto this model with a loaded/adapted/new/dropped "
        "table at start-up (docs/official-init.md); null = random initialisation; not used when resuming",
    )
    init_weights: Literal["ema", "model"] = _f("ema", "which weights of model.init_from: ema (the averaged weights) or model (the raw ones)")


@dataclass
class ObjectiveConfig:
    """The EqM objective: target (x1 - x0) * lam * min(1, (1 - gamma) / (1 - a)); docs/reference.md#eqm-objective."""

    a: float = _f(0.8, "gamma after which the target magnitude decays linearly to 0 (paper: 0.8); in [0, 1)")
    lam: float = _f(4.0, "target gradient scale lambda (paper: 4.0); > 0")
    energy: Optional[Literal["dot", "l2"]] = _f(
        None, "explicit energy: null (direct gradient), dot (E = sum x*h(x)) or l2 (E = -|h(x)|^2/2); needs double backward"
    )


@dataclass
class SyntheticConfig:
    """The zero-download synthetic source: analytic moving shapes, one known speed per class."""

    num_classes: int = _f(4, "number of motion classes (each a direction/speed in pixels per second)")
    length: int = _f(4096, "clips per epoch (every clip is rendered on the fly at its own random fps)")
    speed: Optional[float] = _f(None, "shape speed in pixels per second; null = the dataset's default")
    radius: Optional[float] = _f(None, "shape radius in pixels; null = the dataset's default")
    start: Literal["random", "per-class"] = _f(
        "random",
        "random: a clip starts anywhere its path fits; per-class: every clip of a class starts at the "
        "same point along its direction (anywhere across it), so the class says where the shape is "
        "at each moment (what lets the demo's model follow its labels in 1600 steps, docs/demo.md)",
    )


@dataclass
class DataConfig:
    """Where clips come from and how each clip is cut (eqm.data.clips.ClipPolicy)."""

    source: Literal["synthetic", "folder", "manifest", "latents"] = _f(
        "synthetic", "synthetic (rendered), folder (class subfolders of videos), manifest (probe-fps JSONL) "
        "or latents (a latent cache written by `eqmctl cache`)"
    )
    root: Optional[str] = _f(None, "folder source: the dataset root (one subfolder per class)")
    manifest: Optional[str] = _f(None, "manifest source: path of the JSONL written by `eqmctl probe-fps`")
    latents: Optional[str] = _f(
        None, "latents source: the directory written by `eqmctl cache` (clip shape, rates and timestamps come from it)"
    )
    num_frames: int = _f(8, "frames T per training clip")
    fps_min: float = _f(8.0, "lowest effective frame rate a clip is sampled at")
    fps_max: float = _f(30.0, "highest effective frame rate (never above the source's own rate)")
    height: int = _f(32, "clip height in pixels (frames are resized/cropped to it)")
    width: int = _f(32, "clip width in pixels")
    random_flip: bool = _f(False, "flip clips horizontally at random (note: flips the direction of motion)")
    num_workers: int = _f(0, "DataLoader worker processes (0 = load in the training process)")
    clips_per_file: int = _f(
        16, "folder/manifest sources: distinct clips (start, rate, crop) drawn per video file; the dataset "
        "length is files x clips_per_file, and item i is always the same clip (reproducible across workers)"
    )
    synthetic: SyntheticConfig = _f(doc="options of the synthetic source", factory=SyntheticConfig)


@dataclass
class VaeConfig:
    """The VAE whose latent space the model works in (eqm.vae); weights from a local folder."""

    path: Optional[str] = _f(
        None, "local folder of a diffusers VAE: AutoencoderKL (e.g. stabilityai/sd-vae-ft-ema, per frame) or "
        "AutoencoderKLWan (e.g. the vae/ folder of Wan-AI/Wan2.1-T2V-1.3B-Diffusers, 4x temporal); kind from its "
        "config.json; null = pixels (with data.source latents: the cache's VAE)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32", "precision the VAE runs in on a GPU (bfloat16 halves its memory; float16 becomes float32 for "
        "VAEs whose config sets force_upcast, such as SD-VAE); always float32 on the CPU"
    )
    batch_size: int = _f(8, "clips per VAE call when caching or encoding on the fly")


@dataclass
class TrainConfig:
    """Optimisation, checkpoints, logging and previews (eqm.train)."""

    steps: int = _f(1000, "optimizer steps to train for (a step is grad_accum micro-batches)")
    batch_size: int = _f(32, "clips per micro-batch per process (global batch = batch_size * grad_accum * processes)")
    lr: float = _f(1e-4, "peak AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay (EqM/SiT use 0)")
    warmup_steps: int = _f(0, "linear learning-rate warmup from 0 over this many steps")
    lr_schedule: Literal["constant", "cosine"] = _f(
        "constant", "after warmup: constant, or cosine decay to min_lr_ratio * lr at the last step"
    )
    min_lr_ratio: float = _f(0.1, "cosine schedule: final lr as a fraction of lr")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value (0 = no clipping; the norm is logged anyway)")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    diverge_loss: float = _f(
        10.0, "stop the run (without applying the step) when a step's loss exceeds this multiple of its running "
        "level, the geometric mean of the healthy steps so far; NaN/inf always stops it; 0 = only NaN/inf",
    )
    diverge_grad_norm: float = _f(
        100.0, "the same for the gradient norm (before clipping), checked from step diverge_warmup on (healthy "
        "gradient norms rise and jump by 10x early on); 0 = only NaN/inf",
    )
    diverge_warmup: int = _f(50, "healthy steps before the gradient-norm check starts (the loss is checked from the second step)")
    ema_decay: float = _f(0.9999, "EMA decay per optimizer step (0 = EMA equals the model); in [0, 1)")
    time_shift: float = _f(
        0.0,
        "seconds: each training clip's temporal positions start at a random time drawn uniformly from "
        "[0, time_shift] instead of 0 (tau offset = shift * ref_fps), so clips longer than the training "
        "clips meet no unseen positions at sampling; sampling is never shifted; 0 = off",
    )
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = _f(
        "no", "autocast precision (weights, optimizer and EMA stay float32): bf16 on GPU or CPU, fp16 on GPU only "
        "(ignored with a warning on CPU), auto = bf16 where the GPU or CPU computes in bf16 natively "
        "(AVX-512 BF16 / AMX), else float32"
    )
    seed: int = _f(0, "global seed: model init, data order and noise are deterministic functions of (seed, step, rank)")
    log_every: int = _f(10, "write a metrics.jsonl line / log line every N steps")
    ckpt_every: int = _f(1000, "save a checkpoint every N steps (the last step is always saved)")
    keep_last: int = _f(3, "keep only the newest N checkpoints (0 = keep all); while training, also the newest one followed by a healthy step")
    preview_every: int = _f(0, "write a preview MP4 sampled from the EMA model every N steps and at the end (0 = never)")
    preview_fps: Union[float, str] = _f(24.0, "frame rate of preview clips (timestamps k/fps; '30000/1001' and 29.97 are exact)")
    preview_frames: Optional[int] = _f(None, "frames per preview clip; null = data.num_frames")
    preview_samples: int = _f(4, "clips per preview (tiled side by side, labels cycling through the classes)")


@dataclass
class SampleConfig:
    """Sampler settings of previews (eqm.config.SamplerSettings, field by field); null = the method's
    measured default (eqm.config.SMALL_MODEL_SETTINGS).  `eqmctl sample` takes cfg_scale from here."""

    method: Literal["gd", "nag"] = _f("gd", "gd (x += eta f) or nag (Nesterov look-ahead with momentum)")
    steps: Optional[int] = _f(None, "maximum sampler steps; null = the method's default")
    step_size: Optional[float] = _f(None, "eta; null = the method's default")
    momentum: Optional[float] = _f(None, "NAG momentum mu; null = the method's default (nag 0.3)")
    tol: Optional[float] = _f(None, "adaptive stop when a sample's gradient RMS falls below tol; null = run all steps")
    cfg_scale: float = _f(1.0, "classifier-free guidance scale (1 = off)")
    guidance_channels: Optional[int] = _f(
        None, "guide only the first N channels, the rest follow the conditional field (3: the official EqM sampler); null = all"
    )
    cfg_every: Optional[int] = _f(
        None, "with guidance, run the null-label pass every N-th step and reuse its guidance term in between; null = 1 (every step)"
    )


@dataclass
class TrackingConfig:
    """Experiment trackers through Accelerate (metrics.jsonl is always written)."""

    backend: Optional[Literal["tensorboard", "wandb"]] = _f(
        None, "null/none, tensorboard or wandb (the package must be installed)"
    )
    project: str = _f("eqmctl", "project name passed to the tracker")


@dataclass
class Recipe:
    """A complete training recipe.  ``name`` defaults to the YAML file's stem."""

    name: Optional[str] = _f(None, "run name prefix (runs/<name>-<timestamp>); null = the recipe file's stem")
    description: str = _f("", "free text")
    model: ModelConfig = _f(doc="the transformer", factory=ModelConfig)
    objective: ObjectiveConfig = _f(doc="the EqM loss", factory=ObjectiveConfig)
    data: DataConfig = _f(doc="the training clips", factory=DataConfig)
    vae: VaeConfig = _f(doc="the latent space (null path = pixels)", factory=VaeConfig)
    train: TrainConfig = _f(doc="the optimisation loop", factory=TrainConfig)
    sample: SampleConfig = _f(doc="sampler defaults", factory=SampleConfig)
    tracking: TrackingConfig = _f(doc="optional trackers", factory=TrackingConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON-able), every field present: the *resolved* recipe."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def get(self, dotted: str) -> Any:
        """Value of a dotted key, e.g. ``recipe.get("model.time.mode")``."""
        obj: Any = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj

    def model_config(self, num_classes: int, shape: Optional[tuple] = None, **fixed: Any) -> "EqMConfig":
        """The :class:`~eqm.config.EqMConfig` this recipe trains: ``model.size`` plus every recipe
        key of :data:`ARCH_KEYS` that is set.  From the caller: ``num_classes`` (the dataset's when
        the recipe says null), ``shape`` (C, T, H, W) of the model's input (default: the pixels of
        ``data``; in latent space eqm.latent.model_input_shape) and ``fixed`` (e.g. a resumed
        checkpoint's ``time_order``).  Raises EqmError naming the recipe key at fault."""
        from .config import EqMConfig

        C, T, H, W = shape or (3, self.data.num_frames, self.data.height, self.data.width)
        values = {f: v for f, key in ARCH_KEYS.items() if key is not None and (v := self.get(key)) is not None}
        values.update(in_channels=C, num_frames=T, input_size=(H, W), num_classes=num_classes, **fixed)
        try:
            return EqMConfig.from_size(self.model.size, **values)
        except ParamError as e:
            raise EqmError(_recipe_terms(e)) from None

    def preview_rate(self) -> "Fraction":
        """``train.preview_fps`` as the exact rate previews are sampled and written at; raises
        EqmError naming the key."""
        from .timebase import parse_fps

        return parse_fps(self.train.preview_fps, name="train.preview_fps")

    def sampler_settings(self) -> "SamplerSettings":
        """The :class:`~eqm.config.SamplerSettings` of the ``sample`` section (same field names;
        null = the method's measured default, except tol: null runs every step).  Raises EqmError
        naming the ``sample.*`` key."""
        from .config import SamplerSettings

        values = {f: getattr(self.sample, f) for f in SamplerSettings.field_names()}
        values["tol"] = values["tol"] or 0.0  # sample.tol null: run every step
        try:
            return SamplerSettings(**values)
        except ParamError as e:
            raise EqmError(f"sample.{e}") from None  # fields and sample.* keys share their names


#: The recipe key of every EqMConfig field (None: not set from a recipe key).  A new model option
#: is a field of EqMConfig plus a recipe field named here (test_recipe checks the two agree).
ARCH_KEYS: dict[str, Optional[str]] = {
    "input_size": None,  # the input shape: data.height/width in pixels, the latents' in latent space
    "in_channels": None,  # 3 (RGB pixels) or the latents' channels
    "num_frames": None,  # data.num_frames in pixels, the latents' frames in latent space
    "patch_size": "model.patch_size",
    "temporal_patch": "model.temporal_patch",
    "hidden_size": "model.hidden_size",
    "depth": "model.depth",
    "num_heads": "model.num_heads",
    "mlp_ratio": "model.mlp_ratio",
    "class_dropout_prob": "model.class_dropout_prob",
    "num_classes": None,  # model.num_classes, or the dataset's count when null
    "learn_sigma": "model.learn_sigma",
    "pos": "model.pos",
    "time_mode": "model.time.mode",
    "ref_fps": "model.time.ref_fps",
    "time_frac": "model.time.frac",
    "time_order": "model.time.order",
    "energy": "objective.energy",
    "attention": "model.attention",
}
_FIELD_KEYS = {**{f: k for f, k in ARCH_KEYS.items() if k}, "input_size": "data.height/data.width",
               "num_frames": "data.num_frames", "num_classes": "model.num_classes", "size": "model.size"}


def _recipe_terms(e: ParamError) -> str:
    """An EqMConfig message, which starts with the field name, restated with the recipe key."""
    text, key = str(e), _FIELD_KEYS.get(e.param)
    return key + text[len(e.param):] if key and text.startswith(e.param) else text


# ============================================================================================
# Generic typed conversion
# ============================================================================================

_FLOAT_RE = re.compile(r"^[+-]?((\d+\.?\d*)|(\.\d+))([eE][+-]?\d+)?$")
_NONE_WORDS = {"none"}


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    """'a number', "one of 'gd', 'nag'", 'an integer or null', ... for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    names = {type(None): "null", float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    return f"{brief(value)} ({type(value).__name__})"


class _Mismatch(Exception):
    pass


#: Words YAML 1.1 (PyYAML) turns into booleans; a choice field spelled with one of them (e.g.
#: train.mixed_precision: no) gets the choice back.
_YAML_FALSE = ("no", "off", "false")
_YAML_TRUE = ("yes", "on", "true")


def _convert(value: Any, tp, key: str, allow_none_word: bool = False) -> Any:
    """Convert/check one value against a type annotation; raises _Mismatch when it does not fit."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if (
            type(None) in args
            and isinstance(value, str)
            and value.strip().lower() in _NONE_WORDS
            and allow_none_word
        ):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans: the choice that was written
            spelled = [c for c in choices if c in (_YAML_FALSE if value is False else _YAML_TRUE)]
            if len(spelled) == 1:
                return spelled[0]
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):  # YAML 1.1 reads 1e-4 as a string
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported schema type {tp!r} at {key}")  # a bug in the schema, not user input


def _all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections and leaves)."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        dotted = prefix + f.name
        keys.append(dotted)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, dotted + "."))
    return keys


def _unknown_key(dotted: str, where: str) -> EqmError:
    candidates = _all_keys(Recipe)
    close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
    if not close:  # a misspelt leaf under the right section: compare the last part within it
        parent, _, leaf = dotted.rpartition(".")
        siblings = [k for k in candidates if k.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(dotted, siblings, n=1, cutoff=0.4) if parent else []
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return EqmError(f"{where}: unknown recipe key '{dotted}'{hint}")


def _build(cls, data: Any, prefix: str, where: str):
    """Build dataclass ``cls`` from a mapping, checking keys and types; defaults fill the gaps."""
    section = prefix.rstrip(".") or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EqmError(f"{where}: '{section}' must be a mapping of keys, got {_show(data)}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if not isinstance(k, str) or k not in names:
            raise _unknown_key(prefix + (k if isinstance(k, str) else brief(k))[:80], where)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        dotted = prefix + f.name
        value = data[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value, dotted + ".", where)
            continue
        try:
            kwargs[f.name] = _convert(value, tp, dotted, allow_none_word=True)
        except _Mismatch:
            raise EqmError(f"{where}: {dotted} must be {_type_name(tp)}, got {_show(value)}") from None
    return cls(**kwargs)


# ============================================================================================
# Overrides
# ============================================================================================


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ("train.lr", "3e-4" as YAML reads it).  Values are YAML scalars."""
    if "=" not in text:
        raise EqmError(f"override '{text}' must look like key.sub=value (e.g. train.lr=3e-4)")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
        raise EqmError(f"override '{text}': '{key}' is not a dotted recipe key")
    try:
        value = yaml.load(raw, Loader=_BoundedLoader) if raw.strip() else ""  # noqa: S506 -- SafeLoader
    except _YamlLimit as e:
        raise EqmError(f"override '{key}=...': refused: the value {e}") from None
    except yaml.YAMLError:
        raise EqmError(f"override '{brief(text)}': the value is not a YAML scalar") from None
    return key, value


def apply_overrides(data: dict, overrides: list[str], where: str = "override") -> dict:
    """Set dotted keys in a raw (not yet validated) recipe mapping; unknown keys -> EqmError."""
    for text in overrides or []:
        key, value = parse_override(text)
        parts = key.split(".")
        cls: Any = Recipe
        node = data
        for i, part in enumerate(parts):
            dotted = ".".join(parts[: i + 1])
            names = {f.name: f for f in dataclasses.fields(cls)}
            if part not in names:
                raise _unknown_key(dotted, f"{where} '{text}'")
            tp = _hints(cls)[part]
            last = i == len(parts) - 1
            if last:
                if dataclasses.is_dataclass(tp) and not isinstance(value, dict):
                    raise EqmError(f"{where} '{text}': '{dotted}' is a section; set one of its keys, e.g. {dotted}.{dataclasses.fields(tp)[0].name}=...")
                node[part] = value
            else:
                if not dataclasses.is_dataclass(tp):
                    raise _unknown_key(key, f"{where} '{text}'")
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                elif not isinstance(child, dict):
                    raise EqmError(f"{where} '{text}': '{dotted}' in the recipe is not a mapping")
                node = child
                cls = tp
    return data


# ============================================================================================
# Validation of values (beyond types)
# ============================================================================================


def validate(recipe: Recipe, where: str = "recipe") -> Recipe:
    """Check impossible values and cross-field constraints; raise EqmError naming the dotted key."""

    def bad(key: str, msg: str) -> EqmError:
        return EqmError(f"{where}: {key} {msg}, got {brief(recipe.get(key))}")

    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise bad(key, msg)

    def finite(key: str):
        v = recipe.get(key)
        if v is not None and isinstance(v, float) and not math.isfinite(v):
            raise bad(key, "must be a finite number")

    for key in _all_keys(Recipe):
        finite(key)

    m, t, o, d, tr, s = recipe.model, recipe.model.time, recipe.objective, recipe.data, recipe.train, recipe.sample
    if recipe.name is not None:
        need(bool(re.fullmatch(r"[\w.+-]+", recipe.name)), "name", "must be a non-empty file-name-safe word (letters, digits, . _ + -)")
    need(m.num_classes is None or m.num_classes >= 0, "model.num_classes", "must be >= 0 (0 = unconditional) or null")
    # objective
    need(0.0 <= o.a < 1.0, "objective.a", "must be in [0, 1)")
    need(o.lam > 0, "objective.lam", "must be > 0")
    # data
    need(d.num_frames >= 1, "data.num_frames", "must be >= 1")
    need(d.fps_min > 0, "data.fps_min", "must be > 0")
    need(d.fps_max > 0, "data.fps_max", "must be > 0")
    need(d.fps_max <= 1000, "data.fps_max", "must be <= 1000")
    need(d.fps_min <= d.fps_max, "data.fps_min", f"must be <= data.fps_max ({d.fps_max:g})")
    need(d.height >= 1, "data.height", "must be >= 1")
    need(d.width >= 1, "data.width", "must be >= 1")
    need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    if d.source == "folder":
        need(bool(d.root), "data.root", "must be set when data.source is folder")
    if d.source == "manifest":
        need(bool(d.manifest), "data.manifest", "must be set when data.source is manifest")
    if d.source == "latents":
        need(bool(d.latents), "data.latents", "must be set when data.source is latents (a directory from `eqmctl cache`)")
    need(recipe.vae.batch_size >= 1, "vae.batch_size", "must be >= 1")
    need(d.synthetic.num_classes >= 1, "data.synthetic.num_classes", "must be >= 1")
    need(d.synthetic.length >= 1, "data.synthetic.length", "must be >= 1")
    need(d.clips_per_file >= 1, "data.clips_per_file", "must be >= 1")
    need(d.synthetic.speed is None or d.synthetic.speed >= 0, "data.synthetic.speed", "must be >= 0")
    need(d.synthetic.radius is None or d.synthetic.radius > 0, "data.synthetic.radius", "must be > 0")
    # train
    need(tr.steps >= 1, "train.steps", "must be >= 1")
    need(tr.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(0 < tr.lr <= MAX_LR, "train.lr", f"must be in (0, {MAX_LR:g}]")
    need(tr.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(tr.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(0 <= tr.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    need(tr.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)")
    need(tr.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    for key in ("diverge_loss", "diverge_grad_norm"):
        v = getattr(tr, key)
        need(math.isfinite(v) and (v == 0 or v > 1), f"train.{key}", "must be 0 (off) or a factor > 1")
    need(tr.diverge_warmup >= 0, "train.diverge_warmup", "must be >= 0")
    need(0.0 <= tr.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
    need(math.isfinite(tr.time_shift) and tr.time_shift >= 0, "train.time_shift", "must be a number of seconds >= 0")
    need(tr.seed >= 0, "train.seed", "must be >= 0")
    need(tr.log_every >= 1, "train.log_every", "must be >= 1")
    need(tr.ckpt_every >= 1, "train.ckpt_every", "must be >= 1")
    need(tr.keep_last >= 0, "train.keep_last", "must be >= 0 (0 = keep all)")
    need(tr.preview_every >= 0, "train.preview_every", "must be >= 0 (0 = never)")
    need(tr.preview_frames is None or tr.preview_frames >= 1, "train.preview_frames", "must be >= 1 or null")
    if tr.preview_frames is not None:
        need(tr.preview_frames % m.temporal_patch == 0, "train.preview_frames", f"must be divisible by model.temporal_patch ({m.temporal_patch})")
    need(tr.preview_samples >= 1, "train.preview_samples", "must be >= 1")
    try:
        recipe.preview_rate()
    except EqmError as e:
        raise EqmError(f"{where}: {e}") from None
    # sample
    if s.cfg_scale != 1.0:
        need(m.num_classes != 0, "sample.cfg_scale", "must be 1 for an unconditional model (model.num_classes: 0)")
    # model and sampler check themselves (EqMConfig, SamplerSettings); with num_classes null (the
    # dataset's) any count fits.  In latent space the input shape is the latents' (checked when the
    # model is built from them): a one-token stand-in lets every other field be checked now.
    latent = recipe.vae.path is not None or d.source == "latents"
    stand_in = (1, m.temporal_patch, m.patch_size, m.patch_size) if latent else None
    try:
        recipe.model_config(num_classes=m.num_classes or 0, shape=stand_in)
        recipe.sampler_settings()
    except EqmError as e:
        raise EqmError(f"{where}: {e}") from None
    return recipe


def check_memory(recipe: Recipe, device=None, where: Optional[str] = None, shape: Optional[tuple] = None) -> None:
    """One training batch and one preview batch of ``recipe`` must fit on ``device`` (eqm.budget:
    refused with the estimate). Training calls it before it builds anything; the weights alone are
    checked by EqMConfig itself. In latent space the token count is the latents': pass their
    ``shape`` (C, T, H, W) once known (eqm.latent.model_input_shape); without it only pixel
    recipes are estimated."""
    from . import budget

    d, t = recipe.data, recipe.train
    if shape is None and (recipe.vae.path is not None or d.source == "latents"):
        return
    where = where or f"recipe {recipe.name}"
    cfg = recipe.model_config(num_classes=recipe.model.num_classes or 0, shape=shape)
    grid = cfg.grid[0] * cfg.grid[1]
    params = budget.model_params(hidden_size=cfg.hidden_size, depth=cfg.depth, mlp_ratio=cfg.mlp_ratio,
                                 in_channels=cfg.in_channels, patch_size=cfg.patch_size,
                                 temporal_patch=cfg.temporal_patch, num_classes=cfg.num_classes, grid_tokens=grid)
    frames = cfg.num_frames  # the model's frames: pixel frames, or latent frames in latent space
    preview = -(-(t.preview_frames or d.num_frames) * frames // d.num_frames)  # as many per source frame
    budget.check_activations(where, batch=t.batch_size, tokens=frames // cfg.temporal_patch * grid,
                             hidden_size=cfg.hidden_size, depth=cfg.depth, params=params, training=True, device=device)
    budget.check_activations(f"{where}: train.preview_samples", batch=2 * t.preview_samples,
                             tokens=max(1, preview // cfg.temporal_patch) * grid,
                             hidden_size=cfg.hidden_size, depth=cfg.depth, params=params, device=device)


# ============================================================================================
# Loading
# ============================================================================================


def recipe_from_dict(data: Any, overrides: Optional[list[str]] = None, where: str = "recipe", name: Optional[str] = None) -> Recipe:
    """Build and validate a Recipe from a plain mapping (e.g. state.json's "recipe") plus overrides."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EqmError(f"{where}: the recipe must be a YAML mapping of sections, got {_show(data)}")
    import copy

    data = apply_overrides(copy.deepcopy(data), list(overrides or []))
    recipe = _build(Recipe, data, "", where)
    if recipe.name is None and name is not None:
        recipe.name = name
    return validate(recipe, where)


#: Largest train.lr accepted: AdamW steps move weights by about lr each, so 1 is already a blow-up
#: (tests provoke divergence with it); 1e39 overflowed float32 inside the optimizer step.
MAX_LR = 1.0

#: Limits on a recipe file: a recipe is a few kilobytes, a few levels deep, some hundred values.
MAX_RECIPE_BYTES = 1024 * 1024
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 100_000


class _YamlLimit(Exception):
    """Raised inside the loader; load_recipe turns it into an EqmError naming the file."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that caps nesting depth while composing (no RecursionError) and, before any
    Python object is built, the size of the document with every alias use expanded (an alias
    bomb is refused in milliseconds instead of filling memory)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _YamlLimit(f"is nested more than {MAX_YAML_DEPTH} levels deep at line {mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _check_expanded(node)
        return node


def _check_expanded(root) -> None:
    """_YamlLimit when the node graph, aliases expanded, has more than MAX_YAML_NODES nodes or is
    deeper than MAX_YAML_DEPTH, or refers to itself. Iterative, each distinct node measured once."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        kids = _yaml_children(node)
        if done:
            size[id(node)] = 1 + sum(size[id(c)] for c in kids)
            depth[id(node)] = 1 + max((depth[id(c)] for c in kids), default=0)
            open_nodes.discard(id(node))
            if size[id(node)] > MAX_YAML_NODES:
                raise _YamlLimit(f"expands to more than {MAX_YAML_NODES} values (aliases counted at every use)")
            if depth[id(node)] > MAX_YAML_DEPTH:
                raise _YamlLimit(f"is nested more than {MAX_YAML_DEPTH} levels deep once aliases are expanded")
            continue
        if id(node) in size:
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for c in kids:
            if id(c) in open_nodes:
                raise _YamlLimit("has an alias that refers to the node containing it")
            if id(c) not in size:
                stack.append((c, False))


def _yaml_children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def load_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Recipe:
    """Read a recipe YAML, apply ``key.sub=value`` overrides, check keys, types and values.

    Raises EqmError (one line, naming the file and the dotted key) on any problem: an empty file,
    one larger than MAX_RECIPE_BYTES, nested deeper than MAX_YAML_DEPTH or expanding (aliases
    counted at every use) past MAX_YAML_NODES values.  ``name`` defaults to the file's stem.
    """
    path = Path(path)
    if not path.is_file():
        raise EqmError(f"recipe file not found: {path}")
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise EqmError(f"recipe {path} is {path.stat().st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES}")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise EqmError(f"recipe {path} is not UTF-8 text") from None
    except OSError as e:
        raise EqmError(f"cannot read recipe {path}: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 -- a SafeLoader with limits
    except _YamlLimit as e:
        raise EqmError(f"recipe {path}: refused: the YAML {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise EqmError(f"recipe {path}: not valid YAML{at}: {problem}") from None
    if data is None:
        raise EqmError(f"recipe {path} is empty (no settings); start from one in recipes/")
    stem = re.sub(r"[^\w.+-]", "_", path.stem) or "run"
    return recipe_from_dict(data, overrides, where=str(path), name=stem)


def schema_lines(cls=Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every leaf of the schema -- for docs and `--schema`."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        dotted = prefix + f.name
        if dataclasses.is_dataclass(tp):
            rows.extend(schema_lines(tp, dotted + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((dotted, _type_name(tp), "null" if default is None else repr(default), f.metadata.get("doc", "")))
    return rows
