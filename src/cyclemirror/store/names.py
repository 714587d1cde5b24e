"""Volume names: what a name may be, checked before it touches a path.

A name becomes a directory under ``STORE/volumes``, so it must never carry a
path separator, ``..`` or a leading dot (dot names are the store's own temp and
trash entries). The alphabet is small on purpose: names also travel on the
wire and appear in metric labels.
"""

from __future__ import annotations

import re

from cyclemirror.errors import UsageError

MAX_NAME_LENGTH = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_volume_name(name: object) -> str:
    """Return ``name`` if it is a valid volume name, else raise UsageError saying why."""
    if not isinstance(name, str):
        raise UsageError(f"volume name must be a string, got {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise UsageError(
            f"volume name {name[:80]!r} has {len(name)} characters; use 1 to {MAX_NAME_LENGTH}"
        )
    if _NAME_RE.fullmatch(name) is None or ".." in name:
        raise UsageError(
            f"volume name {name!r} is not allowed: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, and no '..'"
        )
    return name
