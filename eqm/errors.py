"""User-facing errors.

`EqmError` carries a one-line message that names the problem and the file or key. The CLI prints
it without a traceback and exits with `exit_code` (2 for bad input, 1 for a failed run).
"""

import reprlib


class EqmError(Exception):
    """An error caused by the user's input or environment, shown as one line."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code

    def __str__(self) -> str:  # keep it one line whatever the caller passed
        return " ".join(str(self.args[0]).split())


class NonFiniteError(EqmError):
    """A model produced NaN or inf (exit code 1: the run failed, the input was well-formed)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message, exit_code)


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 2, 50, 50
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 4


def brief(value) -> str:
    """repr bounded in size and depth, for a message about a value read from a file (which can be
    any size: a message must never format a whole expanded structure)."""
    text = _BRIEF.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class ParamError(EqmError):
    """A bad value of a named parameter or field; the message starts with ``param``, so a caller
    that knows the parameter by another name (the CLI: a flag) can restate it."""

    def __init__(self, param: str, message: str, exit_code: int = 2):
        super().__init__(message, exit_code)
        self.param = param
