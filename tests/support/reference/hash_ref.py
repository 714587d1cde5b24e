"""Pure-Python model of cyclemirror._cext.blockhash, written for obviousness.

Hashes each block with the ``xxhash`` package (a separate implementation
path from the C library the compiled module calls), tests zero blocks by
comparing with ``bytes(n)``, and diffs by comparing rows one by one.  128-bit
hashes are ``(low64, high64)`` like the compiled module's.
"""

from __future__ import annotations

import xxhash

MASK64 = (1 << 64) - 1


def hash_blocks(data: bytes, block_size: int, bits: int = 64) -> tuple[list, list[bool]]:
    """Return (hashes, zero) as lists: ints for 64 bits, (low, high) tuples for 128."""
    hashes = []
    zero = []
    for start in range(0, len(data), block_size):
        block = bytes(data[start:start + block_size])
        if bits == 64:
            hashes.append(xxhash.xxh3_64_intdigest(block))
        else:
            value = xxhash.xxh3_128_intdigest(block)
            hashes.append((value & MASK64, value >> 64))
        zero.append(block == bytes(len(block)))
    return hashes, zero


def diff_runs(a: list, b: list, first_block: int = 0) -> list[tuple[int, int]]:
    """Runs (start, length) of blocks first_block+i where a[i] != b[i], merged when adjacent."""
    runs: list[tuple[int, int]] = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x == y:
            continue
        block = first_block + i
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs
