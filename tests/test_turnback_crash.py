"""kill -9 inside a turn-back of a consistency group into mirror images: after a restart the
group is untouched or turned back whole, the operation ends right, nothing is lost.

Two verbs turn volumes back into a mirror image without a copy
(``receiver.turnback``): the old primary's group failback (its demoted members
become the new primary's images of their common cycle, its own writes since
then kept in a file) and ``mirror resolve GROUP-MEMBER --discard-changes-on
NEW-PRIMARY`` on the new primary (its promoted members become the old
primary's images again, its writes since the promotion kept in a file).

One split-brained pair of real daemons is made once for the module: hosta
mirrors group ``app`` (db, log) to hostb, writes more (pattern 3) and is
killed; hostb promotes the group ``--force`` and writes (pattern 4).  Each
test runs both daemons on copies of those stores (``cp -a``) and kills the
daemon doing the verb with SIGKILL: at each failpoint in turn (before the
commit point, which leaves everything untouched so the verb runs again; at
the commit point; then the daemon's start that finishes the job, itself
killed at each later step), or after a random delay.  Checked through the
daemons' status, the raw image files and the kept files: the group is never
half turned, the start finishes the job (its log says so), the images end
equal to the winner's volumes, and the loser's writes are in its kept files,
byte for byte.
"""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
import time

import pytest

from tests.support.daemons import Daemon, DaemonPool, cli_env, free_port, make_key, wait_for
from tests.support.nbd import run
from tests.support.tools import require_tool

MiB = 1 << 20
SIZE = MiB
BS = 4096
MEMBERS = ("db", "log")
FAILPOINT_SECONDS = 30
# The blocks each side wrote after the last common cycle (hosta) or the promotion (hostb).
A_BLOCKS = {"db": (3, 40), "log": (7,)}
B_BLOCKS = {"db": (3, 100, 101), "log": (200,)}


def uri(d, name: str) -> str:
    return f"nbd+unix:///{name}?socket={d.nbd_sock}"


def read_all(d, export: str) -> bytes:
    return run("nbdcopy", uri(d, export), "-").stdout


def write_blocks(d, name: str, blocks, pattern: int) -> None:
    run("qemu-io", "-f", "raw", *[a for b in blocks for a in ("-c", f"write -P {pattern} "
                                                                    f"{b * BS} {BS}")],
        "-c", "flush", uri(d, name))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """The split-brained pair's stores, made once: (root, ports, {member: bytes} of
    hosta's and hostb's volumes, group mirror name)."""
    require_tool("nbdcopy")
    require_tool("qemu-io")
    root = tmp_path_factory.mktemp("split")
    key = make_key(os.path.join(root, "mirror.key"))
    ports = {"a": free_port(), "b": free_port()}
    with DaemonPool(root) as pool:
        b = pool.start("b", key_file=key, metrics=False,
                       extra=("--node-name", "hostb", "--listen", f"127.0.0.1:{ports['b']}"))
        a = pool.start("a", key_file=key, metrics=False,
                       extra=("--node-name", "hosta", "--listen", f"127.0.0.1:{ports['a']}"))
        for i, name in enumerate(MEMBERS):
            a.cli("volume", "create", name, "--size", str(SIZE))
            run("qemu-io", "-f", "raw", "-c", f"write -P {i + 1} 0 256k", "-c", "flush",
                uri(a, name))
            a.cli("mirror", "start", name, "--to", b.listen, "--interval", "3600",
                  "--group", "app", "--compress", "none")
        a.cli("mirror", "sync", "db")
        for name in MEMBERS:
            write_blocks(a, name, A_BLOCKS[name], 3)
        a_bytes = {name: read_all(a, name) for name in MEMBERS}
        a.kill()
        (mirror,) = {r["group"] for r in b.status()["incoming"]}
        b.cli("mirror", "promote", f"hosta/{mirror}", "--force")
        for name in MEMBERS:
            write_blocks(b, name, B_BLOCKS[name], 4)
        b_bytes = {name: read_all(b, name) for name in MEMBERS}
    key_copy = os.path.join(root, "mirror.key")
    return {"root": str(root), "ports": ports, "key": key_copy, "a": a_bytes, "b": b_bytes,
            "mirror": mirror}


def copies(split, tmp_path, failpoint_on: str | None, failpoint: str | None):
    """Daemon objects (not started) for hosta and hostb on fresh copies of the stores, at
    the ports the stores know; ``failpoint_on`` ('a' or 'b') gets ``failpoint``."""
    found = {}
    for name, node in (("a", "hosta"), ("b", "hostb")):
        subprocess.run(["cp", "-a", "--sparse=always", os.path.join(split["root"], name),
                        os.path.join(tmp_path, name)], check=True)
        for sock in glob.glob(os.path.join(tmp_path, name, "**", "*.sock"), recursive=True):
            os.unlink(sock)  # hosta was killed: its control socket is a leftover
        extra = ["--node-name", node, "--listen", f"127.0.0.1:{split['ports'][name]}"]
        if name == failpoint_on:
            extra += ["--failpoint", f"{failpoint}={FAILPOINT_SECONDS}"]
        found[name] = Daemon(tmp_path, name, key_file=split["key"], metrics=False,
                             extra=tuple(extra))
    return found["a"], found["b"]


@pytest.fixture
def pool(tmp_path):
    with DaemonPool(tmp_path) as p:
        yield p


def started(pool, d: Daemon) -> Daemon:
    pool.started.append(d)
    return d.start()


def untouched(d: Daemon) -> bool:
    """On disk (the daemon is dead): every member still a volume with its base, no
    turn-back recorded, no image state, no role record saying secondary."""
    from cyclemirror.store import roles

    store = d.store
    return (all(os.path.exists(os.path.join(store, "volumes", n, "base.img")) for n in MEMBERS)
            and not glob.glob(os.path.join(store, "turnback", "*.json"))
            and not glob.glob(os.path.join(store, "mirrors", "*", "*.group.json"))
            and all(roles.load_role(store, n).role != roles.SECONDARY for n in MEMBERS))


def turned_back(d: Daemon, peer: str) -> list[dict]:
    """Seen through status: no member a volume, each an image of ``peer`` and secondary,
    no turn-back left over; returns the members' kept-file records."""
    st = d.status()
    assert not {v["name"] for v in st["volumes"]} & set(MEMBERS), st["volumes"]
    images = {r["volume"]: r for r in st["incoming"]}
    assert sorted(images) == sorted(MEMBERS) and {r["source_name"] for r in
                                                  images.values()} == {peer}, images
    rows = {r["volume"]: r for r in st["roles"] if r.get("volume") in MEMBERS}
    assert {rows[n]["role"] for n in MEMBERS} == {"secondary"}, rows
    assert not glob.glob(os.path.join(d.store, "turnback", "*"))
    return [k for n in MEMBERS for k in rows[n]["kept"]]


def check_kept(kept: list[dict], written: dict, base: dict, pattern: int) -> None:
    """One kept file per member, holding exactly the blocks written there (``pattern``),
    holes elsewhere; ``base`` only gives the size."""
    by_member = {os.path.basename(k["path"]).split("-")[0]: k for k in kept}
    assert sorted(by_member) == sorted(written) and len(kept) == len(written), kept
    for name, blocks in written.items():
        with open(by_member[name]["path"], "rb") as f:
            data = f.read()
        assert len(data) == len(base[name]), name
        expect = bytearray(len(data))
        for blk in blocks:
            expect[blk * BS:(blk + 1) * BS] = bytes([pattern]) * BS
        assert data == bytes(expect), f"kept file of {name} is not its divergent blocks"
        assert by_member[name]["bytes"] == len(blocks) * BS


def cli_proc(d: Daemon, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cyclemirror.cli", "--store", d.store,
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env())


# -- kill -9 at each step: the verb up to its commit point, then the start that finishes it --

def set_failpoint(d: Daemon, failpoint: str | None) -> None:
    if "--failpoint" in d.args:
        i = d.args.index("--failpoint")
        del d.args[i:i + 2]
    if failpoint is not None:
        d.args += ["--failpoint", f"{failpoint}={FAILPOINT_SECONDS}"]


def spawn(d: Daemon) -> None:
    """Start the daemon without waiting for its control socket: a start that finishes a
    turn-back sleeps at the failpoint before it serves anything."""
    with open(d.log_path, "a") as log:
        d.proc = subprocess.Popen([*d.prefix, *d.command, "--store", d.store, "serve",
                                   *d.args], stdout=log, stderr=subprocess.STDOUT,
                                  env=d.env or cli_env())


def reached(d: Daemon, failpoint: str) -> bool:
    """Whether the daemon is provably inside ``failpoint`` (it sleeps there)."""
    assert d.proc.poll() is None, f"daemon {d.name} exited {d.proc.returncode}:\n{d.log()}"
    store = d.store
    if failpoint == "turnback.checked":
        return "checked; recording the turn-back" in d.log()
    if failpoint == "turnback.recorded":
        return bool(glob.glob(os.path.join(store, "turnback", "*.json")))
    if failpoint == "turnback.released":  # the first member's base is its image
        return bool(glob.glob(os.path.join(store, "mirrors", "*", "db.img")))
    if failpoint == "turnback.committed":
        return bool(glob.glob(os.path.join(store, "mirrors", "*", "*.group.json")))
    raise AssertionError(failpoint)


def kill_at(d: Daemon, failpoint: str) -> None:
    wait_for(lambda: reached(d, failpoint), FAILPOINT_SECONDS / 2, f"{d.name} at {failpoint}")
    d.kill()


def cut_recoveries(d: Daemon) -> None:
    """The intent is recorded and the daemon dead: kill each start that finishes it, at
    each later step in turn; the intent stays until a start gets to the end."""
    for failpoint in ("turnback.released", "turnback.committed"):
        set_failpoint(d, failpoint)
        spawn(d)
        kill_at(d, failpoint)
        assert glob.glob(os.path.join(d.store, "turnback", "*.json")), failpoint
    set_failpoint(d, None)
    d.start()


def start_failback(a: Daemon, b: Daemon) -> None:
    """hostb names hosta the loser and mirrors the group back to it."""
    b.cli("mirror", "resolve", "db", "--discard-changes-on", "hosta")
    for name in MEMBERS:
        b.cli("mirror", "start", name, "--to", a.listen, "--interval", "3600", "--group",
              "app", "--compress", "none")


def image(d: Daemon, peer_store: str, name: str) -> bytes:
    """A mirror image, read as the plain raw file it is (docs/design.md)."""
    with open(os.path.join(peer_store, "store.json")) as f:
        node = json.load(f)["node_id"]
    with open(os.path.join(d.store, "mirrors", node, name + ".img"), "rb") as f:
        return f.read()


def failback_ends_right(split, a: Daemon, b: Daemon) -> None:
    rows = json.loads(b.cli("mirror", "sync", "db", "--json", "--timeout", "120").stdout)
    assert all(r["synced"] for r in rows), rows
    kept = turned_back(a, "hostb")
    for name in MEMBERS:
        assert image(a, os.path.join(split["root"], "b"), name) == split["b"][name], name
    check_kept(kept, A_BLOCKS, split["a"], 3)


def test_kill_9_at_each_step_of_a_group_failback_and_of_the_start_that_finishes_it(
        split, tmp_path, pool):
    a, b = copies(split, tmp_path, "a", "turnback.checked")
    started(pool, a)
    started(pool, b)
    start_failback(a, b)
    kill_at(a, "turnback.checked")
    assert untouched(a)  # before the commit point nothing changed...
    set_failpoint(a, "turnback.recorded")
    a.start()  # ...and hostb's reconnect runs the failback again, to its commit point
    kill_at(a, "turnback.recorded")
    assert not untouched(a)
    cut_recoveries(a)
    assert "finished the failback of group mirror" in a.log()
    check_kept(turned_back(a, "hostb"), A_BLOCKS, split["a"], 3)
    failback_ends_right(split, a, b)  # the delta from hostb, into images of one instant


def test_kill_9_at_a_random_instant_of_a_group_failback(split, tmp_path, pool):
    rng = random.Random(int(os.environ.get("TURNBACK_CRASH_SEED", "1")))
    a, b = copies(split, tmp_path, None, None)
    started(pool, a)
    started(pool, b)
    b.cli("mirror", "resolve", "db", "--discard-changes-on", "hosta")
    b.cli("mirror", "start", "db", "--to", a.listen, "--interval", "3600", "--group", "app",
          "--compress", "none")
    last = cli_proc(b, "mirror", "start", "log", "--to", a.listen, "--interval", "3600",
                    "--group", "app", "--compress", "none")
    time.sleep(rng.uniform(0.0, 1.0))  # the CLI's start-up is most of this
    a.kill()
    assert last.wait(60) == 0, last.communicate()
    a.start()
    failback_ends_right(split, a, b)


# -- the new primary's split brain resolution that discards its own writes -------------------

def discard_ends_right(split, a: Daemon, b: Daemon, pool) -> None:
    """hostb holds hosta's images again, its writes kept; hosta (never told it was
    demoted) mirrors on: its next cycle makes the images equal to its volumes."""
    check_kept(turned_back(b, "hosta"), B_BLOCKS, split["b"], 4)
    started(pool, a)
    rows = json.loads(a.cli("mirror", "sync", "db", "--json", "--timeout", "120").stdout)
    assert all(r["synced"] for r in rows), rows
    for name in MEMBERS:
        assert image(b, os.path.join(split["root"], "a"), name) == split["a"][name], name
    check_kept(turned_back(b, "hosta"), B_BLOCKS, split["b"], 4)  # still there, intact


def resolve_until_killed(b: Daemon, failpoint: str) -> None:
    proc = cli_proc(b, "mirror", "resolve", "db", "--discard-changes-on", "hostb", "--json")
    try:
        wait_for(lambda: reached(b, failpoint) or proc.poll() is not None,
                 FAILPOINT_SECONDS / 2, f"the resolve to reach {failpoint}")
        assert proc.poll() is None, (proc.returncode, proc.communicate())
        b.kill()
    finally:
        proc.wait(30)
    assert proc.returncode != 0  # its daemon died under it


def test_kill_9_at_each_step_of_a_discard_of_the_new_primarys_writes(split, tmp_path, pool):
    a, b = copies(split, tmp_path, "b", "turnback.checked")
    started(pool, b)
    resolve_until_killed(b, "turnback.checked")
    assert untouched(b)  # before the commit point nothing changed: it runs again
    set_failpoint(b, "turnback.recorded")
    b.start()
    assert {v["name"] for v in b.status()["volumes"]} >= set(MEMBERS)
    resolve_until_killed(b, "turnback.recorded")
    assert not untouched(b)
    cut_recoveries(b)
    assert "finished the split brain resolution" in b.log()
    # ...and only that: no start took the turn-back for a promotion cut short
    assert "finished the promotion" not in b.log(), b.log()[-3000:]
    # Finished: there is no promoted primary left to resolve, and that is all it says.
    again = b.cli("mirror", "resolve", "db", "--discard-changes-on", "hostb", check=False)
    assert again.returncode == 10 and "not a promoted primary" in again.stderr, again
    discard_ends_right(split, a, b, pool)


def test_kill_9_at_a_random_instant_of_a_discard(split, tmp_path, pool):
    rng = random.Random(int(os.environ.get("TURNBACK_CRASH_SEED", "1")))
    a, b = copies(split, tmp_path, None, None)
    started(pool, b)
    proc = cli_proc(b, "mirror", "resolve", "db", "--discard-changes-on", "hostb")
    time.sleep(rng.uniform(0.0, 0.8))  # the CLI's start-up is most of this
    b.kill()
    proc.wait(30)
    b.start()
    if {v["name"] for v in b.status()["volumes"]} >= set(MEMBERS):
        assert untouched(b)  # cut before its commit point: run it again
        b.cli("mirror", "resolve", "db", "--discard-changes-on", "hostb")
    discard_ends_right(split, a, b, pool)
