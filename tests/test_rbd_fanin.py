"""Fan-in into one RBD pool: two sources mirror a volume of the same name to one target.

The file backend keeps them apart by directory (``mirrors/<source node
id>/v1.img``); the RBD backend by image name (``<source node id>~v1``).
Proves, with a real ``serve --rbd-pool`` daemon and the one-node cluster:
both sources' cycles, applied alternately and concurrently, land in two
images, each of whose snapshot equals its own source at its freeze (read
through our librbd binding) while the other source's writes go on;
``status`` lists both; ``mirror rm`` of one source's mirror removes only its
image, and the other one keeps mirroring.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading

import pytest

from cyclemirror import keys
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.store import Store
from tests.support.daemons import Daemon, make_key, wait_for

SIZE = 4 << 20
BLOCK = 4096


def _digest(cluster, image: str, snap: str) -> str:
    from cyclemirror.receiver.rbdbackend import connection
    from tests.support.ceph import rbd_config

    img = connection(rbd_config(cluster)).open(image, snap, True)
    try:
        h = hashlib.sha256()
        size = img.size()
        for off in range(0, size, 1 << 20):
            h.update(img.read(off, min(1 << 20, size - off)))
        return h.hexdigest()
    finally:
        img.close()


class Source:
    """One source store with volume ``v1`` (its own data) mirrored to the target."""

    def __init__(self, root, name: str, seed: int, target: Daemon, key_file: str):
        self.store = Store.create(os.path.join(root, name), node_name=name)
        self.vol = self.store.create_volume("v1", SIZE)
        self.rng = random.Random(seed)
        self.vol.write(0, self.rng.randbytes(SIZE))
        self.digests: dict[int, str] = {}
        host, port = target.listen.rsplit(":", 1)
        self.driver = MirrorDriver(self.vol, (host, int(port)), keys.read_key_file(key_file),
                                   MirrorOptions(interval=3600, on_frozen=self._frozen),
                                   store=self.store)
        self.image = f"{self.store.node_id}~v1"

    def _frozen(self, f, reader):
        self.digests[f.number] = hashlib.sha256(reader.read(0, SIZE)).hexdigest()

    def change_and_sync(self) -> int:
        for _ in range(16):
            self.vol.write(self.rng.randrange(SIZE // BLOCK) * BLOCK, self.rng.randbytes(BLOCK))
        return self.driver.sync(120)

    def close(self):
        self.driver.stop()
        self.store.close()


def test_two_sources_with_the_same_volume_name_get_two_images(tmp_path, ceph_cluster):
    try:
        from cyclemirror._cext import rbd  # noqa: F401
    except ImportError:
        pytest.skip("cyclemirror._cext.rbd is not built (install librbd-dev and librados-dev, "
                    "then rebuild: python3 setup.py build_ext --inplace)")
    cluster = ceph_cluster
    key_file = make_key(tmp_path / "mirror.key")
    target = Daemon(tmp_path, "dst", key_file=key_file, listen=True, metrics=False, nbd=False,
                    extra=("--rbd-pool", cluster.pool, "--ceph-conf", cluster.conf,
                           "--ceph-keyring", cluster.keyring)).start()
    a = Source(tmp_path, "site-a", 1, target, key_file)
    b = Source(tmp_path, "site-b", 2, target, key_file)
    try:
        assert a.image != b.image
        a.driver.start()
        b.driver.start()
        last = {}
        for _round in range(3):  # both sources' cycles at the same time
            results, errors = {}, []

            def run(src, out=results, failed=errors):
                try:
                    out[src.image] = src.change_and_sync()
                except Exception as exc:  # noqa: BLE001 - reported below
                    failed.append(exc)

            threads = [threading.Thread(target=run, args=(s,)) for s in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert not errors, errors
            last = results
        assert a.digests[last[a.image]] != b.digests[last[b.image]]
        listed = cluster.run("rbd", "ls", cluster.pool).split()
        assert a.image in listed and b.image in listed
        for src in (a, b):
            cycle = last[src.image]
            expect = [f"cyclemirror-{cycle}"]  # older ones go in the background: wait

            def snaps(image=src.image):
                out = cluster.run("rbd", "snap", "ls", "--format", "json",
                                  f"{cluster.pool}/{image}")
                return [s["name"] for s in json.loads(out)]

            wait_for(lambda expect=expect, snaps=snaps: snaps() == expect, 60,
                     f"only {expect} on {src.image}", interval=0.5)
            assert _digest(cluster, src.image, f"cyclemirror-{cycle}") == src.digests[cycle]
        rows = {r["source_name"]: r for r in target.status()["incoming"]}
        assert set(rows) == {"site-a", "site-b"}
        for src, name in ((a, "site-a"), (b, "site-b")):
            assert rows[name]["volume"] == "v1"
            assert rows[name]["image"] == (f"rbd:{cluster.pool}/{src.image}"
                                           f"@cyclemirror-{last[src.image]}"), rows[name]
        # Removing one source's mirror leaves the other's image, which keeps mirroring.
        a.driver.stop()
        target.cli("mirror", "rm", "site-a/v1", "--force")
        listed = cluster.run("rbd", "ls", cluster.pool).split()
        assert a.image not in listed and b.image in listed
        cycle = b.change_and_sync()
        assert _digest(cluster, b.image, f"cyclemirror-{cycle}") == b.digests[cycle]
        assert [r["source_name"] for r in target.status()["incoming"]] == ["site-b"]
    finally:
        a.close()
        b.close()
        target.stop()
