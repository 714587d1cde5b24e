"""A file object's delta cycle against rsync of the same change.

Run on demand (root: it makes an XFS image on a loop device):
    PYTHONPATH=src:. python -m pytest bench/bench_fileobject.py -s

An XFS file system made with reflink (``mkfs.xfs -m reflink=1``) on a loop
device holds a file of CYCLEMIRROR_BENCH_FILE_MB (default 4096) MiB of random
data, made a file object of a source daemon and mirrored to a target daemon
whose store is on the same XFS (loopback TCP, default lz4: random data does
not compress, so the wire carries the data).  After the first (full) cycle, a
reflink of the file is made there as rsync's destination (so rsync's
destination equals the file at the last cycle, without the disk space of a
copy).

Each round rewrites CYCLEMIRROR_BENCH_CHANGE (default 0.01) of the file's
4 KiB blocks at random with new random data (fsynced), then measures

* **ours**: one delta cycle, ``mirror sync`` (freeze by reflink, find the
  changed blocks by FIEMAP, ship, apply on the target): the CLI's wall time
  (a process start included), the sum of the cycle's phases as status reports
  them (freeze, pack, send, commit, apply; pack and send overlap, so the sum
  errs long), and its wire bytes;
* **rsync**: ``rsync --inplace --no-whole-file --ignore-times --stats`` (the
  last so that a change within the second of the previous copy is not skipped
  by the size-and-mtime quick check) of the same change
  into its destination: wall time and the bytes its sender and receiver
  exchanged (``Total bytes sent`` + ``received``);

and checks both copies equal the file.  CYCLEMIRROR_BENCH_ROUNDS (default 3)
rounds; the table prints medians and the ratio rsync / ours, and the first
delta on its own: each round's copy-on-write leaves the file in more extents
(printed per round), and the reflink of the freeze costs time per extent.  Targets (the
issue): at least 20x faster than rsync, wire bytes at most 1.1x the changed
bytes.  Nothing asserts a time; the page cache is warm for both (the file
was just written), which flatters rsync, since it reads both whole files.
"""

import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cyclemirror.store import cowfs  # noqa: E402
from tests.support.daemons import DaemonPool, make_key  # noqa: E402
from tests.support.loopfs import loopfs_or_skip  # noqa: E402

SIZE_MB = int(os.environ.get("CYCLEMIRROR_BENCH_FILE_MB", "4096"))
CHANGE = float(os.environ.get("CYCLEMIRROR_BENCH_CHANGE", "0.01"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "3"))
MiB = 1 << 20
BLOCK = 4096


def fill_random(path: str, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as fh:
        for _ in range(size // (64 * MiB)):
            fh.write(rng.bytes(64 * MiB))
        fh.write(rng.bytes(size % (64 * MiB)))
        os.fsync(fh.fileno())


def rewrite_blocks(path: str, fraction: float, seed: int) -> int:
    rnd = random.Random(seed)
    nblocks = os.path.getsize(path) // BLOCK
    blocks = rnd.sample(range(nblocks), int(nblocks * fraction))
    fd = os.open(path, os.O_WRONLY)
    try:
        data = rnd.randbytes(len(blocks) * BLOCK)
        for i, b in enumerate(sorted(blocks)):
            os.pwrite(fd, data[i * BLOCK:(i + 1) * BLOCK], b * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(blocks) * BLOCK


def same(a: str, b: str) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def rsync_once(src: str, dst: str) -> tuple[float, int]:
    t0 = time.monotonic()
    # --ignore-times: a change within the second of the last copy must not pass the quick
    # check (size and mtime) unseen; with an older destination it changes nothing.
    out = subprocess.run(["rsync", "--inplace", "--no-whole-file", "--ignore-times", "--stats",
                          src, dst],
                         check=True, capture_output=True, text=True, timeout=3600).stdout
    wall = time.monotonic() - t0
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))
    recv = int(re.search(r"Total bytes received: ([\d,]+)", out).group(1).replace(",", ""))
    return wall, sent + recv


def test_file_object_delta_cycle_against_rsync():
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (scripts/install-deps installs it)")
    size = SIZE_MB * MiB
    tmp = tempfile.mkdtemp(prefix="cm-bench-file-", dir=os.environ.get("TMPDIR"))
    # The file, its snapshots, the target's image and rsync's reflinked destination.
    # Sparse: only what is written takes disk space (about twice the file); the rest is
    # room for the copy-on-write reservations XFS makes for scattered writes to shared
    # extents (they are freed only after fs.xfs.speculative_cow_prealloc_lifetime).
    fs = loopfs_or_skip("xfs", tmp, 4 * size + 4096 * MiB)
    try:
        _run(fs.mount, size)
    finally:
        fs.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _run(mount: str, size: int) -> None:
    path = os.path.join(mount, "vm.img")
    t0 = time.monotonic()
    fill_random(path, size, 1)
    print(f"\n{size // MiB} MiB of random data written in {time.monotonic() - t0:.1f}s")
    with DaemonPool(mount) as pool:
        key = make_key(os.path.join(mount, "k"))
        a = pool.start("a", key_file=key, nbd=False, metrics=False)
        b = pool.start("b", key_file=key, listen=True, nbd=False, metrics=False)
        a.cli("file", "add", "vm", path)
        t0 = time.monotonic()
        a.cli("mirror", "start", "vm", "--to", b.listen, "--interval", "3600")
        a.cli("mirror", "sync", "vm", "--timeout", "3600", timeout=3700)
        print(f"first (full) cycle: {time.monotonic() - t0:.1f}s")
        image = next(r["image"] for r in b.status()["incoming"])
        dest = os.path.join(mount, "rsync-dest.img")
        with open(path, "rb") as s, open(dest, "wb") as d:
            cowfs.clone_file(s.fileno(), d.fileno(), "bench")
        rows = []
        for r in range(ROUNDS):
            changed = rewrite_blocks(path, CHANGE, 100 + r)
            t0 = time.monotonic()
            out = json.loads(a.cli("mirror", "sync", "vm", "--json").stdout)
            ours_wall = time.monotonic() - t0
            last = out[0]["last_cycle"]
            # freeze + pack + send + commit + apply: pack and send overlap, so this errs long
            ours_cycle = sum(v for k, v in last["phases"].items()
                             if k in ("freeze", "pack", "send", "commit", "apply"))
            assert same(image, path), "the target's image differs from the file"
            rs_wall, rs_bytes = rsync_once(path, dest)
            assert same(dest, path), "rsync's copy differs from the file"
            with open(path, "rb") as fh:
                extents = len(cowfs.extent_map(fh.fileno()))
            rows.append({"changed": changed, "ours_wall": ours_wall, "ours_cycle": ours_cycle,
                         "ours_bytes": last["bytes"], "rsync_wall": rs_wall,
                         "rsync_bytes": rs_bytes, "phases": last["phases"]})
            print(f"round {r + 1}: file in {extents} extents; changed {changed / MiB:.1f} MiB; "
                  f"rsync / ours {rs_wall / ours_wall:.1f}x (CLI wall); ours {ours_wall:.2f}s wall "
                  f"({ours_cycle:.2f}s in phases: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in last["phases"].items())
                  + f"), {last['bytes'] / MiB:.1f} MiB on the wire; rsync {rs_wall:.2f}s, "
                  f"{rs_bytes / MiB:.1f} MiB between its ends")

    def med(key):
        return statistics.median(x[key] for x in rows)

    changed = med("changed")
    print(f"\nmedians of {ROUNDS} rounds, {size // MiB} MiB file on XFS, "
          f"{CHANGE:.2%} of 4 KiB blocks rewritten ({changed / MiB:.1f} MiB):")
    print("| | wall s | vs rsync | wire MiB | wire / changed |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| ours, `mirror sync` (CLI) | {med('ours_wall'):.2f} | "
          f"{med('rsync_wall') / med('ours_wall'):.1f}x | {med('ours_bytes') / MiB:.1f} | "
          f"{med('ours_bytes') / changed:.3f} |")
    print(f"| ours, sum of the cycle's phases | {med('ours_cycle'):.2f} | "
          f"{med('rsync_wall') / med('ours_cycle'):.1f}x | | |")
    first = rows[0]
    print(f"| ours, first delta after the full copy (CLI) | {first['ours_wall']:.2f} | "
          f"{first['rsync_wall'] / first['ours_wall']:.1f}x | {first['ours_bytes'] / MiB:.1f} | "
          f"{first['ours_bytes'] / first['changed']:.3f} |")
    print(f"| rsync --inplace --no-whole-file | {med('rsync_wall'):.2f} | 1.0x | "
          f"{med('rsync_bytes') / MiB:.1f} | {med('rsync_bytes') / changed:.3f} |")
