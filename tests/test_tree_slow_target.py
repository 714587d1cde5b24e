"""A slow target of a tree mirror holds up nobody else: real daemons, a stopped process.

A source daemon mirrors tree object ``app`` (a btrfs subvolume on the session's
loop file system) to two target daemons with a cycle every second.  Then one
target, C, is stopped with SIGSTOP: the kernel still takes its TCP traffic,
the daemon answers nothing (the worst kind of slow: a link or an apply that
takes for ever).  While C is stopped, B keeps getting cycles (its applied cycle
goes on rising, each one exact), ``mirror sync app --to B`` returns with B
holding what was written before it, a ``mirror sync`` without names waits
for C until its deadline and says so, and C's own tree stays the cycle it
held.  Continued, C catches up by itself with one delta over the cycles it
missed (no second full copy), and the snapshots kept for it are merged.
"""

from __future__ import annotations

import json
import os
import re
import signal

import pytest

from cyclemirror import errors
from tests.support.daemons import Daemon, free_port, make_key, wait_for
from tests.support.trees import assert_same_tree, delete_subvolumes, subvolume


@pytest.fixture
def rig(btrfs_mount, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("btrfs snapshots need root")
    # short: the daemons' control sockets live under it (a Unix socket path is < 108
    # bytes, and under xdist the mount's own path is longer)
    root = os.path.join(btrfs_mount, f"slow-{os.getpid()}-{abs(hash(tmp_path.name)) % 10**6}")
    os.makedirs(root)
    key = make_key(os.path.join(root, "key"))
    started = []
    try:
        def daemon(name, listen):
            extra = ("--listen", f"127.0.0.1:{free_port()}") if listen else ()
            d = Daemon(root, name, key_file=key, nbd=False, metrics=False, extra=extra)
            started.append(d)
            return d.start()

        src = subvolume(root, "app")
        yield src, daemon("a", False), daemon("b", True), daemon("c", True)
    finally:
        for d in started:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.send_signal(signal.SIGCONT)  # a stopped daemon cannot take SIGTERM
            try:
                d.stop()
            except AssertionError:
                d.kill()
        delete_subvolumes(root)


def row(a: Daemon, t: Daemon) -> dict:
    (r,) = [m for m in a.status()["mirrors"] if m["volume"] == "app" and m["target"] == t.listen]
    return r


def tree_of(a: Daemon, t: Daemon) -> str:
    return os.path.join(t.store, "mirrors", a.node_id, "trees", "app")


def snapshots(a: Daemon) -> str:
    return json.loads(a.cli("tree", "list", "--json").stdout)[0]["snapshots"]


def write(src: str, name: str, data: bytes) -> None:
    with open(os.path.join(src, name), "wb") as fh:
        fh.write(data)


def test_a_stopped_target_holds_up_neither_the_other_target_nor_its_sync(rig):
    src, a, b, c = rig
    write(src, "base", os.urandom(200_000))
    a.cli("tree", "add", "app", src)
    a.cli("mirror", "start", "app", "--to", b.listen, "--interval", "1")
    a.cli("mirror", "start", "app", "--to", c.listen)
    a.cli("mirror", "sync", "app", "--timeout", "60")
    snaps = snapshots(a)
    held_c = row(a, c)["applied_cycle"]
    c_tree = tree_of(a, c)
    assert_same_tree(os.path.join(snaps, f"snap-{held_c}"), c_tree)

    c.proc.send_signal(signal.SIGSTOP)
    try:
        # B goes on cycling at its interval: several cycles applied while C is stopped,
        # each the source's snapshot exactly (kept: C still holds an older cycle).
        for n in range(2):
            write(src, f"while-c-stops-{n}", os.urandom(5000 + n))
            (rb,) = json.loads(a.cli("mirror", "sync", "app", "--to", b.listen,
                                     "--timeout", "30", "--json").stdout)
            assert rb["target"] == b.listen and rb["synced"] is True, rb
            k = rb["applied_cycle"]
            assert k > held_c
            got = wait_for(lambda k=k: row(a, b)["applied_cycle"] >= k + 2, 30,
                           "B to get cycles at its interval while C is stopped")
            assert got
            # nothing was written since the sync: every later cycle is the same tree
            assert_same_tree(os.path.join(snaps, f"snap-{k}"), tree_of(a, b))
        assert row(a, c)["applied_cycle"] == held_c
        assert_same_tree(os.path.join(snaps, f"snap-{held_c}"), c_tree)
        # Without names, every target not broken is waited for: C until the deadline.
        late = a.cli("mirror", "sync", "app", "--timeout", "2", check=False)
        assert late.returncode == errors.DeadlineError.exit_code, late.stderr
        assert c.listen in late.stderr and "not applied" in late.stderr, late.stderr
    finally:
        c.proc.send_signal(signal.SIGCONT)

    # C back: it catches up by itself (one delta over what it missed, no full copy).
    (rc,) = json.loads(a.cli("mirror", "sync", "app", "--to", c.listen, "--timeout", "60",
                             "--json").stdout)
    assert rc["synced"] is True and rc["applied_cycle"] > held_c
    assert rc["last_cycle"]["full"] is False, rc
    assert_same_tree(os.path.join(snaps, f"snap-{rc['applied_cycle']}"), c_tree)
    fulls = re.findall(rf"mirror app -> {re.escape(c.listen)}: cycle \d+ applied.*full copy",
                       a.log())
    assert len(fulls) == 1, a.log()[-3000:]
    # the snapshots kept for C are merged once it holds a newer cycle
    wait_for(lambda: len(os.listdir(snaps)) <= 3, 30,
             f"the snapshots kept for C to be merged ({sorted(os.listdir(snaps))})")
