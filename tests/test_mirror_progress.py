"""Live progress of a running cycle, as MirrorDriver.status() reports it (in-process, real sockets).

Proves: while a rate-capped cycle ships, each target's ``progress`` figures
only grow, the raw bytes never exceed the bytes covered and those never the
total known up front (the volume's size for a full copy, owed blocks times the
block size for a delta); when the target is about to apply, the bytes covered
equal the total and the raw and wire bytes equal the figures the applied cycle
then reports; once committed (and then applied) the progress is gone.  A group totals each
member at its own block size.  A cycle resumed after a lost connection
counts the chunks it skipped as done (``skipped_bytes``) but not as sent.
The target's ``on_committed``
hook holds the commit, so the final snapshot is taken deterministically.
"""

import os
import threading
import time

import pytest

from cyclemirror import keys
from cyclemirror.receiver import TargetServer
from cyclemirror.receiver.session import ACK_SECONDS
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.sender.driver import TargetSpec
from cyclemirror.store import Store

MiB = 1 << 20
BS = 4096
COUNTERS = ("done_bytes", "bytes_raw", "bytes_wire", "chunks_sent")


class HeldApply:
    """A target whose commit (and so the apply) waits until the test has looked at the source."""

    def __init__(self, tmp_path, key):
        self.reached = threading.Event()
        self.release = threading.Event()
        self.store = Store.create(str(tmp_path / "target"))
        self.key = key
        self.server = TargetServer(self.store, key, ("127.0.0.1", 0), on_committed=self._hold)
        self.server.start()

    def _hold(self, mirror):
        self.reached.set()
        self.release.wait(30)

    def restart(self):
        """Stop serving (every session drops), then serve again on the same port."""
        port = self.server.address[1]
        self.server.stop()
        self.server = TargetServer(self.store, self.key, ("127.0.0.1", port),
                                   on_committed=self._hold)
        self.server.start()

    def close(self):
        self.release.set()
        self.server.stop()
        self.store.close()


@pytest.fixture
def setup(tmp_path):
    key = keys.generate_key()
    src = Store.create(str(tmp_path / "src"))
    target = HeldApply(tmp_path, key)
    applied = []
    drivers = []

    def make(vol, bwlimit):
        opts = MirrorOptions(interval=3600, codec="lz4", bwlimit=bwlimit, retry_initial=0.05,
                             retry_max=0.2, chunk_size=256 << 10,
                             on_applied=lambda c, label, stats: applied.append((c, stats)))
        d = MirrorDriver(vol, [TargetSpec(*target.server.address, key)], options=opts,
                         store=src)
        drivers.append(d)
        return d

    yield src, target, make, applied
    for d in drivers:
        d.stop()
    target.close()
    src.close()


def watch_cycle(d, target, label, cycle, timeout=60.0):
    """Poll status() until the target holds the commit; return the snapshots seen."""
    seen = []
    deadline = time.monotonic() + timeout
    while not target.reached.is_set():
        assert time.monotonic() < deadline, f"cycle {cycle} did not reach the target's apply"
        p = d.status()["targets"][label]["progress"]
        if p is not None:
            seen.append(p)
        time.sleep(0.02)
    final = d.status()["targets"][label]
    assert final["phase"] == "applying" and final["applied_cycle"] < cycle
    seen.append(final["progress"])
    return seen


def check_snapshots(seen, cycle, full, total):
    assert all(p["cycle"] == cycle and p["full"] is full and p["total_bytes"] == total
               for p in seen)
    for before, after in zip(seen, seen[1:], strict=False):
        for k in COUNTERS:
            assert after[k] >= before[k], (k, before, after)
    for p in seen:
        assert 0 <= p["bytes_raw"] <= p["done_bytes"] <= p["total_bytes"], p
    assert len({p["started"] for p in seen}) == 1


def finish(d, target, applied, label, cycle, final, resumed_from=0):
    target.release.set()
    deadline = time.monotonic() + 30
    while d.status()["targets"][label]["applied_cycle"] < cycle:
        assert time.monotonic() < deadline, f"cycle {cycle} was not applied"
        time.sleep(0.02)
    t = d.status()["targets"][label]
    assert t["progress"] is None and t["last_cycle"] == cycle
    stats = [s for c, s in applied if c == cycle][0]
    assert final["bytes_raw"] == stats["bytes_raw"] == t["bytes_raw"]
    assert final["bytes_wire"] == stats["bytes_wire"] == t["bytes_wire"]
    assert final["chunks_sent"] == stats["chunks"]
    assert final["resumed_from"] == stats["resumed_from"] == resumed_from
    return t


def test_a_rate_capped_full_cycle_reports_growing_progress_ending_at_its_raw_figure(setup):
    src, target, make, applied = setup
    vol = src.create_volume("v", 8 * MiB)
    vol.write(0, os.urandom(3 * MiB))  # 3 MiB at 1 MiB/s: about 3 s of shipping
    vol.write(6 * MiB, b"\x07" * MiB)  # compresses well: raw and wire differ
    d = make(vol, 1 * MiB)
    label = d.targets[0].label
    d.request_freeze()  # before start: cycle 1 is the one asked for (see wait_applied)
    d.start()
    seen = watch_cycle(d, target, label, 1)
    check_snapshots(seen, 1, True, 8 * MiB)
    assert len(seen) >= 10, "a rate-capped cycle of seconds must be seen while it ships"
    assert any(0 < p["done_bytes"] < p["total_bytes"] for p in seen), "never seen mid-way"
    final = seen[-1]
    assert final["done_bytes"] == 8 * MiB  # data and zero runs cover the whole volume
    assert final["bytes_raw"] == 4 * MiB  # the zero runs carry no data
    assert final["bytes_wire"] < final["bytes_raw"]
    finish(d, target, applied, label, 1, final)


def test_a_delta_cycle_counts_owed_blocks_including_zeroed_ones(setup):
    src, target, make, applied = setup
    vol = src.create_volume("v", 4 * MiB)
    d = make(vol, 256 << 10)
    label = d.targets[0].label
    target.release.set()
    want = d.request_freeze()
    d.start()
    d.wait_applied(want, 30)
    target.reached.clear()
    target.release.clear()
    blocks = list(range(0, 1024, 3))  # 342 scattered blocks of data
    for b in blocks:
        vol.write(b * BS, os.urandom(BS))
    vol.write_zeroes(1000 * BS, 16 * BS)  # 16 zeroed blocks: owed, but no data
    owed = len(set(blocks) | set(range(1000, 1016)))
    d.request_freeze()
    seen = watch_cycle(d, target, label, 2)
    check_snapshots(seen, 2, False, owed * BS)
    final = seen[-1]
    assert final["done_bytes"] == owed * BS
    assert final["bytes_raw"] == len(set(blocks) - set(range(1000, 1016))) * BS
    finish(d, target, applied, label, 2, final)


def test_a_group_totals_each_members_owed_blocks_at_its_own_block_size(setup):
    from cyclemirror.sender.group import VolumeGroup

    src, target, make, applied = setup
    db = src.create_volume("db", 2 * MiB)
    lg = src.create_volume("log", MiB, block_size=16384)
    d = make(VolumeGroup(src, "app", [db, lg]), 512 << 10)
    label = d.targets[0].label
    target.release.set()
    want = d.request_freeze()
    d.start()
    d.wait_applied(want, 30)
    full = [s for c, s in applied if c == 1][0]
    assert full["bytes_raw"] == 0  # both empty: zero runs only
    target.reached.clear()
    target.release.clear()
    db.write(5 * BS, os.urandom(3 * BS))  # 3 blocks of 4 KiB
    lg.write(16384 * 10 + 100, os.urandom(16384))  # straddles 2 blocks of 16 KiB
    for i in range(40):  # scattered blocks: enough for the poll to see it ship
        db.write((100 + 7 * i) * BS, os.urandom(BS))
    d.request_freeze()
    seen = watch_cycle(d, target, label, 2)
    total = 43 * BS + 2 * 16384
    check_snapshots(seen, 2, False, total)
    assert seen[-1]["done_bytes"] == seen[-1]["bytes_raw"] == total
    finish(d, target, applied, label, 2, seen[-1])


def test_a_resumed_cycle_counts_skipped_chunks_as_done_but_not_as_sent(setup):
    src, target, make, applied = setup
    vol = src.create_volume("v", 8 * MiB)
    vol.write(0, os.urandom(8 * MiB))
    d = make(vol, 1 * MiB)
    label = d.targets[0].label
    d.request_freeze()  # before start: cycle 1 is the one asked for (see wait_applied)
    d.start()
    deadline = time.monotonic() + 30
    while True:  # let part of it arrive and be acknowledged, then cut the link
        p = d.status()["targets"][label]["progress"]
        # The target acknowledges (durably) every ACK_SECONDS while data flows; two
        # intervals in, at 1 MiB/s, it has acknowledged chunks and some remain to send
        # (a byte count alone raced the first ack when the rate limiter let a burst out).
        if (p and time.time() - p["started"] >= 2 * ACK_SECONDS + 0.5
                and p["done_bytes"] < 8 * MiB):
            break
        assert time.monotonic() < deadline, "the cycle never got going"
        time.sleep(0.02)
    target.restart()  # a lost connection: the driver retries and resumes the cycle
    seen = watch_cycle(d, target, label, 1)
    # The first attempt may still show until the driver notices the lost link;
    # each attempt has its own figures (and start), so check the last one.
    seen = [p for p in seen if p["started"] == seen[-1]["started"]]
    check_snapshots(seen, 1, True, 8 * MiB)
    final = seen[-1]
    assert final["resumed_from"] > 0 and final["skipped_bytes"] > 0, final
    assert final["done_bytes"] == 8 * MiB
    assert final["bytes_raw"] == 8 * MiB - final["skipped_bytes"]
    finish(d, target, applied, label, 1, final, resumed_from=final["resumed_from"])
