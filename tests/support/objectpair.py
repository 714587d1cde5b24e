"""Two daemons, ``a`` and ``b``, on a directory of the session's btrfs: the pair the
disaster-recovery tests of trees and file objects share.

``daemon_pair`` starts them (each listening on loopback with the pair's key,
``b`` serving NBD: a promoted file object is a volume there), yields an object
with ``root``, ``key``, ``a``, ``b``, ``a_name``, ``b_name`` and ``daemons``,
and stops them afterwards (killing one that does not stop, and failing then),
deleting the subvolumes left under ``root``.  The small helpers read and write
whole files and look up status rows.
"""

from __future__ import annotations

import contextlib
import json
import os

from tests.support.daemons import Daemon, free_port, make_key
from tests.support.trees import delete_subvolumes


class Pair:
    pass


@contextlib.contextmanager
def daemon_pair(btrfs_mount: str, dirname: str):
    root = os.path.join(btrfs_mount, dirname)
    os.makedirs(root)
    e = Pair()
    e.root = root
    e.key = make_key(os.path.join(root, "key"))
    e.daemons = []
    try:
        for name in ("a", "b"):
            d = Daemon(root, name, key_file=e.key, nbd=name == "b",
                       extra=("--listen", f"127.0.0.1:{free_port()}")).start()
            e.daemons.append(d)
            setattr(e, name, d)
        e.a_name = e.a.status()["node"]["name"]
        e.b_name = e.b.status()["node"]["name"]
        yield e
    finally:
        err = None
        for d in e.daemons:
            try:
                d.stop()
            except AssertionError as exc:
                err = exc
                d.kill()
        delete_subvolumes(root)
        if err is not None:
            raise err


def write(path: str, data: bytes, offset: int | None = None) -> None:
    """Write ``data`` durably: the whole file, or at ``offset`` into it."""
    with open(path, "wb" if offset is None else "r+b") as fh:
        if offset is not None:
            fh.seek(offset)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def row(daemon, name: str) -> dict:
    """``daemon``'s (first) outgoing mirror row of object ``name``."""
    return [r for r in daemon.status()["mirrors"] if r["volume"] == name][0]


def tree_info(daemon, name: str) -> dict | None:
    trees = json.loads(daemon.cli("tree", "list", "--json").stdout)
    return next((t for t in trees if t["name"] == name), None)
