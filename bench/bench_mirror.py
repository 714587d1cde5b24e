"""Mirroring throughput against rsync and a raw socket pipe, measured in the same run.

Run on demand:  PYTHONPATH=src python -m pytest bench/bench_mirror.py -s

1. Full first cycle of a mixed volume (thirds: random, text-like, zeroes)
   over loopback until the target has applied it and synced it to disk,
   with the default codec (lz4) and with codec none (loopback bandwidth is
   free, so compression is pure CPU cost there);
   peers: ``rsync --inplace --fsync`` to an rsync daemon on loopback, and a
   raw pipe of the same file through a TCP socket into a file that is then
   fsynced.  Size: CYCLEMIRROR_BENCH_FULL_MB (default 2048).
2. A delta cycle after rewriting 1% of the 4 KiB blocks at random; peer:
   ``rsync --no-whole-file --inplace --fsync`` of the same change.  Size:
   CYCLEMIRROR_BENCH_DELTA_MB (default 4096).  Also bytes on the wire
   against the changed bytes (before compression).

The target (and the rsync daemon, and the pipe's receiver) run as separate
processes; the source runs here.  ``os.sync()`` runs before each timed
transfer so no contender pays for another's dirty pages.  CYCLEMIRROR_BENCH_ROUNDS rounds (default 3),
interleaved; medians and ratios are printed.  Nothing asserts a time.
"""

import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import cyclemirror
from cyclemirror import keys
from cyclemirror.daemon import memtune

FULL_MB = int(os.environ.get("CYCLEMIRROR_BENCH_FULL_MB", "2048"))
DELTA_MB = int(os.environ.get("CYCLEMIRROR_BENCH_DELTA_MB", "4096"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "3"))
BS = 4096
MiB = 1 << 20
# Children import the package this process imported (src/ in a dev tree, the
# installed wheel under tox -e bench).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cyclemirror.__file__)))
ENV = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
# Both ends tune the allocator as `cyclemirror serve` does.
memtune.keep_freed_buffers()

TARGET_SCRIPT = """
import sys, time
from cyclemirror import keys
from cyclemirror.daemon import memtune
memtune.keep_freed_buffers()
from cyclemirror.store import Store
from cyclemirror.receiver import TargetServer
path, keyfile, portfile = sys.argv[1:]
store = Store.create(path)
t = TargetServer(store, keys.read_key_file(keyfile), ("127.0.0.1", 0))
t.start()
open(portfile + ".tmp", "w").write(str(t.address[1]))
import os; os.replace(portfile + ".tmp", portfile)
while True:
    time.sleep(3600)
"""

PIPE_RECEIVER = """
import os, socket, sys
port_file, out = sys.argv[1:]
lst = socket.create_server(("127.0.0.1", 0))
open(port_file + ".tmp", "w").write(str(lst.getsockname()[1]))
os.replace(port_file + ".tmp", port_file)
while True:
    c, _ = lst.accept()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    buf = bytearray(4 << 20)
    while (n := c.recv_into(buf)):
        view = memoryview(buf)[:n]
        while view:
            view = view[os.write(fd, view):]
    os.fsync(fd)
    os.close(fd)
    c.sendall(b"k")
    c.close()
"""


def wait_file(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.02)
    return open(path).read()


def make_mixed_file(path, size, seed=1):
    """Thirds of random, text-like and zero data, in 1 MiB pieces interleaved."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() for _ in range(4000)]
    text = b" ".join(rng.choice(words) for _ in range(400000))[:MiB]
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // MiB):
            kind = i % 3
            if kind == 0:
                f.seek(i * MiB)
                f.write(os.urandom(MiB))
            elif kind == 1:
                f.seek(i * MiB)
                f.write(text[i % 97:] + text[: i % 97])
            # kind 2: leave the hole (zeroes)


class RsyncDaemon:
    def __init__(self, tmp, dest):
        self.dest = dest
        conf = os.path.join(tmp, "rsyncd.conf")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        with open(conf, "w") as f:
            f.write(f"use chroot = no\npid file = {tmp}/rsyncd.pid\nlog file = {tmp}/rsyncd.log\n"
                    f"[m]\npath = {dest}\nread only = no\nuid = root\ngid = root\n")
        self.proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                                      f"--port={self.port}", "--address=127.0.0.1"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)

    def push(self, src, *flags):
        out = subprocess.run(["rsync", "--inplace", "--fsync", "--stats", *flags, src,
                              f"rsync://127.0.0.1:{self.port}/m/img"],
                             check=True, capture_output=True, text=True).stdout
        sent = next(line for line in out.splitlines() if line.startswith("Total bytes sent"))
        return int(sent.split(":")[1].strip().replace(",", ""))

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


class Target:
    def __init__(self, tmp, keyfile, name):
        self.path = os.path.join(tmp, name)
        portfile = os.path.join(tmp, name + ".port")
        self.proc = subprocess.Popen([sys.executable, "-c", TARGET_SCRIPT, self.path, keyfile,
                                      portfile], env=ENV)
        self.port = int(wait_file(portfile))

    def close(self):
        self.proc.kill()
        self.proc.wait(10)


def run_mirror(tmp, key, src_file, label, codec="lz4"):
    """Import src_file as a volume, mirror the first cycle; return (seconds, stats, objects)."""
    from cyclemirror.sender import MirrorDriver, MirrorOptions
    from cyclemirror.store import Store

    keyfile = os.path.join(tmp, "key")
    if not os.path.exists(keyfile):
        keys.write_key_file(keyfile, key)
    target = Target(tmp, keyfile, f"dst-{label}")
    store = Store.create(os.path.join(tmp, f"src-{label}"))
    vol = store.import_volume("v", src_file)
    stats = {}
    d = MirrorDriver(vol, ("127.0.0.1", target.port), key,
                     MirrorOptions(interval=3600, codec=codec,
                                   on_applied=lambda c, lab, s: stats.update(s)),
                     store=store)
    t0 = time.perf_counter()
    d.start()
    d.sync(3600)
    return time.perf_counter() - t0, dict(stats), (d, store, vol, target)


def close_mirror(objs):
    d, store, vol, target = objs
    d.stop()
    store.close()
    target.close()


def pipe_copy(tmp, src_file):
    portfile = os.path.join(tmp, "pipe.port")
    out = os.path.join(tmp, "pipe.img")
    proc = subprocess.Popen([sys.executable, "-c", PIPE_RECEIVER, portfile, out], env=ENV)
    port = int(wait_file(portfile))
    try:
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s, open(src_file, "rb") as f:
            s.sendfile(f)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b"k"
        return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait()
        os.unlink(portfile)
        os.unlink(out)


def med(xs):
    return statistics.median(xs)


def mbps(nbytes, seconds):
    return nbytes / MiB / seconds


def test_full_first_cycle_against_rsync_and_a_raw_pipe():
    size = FULL_MB * MiB
    key = keys.generate_key()
    with tempfile.TemporaryDirectory(dir=os.environ.get("CYCLEMIRROR_BENCH_DIR")) as tmp:
        src = os.path.join(tmp, "source.img")
        make_mixed_file(src, size)
        dest = os.path.join(tmp, "rsync-dest")
        os.makedirs(dest)
        daemon = RsyncDaemon(tmp, dest)
        times = {"cyclemirror": [], "cm codec none": [], "rsync": [], "pipe": []}
        wire = {}
        try:
            for rnd in range(ROUNDS):
                for name, codec in (("cyclemirror", "lz4"), ("cm codec none", "none")):
                    sub = os.path.join(tmp, f"r{rnd}-{codec}")
                    os.makedirs(sub)
                    os.sync()  # each contender starts with no one else's dirty pages to flush
                    secs, stats, objs = run_mirror(sub, key, src, "full", codec)
                    times[name].append(secs)
                    wire[name] = stats["bytes_wire"]
                    close_mirror(objs)
                    shutil.rmtree(sub)
                os.sync()
                t0 = time.perf_counter()
                wire["rsync"] = daemon.push(src)
                times["rsync"].append(time.perf_counter() - t0)
                os.unlink(os.path.join(dest, "img"))
                os.sync()
                times["pipe"].append(pipe_copy(tmp, src))
                wire["pipe"] = size
        finally:
            daemon.close()
    print(f"\n== full first cycle: {FULL_MB} MiB mixed volume (1/3 random, 1/3 text, 1/3 zero), "
          f"{ROUNDS} rounds, median ==")
    for name, ts in times.items():
        print(f"  {name:12s} {med(ts):8.2f} s  {mbps(size, med(ts)):8.1f} MiB/s  "
              f"wire {wire[name] / MiB:9.1f} MiB   (all: {', '.join(f'{t:.2f}' for t in ts)})")
    for name in ("cyclemirror", "cm codec none"):
        print(f"  throughput {name} / rsync = {med(times['rsync']) / med(times[name]):.2f}x"
              f"   {name} / raw pipe = {med(times['pipe']) / med(times[name]):.2f}x")


def test_delta_cycle_after_rewriting_one_percent_against_rsync():
    size = DELTA_MB * MiB
    nblocks = size // BS
    key = keys.generate_key()
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(dir=os.environ.get("CYCLEMIRROR_BENCH_DIR")) as tmp:
        src = os.path.join(tmp, "source.img")
        make_mixed_file(src, size, seed=2)
        dest = os.path.join(tmp, "rsync-dest")
        os.makedirs(dest)
        daemon = RsyncDaemon(tmp, dest)
        secs, _stats, objs = run_mirror(tmp, key, src, "delta")  # cycle 1: setup, untimed
        d, store, vol, target = objs
        stats = {}
        d.options.on_applied = lambda c, lab, s: stats.update(s)
        daemon.push(src)  # rsync's first copy: setup, untimed
        ours, theirs, ours_wire, theirs_wire, changed = [], [], [], [], 0
        try:
            for _rnd in range(ROUNDS):
                blocks = rng.sample(range(nblocks), nblocks // 100)
                changed = len(blocks) * BS
                fd = os.open(src, os.O_WRONLY)
                for b in blocks:
                    data = os.urandom(BS)
                    vol.write(b * BS, data)
                    os.pwrite(fd, data, b * BS)
                os.fsync(fd)
                os.close(fd)
                vol.flush()
                os.sync()
                t0 = time.perf_counter()
                d.sync(3600)
                ours.append(time.perf_counter() - t0)
                ours_wire.append(stats["bytes_wire"])
                os.sync()
                t0 = time.perf_counter()
                theirs_wire.append(daemon.push(src, "--no-whole-file"))
                theirs.append(time.perf_counter() - t0)
        finally:
            close_mirror(objs)
            daemon.close()
    print(f"\n== delta cycle: {DELTA_MB} MiB volume, 1% of 4 KiB blocks rewritten at random "
          f"({changed / MiB:.1f} MiB changed), {ROUNDS} rounds, median ==")
    print(f"  cyclemirror  {med(ours):8.3f} s   wire {med(ours_wire) / MiB:8.2f} MiB   "
          f"(all: {', '.join(f'{t:.3f}' for t in ours)})")
    print(f"  rsync        {med(theirs):8.3f} s   wire {med(theirs_wire) / MiB:8.2f} MiB   "
          f"(all: {', '.join(f'{t:.3f}' for t in theirs)})")
    print(f"  speed cyclemirror / rsync = {med(theirs) / med(ours):.1f}x   "
          f"wire / changed bytes: cyclemirror {med(ours_wire) / changed:.3f}, "
          f"rsync {med(theirs_wire) / changed:.3f}")
    print("  " + json.dumps({"ours_s": ours, "rsync_s": theirs}))
