"""Volume store data path and merge, against plain file I/O measured in the same run.

Run on demand:  PYTHONPATH=src python -m pytest bench/bench_store.py -s

Cases (all through the Python API, page cache, no O_DIRECT):
  * 4 KiB random aligned writes: Volume.write vs os.pwrite on a raw file of the
    same size (target >= 0.5x raw);
  * 1 MiB sequential writes: Volume.write vs os.pwrite (target >= 0.7x raw);
  * reads over a half-dirty overlay (every other block, or every other 1 MiB,
    in the overlay, the rest in base): 4 KiB random and 1 MiB sequential
    Volume.read vs os.pread on one raw file;
  * merge of a 256 MiB overlay into base (kernel copy + fsync) vs
    `cp --reflink=never` of a 256 MiB file, with and without an fsync after it.
Variants run interleaved, round after round, so a busy neighbour slows both
alike; the tables print medians and ratios and never assert a speed.
"""

import os
import random
import shutil
import statistics
import subprocess
import time

import pytest

from cyclemirror.store import Store

MiB = 1 << 20
SIZE = 256 * MiB
ROUNDS = 7


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(title: str, nbytes: int, peer: str, peer_times: list, ours: str, our_times: list) -> float:
    p, o = statistics.median(peer_times), statistics.median(our_times)
    ratio = p / o
    print(f"\n{title}")
    print(f"  {peer:<34} median {p * 1e3:8.2f} ms  {nbytes / p / MiB:9.1f} MiB/s")
    print(f"  {ours:<34} median {o * 1e3:8.2f} ms  {nbytes / o / MiB:9.1f} MiB/s")
    print(f"  ratio store/peer throughput: {ratio:.2f}x  ({len(our_times)} rounds each)")
    return ratio


@pytest.fixture
def env(tmp_path):
    store = Store.create(str(tmp_path / "store"))
    raw_path = str(tmp_path / "raw.img")
    fd = os.open(raw_path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, SIZE)
    yield store, fd, tmp_path
    os.close(fd)
    store.close()


def _write_pattern(fd_or_vol, offsets, buf, is_vol):
    if is_vol:
        write = fd_or_vol.write
        for off in offsets:
            write(off, buf)
    else:
        pwrite = os.pwrite
        for off in offsets:
            pwrite(fd_or_vol, buf, off)


def test_4k_random_writes(env, benchmark):
    store, raw, _ = env
    vol = store.create_volume("w4k", SIZE)
    rng = random.Random(1)
    offsets = [rng.randrange(SIZE // 4096) * 4096 for _ in range(20000)]
    buf = os.urandom(4096)
    raw_t, vol_t = [], []
    for _ in range(ROUNDS):
        raw_t.append(timed(lambda: _write_pattern(raw, offsets, buf, False)))
        vol_t.append(timed(lambda: _write_pattern(vol, offsets, buf, True)))
    ratio = report("4 KiB random writes (20000 per round)", 20000 * 4096,
                   "os.pwrite raw file", raw_t, "Volume.write", vol_t)
    print(f"  per write: raw {statistics.median(raw_t) / 20000 * 1e6:.2f} us, "
          f"store {statistics.median(vol_t) / 20000 * 1e6:.2f} us; target >= 0.5x -> {ratio:.2f}x")
    benchmark.pedantic(_write_pattern, args=(vol, offsets, buf, True), rounds=3, iterations=1)


def test_1m_sequential_writes(env, benchmark):
    store, raw, _ = env
    vol = store.create_volume("w1m", SIZE)
    offsets = list(range(0, SIZE, MiB))
    buf = os.urandom(MiB)
    raw_t, vol_t = [], []
    for _ in range(ROUNDS):
        raw_t.append(timed(lambda: _write_pattern(raw, offsets, buf, False)))
        vol_t.append(timed(lambda: _write_pattern(vol, offsets, buf, True)))
    ratio = report("1 MiB sequential writes (256 MiB per round)", SIZE,
                   "os.pwrite raw file", raw_t, "Volume.write", vol_t)
    print(f"  target >= 0.7x -> {ratio:.2f}x")
    benchmark.pedantic(_write_pattern, args=(vol, offsets, buf, True), rounds=3, iterations=1)


def _half_dirty_volume(store, name, raw, stride):
    vol = store.create_volume(name, SIZE)
    data = os.urandom(MiB)
    for off in range(0, SIZE, MiB):
        vol.write(off, data)
        os.pwrite(raw, data, off)
    vol.freeze()
    vol.merge_through(0)  # base now fully allocated
    over = os.urandom(stride)
    for off in range(0, SIZE, 2 * stride):  # every other stride lands in the overlay
        vol.write(off, over)
        os.pwrite(raw, over, off)
    return vol


@pytest.mark.parametrize("stride", [4096, MiB], ids=["alternate-4k-blocks", "alternate-1m-runs"])
def test_reads_over_half_dirty_overlay(env, benchmark, stride):
    store, raw, _ = env
    vol = _half_dirty_volume(store, f"r{stride}", raw, stride)
    assert vol.read(0, 3 * MiB) == os.pread(raw, 3 * MiB, 0)  # same content, or the race is moot
    rng = random.Random(2)
    small = [rng.randrange(SIZE // 4096) * 4096 for _ in range(20000)]
    seq = list(range(0, SIZE, MiB))

    def read_all(read, offsets, length):
        for off in offsets:
            read(off, length)

    def raw_read(off, n):
        return os.pread(raw, n, off)

    for offsets, length, label in ((small, 4096, "4 KiB random reads (20000)"),
                                   (seq, MiB, "1 MiB sequential reads (256 MiB)")):
        raw_t, vol_t = [], []
        for _ in range(ROUNDS):
            raw_t.append(timed(lambda o=offsets, n=length: read_all(raw_read, o, n)))
            vol_t.append(timed(lambda o=offsets, n=length: read_all(vol.read, o, n)))
        report(f"{label}, half-dirty overlay, {'alternate 4 KiB blocks' if stride == 4096 else 'alternate 1 MiB runs'}",
               len(offsets) * length, "os.pread raw file", raw_t, "Volume.read", vol_t)
    benchmark.pedantic(read_all, args=(vol.read, seq, MiB), rounds=3, iterations=1)


def test_merge_throughput_against_cp(env, benchmark):
    store, raw, tmp = env
    cp = shutil.which("cp")
    data = os.urandom(MiB)
    src = str(tmp / "cp-src.img")
    with open(src, "wb") as f:
        for _ in range(SIZE // MiB):
            f.write(data)
    dst = str(tmp / "cp-dst.img")
    vol = store.create_volume("m", SIZE)

    def prepare():
        for off in range(0, SIZE, MiB):
            vol.write(off, data)
        vol.freeze()

    def merge():
        vol.merge_through(vol.open_overlay - 1)

    def run_cp(sync):
        if os.path.exists(dst):
            os.unlink(dst)
        subprocess.run([cp, "--reflink=never", src, dst], check=True)
        if sync:
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    cp_t, cps_t, merge_t = [], [], []
    for _ in range(5):
        cp_t.append(timed(lambda: run_cp(False)))
        cps_t.append(timed(lambda: run_cp(True)))
        prepare()
        merge_t.append(timed(merge))
    report("merge 256 MiB overlay into base (copy_file_range + fsync)", SIZE,
           "cp --reflink=never", cp_t, "Volume.merge_through", merge_t)
    report("same merge against cp followed by fsync", SIZE,
           "cp --reflink=never + fsync", cps_t, "Volume.merge_through", merge_t)
    benchmark.pedantic(merge, setup=prepare, rounds=2, iterations=1)
