"""Cycles into an RBD target against Ceph's own tools, in the same run.

``test_full_cycle_into_rbd_against_rbd_import``: a full first cycle against
``rbd import``.  ``test_delta_into_rbd_against_export_diff_import_diff``: a 1%
delta against ``rbd export-diff | rbd import-diff`` (below).

Run on demand (needs the Ceph daemons and the cyclemirror._cext.rbd binding):

    PYTHONPATH=src:. python -m pytest bench/bench_rbd.py -s

Starts a one-node cluster (tests/support/ceph.py: one bluestore OSD on a
sparse file, pool size 1, loopback) in a temporary directory, makes a mixed
file (thirds of random, text-like and zero data, in 1 MiB pieces), and per
round, interleaved, in alternating order:

- cyclemirror: the file imported as a source volume, mirrored to a target
  process with ``rbd=`` (its images in the pool) until the first cycle is
  applied (flushed, snapshotted, recorded); timed from the driver's start to
  ``sync`` returning.  Codec CYCLEMIRROR_BENCH_CODEC (default lz4; none, zstd
  or auto).
- ``rbd import --no-progress FILE POOL/IMAGE`` of the same file (it skips
  zero blocks, as the full cycle ships them as zero runs).

Each contender's image is removed before the next round.  Size:
CYCLEMIRROR_BENCH_RBD_MB (default 2048); rounds CYCLEMIRROR_BENCH_ROUNDS
(default 3).  Prints every round, the medians, the ratio (rbd import's time /
ours: above 1 means we are faster) and the load average.  Nothing asserts a
time.

The delta: a mixed volume of CYCLEMIRROR_BENCH_RBD_DELTA_MB (default 4096)
mirrored into the pool once (a full first cycle, not timed), and the same
file imported as a second image ``peer-src`` (snapshot ``r0``) whose
``export-diff`` made a third, ``peer-dst`` (with ``r0`` too).  Per round
(CYCLEMIRROR_BENCH_DELTA_ROUNDS, default 5), 1% of the volume's 4 KiB blocks,
at random places, get random data, the same blocks and bytes in our source
volume and (through our binding, then snapshot ``rN``) in ``peer-src``; then,
interleaved, in alternating order:

- cyclemirror: one delta cycle, timed from ``sync`` to its return (freeze,
  ship lz4, apply into the image's head, flush, snapshot, state); the
  source's merge of the shipped overlay that follows is waited for, untimed,
  so it does not overlap the other side's run;
- ``rbd export-diff --from-snap r(N-1) POOL/peer-src@rN - | rbd import-diff -
  POOL/peer-dst`` (reads the change from the cluster, writes it into
  ``peer-dst`` and snapshots it ``rN``): the same change, same cluster.

At the end our image's snapshot and ``peer-dst@rN`` must read the same (both
equal the source), else the bench fails: the two did the same work.  Prints
medians, the ratio (import-diff's time / ours) and the load average.
"""

import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pytest

import cyclemirror
from cyclemirror import keys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_mirror import make_mixed_file, wait_file  # noqa: E402

from tests.support import ceph  # noqa: E402

SIZE_MB = int(os.environ.get("CYCLEMIRROR_BENCH_RBD_MB", "2048"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "3"))
DELTA_MB = int(os.environ.get("CYCLEMIRROR_BENCH_RBD_DELTA_MB", "4096"))
DELTA_ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_DELTA_ROUNDS", "5"))
BLOCK = 4096
CODEC = os.environ.get("CYCLEMIRROR_BENCH_CODEC", "lz4")  # or none
MiB = 1 << 20
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cyclemirror.__file__)))
ENV = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}

TARGET_SCRIPT = """
import json, os, sys, time
from cyclemirror import keys
from cyclemirror.daemon import memtune
memtune.keep_freed_buffers()
from cyclemirror.receiver import TargetServer
from cyclemirror.receiver.backend import RbdConfig
from cyclemirror.store import Store
path, keyfile, portfile, spec = sys.argv[1:]
from cyclemirror.receiver.rbdbackend import connection
store = Store.create(path)
rbd = RbdConfig(**json.loads(spec))
connection(rbd)  # as 'serve --rbd-pool' does at start: not part of a cycle
t = TargetServer(store, keys.read_key_file(keyfile), ("127.0.0.1", 0), rbd=rbd)
t.start()
open(portfile + ".tmp", "w").write(str(t.address[1]))
os.replace(portfile + ".tmp", portfile)
while True:
    time.sleep(3600)
"""


@pytest.fixture(scope="module")
def cluster():
    missing = ceph.missing_binaries()
    if missing:
        pytest.skip(f"Ceph is not installed (missing {', '.join(missing)})")
    try:
        from cyclemirror._cext import rbd  # noqa: F401
    except ImportError:
        pytest.skip("cyclemirror._cext.rbd is not built (librbd-dev, librados-dev)")
    directory = tempfile.mkdtemp(prefix="cyclemirror-bench-ceph-")
    # The delta bench holds three images of DELTA_MB (two thirds allocated): room for
    # them on the OSD's sparse file (only what is written takes disk space).
    ceph.OSD_BYTES = max(ceph.OSD_BYTES, 3 * max(DELTA_MB, SIZE_MB) * MiB + (4 << 30))
    c = ceph.CephCluster(directory)
    c.start()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(directory, ignore_errors=True)


def start_target(tmp, c, label):
    """A target process whose mirrors' images go into ``c``'s pool: (process, port, key)."""
    key = keys.generate_key()
    keyfile = os.path.join(tmp, f"key-{label}")
    keys.write_key_file(keyfile, key)
    portfile = os.path.join(tmp, f"port-{label}")
    spec = json.dumps({"pool": c.pool, "conf": c.conf, "client": c.client,
                       "keyring": c.keyring})
    target = subprocess.Popen([sys.executable, "-c", TARGET_SCRIPT, os.path.join(tmp, label),
                               keyfile, portfile, spec], env=ENV)
    try:
        return target, int(wait_file(portfile, 60)), key
    except BaseException:
        target.kill()
        target.wait(10)
        raise


def run_cyclemirror(tmp, c, src_file, label):
    from cyclemirror.receiver.rbdbackend import remove_mirror_images
    from cyclemirror.sender import MirrorDriver, MirrorOptions
    from cyclemirror.store import Store

    target, port, key = start_target(tmp, c, label)
    try:
        store = Store.create(os.path.join(tmp, f"src-{label}"))
        vol = store.import_volume("v", src_file)
        d = MirrorDriver(vol, ("127.0.0.1", port), key, MirrorOptions(interval=3600, codec=CODEC),
                         store=store)
        os.sync()
        t0 = time.perf_counter()
        d.start()
        d.sync(3600)
        seconds = time.perf_counter() - t0
        d.stop()
        remove_mirror_images(ceph.rbd_config(c), store.node_id, ["v"])
        store.close()
        shutil.rmtree(os.path.join(tmp, f"src-{label}"), ignore_errors=True)
        return seconds
    finally:
        target.kill()
        target.wait(10)
        shutil.rmtree(os.path.join(tmp, label), ignore_errors=True)


def run_rbd_import(c, src_file, label):
    os.sync()
    t0 = time.perf_counter()
    c.run("rbd", "import", "--no-progress", src_file, f"{c.pool}/imp-{label}", timeout=3600)
    seconds = time.perf_counter() - t0
    c.run("rbd", "rm", "--no-progress", f"{c.pool}/imp-{label}", timeout=600)
    return seconds


def test_full_cycle_into_rbd_against_rbd_import(cluster, tmp_path):
    src = str(tmp_path / "mixed.img")
    make_mixed_file(src, SIZE_MB * MiB)
    ours, theirs, load = [], [], [os.getloadavg()[0]]
    for r in range(ROUNDS):
        order = ["ours", "import"] if r % 2 == 0 else ["import", "ours"]
        for who in order:
            if who == "ours":
                ours.append(run_cyclemirror(str(tmp_path), cluster, src, f"r{r}"))
            else:
                theirs.append(run_rbd_import(cluster, src, f"r{r}"))
        load.append(os.getloadavg()[0])
        print(f"\nround {r}: cyclemirror {ours[-1]:.2f}s, rbd import {theirs[-1]:.2f}s "
              f"({theirs[-1] / ours[-1]:.2f}x), load {load[-1]:.1f}", flush=True)
    mo, mt = statistics.median(ours), statistics.median(theirs)
    mb = SIZE_MB
    print(f"\nfull cycle of a {mb} MiB mixed volume into RBD (codec {CODEC}), {ROUNDS} rounds, "
          f"medians:\n"
          f"  cyclemirror  {mo:.2f}s ({mb / mo:.0f} MiB/s)  all: "
          f"{', '.join(f'{s:.2f}' for s in ours)}\n"
          f"  rbd import   {mt:.2f}s ({mb / mt:.0f} MiB/s)  all: "
          f"{', '.join(f'{s:.2f}' for s in theirs)}\n"
          f"  ratio (rbd import time / ours): {mt / mo:.2f}x\n"
          f"  load average (1 min) from {load[0]:.1f} to {load[-1]:.1f}, max {max(load):.1f}")


# -- the delta -------------------------------------------------------------------------------

def rbd_cmd(c, *args):
    return ["rbd", "-c", c.conf, "-n", c.client, "--keyring", c.keyring, *args]


def run_export_import_diff(c, before, after):
    """``rbd export-diff --from-snap BEFORE peer-src@AFTER - | rbd import-diff - peer-dst``."""
    os.sync()
    t0 = time.perf_counter()
    exp = subprocess.Popen(rbd_cmd(c, "export-diff", "--no-progress", "--from-snap", before,
                                   f"{c.pool}/peer-src@{after}", "-"),
                           env=c.env(), stdout=subprocess.PIPE)
    imp = subprocess.run(rbd_cmd(c, "import-diff", "--no-progress", "-", f"{c.pool}/peer-dst"),
                         env=c.env(), stdin=exp.stdout, capture_output=True, timeout=3600)
    exp.stdout.close()
    exp.wait(3600)
    seconds = time.perf_counter() - t0
    if exp.returncode or imp.returncode:
        raise RuntimeError(f"export-diff ({exp.returncode}) | import-diff ({imp.returncode}) "
                           f"failed: {imp.stderr.decode(errors='replace')[-2000:]}")
    return seconds


def change(size, rnd):
    """1% of the 4 KiB blocks, at random places, with random data: [(offset, bytes)]."""
    rng = random.Random(1000 + rnd)
    blocks = rng.sample(range(size // BLOCK), max(1, size // BLOCK // 100))
    return [(b * BLOCK, rng.randbytes(BLOCK)) for b in sorted(blocks)]


def image_digest(io, name, snap):
    img = io.open(name, snap, True)
    try:
        h = hashlib.sha256()
        size = img.size()
        for off in range(0, size, 4 * MiB):
            h.update(img.read(off, min(4 * MiB, size - off)))
        return h.hexdigest()
    finally:
        img.close()


def test_delta_into_rbd_against_export_diff_import_diff(cluster, tmp_path):
    from cyclemirror.receiver.rbdbackend import connection, image_name, snap_name
    from cyclemirror.sender import MirrorDriver, MirrorOptions
    from cyclemirror.store import Store

    c, size = cluster, DELTA_MB * MiB
    load = [os.getloadavg()]
    src = str(tmp_path / "mixed.img")
    make_mixed_file(src, size)
    io = connection(ceph.rbd_config(c))
    target, port, key = start_target(str(tmp_path), c, "delta")
    store = Store.create(str(tmp_path / "src-delta"))
    d = None
    try:
        vol = store.import_volume("v", src)
        phases = {}
        d = MirrorDriver(vol, ("127.0.0.1", port), key,
                         MirrorOptions(interval=3600, codec=CODEC,
                                       on_applied=lambda n, _t, st: phases.update({n: st})),
                         store=store)
        t0 = time.perf_counter()
        d.start()
        first = d.sync(3600)
        print(f"\nsetup: full first cycle of {DELTA_MB} MiB in {time.perf_counter() - t0:.1f}s",
              flush=True)
        t0 = time.perf_counter()
        c.run("rbd", "import", "--no-progress", src, f"{c.pool}/peer-src", timeout=3600)
        c.run("rbd", "snap", "create", f"{c.pool}/peer-src@r0")
        c.run("rbd", "create", "--size", f"{DELTA_MB}M", f"{c.pool}/peer-dst")
        exp = subprocess.Popen(rbd_cmd(c, "export-diff", "--no-progress",
                                       f"{c.pool}/peer-src@r0", "-"),
                               env=c.env(), stdout=subprocess.PIPE)
        subprocess.run(rbd_cmd(c, "import-diff", "--no-progress", "-", f"{c.pool}/peer-dst"),
                       env=c.env(), stdin=exp.stdout, check=True, timeout=3600)
        exp.stdout.close()
        assert exp.wait(3600) == 0
        print(f"setup: peer-src and peer-dst@r0 in {time.perf_counter() - t0:.1f}s", flush=True)
        ours, theirs, cycle = [], [], first
        for r in range(1, DELTA_ROUNDS + 1):
            blocks = change(size, r)
            for off, data in blocks:  # the same change on both sides (not timed)
                vol.write(off, data)
            img = io.open("peer-src")
            try:
                for off, data in blocks:
                    img.write(data, off)
                img.flush()
                img.snap_create(f"r{r}")
            finally:
                img.close()
            order = ["ours", "diff"] if r % 2 else ["diff", "ours"]
            for who in order:
                if who == "ours":
                    os.sync()
                    merged = d.last_merge_seconds
                    t0 = time.perf_counter()
                    cycle = d.sync(3600)
                    ours.append(time.perf_counter() - t0)
                    # The source then merges the shipped overlay (seconds of local I/O):
                    # not while the other side is timed.
                    deadline = time.monotonic() + 600
                    while d.last_merge_seconds is merged and time.monotonic() < deadline:
                        time.sleep(0.1)
                else:
                    theirs.append(run_export_import_diff(c, f"r{r - 1}", f"r{r}"))
            load.append(os.getloadavg())
            print(f"round {r} ({len(blocks)} blocks): cyclemirror {ours[-1]:.2f}s, "
                  f"export-diff|import-diff {theirs[-1]:.2f}s, load {load[-1][0]:.1f}",
                  flush=True)
            ph = (phases.get(cycle) or {}).get("phases") or {}
            print("  our phases: " + " ".join(f"{k}={v:.2f}s" for k, v in ph.items()
                                               if isinstance(v, (int, float))), flush=True)
        # Both did the same work: the same image at the end.
        mine = image_digest(io, image_name(store.node_id, "v"), snap_name(cycle))
        assert mine == image_digest(io, "peer-dst", f"r{DELTA_ROUNDS}"), \
            "our image and peer-dst differ after the same changes"
    finally:
        if d is not None:
            d.stop()
        store.close()
        target.kill()
        target.wait(10)
        for name in ("peer-src", "peer-dst"):
            c.run("rbd", "snap", "purge", "--no-progress", f"{c.pool}/{name}", check=False)
            c.run("rbd", "rm", "--no-progress", f"{c.pool}/{name}", check=False)
    mo, mt = statistics.median(ours), statistics.median(theirs)
    mb = len(change(size, 1)) * BLOCK / MiB
    print(f"\n1% delta ({mb:.0f} MiB in 4 KiB blocks) of a {DELTA_MB} MiB mixed volume into "
          f"RBD, {DELTA_ROUNDS} rounds, medians:\n"
          f"  cyclemirror               {mo:.2f}s  all: {', '.join(f'{s:.2f}' for s in ours)}\n"
          f"  export-diff | import-diff {mt:.2f}s  all: "
          f"{', '.join(f'{s:.2f}' for s in theirs)}\n"
          f"  ratio (import-diff time / ours): {mt / mo:.2f}x\n"
          f"  load average (1 min) from {load[0][0]:.1f} to {load[-1][0]:.1f}, "
          f"max {max(x[0] for x in load):.1f}")
