"""Failback of tree mirrors with real daemons: demotion on the old source, then a delta back.

One source daemon (A) and one target daemon (B) for the module, their stores
and trees on a btrfs loop file system.  A tree mirrored A -> B is promoted on
B with ``--force`` (the disaster); A's next cycle is refused, and A must then
record its tree as demoted, stop cycling it (``mirror resume`` refused) and
say so in ``status``.  Mirroring B's promoted tree back to A must be a
failback: A's tree rolled back to the promoted cycle (its own changes after
it kept whole beside it, never deleted), and only what B changed since the
promotion on the wire (counted: the bytes B's driver sent, against the
changed file data and against the full tree), B's first cycle a delta from
the promoted cycle.  Both sides changed: split brain, refused with nothing
changed until the user names the loser on B (B naming itself:
tests/test_object_dr.py).
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

from tests.support.daemons import wait_for
from tests.support.nbd import run
from tests.support.objectpair import daemon_pair, read, row, tree_info, write
from tests.support.trees import assert_same_tree, subvolume, tree_image

BIG = 1 << 20  # a full copy of the tree ships at least this much


@pytest.fixture(scope="module")
def env(btrfs_mount):
    if os.geteuid() != 0:
        pytest.skip("btrfs snapshots need root")
    with daemon_pair(btrfs_mount, "tree-failback") as e:
        yield e


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


def failed_back(env, name: str, k: int) -> dict:
    """B's mirror row of ``name`` after its first sync to A, checked to be a failback: A
    held cycle ``k`` (the promoted one) when B's mirror opened, so every cycle B shipped
    was a delta, none a full copy.  (The mirror ships one or two cycles, as the sync's
    freeze lands before or after the one its start makes, and may open more than once.)"""
    # The daemon counts a cycle just after the driver says it applied (which ends the
    # sync): wait for the count.
    m = wait_for(lambda: (lambda m: m if m["cycles_total"] >= 1 else None)(row(env.b, name)),
                 30, "B to count its first cycle")
    assert m["applied_cycle"] > k and m["last_cycle"]["full"] is False, m
    assert m["cycles_total"] <= 2, m
    lines = env.a.log().splitlines()
    done = max(i for i, line in enumerate(lines)
               if f"failback of tree {name}: this node's tree is now the mirror" in line)
    opened = [line for line in lines[done:]
              if f"tree mirror {name} from" in line and "opened" in line]
    assert opened and opened[0].endswith(f"(applied cycle {k})"), opened
    assert "full copy" not in "\n".join(line for line in env.b.log().splitlines()
                                        if f"mirror {name} " in line)
    return m


def test_the_old_source_records_its_tree_demoted_and_stops_cycling_it(env):
    src, k, _image = promoted_tree(env, "app")
    info = tree_info(env.b, "app")  # the promoted tree keeps the promoted cycle as its base
    assert info["frozen_cycle"] == k and info["promoted_from"]["cycle"] == k
    assert os.path.isdir(os.path.join(info["snapshots"], f"snap-{k}"))
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


def test_failback_after_split_brain_ships_only_the_delta(env):
    """Continues the tree of the test above: A wrote after the promotion (its divergent
    change), B writes now; mirroring B's tree back to A is refused as split brain until
    B names A the loser, then A's tree is rolled back (its own tree kept whole) and B's
    first cycle to A is a delta of B's changes."""
    a_path = tree_info(env.a, "app")["path"]
    a_before = tree_image(a_path)  # A's tree as A left it, divergent change included
    dest = tree_info(env.b, "app")["path"]
    k = tree_info(env.b, "app")["promoted_from"]["cycle"]
    write(os.path.join(dest, "big"), os.urandom(8192), offset=65536)  # 8 KiB rewritten
    write(os.path.join(dest, "new"), os.urandom(4096))
    changed = 8192 + 4096

    env.b.cli("mirror", "start", "app", "--to", env.a.listen, "--interval", "3600")
    r = env.b.cli("mirror", "sync", "app", "--timeout", "30", check=False)
    assert r.returncode != 0
    m = wait_for(lambda: (lambda m: m if m["phase"] == "broken" else None)(row(env.b, "app")),
                 30, "B's mirror back to break on the split brain")
    assert "split brain on tree app" in m["last_error"], m
    # Both daemons of the test run on one host, so they have one name: the loser is
    # named by its node id.
    loser = env.a.node_id if env.a_name == env.b_name else env.a_name
    assert f"--discard-changes-on {loser}" in m["last_error"]
    # Nothing changed on A: its tree, its object, no incoming mirror.
    assert tree_image(a_path) == a_before and tree_info(env.a, "app") is not None
    assert not env.a.status().get("incoming_trees")

    r = env.b.cli("mirror", "resolve", "app", "--discard-changes-on", "nobody", check=False)
    assert r.returncode == 2 and env.a_name in r.stderr
    env.b.cli("mirror", "resolve", "app", "--discard-changes-on", loser)
    env.b.cli("mirror", "resume", "app")
    env.b.cli("mirror", "sync", "app", "--timeout", "60")

    m = failed_back(env, "app", k)
    # Only B's changes crossed the wire: its changed data plus the frames' headers and
    # the ops of a few paths, far below the 1 MiB the tree holds.
    assert changed <= m["shipped_bytes_total"] < changed + 16384, m
    b_snaps = tree_info(env.b, "app")["snapshots"]
    mirror = os.path.join(env.a.store, "mirrors", env.b.node_id, "trees", "app")
    assert_same_tree(os.path.join(b_snaps, f"snap-{m['applied_cycle']}"), mirror)
    # A: its tree object is gone, its own tree kept whole (divergent change included).
    assert tree_info(env.a, "app") is None
    kept = glob.glob(f"{a_path}.kept-{k}-*")
    assert len(kept) == 1 and tree_image(kept[0]) == a_before
    assert read(os.path.join(kept[0], "d", "small")) == b"written on A after the promotion\n"
    assert not os.path.lexists(a_path)
    t = [t for t in env.a.status()["incoming_trees"] if t["tree"] == "app"][0]
    assert t["failback"]["kept"] == kept[0] and t["failback"]["done"] is True
    assert t["failback"]["divergent_ops"] >= 1
    assert "failed back; kept:" in env.a.cli("status").stdout
    # The mirror goes on as any other: a next cycle is a delta from the last.
    write(os.path.join(dest, "new"), b"again\n")
    env.b.cli("mirror", "sync", "app")
    m2 = row(env.b, "app")
    assert m2["last_cycle"]["full"] is False
    assert_same_tree(os.path.join(b_snaps, f"snap-{m2['applied_cycle']}"), mirror)


def test_failback_without_changes_on_the_old_source_needs_no_word(env):
    """Only the new primary wrote: nothing to choose, the failback goes on at once; the
    old source's tree (equal to the promoted cycle) is still kept aside, not deleted."""
    src, k, image = promoted_tree(env, "web")
    dest = tree_info(env.b, "web")["path"]
    write(os.path.join(dest, "d", "small"), b"changed on B\n")
    os.unlink(os.path.join(dest, "link"))
    env.b.cli("mirror", "start", "web", "--to", env.a.listen, "--interval", "3600")
    env.b.cli("mirror", "sync", "web", "--timeout", "60")
    m = failed_back(env, "web", k)
    assert m["shipped_bytes_total"] < 16384, m
    b_snaps = tree_info(env.b, "web")["snapshots"]
    mirror = os.path.join(env.a.store, "mirrors", env.b.node_id, "trees", "web")
    assert_same_tree(os.path.join(b_snaps, f"snap-{m['applied_cycle']}"), mirror)
    kept = glob.glob(f"{src}.kept-{k}-*")
    assert len(kept) == 1 and tree_image(kept[0]) == image
    t = [t for t in env.a.status()["incoming_trees"] if t["tree"] == "web"][0]
    assert t["failback"]["divergent_ops"] == 0


def test_a_failback_killed_mid_way_is_finished_at_the_next_connect(env):
    """kill -9 of the old source's daemon inside the failback's steps after its commit
    point, once at each step in turn (after the record, after the switch-in, after the
    rename): each restart goes on from where the kill left it when the new primary
    reconnects, and the end is as without a crash: no full copy, the old tree kept
    once, the mirror equal to the new primary's."""
    name = "crash"
    src, k, image = promoted_tree(env, name)
    dest = tree_info(env.b, name)["path"]
    write(os.path.join(dest, "big"), os.urandom(4096), offset=0)
    work = os.path.join(env.a.store, "mirrors", env.b.node_id, "trees",
                        f".cyclemirror-tree-{name}")

    def inside(failpoint: str) -> bool:  # provably in the failpoint's sleep, from the disk
        try:
            rec = json.loads(read(os.path.join(work, "failback.json")))
        except FileNotFoundError:
            return False
        try:
            applied = json.loads(read(os.path.join(work, "state.json")))["applied_cycle"]
        except FileNotFoundError:
            applied = 0
        kept = os.path.lexists(rec["kept"])
        return not rec["done"] and {
            "treefailback.recorded": applied == 0 and not kept,
            "treefailback.switched": applied == k and not kept,
            "treefailback.kept": applied == k and kept}[failpoint]

    started = False
    env.a.stop()
    for failpoint in ("treefailback.recorded", "treefailback.switched", "treefailback.kept"):
        env.a.args += ["--failpoint", f"{failpoint}=60"]
        try:
            env.a.start()
            if not started:
                env.b.cli("mirror", "start", name, "--to", env.a.listen, "--interval", "3600")
                started = True
            else:  # the new primary reconnects at once, not after its backoff
                env.b.cli("mirror", "resume", name)
            wait_for(lambda fp=failpoint: inside(fp), 60, f"the old source to sleep in "
                     f"{failpoint}")
            env.a.kill()
        finally:
            del env.a.args[-2:]
    env.a.start()
    env.b.cli("mirror", "resume", name)
    env.b.cli("mirror", "sync", name, "--timeout", "60")
    failed_back(env, name, k)
    m = row(env.b, name)
    b_snaps = tree_info(env.b, name)["snapshots"]
    mirror = os.path.join(env.a.store, "mirrors", env.b.node_id, "trees", name)
    assert_same_tree(os.path.join(b_snaps, f"snap-{m['applied_cycle']}"), mirror)
    kept = glob.glob(f"{src}.kept-{k}-*")
    assert len(kept) == 1 and tree_image(kept[0]) == image
    assert tree_info(env.a, name) is None and not os.path.lexists(src)
    t = [t for t in env.a.status()["incoming_trees"] if t["tree"] == name][0]
    assert t["failback"]["done"] is True


def test_a_file_objects_source_records_its_demotion(env):
    """A file object's mirror promoted on the target (to a volume there): the old
    source's next cycle is refused and it records the file object as demoted (its role
    record, as for a volume), shows it in status and stops mirroring it."""
    live = os.path.join(env.root, "disk.img")
    write(live, os.urandom(256 << 10))
    env.a.cli("file", "add", "disk", live)
    env.a.cli("mirror", "start", "disk", "--to", env.b.listen, "--interval", "3600")
    env.a.cli("mirror", "sync", "disk")
    env.b.cli("mirror", "promote", f"{env.a.node_id}/disk", "--force")
    write(live, b"after the promotion", offset=0)
    r = env.a.cli("mirror", "sync", "disk", "--timeout", "30", check=False)
    assert r.returncode != 0
    role = wait_for(lambda: next((x for x in env.a.status().get("roles") or []
                                  if x["volume"] == "disk" and x["role"] == "demoted"), None),
                    30, "A to record the file object as demoted")
    assert role["demoted"]["by"] == env.b.listen
    m = row(env.a, "disk")
    assert m["phase"] == "broken" and "demoted" in (m["last_error"] or ""), m
    assert "demoted by" in env.a.cli("status").stdout
    env.a.cli("mirror", "resume", "disk", check=False)  # does not help: still refused
    r = env.a.cli("mirror", "sync", "disk", "--timeout", "10", check=False)
    assert r.returncode != 0 and "demoted" in r.stderr, r.stderr


def test_a_file_object_fails_back_from_its_snapshot_of_the_common_cycle(env):
    """A file object promoted on B (a volume there) and written on both sides: the
    mirror back is refused as split brain until B names A the loser; then A's snapshot of
    the promoted cycle becomes the image (its live file kept whole beside it) and only
    the blocks B wrote cross the wire."""
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io (qemu-utils) is missing: it writes the promoted volume over NBD")
    live = os.path.join(env.root, "vm2.img")
    write(live, os.urandom(BIG))
    env.a.cli("file", "add", "vm2", live)
    env.a.cli("mirror", "start", "vm2", "--to", env.b.listen, "--interval", "3600")
    env.a.cli("mirror", "sync", "vm2")
    k = row(env.a, "vm2")["applied_cycle"]
    image_k = read(live)
    env.b.cli("mirror", "promote", f"{env.a.node_id}/vm2", "--force")
    write(live, b"A" * 4096, offset=0)  # the old source's divergent write
    env.a.cli("mirror", "sync", "vm2", "--timeout", "30", check=False)
    a_live = read(live)
    uri = f"nbd+unix:///vm2?socket={env.b.nbd_sock}"
    new = os.urandom(8192)  # random: the wire bytes are not shrunk by compression
    write(os.path.join(env.root, "vm2-new"), new)
    run("qemu-io", "-f", "raw", "-c", f"write -s {os.path.join(env.root, 'vm2-new')} 65536 "
        "8192", "-c", "flush", uri)
    expected = image_k[:65536] + new + image_k[65536 + 8192:]

    env.b.cli("mirror", "start", "vm2", "--to", env.a.listen, "--interval", "3600")
    r = env.b.cli("mirror", "sync", "vm2", "--timeout", "30", check=False)
    assert r.returncode != 0
    m = wait_for(lambda: (lambda m: m if m["phase"] == "broken" else None)(row(env.b, "vm2")),
                 30, "B's mirror back to break on the split brain")
    assert "split brain on file object vm2" in m["last_error"], m
    assert read(live) == a_live and not os.path.exists(
        os.path.join(env.a.store, "mirrors", env.b.node_id, "vm2.img"))
    loser = env.a.node_id if env.a_name == env.b_name else env.a_name
    env.b.cli("mirror", "resolve", "vm2", "--discard-changes-on", loser)
    env.b.cli("mirror", "resume", "vm2")
    env.b.cli("mirror", "sync", "vm2", "--timeout", "60")

    assert read(os.path.join(env.a.store, "mirrors", env.b.node_id, "vm2.img")) == expected
    kept = glob.glob(f"{live}.kept-{k}-*")
    assert len(kept) == 1 and read(kept[0]) == a_live
    assert not os.path.lexists(live)
    assert "vm2" not in [f["name"] for f in json.loads(env.a.cli("file", "list",
                                                                 "--json").stdout)]
    role = [x for x in env.a.status()["roles"] if x["volume"] == "vm2"][0]
    assert role["role"] == "secondary" and role["kept"][0]["path"] == kept[0]
    assert role["kept"][0]["bytes"] == 4096
    m = wait_for(lambda: (lambda m: m if m["cycles_total"] >= 1 else None)(row(env.b, "vm2")),
                 30, "B to count its first cycle")
    assert m["last_cycle"]["full"] is False, m
    assert 8192 <= m["shipped_bytes_total"] < 8192 + 16384, m
    assert "full copy" not in "\n".join(line for line in env.b.log().splitlines()
                                        if "mirror vm2 " in line)
