"""Block hashing throughput against `cat FILE > /dev/null` and the pure-Python model.

Run on demand:  PYTHONPATH=src python -m pytest bench/bench_blockhash.py -s
Size with CYCLEMIRROR_BENCH_MB (default 1024). The file is written once and
read once before timing, so every variant reads from the page cache. Variants
run interleaved, round after round, so a busy neighbour on the shared machine
slows all of them alike; the table reports medians and ratios, never asserts.
"""

import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cyclemirror._cext import blockhash  # noqa: E402
from tests.support.reference import hash_ref  # noqa: E402

SIZE = int(os.environ.get("CYCLEMIRROR_BENCH_MB", "1024")) << 20
BLOCK = 4096
ROUNDS = 5
MEMORY_BYTES = 256 << 20      # in-memory variants (and the model) hash this much


def hash_file_threads(fd, size, threads, bits=64):
    """hash_file over `threads` equal slices in parallel, results concatenated."""
    step = (size // threads) // BLOCK * BLOCK
    bounds = [(i * step, step if i < threads - 1 else size - i * step) for i in range(threads)]
    parts = [None] * threads

    def work(i):
        parts[i] = blockhash.hash_file(fd, bounds[i][0], bounds[i][1], BLOCK, bits)[0]

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return np.concatenate(parts)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_hash_file_against_cat(tmp_path, benchmark):
    path = tmp_path / "volume.img"
    rng = np.random.default_rng(1)
    with open(path, "wb") as f:
        for _ in range(SIZE // (64 << 20)):
            f.write(rng.bytes(64 << 20))
        f.write(rng.bytes(SIZE % (64 << 20)))
    subprocess.run(f"cat {path} > /dev/null", shell=True, check=True)   # into the page cache
    fd = os.open(path, os.O_RDONLY)
    in_memory = os.pread(fd, MEMORY_BYTES, 0)
    try:
        expected = blockhash.hash_file(fd, 0, SIZE, BLOCK)[0]
        assert (hash_file_threads(fd, SIZE, 2) == expected).all()
        variants = {
            "cat FILE > /dev/null": (SIZE, lambda: subprocess.run(
                f"cat {path} > /dev/null", shell=True, check=True)),
            "hash_file xxh3-64, 1 thread": (SIZE, lambda: blockhash.hash_file(fd, 0, SIZE, BLOCK)),
            "hash_file xxh3-64, 2 threads": (SIZE, lambda: hash_file_threads(fd, SIZE, 2)),
            "hash_file xxh3-128, 1 thread": (SIZE, lambda: blockhash.hash_file(
                fd, 0, SIZE, BLOCK, 128)),
            "hash_file xxh3-128, 2 threads": (SIZE, lambda: hash_file_threads(fd, SIZE, 2, 128)),
            "hash_buffer xxh3-64 (in memory)": (len(in_memory), lambda: blockhash.hash_buffer(
                in_memory, BLOCK)),
            "pure-Python model xxh3-64 (in memory)": (len(in_memory), lambda: hash_ref.hash_blocks(
                in_memory, BLOCK)),
        }
        times = {name: [] for name in variants}
        for _ in range(ROUNDS):
            for name, (_, fn) in variants.items():
                times[name].append(timed(fn))
        # pytest-benchmark's own record of the headline variant.
        benchmark.pedantic(hash_file_threads, args=(fd, SIZE, 2), rounds=3, iterations=1)
    finally:
        os.close(fd)
    rate = {name: variants[name][0] / statistics.median(t) / 1e9 for name, t in times.items()}
    cat = rate["cat FILE > /dev/null"]
    ref = rate["pure-Python model xxh3-64 (in memory)"]
    print(f"\nblock hashing, {SIZE >> 20} MiB file in page cache, {BLOCK} B blocks, "
          f"median of {ROUNDS} interleaved rounds")
    print(f"{'variant':40} {'GB/s':>7} {'x cat':>7} {'x model':>8}")
    for name in variants:
        print(f"{name:40} {rate[name]:7.2f} {rate[name] / cat:7.2f} {rate[name] / ref:8.1f}")
