"""Validation rules for config values, shared by the core config and the task plugins.

A rule is a tuple of allowed values, or a callable ``check(value) -> str | None`` that
returns None when the value is fine and otherwise what it expected ("a positive integer"),
so that the config error can say ``expected <that>, got <value>``. Kept apart from
``fba.config`` so that a task plugin can state its section's rules without importing the
config machinery (and so without a cycle).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Union

#: a tuple of allowed values, or a check that returns what it expected (None: fine)
Rule = Union[tuple, Callable[[Any], Union[str, None]]]


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but ``K: true`` is a typo, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(value: Any) -> str | None:
    return None if _is_int(value) else "an integer"


def positive_int(value: Any) -> str | None:
    return None if _is_int(value) and value > 0 else "a positive integer"


def optional_positive_int(value: Any) -> str | None:
    return None if value is None or (_is_int(value) and value > 0) else "a positive integer or null"


def non_negative_int(value: Any) -> str | None:
    return None if _is_int(value) and value >= 0 else "a non-negative integer"


def non_negative_number(value: Any) -> str | None:
    return None if _finite(value) and value >= 0 else "a finite non-negative number"


def positive_number(value: Any) -> str | None:
    return None if _finite(value) and value > 0 else "a finite positive number"


def seed(value: Any) -> str | None:
    return None if _is_int(value) and 0 <= value < 2**32 else "an integer in [0, 2**32)"


def batch(value: Any) -> str | None:
    # BatchNorm in train mode needs at least two samples per batch.
    return None if _is_int(value) and value >= 2 else "an integer >= 2"


def device(value: Any) -> str | None:
    return None if isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) else "auto, cpu, cuda or cuda:N"


def optional_str(value: Any) -> str | None:
    return None if value is None or isinstance(value, str) else "a string or null"


def cuts(value: Any) -> str | None:
    ok = value is None or (isinstance(value, list) and all(_is_int(v) for v in value))
    return None if ok else "a list of integer unit indices or null"


def weight_pair(value: Any) -> str | None:
    ok = isinstance(value, list) and len(value) == 2 and all(_finite(v) and v >= 0 for v in value)
    return None if ok else "a list of two non-negative numbers [reconstruction, task]"


def unit_interval(value: Any) -> str | None:
    return None if _finite(value) and 0 <= value <= 1 else "a number in [0, 1]"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def checkpoint_modules(value: Any) -> str | None:
    """``checkpoint``: true/false, or a non-empty list of distinct local-module indices."""
    ok = isinstance(value, bool) or (isinstance(value, list) and value and all(_is_int(v) and v >= 0 for v in value)
                                     and len(set(value)) == len(value))
    return None if ok else "true, false or a list of distinct module indices (e.g. [0])"


def string(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"
