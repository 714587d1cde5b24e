"""What every harness shares: the one rule it checks, and a mutator for runs without atheris.

The rule: whatever bytes a harness feeds in, the code under test either
accepts them or raises a ``CycleMirrorError`` (a named error a user or a
peer is shown).  Any other exception is an escape and propagates, so atheris
reports it as a crash with its input; a hang is caught by atheris's
``-timeout`` (or the smoke test's subprocess timeout), unbounded allocation
by ``-rss_limit_mb`` (or the smoke test's address-space limit).

``mutations`` is a small, dependency-free mutator (bit flips, byte
changes, inserts, deletions, splices between seeds, interesting integers)
that the CI smoke test uses when atheris is not installed; it is far weaker
than coverage-guided fuzzing and only meant to catch regressions quickly.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator

from cyclemirror.errors import CycleMirrorError


def clean(fn: Callable, *args, **kwargs):
    """Run ``fn``; a CycleMirrorError is a clean refusal (returned), anything else escapes."""
    try:
        return fn(*args, **kwargs)
    except CycleMirrorError as exc:
        return exc


_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
                0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, 1 << 63,
                (1 << 64) - 1, 4096, 512, 1 << 20, 1 << 56]


def _mutate_once(data: bytearray, rng: random.Random, seeds: list[bytes]) -> bytearray:
    op = rng.randrange(9)
    n = len(data)
    if op == 0 and n:  # flip a bit
        i = rng.randrange(n)
        data[i] ^= 1 << rng.randrange(8)
    elif op == 1 and n:  # random byte
        data[rng.randrange(n)] = rng.randrange(256)
    elif op == 2:  # insert random bytes
        i = rng.randrange(n + 1)
        data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    elif op == 3 and n:  # delete a span
        i = rng.randrange(n)
        del data[i:i + rng.randrange(1, 17)]
    elif op == 4 and n:  # truncate
        del data[rng.randrange(n):]
    elif op == 5 and seeds:  # splice with another seed
        other = rng.choice(seeds)
        if other:
            i, j = rng.randrange(n + 1), rng.randrange(len(other))
            data[i:] = other[j:]
    elif op == 6 and n >= 8:  # an interesting integer, some width and order
        width, fmt = rng.choice([(1, "B"), (2, "H"), (4, "I"), (8, "Q")])
        value = rng.choice(_INTERESTING) & ((1 << (8 * width)) - 1)
        i = rng.randrange(n - width + 1)
        data[i:i + width] = struct.pack(rng.choice("<>") + fmt, value)
    elif op == 7 and n:  # duplicate a span (repeats nesting, records, options)
        i = rng.randrange(n)
        span = data[i:i + rng.randrange(1, 33)]
        data[i:i] = span * rng.randrange(1, 64)
    elif op == 8 and n:  # an ASCII digit or JSON punctuation (text formats)
        data[rng.randrange(n)] = rng.choice(b'0123456789-+.eE[]{}":,\\ntfu\n')
    return data


def mutations(seeds: list[bytes], count: int, seed: int = 0,
              max_len: int = 1 << 16) -> Iterator[bytes]:
    """``count`` mutated inputs derived from ``seeds`` (deterministic for one ``seed``)."""
    rng = random.Random(seed)
    pool = list(seeds) or [b""]
    for _ in range(count):
        data = bytearray(rng.choice(pool))
        for _ in range(rng.randrange(1, 6)):
            data = _mutate_once(data, rng, pool)
        yield bytes(data[:max_len])


def fast_tmp() -> str | None:
    """A tmpfs for harnesses that write files per input (fsync costs nothing there)."""
    import os

    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
