"""TreeDriver in this process against targets that are not there, on a real btrfs.

What the daemon tests cannot show cheaply: while every target is down, the
driver retries with backoff and makes no new snapshot at each interval (they
would be kept for nobody), and a ``mirror sync`` then names why it cannot
finish.  A real store, a real subvolume, a real refused connection.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from cyclemirror.errors import DeadlineError
from cyclemirror.sender.driver import MirrorOptions, TargetSpec
from cyclemirror.sender.treedriver import TreeDriver
from cyclemirror.store.store import Store
from tests.support.daemons import wait_for
from tests.support.trees import delete_subvolumes, subvolume


@pytest.fixture
def tree_store(btrfs_mount, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("btrfs snapshots need root")
    area = os.path.join(btrfs_mount, "driver-" + tmp_path.name)
    os.makedirs(area)
    src = subvolume(area)
    with open(os.path.join(src, "f"), "wb") as fh:
        fh.write(b"data" * 1000)
    store = Store.create(str(tmp_path / "store"))
    try:
        yield store, store.add_tree("t", src)
    finally:
        store.close()
        delete_subvolumes(area)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once it is closed


def test_no_snapshot_piles_up_while_every_target_is_down(tree_store):
    store, obj = tree_store
    label_port = closed_port()
    driver = TreeDriver(obj, [TargetSpec("127.0.0.1", label_port, b"k" * 32)],
                        MirrorOptions(interval=0.02, retry_initial=0.05, retry_max=0.1),
                        store=store)
    driver.start()
    try:
        def retrying():
            t = driver.status()["targets"][f"127.0.0.1:{label_port}"]
            return t["phase"] == "reconnecting" and "ConnectionLostError" in (
                t["last_error"] or "")

        wait_for(retrying, 30, "the driver to retry the target")
        time.sleep(1.0)  # 50 intervals: without the rule, 50 snapshots
        assert obj.frozen_cycle == 1 and obj.snapshot_names() == ["snap-1"]
        with pytest.raises(DeadlineError, match="cannot connect"):
            driver.sync_targets(timeout=1.0)
        assert obj.frozen_cycle == 2  # a sync still freezes
        row = driver.status()
        assert row["kind"] == "tree" and row["targets"][f"127.0.0.1:{label_port}"][
            "applied_cycle"] == 0
    finally:
        driver.stop()


def test_a_freeze_that_fails_stops_the_mirror_and_says_why(tree_store):
    """A failure outside any one target (here the tree's subvolume is gone, so its
    freeze fails) shows in status as a broken mirror naming the error, and the driver's
    loop lives on to be stopped."""
    store, obj = tree_store
    subprocess.run(["btrfs", "subvolume", "delete", obj.path], check=True,
                   capture_output=True)
    driver = TreeDriver(obj, [TargetSpec("127.0.0.1", closed_port(), b"k" * 32)],
                        MirrorOptions(interval=0.02, retry_initial=0.05, retry_max=0.1),
                        store=store)
    driver.start()
    try:
        row = wait_for(lambda: (lambda r: r if r["phase"] == "broken" else None)(
            driver.status()), 30, "the mirror to show the failed freeze")
        assert row["last_error"], row
        assert driver._thread.is_alive()
    finally:
        driver.stop()
