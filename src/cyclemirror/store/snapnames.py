"""Names in the snapshot directory of a file or tree object, and which are stale.

``snap-K`` is freeze K (committed once the object's record says so), ``.tmp-K`` a
freeze in progress, ``.tmp-probe`` the probe made when the object was added.  Nothing
else in that directory is ours, so nothing else is ever deleted.
"""

from __future__ import annotations

SNAP_PREFIX = "snap-"
TMP_PREFIX = ".tmp-"


def is_ours(entry: str) -> bool:
    """Whether ``entry`` is a name this module's objects make in their directory."""
    for prefix in (SNAP_PREFIX, TMP_PREFIX):
        if entry.startswith(prefix):
            rest = entry[len(prefix):]
            return rest.isdigit() or (prefix == TMP_PREFIX and rest == "probe")
    return False


def is_stale(entry: str, merged: int, top: int) -> bool:
    """Whether ``entry`` is left over: a temporary, or the snapshot of a freeze that was
    merged (cycle <= ``merged``) or never committed (cycle > ``top``)."""
    if not is_ours(entry):
        return False
    return entry.startswith(TMP_PREFIX) or not merged < int(entry[len(SNAP_PREFIX):]) <= top
