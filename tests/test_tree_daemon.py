"""Tree objects mirrored by real daemons: ``cyclemirror serve`` processes, the real CLI.

One source daemon and two target daemons, all with their stores on a btrfs
file system on a loop device (``btrfs_mount``), for the whole module.  The
tree is a btrfs subvolume; cycles run when ``mirror sync`` asks (interval
one hour).  After every cycle the target's plain tree must equal the
source's snapshot of that cycle exactly (``tests.support.trees``: paths,
kinds, modes, owners, mtimes, bytes, symlink targets, hard links), through
creates, rewrites, renames, deletes, hard links, symlinks, mode and owner
changes, a file that becomes a directory, extended attributes, an ACL, a FIFO,
a device node, a socket (not mirrored, logged).  Then fan-out to a second target
(joined while the first goes on, broken and resumed: it catches up with one
delta), kill -9 of the target daemon while it applies a cycle and of the
source daemon while it ships one, each followed by recovery to an exact
snapshot with no full copy, and a hostile or mismatched ``tree_open`` /
``tree_base`` refused with a clear error.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import stat
import subprocess
import sys

import pytest

from tests.support.certs import Certs
from tests.support.daemons import Daemon, cli_env, free_port, make_key, wait_for
from tests.support.metrics import parse_exposition, value
from tests.support.trees import (
    acl_bytes,
    assert_same_tree,
    begin,
    delete_subvolumes,
    subvolume,
    tree_image,
    tree_op,
)

MiB = 1 << 20


class Env:
    def __init__(self, root: str):
        self.root = root
        self.key = make_key(os.path.join(root, "key"))
        self.daemons: list[Daemon] = []
        self.src = subvolume(root, "app")

    def daemon(self, name: str, listen: bool, extra: tuple = (),
               metrics: bool = False) -> Daemon:
        extra = (("--listen", f"127.0.0.1:{free_port()}") if listen else ()) + extra
        d = Daemon(self.root, name, key_file=self.key, nbd=False, metrics=metrics,
                   extra=extra)
        self.daemons.append(d)
        return d.start()


@pytest.fixture(scope="module")
def env(btrfs_mount):
    if os.geteuid() != 0:
        pytest.skip("btrfs snapshots need root")
    root = os.path.join(btrfs_mount, "tree-daemon")
    os.makedirs(root)
    e = Env(root)
    try:
        e.a = e.daemon("a", listen=False, metrics=True)
        e.b = e.daemon("b", listen=True)
        e.certs = Certs(os.path.join(root, "certs"))
        cert, key = e.certs.server("c")
        e.c = e.daemon("c", listen=True, extra=("--tls-cert", cert, "--tls-key", key))
        e.a.cli("tree", "add", "app", e.src)
        yield e
    finally:
        for d in e.daemons:
            try:
                d.stop()
            except AssertionError:
                d.kill()
        delete_subvolumes(root)


def j(env, *p) -> str:
    return os.path.join(env.src, *p)


def write(path: str, data: bytes, offset: int | None = None) -> None:
    if offset is None:
        with open(path, "wb") as fh:
            fh.write(data)
        return
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def target_tree(env, target: Daemon) -> str:
    return os.path.join(target.store, "mirrors", env.a.node_id, "trees", "app")


def snapshot(env, cycle: int) -> str:
    if not hasattr(env, "snapshots"):  # asked once: the source daemon may be down later
        env.snapshots = json.loads(env.a.cli("tree", "list", "--json").stdout)[0]["snapshots"]
    return os.path.join(env.snapshots, f"snap-{cycle}")


def rows(env, target: Daemon | None = None) -> list[dict]:
    out = [r for r in env.a.status()["mirrors"] if r["volume"] == "app"]
    return [r for r in out if target is None or r["target"] == target.listen]


def sync(env) -> int:
    """Freeze now, wait for every target not broken; the cycle that was applied."""
    env.a.cli("mirror", "sync", "app")
    live = [r for r in rows(env) if r["phase"] != "broken"]
    cycles = {r["applied_cycle"] for r in live}
    assert len(cycles) == 1, (live, env.a.log()[-3000:])
    return cycles.pop()


def full_copies(env, target: Daemon) -> int:
    return len(re.findall(rf"mirror app -> {re.escape(target.listen)}: cycle \d+ applied"
                          r".*full copy", env.a.log()))


def check(env, cycle: int, *targets: Daemon) -> None:
    for t in targets:
        assert_same_tree(snapshot(env, cycle), target_tree(env, t))


def test_a_tree_mirrors_cycle_by_cycle_exactly(env):
    a, b = env.a, env.b
    rnd = random.Random(3)
    os.makedirs(j(env, "db", "base"))
    write(j(env, "db", "base", "rel1"), rnd.randbytes(256 * 1024 + 17))
    write(j(env, "db", "base", "rel2"), b"small\n")
    write(j(env, "db", "hl"), b"hard-linked" * 500)
    os.link(j(env, "db", "hl"), j(env, "db", "base", "hl2"))
    os.symlink("db/base/rel1", j(env, "latest"))
    os.symlink("/etc/passwd", j(env, "outside"))  # stored, never followed
    write(j(env, "willbedir"), b"soon a directory")
    with open(j(env, "sparse"), "wb") as fh:
        fh.truncate(MiB)
        fh.seek(300 * 1024)
        fh.write(b"s" * 4096)
    os.chmod(j(env, "db", "base"), 0o750)
    # attributes, an ACL, a FIFO and a device node (docs/trees.md)
    os.setxattr(j(env, "db"), "user.owner", b"app")
    os.setxattr(j(env, "db", "base"), "system.posix_acl_access",
                acl_bytes(7, 5, 0, users={1000: 5}))
    os.mkfifo(j(env, "db", "notify"), 0o620)
    os.mknod(j(env, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    r = a.cli("mirror", "start", "app", "--to", b.listen, "--group", "g", check=False)
    assert r.returncode == 2 and "cannot join group" in r.stderr, r.stderr
    a.cli("mirror", "start", "app", "--to", b.listen, "--interval", "3600",
          "--compress", "zstd")
    c1 = sync(env)
    check(env, c1, b)
    assert full_copies(env, b) == 1

    # renames, a delete, in-place writes, truncate, grow, chmod, chown, links, kinds
    os.rename(j(env, "db", "base", "rel1"), j(env, "db", "rel1-moved"))
    os.unlink(j(env, "latest"))
    os.symlink("db/rel1-moved", j(env, "latest"))
    write(j(env, "db", "rel1-moved"), b"CHANGED", 100 * 1024 + 5)
    os.unlink(j(env, "db", "base", "rel2"))
    os.truncate(j(env, "sparse"), 200 * 1024)
    with open(j(env, "db", "hl"), "ab") as fh:
        fh.write(b"grown through one of two names")
    os.chmod(j(env, "db", "hl"), 0o600)
    os.chown(j(env, "db", "base", "hl2"), 1234, 4321)
    os.unlink(j(env, "willbedir"))
    os.mkdir(j(env, "willbedir"))
    write(j(env, "willbedir", "inside"), b"now inside a directory")
    os.setxattr(j(env, "db"), "user.owner", b"app, changed")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(j(env, "live.sock"))  # not mirrored: logged
    sock.close()
    c2 = sync(env)
    assert c2 == c1 + 1
    source, target = tree_image(snapshot(env, c2)), tree_image(target_tree(env, b))
    assert source["entries"].pop("live.sock")[0] == "socket"
    assert source == target
    assert re.search(rf"tree app, cycle {c2}: 1 socket\(s\) not mirrored.*: live\.sock",
                     a.log()), a.log()[-2000:]
    os.unlink(j(env, "live.sock"))

    # a swap by renames, a link broken, a new subtree, a directory removed whole
    os.rename(j(env, "db", "hl"), j(env, "tmp"))
    os.rename(j(env, "db", "rel1-moved"), j(env, "db", "hl"))
    os.rename(j(env, "tmp"), j(env, "db", "rel1-moved"))
    os.unlink(j(env, "db", "base", "hl2"))
    write(j(env, "db", "base", "hl2"), b"no longer a link")
    os.makedirs(j(env, "new", "deep", "er"))
    for i in range(20):
        write(j(env, "new", "deep", "er", f"f{i}"), rnd.randbytes(rnd.randrange(1, 9000)))
    subprocess.run(["rm", "-rf", j(env, "willbedir")], check=True)
    c3 = sync(env)
    check(env, c3, b)
    assert full_copies(env, b) == 1, a.log()
    row = rows(env, b)[0]
    assert row["kind"] == "tree" and row["phase"] == "idle" and row["applied_cycle"] == c3
    assert row["last_cycle"]["full"] is False and row["rpo_age"] is not None
    # the source keeps only the snapshot the targets hold
    snaps = os.listdir(os.path.dirname(snapshot(env, c3)))
    assert snaps == [f"snap-{c3}"], snaps
    r = a.cli("tree", "rm", "app", check=False)
    assert r.returncode == 2 and "is mirrored to" in r.stderr, r.stderr


def test_fan_out_to_a_second_target_and_catch_up_after_a_break(env):
    a, b, c = env.a, env.b, env.c
    a.cli("mirror", "start", "app", "--to", c.listen)  # c takes TLS only: refused there

    def refused():
        (row,) = rows(env, c)
        return row["phase"] == "broken" and "--tls-ca" in (row["last_error"] or "")

    wait_for(refused, 60, "the plaintext mirror to be refused by the TLS target")
    assert not os.path.exists(target_tree(env, c))
    a.cli("mirror", "break", "app", "--to", c.listen)
    a.cli("mirror", "rm", "app", "--to", c.listen)
    # joins the running mirror, over TLS
    a.cli("mirror", "start", "app", "--to", c.listen, "--tls-ca", env.certs.ca_cert)
    k = sync(env)
    check(env, k, b, c)
    assert full_copies(env, c) == 1
    assert [r["tls"] for r in rows(env, c)] == [True]
    a.cli("mirror", "break", "app", "--to", c.listen)
    for n in range(2):
        write(j(env, "new", f"while-c-is-broken-{n}"), os.urandom(5000))
        k = sync(env)
        check(env, k, b)
    assert len(os.listdir(os.path.dirname(snapshot(env, k)))) == 3  # c's cycle is kept
    a.cli("mirror", "resume", "app", "--to", c.listen)
    k = sync(env)
    check(env, k, b, c)
    assert full_copies(env, c) == 1, a.log()  # one delta over the cycles it missed
    assert os.listdir(os.path.dirname(snapshot(env, k))) == [f"snap-{k}"]
    a.cli("mirror", "break", "app", "--to", c.listen)
    a.cli("mirror", "rm", "app", "--to", c.listen)
    assert [r["target"] for r in rows(env)] == [b.listen]


def test_fan_in_two_sources_trees_of_one_name_side_by_side_with_an_rpo_objective(env):
    c = env.c
    left_by_a = tree_image(target_tree(env, c))  # a's mirror to c was removed before
    d = env.daemon("d", listen=False)
    other = subvolume(env.root, "other-app")
    write(os.path.join(other, "mine"), b"from d" * 1000)
    d.cli("tree", "add", "app", other)  # the same name as a's tree, on another node
    d.cli("mirror", "start", "app", "--to", c.listen, "--tls-ca", env.certs.ca_cert,
          "--rpo", "30")
    d.cli("mirror", "sync", "app")
    write(os.path.join(other, "mine"), b"changed", 3)
    d.cli("mirror", "sync", "app")
    (row,) = d.status()["mirrors"]
    assert row["kind"] == "tree" and row["rpo"]["state"] == "ok", row
    assert 0 <= row["interval_now"] <= 30
    info = json.loads(d.cli("tree", "list", "--json").stdout)[0]
    mine = os.path.join(c.store, "mirrors", d.node_id, "trees", "app")
    assert_same_tree(os.path.join(info["snapshots"], f"snap-{row['applied_cycle']}"), mine)
    held = {t["source_node"]: t for t in c.status()["incoming_trees"]}
    assert set(held) >= {env.a.node_id, d.node_id}
    assert held[d.node_id]["applied_cycle"] == row["applied_cycle"]
    assert held[d.node_id]["source_name"] == d.status()["node"]["name"]
    assert tree_image(target_tree(env, c)) == left_by_a  # a's tree of that name, untouched
    # on the target: 'mirror rm NODE/NAME' removes a tree mirror, not while it is connected
    r = c.cli("mirror", "rm", f"{d.node_id}/app", check=False)
    assert r.returncode == 2 and "break that mirror on the source" in r.stderr, r.stderr
    d.cli("mirror", "break", "app")
    assert "removed incoming tree mirror" in c.cli("mirror", "rm", f"{d.node_id}/app").stdout
    c.cli("mirror", "rm", f"{env.a.node_id}/app")
    assert c.status()["incoming_trees"] == []
    assert not os.path.exists(mine) and os.listdir(os.path.dirname(mine)) == []
    d.stop()


def test_status_shows_tree_mirrors_on_both_sides_and_the_verbs_act_on_them(env):
    a, b = env.a, env.b
    k = sync(env)
    (row,) = rows(env, b)
    assert (row["kind"], row["phase"], row["applied_cycle"], row["cycle"]) == (
        "tree", "idle", k, k)
    assert row["rpo_age"] is not None and row["rpo_age"] >= 0 and row["last_error"] is None
    line = next(x for x in a.cli("status").stdout.splitlines() if x.startswith("app (tree)"))
    _types, samples = parse_exposition(a.scrape())
    assert value(samples, "cyclemirror_mirror_applied_cycle", volume="app",
                 target=b.listen) == k
    assert b.listen in line and "idle" in line, line
    (held,) = [t for t in b.status()["incoming_trees"] if t["source_node"] == a.node_id]
    assert (held["tree"], held["applied_cycle"], held["path"]) == ("app", k,
                                                                   target_tree(env, b))
    assert held["rpo_age"] >= 0 and held["error"] is None
    text = b.cli("status").stdout
    assert "TREE" in text and target_tree(env, b) in text
    r = a.cli("mirror", "verify", "app", check=False)
    assert r.returncode == 2 and "tree object" in r.stderr, r.stderr
    a.cli("mirror", "break", "app")
    assert {r["phase"] for r in rows(env)} == {"broken"}
    write(j(env, "written-while-broken"), b"x" * 10000)
    a.cli("mirror", "resume", "app")
    k2 = sync(env)
    check(env, k2, b)
    assert rows(env, b)[0]["phase"] == "idle"


def _ship_slowly(env, nbytes: int) -> subprocess.Popen:
    """A cycle of ``nbytes`` of new data under a 1 MiB/s cap, its sync in the background;
    returns once the target is writing the new file in the cycle's stage (seconds before
    the cycle can end)."""
    big = f"big-{random.randrange(1 << 30)}"
    write(j(env, "db", big), os.urandom(nbytes))
    bg = subprocess.Popen([sys.executable, "-m", "cyclemirror.cli", "--store", env.a.store,
                           "mirror", "sync", "app"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=cli_env())
    work = os.path.join(os.path.dirname(target_tree(env, env.b)), ".cyclemirror-tree-app")

    def applying():  # the new file is made in the stage, its data on the way
        return any(e.startswith("stage-") and os.path.exists(os.path.join(work, e, "db", big))
                   for e in os.listdir(work))

    wait_for(applying, 60, "the target to be applying the cycle", interval=0.02)
    return bg


def _nothing_left_but_the_record(env, b, applied: int) -> None:
    """The target's directories of its tree mirrors hold their record and, at most, the
    next cycle's stage made ahead from the cycle applied (``next-APPLIED``): no stage of
    a cut-off apply, nothing made ahead from another cycle."""
    troot = os.path.dirname(target_tree(env, b))
    for e in os.listdir(troot):
        if e.startswith(".cyclemirror-tree-"):
            left = set(os.listdir(os.path.join(troot, e))) - {"state.json"}
            assert left <= {f"next-{applied}"}, (e, left)


def test_kill_9_of_the_target_while_it_applies_then_of_the_source_while_it_ships(env):
    a, b = env.a, env.b
    k = sync(env)
    before = full_copies(env, b)
    a.cli("mirror", "break", "app")
    a.cli("mirror", "rm", "app")  # restarted with a rate cap, so a cycle lasts
    a.cli("mirror", "start", "app", "--to", b.listen, "--interval", "3600", "--bwlimit", "1M")
    k = sync(env)  # a delta: the target said at its open which cycle it holds
    check(env, k, b)

    bg = _ship_slowly(env, 3 * MiB)
    b.kill()  # mid-apply: the target's stage is half built
    check(env, k, b)  # still exactly cycle k, nothing of the next one
    b.start()
    bg.wait(60)  # the sync ends once the restarted target applied the cycle
    assert bg.returncode == 0
    k2 = sync(env)
    assert k2 > k
    check(env, k2, b)
    _nothing_left_but_the_record(env, b, k2)

    bg = _ship_slowly(env, 3 * MiB)
    a.kill()  # mid-cycle on the source
    bg.wait(60)
    check(env, k2, b)
    a.start()  # the mirror comes back by itself and ships the cycle it froze
    k3 = sync(env)
    assert k3 > k2
    check(env, k3, b)
    assert full_copies(env, b) == before, a.log()  # deltas only, never a silent full copy
    snaps = os.listdir(os.path.dirname(snapshot(env, k3)))
    assert snaps == [f"snap-{k3}"], snaps


def test_kill_9_of_the_target_between_its_switch_and_its_record(env):
    """The exchange of directories happened, the record does not say so yet: the
    restarted target finds the new version in place and says so at the source's next
    connect, which then ships nothing again for that cycle."""
    from cyclemirror.receiver.treeops import dir_identity

    a, b = env.a, env.b
    k = sync(env)
    before = full_copies(env, b)
    b.stop()
    b.args += ["--failpoint", "receiver.tree_switched=60"]
    b.start()
    write(j(env, "db", "switched"), os.urandom(20000))
    bg = subprocess.Popen([sys.executable, "-m", "cyclemirror.cli", "--store", a.store,
                           "mirror", "sync", "app"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=cli_env())
    state = os.path.join(os.path.dirname(target_tree(env, b)), ".cyclemirror-tree-app",
                         "state.json")

    def switched_not_recorded():
        with open(state) as fh:
            pending = json.load(fh)["pending"]
        if pending is None:
            return False
        fd = os.open(target_tree(env, b), os.O_RDONLY | os.O_DIRECTORY)
        try:
            return dir_identity(fd) == pending["stage_id"]
        finally:
            os.close(fd)

    wait_for(switched_not_recorded, 60, "the target to sit between its switch and record")
    b.kill()
    b.args = b.args[:-2]
    b.start()
    bg.wait(60)
    assert bg.returncode == 0
    (row,) = rows(env, b)
    assert row["applied_cycle"] == k + 1, row
    check(env, k + 1, b)
    assert row["last_cycle"]["cycle"] == k, row  # cycle k+1 was not shipped a second time
    assert full_copies(env, b) == before


def test_a_hostile_or_mismatched_open_is_refused_clearly(env):
    from cyclemirror.errors import AuthenticationError
    from cyclemirror.keys import read_key_file
    from cyclemirror.sender.connection import TargetLink
    from cyclemirror.wire.link import RemoteError

    host, port = env.b.listen.rsplit(":", 1)
    key = read_key_file(env.key)

    def dial(k=key):
        return TargetLink((host, int(port)), k).dial()

    with pytest.raises(AuthenticationError):
        dial(os.urandom(32))
    link = dial()
    try:
        link.send_message("tree_open", node_id="feedbeef", node_name=None, mirror="app")
        opened = link.recv_message({"tree_opened"})
        assert opened["applied_cycle"] == 0
        # a delta from a cycle this target does not hold: refused before anything applies
        link.send_message("tree_base", cycle=5, base=4, base_freeze_time=1.0)
        with pytest.raises(RemoteError, match="this target holds cycle 0"):
            link.recv_message({"applied"})
    finally:
        link.close()
    link = dial()
    try:  # a path that would leave the tree: refused, and nothing of the cycle stays
        link.send_message("tree_open", node_id="feedbeef", node_name=None, mirror="evil")
        link.recv_message({"tree_opened"})
        link.send_message("tree_base", cycle=1, base=0, base_freeze_time=0.0)
        link.sock.sendall(begin(1, full=True) + tree_op(1, op="dir", path=".", mode=0o755)
                          + tree_op(1, op="file", path="../escaped", size=3))
        with pytest.raises(RemoteError, match="'..' component"):
            link.recv_message({"applied"})
    finally:
        link.close()
    evil = os.path.join(env.b.store, "mirrors", "feedbeef", "trees")
    assert sorted(os.listdir(evil)) == [".cyclemirror-tree-app", ".cyclemirror-tree-evil"]
    assert os.listdir(os.path.join(evil, ".cyclemirror-tree-evil")) == []
    link = dial()
    try:  # a mirror name that would leave the store: the schema refuses it
        link.sock.sendall(_control({"type": "tree_open", "node_id": "feedbeef",
                                    "node_name": None, "mirror": "../../etc"}))
        with pytest.raises(RemoteError, match="mirror.*not a valid name"):
            link.recv_message({"tree_opened"})
    finally:
        link.close()
    link = dial()
    try:  # the source's own node id: a daemon never mirrors a tree onto itself
        link.send_message("tree_open", node_id=env.b.node_id, node_name=None, mirror="x")
        with pytest.raises(RemoteError, match="the source is this very node"):
            link.recv_message({"tree_opened"})
    finally:
        link.close()
    assert not os.path.exists(os.path.join(env.b.store, "mirrors", "feedbeef", "trees",
                                           "x"))
    # the real mirror still cycles
    write(j(env, "after-the-hostile-peers"), b"fine")
    check(env, sync(env), env.b)


def _control(msg: dict) -> bytes:
    from cyclemirror._cext import frames

    return frames.encode_control(0, json.dumps(msg).encode())
