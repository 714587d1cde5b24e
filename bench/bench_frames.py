"""Frame packing throughput against a plain loopback socket and the pure-Python model.

Run on demand:  PYTHONPATH=src python -m pytest bench/bench_frames.py -s
Size with CYCLEMIRROR_BENCH_MB (default 512). Data is incompressible (random)
unless a variant says otherwise, and read from the page cache. The peer is
the same bytes read with pread and sent through a TCP loopback connection
to a thread that discards them; packing with sending uses the same kind of
connection. Variants run interleaved, round after round, and the table
reports medians and ratios; nothing asserts a time.
"""

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cyclemirror._cext import frames  # noqa: E402
from tests.support.reference import frames_ref  # noqa: E402

SIZE = int(os.environ.get("CYCLEMIRROR_BENCH_MB", "512")) << 20
WINDOW = 64 << 20             # extents handed to one pack_extents call
CHUNK = 1 << 20
ROUNDS = 5
REF_BYTES = 128 << 20         # the model is timed on the first part of the file


class Sink:
    """A loopback TCP connection whose far end discards everything it receives."""

    def __init__(self):
        listener = socket.create_server(("127.0.0.1", 0))
        self.sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
        listener.close()
        self.received = 0
        self.thread = threading.Thread(target=self._drain, args=(receiver,), daemon=True)
        self.thread.start()

    def _drain(self, receiver):
        buf = bytearray(4 << 20)
        while True:
            got = receiver.recv_into(buf)
            if not got:
                break
            self.received += got
        receiver.close()

    def wait_for(self, total):
        while self.received < total:
            time.sleep(0.0005)

    def close(self):
        self.sender.close()
        self.thread.join()


def windows(size):
    return [(off, min(WINDOW, size - off)) for off in range(0, size, WINDOW)]


def pack(packer, fd, size):
    total = 0
    for extent in windows(size):
        total += sum(len(f) for f in packer.pack_extents(fd, [extent], 1))
    return total


def pack_threads(packer, fd, size, threads):
    parts = windows(size)
    def work(i):
        for extent in parts[i::threads]:
            packer.pack_extents(fd, [extent], 1)
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def pack_and_send(packer, fd, size, sink):
    start = sink.received
    sent = 0
    for extent in windows(size):
        for frame in packer.pack_extents(fd, [extent], 1):
            sink.sender.sendall(frame)
            sent += len(frame)
    sink.wait_for(start + sent)


def send_raw(fd, size, sink):
    start = sink.received
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for off in range(0, size, CHUNK):
        n = os.preadv(fd, [view[:min(CHUNK, size - off)]], off)
        sink.sender.sendall(view[:n])
    sink.wait_for(start + size)


# Packs the file with lz4 in a fresh interpreter and prints GB/s: run with and
# without glibc told to keep freed memory, to show what page faults on fresh
# frame buffers cost (the daemon can set this for its process).
ALLOCATOR_PROBE = """
import os, sys, time
from cyclemirror._cext import frames
path, size, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
packer = frames.FramePacker(frames.CODEC_LZ4)
times = []
for _ in range(3):
    start = time.perf_counter()
    for off in range(0, size, window):
        packer.pack_extents(fd, [(off, min(window, size - off))], 1)
    times.append(time.perf_counter() - start)
times.sort()
print(size / times[1] / 1e9)
"""
KEEP_MEMORY = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(64 << 20)}


def allocator_probe(path, size, keep_memory):
    env = {**os.environ, **(KEEP_MEMORY if keep_memory else {})}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, str(path), str(size),
                          str(WINDOW)], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_pack_extents_against_loopback_socket(tmp_path, benchmark):
    rng = np.random.default_rng(2)
    random_path = tmp_path / "random.img"
    with open(random_path, "wb") as f:
        for _ in range(SIZE // (64 << 20)):
            f.write(rng.bytes(64 << 20))
    # Compressible: 4 KiB blocks, every other one zero, the rest random text-like bytes.
    text_path = tmp_path / "text.img"
    block = np.frombuffer(rng.integers(97, 123, size=4096, dtype=np.uint8).tobytes(), np.uint8)
    pattern = np.concatenate([np.zeros(4096, np.uint8), block]).tobytes()
    with open(text_path, "wb") as f:
        f.write(pattern * (SIZE // len(pattern)))
    size = os.path.getsize(random_path)
    fd = os.open(random_path, os.O_RDONLY)
    text_fd = os.open(text_path, os.O_RDONLY)
    os.pread(fd, size, 0)
    os.pread(text_fd, size, 0)
    lz4 = frames.FramePacker(frames.CODEC_LZ4, chunk_size=CHUNK)
    none = frames.FramePacker(frames.CODEC_NONE, chunk_size=CHUNK)
    zstd = frames.FramePacker(frames.CODEC_ZSTD, level=1, chunk_size=CHUNK)
    sink = Sink()
    try:
        variants = {
            "loopback socket, raw bytes": (size, lambda: send_raw(fd, size, sink)),
            "pack none": (size, lambda: pack(none, fd, size)),
            "pack lz4": (size, lambda: pack(lz4, fd, size)),
            "pack lz4, 2 threads": (size, lambda: pack_threads(lz4, fd, size, 2)),
            "pack lz4 + send on loopback": (size, lambda: pack_and_send(lz4, fd, size, sink)),
            "pack zstd-1": (size, lambda: pack(zstd, fd, size)),
            "pack lz4, compressible": (size, lambda: pack(lz4, text_fd, size)),
            "pack zstd-1, compressible": (size, lambda: pack(zstd, text_fd, size)),
            "pure-Python model lz4": (REF_BYTES, lambda: frames_ref.pack_extents(
                fd, [(0, REF_BYTES)], 1, frames.CODEC_LZ4, CHUNK)),
        }
        times = {name: [] for name in variants}
        for _ in range(ROUNDS):
            for name, (_, fn) in variants.items():
                times[name].append(timed(fn))
        benchmark.pedantic(pack, args=(lz4, fd, size), rounds=3, iterations=1)
        ratio = pack(lz4, text_fd, size) / size
        probes = {False: [], True: []}
        for _ in range(3):
            for keep in (False, True):
                probes[keep].append(allocator_probe(random_path, size, keep))
    finally:
        sink.close()
        os.close(fd)
        os.close(text_fd)
    rate = {name: variants[name][0] / statistics.median(t) / 1e9 for name, t in times.items()}
    sock = rate["loopback socket, raw bytes"]
    ref = rate["pure-Python model lz4"]
    print(f"\nframe packing, {size >> 20} MiB from page cache, {CHUNK >> 20} MiB chunks, "
          f"median of {ROUNDS} interleaved rounds (compressible data packs to {ratio:.2f})")
    print(f"{'variant':32} {'GB/s':>7} {'x socket':>9} {'x model':>8}")
    for name in variants:
        print(f"{name:32} {rate[name]:7.2f} {rate[name] / sock:9.2f} {rate[name] / ref:8.2f}")
    print(f"allocator: pack lz4 in a fresh process {statistics.median(probes[False]):.2f} GB/s; "
          f"with glibc keeping freed memory ({' '.join(f'{k}={v}' for k, v in KEEP_MEMORY.items())})"
          f" {statistics.median(probes[True]):.2f} GB/s")
