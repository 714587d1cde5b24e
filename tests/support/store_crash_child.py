"""Child process of the store crash test: runs a deterministic workload until killed.

``workload(seed, size, block_size, count)`` yields the same operations in
the parent (which replays them against the model) and here (which runs
them against a real store). After each operation completes the child
writes its index as one line on stdout, so the parent knows which
operations finished before its SIGKILL: all up to the last line did, the
next one may have run partly or wholly, none after it started. A merge that
went by swapping files (docs/store.md) writes a line "swap" before its index.

One write in ten covers half the volume or more, so that overlays often hold
most of it and their merges swap.

Run as: python store_crash_child.py STORE_PATH SEED COUNT
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator

MAX_FROZEN = 3


def workload(seed: int, size: int, block_size: int, count: int) -> Iterator[tuple]:
    rng = random.Random(seed)
    nblocks = size // block_size
    open_overlay, merged = 0, -1
    for i in range(count):
        roll = rng.random()
        aligned = rng.random() < 0.6
        if rng.random() < 0.1:
            n = rng.randint(nblocks // 2, nblocks)
            b = rng.randint(0, nblocks - n)
            off, length = b * block_size, n * block_size
        elif aligned:
            b = rng.randrange(nblocks)
            n = rng.randint(1, min(4, nblocks - b))
            off, length = b * block_size, n * block_size
        else:
            off = rng.randrange(size - 1)
            length = rng.randint(1, min(size - off, 3 * block_size))
        if roll < 0.6:
            data = random.Random(f"{seed}:{i}").randbytes(length)
            yield ("write", off, data, rng.random() < 0.1)
        elif roll < 0.7:
            yield ("write_zeroes", off, length, rng.random() < 0.1)
        elif roll < 0.75:
            yield ("trim", off, length)
        elif roll < 0.85:
            yield ("flush",)
        elif roll < 0.93:
            if open_overlay - merged - 1 < MAX_FROZEN:
                open_overlay += 1
                yield ("freeze",)
            else:
                yield ("flush",)
        else:
            if open_overlay - merged - 1 > 0:
                merged += 1
                yield ("merge", merged)
            else:
                yield ("flush",)


def apply_op(vol, op: tuple) -> None:
    kind = op[0]
    if kind == "write":
        vol.write(op[1], op[2], fua=op[3])
    elif kind == "write_zeroes":
        vol.write_zeroes(op[1], op[2], fua=op[3])
    elif kind == "trim":
        vol.trim(op[1], op[2])
    elif kind == "flush":
        vol.flush()
    elif kind == "freeze":
        vol.freeze()
    elif kind == "merge":
        vol.merge_through(op[1])
    else:  # pragma: no cover - the generator above makes only these
        raise ValueError(kind)


def main() -> None:
    from cyclemirror.store import Store

    path, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = Store.open(path)
    vol = store.open_volume("v")
    os.write(1, b"ready\n")
    for i, op in enumerate(workload(seed, vol.size, vol.block_size, count)):
        swapped = vol.merges_swapped
        apply_op(vol, op)
        os.write(1, b"%s%d\n" % (b"swap\n" if vol.merges_swapped > swapped else b"", i))
    store.close()
    os.write(1, b"done\n")


if __name__ == "__main__":
    main()
