"""A full first cycle into an RBD target against ``rbd import``, in the same run.

Run on demand (needs the Ceph daemons and the cyclemirror._cext.rbd binding):

    PYTHONPATH=src:. python -m pytest bench/bench_rbd.py -s

Starts a one-node cluster (tests/support/ceph.py: one bluestore OSD on a
sparse file, pool size 1, loopback) in a temporary directory, makes a mixed
file (thirds of random, text-like and zero data, in 1 MiB pieces), and per
round, interleaved, in alternating order:

- cyclemirror: the file imported as a source volume, mirrored to a target
  process with ``rbd=`` (its images in the pool) until the first cycle is
  applied (flushed, snapshotted, recorded); timed from the driver's start to
  ``sync`` returning.  Codec CYCLEMIRROR_BENCH_CODEC (default lz4, or none).
- ``rbd import --no-progress FILE POOL/IMAGE`` of the same file (it skips
  zero blocks, as the full cycle ships them as zero runs).

Each contender's image is removed before the next round.  Size:
CYCLEMIRROR_BENCH_RBD_MB (default 2048); rounds CYCLEMIRROR_BENCH_ROUNDS
(default 3).  Prints medians and the ratio (rbd import's time / ours: above
1 means we are faster).  Nothing asserts a time.
"""

import os
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
    c = ceph.CephCluster(directory)
    c.start()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(directory, ignore_errors=True)


def run_cyclemirror(tmp, c, src_file, label):
    import json

    from cyclemirror.receiver.rbdbackend import remove_mirror_images
    from cyclemirror.sender import MirrorDriver, MirrorOptions
    from cyclemirror.store import Store

    key = keys.generate_key()
    keyfile = os.path.join(tmp, f"key-{label}")
    keys.write_key_file(keyfile, key)
    portfile = os.path.join(tmp, f"port-{label}")
    spec = json.dumps({"pool": c.pool, "conf": c.conf, "client": c.client,
                       "keyring": c.keyring})
    target = subprocess.Popen([sys.executable, "-c", TARGET_SCRIPT, os.path.join(tmp, label),
                               keyfile, portfile, spec], env=ENV)
    try:
        port = int(wait_file(portfile, 60))
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
    ours, theirs = [], []
    for r in range(ROUNDS):
        order = ["ours", "import"] if r % 2 == 0 else ["import", "ours"]
        for who in order:
            if who == "ours":
                ours.append(run_cyclemirror(str(tmp_path), cluster, src, f"r{r}"))
            else:
                theirs.append(run_rbd_import(cluster, src, f"r{r}"))
        print(f"\nround {r}: cyclemirror {ours[-1]:.2f}s, rbd import {theirs[-1]:.2f}s",
              flush=True)
    mo, mt = statistics.median(ours), statistics.median(theirs)
    mb = SIZE_MB
    print(f"\nfull cycle of a {mb} MiB mixed volume into RBD, {ROUNDS} rounds, medians:\n"
          f"  cyclemirror  {mo:.2f}s ({mb / mo:.0f} MiB/s)  all: "
          f"{', '.join(f'{s:.2f}' for s in ours)}\n"
          f"  rbd import   {mt:.2f}s ({mb / mt:.0f} MiB/s)  all: "
          f"{', '.join(f'{s:.2f}' for s in theirs)}\n"
          f"  ratio (rbd import time / ours): {mt / mo:.2f}x")
