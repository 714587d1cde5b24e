"""Disaster recovery of tree mirrors on the target: clone (and promote) while cycles go on.

Real daemons (``cyclemirror serve``) with their stores on a btrfs loop file
system, one source and one target for the module, a tree object mirrored by
``mirror sync``.  ``mirror clone SOURCE/TREE PATH`` must give a writable tree
equal to the source's snapshot of the target's last applied cycle, whose
writes never reach the mirror, while the mirror keeps cycling; every bad
input is refused with its exit code and nothing is made.  ``mirror promote
SOURCE/TREE PATH`` is refused while the source is connected, then with
``--force`` makes the last cycle a live tree object of the target, and the
old source's next cycle is refused as demoted, and the promoted tree is
mirrored on to a third daemon; a promotion cut by kill -9 of
the target daemon is finished by running it again.  In-process, a
cycle switched in while the clone is being copied makes the clone take its
copy again (``receiver.treeclone``), never a mix of two cycles.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.support.daemons import Daemon, free_port, make_key, wait_for
from tests.support.trees import assert_same_tree, delete_subvolumes, subvolume, tree_image


class Env:
    pass


@pytest.fixture(scope="module")
def env(btrfs_mount):
    if os.geteuid() != 0:
        pytest.skip("btrfs snapshots need root")
    root = os.path.join(btrfs_mount, "tree-dr")
    os.makedirs(root)
    e = Env()
    e.root = root
    e.key = make_key(os.path.join(root, "key"))
    e.src = subvolume(root, "app")
    e.daemons = []
    try:
        e.a = Daemon(root, "a", key_file=e.key, nbd=False).start()
        e.daemons.append(e.a)
        e.b = Daemon(root, "b", key_file=e.key, nbd=False,
                     extra=("--listen", f"127.0.0.1:{free_port()}")).start()
        e.daemons.append(e.b)
        e.a.cli("tree", "add", "app", e.src)
        e.a_name = e.a.status()["node"]["name"]
        write(os.path.join(e.src, "one"), b"first version\n")
        os.makedirs(os.path.join(e.src, "d", "e"))
        write(os.path.join(e.src, "d", "e", "f"), os.urandom(70000))
        os.symlink("../one", os.path.join(e.src, "d", "link"))
        e.a.cli("mirror", "start", "app", "--to", e.b.listen, "--interval", "3600")
        e.snapshots = json.loads(e.a.cli("tree", "list", "--json").stdout)[0]["snapshots"]
        e.clones = os.path.join(root, "clones")
        os.makedirs(e.clones)
        yield e
    finally:
        for d in e.daemons:
            try:
                d.stop()
            except AssertionError:
                d.kill()
        delete_subvolumes(root)


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def sync(env) -> int:
    env.a.cli("mirror", "sync", "app")
    rows = [r for r in env.a.status()["mirrors"] if r["volume"] == "app"]
    return rows[0]["applied_cycle"]


def mirror_path(env) -> str:
    return os.path.join(env.b.store, "mirrors", env.a.node_id, "trees", "app")


def snap(env, k: int) -> str:
    return os.path.join(env.snapshots, f"snap-{k}")


def test_clone_is_the_last_cycle_writable_and_apart_from_the_mirror(env):
    k = sync(env)
    dest = os.path.join(env.clones, "c1")
    out = json.loads(env.b.cli("mirror", "clone", f"{env.a_name}/app", dest, "--json").stdout)
    assert out["kind"] == "tree" and out["cycle"] == k and out["path"] == dest
    assert out["how"] == "snapshot" and out["subvolume"] is True
    assert_same_tree(snap(env, k), dest)
    # By node id too, with the human line.
    dest2 = os.path.join(env.clones, "c2")
    line = env.b.cli("mirror", "clone", f"{env.a.node_id}/app", dest2).stdout
    assert f"at cycle {k} to {dest2}" in line
    assert_same_tree(snap(env, k), dest2)
    image_k = tree_image(snap(env, k))  # the source merges snap-k away after the next cycle

    # Writes to the clone never reach the mirror; the mirror keeps cycling.
    before = tree_image(mirror_path(env))
    write(os.path.join(dest, "one"), b"written in the clone\n")
    os.unlink(os.path.join(dest, "d", "e", "f"))
    assert tree_image(mirror_path(env)) == before
    write(os.path.join(env.src, "one"), b"second version\n")
    write(os.path.join(env.src, "new"), b"new file\n")
    k2 = sync(env)
    assert k2 == k + 1
    assert_same_tree(snap(env, k2), mirror_path(env))
    assert tree_image(dest2) == image_k  # the other clone did not move with it
    with open(os.path.join(dest, "one"), "rb") as fh:
        assert fh.read() == b"written in the clone\n"


def test_clone_refusals_change_nothing(env):
    sync(env)
    taken = os.path.join(env.clones, "taken")
    os.mkdir(taken)
    listing = sorted(os.listdir(env.clones))
    store_listing = sorted(os.listdir(os.path.dirname(mirror_path(env))))
    cases = [
        (("mirror", "clone", f"{env.a_name}/nosuch", os.path.join(env.clones, "x")), 3, "no tree mirror"),
        (("mirror", "clone", "nobody/app", os.path.join(env.clones, "x")), 3, "no tree mirror"),
        (("mirror", "clone", f"{env.a_name}/app", taken), 4, "already exists"),
        (("mirror", "clone", f"{env.a_name}/app", os.path.join(env.clones, "no", "such")), 2,
         "does not exist"),
        (("mirror", "clone", f"{env.a_name}/app", os.path.join(env.b.store, "inside")), 2,
         "inside this daemon's store"),
        (("mirror", "clone", f"{env.a_name}/app", os.path.join(env.clones, ".cyclemirror-x")), 2,
         "not a usable name"),
        (("mirror", "clone", f"{env.a_name}/app", "plainname"), 2, "is a tree mirror"),
        (("mirror", "clone", f"{env.a_name}/app", "rel/x"), 2, "nor an absolute path"),
        (("mirror", "clone", "app", os.path.join(env.clones, "x")), 2, "SOURCE/VOLUME"),
    ]
    for args, code, text in cases:
        r = env.b.cli(*args, check=False)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert text in r.stderr, (args, r.stderr)
        assert r.stderr.count("\n") == 1, r.stderr
    assert sorted(os.listdir(env.clones)) == listing
    assert sorted(os.listdir(os.path.dirname(mirror_path(env)))) == store_listing
    assert not os.path.exists(os.path.join(env.b.store, "inside"))
    assert "plainname" not in [v["name"] for v in env.b.status().get("volumes", [])]


def test_a_cycle_switched_in_during_the_copy_is_taken_again(btrfs_mount, tmp_path):
    """In-process: the hook lands a real cycle between the copy and the second look at
    the record; the clone must then be the newer cycle exactly (both on btrfs, by
    snapshot, and into a directory of another file system, by copy, where there is one)."""
    if os.geteuid() != 0:
        pytest.skip("btrfs snapshots need root")
    from cyclemirror.receiver.treeclone import clone_tree
    from cyclemirror.receiver.treeops import TreeMirror
    from cyclemirror.receiver.treesession import trees_root
    from cyclemirror.store import cowfs, tree
    from tests.support.trees import ship

    area = os.path.join(btrfs_mount, "dr-" + tmp_path.name)
    os.makedirs(area)
    try:
        src = subvolume(area)
        store = os.path.join(area, "store")
        node = "0123456789abcdef"
        tree.add_tree(os.path.join(area, "srcstore"), "fedcba9876543210", "t", src)
        obj = tree.TreeObject(os.path.join(area, "srcstore"), "t")
        root = trees_root(store, node)
        os.makedirs(root)
        mirror = TreeMirror(root, "t")
        write(os.path.join(src, "a"), b"one")
        ship(obj, obj.freeze(), mirror)
        dests = [os.path.join(area, "clone-btrfs")]
        if cowfs.filesystem_of(str(tmp_path)) != "btrfs":
            dests.append(str(tmp_path / "clone-copy"))
        for dest in dests:
            seen = []

            def next_cycle(attempt, seen=seen, dest=dest):
                seen.append(attempt)
                if attempt == 0:
                    write(os.path.join(src, "a"), f"cycle for {dest}".encode())
                    write(os.path.join(src, dest.replace("/", "_")), b"x" * 5000)
                    ship(obj, obj.freeze(), mirror)

            out = clone_tree(store, node, "t", dest, on_copied=next_cycle)
            assert seen == [0, 1]
            assert out["cycle"] == mirror.applied_cycle
            assert out["how"] == ("snapshot" if dest == dests[0] else "copy")
            assert_same_tree(obj.snapshot_path(mirror.applied_cycle), dest)
            assert not [e for e in os.listdir(os.path.dirname(dest))
                        if e.startswith(".cyclemirror-clone-")]
        mirror.close()
    finally:
        delete_subvolumes(area)


def test_promote_makes_a_live_tree_object_and_demotes_the_source(env, tmp_path):
    from cyclemirror.store import cowfs

    write(os.path.join(env.src, "one"), b"before the disaster\n")
    k = sync(env)
    image_k = tree_image(snap(env, k))
    me = f"{env.a_name}/app"
    dest = os.path.join(env.root, "promoted")
    taken = subvolume(env.root, "taken-tree")
    env.b.cli("tree", "add", "taken", taken)
    trees_before = sorted(t["name"] for t in json.loads(env.b.cli("tree", "list",
                                                                  "--json").stdout))
    refusals = [
        (("mirror", "promote", f"{env.a_name}/nosuch", dest), 3, "no tree mirror"),
        (("mirror", "promote", me), 2, "is a tree mirror: name the path"),
        (("mirror", "promote", me, taken), 4, "already exists"),
        (("mirror", "promote", me, dest, "--as", "taken"), 4, "already an object"),
        (("mirror", "promote", me, dest, "--as", "bad/name"), 2, ""),
        (("mirror", "promote", me, os.path.join(env.b.store, "p")), 2, "inside this daemon"),
    ]
    if cowfs.filesystem_of(str(tmp_path)) != "btrfs":
        refusals.append((("mirror", "promote", me, str(tmp_path / "p")), 2, "not on btrfs"))
    for args, code, text in refusals:
        r = env.b.cli(*args, check=False)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert text in r.stderr, (args, r.stderr)
        assert not os.path.lexists(dest)
    # The source is connected (it keeps its connection between cycles): refused without
    # --force, nothing changed.
    r = env.b.cli("mirror", "promote", me, dest, check=False)
    assert r.returncode == 10, r.stderr
    assert "connected" in r.stderr and "--force" in r.stderr
    assert not os.path.lexists(dest)
    assert sorted(t["name"] for t in json.loads(env.b.cli("tree", "list", "--json").stdout)) \
        == trees_before
    assert not [e for e in os.listdir(env.root) if e.startswith(".cyclemirror-clone-")]

    out = json.loads(env.b.cli("mirror", "promote", me, dest, "--force", "--json").stdout)
    assert out["kind"] == "tree" and out["tree"] == "app" and out["path"] == dest
    assert out["cycle"] == k and out["resumed"] is False and out["forced"] is True
    assert tree_image(dest) == image_k
    listed = {t["name"]: t for t in json.loads(env.b.cli("tree", "list", "--json").stdout)}
    assert listed["app"]["path"] == dest  # a tree object of b now: it can be mirrored on
    write(os.path.join(dest, "one"), b"the new primary writes\n")  # live and writable
    row = [t for t in env.b.status()["incoming_trees"] if t["tree"] == "app"][0]
    assert row["promoted"]["path"] == dest and row["promoted"]["cycle"] == k
    # The same promotion again answers it; another one is refused.
    again = json.loads(env.b.cli("mirror", "promote", me, dest, "--json").stdout)
    assert again["resumed"] is True and again["cycle"] == k
    r = env.b.cli("mirror", "promote", me, os.path.join(env.root, "other"), check=False)
    assert r.returncode == 10 and "promoted already" in r.stderr

    # The old source is refused as demoted when it mirrors again: its target breaks.
    mirror_before = tree_image(os.path.join(env.b.store, "mirrors", env.a.node_id, "trees",
                                            "app"))
    write(os.path.join(env.src, "one"), b"after the promotion\n")
    env.a.cli("mirror", "sync", "app", "--timeout", "30", check=False)
    wait_for(lambda: any(r["phase"] == "broken" for r in env.a.status()["mirrors"]
                         if r["volume"] == "app"), 30, "the source's target to break")
    text = json.dumps([r for r in env.a.status()["mirrors"] if r["volume"] == "app"])
    assert "demoted" in text and "promoted it to tree object" in text, text
    assert tree_image(os.path.join(env.b.store, "mirrors", env.a.node_id, "trees",
                                   "app")) == mirror_before
    with open(os.path.join(dest, "one"), "rb") as fh:
        assert fh.read() == b"the new primary writes\n"
    # The promoted tree is mirrored on in its turn, from the new primary to another node.
    c = Daemon(env.root, "c", key_file=env.key, nbd=False,
               extra=("--listen", f"127.0.0.1:{free_port()}")).start()
    env.daemons.append(c)
    env.b.cli("mirror", "start", "app", "--to", c.listen, "--interval", "3600")
    env.b.cli("mirror", "sync", "app")
    b_snaps = json.loads(env.b.cli("tree", "list", "--json").stdout)
    b_app = [t for t in b_snaps if t["name"] == "app"][0]
    b_cycle = [r for r in env.b.status()["mirrors"] if r["volume"] == "app"][0]["applied_cycle"]
    assert_same_tree(os.path.join(b_app["snapshots"], f"snap-{b_cycle}"),
                     os.path.join(c.store, "mirrors", env.b.node_id, "trees", "app"))
    env.b.cli("mirror", "break", "app")
    env.b.cli("mirror", "rm", "app")
    # mirror rm of the promoted mirror takes its record with it; the promoted tree stays.
    env.b.cli("mirror", "rm", me, "--force")
    assert not [t for t in env.b.status()["incoming_trees"] if t["tree"] == "app"]
    assert not os.path.lexists(os.path.join(env.b.store, "mirrors", env.a.node_id, "trees",
                                            ".cyclemirror-tree-app"))
    assert json.loads(env.b.cli("tree", "list", "--json").stdout)
    with open(os.path.join(dest, "one"), "rb") as fh:
        assert fh.read() == b"the new primary writes\n"


def test_a_file_mirror_clones_to_a_plain_file_while_cycles_go_on(env):
    """A file object's mirror image (docs/files.md) cloned to a path: a plain file of the
    last applied cycle, apart from the image, which keeps applying."""
    live = os.path.join(env.root, "vm.img")
    write(live, os.urandom(256 << 10) + bytes(768 << 10))  # 1 MiB, half sparse-worthy
    env.a.cli("file", "add", "vmimg", live)
    env.a.cli("mirror", "start", "vmimg", "--to", env.b.listen, "--interval", "3600")
    env.a.cli("mirror", "sync", "vmimg")
    with open(live, "rb") as fh:
        first = fh.read()
    me = f"{env.a_name}/vmimg"
    dest = os.path.join(env.clones, "vm-copy.img")
    out = json.loads(env.b.cli("mirror", "clone", me, dest, "--json").stdout)
    assert out["kind"] == "file" and out["path"] == dest and out["size"] == len(first)
    with open(dest, "rb") as fh:
        assert fh.read() == first
    image = os.path.join(env.b.store, "mirrors", env.a.node_id, "vmimg.img")
    with open(dest, "r+b") as fh:  # the clone is writable; the image does not see it
        fh.write(b"clone" * 100)
    with open(image, "rb") as fh:
        assert fh.read() == first
    with open(live, "r+b") as fh:  # the mirror keeps cycling
        fh.seek(4096)
        fh.write(b"second cycle" * 50)
    env.a.cli("mirror", "sync", "vmimg")
    with open(live, "rb") as fh:
        second = fh.read()
    with open(image, "rb") as fh:
        assert fh.read() == second
    with open(dest, "rb") as fh:
        assert fh.read() == b"clone" * 100 + first[500:]
    # Refusals change nothing.
    listing = sorted(os.listdir(env.clones))
    for args, code, text in [
        (("mirror", "clone", me, dest), 4, "already exists"),
        (("mirror", "clone", me, os.path.join(env.b.store, "x.img")), 2, "inside this daemon"),
        (("mirror", "clone", f"{env.a_name}/nothing", os.path.join(env.clones, "y")), 3,
         "no tree mirror"),
        (("mirror", "promote", me, os.path.join(env.clones, "z")), 2,
         "a PATH is only for a tree mirror"),
    ]:
        r = env.b.cli(*args, check=False)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert text in r.stderr, (args, r.stderr)
    assert sorted(os.listdir(env.clones)) == listing


def test_a_promotion_killed_mid_way_is_finished_by_running_it_again(env):
    """kill -9 of the target daemon inside a promotion (after its commit point and the
    tree object's registration, before the record says done): the restarted daemon
    finishes it, as of the promoted cycle, the old source is refused, and the same
    promote answers it."""
    import subprocess
    import sys

    from tests.support.daemons import cli_env

    src2 = subvolume(env.root, "app2")
    write(os.path.join(src2, "f"), b"app2 cycle\n")
    env.a.cli("tree", "add", "app2", src2)
    env.a.cli("mirror", "start", "app2", "--to", env.b.listen, "--interval", "3600")
    env.a.cli("mirror", "sync", "app2")
    mirror2 = os.path.join(env.b.store, "mirrors", env.a.node_id, "trees", "app2")
    image = tree_image(mirror2)
    dest = os.path.join(env.root, "promoted2")
    env.b.stop()
    env.b.args += ["--failpoint", "treepromote.registered=60"]
    env.b.start()
    cmd = [sys.executable, "-m", "cyclemirror.cli", "--store", env.b.store, "mirror",
           "promote", f"{env.a_name}/app2", dest, "--as", "p2", "--force"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env())
    try:
        wait_for(lambda: os.path.exists(os.path.join(env.b.store, "trees", "p2.json")), 60,
                 "the promoted tree's registration")
        env.b.kill()
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode != 0
    del env.b.args[-2:]
    env.b.start()
    # The restarted daemon finished it before any source could connect.
    row = [t for t in env.b.status()["incoming_trees"] if t["tree"] == "app2"][0]
    assert row["promoted"]["done"] is True and row["promoted"]["path"] == dest
    assert "finished a promotion a crash cut short" in env.b.log()
    # The old source is refused as demoted already; the mirror stays the promoted cycle.
    write(os.path.join(src2, "f"), b"written after the promotion\n")
    env.a.cli("mirror", "sync", "app2", "--timeout", "30", check=False)
    wait_for(lambda: "promoted it to tree object 'p2'" in json.dumps(
        [r for r in env.a.status()["mirrors"] if r["volume"] == "app2"]), 30,
        "the old source to be refused as demoted")
    assert tree_image(mirror2) == image
    out = json.loads(env.b.cli("mirror", "promote", f"{env.a_name}/app2", dest, "--as", "p2",
                               "--json").stdout)
    assert out["resumed"] is True and out["path"] == dest
    assert tree_image(dest) == image
    listed = {t["name"]: t for t in json.loads(env.b.cli("tree", "list", "--json").stdout)}
    assert listed["p2"]["path"] == dest
    row = [t for t in env.b.status()["incoming_trees"] if t["tree"] == "app2"][0]
    assert row["promoted"]["done"] is True
