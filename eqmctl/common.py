"""Shared CLI plumbing: consoles and the one-line error convention.

Commands import torch and `eqm` modules inside their function bodies so `eqmctl --help` stays
instant.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Optional

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


#: Library parameters whose flag is not ``--`` + the name with dashes.
FLAG_NAMES = {"method": "--sampler", "fmt": "--format", "out_dir": "--out", "guidance_channels": "--cfg-channels"}


def flag_of(param: str) -> str:
    return FLAG_NAMES.get(param, "--" + param.replace("_", "-"))


def in_flag_terms(e) -> str:
    """An EqmError's line; a ParamError (message starting with the parameter) says the flag instead."""
    from eqm.errors import ParamError

    text = str(e)
    if isinstance(e, ParamError) and text.startswith(e.param):
        return flag_of(e.param) + text[len(e.param):]
    return text


@contextlib.contextmanager
def user_errors():
    """Turn every exception into one line and an exit code: EqmError its own (2 bad input, 1 the
    run failed), an OS error (unwritable or full output, ...) 1 or 2 naming the path, Ctrl-C 130,
    anything else (a bug) EXIT_INTERNAL."""
    from eqm.errors import EqmError

    try:
        yield
    except EqmError as e:
        raise fail(in_flag_terms(e), e.exit_code) from None
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


# --- sampler options: declared once, shared by every command that samples ------------------


def _sampler_parameters(prefix: str, only, official: dict) -> list:
    """The sampler flags as keyword parameters named like the SamplerSettings fields they set."""
    import inspect

    def opt(name, annotation, flag_help):
        text = prefix + flag_help + official.get(name, "")
        option = typer.Option(None, flag_of(name), help=text)
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)

    flags = [
        opt("method", Optional[str], "gd (default), or nag (Nesterov-accelerated gradient descent)."),
        opt("steps", Optional[int], "Maximum sampler steps (default: the measured setting of the sampler)."),
        opt("step_size", Optional[float], "Step size eta (default: the measured setting of the sampler)."),
        opt("momentum", Optional[float], "NAG momentum mu (default 0.3)."),
        opt("tol", Optional[float], "Adaptive stop: a sample stops when the RMS of its gradient falls below this; 0 = always run all steps (default 0.01)."),
        opt("cfg_scale", Optional[float], "Classifier-free guidance scale, 1 = off (default: the checkpoint recipe's sample.cfg_scale)."),
        opt("guidance_channels", Optional[int], "Guide only the first N channels, the rest follow the conditional field: 3 reproduces the official EqM/DiT sampler exactly (default: all channels)."),
        opt("cfg_every", Optional[int], "With guidance: run the null-label pass every N-th step and reuse its guidance term in between (default 1: every step)."),
    ]
    return [p for p in flags if only is None or p.name in only]


def with_sampler_settings(prefix: str = "", *, only=None, official: Optional[dict] = None):
    """Give a command the sampler flags and pass it ``settings``, one eqm.config.SamplerSettings
    built from them (a flag not given is a field not chosen).  ``prefix`` starts each flag's help
    text, ``official`` adds to some, ``only`` names the fields that get a flag.  SamplerSettings
    checks the values (for Python callers too), so the flags carry no checks of their own: its
    one-line error is restated with the flag's name."""
    import functools
    import inspect

    def wrap(command):
        sig = inspect.signature(command)
        own = [p for p in sig.parameters.values() if p.name != "settings"]
        flags = _sampler_parameters(prefix, only, official or {})
        names = [p.name for p in flags]

        @functools.wraps(command)
        def run(**kwargs):
            from eqm.config import SamplerSettings

            with user_errors():
                chosen = {name: kwargs.pop(name) for name in names}
                kwargs["settings"] = SamplerSettings(**{k: v for k, v in chosen.items() if v is not None})
            return command(**kwargs)

        run.__signature__ = sig.replace(parameters=own + flags)
        return run

    return wrap


@contextlib.contextmanager
def progress_bar(label: str, total: Optional[int] = None, enabled: bool = True):
    """A transient rich progress bar on stderr for the length of a long library call.

    Yields the callback to pass as the call's ``progress``: ``progress(done, total=None)`` (a
    total given there replaces ``total``), or None when ``enabled`` is false (no TTY, --json).
    """
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err_console, transient=True)
    task = bar.add_task(label, total=total)

    def update(done: int, new_total: Optional[int] = None) -> None:
        bar.update(task, completed=done, **({} if new_total is None else {"total": new_total}))

    with bar:
        yield update
