"""Reading model weights from the files people have: official EqM ``.pt`` checkpoints, eqmctl
checkpoints and run directories, and bare safetensors files.

An official checkpoint is a ``torch.save`` of ``{"model", "ema", "opt", "args"}``: two state dicts
with our parameter names (docs/design.md#parameter-names lists them), the optimizer state, and the
training script's ``argparse.Namespace`` (``model="EqM-XL/2"``, ``image_size=256``, ``ebm``,
``uncond``, ...).  Some released files are a bare state dict.  Loading one is a pickle, so it is
done with ``torch.load(weights_only=True)``, with ``argparse.Namespace`` the only class allowed
beyond tensors and containers, and only for that call: a file that asks for anything else (a
function to call, another class) is refused before any of it runs, with a one-line error naming
what it asked for.  Tensors are memory-mapped, so the optimizer state of an XL file is never read.

:func:`official_arch` turns the args and the weights' shapes into our model options (an image
model: T = 1, sin/cos positions, 4 latent channels at image_size / 8); everything the shapes
show (hidden size, depth, patch, channels, classes, learn_sigma) is taken from them and checked
against the model name, so a renamed or truncated file fails on the key that is wrong.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .errors import EqmError, brief

PathLike = Union[str, Path]

WEIGHT_CHOICES = ("ema", "model")

#: The classes an official checkpoint pickles besides tensors and plain containers.
OFFICIAL_SAFE_GLOBALS = (argparse.Namespace,)

#: Official model names (EqM-XL/2, SiT-B/4, ...; our own sizes too, EqM-tiny/2): size and patch.
_MODEL_NAME = re.compile(r"^(?:EqM|SiT|DiT)-(\w+)/(\d+)$")

#: The VAE's downsampling factor: official models run at image_size / 8 latents.
VAE_FACTOR = 8

#: Official ``--ebm`` values -> our objective.energy ("mean" computes the same energy as "dot").
_ENERGY = {"none": None, "dot": "dot", "l2": "l2", "mean": "dot"}


@dataclass(frozen=True)
class LoadedWeights:
    """One state dict and what is known about where it came from.

    kind: "official" (a .pt in the official layout), "eqmctl" (a checkpoint or run directory) or
    "safetensors"; weights: "ema" or "model" (the set actually read); arch: model options
    (EqMTransformer keyword arguments) when the file says, else None; args: the official
    training arguments as a dict; notes: one-line remarks for the user (e.g. no EMA in the file).
    """

    state_dict: dict
    source: str
    kind: str
    weights: str
    arch: Optional[dict] = None
    args: dict = field(default_factory=dict)
    notes: tuple = ()

    @property
    def num_classes(self) -> Optional[int]:
        return None if self.arch is None else int(self.arch["num_classes"])


# ============================================================================================
# Safe reading of a .pt file
# ============================================================================================


def read_pt(path: PathLike) -> Any:
    """A .pt file read with only OFFICIAL_SAFE_GLOBALS allowed beyond tensors and plain values,
    tensors memory-mapped on the CPU (:func:`eqm.checkpoint.read_torch_file`)."""
    from .checkpoint import read_torch_file

    path = Path(path)
    if not path.is_file():
        raise EqmError(f"checkpoint not found: {path}")
    return read_torch_file(path, allowed=OFFICIAL_SAFE_GLOBALS, mmap=True)


def _strip_prefixes(sd: dict) -> dict:
    """Drop a wrapper prefix every key shares (DDP's ``module.``, torch.compile's ``_orig_mod.``)."""
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _as_state_dict(obj: Any, path: Path, what: str) -> dict:
    import torch

    if not isinstance(obj, dict) or not obj:
        raise EqmError(f"{path}: '{what}' is not a state dict (a mapping of parameter names to tensors)")
    bad = next((k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if bad is not None:
        raise EqmError(f"{path}: '{what}' entry {bad!r} is not a tensor")
    return _strip_prefixes(dict(obj))


def _official_args(obj: Any) -> dict:
    if isinstance(obj, argparse.Namespace):
        return dict(vars(obj))
    return dict(obj) if isinstance(obj, dict) else {}


def read_official(path: PathLike, weights: str = "ema") -> LoadedWeights:
    """An official EqM/SiT ``.pt``: the ``ema`` (default) or ``model`` state dict and its args.

    A bare state dict is accepted too (then there are no args and ``weights`` cannot be chosen).
    The model options come from :func:`official_arch`.
    """
    _check_weights(weights)
    path = Path(path)
    ckpt = read_pt(path)
    notes: list[str] = []
    if isinstance(ckpt, dict) and ("model" in ckpt or "ema" in ckpt):
        which = weights if weights in ckpt else ("model" if weights == "ema" else "ema")
        if which != weights:
            notes.append(f"{path} has no '{weights}' weights; using '{which}'")
        sd = _as_state_dict(ckpt[which], path, which)
        args = _official_args(ckpt.get("args"))
    else:
        sd, args, which = _as_state_dict(ckpt, path, "state dict"), {}, "file"
        notes.append(f"{path} is a bare state dict (no EMA/model choice, no training arguments)")
    if args.get("uncond") is False:
        notes.append(f"{path} was trained with noise-level conditioning (uncond=False); eqmctl always feeds 0, as EqM does")
    arch = official_arch(args, sd, str(path))
    return LoadedWeights(state_dict=sd, source=str(path), kind="official", weights=which, arch=arch, args=args, notes=tuple(notes))


# ============================================================================================
# Official arguments + shapes -> our model options
# ============================================================================================


def _shape(sd: dict, key: str, source: str, ndim: Optional[int] = None) -> tuple:
    if key not in sd:
        raise EqmError(f"{source}: '{key}' is missing; not an EqM/SiT image checkpoint")
    shape = tuple(sd[key].shape)
    if ndim is not None and len(shape) != ndim:
        raise EqmError(f"{source}: '{key}' has shape {shape}; an image checkpoint has {ndim} dimensions there")
    return shape


def _depth(sd: dict) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _heads(size: Optional[str], hidden: int, depth: int, source: str) -> int:
    """Attention heads: not visible in any shape, so from the named size or a registered one that fits."""
    from .config import EQM_SIZES

    if size is not None:
        return EQM_SIZES[size]["num_heads"]
    fits = [s for s in EQM_SIZES.values() if s["hidden_size"] == hidden and s["depth"] == depth]
    if not fits:
        raise EqmError(
            f"{source}: cannot tell the number of attention heads of a hidden size {hidden}, depth {depth} "
            "model (its training arguments do not name an EqM size)"
        )
    return fits[0]["num_heads"]


def _named_size(args: dict, source: str) -> tuple[Optional[str], Optional[int]]:
    name = args.get("model")
    if name is None:
        return None, None
    from .config import EQM_SIZES

    m = _MODEL_NAME.match(str(name))
    if not m or m.group(1) not in EQM_SIZES:
        raise EqmError(f"{source}: args.model {name!r} is not an EqM/SiT/DiT size such as EqM-XL/2")
    return m.group(1), int(m.group(2))


def _int_arg(args: dict, key: str, source) -> Optional[int]:
    """args[key] as an integer (None when absent); a value that is not one is a one-line EqmError."""
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise EqmError(f"{source}: args.{key} must be an integer, got {brief(value)}")
    try:
        number = float(value)
    except ValueError:
        raise EqmError(f"{source}: args.{key} must be an integer, got {brief(value)}") from None
    if not number.is_integer():
        raise EqmError(f"{source}: args.{key} must be an integer, got {brief(value)}")
    return int(number)


def official_arch(args: dict, sd: dict, source: str = "checkpoint") -> dict:
    """The EqMConfig fields (``EqMConfig.from_dict`` reads them) of an official image checkpoint.

    Shapes decide hidden size, depth, patch, channels, classes and learn_sigma; ``args.model``
    (e.g. "EqM-XL/2") gives the heads and must agree with the shapes; ``args.image_size`` / 8 is
    the latent size and must agree with ``pos_embed``; ``args.ebm`` gives the energy.
    """
    from .config import EQM_SIZES

    D, C, p, p2 = _shape(sd, "x_embedder.proj.weight", source, ndim=4)
    n_tok = _shape(sd, "pos_embed", source, ndim=3)[1]
    depth = _depth(sd)
    size, patch = _named_size(args, source)
    if size is not None:
        want = EQM_SIZES[size]
        for what, have, need in (("hidden size", D, want["hidden_size"]), ("depth", depth, want["depth"]), ("patch size", p, patch)):
            if have != need:
                raise EqmError(f"{source}: args.model is {args['model']} (a {what} of {need}) but the weights have {have}")
    grid = int(round(n_tok ** 0.5))
    if grid * grid != n_tok or p != p2:
        raise EqmError(f"{source}: pos_embed has {n_tok} tokens with {p}x{p2} patches; expected a square grid of square patches")
    input_size = grid * p
    image_size = _int_arg(args, "image_size", source)
    if image_size is not None and image_size // VAE_FACTOR != input_size:
        raise EqmError(f"{source}: args.image_size {image_size} means {image_size // VAE_FACTOR}x"
                       f"{image_size // VAE_FACTOR} latents, but pos_embed is for {input_size}x{input_size}")
    out = _shape(sd, "final_layer.linear.weight", source, ndim=2)[0]
    if out not in (p * p * C, 2 * p * p * C):
        raise EqmError(f"{source}: final_layer.linear.weight has {out} outputs; expected {p * p * C} or {2 * p * p * C}")
    rows = _shape(sd, "y_embedder.embedding_table.weight", source, ndim=2)[0]
    num_classes = _int_arg(args, "num_classes", source) or (rows - 1)
    if rows not in (num_classes, num_classes + 1):
        raise EqmError(f"{source}: y_embedder.embedding_table.weight has {rows} rows for {num_classes} classes")
    ebm = str(args.get("ebm", "none")).lower()
    if ebm not in _ENERGY:
        raise EqmError(f"{source}: args.ebm {ebm!r} is not one of {', '.join(_ENERGY)}")
    return dict(
        input_size=[input_size, input_size], in_channels=C, num_frames=1, patch_size=p, temporal_patch=1,
        hidden_size=D, depth=depth, num_heads=_heads(size, D, depth, source), mlp_ratio=4.0,
        class_dropout_prob=0.1 if rows == num_classes + 1 else 0.0, num_classes=num_classes,
        learn_sigma=out == 2 * p * p * C, pos="sincos", time_mode="seconds", energy=_ENERGY[ebm],
    )


# ============================================================================================
# Any source
# ============================================================================================


def _check_weights(weights: str) -> None:
    if weights not in WEIGHT_CHOICES:
        raise EqmError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")


def is_official_file(path: PathLike) -> bool:
    """A torch file (.pt / .pth / .bin) that is not part of an eqmctl checkpoint directory."""
    from .checkpoint import is_checkpoint

    p = Path(path)
    return p.is_file() and p.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt") and not is_checkpoint(p.parent)


def _read_eqmctl(path: Path, weights: str) -> LoadedWeights:
    from . import checkpoint as ck

    ckpt = ck.resolve_checkpoint(path)
    state = ck.load_state(ckpt)
    if path.is_file() and path.suffix == ".safetensors":
        file, which = path, ("ema" if path.name == ck.EMA_FILE else "model")
    else:
        which = weights if weights == "model" or (ckpt / ck.EMA_FILE).is_file() else "model"
        file = ckpt / (ck.EMA_FILE if which == "ema" else ck.MODEL_FILE)
    notes = () if which == weights else (f"{ckpt} has no EMA weights; using the model weights",)
    arch = dict(state["arch"])
    return LoadedWeights(state_dict=ck.load_weights(file), source=str(file), kind="eqmctl", weights=which, arch=arch, notes=notes)


def load_weights_from(path: PathLike, weights: str = "ema") -> LoadedWeights:
    """Weights from an official ``.pt``, an eqmctl checkpoint / run directory, or a safetensors file.

    ``weights``: "ema" (default) or "model".  A bare safetensors file carries no options
    (``arch`` None); one inside an eqmctl checkpoint directory gets that checkpoint's.
    """
    from .checkpoint import is_checkpoint, load_weights

    _check_weights(weights)
    p = Path(path)
    if not p.exists():
        raise EqmError(f"weights not found: {p}")
    if is_official_file(p):
        return read_official(p, weights)
    if p.is_dir() or is_checkpoint(p.parent):
        return _read_eqmctl(p, weights)
    if p.suffix == ".safetensors":
        return LoadedWeights(state_dict=_strip_prefixes(load_weights(p)), source=str(p), kind="safetensors", weights="file")
    raise EqmError(f"{p}: expected an official EqM .pt, an eqmctl checkpoint or run directory, or a .safetensors file")


def load_official_model(path: PathLike, weights: str = "ema", device="cpu"):
    """The image model of an official checkpoint, weights loaded strictly, in eval mode.

    Returns ``(model, loaded)`` with ``loaded`` the :class:`LoadedWeights` (args, notes).
    """
    from .checkpoint import load_into
    from .config import EqMConfig
    from .model import EqMTransformer

    loaded = read_official(path, weights)
    model = EqMTransformer(EqMConfig.from_dict(loaded.arch, loaded.source))
    load_into(model, loaded.state_dict, loaded.source)
    return model.to(device).eval(), loaded
