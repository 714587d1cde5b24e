"""A tree object's delta cycle through real daemons, against rsync to an rsync daemon.

Run on demand (root: it makes a btrfs image on a loop device):
    PYTHONPATH=src:. python -m pytest -p no:timeout bench/bench_tree_daemon.py -s

What a user feels, on both sides: the same change shipped from a source tree to
a copy held by another server process over loopback TCP.

* **ours**: a source ``cyclemirror serve`` holds a subvolume of
  CYCLEMIRROR_BENCH_TREE_FILES (default 20000) files of 1 to 64 KiB in
  directories of 100 as tree object ``t`` and mirrors it (``mirror start t
  --to 127.0.0.1:PORT --interval 3600 --compress none``) to a target ``serve``
  whose store is on the same btrfs.  A round times the ``mirror.sync``
  request that ``cyclemirror mirror sync t`` sends over the control socket:
  the source daemon freezes and answers once the target has applied the
  cycle (freeze, delta, frames over the socket, the target's apply, syncfs,
  exchange, record).  The command's own interpreter start is timed apart
  (``cyclemirror --help``, each round) and printed, not added.  The
  target makes the next cycle's stage once it has answered ``applied``: off
  this path, as in any run where cycles are not back to back.
* **rsync**: ``rsync -a --delete --no-whole-file --stats`` of the live source
  tree into ``rsync://127.0.0.1:PORT/copy/``, an ``rsync --daemon`` on the same
  btrfs (no ssh, no compression on either side: the same plain TCP).

Each round rewrites 4 KiB at a random place in CYCLEMIRROR_BENCH_CHANGE
(default 0.01) of the files (fsynced), then runs both, alternating which goes
first.  After the last round both copies must equal the source (the target's
tree the source snapshot of the last cycle).  CYCLEMIRROR_BENCH_ROUNDS
(default 3); the table prints each round, medians, their ratio and the load
average.  Nothing asserts a time.
"""

import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_tree import CHANGE, FILES, ROUNDS, make_tree  # noqa: E402

from cyclemirror.daemon.control_client import ControlClient  # noqa: E402
from tests.support.daemons import Daemon, cli_env, make_key  # noqa: E402
from tests.support.loopfs import loopfs_or_skip  # noqa: E402
from tests.support.trees import assert_same_tree, delete_subvolumes, subvolume  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rsync_daemon(root: str, copy: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = os.path.join(root, "rsyncd.conf")
    with open(conf, "w") as fh:
        fh.write(f"use chroot = no\nuid = root\ngid = root\npid file = {root}/rsyncd.pid\n"
                 f"[copy]\npath = {copy}\nread only = no\n")
    proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", "--address", "127.0.0.1",
                             "--port", str(port), "--config", conf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("rsync --daemon did not listen")


def rsync(src: str, port: int) -> tuple[float, int]:
    t = time.monotonic()
    out = subprocess.run(["rsync", "-a", "--delete", "--no-whole-file", "--stats",
                          src + "/", f"rsync://127.0.0.1:{port}/copy/"], check=True,
                         capture_output=True, text=True).stdout
    took = time.monotonic() - t
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))
    recv = int(re.search(r"Total bytes received: ([\d,]+)", out).group(1).replace(",", ""))
    return took, sent + recv


def ours(a: Daemon) -> tuple[float, dict]:
    """One ``mirror.sync`` request, as ``cyclemirror mirror sync t`` sends it: its wall
    time, and the cycle's figures from ``status`` (``last_cycle``)."""
    t = time.monotonic()
    with ControlClient(a.store, timeout=30) as client:
        client.call("mirror.sync", volume="t", timeout=3600, reply_timeout=3630)
    took = time.monotonic() - t
    (row,) = [r for r in a.status()["mirrors"] if r["volume"] == "t"]
    return took, row.get("last_cycle") or {}


def cli_start() -> float:
    """The wall time of ``cyclemirror --help``: what the command adds to a request."""
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "cyclemirror.cli", "--help"], check=True,
                   capture_output=True, env=cli_env())
    return time.monotonic() - t


def test_tree_daemon_cycle_against_rsync_daemon():
    if subprocess.run(["which", "rsync"], capture_output=True).returncode:
        pytest.skip("rsync is not installed")
    work = tempfile.mkdtemp(prefix="bench-treed-")
    fs = loopfs_or_skip("btrfs", work, max(1 << 30, FILES * 40_000 * 3))
    daemons: list[Daemon] = []
    rsyncd = None
    try:
        if os.geteuid() != 0:
            pytest.skip("btrfs snapshots need root")
        rnd = random.Random(1)
        src = subvolume(fs.mount, "src")
        paths = make_tree(src, rnd)
        key = make_key(os.path.join(work, "key"))
        droot = os.path.join(fs.mount, "daemons")
        os.mkdir(droot)
        a = Daemon(droot, "a", key_file=key, nbd=False, metrics=False)
        daemons.append(a)
        a.start()
        b = Daemon(droot, "b", key_file=key, nbd=False, metrics=False,
                   extra=("--listen", f"127.0.0.1:{free_port()}"))
        daemons.append(b)
        b.start()
        a.cli("tree", "add", "t", src)
        a.cli("mirror", "start", "t", "--to", b.listen, "--interval", "3600",
              "--compress", "none")
        first, _ = ours(a)  # cycle 1 (full); the start may have run it already
        copy = os.path.join(fs.mount, "rsync-copy")
        os.mkdir(copy)
        rsyncd, port = rsync_daemon(work, copy)
        rsync(src, port)
        mine, theirs, starts = [], [], []
        for n in range(ROUNDS):
            for p in rnd.sample(paths, max(1, int(len(paths) * CHANGE))):
                fd = os.open(p, os.O_WRONLY)
                try:
                    size = os.fstat(fd).st_size
                    os.pwrite(fd, rnd.randbytes(4096), rnd.randrange(0, max(1, size - 4096)))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if n % 2:
                theirs.append(rsync(src, port))
                mine.append(ours(a))
            else:
                mine.append(ours(a))
                theirs.append(rsync(src, port))
            lc = mine[-1][1]
            starts.append(cli_start())
            print(f"\nround {n + 1} ({'rsync' if n % 2 else 'ours'} first): ours "
                  f"{mine[-1][0]:.3f} s (cycle {lc.get('cycle')}, {lc.get('bytes')} wire "
                  f"bytes; from the first frame sent to 'applied' "
                  f"{lc.get('duration') or 0:.3f} s), rsync "
                  f"{theirs[-1][0]:.3f} s ({theirs[-1][1]} bytes); load "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
        k = mine[-1][1]["cycle"]
        snaps = json.loads(a.cli("tree", "list", "--json").stdout)[0]["snapshots"]
        target = os.path.join(b.store, "mirrors", a.node_id, "trees", "t")
        assert_same_tree(os.path.join(snaps, f"snap-{k}"), target)
        assert subprocess.run(["diff", "-r", "-q", src, copy]).returncode == 0
        o_time = statistics.median(t for t, _ in mine)
        r_time = statistics.median(t for t, _ in theirs)
        o_bytes = statistics.median(lc.get("bytes") or 0 for _, lc in mine)
        r_bytes = statistics.median(b for _, b in theirs)
        print(f"\ntree of {FILES} files, {CHANGE:.1%} changed per round (4 KiB each), "
              f"{ROUNDS} rounds; load average {os.getloadavg()[0]:.2f}")
        print(f"cycle 1 (full, mirror sync): {first:.2f} s")
        print(f"ours, a 'mirror.sync' request (median): {o_time:.3f} s, {int(o_bytes)} wire "
              f"bytes; the 'cyclemirror' command's own start adds "
              f"{statistics.median(starts):.3f} s (median of --help)")
        print(f"rsync to rsync --daemon (median): {r_time:.3f} s, {int(r_bytes)} bytes")
        print(f"ratio rsync/ours: time {r_time / o_time:.2f}x, bytes "
              f"{r_bytes / max(1, o_bytes):.2f}x")
    finally:
        if rsyncd is not None:
            rsyncd.kill()
            rsyncd.wait()
        for d in daemons:
            try:
                d.stop()
            except AssertionError:
                d.kill()
        for d in os.listdir(fs.mount):  # src, its snapshots, the daemons' stores, the copy
            delete_subvolumes(os.path.join(fs.mount, d))
        fs.close()
        subprocess.run(["rm", "-rf", work], check=False)
