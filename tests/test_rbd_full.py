"""A Ceph pool that fills up, and a cluster that stops answering: temporary errors.

The RBD twin of tests/test_receiver_nospace.py, against the session's real
one-node cluster (tests/support/ceph.py) and a pool of this module's own,
``cmfull``, made full by a real pool quota (``ceph osd pool set-quota``), so
the other tests' pool is never full.  Proves:

* a delta whose apply meets a full pool: the source shows an error that names
  the mirror, the pool and the quota and what to do, keeps retrying (not
  broken); the last cycle's snapshot is untouched and still equals its
  freeze; once the quota is lifted the delta is applied from what the target
  staged (no full copy, not re-sent beyond the delta) and the new snapshot
  equals the freeze;
* a first cycle into a pool that is full already: the same clear error, and the
  cycle completes once the quota is lifted;
* a cluster that stops answering (its OSD stopped with SIGSTOP) while a delta is
  applied: a temporary error naming the pool once the client's op timeout ends
  the wait (the test lowers it to 3 s), and the delta is applied after the OSD
  is continued.

The pool's full flag follows its usage a few seconds late (the manager's stats
period, lowered here to 1 s for the module and restored after), so the tests
wait for the flag itself, never for a time.
"""

from __future__ import annotations

import json
import os
import random
import signal

import pytest

from cyclemirror import keys
from cyclemirror.receiver import TargetServer, rbdbackend
from cyclemirror.receiver.backend import RbdConfig
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.store import Store
from tests.support.mirror import wait_for

MiB = 1 << 20
POOL = "cmfull"


@pytest.fixture(scope="module")
def full_pool(ceph_cluster):
    try:
        from cyclemirror._cext import rbd  # noqa: F401
    except ImportError:
        pytest.skip("cyclemirror._cext.rbd is not built (install librbd-dev and librados-dev, "
                    "then rebuild: python3 setup.py build_ext --inplace)")
    c = ceph_cluster
    if POOL not in c.run("ceph", "osd", "pool", "ls").split():
        c.run("ceph", "osd", "pool", "create", POOL, "8", "8")
        c.run("ceph", "osd", "pool", "set", POOL, "size", "1", "--yes-i-really-mean-it")
        c.run("rbd", "pool", "init", POOL, timeout=120)
    period = c.run("ceph", "config", "get", "mgr", "mgr_stats_period").strip()
    c.run("ceph", "config", "set", "mgr", "mgr_stats_period", "1")
    try:
        yield c
    finally:
        c.run("ceph", "osd", "pool", "set-quota", POOL, "max_bytes", "0", check=False)
        c.run("ceph", "config", "set", "mgr", "mgr_stats_period", period or "5", check=False)


def _pool_full(cluster) -> bool:
    pools = json.loads(cluster.run("ceph", "osd", "pool", "ls", "detail", "-f", "json"))
    (pool,) = [p for p in pools if p["pool_name"] == POOL]
    return "full" in pool["flags_names"].split(",")


def _set_quota(cluster, nbytes: int) -> None:
    """Set the pool's quota and wait until the monitors' full flag follows it."""
    cluster.run("ceph", "osd", "pool", "set-quota", POOL, "max_bytes", str(nbytes))
    want = nbytes > 0
    wait_for(lambda: _pool_full(cluster) == want, 120,
             f"pool {POOL} to be {'full' if want else 'not full'} (quota {nbytes})")


def _snapshot(cluster, node: str, name: str, cycle: int) -> bytes:
    out = os.path.join(os.path.dirname(cluster.conf), f"full-{node}-{name}-{cycle}.img")
    cluster.run("rbd", "export", "--no-progress",
                f"{POOL}/{node}~{name}@cyclemirror-{cycle}", out)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


class _Rig:
    """A target server keeping images in ``cmfull`` and one source volume mirrored to it."""

    def __init__(self, tmp_path, cluster, name: str, size: int):
        self.key = keys.generate_key()
        self.dst = Store.create(str(tmp_path / "dst"))
        cfg = RbdConfig(pool=POOL, conf=cluster.conf, client=cluster.client,
                        keyring=cluster.keyring)
        self.server = TargetServer(self.dst, self.key, rbd=cfg)
        self.server.start()
        self.src = Store.create(str(tmp_path / "src"))
        self.vol = self.src.create_volume(name, size)
        self.vol.write(0, random.Random(5).randbytes(size // 2))  # the rest: never written
        self.frozen: dict[int, bytes] = {}
        self.stats: dict[int, dict] = {}

        def on_frozen(f, reader):
            self.frozen[f.number] = reader.read(0, size)

        def on_applied(cycle, label, stats):
            self.stats[cycle] = stats

        self.driver = MirrorDriver(
            self.vol, self.server.address, self.key,
            MirrorOptions(on_frozen=on_frozen, on_applied=on_applied, retry_initial=0.05,
                          retry_max=0.3, interval=3600), store=self.src)

    def target_row(self) -> dict:
        (row,) = self.driver.status()["targets"].values()
        return row

    def wait_error(self, text: str) -> dict:
        wait_for(lambda: text in (self.target_row()["last_error"] or ""), 120,
                 f"the target's error {text!r} to reach the source")
        return self.target_row()

    def close(self) -> None:
        self.driver.stop()
        self.server.stop()
        self.src.close()
        self.dst.close()


@pytest.fixture
def rig_factory(tmp_path, full_pool):
    rigs = []

    def make(name: str, size: int) -> _Rig:
        rigs.append(_Rig(tmp_path, full_pool, name, size))
        return rigs[-1]

    try:
        yield make
    finally:
        for r in rigs:
            r.close()
        full_pool.run("ceph", "osd", "pool", "set-quota", POOL, "max_bytes", "0", check=False)


def test_a_delta_into_a_full_pool_waits_with_a_clear_error_and_is_applied_after(
        full_pool, rig_factory):
    cluster = full_pool
    r = rig_factory("dv", 8 * MiB)
    r.driver.start()
    first = r.driver.sync(60)
    node = r.src.node_id
    assert _snapshot(cluster, node, "dv", first) == r.frozen[first]
    # The delta lands where the image has no objects yet, so it needs room: Ceph lets
    # writes that only overwrite allocated bytes into a full pool (a snapshot's copy
    # on write is not charged to the quota check).
    r.vol.write(5 * MiB, os.urandom(2 * MiB))
    _set_quota(cluster, MiB)  # the pool holds more than that already
    want = r.driver.request_freeze()
    row = r.wait_error(f"the Ceph pool '{POOL}' is full")
    assert row["phase"] != "broken", row  # temporary: the driver keeps retrying
    err = row["last_error"]
    assert "mirror 'dv'" in err and "quota" in err and f"set-quota {POOL}" in err, err
    assert "resumes after its last ack" in err, err
    # The source's retry: the target's recovery redoes the committed delta, which fails
    # the same way (the target's own error list says so too).
    wait_for(lambda: any(f"pool '{POOL}' is full" in e for e in r.server.errors), 120,
             "the target to note the full pool when it redoes the delta")
    # Nothing of the delta reached the consistent copy, which still equals its freeze.
    assert _snapshot(cluster, node, "dv", first) == r.frozen[first]
    assert r.driver.status()["targets"]  # still attached
    _set_quota(cluster, 0)
    assert r.driver.wait_applied(want, 120) >= want
    applied = max(r.stats)
    assert applied >= want
    assert _snapshot(cluster, node, "dv", applied) == r.frozen[applied]
    # The target redid the committed delta from its staging log: no full copy, and
    # nothing of it sent again (the cycles after the first carried the 2 MiB at most).
    later = [s for c, s in r.stats.items() if c > first]
    assert not any(s["full"] for s in later), later
    assert sum(s["bytes_raw"] for s in later) <= 2 * MiB, later


def test_a_first_cycle_into_a_full_pool_waits_with_a_clear_error_and_completes_after(
        full_pool, rig_factory, tmp_path):
    cluster = full_pool
    filler = tmp_path / "filler"
    filler.write_bytes(os.urandom(2 * MiB))
    cluster.run("rados", "-p", POOL, "put", f"filler-{os.getpid()}", str(filler))
    _set_quota(cluster, MiB)
    r = rig_factory("fv", 4 * MiB)
    r.driver.start()
    row = r.wait_error(f"the Ceph pool '{POOL}' is full")
    assert row["phase"] != "broken", row
    assert "mirror 'fv'" in row["last_error"], row
    _set_quota(cluster, 0)
    cycle = r.driver.sync(120)
    assert _snapshot(cluster, r.src.node_id, "fv", cycle) == r.frozen[cycle]
    assert r.stats[cycle]["full"] if cycle == 1 else not r.stats[cycle]["full"]


def test_a_cluster_that_stops_answering_mid_apply_is_a_temporary_error(
        full_pool, rig_factory, monkeypatch):
    cluster = full_pool
    osd = [p for p in cluster.procs if os.path.basename(p.args[0]) == "ceph-osd"]
    if len(osd) != 1:
        pytest.skip("the test cluster's OSD is not a child of this test session")
    # A fresh connection with short timeouts (the daemon's are 60 s and 30 s).
    monkeypatch.setattr(rbdbackend, "_connections", {})
    monkeypatch.setattr(rbdbackend, "TIMEOUTS", {"client_mount_timeout": 3,
                                                 "rados_mon_op_timeout": 3,
                                                 "rados_osd_op_timeout": 3})
    r = rig_factory("sv", 4 * MiB)
    r.driver.start()
    first = r.driver.sync(60)
    r.vol.write(3 * MiB, os.urandom(MiB))
    stopped = True
    osd[0].send_signal(signal.SIGSTOP)
    try:
        want = r.driver.request_freeze()
        row = r.wait_error("the Ceph cluster did not answer")
        assert row["phase"] != "broken", row
        assert f"pool '{POOL}'" in row["last_error"] and "mirror 'sv'" in row["last_error"]
        osd[0].send_signal(signal.SIGCONT)
        stopped = False
    finally:
        if stopped:
            osd[0].send_signal(signal.SIGCONT)
    assert r.driver.wait_applied(want, 120) >= want
    applied = max(r.stats)
    assert applied > first
    assert _snapshot(cluster, r.src.node_id, "sv", applied) == r.frozen[applied]
    later = [s for c, s in r.stats.items() if c > first]
    assert not any(s["full"] for s in later), later
    assert sum(s["bytes_raw"] for s in later) <= MiB, later


def test_cluster_errors_name_the_pool_and_what_to_do():
    """The three answers ``cluster_error`` gives (the cluster-full one cannot be made
    here without filling the shared test cluster's OSD), and None for the rest."""
    import errno

    from cyclemirror.errors import ClusterUnavailableError, NoSpaceError, is_temporary

    cfg = RbdConfig(pool="mirrors", namespace="site-a")
    what = "mirror 'v' of source a"
    full = rbdbackend.cluster_error(cfg, what, OSError(errno.ENOSPC, "No space left"))
    assert isinstance(full, NoSpaceError) and is_temporary(full)
    assert str(full).startswith(what) and "'mirrors/site-a'" in str(full)
    assert "full ratio" in str(full) and "ceph health detail" in str(full)
    quota = rbdbackend.cluster_error(cfg, what, OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert isinstance(quota, NoSpaceError) and "set-quota mirrors max_bytes" in str(quota)
    silent = rbdbackend.cluster_error(cfg, what, OSError(errno.ETIMEDOUT, "timed out"))
    assert isinstance(silent, ClusterUnavailableError) and is_temporary(silent)
    assert "'mirrors/site-a'" in str(silent) and "ceph -s" in str(silent)
    assert rbdbackend.cluster_error(cfg, what, OSError(errno.EIO, "I/O error")) is None
