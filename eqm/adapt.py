"""Initialising a video model from image (or other) weights: ``model.init_from``.

:func:`adapt_state_dict` maps a source state dict onto a freshly built model, parameter by
parameter, and says what it did with each one (loaded / adapted / new / dropped).  Every rule
keeps the initial video model equal to the image model where the two can be compared:

* ``temporal_patch > 1``: the 2D patch kernel W becomes a 3D kernel W / p_t on each of the p_t
  frames.  A clip whose p_t frames are equal then embeds to exactly W * frame, the image model's
  token, so a static scene starts where the image model is; moving content gets the mean of its
  frames' tokens.  The output layer is repeated over the p_t frames of a token for the same reason.
* ``learn_sigma``: EqM never uses the second half of ``final_layer.linear`` (SiT's sigma head);
  a model without it drops that half, a model with it keeps the source's (or starts it at 0).
* ``fps-embed``: the new fps embedder's last layer is zeroed, so it adds 0 to the conditioning.
* ``attention: divided``: the new attention across frames has its output projection zeroed, so
  every block starts as the image block run on each frame.
* RoPE models have no ``pos_embed`` (dropped; a RoPE source into a sin/cos model gets the table);
  sin/cos models at another input size keep their own recomputed table (it is fixed, not learned).
* Another class count: the class rows start from the model's own initialisation (a warning),
  the null-class row, the one guidance and unconditional sampling use, is kept; an unconditional
  model (``num_classes: 0``) keeps only the null row.

Anything else that differs in shape (hidden size, patch size, channels, depth) is a one-line
error naming the key.  :func:`init_from` loads the file (eqm.official), adapts and loads strictly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import EqmError

STATUSES = ("loaded", "adapted", "new", "dropped")

_PATCH = "x_embedder.proj.weight"
_OUT_W, _OUT_B = "final_layer.linear.weight", "final_layer.linear.bias"
_LABELS = "y_embedder.embedding_table.weight"
_POS = "pos_embed"
_FPS = "fps_embedder."
#: model.attention=divided: attention across frames, which no image checkpoint has.
_TEMPORAL = re.compile(r"blocks\.\d+\.temporal_attn\.")


@dataclass
class InitReport:
    """What happened to every parameter: entries (status, key, how) and warnings (one line each)."""

    source: str
    weights: str
    entries: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def add(self, status: str, key: str, how: str = "") -> None:
        self.entries.append((status, key, how))

    def keys(self, status: str) -> list:
        return [k for s, k, _ in self.entries if s == status]

    def rows(self) -> list[tuple[str, int, str]]:
        """(status, count, names) per status, in STATUSES order; loaded names grouped by module."""
        rows = []
        for status in STATUSES:
            items = [(k, how) for s, k, how in self.entries if s == status]
            if not items:
                continue
            if status == "loaded":
                names = _group([k for k, _ in items])
            else:
                names = "; ".join(f"{k} ({how})" if how else k for k, how in items)
            rows.append((status, len(items), names))
        return rows

    def lines(self) -> list[str]:
        """The report as plain text: a title, then one line per status (what `train` logs)."""
        out = [f"initial weights from {self.source} ({self.weights}):"]
        width = max((len(s) for s, _, _ in self.rows()), default=0)
        out += [f"  {status:<{width}} {count:>5}  {names}" for status, count, names in self.rows()]
        return out


def _group(keys: list) -> str:
    """'blocks.* (336), pos_embed, ...': keys counted by their top-level module."""
    counts: dict = {}
    for k in keys:
        top, dot, _ = k.partition(".")
        name = f"{top}.*" if dot else top
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(name if n == 1 and not name.endswith("*") else f"{name} ({n})" for name, n in counts.items())


def _cannot(source: str, key: str, src: torch.Tensor, own: torch.Tensor) -> EqmError:
    return EqmError(
        f"{source}: '{key}' is {tuple(src.shape)} in the checkpoint but {tuple(own.shape)} in the model and "
        "cannot be adapted (hidden size, patch size, channels and depth must match the checkpoint)"
    )


# ============================================================================================
# The rules, one per kind of parameter
# ============================================================================================


def _inflate_patch(src: torch.Tensor, own: torch.Tensor) -> Optional[torch.Tensor]:
    """(D, C, p, p) -> (D, C, p_t, p, p) as W / p_t on every frame (None if the shapes do not fit)."""
    if src.ndim != 4 or own.ndim != 5 or tuple(src.shape) != tuple(own.shape[:2] + own.shape[3:]):
        return None
    pt = own.shape[2]
    return (src / pt).unsqueeze(2).expand(-1, -1, pt, -1, -1).contiguous()


def _source_temporal_patch(src: dict) -> int:
    """p_t of the source, read from its patch kernel ((D, C, p, p) -> 1, (D, C, p_t, p, p) -> p_t)."""
    w = src.get(_PATCH)
    return int(w.shape[2]) if w is not None and w.ndim == 5 else 1


def _map_output(theirs: torch.Tensor, own: torch.Tensor, model, src_pt: int) -> tuple[Optional[torch.Tensor], str]:
    """final_layer.linear weight/bias: drop or add the sigma half, repeat over the temporal patch.

    Rows are ordered (frame in token, row, col, channel), channel fastest; the first C channels
    are the EqM gradient, the next C (learn_sigma) the unused sigma head.  The source's layout is
    read from its own patch kernel, never guessed from this shape alone (a learn_sigma image
    head and a p_t = 2 head without sigma have the same number of rows).
    """
    p, C, pt = model.config.patch_size, model.config.in_channels, model.config.temporal_patch
    tail = tuple(theirs.shape[1:])
    per_token = src_pt * p * p * C
    if tail != tuple(own.shape[1:]) or theirs.shape[0] not in (per_token, 2 * per_token) or src_pt not in (1, pt):
        return None, ""
    cells = theirs.reshape(src_pt, p * p, -1, *tail)  # (p_t, p*p, C or 2C, ...)
    src_sigma = cells.shape[2] == 2 * C
    grad = cells[:, :, :C]
    hows = []
    if model.config.learn_sigma:
        cells = torch.cat([grad, cells[:, :, C:] if src_sigma else torch.zeros_like(grad)], 2)
        if not src_sigma:
            hows.append("sigma half added as zeros, EqM never reads it")
    else:
        cells = grad
        if src_sigma:
            hows.append("sigma half dropped, EqM never reads it")
    if src_pt != pt:
        cells = cells.expand(pt, *cells.shape[1:])
        hows.append(f"repeated over the {pt} frames of a token")
    out = cells.reshape(-1, *tail)
    if tuple(out.shape) != tuple(own.shape):
        return None, ""
    return out.contiguous(), ", ".join(hows)


def _map_labels(src: torch.Tensor, own: torch.Tensor, model, src_classes: Optional[int], report: InitReport):
    """Class table of another shape -> (table, how), or None if the widths differ.

    The same class count (one side without a null row): the class rows are copied.  Another
    count: the class rows keep the model's own initialisation (with a warning).  The source's
    null-class row (the one guidance and unconditional sampling use) is kept when both have one.
    """
    if src.ndim != 2 or src.shape[1] != own.shape[1]:
        return None
    K = model.config.num_classes
    out = own.clone()
    same = src_classes == K
    if same:
        out[:K] = src[:K]
    keep_null = src_classes is not None and src.shape[0] == src_classes + 1 and own.shape[0] == K + 1
    if keep_null:
        out[K] = src[src_classes]
    null = "null-class row kept" if keep_null else "null-class row new"
    if K == 0:
        return out, f"unconditional model: {null}, the checkpoint's {src_classes} class rows dropped"
    if same:
        return out, f"{K} class rows copied, {null}"
    report.warnings.append(
        f"model.num_classes is {K} but {report.source} has {'an unknown number of' if src_classes is None else src_classes} "
        "classes: the class embeddings start from scratch"
    )
    return out, f"{K} class rows re-initialised, the checkpoint has {'?' if src_classes is None else src_classes}; {null}"


# ============================================================================================
# The mapping
# ============================================================================================


def adapt_state_dict(src: dict, model, *, source: str = "checkpoint", weights: str = "ema",
                     src_classes: Optional[int] = None) -> tuple[dict, InitReport]:
    """A state dict for ``model`` built from ``src`` (see the module docstring), and its report.

    ``model`` is freshly initialised: parameters that are new or re-initialised keep its values.
    ``src_classes``: the source's class count when known (to find its null-class row).
    Raises EqmError naming the first key that cannot be mapped.
    """
    own = model.state_dict()
    report = InitReport(source=source, weights=weights)
    out = {}
    for key, mine in own.items():
        value, status, how = _map_one(key, mine, src, model, source, src_classes, report)
        out[key] = value.to(dtype=mine.dtype)
        report.add(status, key, how)
    for key in src:
        if key in own:
            continue
        if key == _POS and model.config.pos == "rope":
            report.add("dropped", key, "RoPE model: positions are rotary, no table")
        elif key.startswith(_FPS):
            report.add("dropped", key, "the model is not in fps-embed mode")
        elif _TEMPORAL.match(key):
            report.add("dropped", key, "the model's attention is full, not divided")
        else:
            raise EqmError(f"{source}: '{key}' in the checkpoint has no place in the model (model.depth or the architecture differs)")
    return out, report


def _map_one(key, mine, src, model, source, src_classes, report):
    """(value, status, how) for one parameter of the model."""
    if key.startswith(_FPS) and key not in src:
        if re.fullmatch(r"fps_embedder\.mlp\.2\.(weight|bias)", key):
            return torch.zeros_like(mine), "new", "zeroed: the fps embedding adds 0 at the start"
        return mine, "new", ""
    if _TEMPORAL.match(key) and key not in src:
        if key.endswith(("proj.weight", "proj.bias")):
            return torch.zeros_like(mine), "new", "zeroed: attention across frames adds 0 at the start"
        return mine, "new", ""
    if key == _POS and key not in src:
        return mine, "new", "fixed sin/cos table; the checkpoint has none (a RoPE model)"
    if key not in src:
        raise EqmError(f"{source}: the model's '{key}' {tuple(mine.shape)} is not in the checkpoint (model.depth or the architecture differs)")
    theirs = src[key]
    if key == _POS and tuple(theirs.shape) != tuple(mine.shape):
        return mine, "new", f"sin/cos table recomputed for {model.config.grid[0]}x{model.config.grid[1]} tokens, the checkpoint's has {theirs.shape[1]}"
    if key in (_OUT_W, _OUT_B):  # before the shape test: equal shapes can still mean another layout
        value, how = _map_output(theirs, mine, model, _source_temporal_patch(src))
        if value is not None:
            return value, ("adapted" if how else "loaded"), how
    elif tuple(theirs.shape) == tuple(mine.shape):
        return theirs, "loaded", ""
    if key == _PATCH:
        value = _inflate_patch(theirs, mine)
        if value is not None:
            return value, "adapted", f"2D kernel / {mine.shape[2]} on each of {mine.shape[2]} frames"
    elif key == _LABELS:
        mapped = _map_labels(theirs, mine, model, src_classes, report)
        if mapped is not None:
            return mapped[0], "adapted", mapped[1]
    raise _cannot(source, key, theirs, mine)


def init_from(model, path, weights: str = "ema") -> InitReport:
    """Load ``path`` (eqm.official.load_weights_from), adapt it to ``model`` and load it strictly.

    Returns the :class:`InitReport` (its ``lines()`` are the start-up table; ``warnings`` and the
    loader's notes are in ``warnings``).
    """
    from .checkpoint import load_into
    from .official import load_weights_from

    loaded = load_weights_from(path, weights)
    sd, report = adapt_state_dict(loaded.state_dict, model, source=loaded.source, weights=loaded.weights,
                                  src_classes=loaded.num_classes)
    report.warnings[:0] = list(loaded.notes)
    load_into(model, sd, loaded.source)
    return report
