"""Look inside the time-aware positional encoding: numbers and plots (``eqmctl inspect-embed``).

For one configuration (a checkpoint's ``arch``, a recipe, or plain options) it measures what
docs/reference.md#time-aware-encoding claims -- frames placed by their time in seconds, adjacent
frames separable at every rate, the frame-index code at ref_fps -- as a heatmap, a cross-rate
similarity matrix, adjacent-frame separability and frequencies against Nyquist.  Codes come from
:mod:`eqm.embed` through the calls the model makes, so the plots show what such a model computes.
Matplotlib is used through ``Figure`` and the Agg canvas, never pyplot, so the caller's backend is
left alone.  What each plot compares: docs/design.md#inspect-embed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from . import embed as E
from . import fsio
from .config import EqMConfig
from .errors import EqmError
from .timebase import format_fps, frames_for_duration, parse_fps, uniform_timestamps

PathLike = Union[str, Path]

#: A heatmap row per rate: more rows are unreadable.
MAX_RATES = 12
#: Clip length cap: the similarity matrix is frames_a x frames_b and a typo (--seconds 600) should
#: be an error, not a 36000 x 14400 matrix.
MAX_SECONDS = 60.0
#: Most frames of one clip: the similarity matrix (and its plot) is frames_a x frames_b, so
#: 60 s at 1000 fps (60000 x 60000, 29 GiB) is refused at once.
MAX_CLIP_FRAMES = 4096
PLOT_FILES = ("heatmap.png", "similarity.png", "separability.png", "frequencies.png")


# ============================================================================================
# Configuration
# ============================================================================================


@dataclass(frozen=True)
class EmbedView:
    """An architecture seen through its temporal code: the model's EqMConfig (validated when it
    was made), where it came from, and the rates it was trained on.  The default is EqM-S, whose
    sincos code has d_t = 96 time channels, the width docs/embedding.md#choosing-ref_fps quotes."""

    arch: EqMConfig = EqMConfig()
    #: where the settings came from (shown in the report), e.g. "checkpoint runs/x/checkpoints/step_0000600"
    source: str = "options"
    #: (fps_min, fps_max) the model was trained on, when known: shaded in the separability plot
    train_fps: Optional[tuple[float, float]] = None

    def omegas(self) -> np.ndarray:
        """The d_t / 2 angular frequencies (rad per unit of tau) of the temporal code, fastest first."""
        if self.arch.time_channels == 0:
            return np.zeros(0)
        return E.frequencies(self.arch.time_channels, dtype=torch.float64).numpy()

    def with_time(self, time_mode: str, ref_fps: Optional[float] = None) -> "EmbedView":
        return replace(self, arch=replace(self.arch, time_mode=time_mode, ref_fps=self.arch.ref_fps if ref_fps is None else ref_fps))

    def describe(self) -> str:
        """One line: 'sincos, seconds mode, ref_fps 24, 96 time channels of 384'."""
        a = self.arch
        mode = f"seconds mode, ref_fps {a.ref_fps:g}" if a.time_mode == "seconds" else f"{a.time_mode} mode"
        if a.pos == "sincos":
            width = f"{a.time_channels} time channels of {a.hidden_size}"
        else:
            width = f"{a.time_channels} time channels of each {a.head_dim}-dim head"
        patch = f", temporal patch {a.temporal_patch}" if a.temporal_patch > 1 else ""
        layout = f", {a.time_order} layout" if a.pos == "sincos" and a.time_order != E.DEFAULT_TIME_ORDER else ""
        return f"{a.pos}, {mode}, {width}{layout}{patch}"

    def to_dict(self) -> dict:
        """The settings that shape the code, plus source, d_t and the training rates (JSON-able)."""
        a = self.arch
        conf = {k: getattr(a, k) for k in EMBED_FIELDS}
        return {**conf, "source": self.source, "time_channels": a.time_channels,
                "train_fps": list(self.train_fps) if self.train_fps else None}


#: The EqMConfig fields the temporal code depends on (what the report shows).
EMBED_FIELDS = ("pos", "time_mode", "ref_fps", "time_frac", "time_order", "hidden_size", "num_heads", "temporal_patch")


def _fps_range(data: object) -> Optional[tuple[float, float]]:
    try:
        lo, hi = float(data["fps_min"]), float(data["fps_max"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return None
    return (lo, hi) if 0 < lo <= hi else None


def view_from_checkpoint(path: PathLike) -> EmbedView:
    """From a checkpoint or run directory: reads state.json only (the code needs no weights)."""
    from .checkpoint import STATE_FILE, load_state, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    state = load_state(ckpt)
    arch = EqMConfig.from_dict(state["arch"], str(ckpt / STATE_FILE))
    recipe = state.get("recipe")
    train_fps = _fps_range(recipe.get("data")) if isinstance(recipe, dict) else None
    return EmbedView(arch, source=f"checkpoint {ckpt}", train_fps=train_fps)


def view_from_recipe(path: PathLike, overrides: Sequence[str] = ()) -> EmbedView:
    """From a recipe YAML plus ``key=value`` overrides, resolved exactly as training builds the model."""
    from .recipe import load_recipe

    recipe = load_recipe(path, list(overrides))
    # num_classes does not touch the positional code
    arch = recipe.model_config(num_classes=1)
    return EmbedView(arch, source=f"recipe {path}", train_fps=(recipe.data.fps_min, recipe.data.fps_max))


# ============================================================================================
# The temporal code, as the model computes it
# ============================================================================================


def temporal_code(cfg: EmbedView, timestamps: torch.Tensor, *, as_added: bool = False) -> torch.Tensor:
    """The temporal code of every temporal token: timestamps (B, T) or (T,) seconds -> (B, T / p_t, d_t).

    Layout [sin-like half | cos-like half], one column per frequency in each half, fastest first.
    sincos: ``sin(v tau) | cos(v tau)``, or with ``as_added`` exactly what the model adds to the
    tokens, ``sin(v tau) | cos(v tau) - 1``.  rope: ``cos(w tau) | sin(w tau)`` of the time
    group's rotation angles (what q and k are rotated by).
    """
    ts = E.check_timestamps(timestamps)
    tau = E.temporal_coords(
        ts, ts.shape[1], time_mode=cfg.arch.time_mode, ref_fps=cfg.arch.ref_fps, temporal_patch=cfg.arch.temporal_patch,
    )
    if cfg.arch.pos == "sincos":
        full = E.sincos_time(tau, cfg.arch.hidden_size, cfg.arch.time_frac, order=cfg.arch.time_order)  # (B, T', D), zero outside the time channels
        sin_part, cos_part = E.read_sincos_time(full, cfg.arch.hidden_size, cfg.arch.time_frac, order=cfg.arch.time_order)
        if not as_added:
            cos_part = cos_part + 1.0  # undo the image-compat "- 1"
        return torch.cat([sin_part, cos_part], dim=-1)
    coords = E.token_coords(tau, 1, 1)  # (tau, row 0, col 0): the row and column groups stay unrotated
    cos, sin = E.rope_cos_sin(coords, cfg.arch.head_dim, cfg.arch.time_frac)  # (B, 1, T', head_dim / 2), groups [t | row | col]
    n = cfg.arch.time_channels // 2
    return torch.cat([cos[:, 0, :, :n], sin[:, 0, :, :n]], dim=-1)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Cosine similarity of every row of a (Ta, C) with every row of b (Tb, C), in float64.

    A code with no channels (sincos with time_frac 0) cannot tell frames apart: similarity 1.
    """
    a, b = a.double(), b.double()
    if a.shape[-1] == 0:
        return np.ones((a.shape[0], b.shape[0]))
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return (a @ b.T).numpy()


def token_times(timestamps: torch.Tensor, temporal_patch: int) -> np.ndarray:
    """Seconds of each temporal token: the mean time of its frames, like its tau
    (docs/reference.md#temporal-patches)."""
    t = timestamps.double().reshape(-1, temporal_patch).mean(-1)
    return t.numpy()


def clip_timestamps(fps: Fraction, seconds: float, temporal_patch: int = 1) -> torch.Tensor:
    """k / fps for a clip of ``seconds`` (frame count rounded up to whole temporal patches), float32 like the model."""
    n = frames_for_duration(seconds, fps)
    n = -(-n // temporal_patch) * temporal_patch
    return uniform_timestamps(n, fps, dtype=torch.float32)


def adjacent_similarity(cfg: EmbedView, fps: Union[float, Fraction, Sequence[float]]) -> np.ndarray:
    """Cosine similarity of the codes of two neighbouring temporal tokens at each rate (1 = indistinguishable).

    Batched over rates: one clip of 2 tokens per rate, each with its own timestamps (the code is
    per sample, so a batch of rates is what the model would see in a mixed-rate batch).
    """
    rates = np.atleast_1d(np.asarray([float(f) for f in np.atleast_1d(fps)], dtype=np.float64))
    p = cfg.arch.temporal_patch
    k = torch.arange(2 * p, dtype=torch.float64)
    ts = (k[None, :] / torch.from_numpy(rates)[:, None]).float()  # (R, 2 p_t) seconds
    code = temporal_code(cfg, ts).double()  # (R, 2, d_t)
    if code.shape[-1] == 0:
        return np.ones(len(rates))
    return torch.nn.functional.cosine_similarity(code[:, 0], code[:, 1], dim=-1).numpy()


def frequency_hz(cfg: EmbedView, fps: Union[float, Fraction]) -> np.ndarray:
    """Each temporal frequency in Hz (cycles per second of video) for a clip at ``fps``.

    seconds: the angle advances by w * ref_fps per second -> Hz = ref_fps * w / (2 pi), the same
    at every rate.  index / fps-embed: tau advances by one per frame, fps per second -> Hz =
    fps * w / (2 pi): always the same fraction of Nyquist, whatever the rate.
    """
    per_second = cfg.arch.ref_fps if cfg.arch.time_mode == "seconds" else float(fps)
    return per_second * cfg.omegas() / (2 * math.pi)


def nyquist_hz(cfg: EmbedView, fps: Union[float, Fraction]) -> float:
    """Half the rate at which temporal tokens sample time (frames / temporal_patch per second)."""
    return float(fps) / cfg.arch.temporal_patch / 2.0


# ============================================================================================
# The report
# ============================================================================================


@dataclass
class RateRow:
    """Numbers for one frame rate (one row of the table)."""

    fps: Fraction
    frames: int
    tokens: int
    adjacent: float            # adjacent-token cosine similarity, the chosen configuration
    adjacent_raw_seconds: float  # same code with tau = t in seconds (ref_fps = 1)
    adjacent_index: float      # same code with tau = frame index (time-blind)
    max_hz: Optional[float]    # fastest temporal frequency in Hz (None: no temporal channels)
    nyquist_hz: float
    aliased: int               # frequencies above Nyquist at this rate
    num_frequencies: int


@dataclass
class Similarity:
    """Frame-by-frame similarity of two clips of the same duration at rates a and b."""

    fps_a: Fraction
    fps_b: Fraction
    time_mode: str
    times_a: np.ndarray
    times_b: np.ndarray
    matrix: np.ndarray         # (tokens_a, tokens_b)

    @property
    def argmax(self) -> np.ndarray:
        """For each token of clip a, the token of clip b most similar to it."""
        return self.matrix.argmax(axis=1)

    def aligned_by_seconds(self) -> np.ndarray:
        """Per row: the most similar b token is one nearest in time (ties, e.g. k*60/24 = x.5, both count)."""
        dist = np.abs(self.times_b[None, :] - self.times_a[:, None])
        best = dist[np.arange(len(self.times_a)), self.argmax]
        return best <= dist.min(axis=1) + 1e-7

    def aligned_by_index(self) -> np.ndarray:
        """Per row k (k < tokens_b): the most similar b token is token k."""
        k = np.arange(min(len(self.times_a), len(self.times_b)))
        return self.argmax[k] == k


@dataclass
class EmbedReport:
    config: EmbedView
    seconds: float
    rows: list[RateRow]
    codes: dict[str, tuple[np.ndarray, np.ndarray]]  # format_fps(rate) -> (token times (T',), code as added (T', d_t))
    similarity: Similarity     # the chosen configuration
    contrast: Similarity       # the other way of placing frames (index vs seconds), for comparison
    sweep_fps: np.ndarray
    sweep: dict[str, np.ndarray]  # curve label -> adjacent similarity at sweep_fps
    files: dict[str, str] = field(default_factory=dict)

    @property
    def omegas(self) -> np.ndarray:
        return self.config.omegas()

    def to_dict(self) -> dict:
        """JSON-able summary (what ``--json`` prints)."""
        cfg = self.config
        conf = cfg.to_dict()
        sim = self.similarity
        omegas = self.omegas
        freq = {
            "omega": [float(w) for w in omegas],
            # per second: rate-independent in seconds mode; per rate in the other modes
            "rad_per_second": {format_fps(r.fps): [float(v) for v in 2 * math.pi * frequency_hz(cfg, r.fps)] for r in self.rows},
            "hz": {format_fps(r.fps): [float(v) for v in frequency_hz(cfg, r.fps)] for r in self.rows},
        }
        return {
            "config": conf,
            "description": cfg.describe(),
            "seconds": self.seconds,
            "rates": [
                {
                    "fps": format_fps(r.fps), "fps_float": float(r.fps), "frames": r.frames, "tokens": r.tokens,
                    "adjacent_similarity": r.adjacent, "adjacent_similarity_raw_seconds": r.adjacent_raw_seconds,
                    "adjacent_similarity_index": r.adjacent_index, "max_hz": r.max_hz, "nyquist_hz": r.nyquist_hz,
                    "aliased": r.aliased, "num_frequencies": r.num_frequencies,
                }
                for r in self.rows
            ],
            "similarity": {
                "fps": [format_fps(sim.fps_a), format_fps(sim.fps_b)],
                "time_mode": sim.time_mode,
                "argmax": [int(j) for j in sim.argmax],
                "rows_aligned_by_seconds": int(sim.aligned_by_seconds().sum()),
                "rows_aligned_by_index": int(sim.aligned_by_index().sum()),
                "rows": int(sim.matrix.shape[0]),
                "matrix": np.round(sim.matrix, 6).tolist(),
            },
            "frequencies": freq,
            "files": dict(self.files),
        }


def _parse_rate(value, name: str) -> Fraction:
    return value if isinstance(value, Fraction) else parse_fps(value, name=name)


def _similarity(cfg: EmbedView, fa: Fraction, fb: Fraction, seconds: float) -> Similarity:
    ta = clip_timestamps(fa, seconds, cfg.arch.temporal_patch)
    tb = clip_timestamps(fb, seconds, cfg.arch.temporal_patch)
    m = cosine_matrix(temporal_code(cfg, ta)[0], temporal_code(cfg, tb)[0])
    return Similarity(fa, fb, cfg.arch.time_mode, token_times(ta, cfg.arch.temporal_patch), token_times(tb, cfg.arch.temporal_patch), m)


def inspect_embedding(
    cfg: EmbedView,
    rates: Sequence = (6, 12, 24, 60),  # the slow end (ref_fps 24 aliases below 24 / pi ~= 7.6 fps) to a fast display rate
    *,
    compare: Sequence = (24, 60),
    seconds: float = 1.0,
    sweep_points: int = 160,
) -> EmbedReport:
    """Compute every number and curve of the report for ``cfg`` (no files written; see :func:`write_plots`)."""
    fr = []
    for r in rates:
        f = _parse_rate(r, "rates")
        if f not in fr:
            fr.append(f)
    if not fr:
        raise EqmError("rates: give at least one frame rate")
    if len(fr) > MAX_RATES:
        raise EqmError(f"rates: at most {MAX_RATES} frame rates, got {len(fr)}")
    if len(compare) != 2:
        raise EqmError(f"compare: give exactly two frame rates like 24,60, got {len(compare)}")
    fa, fb = (_parse_rate(c, "compare") for c in compare)
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        raise EqmError(f"seconds: clip duration must be in (0, {MAX_SECONDS:g}] seconds, got {seconds!r}")
    for f in [*fr, fa, fb]:
        n = frames_for_duration(seconds, f)
        if n > MAX_CLIP_FRAMES:
            raise EqmError(f"seconds: {seconds:g} s at {format_fps(f)} fps is {n} frames; the plots compare at most "
                           f"{MAX_CLIP_FRAMES} frames per clip (shorten seconds)")

    raw = cfg.with_time("seconds", 1.0)
    index = cfg.with_time("index")
    fl = [float(f) for f in fr]
    adj, adj_raw, adj_idx = adjacent_similarity(cfg, fl), adjacent_similarity(raw, fl), adjacent_similarity(index, fl)

    rows, codes = [], {}
    for i, f in enumerate(fr):
        ts = clip_timestamps(f, seconds, cfg.arch.temporal_patch)
        code = temporal_code(cfg, ts, as_added=True)[0]
        codes[format_fps(f)] = (token_times(ts, cfg.arch.temporal_patch), code.numpy())
        hz = frequency_hz(cfg, f)
        nyq = nyquist_hz(cfg, f)
        rows.append(RateRow(
            fps=f, frames=int(ts.shape[0]), tokens=int(code.shape[0]),
            adjacent=float(adj[i]), adjacent_raw_seconds=float(adj_raw[i]), adjacent_index=float(adj_idx[i]),
            max_hz=float(hz.max()) if hz.size else None, nyquist_hz=nyq,
            aliased=int((hz > nyq).sum()), num_frequencies=int(hz.size),
        ))

    similarity = _similarity(cfg, fa, fb, seconds)
    other = index if cfg.arch.time_mode == "seconds" else cfg.with_time("seconds")
    contrast = _similarity(other, fa, fb, seconds)

    # Sweep wide enough to show both ends: the slow rates where fast channels alias and the fast
    # ones where raw seconds become indistinguishable.
    lo = min(1.0, min(fl) / 2)
    hi = max(240.0, 2 * max(fl))
    sweep_fps = np.geomspace(lo, hi, sweep_points)
    sweep = {
        f"this model ({cfg.arch.time_mode}{', ref_fps %g' % cfg.arch.ref_fps if cfg.arch.time_mode == 'seconds' else ''})": adjacent_similarity(cfg, sweep_fps),
        "raw seconds (ref_fps 1)": adjacent_similarity(raw, sweep_fps),
        "frame index": adjacent_similarity(index, sweep_fps),
    }
    return EmbedReport(cfg, float(seconds), rows, codes, similarity, contrast, sweep_fps, sweep)


# ============================================================================================
# Plots (matplotlib Figure + Agg, no pyplot: docs/design.md#inspect-embed)
# ============================================================================================


def _save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Render through eqm.fsio.atomic_path: never a half-written PNG."""
    with fsio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around sample positions (for pcolormesh with one cell per token)."""
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[2 * x[0] - mid[0]], mid, [2 * x[-1] - mid[-1]]])


def _heatmap(report: EmbedReport):
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    cfg = report.config
    n = len(report.codes)
    fig = Figure(figsize=(9, 1.2 + 1.9 * n), layout="constrained")
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    d_t = cfg.arch.time_channels
    if cfg.arch.pos == "sincos":
        what = "sin(v\u2c7c\u03c4) | cos(v\u2c7c\u03c4) \u2212 1, as added to the tokens"
        norm = TwoSlopeNorm(vmin=-2.0, vcenter=0.0, vmax=1.0)
    else:
        what = "cos | sin of the RoPE time-group angles w\u2c7c\u03c4"
        norm = TwoSlopeNorm(vmin=-1.0, vcenter=0.0, vmax=1.0)
    mesh = None
    for ax, (name, (times, code)) in zip(axes, report.codes.items()):
        if d_t == 0:
            ax.text(0.5, 0.5, "no temporal channels (time_frac = 0)", ha="center", va="center", transform=ax.transAxes)
        else:
            mesh = ax.pcolormesh(_edges(times), np.arange(d_t + 1) - 0.5, code.T, cmap="RdBu_r", norm=norm, shading="flat")
            ax.axhline(d_t / 2 - 0.5, color="k", lw=0.6)
            ax.set_ylim(d_t - 0.5, -0.5)
        ax.set_ylabel(f"{name} fps\nchannel")
    axes[-1].set_xlabel("time (s)" + ("  -  index mode: the code follows frame numbers, so a faster rate squeezes it in time" if cfg.arch.time_mode != "seconds" else ""))
    fig.suptitle(f"temporal code ({what})\n{cfg.describe()}", fontsize=10)
    if mesh is not None:
        fig.colorbar(mesh, ax=list(axes), shrink=0.8)
    return fig


def _similarity_plot(report: EmbedReport):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5), layout="constrained")
    axes = fig.subplots(1, 2, squeeze=False)[0]
    mesh = None
    for ax, sim, title in ((axes[0], report.similarity, "this model"), (axes[1], report.contrast, "for contrast")):
        mesh = ax.pcolormesh(_edges(sim.times_b), _edges(sim.times_a), sim.matrix, cmap="viridis", vmin=-1, vmax=1, shading="flat")
        ax.plot(sim.times_b[sim.argmax], sim.times_a, "w.", ms=4, label="most similar frame")
        ax.plot([0, report.seconds], [0, report.seconds], "r--", lw=0.8, label="same time")
        ax.invert_yaxis()
        ax.set_xlabel(f"{format_fps(sim.fps_b)} fps frame time (s)")
        ax.set_ylabel(f"{format_fps(sim.fps_a)} fps frame time (s)")
        n_sec, n_idx, n = int(sim.aligned_by_seconds().sum()), int(sim.aligned_by_index().sum()), sim.matrix.shape[0]
        ax.set_title(f"{title}: {sim.time_mode} positions\npeak at the nearest time in {n_sec}/{n} rows, same index in {n_idx}", fontsize=9)
        ax.legend(loc="lower left", fontsize=7)
    fig.colorbar(mesh, ax=list(axes), shrink=0.8, label="cosine similarity")
    fig.suptitle(f"frame-to-frame similarity of the temporal code, {format_fps(report.similarity.fps_a)} vs "
                 f"{format_fps(report.similarity.fps_b)} fps\n{report.config.describe()}", fontsize=10)
    return fig


def _separability_plot(report: EmbedReport):
    from matplotlib.figure import Figure

    cfg = report.config
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    # 1 - similarity on a log axis: r = 1 sits within 1e-5 of 1, invisible on a linear one.  The
    # floor keeps float32 round-off (codes are float32, like the model's) off the log axis.
    floor = 1e-9
    styles = ("-", "--", ":")
    for (label, s), ls in zip(report.sweep.items(), styles):
        ax.plot(report.sweep_fps, np.maximum(1.0 - s, floor), ls, lw=1.6, label=label)
    for r in report.rows:
        ax.plot(float(r.fps), max(1.0 - r.adjacent, floor), "ko", ms=4)
        ax.annotate(f"{format_fps(r.fps)} fps", (float(r.fps), max(1.0 - r.adjacent, floor)), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if cfg.train_fps:
        ax.axvspan(*cfg.train_fps, color="0.85", zorder=0, label="training rates")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("frame rate (fps)")
    ax.set_ylabel("1 \u2212 cosine similarity of neighbouring frames\n(higher = more separable)")
    ax.set_title(f"adjacent-frame separability\n{cfg.describe()}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _frequency_plot(report: EmbedReport):
    from matplotlib.figure import Figure

    cfg = report.config
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    omegas = report.omegas
    j = np.arange(len(omegas))
    colors = [f"C{i % 10}" for i in range(len(report.rows))]
    if len(omegas) == 0:
        ax.text(0.5, 0.5, "no temporal channels (time_frac = 0)", ha="center", va="center", transform=ax.transAxes)
    elif cfg.arch.time_mode == "seconds":  # one set of frequencies for every rate
        ax.plot(j, frequency_hz(cfg, 1), "k.-", ms=4, label=f"frequency (ref_fps {cfg.arch.ref_fps:g} \u00b7 w / 2\u03c0)")
    for row, c in zip(report.rows, colors):
        if len(omegas) and cfg.arch.time_mode != "seconds":
            ax.plot(j, frequency_hz(cfg, row.fps), ".-", color=c, ms=3, label=f"{format_fps(row.fps)} fps (fps \u00b7 w / 2\u03c0)")
        ax.axhline(row.nyquist_hz, color=c, ls="--", lw=1,
                   label=f"Nyquist {format_fps(row.fps)} fps = {row.nyquist_hz:g} Hz ({row.aliased} aliased)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # j counts frequencies: no 0.2 ticks for a 2-pair RoPE group
    ax.set_yscale("log")
    ax.set_xlabel("frequency index j (w\u2c7c = 10000^(\u22122j/d\u209c))")
    ax.set_ylabel("Hz (cycles per second of video)")
    rot = "rotation per second (rad/s)" if cfg.arch.pos == "rope" else "phase advance per second (rad/s)"
    sec = ax.secondary_yaxis("right", functions=(lambda hz: 2 * np.pi * hz, lambda rad: rad / (2 * np.pi)))
    sec.set_ylabel(rot)
    ax.set_title(f"temporal frequencies against each rate's Nyquist limit\n{cfg.describe()}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def write_plots(report: EmbedReport, out_dir: PathLike) -> dict[str, Path]:
    """Write heatmap.png, similarity.png, separability.png and frequencies.png into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EqmError(f"output folder {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, make in zip(PLOT_FILES, (_heatmap, _similarity_plot, _separability_plot, _frequency_plot)):
        path = out / name
        _save_figure(make(report), path)
        written[name.removesuffix(".png")] = path
    report.files = {k: str(v) for k, v in written.items()}
    return written
