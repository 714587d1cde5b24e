"""Failback from an RBD volume: its first cycle (a delta) against a full copy of it.

Run on demand:  PYTHONPATH=src python -m pytest bench/bench_rbd_failback.py -s

A one-node Ceph cluster (tests/support/ceph.py) holds an RBD image of
CYCLEMIRROR_BENCH_RBD_FB_MB (default 512) MiB of mixed data
(bench_mirror.make_mixed_file, ``rbd import``-ed) with a branch snapshot
``cyclemirror-1``, as a promoted RBD volume has.  Each round, interleaved:

* **full**: the cycle driver over the RBD subject (``sender.rbdsubject``) to
  a target process that never knew the volume: the whole branch cycle, read
  from the snapshot (allocated data, zero runs);
* **failback**: 1 % of the 4 KiB blocks written on the image's head after the
  branch snapshot (random, flushed), then the first cycle of a driver seeded as
  a failback is (``sender.failback.seed_rbd``: the target holds cycle 1) to a
  target whose image is that cycle: the delta of exactly those blocks, found
  with ``rbd_diff_iterate2`` and read from the freeze snapshot.

The old primary's own part of a failback (turning its volume into the image,
``receiver/resync.py``) is a rename and is not in these figures
(bench_failback.py measures it for files).  Codec none: the wire bytes are
compared with the bytes written.  Nothing asserts a time; medians, the ratio
(full / failback) and the load average are printed.  The machine is shared.
"""

import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_mirror import make_mixed_file  # noqa: E402
from bench.bench_rbd import start_target  # noqa: E402

from tests.support import ceph  # noqa: E402

SIZE_MB = int(os.environ.get("CYCLEMIRROR_BENCH_RBD_FB_MB", "512"))
ROUNDS = int(os.environ.get("CYCLEMIRROR_BENCH_ROUNDS", "3"))
BLOCK = 4096
MiB = 1 << 20


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
    ceph.OSD_BYTES = max(ceph.OSD_BYTES, (2 * ROUNDS + 2) * SIZE_MB * MiB + (4 << 30))
    c = ceph.CephCluster(directory)
    c.start()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _subject(io, name):
    from cyclemirror.sender.rbdsubject import RbdVolumeSubject

    return RbdVolumeSubject(io, name, size=SIZE_MB * MiB, block_size=BLOCK, branch_cycle=1,
                            branch_snap="cyclemirror-1", branch_freeze_time=time.time())


def _cycle(tmp, c, io, name, label, seed_from=None):
    """One driver run to a fresh target: (seconds, wire bytes, full?) of its first cycle.
    ``seed_from``: first give the target the branch cycle (untimed), then seed the
    driver as a failback and time the delta."""
    from cyclemirror.sender import MirrorDriver, MirrorOptions
    from cyclemirror.sender.failback import seed_rbd
    from cyclemirror.store import Store

    target, port, key = start_target(tmp, c, label)
    applied = {}
    try:
        store = Store.create(os.path.join(tmp, f"src-{label}"))
        sub = _subject(io, name)
        opts = MirrorOptions(interval=3600, codec="none",
                             on_applied=lambda cyc, _l, s: applied.update({cyc: s}))
        if seed_from is not None:
            # The target's image of cycle 1 (as the old primary's is after its turnback).
            from cyclemirror.sender.persist import DriverState

            d = MirrorDriver(sub, ("127.0.0.1", port), key, opts, store=store)
            d.start()
            d.sync(3600)
            d.stop()
            sub.merge_through(2**62)
            sub.close()
            outgoing = os.path.join(store.path, "outgoing")
            node = DriverState(os.path.join(outgoing, name),
                               sub.nblocks).targets[f"127.0.0.1:{port}"].target_node
            shutil.rmtree(outgoing, ignore_errors=True)
            sub = _subject(io, name)  # a new driver, as after the promotion
            seed_from(sub)
            assert seed_rbd(store, sub, f"127.0.0.1:{port}",
                            {"cycle": 1, "freeze_time": 0.0, "source_node": node,
                             "source_name": "old"})
        d = MirrorDriver(sub, ("127.0.0.1", port), key, opts, store=store)
        os.sync()
        t0 = time.perf_counter()
        d.start()
        cyc = d.sync(3600)
        seconds = time.perf_counter() - t0
        d.stop()
        sub.merge_through(2**62)
        sub.close()
        store.close()
        return seconds, applied[cyc]["bytes_wire"], applied[cyc]["full"]
    finally:
        target.kill()
        target.wait(10)
        from cyclemirror.receiver.rbdbackend import remove_image

        for img in c.run("rbd", "ls", c.pool).split():
            if "~" in img:
                try:
                    remove_image(io, img)
                except OSError:  # the killed target's watch lingers: the image stays
                    pass
        shutil.rmtree(os.path.join(tmp, label), ignore_errors=True)
        shutil.rmtree(os.path.join(tmp, f"src-{label}"), ignore_errors=True)


def test_failback_from_rbd_against_a_full_copy(cluster, tmp_path):
    from cyclemirror._cext import rbd

    src = str(tmp_path / "mixed.img")
    make_mixed_file(src, SIZE_MB * MiB)
    cl = rbd.Cluster(cluster.conf, cluster.client, cluster.keyring)
    cl.connect()
    io = cl.ioctx(cluster.pool)
    nblocks = SIZE_MB * MiB // BLOCK
    full, fb, load = [], [], [os.getloadavg()]
    try:
        for rnd in range(ROUNDS):
            name = f"fb{rnd}"
            cluster.run("rbd", "import", "--no-progress", src, f"{cluster.pool}/{name}",
                        timeout=3600)
            img = io.open(name)
            img.snap_create("cyclemirror-1")
            blocks = random.Random(rnd).sample(range(nblocks), nblocks // 100)

            def write(_sub, img=img, blocks=blocks, rnd=rnd):
                data = random.Random(rnd + 100).randbytes(BLOCK)
                for b in blocks:
                    img.write(data, b * BLOCK)
                img.flush()

            full.append(_cycle(str(tmp_path), cluster, io, name, f"full{rnd}"))
            fb.append(_cycle(str(tmp_path), cluster, io, name, f"fb{rnd}", seed_from=write))
            img.close()
            cluster.run("rbd", "snap", "purge", "--no-progress", f"{cluster.pool}/{name}")
            cluster.run("rbd", "rm", "--no-progress", f"{cluster.pool}/{name}", timeout=600)
            load.append(os.getloadavg())
            print(f"round {rnd}: full {full[-1][0]:.2f}s ({full[-1][1]} B), failback "
                  f"{fb[-1][0]:.2f}s ({fb[-1][1]} B), load {load[-1][0]:.1f}", flush=True)
    finally:
        io.close()
        cl.shutdown()
    assert all(f[2] for f in full) and not any(f[2] for f in fb)
    written = nblocks // 100 * BLOCK
    mf, mb = statistics.median(x[0] for x in full), statistics.median(x[0] for x in fb)
    wf, wb = statistics.median(x[1] for x in full), statistics.median(x[1] for x in fb)
    print(f"\nfailback from a {SIZE_MB} MiB RBD volume, 1% of its 4 KiB blocks written, "
          f"{ROUNDS} rounds, medians:\n"
          f"  full copy {mf:.2f}s, {wf} wire bytes\n"
          f"  failback  {mb:.2f}s, {wb} wire bytes ({wb / written:.3f}x the {written} "
          f"bytes written)\n"
          f"  ratio (full / failback): time {mf / mb:.1f}x, wire {wf / wb:.1f}x\n"
          f"  load average (1 min) from {load[0][0]:.1f} to {load[-1][0]:.1f}, "
          f"max {max(x[0] for x in load):.1f}")
