"""A training run's directory, and the one object that writes its files.

Layout (checkpoints are :mod:`eqm.checkpoint`'s format)::

    run_dir/
      recipe.yaml        the resolved recipe of the latest (re)start
      metrics.jsonl      one JSON object per logged step
      log.txt            the plain log lines
      summary.json       written when the run finishes
      previews/          step_XXXXXXX.mp4, EMA samples
      checkpoints/       step_XXXXXXX/ (see eqm.checkpoint)
                         abandoned-<time>/step_XXXXXXX/: checkpoints newer than the one a run was
                         resumed from (kept, never deleted; `--resume latest` ignores them)
      run.lock           held (flock) by the training that owns the directory: pid, host, start

Only the main process of a run creates a :class:`RunDir` writer; the other ranks never touch the
directory.  The lock is an ``fcntl.flock``, so the kernel drops it when its process dies: a
killed run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from . import checkpoint as ckpt_io
from . import fsio
from .errors import EqmError
from .jsonio import dumps

PathLike = Union[str, Path]

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "log.txt"
SUMMARY_FILE = "summary.json"
PREVIEW_DIR = "previews"
LOCK_FILE = "run.lock"
ABANDONED_PREFIX = "abandoned-"


class RunDir:
    """The files of one run directory: recipe, metrics, log, summary, previews and checkpoints."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._lock_fd: Optional[int] = None
        self._created = False

    # ---- ownership --------------------------------------------------------------------------

    def lock(self) -> None:
        """Take run.lock for this process (creating the directory), or raise a one-line
        EqmError naming the training that holds it.  Released by :meth:`unlock` or by the
        process ending, however it ends."""
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise EqmError(f"cannot use run directory {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip() or "a process that has not yet written its name"
            os.close(fd)
            raise EqmError(f"run directory {self.path} is in use by another training ({holder}); "
                           "wait for it to end, or choose another run directory") from None
        started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release run.lock.  A directory this run created and left empty is removed again."""
        if self._lock_fd is None:
            return
        os.ftruncate(self._lock_fd, 0)
        os.close(self._lock_fd)
        self._lock_fd = None
        if self._created and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
            (self.path / LOCK_FILE).unlink()
            self.path.rmdir()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- checkpoints ----------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest step first."""
        return ckpt_io.list_checkpoints(self.path)

    def latest_checkpoint(self) -> Optional[Path]:
        return ckpt_io.latest_checkpoint(self.path)

    def save_checkpoint(self, step: int, **kwargs: Any) -> Path:
        """checkpoints/step_XXXXXXX, written atomically (arguments as eqm.checkpoint.save_checkpoint)."""
        with _os_errors(f"checkpoint {ckpt_io.step_dirname(step)} in {self.path / ckpt_io.CKPT_DIR}",
                        "; the checkpoints already there are intact"):
            return ckpt_io.save_checkpoint(self.path, step, **kwargs)

    # ---- starting ---------------------------------------------------------------------------

    def start(self, recipe_yaml: str, start_step: int) -> Optional[Path]:
        """Create the directory, drop leftovers of interrupted checkpoint writes, record the
        recipe and rewind the history to ``start_step`` (0 for a new run): newer checkpoints and
        metric lines (an abandoned branch) move to checkpoints/abandoned-<time>/, whose path is
        returned (None when nothing was newer)."""
        with _os_errors(f"run directory {self.path}", exit_code=2):
            self.path.mkdir(parents=True, exist_ok=True)
            ckpt_io.clean_stale(self.path)
            fsio.write_text(self.path / RECIPE_FILE, recipe_yaml)
            return self._rewind(start_step)

    def _rewind(self, step: int) -> Optional[Path]:
        kept, dropped = self._split_metrics(step)
        aside = self.set_aside(step, dropped)
        if dropped:
            fsio.write_text(self.path / METRICS_FILE, "".join(line + "\n" for line in kept))
        return aside

    def set_aside(self, step: int, metric_lines: Sequence[str] = ()) -> Optional[Path]:
        """Move the checkpoints newer than ``step`` (and ``metric_lines``, as metrics.jsonl) to a
        new checkpoints/abandoned-<time>/; returns it, or None when there was nothing to move."""
        newer = [c for c in self.checkpoints() if ckpt_io.checkpoint_step(c) > step]
        if not newer and not metric_lines:
            return None
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        aside, k = self.path / ckpt_io.CKPT_DIR / f"{ABANDONED_PREFIX}{stamp}", 2
        while aside.exists():
            aside, k = aside.with_name(f"{ABANDONED_PREFIX}{stamp}-{k}"), k + 1
        with _os_errors(aside):
            aside.mkdir(parents=True)
            if metric_lines:
                fsio.write_text(aside / METRICS_FILE, "".join(line + "\n" for line in metric_lines))
            for c in newer:
                os.rename(c, aside / c.name)
            fsio.fsync_dir(aside)
            fsio.fsync_dir(aside.parent)
        return aside

    def prune(self, keep_last: int, protect: Optional[Path] = None) -> None:
        """Keep the newest ``keep_last`` checkpoints (0 = all), and ``protect`` whatever its age."""
        if keep_last > 0:
            ckpt_io.prune_checkpoints(self.path, keep_last, protect=protect)

    def _split_metrics(self, step: int) -> tuple[list[str], list[str]]:
        """metrics.jsonl lines logged up to ``step``, and those after it."""
        path = self.path / METRICS_FILE
        kept: list[str] = []
        dropped: list[str] = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    (kept if json.loads(line).get("step", 0) <= step else dropped).append(line)
                except (json.JSONDecodeError, AttributeError):
                    continue
        return kept, dropped

    # ---- while running ----------------------------------------------------------------------

    def log(self, text: str) -> None:
        """Append one line to log.txt."""
        with _os_errors(self.path / LOG_FILE), open(self.path / LOG_FILE, "a") as f:
            f.write(text + "\n")

    def metrics(self, row: dict) -> None:
        """Append one JSON row to metrics.jsonl."""
        with _os_errors(self.path / METRICS_FILE), open(self.path / METRICS_FILE, "a") as f:
            f.write(dumps(row) + "\n")

    def preview_path(self, step: int) -> Path:
        """previews/step_XXXXXXX.mp4."""
        return self.path / PREVIEW_DIR / f"step_{int(step):07d}.mp4"

    def write_summary(self, summary: dict) -> None:
        with _os_errors(self.path / SUMMARY_FILE):
            fsio.write_json(self.path / SUMMARY_FILE, summary)


@contextlib.contextmanager
def _os_errors(what, after: str = "", exit_code: int = 1):
    """An OSError (full disk, read-only or vanished folder) as one line naming ``what``: exit
    code 2 for a directory that cannot be used at the start, 1 for a run that fails while writing."""
    try:
        yield
    except OSError as e:
        raise EqmError(f"cannot write {what}: {e.strerror or e}{after}", exit_code=exit_code) from None
