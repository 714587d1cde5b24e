"""Promote, clone, verify and scrub of RBD mirror images (docs/ceph.md, "Failover").

Proves, on the session's one-node cluster: ``mirror clone`` makes an RBD
clone of the last cycle snapshot (``rbd info`` names that parent) that NBD
clients read and write while cycles keep applying into the mirror image, and
that survives the pruning of its parent snapshot; ``mirror promote`` rolls
the head back to the last cycle snapshot (garbage written into the head
never shows) and renames the image into a read-write NBD volume that keeps
its data over a restart, ``volume rm`` removes it; a target killed -9 between
a promotion's commit point and its end finishes it at restart; verify from
the source finds exactly a block changed in the snapshot behind its back, and
scrub finds it against the digests recorded as cycles applied; an RBD
volume's record in the store that is not in the written format is an
IntegrityError naming it.  The source
is an in-process store and driver, so the test knows each cycle's frozen
image.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest

from cyclemirror import keys
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.sender.driver import TargetSpec
from cyclemirror.sender.verify import VerifyRun
from cyclemirror.store import Store
from tests.support.daemons import Daemon, cli_env, make_key, wait_for
from tests.support.nbd import run
from tests.support.tools import require_tool

SIZE = 4 << 20
BS = 4096


def _need_binding():
    try:
        from cyclemirror._cext import rbd  # noqa: F401
    except ImportError:
        pytest.skip("cyclemirror._cext.rbd is not built (install librbd-dev and librados-dev, "
                    "then rebuild: python3 setup.py build_ext --inplace)")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Rig:
    """A target daemon with ``--rbd-pool`` and an in-process source mirroring v1 into it."""

    def __init__(self, tmp_path, cluster, extra=()):
        self.tmp = tmp_path
        self.cluster = cluster
        self.key_file = make_key(tmp_path / "mirror.key")
        self.flags = ("--rbd-pool", cluster.pool, "--ceph-conf", cluster.conf,
                      "--ceph-keyring", cluster.keyring)
        self.target = Daemon(tmp_path, "dst", key_file=self.key_file, listen=True,
                             metrics=False, extra=(*self.flags, *extra)).start()
        self.store = Store.create(os.path.join(tmp_path, "src"), node_name="srcnode")
        self.node = self.store.node_id
        self.vol = self.store.create_volume("v1", SIZE)
        self.vol.write(0, random.Random(5).randbytes(SIZE))
        self.frozen: dict[int, bytes] = {}
        self.driver = None
        self.start_driver()

    def start_driver(self):
        def frozen(f, reader):
            self.frozen[f.number] = reader.read(0, SIZE)

        host, port = self.target.listen.rsplit(":", 1)
        self.driver = MirrorDriver(self.vol, (host, int(port)),
                                   keys.read_key_file(self.key_file),
                                   MirrorOptions(interval=3600, on_frozen=frozen),
                                   store=self.store)
        self.driver.start()

    def restart_target(self, kill: bool = False):
        """Stop (or kill -9) the target and start it again, without ``extra``."""
        if kill:
            self.target.kill()
        else:
            self.target.stop()
        self.target = Daemon(self.tmp, "dst", key_file=self.key_file, listen=True,
                             metrics=False, extra=self.flags).start()

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.target.nbd_sock}"

    def read(self, export: str) -> bytes:
        return run("nbdcopy", self.uri(export), "-").stdout

    def qemu_io(self, export: str, *commands: str) -> str:
        args = ["qemu-io", "-f", "raw"]
        for c in commands:
            args += ["-c", c]
        out = subprocess.run([*args, self.uri(export)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and "error" not in out.stdout.lower(), out
        return out.stdout

    def verify(self):
        host, port = self.target.listen.rsplit(":", 1)
        spec = TargetSpec(host, int(port), keys.read_key_file(self.key_file))
        return VerifyRun(self.driver.subject, 0, self.store, spec,
                         expect_node=self.target.node_id, merges=self.driver).run()

    def images(self) -> list[str]:
        return self.cluster.run("rbd", "ls", self.cluster.pool).split()

    def close(self):
        if self.driver is not None:
            self.driver.stop()
        self.store.close()
        self.target.stop()


@pytest.fixture
def rig(tmp_path, ceph_cluster):
    _need_binding()
    require_tool("nbdcopy")
    rig = Rig(tmp_path, ceph_cluster)
    try:
        yield rig
    finally:
        rig.close()


def _garbage_into_head(cluster, image: str) -> None:
    """Write over the head (the apply's scratch) behind the target's back."""
    cluster.run("rbd", "bench", "--io-type", "write", "--io-size", "65536", "--io-total", "1M",
                "--io-pattern", "seq", image)


def test_clone_is_an_rbd_clone_served_read_write_while_mirroring_goes_on(rig):
    require_tool("qemu-io")
    clone = f"c-{rig.node[:12]}"  # the pool is the session's: names of this test only
    first = rig.driver.sync(60)
    res = json.loads(rig.target.cli("mirror", "clone", "srcnode/v1", clone, "--json").stdout)
    assert res["cycle"] == first and res["backend"] == "rbd"
    info = json.loads(rig.cluster.run("rbd", "info", "--format", "json",
                                      f"{rig.cluster.pool}/{clone}"))
    assert info["parent"]["image"] == f"{rig.node}~v1"
    assert info["parent"]["snapshot"] == f"cyclemirror-{first}"
    assert _sha(rig.read(clone)) == _sha(rig.frozen[first])
    # written over NBD, read back by a new connection
    rig.qemu_io(clone, "write -P 0x5a 0 64k", "flush")
    want = b"\x5a" * 65536 + rig.frozen[first][65536:]
    assert _sha(rig.read(clone)) == _sha(want)
    # cycles keep applying into the image; its pruning takes the clone's parent snapshot
    for fill in (b"\x11", b"\x22"):
        rig.vol.write(1 << 20, fill * 8192)
        last = rig.driver.sync(60)
        assert _sha(rig.read("mirror/srcnode/v1")) == _sha(rig.frozen[last])

    def snaps():  # pruned in a thread after the apply: wait for it
        return [s["name"] for s in json.loads(rig.cluster.run(
            "rbd", "snap", "ls", "--format", "json", f"{rig.cluster.pool}/{rig.node}~v1"))]

    wait_for(lambda: snaps() == [f"cyclemirror-{last}"], 60, "the pruning of old snapshots")
    assert _sha(rig.read(clone)) == _sha(want)
    listed = json.loads(rig.target.cli("volume", "list", "--json").stdout)
    row = next(v for v in (listed if isinstance(listed, list) else listed["volumes"])
               if v["name"] == clone)
    assert row["image"] == f"rbd:{rig.cluster.pool}/{clone}" and row["kind"] == "clone"
    rig.target.cli("volume", "rm", clone)
    assert clone not in rig.images()
    assert rig.target.cli("volume", "rm", clone, check=False).returncode != 0


def test_promote_rolls_the_head_back_and_serves_a_read_write_volume(rig):
    require_tool("qemu-io")
    p1 = f"p-{rig.node[:12]}"
    rig.driver.sync(60)
    rig.vol.write(0, b"\x33" * 65536)
    last = rig.driver.sync(60)
    rig.driver.stop()
    rig.driver = None
    _garbage_into_head(rig.cluster, f"{rig.cluster.pool}/{rig.node}~v1")
    res = json.loads(rig.target.cli("mirror", "promote", "srcnode/v1", "--as", p1, "--force",
                                    "--json").stdout)
    assert res["cycle"] == last and res["volumes"] == [p1]
    images = rig.images()
    assert p1 in images and f"{rig.node}~v1" not in images
    assert rig.target.status()["incoming"] == []
    assert _sha(rig.read(p1)) == _sha(rig.frozen[last])  # the snapshot, not the garbage
    taken = rig.target.cli("volume", "create", p1, "--size", "1M", check=False)
    assert taken.returncode != 0 and "RBD volume" in taken.stderr, taken
    rig.qemu_io(p1, "write -P 0x7e 8192 4096", "flush")
    want = rig.frozen[last][:8192] + b"\x7e" * 4096 + rig.frozen[last][12288:]
    assert _sha(rig.read(p1)) == _sha(want)
    rig.restart_target()
    assert _sha(rig.read(p1)) == _sha(want)
    # the role record says primary, promoted from the source's mirror
    roles = {r["volume"]: r for r in rig.target.status()["roles"]}
    assert roles[p1]["role"] == "primary"
    assert roles[p1]["promoted_from"]["cycle"] == last
    rig.target.cli("volume", "rm", p1)
    assert p1 not in rig.images()


@pytest.mark.parametrize("failpoint", ["promote.recorded", "promote.adopted"])
def test_a_promotion_killed_after_its_commit_point_is_finished_at_restart(
        tmp_path, ceph_cluster, failpoint):
    _need_binding()
    require_tool("nbdcopy")
    rig = Rig(tmp_path, ceph_cluster, extra=("--failpoint", f"{failpoint}=60"))
    try:
        p2 = f"p-{rig.node[:12]}"
        last = rig.driver.sync(60)
        rig.driver.stop()
        rig.driver = None
        proc = subprocess.Popen(
            [sys.executable, "-m", "cyclemirror.cli", "--store", rig.target.store, "mirror",
             "promote", "srcnode/v1", "--as", p2, "--force"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
        try:
            role = os.path.join(rig.target.store, "roles", f"{p2}.json")
            if failpoint == "promote.recorded":
                wait_for(lambda: os.path.exists(role), 60, "the promotion's role record")
            else:
                record = os.path.join(rig.target.store, "rbd-volumes", f"{p2}.json")
                wait_for(lambda: os.path.exists(record), 60, "the RBD volume record")
            rig.restart_target(kill=True)
        finally:
            proc.wait(60)
        wait_for(lambda: p2 in rig.images(), 60, "the finished promotion")
        assert f"{rig.node}~v1" not in rig.images()
        assert rig.target.status()["incoming"] == []
        assert _sha(rig.read(p2)) == _sha(rig.frozen[last])
        rig.target.cli("volume", "rm", p2)
    finally:
        rig.close()


def _change_first_block_of_snapshot(cluster, image: str, snap: str) -> None:
    """Change block 0 of a cycle snapshot behind the target's back (rot, as a reader
    sees it): write the head there (rbd bench writes from offset 0), then make the
    snapshot anew from the head."""
    pool_image = f"{cluster.pool}/{image}"
    cluster.run("rbd", "snap", "rollback", f"{pool_image}@{snap}")
    cluster.run("rbd", "bench", "--io-type", "write", "--io-size", str(BS), "--io-total",
                str(BS), "--io-pattern", "seq", "--io-threads", "1", pool_image)
    cluster.run("rbd", "snap", "rm", f"{pool_image}@{snap}")
    cluster.run("rbd", "snap", "create", f"{pool_image}@{snap}")


def test_verify_and_scrub_find_a_block_changed_in_the_snapshot(rig):
    first = rig.driver.sync(60)
    # scrub makes a baseline the first time, then its record follows each delta
    base = json.loads(rig.target.cli("mirror", "scrub", "srcnode/v1", "--json").stdout)
    assert base["state"] == "clean" and base["unchecked_blocks"] == SIZE // BS
    rig.vol.write(5 * BS, b"\x44" * BS)
    second = rig.driver.sync(60)
    assert second > first
    clean = json.loads(rig.target.cli("mirror", "scrub", "srcnode/v1", "--json").stdout)
    assert clean["state"] == "clean" and clean["checked_blocks"] == SIZE // BS
    assert clean["cycles"] == [second, second]
    v = rig.verify()
    assert v.mismatched.count() == 0
    _change_first_block_of_snapshot(rig.cluster, f"{rig.node}~v1", f"cyclemirror-{second}")
    rot = rig.target.cli("mirror", "scrub", "srcnode/v1", "--json", check=False)
    assert rot.returncode == 7, rot
    found = json.loads(rot.stdout)
    assert found["state"] == "rot" and found["bad_blocks"] == 1
    assert found["extents"] == [{"offset": 0, "length": BS}]
    v = rig.verify()
    assert [tuple(r) for r in v.mismatched.iter_runs()] == [(0, 1)]


def test_rbd_volume_records_are_checked_when_read(tmp_path):
    """The record of an RBD volume is a file in the store: anything but the format this
    module writes is an IntegrityError naming the file, never a volume."""
    from cyclemirror.errors import IntegrityError
    from cyclemirror.receiver import rbdvolumes

    vol = rbdvolumes.RbdVolume(name="p1", size=SIZE, block_size=BS, pool="pool",
                               namespace=None, kind="clone", source_node="n" * 32,
                               source_name="src", mirror="v1", member="v1", cycle=3,
                               parent="n~v1@cyclemirror-3", time=1.5)
    rbdvolumes.save(tmp_path, vol)
    assert rbdvolumes.names(tmp_path) == ["p1"]
    assert rbdvolumes.load(tmp_path, "p1") == vol
    assert rbdvolumes.load(tmp_path, "p2") is None
    path = rbdvolumes.record_path(tmp_path, "p1")
    good = open(path).read()
    for bad in ("{", "[]", good.replace('"kind": "clone"', '"kind": "copy"'),
                good.replace('"size": 4194304', '"size": -1'),
                good.replace('"name": "p1"', '"name": "p9"'),
                good.replace('"time": 1.5', '"time": 1.5, "extra": 1')):
        with open(path, "w") as f:
            f.write(bad)
        with pytest.raises(IntegrityError, match="p1.json"):
            rbdvolumes.load(tmp_path, "p1")
    with pytest.raises(Exception, match="volume name"):
        rbdvolumes.record_path(tmp_path, "../x")
