"""Shared CLI plumbing: consoles and the one-line error convention.

Commands import torch and `eqm` modules inside their function bodies so `eqmctl --help` stays
instant.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def fail(message: str, exit_code: int = 2) -> "typer.Exit":
    """Print `error: message` on one line to stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(exit_code)


#: Exit status of an unexpected exception (a bug): distinct from 1 (the run, or a probed file,
#: failed) and 2 (bad input). Set EQMCTL_TRACEBACK=1 to see the traceback.
EXIT_INTERNAL = 3

# OS errors that mean the machine, not the input, failed the run (exit 1); the rest are exit 2.
_RUN_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM}


def os_error_line(e: OSError) -> str:
    """'No space left on device: out/sample_000.mp4' (both paths of a failed rename)."""
    what = e.strerror or type(e).__name__
    paths = [str(f) for f in (e.filename, e.filename2) if f is not None]
    return f"{what}: {' -> '.join(paths)}" if paths else f"{what} ({e})"


@contextlib.contextmanager
def user_errors():
    """Turn every exception into one line and an exit code: EqmError its own (2 bad input, 1 the
    run failed), an OS error (unwritable or full output, ...) 1 or 2 naming the path, Ctrl-C 130,
    anything else (a bug) EXIT_INTERNAL."""
    from eqm.errors import EqmError

    try:
        yield
    except EqmError as e:
        raise fail(str(e), e.exit_code) from None
    except FileNotFoundError as e:
        raise fail(f"file not found: {e.filename or e}", 2) from None
    except OSError as e:
        raise fail(os_error_line(e), 1 if e.errno in _RUN_FAILURES else 2) from None
    except MemoryError:
        raise fail("out of memory (the request is larger than this machine can hold)", 1) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 -- the CLI boundary: a bug still gets one line and its own code
        if os.environ.get("EQMCTL_TRACEBACK"):
            raise
        text = " ".join(str(e).split())[:300]
        raise fail(f"internal error (a bug in eqmctl; EQMCTL_TRACEBACK=1 shows where): "
                   f"{type(e).__name__}: {text}", EXIT_INTERNAL) from None


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def is_tty() -> bool:
    return sys.stderr.isatty()
