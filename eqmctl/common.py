"""Shared CLI plumbing: consoles and the one-line error convention.

Commands import torch and `eqm` modules inside their function bodies so `eqmctl --help` stays
instant.
"""

from __future__ import annotations

import contextlib
import sys

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def fail(message: str, exit_code: int = 2) -> "typer.Exit":
    """Print `error: message` on one line to stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(exit_code)


@contextlib.contextmanager
def user_errors():
    """Turn EqmError (and a few well-known input errors) into one line and an exit code."""
    from eqm.errors import EqmError

    try:
        yield
    except EqmError as e:
        raise fail(str(e), e.exit_code) from None
    except FileNotFoundError as e:
        raise fail(f"file not found: {e.filename or e}", 2) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def is_tty() -> bool:
    return sys.stderr.isatty()
