"""Split brain on a tree or a file object won by the old source, with real daemons.

One source daemon (A) and one target daemon (B, serving NBD) for the module,
their stores and objects on the session's btrfs loop file system.  An object
mirrored A -> B is promoted on B with ``--force`` (the disaster); both sides
then write; the mirror back from B is refused as split brain; the user names
B, the new primary, to lose (``mirror resolve NAME --discard-changes-on B``).
B must then keep what it wrote whole (a tree: ``PATH.kept-<k>-<time>``; a file
object, a volume on B: its blocks in ``STORE/kept/``), named in the output and
in ``status``, and hold A's mirror as of the promoted cycle again; A takes its
demotion back (``mirror reinstate NAME``, which asks B) and its next cycle to
B is a delta of what A changed since that cycle: the wire bytes are counted
against A's changed data, and B's mirror compared with A's object.

The same module switches a file object over (its failback the mirror back,
no full copy) and checks that a tree's switchover is refused, and kills B
with SIGKILL inside each step of a tree's split brain lost on B (failpoints
``treediscard.*``): its next start finishes it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support.daemons import cli_env, wait_for
from tests.support.nbd import run
from tests.support.objectpair import daemon_pair, read, row, tree_info, write
from tests.support.trees import assert_same_tree, subvolume, tree_image

BIG = 1 << 20  # a full copy ships at least this much


@pytest.fixture(scope="module")
def env(btrfs_mount):
    if os.geteuid() != 0:
        pytest.skip("btrfs snapshots need root")
    with daemon_pair(btrfs_mount, "tree-split-brain") as e:
        yield e


def broken_on_split_brain(env, name: str, what: str) -> None:
    """B mirrors ``name`` back to A: refused as split brain, B's mirror broken."""
    env.b.cli("mirror", "start", name, "--to", env.a.listen, "--interval", "3600")
    env.b.cli("mirror", "sync", name, "--timeout", "30", check=False)
    m = wait_for(lambda: (lambda m: m if m["phase"] == "broken" else None)(row(env.b, name)),
                 30, "B's mirror back to break on the split brain")
    assert f"split brain on {what} {name}" in m["last_error"], m


def demoted_on_a(env, name: str, tree: bool) -> None:
    env.a.cli("mirror", "sync", name, "--timeout", "30", check=False)
    if tree:
        wait_for(lambda: tree_info(env.a, name)["role"] == "demoted", 30,
                 "A to record its tree as demoted")
    else:
        wait_for(lambda: any(x["volume"] == name and x["role"] == "demoted"
                             for x in env.a.status().get("roles") or []), 30,
                 "A to record its file object as demoted")


def test_the_old_source_wins_a_trees_split_brain_and_ships_only_its_changes(env):
    src = subvolume(env.root, "app-a")
    write(os.path.join(src, "big"), os.urandom(BIG))
    os.makedirs(os.path.join(src, "d"))
    write(os.path.join(src, "d", "small"), b"small file\n")
    env.a.cli("tree", "add", "app", src)
    env.a.cli("mirror", "start", "app", "--to", env.b.listen, "--interval", "3600")
    env.a.cli("mirror", "sync", "app")
    k = row(env.a, "app")["applied_cycle"]
    dest = os.path.join(env.root, "app-b")
    env.b.cli("mirror", "promote", f"{env.a.node_id}/app", dest, "--force")
    # Both sides write: A 8 KiB into its big file (refused: A is demoted), B a new file.
    a_new = os.urandom(8192)
    write(os.path.join(src, "big"), a_new, offset=4096 * 10)
    demoted_on_a(env, "app", tree=True)
    write(os.path.join(dest, "only-on-b"), b"B's change, kept whole\n")
    b_before = tree_image(dest)
    broken_on_split_brain(env, "app", "tree")

    r = env.b.cli("mirror", "resolve", "app", "--discard-changes-on", env.b.node_id,
                  "--json")
    out = json.loads(r.stdout)
    kept = glob.glob(f"{dest}.kept-{k}-*")
    assert len(kept) == 1 and out["kept"][0]["path"] == kept[0], out
    assert out["discarded_here"] is True and out["cycle"] == k
    assert "mirror reinstate app" in out["next"]
    # B: its tree kept whole, no tree object, no outgoing mirror, A's mirror at k again.
    assert tree_image(kept[0]) == b_before and not os.path.lexists(dest)
    assert tree_info(env.b, "app") is None
    assert not [m for m in env.b.status()["mirrors"] if m["volume"] == "app"]
    t = [t for t in env.b.status()["incoming_trees"] if t["tree"] == "app"][0]
    assert t["applied_cycle"] == k and t["promoted"] is None, t
    assert t["discarded"]["kept"] == kept[0] and t["discarded"]["done"] is True
    assert "split brain lost by the promoted tree; kept:" in env.b.cli("status").stdout
    # Resolving again is refused: the tree is gone, nothing changes.
    r = env.b.cli("mirror", "resolve", "app", "--discard-changes-on", env.b.node_id,
                  check=False)
    assert r.returncode != 0 and glob.glob(f"{dest}.kept-{k}-*") == kept

    shipped = row(env.a, "app")["shipped_bytes_total"]
    r = env.a.cli("mirror", "reinstate", "app", "--json")
    out = json.loads(r.stdout)
    assert out["asked"] == [{"target": env.b.listen, "answer": "holds the image",
                             "applied_cycle": k, "error": None}], out
    assert out["mirror_resumed"] is True and tree_info(env.a, "app")["role"] == "primary"
    env.a.cli("mirror", "sync", "app", "--timeout", "60")
    m = row(env.a, "app")
    assert m["last_cycle"]["full"] is False, m
    # Only A's 8 KiB (and the frames around them) crossed the wire, not the 1 MiB tree.
    sent = m["shipped_bytes_total"] - shipped
    assert 8192 <= sent < 8192 + 16384, (sent, m)
    mirror = os.path.join(env.b.store, "mirrors", env.a.node_id, "trees", "app")
    snaps = tree_info(env.a, "app")["snapshots"]
    assert_same_tree(os.path.join(snaps, f"snap-{m['applied_cycle']}"), mirror)
    assert read(os.path.join(mirror, "big"))[40960:40960 + 8192] == a_new
    assert not os.path.exists(os.path.join(mirror, "only-on-b"))


def test_reinstate_of_a_tree_is_refused_while_the_target_holds_it_promoted(env):
    """A tree demoted by a promotion that still stands: reinstate asks the target, which
    answers that it promoted the tree; nothing changes on A."""
    src = subvolume(env.root, "web-a")
    write(os.path.join(src, "f"), b"x" * 4096)
    env.a.cli("tree", "add", "web", src)
    env.a.cli("mirror", "start", "web", "--to", env.b.listen, "--interval", "3600")
    env.a.cli("mirror", "sync", "web")
    r = env.a.cli("mirror", "reinstate", "web", check=False)
    assert r.returncode == 10 and "not demoted" in r.stderr, r.stderr
    env.b.cli("mirror", "promote", f"{env.a.node_id}/web", os.path.join(env.root, "web-b"),
              "--force")
    demoted_on_a(env, "web", tree=True)
    r = env.a.cli("mirror", "reinstate", "web", check=False)
    assert r.returncode == 10 and "promoted its copy" in r.stderr, r.stderr
    assert tree_info(env.a, "web")["role"] == "demoted"


def test_the_old_source_wins_a_file_objects_split_brain(env):
    """A file object promoted on B is a volume there: naming B the loser turns that
    volume back into A's image of the promoted cycle (B's blocks kept in a file); A
    reinstates its file object and its next cycle carries only A's divergent blocks."""
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io (qemu-utils) is missing: it writes the promoted volume over NBD")
    live = os.path.join(env.root, "vm.img")
    write(live, os.urandom(BIG))
    env.a.cli("file", "add", "vm", live)
    env.a.cli("mirror", "start", "vm", "--to", env.b.listen, "--interval", "3600")
    env.a.cli("mirror", "sync", "vm")
    k = row(env.a, "vm")["applied_cycle"]
    env.b.cli("mirror", "promote", f"{env.a.node_id}/vm", "--force")
    a_new = os.urandom(4096)
    write(live, a_new, offset=8192)  # A's divergent write
    demoted_on_a(env, "vm", tree=False)
    b_new = os.path.join(env.root, "vm-b-new")
    write(b_new, os.urandom(8192))
    run("qemu-io", "-f", "raw", "-c", f"write -s {b_new} 65536 8192", "-c", "flush",
        f"nbd+unix:///vm?socket={env.b.nbd_sock}")
    broken_on_split_brain(env, "vm", "file object")

    out = json.loads(env.b.cli("mirror", "resolve", "vm", "--discard-changes-on",
                               env.b.node_id, "--json").stdout)
    assert out["discarded_here"] is True and out["cycle"] == k, out
    kept = out["kept"][0]
    assert kept["bytes"] == 8192 and read(kept["path"])[65536:65536 + 8192] == read(b_new)
    assert not os.path.exists(os.path.join(env.b.store, "volumes", "vm"))
    assert os.path.exists(os.path.join(env.b.store, "mirrors", env.a.node_id, "vm.img"))
    role = [x for x in env.b.status()["roles"] if x["volume"] == "vm"][0]
    assert role["role"] == "secondary" and role["kept"][0]["path"] == kept["path"]

    shipped = row(env.a, "vm")["shipped_bytes_total"]
    out = json.loads(env.a.cli("mirror", "reinstate", "vm", "--json").stdout)
    assert out["asked"][0]["answer"] == "holds the image", out
    assert out["mirror_resumed"] is True
    env.a.cli("mirror", "sync", "vm", "--timeout", "60")
    image = os.path.join(env.b.store, "mirrors", env.a.node_id, "vm.img")
    wait_for(lambda: read(image) == read(live), 30, "B's image to equal A's file")
    sent = row(env.a, "vm")["shipped_bytes_total"] - shipped
    assert 4096 <= sent < 4096 + 16384, sent
    assert row(env.a, "vm")["last_cycle"]["full"] is False


def test_a_file_object_switches_over_and_back_without_a_full_copy(env):
    """A planned switchover of a file object (its writers stopped): the target's image of
    the final cycle becomes a volume there and is mirrored back at once, a failback: A's
    live file is kept whole beside it and its snapshot of the final cycle becomes the
    image; the new primary's writes then reach A as deltas."""
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io (qemu-utils) is missing: it writes the promoted volume over NBD")
    live = os.path.join(env.root, "sw.img")
    write(live, os.urandom(BIG))
    env.a.cli("file", "add", "sw", live)
    env.a.cli("mirror", "start", "sw", "--to", env.b.listen, "--interval", "3600")
    env.a.cli("mirror", "sync", "sw")
    last = os.urandom(4096)
    write(live, last, offset=0)  # acknowledged before the switchover: must be on B
    at_switch = read(live)
    r = env.a.cli("mirror", "switchover", "sw", "--to", env.b.listen, "--json")
    out = json.loads(r.stdout)
    assert out["kind"] == "file" and out["writes_held_seconds"] is None, out
    assert out["mirroring_back_to"] == env.a.listen
    k = out["cycle"]
    text = env.a.cli("mirror", "switchover", "sw", "--to", env.b.listen, check=False)
    assert text.returncode != 0  # A is no longer the source of sw
    # B: a volume holding the final cycle; A: the failback made it B's mirror image.
    uri = f"nbd+unix:///sw?socket={env.b.nbd_sock}"
    image = os.path.join(env.a.store, "mirrors", env.b.node_id, "sw.img")
    wait_for(lambda: os.path.exists(image) and not os.path.lexists(live), 60,
             "A's file object to fail back into B's mirror image")
    assert read(image) == at_switch
    kept = glob.glob(f"{live}.kept-{k}-*")
    assert len(kept) == 1 and read(kept[0]) == at_switch
    b_copy = os.path.join(env.root, "sw-b-copy")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, b_copy)
    assert read(b_copy) == at_switch
    # The new primary writes; its mirror back ships only that, as a delta.
    b_new = os.path.join(env.root, "sw-b-new")
    write(b_new, os.urandom(8192))
    run("qemu-io", "-f", "raw", "-c", f"write -s {b_new} 131072 8192", "-c", "flush", uri)
    env.b.cli("mirror", "sync", "sw", "--timeout", "60")
    m = row(env.b, "sw")
    assert m["last_cycle"]["full"] is False, m
    assert m["shipped_bytes_total"] < 8192 + 16384, m
    expected = at_switch[:131072] + read(b_new) + at_switch[131072 + 8192:]
    assert read(image) == expected
    # Back: B's volume switches over as any volume; A gets a volume (not its file again).
    out = json.loads(env.b.cli("mirror", "switchover", "sw", "--to", env.a.listen,
                               "--json").stdout)
    assert out["kind"] == "volume" and out["writes_held_seconds"] is not None, out
    assert "sw" in [v["name"] for v in env.a.status()["volumes"]]
    image_b = os.path.join(env.b.store, "mirrors", env.a.node_id, "sw.img")
    wait_for(lambda: os.path.exists(image_b), 60, "B's volume to fail back into A's image")
    assert read(image_b) == expected


def test_a_tree_switches_over_and_back_without_a_full_copy(env):
    """A planned switchover of a tree (its writers stopped): the target promotes its
    mirror of the final cycle at the path named and mirrors it back, a failback: A's
    live tree is kept whole aside and its snapshot of the final cycle becomes its
    incoming mirror; B's changes then reach A as deltas; and the same verb on B
    switches the tree back to A, at its old path."""
    src = subvolume(env.root, "swt-a")
    write(os.path.join(src, "big"), os.urandom(BIG))
    env.a.cli("tree", "add", "swt", src)
    env.a.cli("mirror", "start", "swt", "--to", env.b.listen, "--interval", "3600")
    env.a.cli("mirror", "sync", "swt")
    write(os.path.join(src, "last"), b"written just before the switchover\n")
    at_switch = tree_image(src)
    dest = os.path.join(env.root, "swt-b")
    r = env.a.cli("mirror", "switchover", "swt", "--to", env.b.listen, "--target-path", dest,
                  "--json")
    out = json.loads(r.stdout)
    assert out["kind"] == "tree" and out["path"] == dest, out
    assert out["mirroring_back_to"] == env.a.listen
    k = out["cycle"]
    assert tree_image(dest) == at_switch  # every change made before it is on B
    assert tree_info(env.b, "swt")["promoted_from"]["cycle"] == k
    mirror_a = os.path.join(env.a.store, "mirrors", env.b.node_id, "trees", "swt")
    wait_for(lambda: tree_info(env.a, "swt") is None and os.path.isdir(mirror_a), 60,
             "A's tree to fail back into B's mirror")
    kept = glob.glob(f"{src}.kept-{k}-*")
    assert len(kept) == 1 and tree_image(kept[0]) == at_switch and not os.path.lexists(src)
    assert tree_image(mirror_a) == at_switch
    # B writes; its mirror back ships that only.
    write(os.path.join(dest, "big"), os.urandom(8192), offset=0)
    env.b.cli("mirror", "sync", "swt", "--timeout", "60")
    m = row(env.b, "swt")
    assert m["last_cycle"]["full"] is False and m["shipped_bytes_total"] < 8192 + 16384, m
    assert tree_image(mirror_a) == tree_image(dest)
    # Back to A, at its old path: the same verb on B.
    b_before = tree_image(dest)
    out = json.loads(env.b.cli("mirror", "switchover", "swt", "--to", env.a.listen,
                               "--target-path", src, "--json").stdout)
    assert out["kind"] == "tree" and tree_image(src) == b_before
    assert tree_info(env.a, "swt")["path"] == src
    wait_for(lambda: tree_info(env.b, "swt") is None, 60, "B's tree to fail back")
    mirror_b = os.path.join(env.b.store, "mirrors", env.a.node_id, "trees", "swt")
    assert tree_image(mirror_b) == b_before  # the old mirror of A's first tree, replaced
    write(os.path.join(src, "again"), b"A is primary again\n")
    env.a.cli("mirror", "sync", "swt", "--timeout", "60")
    assert row(env.a, "swt")["last_cycle"]["full"] is False
    assert tree_image(mirror_b) == tree_image(src)
    assert len(glob.glob(f"{dest}.kept-{out['cycle']}-*")) == 1


def test_a_trees_switchover_refusals_change_nothing(env):
    src = subvolume(env.root, "swr-a")
    write(os.path.join(src, "f"), b"y" * 4096)
    env.a.cli("tree", "add", "swr", src)
    env.a.cli("mirror", "start", "swr", "--to", env.b.listen, "--interval", "3600")
    env.a.cli("mirror", "sync", "swr")
    r = env.a.cli("mirror", "switchover", "swr", "--to", "127.0.0.1:1", check=False)
    assert r.returncode == 3 and "not mirrored to" in r.stderr, r.stderr
    # A path on the target that exists: the target refuses to promote; nothing changes.
    taken = os.path.join(env.root, "swr-taken")
    os.mkdir(taken)
    r = env.a.cli("mirror", "switchover", "swr", "--to", env.b.listen, "--target-path",
                  taken, check=False)
    assert r.returncode != 0 and "exists" in r.stderr, r.stderr
    assert tree_info(env.b, "swr") is None
    # The target refused before promoting: A takes its tree back and mirrors on.
    assert tree_info(env.a, "swr")["role"] == "primary"
    write(os.path.join(src, "f"), b"z" * 4096)
    env.a.cli("mirror", "sync", "swr", "--timeout", "60")
    assert row(env.a, "swr")["last_cycle"]["full"] is False
    r = env.a.cli("mirror", "switchover", "swr", "--to", env.b.listen, "--target-path",
                  "relative/path", check=False)
    assert r.returncode != 0 and "absolute" in r.stderr, r.stderr
    assert tree_info(env.a, "swr")["role"] == "primary" and tree_info(env.b, "swr") is None
    # Bad input for the new verbs: exit codes of docs/cli.md, nothing changed.
    r = env.a.cli("mirror", "reinstate", "nothing-here", check=False)
    assert r.returncode == 3, r.stderr
    r = env.a.cli("mirror", "resolve", "swr", "--discard-changes-on", env.a.node_id,
                  check=False)
    assert r.returncode == 10 and "not promoted" in r.stderr, r.stderr


def _set_failpoint(d, failpoint: str | None) -> None:
    if "--failpoint" in d.args:
        i = d.args.index("--failpoint")
        del d.args[i:i + 2]
    if failpoint is not None:
        d.args += ["--failpoint", f"{failpoint}=60"]


@pytest.mark.parametrize("failpoint", ["treediscard.recorded", "treediscard.kept",
                                       "treediscard.released"])
def test_kill_9_inside_a_trees_split_brain_lost_here(env, failpoint):
    """kill -9 of B while its 'mirror resolve ... --discard-changes-on B' sleeps after
    each step past the commit point: B's next start finishes it (the tree kept once,
    whole; the tree object and the promotion record gone), and A's reinstated mirror
    then ships only its own change."""
    name = "cut" + failpoint.split(".")[1][:3]
    src = subvolume(env.root, f"{name}-a")
    write(os.path.join(src, "f"), os.urandom(BIG // 4))
    env.a.cli("tree", "add", name, src)
    env.a.cli("mirror", "start", name, "--to", env.b.listen, "--interval", "3600")
    env.a.cli("mirror", "sync", name)
    k = row(env.a, name)["applied_cycle"]
    dest = os.path.join(env.root, f"{name}-b")
    env.b.cli("mirror", "promote", f"{env.a.node_id}/{name}", dest, "--force")
    write(os.path.join(src, "f"), os.urandom(4096), offset=0)
    demoted_on_a(env, name, tree=True)
    write(os.path.join(dest, "b-only"), b"kept on B\n")
    b_before = tree_image(dest)
    work = os.path.join(env.b.store, "mirrors", env.a.node_id, "trees",
                        f".cyclemirror-tree-{name}")

    def reached() -> bool:
        try:
            rec = json.loads(read(os.path.join(work, "discarded.json")))
        except FileNotFoundError:
            return False
        kept = bool(glob.glob(f"{dest}.kept-{k}-*"))
        promoted = os.path.exists(os.path.join(work, "promoted.json"))
        return not rec["done"] and {"treediscard.recorded": not kept and promoted,
                                    "treediscard.kept": kept and promoted,
                                    "treediscard.released": kept and not promoted}[failpoint]

    env.b.stop()
    _set_failpoint(env.b, failpoint)
    try:
        env.b.start()
    finally:
        _set_failpoint(env.b, None)
    proc = subprocess.Popen([sys.executable, "-m", "cyclemirror.cli", "--store", env.b.store,
                             "mirror", "resolve", name, "--discard-changes-on",
                             env.b.node_id], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=cli_env())
    try:
        wait_for(reached, 30, f"B to sleep in {failpoint}")
        env.b.kill()
    finally:
        proc.kill()
        proc.wait()
    env.b.start()
    kept = glob.glob(f"{dest}.kept-{k}-*")
    assert len(kept) == 1 and tree_image(kept[0]) == b_before and not os.path.lexists(dest)
    assert tree_info(env.b, name) is None
    assert not os.path.exists(os.path.join(work, "promoted.json"))
    assert json.loads(read(os.path.join(work, "discarded.json")))["done"] is True
    shipped = row(env.a, name)["shipped_bytes_total"]
    env.a.cli("mirror", "reinstate", name)
    env.a.cli("mirror", "sync", name, "--timeout", "60")
    m = row(env.a, name)
    assert m["last_cycle"]["full"] is False and m["shipped_bytes_total"] - shipped < 16384, m
    mirror = os.path.join(work, "..", name)
    assert_same_tree(os.path.join(tree_info(env.a, name)["snapshots"],
                                  f"snap-{m['applied_cycle']}"), mirror)
