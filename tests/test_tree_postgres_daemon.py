"""A PostgreSQL data directory mirrored by real daemons, a cycle every second, through kills.

The database check of ``tests/test_tree_postgres.py`` with ``cyclemirror
serve`` processes instead of the library path: Debian's PostgreSQL runs on
a btrfs subvolume (one loop file system) with pgbench's load and the
counter client; a source daemon holds the subvolume as tree object ``pg``
and mirrors it (``mirror start pg --interval 1``) to a target daemon whose
store is on a second btrfs loop file system.

At random moments the target's current tree
(``STORE/mirrors/<source node id>/trees/pg``) is cloned (a btrfs snapshot,
taken between two equal reads of the target's record with no switch
pending, so the clone is the cycle the record names) and a second
PostgreSQL started on the clone: it must recover by itself, ``pg_amcheck
--heapallindexed`` must find nothing, the counter must hold at least every
value acknowledged before that cycle's freeze (the freeze time the target
recorded, which the source sent) and at most one more than was sent
before the next cycle's freeze began (the freeze of a cycle has finished
before the next one starts).

Then kill -9 of the target daemon while it applies a cycle, of the source
daemon while it ships one, and of PostgreSQL itself; each time the killed
party is restarted, the mirror goes on by itself, the next clone passes,
and the source's log shows a single full copy in the whole run (the first
cycle): every restart resumed with a delta.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import time

import pytest

from tests.support import pgcluster as pg
from tests.support.daemons import Daemon, free_port, make_key, wait_for
from tests.support.trees import delete_subvolumes, subvolume

NAME = "pg"
SCALE = 1
SOURCE_PORT = 5633  # the port names the Unix socket only; copies take the next ones


class Rig:
    """The source cluster and its load, the two daemons, the target's record and clones."""

    def __init__(self, top: str, src_mount: str, tgt_mount: str):
        self.top, self.src_mount, self.tgt_mount = top, src_mount, tgt_mount
        self.client: pg.CounterClient | None = None
        self.load: subprocess.Popen | None = None
        self.daemons: list[Daemon] = []
        self.checks = 0

    def start(self) -> None:
        top = self.top
        self.pgdata = subvolume(self.src_mount, "pgdata")
        pg.initdb(self.pgdata, os.path.join(top, "initdb.log"), "--wal-segsize=1")
        self.server = pg.PgServer(self.pgdata, os.path.join(top, "sock"), SOURCE_PORT,
                                  os.path.join(top, "source.log"))
        self.server.start()
        pg.prepare(self.server, SCALE)
        key = make_key(os.path.join(top, "key"))
        self.src = Daemon(self.src_mount, "src", key_file=key, nbd=False, metrics=False)
        self.daemons.append(self.src)
        # a fixed port: the source's mirror names it, and the target restarts on it
        self.tgt = Daemon(self.tgt_mount, "tgt", key_file=key, nbd=False, metrics=False,
                          extra=("--listen", f"127.0.0.1:{free_port()}"))
        self.daemons.append(self.tgt)
        self.src.start()
        self.tgt.start()
        self.src.cli("tree", "add", NAME, self.pgdata)
        self.mirror = os.path.join(self.tgt.store, "mirrors", self.src.node_id, "trees")
        self.clones = os.path.join(self.tgt_mount, "clones")
        os.makedirs(self.clones)
        self.client = pg.CounterClient(self.server).start()
        self.restart_load()
        self.client.wait_commits(10)
        self.src.cli("mirror", "start", NAME, "--to", self.tgt.listen, "--interval", "1")
        self.wait_applied(0)

    def restart_load(self) -> None:
        pg.stop_process(self.load)
        self.load = pg.pgbench_start(self.server, 3600, clients=1)

    # -- the target's record --------------------------------------------------------------

    def state(self) -> dict | None:
        """The target's record of the tree (``applied_cycle``, ``freeze_time``,
        ``pending``), None before it has one."""
        try:
            with open(os.path.join(self.mirror, f".cyclemirror-tree-{NAME}",
                                   "state.json")) as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None

    def applied(self) -> int:
        s = self.state()
        return s["applied_cycle"] if s else 0

    def wait_applied(self, past: int, frozen_after: float = 0.0) -> dict:
        """Wait until the target applied a cycle above ``past`` frozen after
        ``frozen_after``; its record."""
        def ready():
            s = self.state()
            return s if (s and s["applied_cycle"] > past and s.get("pending") is None
                         and s["freeze_time"] > frozen_after) else None

        return wait_for(ready, 90, f"the target to apply a cycle after {past} frozen after "
                        f"{frozen_after:.3f}; source log:\n{self.src.log()[-3000:]}",
                        interval=0.02)

    def applying(self) -> bool:
        """Whether the target is building a cycle's stage (the source is shipping it)."""
        work = os.path.join(self.mirror, f".cyclemirror-tree-{NAME}")
        try:
            return any(e.startswith("stage-") for e in os.listdir(work))
        except FileNotFoundError:
            return False

    def full_copies(self) -> list[str]:
        return re.findall(rf"mirror {NAME} -> {re.escape(self.tgt.listen)}: cycle \d+ applied"
                          r".*full copy", self.src.log())

    # -- the check ------------------------------------------------------------------------

    def clone(self, path: str) -> dict:
        """A btrfs snapshot of the target's tree between two equal reads of its record with
        no switch pending: no exchange happened in between, so the clone is the cycle the
        record names."""
        for _ in range(200):
            before = self.state()
            if before is None or before.get("pending") is not None:
                time.sleep(0.02)
                continue
            subprocess.run(["btrfs", "subvolume", "snapshot", os.path.join(self.mirror, NAME),
                            path], check=True, capture_output=True)
            if self.state() == before:
                return before
            delete_subvolumes(path)
        raise AssertionError("the target's tree kept switching while it was cloned")

    def check_target(self) -> tuple[int, int, int]:
        """Clone the target's current tree, recover a second PostgreSQL on it, check it;
        (cycle, counter, the value committed before its freeze)."""
        self.checks += 1
        clone = os.path.join(self.clones, f"clone-{self.checks}")
        state = self.clone(clone)
        cycle, freeze_time = state["applied_cycle"], state["freeze_time"]
        res, lower = pg.check_clone(clone, os.path.join(self.top, f"check-{self.checks}"),
                                    SOURCE_PORT + self.checks, self.client, cycle,
                                    freeze_time, delete_subvolumes)
        # any later cycle was frozen after this one's snapshot was made
        later = self.wait_applied(cycle)["freeze_time"]
        upper = self.client.sent_by(later)
        assert res.counter <= upper, (
            f"the copy of cycle {cycle} holds counter {res.counter}, but no transaction past "
            f"{upper} was sent before the next freeze began ({later:.6f})")
        return cycle, res.counter, lower

    def check_counter_log(self) -> None:
        self.client.check_never_went_back()

    def kill_mid_apply(self, daemon: Daemon, rnd: random.Random) -> bool:
        """SIGKILL ``daemon`` while the target builds a cycle (or, if none started within
        a few intervals, now); whether a cycle was being applied."""
        try:
            wait_for(self.applying, 5, "a cycle to be applied", interval=0.005)
            time.sleep(rnd.uniform(0, 0.05))
            mid = True
        except AssertionError:
            mid = False
        daemon.kill()
        return mid

    def close(self) -> None:
        if self.client is not None:
            self.client.stop()
        pg.stop_process(self.load)
        for d in self.daemons:
            try:
                d.stop()
            except AssertionError:
                d.kill()


def clear(mount: str) -> None:
    for entry in os.listdir(mount):
        delete_subvolumes(os.path.join(mount, entry))


@pytest.fixture(scope="module")
def rig():
    pg.skip_unless_postgres()
    from tests.support.loopfs import loopfs_or_skip

    top = pg.workdir("cyclemirror-pgdaemon-")  # the postgres user must reach the data
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, top, True)
        mounts = []
        for side in ("source", "target"):
            os.mkdir(os.path.join(top, side))
            fs = loopfs_or_skip("btrfs", os.path.join(top, side), 1 << 30)
            stack.callback(fs.close)
            stack.callback(clear, fs.mount)  # runs before fs.close
            mounts.append(fs.mount)
        stack.callback(pg.stop_all)
        r = Rig(top, *mounts)
        stack.callback(r.close)  # daemons and clients first
        r.start()
        yield r


def test_clones_of_a_daemon_mirror_recover_with_every_committed_transaction(rig):
    rnd = random.Random(16)
    seen = []
    for _ in range(2):
        time.sleep(rnd.uniform(0, 1))
        seen.append(rig.check_target())
    assert seen[-1][0] > seen[0][0], seen  # the daemon went on cycling
    assert seen[-1][2] > seen[0][2] > 0, seen  # and the load ran
    assert len(rig.full_copies()) == 1, rig.full_copies()
    rig.check_counter_log()


def test_kill_9_of_the_target_daemon_mid_apply(rig):
    held = rig.applied()
    mid = rig.kill_mid_apply(rig.tgt, random.Random(7))
    rig.tgt.start()  # settles the cut-off apply before it accepts the source
    rig.wait_applied(max(held, rig.applied()))
    cycle, _, _ = rig.check_target()
    assert cycle > held
    assert len(rig.full_copies()) == 1, (mid, rig.src.log()[-3000:])
    rig.check_counter_log()


def test_kill_9_of_the_source_daemon_mid_cycle(rig):
    held = rig.applied()
    mid = rig.kill_mid_apply(rig.src, random.Random(11))
    killed = time.time()
    logged = len(rig.src.log())
    rig.src.start()  # the mirror comes back by itself
    rig.wait_applied(rig.applied(), frozen_after=killed)
    cycle, _, _ = rig.check_target()
    assert cycle > held
    # resumed with a delta from what the target held, never a full copy
    since = rig.src.log()[logged:]
    assert re.search(rf"mirror {NAME} -> .*: cycle \d+ applied", since), since
    assert len(rig.full_copies()) == 1, (mid, since)
    (row,) = [r for r in rig.src.status()["mirrors"] if r["volume"] == NAME]
    assert row["kind"] == "tree" and row["last_cycle"]["full"] is False, row
    rig.check_counter_log()


def test_kill_9_of_postgres(rig):
    rnd = random.Random(9)
    time.sleep(rnd.uniform(0, 1))
    acked = rig.client.commits()[-1].value
    rig.server.kill9()
    killed = time.time()
    rig.wait_applied(rig.applied(), frozen_after=killed)
    rig.check_target()  # the files of a dead cluster: as after a power loss
    rig.server.start()  # its own crash recovery
    assert pg.read_counter(rig.server) >= acked
    rig.restart_load()
    rig.client.wait_commits(5)
    restarted = time.time()
    rig.wait_applied(rig.applied(), frozen_after=restarted)
    _, _, lower = rig.check_target()
    assert lower > acked
    assert len(rig.full_copies()) == 1, rig.full_copies()
    rig.check_counter_log()
