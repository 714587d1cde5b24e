"""Plain-Python twin of ``cyclemirror.store.cowfs.changed_ranges`` (which is vectorised).

Walks the pieces between all extent boundaries one by one, for obviousness.
"""

from __future__ import annotations

from collections.abc import Iterator

from cyclemirror.store.cowfs import (
    FIEMAP_EXTENT_ENCODED,
    FIEMAP_EXTENT_UNWRITTEN,
    UNTRUSTED_FLAGS,
)


def _keys(extents, bounds: list[int]) -> Iterator[object]:
    """For each piece [bounds[i], bounds[i+1]): what the map says is there (None = hole)."""
    i, n = 0, len(extents)
    for a in bounds[:-1]:
        while i < n and extents[i][0] + extents[i][2] <= a:
            i += 1
        if i == n or extents[i][0] > a:
            yield None
            continue
        logical, physical, length, flags = extents[i]
        if flags & UNTRUSTED_FLAGS:
            yield object()  # equal to nothing
        elif flags & FIEMAP_EXTENT_ENCODED:
            # Compressed: the location is the encoded extent's, not the byte's own.
            yield ("encoded", physical)
        else:
            yield ("raw", physical + (a - logical), bool(flags & FIEMAP_EXTENT_UNWRITTEN))


def changed_ranges_ref(old, new, size: int) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of [0, size) whose mapping differs between two extent
    maps (``extent_map`` results): what the file changed between the two snapshots."""
    bounds = {0, size}
    for ext in (*old, *new):
        for b in (ext[0], ext[0] + ext[2]):
            if 0 < b < size:
                bounds.add(b)
    edges = sorted(bounds)
    out: list[tuple[int, int]] = []
    for a, b, ko, kn in zip(edges[:-1], edges[1:], _keys(old, edges), _keys(new, edges),
                            strict=True):
        if ko is None and kn is None or ko == kn:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out




def unproven_ranges_ref(old, new, size: int) -> list[tuple[int, int]]:
    """Where both maps report the same encoded extent tuple: equal maps, bytes unproven."""
    bounds = {0, size}
    for ext in (*old, *new):
        for b in (ext[0], ext[0] + ext[2]):
            if 0 < b < size:
                bounds.add(b)
    edges = sorted(bounds)
    out: list[tuple[int, int]] = []
    for a, b, ko, kn in zip(edges[:-1], edges[1:], _keys(old, edges), _keys(new, edges),
                            strict=True):
        if not (isinstance(ko, tuple) and ko[0] == "encoded" and ko == kn):
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
