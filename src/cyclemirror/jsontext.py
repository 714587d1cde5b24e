"""Strict JSON decoding of text that arrives from a peer or from a file on disk.

``json.loads`` alone lets several things through that the rest of the code
then trips over: ``NaN`` and ``Infinity`` (and ``1e999``, which becomes an
infinite float), and nesting deep enough to raise RecursionError, which is
no ValueError (a megabyte of ``[`` is a valid-looking control payload).
``loads_strict`` turns each of these, and every decode error, into the
caller's error class with the caller's description of the text, so a parser
above it sees only values JSON can round-trip and only its own named error.

A leaf module (imports only ``errors``) so every layer may use it.
"""

from __future__ import annotations

import json
import math

from cyclemirror.errors import CycleMirrorError


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]!r} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def loads_strict(data: bytes | str, what: str, error: type[CycleMirrorError]):
    """Decode ``data`` (UTF-8 bytes or text) as JSON; raise ``error`` naming ``what``."""
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        # The decoder counts its nesting against the recursion limit and stops cleanly.
        raise error(f"{what} is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise error(f"{what} is not valid JSON ({str(exc)[:200]})") from None
