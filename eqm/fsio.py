"""Durable, atomic file writes: the one helper every eqm output goes through.

A file is written to a temporary name in its own folder, flushed and fsynced, renamed over the
target, and the folder is fsynced so the rename itself survives a power cut.  A crash or error at
any point leaves the old file (or nothing) and no temporary behind.  The file gets the permission
bits a plain ``open(path, "w")`` would give: those of the file it replaces, else 0o666 minus the
umask (the temporary is created with mode 0o666 and the kernel applies the umask).

Directories (a checkpoint) are published the same way with :func:`publish_dir`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Iterator, Union

from .jsonio import dumps

PathLike = Union[str, Path]

TMP_MARK = ".tmp-"  # in every temporary name: readers skip such names, cleaners remove them


def fsync_file(path: PathLike) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def _temp_for(path: Path) -> Path:
    """A new, empty file next to ``path`` with the mode a plain open() would give it."""
    for _ in range(100):
        tmp = path.with_name(f".{path.stem}{TMP_MARK}{secrets.token_hex(4)}{path.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if stat.S_ISREG(st.st_mode):
                    os.fchmod(fd, stat.S_IMODE(st.st_mode))
        finally:
            os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file next to {path}")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix) for a writer that needs a file name
    (a video muxer, an image encoder); on success it is fsynced and renamed over ``path``, on any
    error (KeyboardInterrupt included) it is removed."""
    path = Path(path)
    tmp = _temp_for(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.absolute().parent)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably; returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, *, indent: int | None = 2, **dumps_kwargs: Any) -> Path:
    """``obj`` as standard JSON (:func:`eqm.jsonio.dumps`: NaN/inf become null) plus a newline,
    written with :func:`write_text`."""
    return write_text(path, dumps(obj, indent=indent, **dumps_kwargs) + "\n")


def publish_dir(tmp: PathLike, final: PathLike) -> None:
    """Make the fully written folder ``tmp`` appear as ``final`` in one rename.

    Every file in ``tmp`` is fsynced, then ``tmp`` itself, before the rename; the parent is
    fsynced after it.  An existing ``final`` is first renamed to a hidden ``.trash-`` name and
    deleted after the new one is in place, so at every instant ``final`` is complete or absent.
    """
    tmp, final = Path(tmp), Path(final)
    for p in tmp.rglob("*"):
        if p.is_file():
            fsync_file(p)
    fsync_dir(tmp)
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.rename(final, trash)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
        fsync_dir(final.parent)


__all__ = ["TMP_MARK", "atomic_path", "fsync_dir", "fsync_file", "publish_dir", "write_bytes", "write_json", "write_text"]
