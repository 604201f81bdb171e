"""A training run's directory, and the one object that writes its files.

Layout (checkpoints are :mod:`eqm.checkpoint`'s format)::

    run_dir/
      recipe.yaml        the resolved recipe of the latest (re)start
      metrics.jsonl      one JSON object per logged step
      log.txt            the plain log lines
      summary.json       written when the run finishes
      previews/          step_XXXXXXX.mp4, EMA samples
      checkpoints/       step_XXXXXXX/ (see eqm.checkpoint)

Only the main process of a run creates a :class:`RunDir` writer; the other ranks never touch the
directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from . import checkpoint as ckpt_io
from . import fsio
from .jsonio import dumps

PathLike = Union[str, Path]

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "log.txt"
SUMMARY_FILE = "summary.json"
PREVIEW_DIR = "previews"


class RunDir:
    """The files of one run directory: recipe, metrics, log, summary, previews and checkpoints."""

    def __init__(self, path: PathLike):
        self.path = Path(path)

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
        return ckpt_io.save_checkpoint(self.path, step, **kwargs)

    # ---- starting ---------------------------------------------------------------------------

    def start(self, recipe_yaml: str, resume_step: Optional[int]) -> None:
        """Create the directory, drop leftovers of interrupted checkpoint writes, record the
        recipe, and on resume rewind metrics.jsonl to ``resume_step``."""
        self.path.mkdir(parents=True, exist_ok=True)
        ckpt_io.clean_stale(self.path)
        fsio.write_text(self.path / RECIPE_FILE, recipe_yaml)
        if resume_step is not None:
            self._truncate_metrics(resume_step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after ``step`` (the checkpoint a run resumes from)."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        fsio.write_text(path, "".join(line + "\n" for line in keep))

    # ---- while running ----------------------------------------------------------------------

    def log(self, text: str) -> None:
        """Append one line to log.txt."""
        with open(self.path / LOG_FILE, "a") as f:
            f.write(text + "\n")

    def metrics(self, row: dict) -> None:
        """Append one JSON row to metrics.jsonl."""
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(dumps(row) + "\n")

    def preview_path(self, step: int) -> Path:
        """previews/step_XXXXXXX.mp4."""
        return self.path / PREVIEW_DIR / f"step_{int(step):07d}.mp4"

    def write_summary(self, summary: dict) -> None:
        fsio.write_json(self.path / SUMMARY_FILE, summary)
