"""A ``cyclemirror serve --rbd-pool`` target daemon, driven as an administrator would.

Proves: the serve flags reach the target (images land in the pool); the
read-only NBD export of a mirror image reads the last cycle's snapshot, and a
connection keeps reading the cycle it opened while a newer one is applied
(the head holds garbage meanwhile, and the export never shows it); ``status
--json`` names pool/image@snapshot; ``mirror rm`` removes the images from the
pool.  The source is an in-process store and driver, so the test knows each
cycle's frozen image.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest

from cyclemirror import keys
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.store import Store
from tests.support import nbd_rawclient as C
from tests.support.daemons import Daemon, make_key
from tests.support.nbd import run
from tests.support.tools import require_tool

SIZE = 4 << 20
EXPORT = "mirror/srcnode/v1"


@pytest.fixture
def rig(tmp_path, ceph_cluster):
    try:
        from cyclemirror._cext import rbd  # noqa: F401
    except ImportError:
        pytest.skip("cyclemirror._cext.rbd is not built (install librbd-dev and librados-dev, "
                    "then rebuild: python3 setup.py build_ext --inplace)")
    key_file = make_key(tmp_path / "mirror.key")
    target = Daemon(tmp_path, "dst", key_file=key_file, listen=True, metrics=False,
                    extra=("--rbd-pool", ceph_cluster.pool, "--ceph-conf", ceph_cluster.conf,
                           "--ceph-keyring", ceph_cluster.keyring)).start()
    store = Store.create(os.path.join(tmp_path, "src"), node_name="srcnode")
    vol = store.create_volume("v1", SIZE)
    vol.write(0, random.Random(3).randbytes(SIZE))
    digests: dict[int, str] = {}

    def frozen(f, reader):
        digests[f.number] = hashlib.sha256(reader.read(0, SIZE)).hexdigest()

    host, port = target.listen.rsplit(":", 1)
    driver = MirrorDriver(vol, (host, int(port)), keys.read_key_file(key_file),
                          MirrorOptions(interval=3600, on_frozen=frozen), store=store)
    driver.start()
    try:
        yield target, vol, driver, digests, ceph_cluster, store.node_id
    finally:
        driver.stop()
        store.close()
        target.stop()  # the images stay: named by the node id, gone with the cluster


def _read_all(sock) -> bytes:
    reader = C.ReplyReader(sock, True)
    out = []
    for handle, off in enumerate(range(0, SIZE, 1 << 20), start=1):
        reader.expect_read(handle, off, 1 << 20)
        sock.sendall(C.request(C.CMD_READ, off, 1 << 20, handle=handle))
        reply = reader.next()
        assert reply.error == 0
        out.append(reply.data)
    return b"".join(out)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_nbd_export_reads_the_last_snapshot_and_status_names_it(rig):
    target, vol, driver, digests, cluster, node = rig
    require_tool("nbdcopy")
    first = driver.sync(60)
    image = f"{cluster.pool}/{node}~v1"
    listed = cluster.run("rbd", "ls", cluster.pool).split()
    assert f"{node}~v1" in listed
    uri = f"nbd+unix:///{EXPORT}?socket={target.nbd_sock}"
    assert _sha(run("nbdcopy", uri, "-").stdout) == digests[first]
    # A connection opened now keeps this cycle while the next is applied ...
    sock = C.connect_unix(target.nbd_sock)
    try:
        C.open_export(sock, EXPORT, structured=True, allocation=False)
        vol.write(0, b"\x55" * (1 << 20))
        second = driver.sync(60)
        assert second > first and digests[second] != digests[first]
        # ... and garbage in the head (where applies write) is never exported.
        cluster.run("rbd", "bench", "--io-type", "write", "--io-size", "65536",
                    "--io-total", "1M", "--io-pattern", "seq", image)
        assert _sha(_read_all(sock)) == digests[first]
        sock.sendall(C.request(C.CMD_DISC))
    finally:
        sock.close()
    assert _sha(run("nbdcopy", uri, "-").stdout) == digests[second]
    (row,) = target.status()["incoming"]
    assert row["image"] == f"rbd:{image}@cyclemirror-{second}", row
    assert row["applied_cycle"] == second
    snaps = json.loads(cluster.run("rbd", "snap", "ls", "--format", "json", image))
    assert f"cyclemirror-{second}" in [s["name"] for s in snaps]


def test_mirror_rm_removes_the_images_from_the_pool(rig):
    target, _vol, driver, _digests, cluster, node = rig
    driver.sync(60)
    assert f"{node}~v1" in cluster.run("rbd", "ls", cluster.pool).split()
    driver.stop()
    target.cli("mirror", "rm", "srcnode/v1", "--force")
    assert f"{node}~v1" not in cluster.run("rbd", "ls", cluster.pool).split()
    assert target.status()["incoming"] == []
