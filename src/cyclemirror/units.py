"""Parsing and printing of sizes, rates and durations for people.

Sizes and rates are written with an optional binary suffix: ``K``, ``M``,
``G``, ``T`` (powers of 1024, as ``qemu-img`` and ``dd`` mean them), optionally
followed by ``B`` or ``iB`` (``4G``, ``4GiB`` and ``4gb`` are one size).  A
rate may end in ``/s``.  A fraction is accepted only if it comes out as whole
bytes (``1.5K`` is 1536, ``0.1K`` is refused): a size is never rounded
silently.  Parsing raises :class:`cyclemirror.errors.UsageError` naming the
setting and the bad text, so callers pass ``what`` (``"--size"``, a config key).

Printing is the reverse for humans (status tables, the demo's summary); it is
lossy and never parsed back by the program.
"""

from __future__ import annotations

import math
import re

from cyclemirror.errors import UsageError

SUFFIXES = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_HUMAN_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(text: str | int, what: str = "size") -> int:
    """Return the number of bytes that ``text`` names (``"4G"`` -> 4294967296)."""
    if isinstance(text, bool):
        raise UsageError(f"{what}: expected a size, got a boolean")
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"{what}: a size cannot be negative (got {text})")
        return text
    if not isinstance(text, str):
        raise UsageError(f"{what}: expected a size such as 4G, got {type(text).__name__}")
    match = _NUMBER.match(text)
    if match is None:
        raise UsageError(
            f"{what}: cannot read {text!r} as a size; write bytes or a number with "
            "a K, M, G or T suffix (powers of 1024), e.g. 64M or 4G"
        )
    number, suffix = match.groups()
    # Fraction keeps "1.5K" exact; a float would round large values silently.  Imported
    # here: fractions (with decimal and numbers) costs every CLI start ~7 ms otherwise.
    from fractions import Fraction

    value = Fraction(number) * (1024 ** SUFFIXES[suffix.upper()])
    if value.denominator != 1:
        raise UsageError(f"{what}: {text!r} is not a whole number of bytes")
    return int(value)


def parse_rate(text: str | int, what: str = "rate") -> int:
    """Return bytes per second for ``text`` (``"10M"``, ``"10M/s"``); 0 means no limit."""
    if isinstance(text, str):
        stripped = text.strip()
        if stripped.lower().endswith("/s"):
            stripped = stripped[:-2]
        text = stripped
    return parse_size(text, what)


def parse_seconds(text: str | int | float, what: str = "seconds", *, allow_zero=True) -> float:
    """Return a finite, non-negative number of seconds (``"2.5"`` -> 2.5)."""
    if isinstance(text, bool):
        raise UsageError(f"{what}: expected a number of seconds, got a boolean")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"{what}: expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise UsageError(f"{what}: expected a {bound} number of seconds, got {text!r}")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | int | float, what: str = "duration") -> float:
    """Seconds for ``text``: a number of seconds, or one with s, m, h or d (``"24h"``)."""
    if isinstance(text, bool):
        raise UsageError(f"{what}: expected a duration, got a boolean")
    if isinstance(text, int | float):
        return parse_seconds(text, what)
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise UsageError(f"{what}: cannot read {text!r} as a duration; write seconds or a "
                         "number with s, m, h or d, e.g. 90s, 30m, 24h, 7d")
    return parse_seconds(float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()], what)


def format_size(nbytes: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"``; whole bytes below 1 KiB."""
    value = float(nbytes)
    for unit in _HUMAN_UNITS:
        if abs(value) < 1024 or unit == _HUMAN_UNITS[-1]:
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_second: float | None) -> str:
    if bytes_per_second is None:
        return "-"
    return format_size(bytes_per_second) + "/s"


def format_duration(seconds: float | None) -> str:
    """Short human duration: ``0.25s``, ``42s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 10:
        return f"{seconds:.2f}s"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"
