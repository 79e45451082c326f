"""Byte sizes written the way people write them: ``24GiB``, ``512 MiB``, ``1.5GB``."""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in ``text`` (an int is returned as it is). ValueError when unreadable."""
    if isinstance(text, bool):
        raise TypeError("a size must be an int or a string such as '24GiB', not a bool")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size must not be negative, got {text}")
        return text
    if not isinstance(text, str):
        raise TypeError(
            f"a size must be an int or a string such as '24GiB', not {type(text).__name__}"
        )
    match = _PATTERN.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. '24GiB', '512MiB' or '80GB'")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(value):
        raise ValueError(f"size {text!r} is too large")
    return int(value)


def format_size(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit that keeps it at or above 1."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
