"""kill -9 of the target daemon inside a promotion: after a restart the mirror is either
still the untouched mirror image or promoted whole, never torn, and promote can be run again.

Two real daemons: a mirrors a volume (or a consistency group of two) to b in two
cycles with different data, then a is killed (the source is lost).  b runs
``mirror promote --force`` with a failpoint (cyclemirror/failpoints.py) that
stops the promotion at one step: before its commit point (``promote.prepared``),
after a role record (``promote.recorded``), inside the store's adoption of an
image (``store.adopt_image``), after a member became a volume
(``promote.adopted``: for a group, between its two members).  The test waits
until the daemon is provably at that step (a file it made, or its log line),
kills it with SIGKILL, restarts it without the failpoint and checks, through
real NBD reads (nbdcopy), that every member holds exactly the bytes of the last
applied cycle, as a mirror image or as a volume, all members the same way; then
promote is run again and must finish (or answer the finished promotion).

The lost mirror (a volume, or the group) is made once per module; each case starts b
on its own copy of that stopped store, with the case's failpoint.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from tests.support.daemons import DaemonPool, cli_env, free_port, make_key, wait_for
from tests.support.nbd import run
from tests.support.tools import require_tool

MiB = 1 << 20
SIZE = 4 * MiB
FAILPOINT_SECONDS = 30


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    require_tool("nbdcopy")
    require_tool("qemu-io")
    return make_key(tmp_path_factory.mktemp("key") / "mirror.key")


@pytest.fixture
def world(tmp_path, key):
    with DaemonPool(tmp_path) as pool:
        yield pool, key


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory, key):
    """``mirrored(members)``: a fresh b whose store holds ``members`` mirrored from a lost a
    (``source_lost_after_two_cycles``), made once per module and copied for each test.

    The set-up (two daemons, two cycles written through NBD) is the same for every case;
    each case gets its own copy of b's stopped store and starts b on it with its own
    arguments, so a case still kills a daemon that never ran anything but its promotion."""
    made: dict[tuple, tuple] = {}
    pools = []

    def setup(members: list[str]) -> tuple:
        if tuple(members) not in made:
            root = tmp_path_factory.mktemp("lost-" + "-".join(members))
            pool = DaemonPool(root)
            pools.append(pool)
            b = pool.start("b", key_file=key, listen=True, metrics=False,
                           extra=("--node-name", "hostb"))
            made[tuple(members)] = (b.store, *source_lost_after_two_cycles(pool, key, members, b))
            b.stop()
        return made[tuple(members)]

    def fresh_b(pool, members: list[str], extra: tuple = ()):
        """b on a copy of the lost mirror's store: (b, mirror name, expected, cycle)."""
        store, mirror, expected, cycle = setup(members)
        shutil.copytree(store, os.path.join(pool.root, "b"), symlinks=True,
                        ignore=shutil.ignore_patterns("*.sock"))
        b = pool.start("b", key_file=key, listen=True, metrics=False,
                       extra=("--node-name", "hostb", *extra))
        return b, mirror, expected, cycle

    yield fresh_b
    for pool in pools:
        pool.__exit__(None, None, None)


def uri(d, name: str) -> str:
    return f"nbd+unix:///{name}?socket={d.nbd_sock}"


def digest(d, export: str) -> str:
    return hashlib.sha256(run("nbdcopy", uri(d, export), "-").stdout).hexdigest()


def write(d, name: str, pattern: int, offset: int, length: int) -> None:
    run("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", "-c", "flush",
        uri(d, name))


def source_lost_after_two_cycles(pool, key, members: list[str], b):
    """a mirrors ``members`` (a group if two) to b, cycles with patterns 1 then 2, and is
    killed; returns (the mirror's name on b, {member: digest of the last cycle}, cycle)."""
    a = pool.start("a", key_file=key, listen=True, metrics=False,
                   extra=("--node-name", "hosta"))
    group = ("--group", "app") if len(members) > 1 else ()
    for i, name in enumerate(members):
        a.cli("volume", "create", name, "--size", str(SIZE))
        write(a, name, 1, i * MiB, 2 * MiB)
        a.cli("mirror", "start", name, "--to", b.listen, "--interval", "3600", *group)
    a.cli("mirror", "sync", members[0])
    for i, name in enumerate(members):
        write(a, name, 2 + i, (i + 1) * MiB, 64 * 1024)
    rows = json.loads(a.cli("mirror", "sync", members[0], "--json").stdout)
    cycle = rows[0]["applied_cycle"]
    expected = {name: digest(a, name) for name in members}
    a.kill()
    incoming = b.status()["incoming"]
    assert sorted(r["volume"] for r in incoming) == sorted(members)
    assert {r["applied_cycle"] for r in incoming} == {cycle}
    return (incoming[0]["group"] or members[0]), expected, cycle


def reached(b, failpoint: str, members: list[str]) -> bool:
    """Whether the daemon is provably inside ``failpoint`` (it sleeps there)."""
    store = b.store
    if failpoint == "promote.prepared":
        return "recording the promotion" in b.log()
    if failpoint == "promote.recorded":
        return os.path.exists(os.path.join(store, "roles", members[0] + ".json"))
    if failpoint == "store.adopt_image":
        return bool(glob.glob(os.path.join(store, "mirrors", "*", ".promote-*", "volume.json")))
    if failpoint == "promote.adopted":
        return os.path.isdir(os.path.join(store, "volumes", members[0]))
    raise AssertionError(failpoint)


def check_whole(b, members: list[str], expected: dict, cycle: int) -> str:
    """Every member is the last cycle's bytes, all as images or all as volumes: which."""
    st = b.status()
    volumes = {v["name"] for v in st["volumes"]}
    images = {r["volume"]: r for r in st["incoming"]}
    if set(members) <= volumes:
        assert not images, f"promoted but images left: {sorted(images)}"
        for name in members:
            assert digest(b, name) == expected[name], f"volume {name} is torn"
        roles = {r["volume"]: r for r in st["roles"]}
        assert {(roles[n]["role"], roles[n]["promoted_from"]["cycle"]) for n in members} == {
            ("primary", cycle)}
        return "promoted"
    assert not (set(members) & volumes), f"half promoted: volumes {sorted(volumes)}"
    assert sorted(images) == sorted(members), f"images lost: {sorted(images)}"
    for name in members:
        assert images[name]["applied_cycle"] == cycle
        assert digest(b, f"mirror/hosta/{name}") == expected[name], f"image {name} is torn"
    assert not [r for r in st["roles"] if r.get("volume") in members]
    return "mirror"


def promote_cli(b, mirror: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cyclemirror.cli", "--store", b.store, "mirror", "promote",
         f"hosta/{mirror}", "--force", "--json"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=cli_env())


def restart_without_failpoints(b) -> None:
    args, b.args = b.args, []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--failpoint":
            skip = True
        else:
            b.args.append(arg)
    b.start()


def promote_again_and_check(b, mirror: str, members: list[str], expected: dict,
                            cycle: int) -> None:
    out = json.loads(b.cli("mirror", "promote", f"hosta/{mirror}", "--force",
                           "--json").stdout)
    assert out["volumes"] == members and out["cycle"] == cycle, out
    assert check_whole(b, members, expected, cycle) == "promoted"
    for name in members:  # writable volumes
        write(b, name, 9, 3 * MiB, 4096)


CASES = [(members, fp) for members in (["v"], ["db", "log"])
         for fp in ("promote.prepared", "promote.recorded", "store.adopt_image",
                    "promote.adopted")]


@pytest.mark.parametrize(("members", "failpoint"), CASES,
                         ids=[f"{'group' if len(m) > 1 else 'volume'}-{fp}" for m, fp in CASES])
def test_kill_9_inside_promote_leaves_the_mirror_or_the_promotion_whole(world, mirrored,
                                                                         members, failpoint):
    pool, _key = world
    b, mirror, expected, cycle = mirrored(pool, members,
                                          ("--failpoint", f"{failpoint}={FAILPOINT_SECONDS}"))
    proc = promote_cli(b, mirror)
    try:
        wait_for(lambda: reached(b, failpoint, members) or proc.poll() is not None,
                 FAILPOINT_SECONDS / 2, f"the promotion to reach {failpoint}")
        assert proc.poll() is None, (proc.returncode, proc.communicate())
        b.kill()
    finally:
        proc.wait(30)
    assert proc.returncode != 0  # its daemon died under it
    restart_without_failpoints(b)
    state = check_whole(b, members, expected, cycle)
    # Before the commit point nothing changed; from it on the restart finished the job.
    assert state == ("mirror" if failpoint == "promote.prepared" else "promoted")
    if state == "promoted":
        assert "finished the promotion" in b.log()
    promote_again_and_check(b, mirror, members, expected, cycle)


def test_kill_9_at_random_instants_of_a_group_promote(world, mirrored):
    """No failpoint: the kill lands wherever the promotion is after a random delay (most
    often before or after it, sometimes inside); whichever, the group is whole."""
    pool, _key = world
    members = ["db", "log"]
    b, mirror, expected, cycle = mirrored(pool, members)
    rng = random.Random(int(os.environ.get("PROMOTE_CRASH_SEED", "1")))
    seen = set()
    for _round in range(4):
        proc = promote_cli(b, mirror)
        time.sleep(rng.uniform(0.0, 0.6))  # the CLI's start-up is most of this
        b.kill()
        proc.wait(30)
        b.start()
        seen.add(check_whole(b, members, expected, cycle))
        if "promoted" in seen:
            break
    promote_again_and_check(b, mirror, members, expected, cycle)


# -- a group apply cut by kill -9, then promote ----------------------------------------------

def image_file(b, a_node: str, name: str) -> str:
    return os.path.join(b.store, "mirrors", a_node, name + ".img")


def test_a_group_apply_cut_by_kill_9_is_promoted_at_one_cycle(world):
    """The target is killed inside the apply of a group cycle, after the first member's
    image took its record and before the second's: the members' images differ in cycle
    on disk.  Promote must give both the same cycle (the committed one, redone)."""
    pool, key = world
    members = ["db", "log"]
    port = free_port()  # b keeps its address across the restart below
    b = pool.start("b", key_file=key, metrics=False,
                   extra=("--node-name", "hostb", "--listen", f"127.0.0.1:{port}"))
    a = pool.start("a", key_file=key, listen=True, metrics=False,
                   extra=("--node-name", "hosta"))
    for name in members:
        a.cli("volume", "create", name, "--size", str(SIZE))
        write(a, name, 1, 0, 2 * MiB)
        a.cli("mirror", "start", name, "--to", b.listen, "--interval", "3600", "--group", "app")
    a.cli("mirror", "sync", "db")
    incoming = b.status()["incoming"]
    assert sorted(r["volume"] for r in incoming) == members and not any(
        r["joining"] for r in incoming), incoming
    # From now on each record a delta applies sleeps.
    b.stop()
    b.args += ["--failpoint", f"receiver.apply_record={FAILPOINT_SECONDS}"]
    b.start()
    for name in members:
        write(a, name, 7, 3 * MiB, 64 * 1024)
    new = {name: digest(a, name) for name in members}
    sync = subprocess.Popen([sys.executable, "-m", "cyclemirror.cli", "--store", a.store,
                             "mirror", "sync", "db"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env())
    try:
        db_image = image_file(b, a.node_id, "db")

        def db_took_its_record() -> bool:
            with open(db_image, "rb") as f:
                f.seek(3 * MiB)
                return f.read(4096) == bytes([7]) * 4096

        wait_for(db_took_its_record, FAILPOINT_SECONDS / 2,
                 "the apply to write db's record (and sleep)")
        with open(image_file(b, a.node_id, "log"), "rb") as f:
            f.seek(3 * MiB)
            assert f.read(4096) == bytes(4096)  # log's image is still the old cycle
        b.kill()
        a.kill()  # the source is lost as well
    finally:
        sync.kill()
        sync.wait()
    restart_without_failpoints(b)
    (mirror,) = {r["group"] for r in b.status()["incoming"]}
    out = json.loads(b.cli("mirror", "promote", f"hosta/{mirror}", "--force", "--json").stdout)
    got = {name: digest(b, name) for name in members}
    # The cycle was committed before its apply began: it is redone into every member.
    assert got == new, ("not the committed cycle in every member", out)
    assert out["cycle"] == max(r["applied_cycle"] for r in incoming) + 1
