"""Training clips with real timestamps: the clip policy and the synthetic / folder / manifest datasets.

Every item is a dict

    {"video": float32 (C, T, H, W) in [-1, 1], "timestamps": float32 (T,) seconds with t[0] = 0,
     "label": int64 scalar, "fps": float (the effective rate the clip was sampled at)}

so the default collate gives (B, C, T, H, W), (B, T), (B,), (B,).  A clip is T frames at a rate
drawn per clip (never above the source's), chosen from the probed timestamps and read by seeking;
its timestamps are the decoded frames' real presentation times.  Item i is the same in every
process and run (seeded by (seed, i)); broken files are skipped and counted.  The rules:
docs/reference.md#clips; the policy in detail and why: docs/design.md#clips.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from eqm.errors import EqmError

_MASK64 = (1 << 64) - 1
#: How many skipped files a warning names before it only counts the rest.
_NAMED_IN_WARNING = 5


class DataWarning(UserWarning):
    """A problem with the data that does not stop training (skipped or unreadable files)."""


def _default_warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=3)


def item_rng(seed: int, *parts: int) -> np.random.Generator:
    """The Generator of one item: a pure function of (seed, *parts), identical in every process."""
    return np.random.default_rng([int(seed) & _MASK64, *(int(p) & _MASK64 for p in parts)])


# ================================================================================================
# Clip policy
# ================================================================================================


@dataclass(frozen=True)
class SpatialParams:
    """One clip's spatial choice: resize to `size` (h, w), crop at (top, left), maybe flip."""

    size: tuple[int, int]
    top: int
    left: int
    flip: bool


@dataclass(frozen=True)
class ClipPolicy:
    """How clips are cut: T frames at a per-clip rate in [fps_min, fps_max], height x width pixels.

    random_flip flips whole clips horizontally with probability 1/2 (note: this reverses the
    direction of motion, which for the synthetic source contradicts the class label).
    """

    num_frames: int
    fps_min: float
    fps_max: float
    height: int
    width: int
    random_flip: bool = False

    def __post_init__(self):
        for name in ("num_frames", "height", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EqmError(f"clip policy: {name} must be a positive integer, got {v!r}")
        for name in ("fps_min", "fps_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise EqmError(f"clip policy: {name} must be a positive number of frames per second, got {v!r}")
        if self.fps_min > self.fps_max:
            raise EqmError(f"clip policy: fps_min ({self.fps_min:g}) must not exceed fps_max ({self.fps_max:g})")

    @property
    def max_duration(self) -> float:
        """Longest clip span in seconds (first to last frame): (T - 1) / fps_min."""
        return (self.num_frames - 1) / float(self.fps_min)

    def rate_range(self, source_fps: Optional[float] = None, available: Optional[float] = None):
        """(lo, hi) of the effective rates allowed for a source, or None when it is too short.

        source_fps caps the rate (never above the source); available is the source's span in
        seconds (first to last frame): T frames at rate r span (T - 1) / r, which must fit.
        """
        hi = float(self.fps_max) if not source_fps else min(float(self.fps_max), float(source_fps))
        lo = min(float(self.fps_min), hi)
        if self.num_frames > 1 and available is not None:
            if available <= 0:
                return None
            need = (self.num_frames - 1) / float(available)
            if need > hi * (1 + 1e-9):
                return None
            lo = max(lo, min(need, hi))
        return lo, hi

    def choose_rate(self, rng: np.random.Generator, source_fps: Optional[float] = None,
                    available: Optional[float] = None) -> float:
        """One uniform draw from `rate_range` (EqmError if the source is too short)."""
        r = self.rate_range(source_fps, available)
        if r is None:
            raise EqmError(f"source too short for a clip of {self.num_frames} frames")
        lo, hi = r
        return float(rng.uniform(lo, hi)) if hi > lo else hi

    def choose_spatial(self, rng: np.random.Generator, src_height: int, src_width: int) -> SpatialParams:
        """Resize size, crop offset and flip of one clip (always three draws, in that order, so
        the random stream does not depend on the frame size or on random_flip)."""
        s = max(self.height / src_height, self.width / src_width)
        h1 = max(self.height, int(round(src_height * s)))
        w1 = max(self.width, int(round(src_width * s)))
        top = int(rng.integers(0, h1 - self.height + 1))
        left = int(rng.integers(0, w1 - self.width + 1))
        flip = bool(rng.random() < 0.5) and self.random_flip
        return SpatialParams(size=(h1, w1), top=top, left=left, flip=flip)

    def apply_spatial(self, video: torch.Tensor, p: SpatialParams) -> torch.Tensor:
        """(C, T, H0, W0) in [-1, 1] -> (C, T, height, width): the same resize/crop/flip for all frames."""
        c, t, h0, w0 = video.shape
        if (h0, w0) != p.size:
            x = video.permute(1, 0, 2, 3)  # frames as the batch: one call for the whole clip
            x = torch.nn.functional.interpolate(x, size=p.size, mode="bilinear", align_corners=False,
                                                antialias=True)
            video = x.permute(1, 0, 2, 3).clamp_(-1.0, 1.0)
        video = video[:, :, p.top:p.top + self.height, p.left:p.left + self.width]
        if p.flip:
            video = video.flip(-1)
        return video.contiguous()


def select_frames(pts, num_frames: int, fps: float, rng: np.random.Generator) -> np.ndarray:
    """Indices into sorted `pts` (seconds) of a clip of `num_frames` frames at about `fps`.

    The first frame is drawn uniformly among the frames from which the clip fits; each later
    frame is the one nearest to pts[first] + k / fps (ties: the earlier). Indices are made
    strictly increasing (forward pass) and kept inside the file (backward pass), which only
    matters for variable-rate files with gaps wider than 1 / fps.
    """
    pts = np.asarray(pts, dtype=np.float64)
    n, t = len(pts), int(num_frames)
    if n < t:
        raise EqmError(f"a clip of {t} frames needs at least {t} frames, the source has {n}")
    span = (t - 1) / float(fps)
    n_start = max(1, int(np.searchsorted(pts, pts[-1] - span + 1e-9, side="right")))
    i0 = int(rng.integers(n_start))
    if n == 1:
        return np.zeros(t, dtype=np.int64)
    targets = pts[i0] + np.arange(t, dtype=np.float64) / float(fps)
    j = np.clip(np.searchsorted(pts, targets, side="left"), 1, n - 1)
    idx = np.where(targets - pts[j - 1] <= pts[j] - targets, j - 1, j).astype(np.int64)
    idx[0] = i0
    for k in range(1, t):
        if idx[k] <= idx[k - 1]:
            idx[k] = idx[k - 1] + 1
    idx[-1] = min(idx[-1], n - 1)
    for k in range(t - 2, -1, -1):
        if idx[k] >= idx[k + 1]:
            idx[k] = idx[k + 1] - 1
    return idx


def _item(video: torch.Tensor, timestamps, label: int, fps: float) -> dict:
    return {
        "video": video.float().contiguous(),
        "timestamps": torch.as_tensor(np.asarray(timestamps, dtype=np.float64)).float(),
        "label": torch.tensor(int(label), dtype=torch.long),
        "fps": float(fps),
    }


def _info(source: str, spatial: SpatialParams, **extra) -> dict:
    """Provenance of one clip: its source and the resize/crop/flip applied (JSON-able)."""
    crop = {"resize": list(spatial.size), "top": spatial.top, "left": spatial.left, "flip": spatial.flip}
    return {"source": source, "crop": crop, **extra}


def _check_index(index, n: int) -> int:
    i = int(index)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {index} out of range for a dataset of {n} clips")
    return i


# ================================================================================================
# Synthetic
# ================================================================================================


class SyntheticClipDataset(torch.utils.data.Dataset):
    """Clips rendered on the fly from a `SyntheticMotion`; item i is a pure function of (seed, i).

    Label of item i: i % num_classes (balanced classes). Rate: uniform in [fps_min, fps_max]
    (rendering has no source rate to respect). Start position: uniform among those that keep
    the shape inside the frame for the clip's duration, so the speed ground truth stays clean.
    """

    def __init__(self, motion, policy: ClipPolicy, length: int, seed: int = 0):
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise EqmError(f"synthetic dataset is empty: length must be a positive number of clips, got {length!r}")
        for k in range(motion.num_classes):
            if not motion.fits(k, policy.max_duration):
                raise EqmError(
                    f"synthetic shape of class {k} at {motion.speed(k):g} px/s leaves a {motion.width}x{motion.height} "
                    f"frame during the longest clip ({policy.max_duration:.3f} s = {policy.num_frames - 1} frames at "
                    f"fps_min {policy.fps_min:g}); lower the speed or raise fps_min"
                )
        self.motion, self.policy, self.length, self.seed = motion, policy, length, int(seed)
        self.skipped = 0
        self.skipped_files: list[tuple[str, str]] = []

    @property
    def num_classes(self) -> int:
        return self.motion.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.motion.class_names

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index) -> dict:
        return self.read_with_info(index)[0]

    def read_with_info(self, index) -> tuple[dict, dict]:
        """Item ``index`` and where it came from (source, label, crop), for the latent cache."""
        i = _check_index(index, self.length)
        rng = item_rng(self.seed, i)
        label = i % self.motion.num_classes
        fps = self.policy.choose_rate(rng)
        t = np.arange(self.policy.num_frames, dtype=np.float64) / fps
        start = self.motion.random_start(label, rng, duration=float(t[-1]))
        video = self.motion.render(label, t, start=start)
        spatial = self.policy.choose_spatial(rng, self.motion.height, self.motion.width)
        video = self.policy.apply_spatial(video, spatial)
        return _item(video, t, label, fps), _info("synthetic", spatial, class_name=self.class_names[label],
                                                      start=[float(v) for v in start])


# ================================================================================================
# Files
# ================================================================================================


@dataclass
class VideoSource:
    """One usable file: absolute path, label, absolute time of its first frame (`start`), its
    frames' presentation times relative to that (`pts`, sorted) and the rate that caps clips."""

    path: str
    label: int
    start: float
    pts: np.ndarray
    rate: Optional[float]
    vfr: bool = False


class _VideoClipDataset(torch.utils.data.Dataset):
    """Shared by the folder and manifest datasets: sources -> clips, with skip and fallback."""

    def __init__(self, policy: ClipPolicy, seed: int, *, clips_per_file: int, warn: Optional[Callable[[str], None]],
                 name: str):
        if isinstance(clips_per_file, bool) or not isinstance(clips_per_file, int) or clips_per_file < 1:
            raise EqmError(f"clips_per_file must be a positive integer, got {clips_per_file!r}")
        self.policy, self.seed, self.clips_per_file, self.name = policy, int(seed), clips_per_file, name
        self._warn = warn or _default_warn
        self.sources: list[VideoSource] = []
        self.class_names: list[str] = []
        self.skipped_files: list[tuple[str, str]] = []
        self._bad: set[int] = set()  # per process: files that failed at read time

    # -- building -------------------------------------------------------------------------------

    def _add(self, result, label: int) -> None:
        """Accept a ProbeResult as a source, or record why it is skipped."""
        from eqm.timebase import mean_rate

        if not result.ok:
            self.skipped_files.append((result.path, f"{result.status}: {result.reason}".rstrip(": ")))
            return
        pts = np.asarray(result.pts, dtype=np.float64)
        T = self.policy.num_frames
        if len(pts) < T:
            self.skipped_files.append((result.path, f"too short: {len(pts)} frames, a clip needs {T}"))
            return
        # The cap is the rate the frames really arrive at: the declared rate of a constant-rate
        # file (exact, e.g. 30000/1001), the measured mean rate of a variable-rate one (a VFR
        # file may declare 30 fps while delivering 13).
        if result.vfr:
            rate = result.measured_fps or mean_rate(pts)
        else:
            rate = result.fps_float or mean_rate(pts)
        if self.policy.rate_range(rate, float(pts[-1])) is None:
            cap = min(float(self.policy.fps_max), rate) if rate else float(self.policy.fps_max)
            self.skipped_files.append((
                result.path,
                f"too short: {pts[-1]:.3f} s from first to last frame, {T} frames at <= {cap:g} fps span "
                f"{(T - 1) / cap:.3f} s",
            ))
            return
        self.sources.append(VideoSource(path=str(result.path), label=label, start=float(result.start or 0.0),
                                        pts=pts, rate=float(rate) if rate else None, vfr=bool(result.vfr)))

    def _finish(self, found: int) -> None:
        if self.skipped_files:
            named = "; ".join(f"{os.path.basename(p)} ({why})" for p, why in self.skipped_files[:_NAMED_IN_WARNING])
            more = len(self.skipped_files) - _NAMED_IN_WARNING
            self._warn(f"skipped {len(self.skipped_files)} of {found} videos in {self.name}: {named}"
                       + (f"; and {more} more" if more > 0 else ""))
        if not self.sources:
            why = f" (all {found} skipped: {self.skipped_files[0][1]} ...)" if self.skipped_files else ""
            raise EqmError(f"no usable videos in {self.name}{why}")
        slow = sum(1 for s in self.sources if s.rate and s.rate < self.policy.fps_min)
        if slow:
            self._warn(f"{slow} videos in {self.name} play slower than fps_min={self.policy.fps_min:g}; "
                       f"their clips use every frame at the file's own rate")
        by_class: dict[int, list[int]] = {}
        self._pos_in_class: list[int] = []
        for i, s in enumerate(self.sources):
            members = by_class.setdefault(s.label, [])
            self._pos_in_class.append(len(members))
            members.append(i)
        self._by_class = by_class

    # -- dataset API ---------------------------------------------------------------------------

    @property
    def skipped(self) -> int:
        """Number of files skipped when the dataset was built (broken or too short)."""
        return len(self.skipped_files)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.sources) * self.clips_per_file

    def _fallback_order(self, f: int) -> Iterator[int]:
        """f, then the other files of its class, then all others, each cyclically after f (lazy:
        normally only the first is ever needed)."""
        same = self._by_class[self.sources[f].label]
        k = self._pos_in_class[f]
        yield from same[k:]
        yield from same[:k]
        label, n = self.sources[f].label, len(self.sources)
        for d in range(1, n):
            g = (f + d) % n
            if self.sources[g].label != label:
                yield g

    def __getitem__(self, index) -> dict:
        i = _check_index(index, len(self))
        f = i % len(self.sources)
        last = ""
        for g in self._fallback_order(f):
            if g in self._bad:
                continue
            try:
                # The generator depends on the file actually read, so a fallback clip is the same
                # whether the bad file was found bad just now or earlier in this process.
                return self.load(g, item_rng(self.seed, i, g))
            except Exception as e:  # noqa: BLE001 - whatever one file does, the epoch goes on
                self._bad.add(g)
                last = f"{type(e).__name__}: {e}" if not isinstance(e, EqmError) else str(e)
                self._warn(f"cannot read a clip from {self.sources[g].path} ({last}); "
                           f"using other videos instead from now on")
        raise EqmError(f"none of the {len(self.sources)} videos in {self.name} could be read (last: {last})", exit_code=1)

    def load(self, g: int, rng: np.random.Generator) -> dict:
        """Read one clip of source g with the draws of `rng` (rate, first frame, crop, flip)."""
        return self._load_with_info(g, rng)[0]

    def read_with_info(self, index) -> tuple[dict, dict]:
        """Item ``index`` read from its own file, without the fallback of ``__getitem__`` (a
        broken file raises), and where it came from: what the latent cache stores per clip."""
        i = _check_index(index, len(self))
        f = i % len(self.sources)
        return self._load_with_info(f, item_rng(self.seed, i, f))

    def _load_with_info(self, g: int, rng: np.random.Generator) -> tuple[dict, dict]:
        from eqm.video.io import from_uint8, read_clip

        src = self.sources[g]
        fps = self.policy.choose_rate(rng, src.rate, float(src.pts[-1]))
        idx = select_frames(src.pts, self.policy.num_frames, fps, rng)
        clip = read_clip(src.path, src.start + src.pts[idx])
        if len(clip) != self.policy.num_frames:
            raise EqmError(f"{src.path}: read {len(clip)} frames instead of {self.policy.num_frames}")
        ts = clip.pts - clip.pts[0]
        video = from_uint8(clip.frames)
        spatial = self.policy.choose_spatial(rng, video.shape[2], video.shape[3])
        video = self.policy.apply_spatial(video, spatial)
        info = _info(src.path, spatial, class_name=self.class_names[src.label], frames=[int(k) for k in idx],
                     source_fps=src.rate, vfr=src.vfr)
        return _item(video, ts, src.label, fps), info


class VideoFolderDataset(_VideoClipDataset):
    """Videos in class subfolders: root/<class>/**/<video>; labels are the sorted subfolder names.

    Every video is probed (`eqm.video.probe.probe_paths`: container metadata and packet
    timestamps, no decoding); broken and too-short files are skipped with one warning and
    counted in `.skipped`. A subfolder without any video file is not a class; videos directly in
    root belong to no class and are ignored with a warning. clips_per_file > 1 makes the dataset
    that many times longer, each index giving a different clip of its file.
    """

    def __init__(self, root, policy: ClipPolicy, seed: int = 0, *, clips_per_file: int = 1,
                 workers: Optional[int] = None, warn: Optional[Callable[[str], None]] = None):
        from eqm.video.probe import VIDEO_EXTENSIONS, probe_paths

        root_p = Path(root)
        super().__init__(policy, seed, clips_per_file=clips_per_file, warn=warn, name=str(root_p))
        if not root_p.is_dir():
            raise EqmError(f"video folder not found: {root_p} (data.root)")
        classes = self._class_files(root_p, VIDEO_EXTENSIONS)
        stray = [p for p in root_p.iterdir()
                 if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in VIDEO_EXTENSIONS]
        if stray:
            self._warn(f"ignoring {len(stray)} videos directly in {root_p}: a video's class is its subfolder")
        if not classes:
            raise EqmError(f"no videos found in class subfolders of {root_p}")
        self.class_names = [name for name, _ in classes]
        files = [f for _, fs in classes for f in fs]
        labels = [k for k, (_, fs) in enumerate(classes) for _ in fs]
        for res, label in zip(probe_paths(files, workers=workers), labels):
            self._add(res, label)
        self._finish(len(files))


    def _class_files(self, root: Path, extensions) -> list[tuple[str, list[Path]]]:
        """(class name, files) per class subfolder, each real file once, labelled by the class
        folder it really lies in.

        Symlinked folders inside a class are not followed (they could lead into another class);
        a file reached twice (a symlink or hard link to a video elsewhere in the tree) counts
        once: under the class that holds it as a plain file, else under the first class, sorted.
        """
        found: list[tuple[bool, int, Path]] = []  # (reached through a symlink, class, path)
        names: list[str] = []
        links_skipped = 0
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            names.append(d.name)
            for dirpath, dirnames, filenames in os.walk(d):  # followlinks=False
                links_skipped += sum(os.path.islink(os.path.join(dirpath, n)) for n in dirnames)
                dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
                for n in sorted(filenames):
                    f = Path(dirpath) / n
                    if not n.startswith(".") and f.suffix.lower() in extensions:
                        found.append((f.is_symlink(), len(names) - 1, f))
        seen: set[tuple[int, int]] = set()
        per_class: list[list[Path]] = [[] for _ in names]
        twice = 0
        for _link, k, f in sorted(found, key=lambda e: (e[0], e[1])):  # plain files first, stable
            try:
                st = f.stat()
            except OSError:  # a dangling link: the probe reports it as missing
                per_class[k].append(f)
                continue
            if (st.st_dev, st.st_ino) in seen:
                twice += 1
                continue
            seen.add((st.st_dev, st.st_ino))
            per_class[k].append(f)
        if links_skipped:
            self._warn(f"not following {links_skipped} symlinked folder(s) inside the class folders of {root}: "
                       "a video's class is the folder it really lies in")
        if twice:
            self._warn(f"{twice} file(s) in {root} are links to videos already found; each video is used once")
        return [(name, fs) for name, fs in zip(names, per_class) if fs]


class ManifestDataset(_VideoClipDataset):
    """Videos listed in a probe-fps JSONL manifest (`eqm.video.probe.read_manifest`).

    Uses the manifest's metadata (rate, pts, start) without probing again; relative paths resolve
    against the manifest's folder. Labels are the sorted distinct `label` fields (the probed
    file's parent folder name; entries without one use their path's parent folder), taken over
    all entries so that a broken file does not shift the labels of the others. Entries whose
    status is not "ok" and files too short for a clip are skipped and counted.
    """

    def __init__(self, manifest_path, policy: ClipPolicy, seed: int = 0, *, clips_per_file: int = 1,
                 warn: Optional[Callable[[str], None]] = None):
        from eqm.video.probe import read_manifest

        mp = Path(manifest_path)
        super().__init__(policy, seed, clips_per_file=clips_per_file, warn=warn, name=f"manifest {mp}")
        entries = read_manifest(mp)
        labels = [e.label or Path(e.path).parent.name for e in entries]
        self.class_names = sorted(set(labels))
        index = {name: k for k, name in enumerate(self.class_names)}
        for e, name in zip(entries, labels):
            self._add(e, index[name])
        self._finish(len(entries))


# ================================================================================================
# Recipe entry point
# ================================================================================================


def synthetic_motion(policy: ClipPolicy, num_classes: int, speed=None, radius=None, start: str = "random"):
    """The SyntheticMotion a synthetic training run uses: frames of the policy's size, starts that
    keep the shape inside for the policy's longest clip. Evaluation code should build the ground
    truth with this (or take `dataset.motion`): the default speed depends on max_duration."""
    from eqm.data.synthetic import SyntheticMotion

    return SyntheticMotion(num_classes, policy.height, policy.width, speed=speed, radius=radius,
                           max_duration=policy.max_duration, start=start)


def build_dataset(source: str, *, root=None, manifest=None, policy: ClipPolicy, num_classes: int, length: int,
                  seed: int, speed=None, radius=None, start: str = "random", clips_per_file: int = 1,
                  warn: Optional[Callable[[str], None]] = None):
    """The dataset named by a recipe's data section.

    source: "synthetic" (SyntheticMotion(num_classes, policy size, speed, radius, start) rendered
    on the fly, `length` clips), "folder" (VideoFolderDataset over `root`) or "manifest"
    (ManifestDataset over `manifest`). speed / radius / start only apply to the synthetic source,
    clips_per_file only to the file sources.
    warn receives the one-line data warnings (skipped files); default: warnings.warn(DataWarning).
    """
    if source == "synthetic":
        return SyntheticClipDataset(synthetic_motion(policy, num_classes, speed, radius, start), policy, length, seed)
    if source == "folder":
        if root is None:
            raise EqmError("data.root is required when data.source is 'folder' (the folder of class subfolders)")
        return VideoFolderDataset(root, policy, seed, clips_per_file=clips_per_file, warn=warn)
    if source == "manifest":
        if manifest is None:
            raise EqmError("data.manifest is required when data.source is 'manifest' (a JSONL from `eqmctl probe-fps`)")
        return ManifestDataset(manifest, policy, seed, clips_per_file=clips_per_file, warn=warn)
    raise EqmError(f"data.source must be 'synthetic', 'folder' or 'manifest', got {source!r}")


def dataset_from_config(d, seed: int, warn: Optional[Callable[[str], None]] = None):
    """The pixel dataset of a recipe's ``data`` section (an eqm.recipe.DataConfig, read by
    attribute): its clip policy and source, item i seeded from (seed, i)."""
    policy = ClipPolicy(num_frames=d.num_frames, fps_min=d.fps_min, fps_max=d.fps_max,
                        height=d.height, width=d.width, random_flip=d.random_flip)
    synth = {k: v for k, v in (("speed", d.synthetic.speed), ("radius", d.synthetic.radius)) if v is not None}
    return build_dataset(d.source, root=d.root, manifest=d.manifest, policy=policy,
                         num_classes=d.synthetic.num_classes, length=d.synthetic.length, seed=seed,
                         start=d.synthetic.start,
                         clips_per_file=d.clips_per_file, warn=warn, **synth)


__all__ = [
    "dataset_from_config",
    "ClipPolicy",
    "SpatialParams",
    "DataWarning",
    "SyntheticClipDataset",
    "VideoFolderDataset",
    "ManifestDataset",
    "VideoSource",
    "build_dataset",
    "synthetic_motion",
    "item_rng",
    "select_frames",
]
