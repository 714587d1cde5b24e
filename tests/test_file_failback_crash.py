"""kill -9 inside a file object's failback on the old source, with real daemons.

A file object mirrored A -> B is promoted on B (a volume there), both sides
write, B names A the loser and mirrors the volume back to A, which turns its
file object into B's mirror image (``receiver/filefailback.py``).  A's daemon
is killed with SIGKILL while it sleeps at each failpoint of that failback in
turn (before its commit point, after it, after the image, after the rename,
after the removal), once also while the start that finishes it sleeps, and at
random instants without a failpoint.  After each restart A must be either
untouched (no intent: the file object, its live file as A left it, no image)
or failed back whole (the image of the promoted cycle with its state, the
live file kept whole beside its path and listed in the role record, no file
object); B's mirror, resumed, must then finish the failback if it had not
begun and ship only its own writes, and A's image must end equal to B's
volume, the kept file still A's file.  Every scenario uses a file object of
its own, on the session's btrfs loop file system.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import subprocess
import time

import pytest

from tests.support.daemons import Daemon, cli_env, wait_for
from tests.support.nbd import run
from tests.support.objectpair import daemon_pair, read, row, write

SIZE = 256 << 10
B_OFFSET, B_LEN = 65536, 8192
FAILPOINT_SECONDS = 60


@pytest.fixture(scope="module")
def env(btrfs_mount):
    if os.geteuid() != 0:
        pytest.skip("file objects on btrfs need reflinks; the test daemons run as root")
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io (qemu-utils) is missing: it writes the promoted volume over NBD")
    with daemon_pair(btrfs_mount, "file-failback-crash") as e:
        yield e


class Case:
    """One file object, promoted on B and written on both sides, ready to fail back."""

    def __init__(self, env, name: str):
        self.name = name
        self.live = os.path.join(env.root, f"{name}.img")
        write(self.live, os.urandom(SIZE))
        env.a.cli("file", "add", name, self.live)
        env.a.cli("mirror", "start", name, "--to", env.b.listen, "--interval", "3600")
        env.a.cli("mirror", "sync", name)
        self.k = row(env.a, name)["applied_cycle"]
        self.image_k = read(self.live)
        env.b.cli("mirror", "promote", f"{env.a.node_id}/{name}", "--force")
        write(self.live, os.urandom(4096), offset=0)  # A's divergent write
        self.a_live = read(self.live)
        b_new = os.urandom(B_LEN)
        data = os.path.join(env.root, f"{name}-b-new")
        write(data, b_new)
        run("qemu-io", "-f", "raw", "-c", f"write -s {data} {B_OFFSET} {B_LEN}", "-c", "flush",
            f"nbd+unix:///{name}?socket={env.b.nbd_sock}")
        self.expected = self.image_k[:B_OFFSET] + b_new + self.image_k[B_OFFSET + B_LEN:]
        env.b.cli("mirror", "resolve", name, "--discard-changes-on", env.a.node_id)
        self.intent = os.path.join(env.a.store, "filefailback", f"{env.b.node_id}.{name}.json")
        self.state = os.path.join(env.a.store, "mirrors", env.b.node_id, f"{name}.state.json")
        self.image = os.path.join(env.a.store, "mirrors", env.b.node_id, f"{name}.img")
        self.record = os.path.join(env.a.store, "files", f"{name}.json")

    def kept(self) -> list[str]:
        return glob.glob(f"{self.live}.kept-{self.k}-*")

    def role(self, env) -> dict:
        with open(os.path.join(env.a.store, "roles", f"{self.name}.json")) as fh:
            return json.load(fh)["body"]

    def reached(self, env, failpoint: str) -> bool:
        """Whether A provably sleeps in ``failpoint`` (from its log and its disk)."""
        assert env.a.proc.poll() is None, env.a.log()
        intent = os.path.exists(self.intent)
        if failpoint == "filefailback.checked":
            return (f"failback of file object {self.name} from" in env.a.log()
                    and "checked; recording its intent" in env.a.log() and not intent)
        if not intent:
            return False
        state, kept, record = (os.path.exists(self.state), bool(self.kept()),
                               os.path.exists(self.record))
        return {"filefailback.recorded": not state and not kept,
                "filefailback.imaged": state and not kept and record,
                "filefailback.kept": state and kept and record,
                "filefailback.removed": state and kept and not record}[failpoint]

    def untouched(self, env) -> bool:
        return (not os.path.exists(self.intent) and os.path.exists(self.record)
                and read(self.live) == self.a_live and not os.path.exists(self.state)
                and not self.kept())

    def failed_back(self, env) -> bool:
        kept = self.kept()
        role = self.role(env)
        return (not os.path.exists(self.intent) and not os.path.exists(self.record)
                and os.path.exists(self.state) and not os.path.lexists(self.live)
                and len(kept) == 1 and read(kept[0]) == self.a_live
                and role["role"] == "secondary"
                and [kp["path"] for kp in role["kept"]] == kept
                and role["kept"][0]["bytes"] == 4096)

    def ends_right(self, env) -> None:
        """B resumed (the failback done or finished now): the image is B's volume, only
        B's writes crossed the wire, the kept file is A's file."""
        env.b.cli("mirror", "resume", self.name)
        env.b.cli("mirror", "sync", self.name, "--timeout", "60")
        assert read(self.image) == self.expected
        assert self.failed_back(env), (self.kept(), self.role(env))
        m = row(env.b, self.name)
        assert m["last_cycle"]["full"] is False, m
        assert m["shipped_bytes_total"] < B_LEN + 16384, m


def set_failpoint(d: Daemon, failpoint: str | None) -> None:
    if "--failpoint" in d.args:
        i = d.args.index("--failpoint")
        del d.args[i:i + 2]
    if failpoint is not None:
        d.args += ["--failpoint", f"{failpoint}={FAILPOINT_SECONDS}"]


def spawn(d: Daemon) -> None:
    """Start the daemon without waiting for its control socket: a start that finishes a
    failback sleeps at the failpoint before it serves anything."""
    with open(d.log_path, "a") as log:
        d.proc = subprocess.Popen([*d.prefix, *d.command, "--store", d.store, "serve",
                                   *d.args], stdout=log, stderr=subprocess.STDOUT,
                                  env=d.env or cli_env())


def killed_in_failback(env, case: Case, failpoint: str | None, delay: float = 0.0) -> None:
    """Restart A (with ``failpoint``), start B's mirror back, kill -9 A inside the
    failpoint (or ``delay`` seconds after the start), then hold B's mirror off."""
    env.a.stop()
    set_failpoint(env.a, failpoint)
    try:
        env.a.start()
    finally:
        set_failpoint(env.a, None)
    env.b.cli("mirror", "start", case.name, "--to", env.a.listen, "--interval", "3600")
    if failpoint is not None:
        wait_for(lambda: case.reached(env, failpoint), FAILPOINT_SECONDS / 2,
                 f"A to sleep in {failpoint}")
    else:
        time.sleep(delay)
    env.a.kill()
    env.b.cli("mirror", "break", case.name, "--now")


@pytest.mark.parametrize("failpoint", ["filefailback.checked", "filefailback.imaged",
                                       "filefailback.kept", "filefailback.removed"])
def test_kill_9_at_a_step_of_a_file_objects_failback(env, failpoint):
    case = Case(env, failpoint.split(".")[1])
    killed_in_failback(env, case, failpoint)
    env.a.start()
    if failpoint == "filefailback.checked":  # before the commit point nothing changed
        assert case.untouched(env)
    else:  # the start finished it, before it served the new primary
        assert case.failed_back(env), (case.kept(), case.role(env))
        assert f"finished the failback of file object {case.name}" in env.a.log()
    case.ends_right(env)


def test_kill_9_after_the_commit_point_and_again_in_the_start_that_finishes_it(env):
    case = Case(env, "twice")
    killed_in_failback(env, case, "filefailback.recorded")
    assert os.path.exists(case.intent) and not os.path.exists(case.state)
    for failpoint in ("filefailback.imaged", "filefailback.kept"):
        set_failpoint(env.a, failpoint)
        spawn(env.a)
        wait_for(lambda fp=failpoint: case.reached(env, fp), FAILPOINT_SECONDS / 2,
                 f"A's start to sleep in {failpoint}")
        env.a.kill()
    set_failpoint(env.a, None)
    env.a.start()
    assert case.failed_back(env), (case.kept(), case.role(env))
    case.ends_right(env)


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_at_a_random_instant_of_a_file_objects_failback(env, seed):
    case = Case(env, f"random{seed}")
    killed_in_failback(env, case, None, delay=random.Random(seed).uniform(0.0, 0.4))
    env.a.start()
    assert case.untouched(env) or case.failed_back(env), (case.kept(), case.role(env))
    case.ends_right(env)
