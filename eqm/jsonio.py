"""JSON the tool writes is always valid JSON.

Python's json module writes NaN and Infinity as bare words, which JSON does not have (most readers
reject the file). Every JSON document eqmctl writes goes through `dumps`: non-finite floats become
null (a value that is not a number is reported as absent) and anything else json cannot represent
is an error, never a silently invalid file.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """A copy of ``obj`` with every NaN / inf float (in dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps of ``finite(obj)`` with allow_nan=False: the text is always standard JSON."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
