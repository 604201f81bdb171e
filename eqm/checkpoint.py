"""Checkpoints on disk: safetensors weights, JSON state, and a weights_only torch file.

A checkpoint is ``checkpoints/step_XXXXXXX/`` in a run directory (:mod:`eqm.rundir`):
``model.safetensors``, ``ema.safetensors`` (what ``sample`` uses by default), ``state.json``
({"step", "recipe", "arch", "format", ...}) and ``optim.pt`` (optimizer / LR-scheduler / RNG
state, read with ``torch.load(weights_only=True)``).  It is written into a hidden
``.tmp-step_XXXXXXX-<pid>`` folder and renamed into place, so a crash leaves all of it or nothing;
only folders holding a ``state.json`` count.  The format's rules: docs/reference.md#checkpoint-format;
why three formats and how writes stay atomic: docs/design.md#run-directory-and-checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from . import fsio
from .errors import EqmError, NonFiniteError, brief
from .jsonio import dumps

if TYPE_CHECKING:
    from .config import EqMConfig

CKPT_DIR = "checkpoints"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIM_FILE = "optim.pt"
FORMAT = "eqmctl-checkpoint-v1"

PathLike = Union[str, Path]


def step_dirname(step: int) -> str:
    return f"step_{int(step):07d}"


def _step_of(path: Path) -> Optional[int]:
    name = path.name
    if not name.startswith("step_"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


# ============================================================================================
# Listing and resolving
# ============================================================================================


def is_checkpoint(path: PathLike) -> bool:
    """A complete checkpoint directory (it has a state.json)."""
    p = Path(path)
    return p.is_dir() and (p / STATE_FILE).is_file()


def list_checkpoints(run_dir: PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest step first (hidden temp/trash dirs are skipped)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := _step_of(p)) is not None and is_checkpoint(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The checkpoint with the highest step in ``run_dir``, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def is_run_dir(path: PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / CKPT_DIR).is_dir() or (p / "recipe.yaml").is_file())


def _latest_run(runs_root: Path, prefix: Optional[str] = None) -> Optional[Path]:
    """The run under runs_root whose newest checkpoint was written last (optionally name-filtered)."""
    best, best_t = None, -1.0
    if not runs_root.is_dir():
        return None
    for run in runs_root.iterdir():
        if not run.is_dir() or (prefix is not None and not run.name.startswith(prefix + "-")):
            continue
        ck = latest_checkpoint(run)
        if ck is None:
            continue
        t = (ck / STATE_FILE).stat().st_mtime
        if t > best_t:
            best, best_t = run, t
    return best


def resolve_checkpoint(path: Optional[PathLike] = None, runs_root: PathLike = "runs", *, run_prefix: Optional[str] = None,
                       warn=None, training: bool = False) -> Path:
    """Find a checkpoint directory.

    * None or "latest": the latest checkpoint of the latest run under ``runs_root`` (the run whose
      newest checkpoint was written most recently; ``run_prefix`` restricts to runs named
      ``<prefix>-*``);
    * a run directory: its latest checkpoint;
    * a checkpoint directory, or a file inside one (state.json, model.safetensors, ...): that checkpoint.

    With ``warn`` given, "latest" and a run directory mean the newest *readable* checkpoint
    (`latest_readable`; ``training`` also requires optim.pt). Raises EqmError naming the path
    when nothing usable is there.
    """
    runs_root = Path(runs_root)
    if path is None or str(path) == "latest":
        run = _latest_run(runs_root, run_prefix)
        if run is None:
            which = f" named {run_prefix}-*" if run_prefix else ""
            raise EqmError(f"no checkpoint found: no run{which} with checkpoints under {runs_root}/ (train one, or pass a checkpoint path)")
        return _newest(run, warn, training)
    p = Path(path)
    if not p.exists():
        raise EqmError(f"checkpoint not found: {p}")
    if p.is_file():
        if is_checkpoint(p.parent):
            return p.parent
        raise EqmError(f"{p} is not part of an eqmctl checkpoint (expected a directory with {STATE_FILE})")
    if is_checkpoint(p):
        return p
    if (p / CKPT_DIR).is_dir() or is_run_dir(p):
        ck = latest_checkpoint(p)
        if ck is None:
            raise EqmError(f"run directory {p} has no complete checkpoint yet")
        return _newest(p, warn, training)
    if p.name == CKPT_DIR and p.is_dir():
        ck = latest_checkpoint(p.parent)
        if ck is not None:
            return _newest(p.parent, warn, training)
    raise EqmError(f"{p} is neither a checkpoint directory (with {STATE_FILE}) nor a run directory")


def _newest(run: Path, warn, training: bool) -> Path:
    """The run's latest checkpoint; with ``warn``, its latest readable one."""
    if warn is None:
        return latest_checkpoint(run)  # type: ignore[return-value]
    return latest_readable(run, training=training, warn=warn)  # type: ignore[return-value]


def check_readable(ckpt: PathLike, *, training: bool = False) -> None:
    """EqmError unless the checkpoint's files can be read: state.json, the weight files' headers
    and, with ``training``, optim.pt. Cheap (no tensor is loaded but the optimizer state)."""
    from safetensors import SafetensorError, safe_open

    ckpt = Path(ckpt)
    load_state(ckpt)
    for name in (MODEL_FILE, EMA_FILE):
        f = ckpt / name
        if name == MODEL_FILE or f.exists():
            try:
                with safe_open(str(f), framework="pt") as fh:
                    fh.keys()
            except (SafetensorError, OSError, ValueError) as e:
                raise EqmError(f"cannot read weights {f}: {' '.join(str(e).split())[:200]}") from None
    if training:
        load_training_state(ckpt)


def latest_readable(run_dir: PathLike, *, training: bool = False, warn=None) -> Optional[Path]:
    """The newest checkpoint of ``run_dir`` that `check_readable` accepts (None if there is none):
    a checkpoint damaged after it was written (a bad disk, a hand edit) costs one checkpoint
    interval, not the run. ``warn(message)`` is told about every newer one passed over."""
    ckpts = list_checkpoints(run_dir)
    for ck in reversed(ckpts):
        try:
            check_readable(ck, training=training)
            return ck
        except EqmError as e:
            if ck == ckpts[0]:
                raise
            if warn is not None:
                warn(f"skipping unreadable checkpoint {ck} ({e}); using the one before it")
    return None


def run_dir_of(ckpt: PathLike) -> Path:
    """The run directory a checkpoint belongs to (run_dir/checkpoints/step_X -> run_dir; also for
    one moved aside to run_dir/checkpoints/abandoned-<time>/step_X)."""
    parent = Path(ckpt).parent
    if parent.name.startswith("abandoned-"):
        parent = parent.parent
    return parent.parent


def checkpoint_step(ckpt: PathLike) -> Optional[int]:
    """The step in a checkpoint directory's name (step_XXXXXXX), or None."""
    return _step_of(Path(ckpt))


# ============================================================================================
# RNG state as tensors / plain types (weights_only-loadable)
# ============================================================================================


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain types."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only if the device count matches)."""
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ============================================================================================
# Saving
# ============================================================================================


def _tensors(module_or_dict) -> dict:
    sd = module_or_dict.state_dict() if hasattr(module_or_dict, "state_dict") else module_or_dict
    # safetensors refuses shared storage and needs contiguous CPU tensors
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_checkpoint(
    run_dir: PathLike,
    step: int,
    *,
    model,
    ema=None,
    config: "EqMConfig",
    recipe: dict,
    optimizer_state: Optional[dict] = None,
    extra: Optional[dict] = None,
    keep_last: int = 0,
) -> Path:
    """Write run_dir/checkpoints/step_XXXXXXX atomically and prune to ``keep_last`` (0 = keep all).

    model / ema: modules (or state dicts) saved to safetensors.  config: the model's
    :class:`~eqm.config.EqMConfig` (stored as ``arch``); recipe: the resolved recipe dict; both go
    to state.json with ``step`` and ``extra``.  optimizer_state: any weights_only-loadable structure (optimizer, scheduler, RNG),
    saved to optim.pt.  An existing checkpoint of the same step is replaced atomically.
    """
    import torch
    from safetensors.torch import save

    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dirname(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        meta = {"format": "pt", "step": str(int(step))}
        # bytes written with a plain open(): safetensors' save_file creates its files 0600
        (tmp / MODEL_FILE).write_bytes(save(_tensors(model), metadata=meta))
        if ema is not None:
            (tmp / EMA_FILE).write_bytes(save(_tensors(ema), metadata=meta))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIM_FILE)
        state = {
            "format": FORMAT,
            "step": int(step),
            "time": time.time(),
            "has_ema": ema is not None,
            "arch": config.to_dict(),
            "recipe": recipe,
        }
        if extra:
            state.update(extra)
        (tmp / STATE_FILE).write_text(dumps(state, indent=2) + "\n")  # last: it marks a complete checkpoint
        fsio.publish_dir(tmp, final)  # every file fsynced before the rename, the folder after it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last and keep_last > 0:
        prune_checkpoints(run_dir, keep_last)
    return final


def prune_checkpoints(run_dir: PathLike, keep_last: int, *, protect: Optional[PathLike] = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints, never ``protect``; returns the removed paths."""
    ckpts = list_checkpoints(run_dir)
    removed = []
    for old in ckpts[: max(0, len(ckpts) - keep_last)]:
        if protect is not None and old == Path(protect):
            continue
        trash = old.parent / f".trash-{old.name}-{os.getpid()}"
        os.rename(old, trash)  # hidden first: never a half-deleted checkpoint with a state.json
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(old)
    return removed


def clean_stale(run_dir: PathLike) -> int:
    """Remove ``.tmp-*`` / ``.trash-*`` leftovers of interrupted writes; returns how many."""
    root = Path(run_dir) / CKPT_DIR
    n = 0
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


# ============================================================================================
# Loading
# ============================================================================================


#: state.json holds a recipe and an architecture: kilobytes. Anything far larger is not ours.
MAX_STATE_BYTES = 16 * 1024 * 1024


def load_state(ckpt: PathLike) -> dict:
    """state.json of a checkpoint directory, its contents checked (`check_state`): EqmError naming
    the file if it is missing, unreadable, not UTF-8 JSON, or holds values of the wrong type."""
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise EqmError(f"checkpoint state not found: {path}")
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise EqmError(f"{path} is {path.stat().st_size} bytes, too large for a checkpoint state "
                           f"(at most {MAX_STATE_BYTES})")
        state = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise EqmError(f"checkpoint state {path} is not UTF-8 text") from None
    except RecursionError:
        raise EqmError(f"checkpoint state {path} is nested too deeply") from None
    except (OSError, json.JSONDecodeError) as e:
        raise EqmError(f"cannot read checkpoint state {path}: {e}") from None
    check_state(state, path)
    return state


def check_state(state: Any, path: PathLike) -> None:
    """The fields readers rely on have the right types: step an integer >= 0, arch a mapping,
    recipe a mapping, class_names a list of strings, has_ema true/false."""
    if not isinstance(state, dict) or "step" not in state or "arch" not in state:
        raise EqmError(f"{path} is not an eqmctl checkpoint state (needs 'step' and 'arch')")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise EqmError(f"{path}: 'step' must be an integer >= 0, got {brief(step)}")
    for key in ("arch", "recipe"):
        if key in state and not isinstance(state[key], dict):
            raise EqmError(f"{path}: {key!r} must be a mapping, got {brief(state[key])}")
    names = state.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise EqmError(f"{path}: 'class_names' must be a list of strings, got {brief(names)}")
    if "has_ema" in state and not isinstance(state["has_ema"], bool):
        raise EqmError(f"{path}: 'has_ema' must be true or false, got {brief(state['has_ema'])}")


def load_weights(path: PathLike, device="cpu") -> dict:
    """A safetensors file -> state dict (EqmError naming the file if missing or corrupt)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise EqmError(f"checkpoint weights not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise EqmError(f"cannot read weights {path}: {e}") from None


def check_weights(state_dict: dict, source: PathLike) -> None:
    """Refuse weights that cannot be a trained model: a non-float tensor (int, bool: EqmError) or
    NaN / inf values (NonFiniteError, exit code 1: the run that wrote them diverged)."""
    import torch

    for k, v in state_dict.items():
        if not torch.is_floating_point(v):
            raise EqmError(f"weights {source}: tensor {k!r} is {str(v.dtype).replace('torch.', '')}; "
                           "model weights must be floating point")
    for k, v in state_dict.items():
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise NonFiniteError(f"weights {source}: tensor {k!r} holds {bad} NaN/inf values (the training run "
                                 "that wrote them diverged); use an earlier checkpoint")


def load_into(model, state_dict: dict, source: PathLike) -> None:
    """load_state_dict(strict=True) with a one-line EqmError on any key or shape mismatch, a
    non-float tensor or non-finite values (`check_weights`)."""
    check_weights(state_dict, source)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)})")
        raise EqmError(f"weights {source} do not match the model architecture: {'; '.join(parts)} parameters")
    model.load_state_dict(state_dict, strict=True)


def load_model(ckpt_path_or_run_dir: Optional[PathLike] = None, use_ema: bool = True, device="cpu", *, runs_root: PathLike = "runs"):
    """Rebuild the model of a checkpoint and load its (EMA) weights; returns (model in eval mode, state).

    Accepts what :func:`resolve_checkpoint` accepts (None = latest run under ``runs_root``).
    ``state`` is state.json plus ``"checkpoint"`` (the directory) and ``"weights"`` (the file
    loaded).  Without an EMA file, use_ema falls back to the model weights and says so in
    ``state["weights"]``.
    """
    from .config import EqMConfig
    from .model import EqMTransformer

    ckpt = resolve_checkpoint(ckpt_path_or_run_dir, runs_root)
    state = load_state(ckpt)
    model = EqMTransformer(EqMConfig.from_dict(state["arch"], str(ckpt / STATE_FILE)))
    weights = ckpt / (EMA_FILE if use_ema and (ckpt / EMA_FILE).is_file() else MODEL_FILE)
    load_into(model, load_weights(weights), weights)
    model.to(device)
    model.eval()
    state = dict(state, checkpoint=str(ckpt), weights=str(weights))
    return model, state


def load_training_state(ckpt: PathLike, map_location="cpu") -> dict:
    """optim.pt of a checkpoint, read by :func:`read_torch_file` (tensors and plain values only)."""
    path = Path(ckpt) / OPTIM_FILE
    if not path.is_file():
        raise EqmError(f"checkpoint {ckpt} has no training state ({OPTIM_FILE}); it can be sampled from but not resumed")
    tstate = read_torch_file(path, map_location=map_location, what="training state")
    _check_training_state(tstate, path)
    return tstate


def read_torch_file(path: Path, *, allowed=(), mmap: bool = False, map_location="cpu", what: str = "torch checkpoint"):
    """``torch.load(weights_only=True)`` of a torch file: tensors and plain values, plus the
    classes in ``allowed`` (for this call only).  ``mmap`` maps the tensors instead of reading
    them (files older than torch 1.6 cannot be mapped and are read).  A pickle that asks for
    anything else is refused before any of it runs; either way the error is one line naming
    ``what`` and the file.
    """
    import pickle

    import torch

    def load(mapped: bool):
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mapped)

    try:
        try:
            return load(mmap)
        except RuntimeError as e:
            if not (mmap and "mmap" in str(e)):
                raise
            return load(False)
    except pickle.UnpicklingError as e:
        raise _refusal(f"{what} {path}", e) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise EqmError(f"cannot read {what} {path}: {' '.join(str(e).split())[:200]}") from None


def _refusal(where: str, err: Exception) -> EqmError:
    """What torch's weights-only unpickler refused, without its advice to turn the safety off."""
    import re

    text = " ".join(str(err).split())
    asked = re.search(r"GLOBAL ([\w.]+)", text)
    if asked:
        return EqmError(
            f"refused to load {where}: the file asks to run '{asked.group(1)}' while loading, which a checkpoint "
            "never needs (read with torch.load(weights_only=True); nothing in it was executed)"
        )
    detail = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    why = detail.group(1).strip() if detail else text[:160]
    return EqmError(f"cannot read {where}: the weights-only unpickler refused it ({why}; nothing in it was executed)")


def _check_training_state(tstate: Any, path: Path) -> None:
    """optim.pt as training writes it: a mapping whose optimizer / scheduler / rng entries (those
    present; a resume needs all three) have the right shape."""
    if not isinstance(tstate, dict):
        raise EqmError(f"{path}: expected a mapping with 'optimizer', 'scheduler' and 'rng', got {type(tstate).__name__}")
    for key in ("optimizer", "scheduler", "rng"):
        if key in tstate and not isinstance(tstate[key], dict):
            raise EqmError(f"{path}: {key!r} must be a mapping, got {type(tstate[key]).__name__}")
    opt = tstate.get("optimizer", {"state": {}, "param_groups": []})
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise EqmError(f"{path}: 'optimizer' must hold 'state' (a mapping) and 'param_groups' (a list)")
    if "rng" in tstate and not all(k in tstate["rng"] for k in ("python", "numpy", "torch")):
        raise EqmError(f"{path}: 'rng' must hold the python, numpy and torch generator states")


def weights_checksum(model_or_state) -> str:
    """sha256 over the (sorted) parameter names and float32 bytes: equal iff the weights are equal."""
    import hashlib

    import torch

    sd = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().to("cpu", torch.float32).contiguous()
        h.update(k.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
