"""Extent bitmap run iteration: time and memory against numpy and the pure-Python models.

Run on demand:  PYTHONPATH=src python -m pytest bench/bench_bitmap.py -s

Two bitmaps from the issue:
  * 1 TiB volume at 4 KiB blocks (2**28 bits) with 1 % random bits set: every
    leaf is populated, so this measures the word scan itself (target: <= 0.5 s);
  * 16 TiB volume (2**32 bits) with 1 GiB (2**18 blocks) set in four clusters:
    this measures skipping empty space, and memory against a flat bitmap.
Peers measured in the same run: numpy over a flat array of the same bits (the
natural vectorised baseline: flatnonzero, then diff to find run borders), the
interval-list model from tests/reference (which already *holds* runs, so it
only measures yielding them), and a pure-Python scan of the flat packed words
(on 1/16 of the 1 TiB bitmap, because the full size takes minutes; the table
says so).  Variants run interleaved, round after round, so a busy neighbour
slows all of them alike; the tables report medians and ratios, never assert.
"""

import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cyclemirror._cext.bitmap import ExtentBitmap  # noqa: E402
from tests.support.reference.bitmap_ref import RefBitmap  # noqa: E402

ROUNDS = 5
LEAF_BITS = 32768


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def encode_flat(words: np.ndarray, nbits: int) -> bytes:
    """The on-disk form (docs/cext-bitmap.md) of a flat little-endian word array.

    Building through from_bytes takes a second instead of millions of set_range
    calls; the result is cross-checked against set_range below.
    """
    leaves = words.reshape(-1, LEAF_BITS // 64)
    nonempty = np.flatnonzero(leaves.any(axis=1))
    records = np.empty((len(nonempty), 1 + LEAF_BITS // 64), dtype="<u8")
    records[:, 0] = nonempty
    records[:, 1:] = leaves[nonempty]
    population = int(np.unpackbits(words.view(np.uint8)).sum())
    header = b"CMBITMAP" + np.array([1, LEAF_BITS], "<u4").tobytes() + np.array(
        [nbits, len(nonempty), population], "<u8").tobytes()
    body = header + records.tobytes()
    return body + np.array([xxhash.xxh3_64_intdigest(body)], "<u8").tobytes()


def numpy_runs(flat: np.ndarray) -> np.ndarray:
    """Runs of a flat bool array, vectorised: (n, 2) of (start, length)."""
    idx = np.flatnonzero(flat)
    if len(idx) == 0:
        return np.empty((0, 2), np.int64)
    cut = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], cut))]
    ends = idx[np.concatenate((cut - 1, [len(idx) - 1]))] + 1
    return np.stack([starts, ends - starts], axis=1)


def numpy_runs_packed(words: np.ndarray) -> np.ndarray:
    """Runs of a flat packed bitmap: skip zero words, unpack only the others."""
    nz = np.flatnonzero(words)
    bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(len(nz), 64)
    row, col = np.nonzero(bits)
    idx = nz[row].astype(np.int64) * 64 + col
    cut = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], cut))]
    ends = idx[np.concatenate((cut - 1, [len(idx) - 1]))] + 1
    return np.stack([starts, ends - starts], axis=1)


def python_word_scan(words: list[int]) -> list[tuple[int, int]]:
    """Pure-Python run finder over flat 64-bit words (the algorithm, without C)."""
    runs = []
    run_start = None
    for w_index, w in enumerate(words):
        base = w_index * 64
        if w == 0:
            if run_start is not None:
                runs.append((run_start, base - run_start))
                run_start = None
            continue
        if w == (1 << 64) - 1:
            if run_start is None:
                run_start = base
            continue
        for b in range(64):
            bit = (w >> b) & 1
            if bit and run_start is None:
                run_start = base + b
            elif not bit and run_start is not None:
                runs.append((run_start, base + b - run_start))
                run_start = None
    if run_start is not None:
        runs.append((run_start, len(words) * 64 - run_start))
    return runs


def consume(iterator):
    collections.deque(iterator, maxlen=0)


def report(title, variants, times, peer, unit_runs):
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{title}, median of {ROUNDS} interleaved rounds")
    print(f"ratio = median of the peer '{peer}' / median of the variant (> 1: faster)")
    print(f"{'variant':58} {'median ms':>10} {'Mruns/s':>8} {'ratio':>9}")
    for name in variants:
        rate = unit_runs[name] / med[name] / 1e6
        print(f"{name:58} {med[name] * 1e3:10.4f} {rate:8.2f} {med[peer] / med[name]:9.2f}")
    return med


def test_iterate_runs_1tib_1pct_random(benchmark):
    nbits = 1 << 28
    rng = np.random.default_rng(2)
    flat = np.zeros(nbits, dtype=bool)
    flat[rng.integers(0, nbits, nbits // 100)] = True
    words = np.packbits(flat, bitorder="little").view("<u8")
    bm = ExtentBitmap.from_bytes(encode_flat(words, nbits))
    expected = numpy_runs(flat)
    assert np.array_equal(bm.runs(), expected)
    nruns = len(expected)

    # the same bitmap built bit by bit through set_range: equal, and timed once
    positions = np.flatnonzero(flat).tolist()
    built = ExtentBitmap(nbits)
    set_seconds = timed(lambda: [built.set_range(p, 1) for p in positions])
    assert built == bm

    ref = RefBitmap(nbits)
    ref.intervals = [(int(s), int(s + n)) for s, n in expected]
    small_words = words[: len(words) // 16].tolist()
    small_runs = len(python_word_scan(small_words))

    variants = {
        "ExtentBitmap.runs() -> numpy": (nruns, bm.runs),
        "ExtentBitmap.iter_runs() consumed": (nruns, lambda: consume(bm.iter_runs())),
        "ExtentBitmap.iter_runs(max_run=8) consumed": (nruns, lambda: consume(
            bm.iter_runs(max_run=8))),
        "numpy flatnonzero+diff over flat bool array": (nruns, lambda: numpy_runs(flat)),
        "numpy over flat packed words": (nruns, lambda: numpy_runs_packed(words)),
        "interval-list model iter_runs (already holds runs)": (nruns, lambda: consume(
            ref.iter_runs())),
        "pure-Python word scan, 1/16 of the bitmap": (small_runs, lambda: python_word_scan(
            small_words)),
    }
    times = {name: [] for name in variants}
    for r in range(ROUNDS):
        for name, (_, fn) in variants.items():
            if name.startswith("pure-Python") and r >= 2:
                continue                      # slow; two rounds are enough for its median
            times[name].append(timed(fn))
    benchmark.pedantic(bm.runs, rounds=3, iterations=1)

    units = {name: v[0] for name, v in variants.items()}
    med = report(f"1 TiB / 4 KiB bitmap (2**28 bits), 1% random set: {nruns} runs",
                 variants, times, "numpy flatnonzero+diff over flat bool array", units)
    scan16 = med["pure-Python word scan, 1/16 of the bitmap"] * 16
    print(f"pure-Python word scan extrapolated to the full bitmap: {scan16:.1f} s; "
          f"runs() is x{scan16 / med['ExtentBitmap.runs() -> numpy']:.0f} faster, "
          f"iter_runs() x{scan16 / med['ExtentBitmap.iter_runs() consumed']:.0f}")
    print(f"memory: ExtentBitmap {bm.memory_bytes() / 2**20:.2f} MiB, flat packed "
          f"{words.nbytes / 2**20:.2f} MiB, flat bool {flat.nbytes / 2**20:.0f} MiB")
    print(f"set_range one bit at a time: {len(positions)} calls in {set_seconds:.2f} s "
          f"({len(positions) / set_seconds / 1e6:.2f} M calls/s)")
    data = bm.to_bytes()
    save = statistics.median(timed(bm.to_bytes) for _ in range(3))
    load = statistics.median(timed(lambda: ExtentBitmap.from_bytes(data)) for _ in range(3))
    print(f"to_bytes {len(data) / 2**20:.1f} MiB in {save:.4f} s, from_bytes in {load:.4f} s")


def test_iterate_runs_16tib_1gib_in_clusters(benchmark):
    nbits = 1 << 32
    rng = np.random.default_rng(3)
    cluster = 1 << 16
    starts = np.sort(rng.choice(nbits // cluster, 4, replace=False)) * cluster
    starts += rng.integers(0, cluster // 128, 4) * 64   # word-aligned (for the numpy peer), not leaf-aligned
    bm = ExtentBitmap(nbits)
    for s in starts.tolist():
        bm.set_range(s, cluster)
    assert bm.count() == 1 << 18
    words = np.zeros(nbits // 64, dtype="<u8")          # untouched pages: zero-page backed
    for s in starts.tolist():
        words[s // 64:(s + cluster) // 64] = np.uint64((1 << 64) - 1)
    expected = np.stack([starts, np.full(4, cluster)], axis=1)
    assert np.array_equal(bm.runs(), expected)
    assert np.array_equal(numpy_runs_packed(words), expected)
    ref = RefBitmap(nbits)
    ref.intervals = [(int(s), int(s) + cluster) for s in starts]
    nruns_capped = len(bm.runs(max_run=256))

    variants = {
        "ExtentBitmap.runs() -> numpy": (4, bm.runs),
        "ExtentBitmap.iter_runs() consumed": (4, lambda: consume(bm.iter_runs())),
        "ExtentBitmap.runs(max_run=256) (1 MiB pieces)": (nruns_capped, lambda: bm.runs(
            max_run=256)),
        "numpy over flat packed words (512 MiB)": (4, lambda: numpy_runs_packed(words)),
        "interval-list model iter_runs (already holds runs)": (4, lambda: consume(
            ref.iter_runs())),
    }
    times = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, (_, fn) in variants.items():
            times[name].append(timed(fn))
    benchmark.pedantic(bm.runs, rounds=3, iterations=1)
    units = {name: v[0] for name, v in variants.items()}
    report("16 TiB / 4 KiB bitmap (2**32 bits), 1 GiB set in 4 clusters",
           variants, times, "numpy over flat packed words (512 MiB)", units)
    empty = ExtentBitmap(nbits).memory_bytes()
    print(f"memory: ExtentBitmap {bm.memory_bytes()} bytes ({bm.memory_bytes() / 2**20:.3f} MiB; "
          f"empty {empty} bytes), flat packed {words.nbytes / 2**20:.0f} MiB: "
          f"x{words.nbytes / bm.memory_bytes():.0f} smaller")
    clear = timed(lambda: bm.clear_range(0, nbits))
    print(f"clear_range over all 2**32 bits: {clear * 1e6:.0f} us, memory after: "
          f"{bm.memory_bytes()} bytes")
