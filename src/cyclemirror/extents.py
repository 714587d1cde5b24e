"""Byte ranges and extent lists: the checks and the merging every layer shares.

* ``HOLE`` and ``ZERO``: the allocation flags of an extent (NBD's
  ``base:allocation`` context uses these very bits): a store volume's
  ``block_status``, the NBD raw-file backend and the NBD server agree on them
  by importing them from here.
* ``check_range``: the one test that ``[offset, offset + length)`` lies inside
  an object of ``size`` bytes, with the error a user sees when it does not.
* ``merge_adjacent``: runs ``(start, length, kind)`` in ascending order, with
  touching runs of equal kind joined; the store's layer runs, a volume's block
  status and the NBD server's block-status reply are all built with it.

A leaf like ``errors``: it imports nothing from the package but ``errors``, so
every layer, the compiled modules in ``cyclemirror._cext`` included, can use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from cyclemirror.errors import UsageError

HOLE = 1 << 0  # not allocated
ZERO = 1 << 1  # reads as zeroes

K = TypeVar("K")


def check_range(offset: int, length: int, size: int, what: str) -> None:
    """Raise UsageError unless ``offset`` and ``length`` are ints and the range fits ``size``.

    ``what`` names the operation and the object, e.g. ``"read on volume 'db'"``.
    """
    if type(offset) is not int or type(length) is not int:
        raise UsageError(f"{what}: offset and length must be integers, got "
                         f"{type(offset).__name__} and {type(length).__name__}")
    if offset < 0 or length < 0 or offset + length > size:
        raise UsageError(f"{what}: range [{offset}, {offset + length}) is outside its "
                         f"{size} bytes")


def merge_adjacent(runs: Iterable[tuple[int, int, K]]) -> Iterator[tuple[int, int, K]]:
    """Yield the runs (start, length, kind), ascending, with touching runs of equal kind joined.

    A run joins the one before it when it starts where that one ends and its
    kind compares equal; anything else (a gap, another kind) starts a new run.
    Lazy: a consumer may stop early (a capped reply) without the rest being read.
    """
    cur_start = cur_len = 0
    cur_kind = None
    have = False
    for start, length, kind in runs:
        if have and kind == cur_kind and cur_start + cur_len == start:
            cur_len += length
            continue
        if have:
            yield cur_start, cur_len, cur_kind
        cur_start, cur_len, cur_kind, have = start, length, kind, True
    if have:
        yield cur_start, cur_len, cur_kind
