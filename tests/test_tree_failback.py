"""Failback of tree mirrors with real daemons: demotion on the old source.

One source daemon (A) and one target daemon (B) for the module, their stores
and trees on a btrfs loop file system.  A tree mirrored A -> B is promoted on
B with ``--force`` (the disaster); A's next cycle is refused, and A must then
record its tree as demoted, stop cycling it (``mirror resume`` refused, no
new freeze, after a restart too) and say so in ``status``.
"""

from __future__ import annotations

import json
import os
import socket

import pytest

from tests.support.daemons import Daemon, make_key, wait_for
from tests.support.trees import delete_subvolumes, subvolume, tree_image

BIG = 1 << 20  # a full copy of the tree ships at least this much


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Env:
    pass


@pytest.fixture(scope="module")
def env(btrfs_mount):
    if os.geteuid() != 0:
        pytest.skip("btrfs snapshots need root")
    root = os.path.join(btrfs_mount, "tree-failback")
    os.makedirs(root)
    e = Env()
    e.root = root
    e.key = make_key(os.path.join(root, "key"))
    e.daemons = []
    try:
        for name in ("a", "b"):
            d = Daemon(root, name, key_file=e.key, nbd=False,
                       extra=("--listen", f"127.0.0.1:{free_port()}")).start()
            e.daemons.append(d)
            setattr(e, name, d)
        e.a_name = e.a.status()["node"]["name"]
        e.b_name = e.b.status()["node"]["name"]
        yield e
    finally:
        d_err = None
        for d in e.daemons:
            try:
                d.stop()
            except AssertionError as exc:
                d_err = exc
                d.kill()
        delete_subvolumes(root)
        if d_err is not None:
            raise d_err


def write(path: str, data: bytes, offset: int | None = None) -> None:
    if offset is None:
        with open(path, "wb") as fh:
            fh.write(data)
        return
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def row(daemon, name: str) -> dict:
    return [r for r in daemon.status()["mirrors"] if r["volume"] == name][0]


def tree_info(daemon, name: str) -> dict | None:
    trees = json.loads(daemon.cli("tree", "list", "--json").stdout)
    return next((t for t in trees if t["name"] == name), None)


def promoted_tree(env, name: str) -> tuple[str, int, dict]:
    """A tree ``name`` on A with a 1 MiB file, mirrored to B, promoted there with --force
    (A's daemon sees its next cycle refused); returns (B's path, cycle k, A's image)."""
    src = subvolume(env.root, f"{name}-a")
    write(os.path.join(src, "big"), os.urandom(BIG))
    os.makedirs(os.path.join(src, "d"))
    write(os.path.join(src, "d", "small"), b"small file\n")
    os.symlink("big", os.path.join(src, "link"))
    env.a.cli("tree", "add", name, src)
    env.a.cli("mirror", "start", name, "--to", env.b.listen, "--interval", "3600")
    env.a.cli("mirror", "sync", name)
    k = row(env.a, name)["applied_cycle"]
    image = tree_image(src)
    dest = os.path.join(env.root, f"{name}-b")
    out = json.loads(env.b.cli("mirror", "promote", f"{env.a_name}/{name}", dest, "--force",
                               "--json").stdout)
    assert out["cycle"] == k and tree_image(dest) == image
    return src, k, image


def test_the_old_source_records_its_tree_demoted_and_stops_cycling_it(env):
    src, k, _image = promoted_tree(env, "app")
    assert tree_info(env.a, "app")["role"] == "primary"

    write(os.path.join(src, "d", "small"), b"written on A after the promotion\n")
    r = env.a.cli("mirror", "sync", "app", "--timeout", "30", check=False)
    assert r.returncode != 0
    info = wait_for(lambda: (lambda t: t if t["role"] == "demoted" else None)(
        tree_info(env.a, "app")), 30, "A to record its tree as demoted")
    assert info["demoted"]["by"] == env.b.listen
    assert "promoted it to tree object 'app'" in info["demoted"]["message"]
    assert f"mirror start app --to {env.a_name}" in info["demoted"]["message"]
    m = row(env.a, "app")
    assert m["phase"] == "broken" and "demoted" in m["last_error"], m
    text = env.a.cli("status").stdout
    assert "tree app is DEMOTED" in text and "fail back" in text
    # It stays stopped: no resume, no sync, no new freeze.
    frozen = info["frozen_cycle"]
    r = env.a.cli("mirror", "resume", "app", check=False)
    assert r.returncode == 10 and "demoted" in r.stderr and "fail back" in r.stderr, r.stderr
    r = env.a.cli("mirror", "sync", "app", "--timeout", "5", check=False)
    assert r.returncode != 0
    assert tree_info(env.a, "app")["frozen_cycle"] == frozen
    # The demotion survives a restart of A's daemon.
    env.a.stop()
    env.a.start()
    assert tree_info(env.a, "app")["role"] == "demoted"
    wait_for(lambda: row(env.a, "app")["phase"] == "broken", 30, "the mirror to stay broken")
    assert "DemotedError" in (row(env.a, "app")["last_error"] or "")
