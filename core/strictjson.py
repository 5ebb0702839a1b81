"""JSON that came from outside (files, headers, requests): parsed strictly, failing one way.

`json.loads` accepts `NaN`, `Infinity` and `1e400`, which turn into floats that `int()` then refuses
with OverflowError, and raises RecursionError on deeply nested input. Here both, and every
other malformation, are a ValueError, so each caller maps one exception to its own typed
error.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as infinity
        raise ValueError(f"{text} is out of range")
    return value


def loads(data: str | bytes | bytearray) -> Any:
    """`json.loads`, without NaN/Infinity, with nesting too deep for the parser a ValueError."""
    try:
        return json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


def integer(value: Any, low: int, high: int) -> int:
    """`value` when it is a JSON integer (not a bool or a float) within [low, high]; else
    ValueError."""
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"expected an integer from {low} to {high}")
    return value
