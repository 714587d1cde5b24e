"""A PostgreSQL data directory mirrored as a tree object: every copy on the target recovers.

Debian's PostgreSQL runs (as the postgres user, on a Unix socket) on a data
directory that is a btrfs subvolume on a loop device, made a tree object;
pgbench's TPC-B-like load and a client that increments a counter row in
committed transactions (logging when each commit was acknowledged) run all
along.  Cycles run about every second through the library path a daemon pair
will run (``mirror_cycle``): freeze (a read-only snapshot), the delta, its
frames through a socket, the target's atomic apply onto a plain tree on a
second btrfs loop file system, and the merge of the older snapshot.

At random cycles, at a random moment between cycles, the target's current
tree is cloned (a btrfs snapshot of it) and a second PostgreSQL started on
the clone: it must recover by itself, ``pg_amcheck --heapallindexed`` must
find nothing in any database, and the counter must hold at least the value
whose commit was acknowledged before that cycle's freeze began (the freeze
time comes from the target's own record), and at most one more than the
last value sent before the freeze returned.

Then the same with crashes: PostgreSQL itself killed with SIGKILL (the
postmaster and all its backends) between and during cycles, a cycle of the
dead cluster's files, a restart (nothing acknowledged is lost on the
source); the process applying a cycle on the target killed with SIGKILL
before the exchange, after it and at a random moment (opening the mirror
settles it, and the clone of whatever it holds recovers); the process
running the source's half of cycles (freeze, delta, frames) killed with
SIGKILL at a random moment, after which the next cycles catch up and the
target equals the source's snapshot byte for byte.  CYCLEMIRROR_SLOW=1 runs
more cycles and more source kills.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import pytest

from cyclemirror.receiver.treeops import TreeMirror, dir_identity
from cyclemirror.store import tree
from tests.support import pgcluster as pg
from tests.support.daemons import wait_for
from tests.support.procenv import child_env
from tests.support.tools import SLOW
from tests.support.trees import (
    Freeze,
    assert_same_tree,
    delete_subvolumes,
    encode_cycle,
    library_cycle,
    subvolume,
)

NODE = "0123456789abcdef"
NAME = "pg"
SCALE = 1
INTERVAL = 1.0  # seconds between the starts of two cycles
SOURCE_PORT = 5433


def mirror_cycle(obj: tree.TreeObject, target_root: str) -> Freeze:
    """One cycle of the tree mirror through the real library path (``library_cycle``:
    freeze, delta, frames through a socket into the target's apply, merge; cycles a dead
    source froze but did not ship go first).

    The same checks with real daemons cycling every second are in
    tests/test_tree_postgres_daemon.py; this file keeps the library path because it can
    kill the applying process at chosen points (before and after the exchange)."""
    return library_cycle(obj, target_root, NAME)


def target_state(target_root: str) -> dict:
    with open(os.path.join(target_root, f".cyclemirror-tree-{NAME}", "state.json")) as fh:
        return json.load(fh)


@dataclass
class Checked:
    cycle: int
    counter: int
    lower: int


class Rig:
    """The source cluster, its load and counter client, its tree object and the target."""

    def __init__(self, top: str, src_mount: str, tgt_mount: str):
        self.top, self.src_mount, self.tgt_mount = top, src_mount, tgt_mount
        self.client: pg.CounterClient | None = None
        self.load: subprocess.Popen | None = None
        self.freezes: dict[int, Freeze] = {}
        self.last_start = 0.0
        self.checks = 0

    def start(self) -> None:
        top, src_mount, tgt_mount = self.top, self.src_mount, self.tgt_mount
        self.pgdata = subvolume(src_mount, "pgdata")
        # WAL in 1 MiB files: a small first cycle, and more files made, renamed and
        # recycled per cycle than with 16 MiB ones
        pg.initdb(self.pgdata, os.path.join(top, "initdb.log"), "--wal-segsize=1")
        self.server = pg.PgServer(self.pgdata, os.path.join(top, "sock"), SOURCE_PORT,
                                  os.path.join(top, "source.log"))
        self.server.start()
        pg.prepare(self.server, SCALE)
        self.store = os.path.join(top, "store")
        tree.add_tree(self.store, NODE, NAME, self.pgdata)
        self.obj = tree.TreeObject(self.store, NAME)
        self.target_root = os.path.join(tgt_mount, "mirror")
        self.clones = os.path.join(tgt_mount, "clones")
        os.makedirs(self.target_root)
        os.makedirs(self.clones)
        self.client = pg.CounterClient(self.server).start()
        self.restart_load()
        self.client.wait_commits(10)

    def restart_load(self) -> None:
        pg.stop_process(self.load)
        self.load = pg.pgbench_start(self.server, 3600, clients=1)

    def cycle(self) -> Freeze:
        f = mirror_cycle(self.obj, self.target_root)
        self.freezes[f.cycle] = f
        return f

    def paced_cycle(self) -> Freeze:
        """A cycle starting ``INTERVAL`` after the previous one started (or at once if
        that has passed): the repetition a daemon's interval gives."""
        wait = self.last_start + INTERVAL - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.last_start = time.monotonic()
        return self.cycle()

    def check_target(self) -> Checked:
        """Clone the target's tree, recover a second PostgreSQL on the clone, check it."""
        self.checks += 1
        clone = os.path.join(self.clones, f"clone-{self.checks}")
        state = target_state(self.target_root)
        subprocess.run(["btrfs", "subvolume", "snapshot", os.path.join(self.target_root, NAME),
                        clone], check=True, capture_output=True)
        assert target_state(self.target_root) == state, "the target changed while cloned"
        cycle, freeze_time = state["applied_cycle"], state["freeze_time"]
        res, lower = pg.check_clone(clone, os.path.join(self.top, f"check-{self.checks}"),
                                    SOURCE_PORT + self.checks, self.client, cycle,
                                    freeze_time, delete_subvolumes)
        f = self.freezes.get(cycle)
        if f is not None:
            assert f.before <= freeze_time <= f.after
            upper = self.client.sent_by(f.after)
            assert res.counter <= upper, (
                f"the copy of cycle {cycle} holds counter {res.counter}, but no transaction "
                f"past {upper} was sent before its freeze returned")
        return Checked(cycle, res.counter, lower)

    def check_counter_log(self) -> None:
        self.client.check_never_went_back()

    def close(self) -> None:
        if self.client is not None:
            self.client.stop()
        pg.stop_process(self.load)


def clear(mount: str) -> None:
    for entry in os.listdir(mount):
        delete_subvolumes(os.path.join(mount, entry))


@pytest.fixture(scope="module")
def rig():
    pg.skip_unless_postgres()
    from tests.support.loopfs import loopfs_or_skip

    # Not under pytest's tmp_path (mode 0700): the postgres user must reach the data
    top = pg.workdir("cyclemirror-pgtree-")
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
        stack.callback(r.close)
        r.start()
        yield r


def test_clones_of_the_target_recover_with_every_committed_transaction(rig):
    rnd = random.Random(16)
    checked = []
    cycles = 15 if SLOW else 5
    for i in range(cycles):
        rig.paced_cycle()
        if i in (0, cycles - 1) or rnd.random() < 0.25:
            time.sleep(rnd.uniform(0, INTERVAL / 2))
            checked.append(rig.check_target())
    assert checked[0].cycle == 1
    # the load ran: later copies hold more committed transactions
    assert checked[-1].lower > checked[0].lower > 0, checked
    assert rig.load.poll() is None, rig.load.communicate()
    rig.check_counter_log()


def test_kill_9_of_postgres_between_and_during_cycles(rig):
    rnd = random.Random(9)
    rig.paced_cycle()
    acked = rig.client.commits()[-1].value
    killer = threading.Timer(rnd.uniform(0, 0.2), rig.server.kill9)
    killer.start()
    rig.paced_cycle()  # frozen before or after the kill
    killer.join()
    rig.paced_cycle()  # the files of a dead cluster: the copy is as after a power loss
    rig.check_target()
    rig.server.start()  # its own crash recovery
    assert pg.read_counter(rig.server) >= acked
    rig.restart_load()
    rig.client.wait_commits(5)
    rig.paced_cycle()
    after = rig.check_target()
    assert after.lower > acked
    rig.check_counter_log()


def apply_in_child(root: str, frames: str, *failpoints: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.support.tree_apply_child", root, NAME,
                             frames, *failpoints], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env(), text=True)


def pending(root: str):
    return target_state(root).get("pending")


def exchanged(root: str) -> bool:
    """Whether the pending switch is recorded and ROOT/NAME is the stage it names."""
    p = pending(root)
    if p is None:
        return False
    fd = os.open(os.path.join(root, NAME), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return dir_identity(fd) == p["stage_id"]
    finally:
        os.close(fd)


@pytest.mark.parametrize("failpoint, reached, expect", [
    ("receiver.tree_switch=60", lambda r: pending(r) is not None, "previous"),
    ("receiver.tree_switched=60", exchanged, "new"),
    ("receiver.tree_op=0.01", None, None),
], ids=["before-exchange", "after-exchange", "random"])
def test_kill_9_of_the_target_mid_apply(rig, failpoint, reached, expect):
    """A child applies a cycle and is killed: the target holds one freeze instant (the
    previous cycle's before the exchange), a clone of it recovers, and the cycles go on."""
    rnd = random.Random(failpoint)
    before = time.time()
    k = rig.obj.freeze()
    rig.freezes[k] = Freeze(k, before, time.time(), 0)
    data, _ = encode_cycle(rig.obj, k)
    frames = os.path.join(rig.top, f"cycle-{k}.frames")
    with open(frames, "wb") as fh:
        fh.write(data)
    work = os.path.join(rig.target_root, f".cyclemirror-tree-{NAME}")
    proc = apply_in_child(rig.target_root, frames, failpoint)
    try:
        if reached is not None:
            wait_for(lambda: reached(rig.target_root) or proc.poll() is not None, 60,
                     f"the apply of cycle {k} to reach {failpoint}", interval=0.005)
        else:
            wait_for(lambda: os.path.exists(os.path.join(work, f"stage-{k}"))
                     or proc.poll() is not None, 60, "the apply to start", interval=0.005)
            time.sleep(rnd.uniform(0, 0.3))
        finished = proc.poll() is not None
    finally:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    if reached is not None:
        assert not finished, (out, err)
    os.unlink(frames)
    m = TreeMirror(rig.target_root, NAME)  # settles the crash
    try:
        assert m.applied_cycle in (k - 1, k)
        if expect is not None:
            assert m.applied_cycle == (k if expect == "new" else k - 1)
        assert os.listdir(m.work) == ["state.json"]
    finally:
        m.close()
    rig.check_target()
    f = rig.paced_cycle()  # ships cycle k again if the target lacks it, then a new one
    assert target_state(rig.target_root)["applied_cycle"] == f.cycle == k + 1
    rig.check_counter_log()


def test_kill_9_of_the_source_mid_cycle(rig):
    """The source's half of cycles (freeze, delta, frames) killed at a random moment: the
    object's recovery drops what was not committed and the next cycles catch up."""
    rnd = random.Random(23)
    for _ in range(4 if SLOW else 1):
        out = tempfile.mkdtemp(dir=rig.top)
        proc = subprocess.Popen([sys.executable, "-m", "tests.support.tree_source_child",
                                 rig.store, NAME, out, "5"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=child_env(), text=True)
        try:
            line = proc.stdout.readline()
            assert line.strip() == "ready", (line, proc.stderr.read())
            time.sleep(rnd.uniform(0, 0.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
        shutil.rmtree(out)
        rig.obj = tree.TreeObject(rig.store, NAME)  # its crash recovery
        assert all(n.startswith("snap-") for n in rig.obj.snapshot_names())
        f = rig.paced_cycle()
        # byte for byte what the source froze: a range a delta skipped shows here by
        # name (the copy's recovery would only stop early, an older counter)
        assert_same_tree(rig.obj.snapshot_path(f.cycle), os.path.join(rig.target_root, NAME))
        rig.check_target()
    rig.check_counter_log()
