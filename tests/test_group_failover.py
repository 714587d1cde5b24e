"""Disaster recovery of a consistency group between two real daemons, with a real NBD writer.

Both hosts are ``cyclemirror serve`` subprocesses driven through the CLI.  A
writer (raw NBD connections, one per member, as an application holds them)
writes a counter ``i`` into block ``i % SLOTS`` of ``db`` and then of ``log``,
waiting for each reply.  So every image of the pair at a freeze instant is
fully determined by two counters, ``db``'s ``c`` and ``log``'s ``c`` or
``c - 1`` (``model``): an image that is not the model of its own highest
counter is torn, and a pair whose counters differ otherwise mixes instants.

Checked (docs/failover.md, "Consistency groups"): a group switchover holds
the writes of both members, promotes both on the target at the final group
cycle with every acknowledged write and nothing else, and mirrors them back
as a group; ``promote --force`` of the group after kill -9 of the source
gives both members at one freeze instant.
"""

from __future__ import annotations

import json
import struct
import threading

import pytest

from tests.support import nbd_rawclient as C
from tests.support.daemons import DaemonPool, make_key, wait_for
from tests.support.nbd import run
from tests.support.tools import require_tool

MiB = 1 << 20
SIZE = 4 * MiB
BS = 4096
SLOTS = 64
MEMBERS = ("db", "log")


def block_of(counter: int) -> bytes:
    return struct.pack("<Q", counter) * (BS // 8)


def model(counter: int) -> bytes:
    """The first SLOTS blocks of a member whose last write was ``counter``."""
    out = bytearray(SLOTS * BS)
    for slot in range(SLOTS):
        newest = counter - ((counter - slot) % SLOTS) if counter >= slot else 0
        if newest > 0:
            out[slot * BS:(slot + 1) * BS] = block_of(newest)
    return bytes(out)


def counter_of(image: bytes, what: str) -> int:
    """The member's last counter, checked against the model (a torn image fails)."""
    values = [struct.unpack_from("<Q", image, slot * BS)[0] for slot in range(SLOTS)]
    c = max(values)
    assert image[:SLOTS * BS] == model(c), f"{what}: not the image of any one instant " \
                                          f"(counters {values})"
    assert image[SLOTS * BS:] == bytes(len(image) - SLOTS * BS), f"{what}: stray data"
    return c


class PairWriter(threading.Thread):
    """Writes counter i to db, then to log, each acknowledged before the next; stops at
    the first refused write (or when told) and keeps the last acknowledged counters."""

    def __init__(self, nbd_sock: str):
        super().__init__(daemon=True)
        self.socks, self.readers = {}, {}
        for name in MEMBERS:
            sock = C.connect_unix(nbd_sock)
            C.open_export(sock, name, structured=False)
            self.socks[name], self.readers[name] = sock, C.ReplyReader(sock, False)
        self.acked = dict.fromkeys(MEMBERS, 0)
        self.error: int | None = None
        self.failure: BaseException | None = None
        self.stop = threading.Event()

    def run(self):
        i = 0
        try:
            while not self.stop.is_set():
                i += 1
                for name in MEMBERS:
                    offset = (i % SLOTS) * BS
                    self.socks[name].sendall(C.request(C.CMD_WRITE, offset, BS, handle=i,
                                                       payload=block_of(i)))
                    reply = self.readers[name].next()
                    if reply.error:
                        self.error = reply.error
                        return
                    self.acked[name] = i
        except (OSError, EOFError, AssertionError) as exc:  # the connection went (kill -9)
            self.failure = exc

    def close(self):
        self.stop.set()
        self.join(60)
        for sock in self.socks.values():
            sock.close()


@pytest.fixture
def pair(tmp_path):
    require_tool("nbdcopy")
    key = make_key(tmp_path / "mirror.key")
    with DaemonPool(tmp_path) as pool:
        a = pool.start("a", key_file=key, listen=True, metrics=False,
                       extra=("--node-name", "hosta"))
        b = pool.start("b", key_file=key, listen=True, metrics=False,
                       extra=("--node-name", "hostb"))
        yield pool, a, b


def uri(d, name: str) -> str:
    return f"nbd+unix:///{name}?socket={d.nbd_sock}"


def image_bytes(d, export: str) -> bytes:
    return run("nbdcopy", uri(d, export), "-").stdout


def role_row(d, volume: str) -> dict | None:
    for row in d.status().get("roles", []):
        if row.get("volume") == volume:
            return row
    return None


def mirrored_group(a, b) -> str:
    """db and log on a, mirrored to b as group app; returns the group's mirror on b."""
    for name in MEMBERS:
        a.cli("volume", "create", name, "--size", str(SIZE))
        a.cli("mirror", "start", name, "--to", b.listen, "--group", "app", "--interval", "0.2")
    rows = json.loads(a.cli("mirror", "sync", "db", "--json").stdout)
    assert {r["volume"] for r in rows} == set(MEMBERS)
    incoming = wait_for(lambda: b.status()["incoming"], 30, "the group on b")
    assert sorted(r["volume"] for r in incoming) == list(MEMBERS), incoming
    assert len({r["group"] for r in incoming}) == 1 and incoming[0]["group"], incoming
    return incoming[0]["group"]


def wait_writes(writer: PairWriter, n: int) -> None:
    wait_for(lambda: writer.acked["log"] >= n or writer.failure or writer.error, 60,
             f"{n} writes to both members")
    assert writer.failure is None and writer.error is None, (writer.failure, writer.error)


def test_a_group_switches_over_whole_with_every_acknowledged_write(pair):
    _pool, a, b = pair
    group_mirror = mirrored_group(a, b)
    assert group_mirror.startswith("app-")
    writer = PairWriter(a.nbd_sock)
    writer.start()
    try:
        wait_writes(writer, 300)  # several cycles go by meanwhile (interval 0.2 s)
        out = json.loads(a.cli("mirror", "switchover", "log", "--to", b.listen,
                               "--json").stdout)
        writer.join(60)  # the writer stops at its first refused write
    finally:
        writer.close()
    assert out["group"] == "app" and out["volumes"] == list(MEMBERS), out
    assert out["to"] == b.listen and out["mirroring_back_to"] == a.listen
    assert writer.error == 1, (writer.error, writer.failure)  # EPERM: the writes were held
    # Every acknowledged write, and nothing else, is on the new primary; both members
    # as of one instant (the last one the writer reached).
    counters = {name: counter_of(image_bytes(b, name), f"{name} on b") for name in MEMBERS}
    assert counters == writer.acked, (counters, writer.acked)
    assert counters["db"] - counters["log"] in (0, 1)
    rows = {name: role_row(b, name) for name in MEMBERS}
    assert {r["role"] for r in rows.values()} == {"primary"}
    assert {r["epoch"] for r in rows.values()} == {rows["db"]["epoch"]}  # one generation
    assert {r["promoted_from"]["cycle"] for r in rows.values()} == {out["cycle"]}
    assert {r["promoted_from"]["mirror"] for r in rows.values()} == {group_mirror}
    assert not any(r["promoted_from"]["forced"] for r in rows.values())
    # Demoted, or already turned into b's images by the mirror back (a failback): the
    # turn-back renames the members one by one, so a status in between may show both.
    roles = {r["volume"]: r["role"] for r in a.status().get("roles", []) if r.get("volume") in MEMBERS}
    assert set(roles) == set(MEMBERS) and set(roles.values()) <= {"demoted", "secondary"}, roles
    assert b.status()["incoming"] == []
    # The old primary refuses new writes on new connections too.
    proc = run("qemu-io", "-f", "raw", "-c", "write -P 9 0 4k", uri(a, "db"), check=False)
    assert proc.returncode != 0 or b"failed" in proc.stdout + proc.stderr
    # b mirrors the members back to a as one group.
    back = wait_for(lambda: [r for r in b.status()["mirrors"] if r["group"] == "app"], 60,
                    "b's group mirror back to a")
    assert {r["volume"] for r in back} == set(MEMBERS)
    run("qemu-io", "-f", "raw", "-c", f"write -P 5 {2 * MiB} 8k", "-c", "flush", uri(b, "db"))
    rows = json.loads(b.cli("mirror", "sync", "db", "--json").stdout)
    incoming = wait_for(lambda: a.status()["incoming"], 60, "the group on a")
    assert {(r["group"], r["source_name"]) for r in incoming} == {(group_mirror, "hostb")}
    for name in MEMBERS:
        assert image_bytes(a, f"mirror/hostb/{name}") == image_bytes(b, name), name
    # A failback of the group: a's members became the images, no full copy of either.
    assert sum(r["shipped_bytes_total"] for r in rows) < SIZE // 4, rows
    assert {role_row(a, name)["role"] for name in MEMBERS} == {"secondary"}
    assert [v for v in a.status()["volumes"] if v["name"] in MEMBERS] == []


def test_a_group_is_promoted_at_one_instant_after_kill_9_of_its_source(pair):
    _pool, a, b = pair
    group_mirror = mirrored_group(a, b)
    writer = PairWriter(a.nbd_sock)
    writer.start()
    try:
        wait_writes(writer, 200)
        before = b.status()["incoming"][0]["applied_cycle"]
        wait_for(lambda: b.status()["incoming"][0]["applied_cycle"] >= before + 2, 60,
                 "two more group cycles under writes")
        a.kill()  # kill -9 in the middle of writing and mirroring
    finally:
        writer.close()
    # Without --force: refused while the source may still be connected, or promoted; the
    # session of a killed source ends, so wait for the refusal to turn into a promotion.
    proc = b.cli("mirror", "promote", f"hosta/{group_mirror}", "--as", "x", check=False)
    assert proc.returncode == 2 and "--as" in proc.stderr, proc.stderr  # not for a group
    out = json.loads(b.cli("mirror", "promote", f"hosta/{group_mirror}", "--force",
                           "--json").stdout)
    assert out["group"] is True and out["volumes"] == list(MEMBERS) and out["forced"]
    assert [m["volume"] for m in out["members"]] == list(MEMBERS)
    counters = {name: counter_of(image_bytes(b, name), f"{name} on b") for name in MEMBERS}
    assert counters["db"] - counters["log"] in (0, 1), counters  # one instant
    assert 0 < counters["log"] <= writer.acked["log"]
    rows = {name: role_row(b, name) for name in MEMBERS}
    assert {(r["role"], r["epoch"], r["promoted_from"]["cycle"]) for r in rows.values()} == {
        ("primary", rows["db"]["epoch"], out["cycle"])}
    assert all(r["promoted_from"]["forced"] for r in rows.values())
    # Both are writable volumes now.
    for name in MEMBERS:
        run("qemu-io", "-f", "raw", "-c", f"write -P 3 {3 * MiB} 4k", "-c", "flush",
            uri(b, name))
    # Promoting again answers the promotion (nothing changes).
    again = json.loads(b.cli("mirror", "promote", f"hosta/{group_mirror}", "--json").stdout)
    assert again["resumed"] and again["generation"] == out["generation"]
    # The old source comes back: its group mirror is refused, every member demoted.
    a.start()
    wait_for(lambda: {(role_row(a, n) or {}).get("role") for n in MEMBERS} == {"demoted"},
             60, "the old source's members to be demoted")
    assert "hostb promoted its image" in role_row(a, "log")["demoted"]["message"]
    proc = run("qemu-io", "-f", "raw", "-c", "write -P 9 0 4k", uri(a, "db"), check=False)
    assert proc.returncode != 0 or b"failed" in proc.stdout + proc.stderr
    assert b.status()["incoming"] == []
    for name in MEMBERS:  # nothing of a's reached b's volumes
        assert counter_of(image_bytes(b, name)[:SLOTS * BS] + bytes(SIZE - SLOTS * BS),
                          name) == counters[name]


# -- refusals, in one process (a real target server and driver over sockets) --------------

def _synced_group(tmp_path):
    """A group db+log mirrored once into a target store; returns (src, dst, node, mirror)."""
    from cyclemirror import keys
    from cyclemirror.receiver import TargetServer
    from cyclemirror.sender import MirrorDriver, MirrorOptions
    from cyclemirror.sender.group import VolumeGroup
    from cyclemirror.store import Store

    key = keys.generate_key()
    src = Store.create(str(tmp_path / "src"))
    dst = Store.create(str(tmp_path / "dst"))
    server = TargetServer(dst, key, ("127.0.0.1", 0))
    server.start()
    try:
        vols = [src.create_volume(name, 2 * MiB) for name in MEMBERS]
        for i, vol in enumerate(vols):
            vol.write(0, bytes([i + 1]) * 65536)
        driver = MirrorDriver(VolumeGroup(src, "app", vols), server.address, key,
                              MirrorOptions(interval=3600, retry_initial=0.05, retry_max=0.2),
                              store=src)
        driver.start()
        try:
            driver.sync(30)
        finally:
            driver.stop()
    finally:
        server.stop()
    return src, dst, src.node_id, "app"


def _unchanged(dst, node: str, mirror: str) -> None:
    import os

    from cyclemirror.store import roles

    assert os.path.exists(os.path.join(dst.path, "mirrors", node, mirror + ".group.json"))
    assert roles.all_roles(dst.path) == ([], [])
    assert dst.list_volumes() == []


def test_promote_refuses_a_group_with_a_member_that_holds_no_cycle_yet(tmp_path):
    from cyclemirror.errors import RoleError
    from cyclemirror.receiver.mirror import Mirror
    from cyclemirror.receiver.promote import promote
    from cyclemirror.receiver.state import VolumeSpec
    from cyclemirror.wire.link import MAX_CHUNK

    src, dst, node, mirror = _synced_group(tmp_path)
    try:
        # The source added a member: the target knows it (zeros) until the next cycle.
        specs = [VolumeSpec(n, 2 * MiB, BS) for n in (*MEMBERS, "new")]
        Mirror.open(dst.path, node, None, mirror, True, specs, MAX_CHUNK).close()
        with pytest.raises(RoleError, match="new joined the group .* mix instants"):
            promote(dst, None, node, mirror, force=True)
        _unchanged(dst, node, mirror)
    finally:
        src.close()
        dst.close()


def test_promote_refuses_records_that_name_different_cycles(tmp_path):
    import time

    from cyclemirror.errors import IntegrityError, UsageError
    from cyclemirror.receiver.promote import promote
    from cyclemirror.store import roles

    src, dst, node, mirror = _synced_group(tmp_path)
    try:
        with pytest.raises(UsageError, match="--as"):
            promote(dst, None, node, mirror, as_name="x", force=True)
        _unchanged(dst, node, mirror)
        # A cut promotion whose records disagree (a hand-edited store): never a mix.
        for name, cycle in (("db", 1), ("log", 2)):
            p = {"source_node": node, "source_name": None, "mirror": mirror,
                 "generation": f"{'0' * 16}:{cycle}", "cycle": cycle, "freeze_time": 1.0,
                 "forced": True, "time": time.time()}
            roles.save_role(dst.path, roles.RoleRecord(
                volume=name, role=roles.PRIMARY, epoch="1" * 16, parent=p["generation"],
                promoted_from=p, changed=time.time()))
        with pytest.raises(IntegrityError, match="would mix instants"):
            promote(dst, None, node, mirror, force=True)
        assert dst.list_volumes() == []
    finally:
        src.close()
        dst.close()


def test_a_group_switchover_that_cannot_finish_its_final_cycle_changes_nothing(pair):
    _pool, a, b = pair
    mirrored_group(a, b)
    b.kill()  # the target is gone: the final cycle cannot apply
    proc = a.cli("mirror", "switchover", "db", "--to", b.listen, "--timeout", "2", check=False)
    assert proc.returncode == 8 and "error" in proc.stderr, proc  # DeadlineError
    # Both members are primary and writable again, and still mirrored as the group.
    assert {role_row(a, name)["role"] for name in MEMBERS} == {"primary"}
    for name in MEMBERS:
        run("qemu-io", "-f", "raw", "-c", "write -P 4 0 4k", "-c", "flush", uri(a, name))
    assert {r["volume"] for r in a.status()["mirrors"] if r["group"] == "app"} == set(MEMBERS)


# -- failback of a group without a full copy -----------------------------------------------

PREFILL = (1 * MiB, 2 * MiB)  # (offset, length) of data each member holds before the mirror


def counters_at_one_instant(d, prefix: str = "") -> dict:
    """Each member's counter (its SLOTS blocks checked against the model), and that the
    pair is of one instant: log's counter is db's or one behind."""
    counters = {}
    for name in MEMBERS:
        image = image_bytes(d, prefix + name)
        counters[name] = counter_of(image[:SLOTS * BS] + bytes(SIZE - SLOTS * BS),
                                    f"{prefix}{name} on {d.name}")
    assert counters["db"] - counters["log"] in (0, 1), counters
    return counters


def prefilled_group(a, b) -> str:
    """mirrored_group, with PREFILL bytes of data in each member (a full copy of the pair
    would ship at least 2 * PREFILL[1] bytes)."""
    for name in MEMBERS:
        a.cli("volume", "create", name, "--size", str(SIZE))
        run("qemu-io", "-f", "raw", "-c", f"write -P 7 {PREFILL[0]} {PREFILL[1]}", "-c",
            "flush", uri(a, name))
    for name in MEMBERS:
        a.cli("mirror", "start", name, "--to", b.listen, "--group", "app", "--interval", "0.2")
    a.cli("mirror", "sync", "db")
    return wait_for(lambda: b.status()["incoming"], 30, "the group on b")[0]["group"]


def mirror_group_back(b, a) -> list[dict]:
    """On b: mirror both members back to a as group app; wait for a cycle; the rows."""
    for name in MEMBERS:
        b.cli("mirror", "start", name, "--to", a.listen, "--group", "app", "--interval", "60",
              "--compress", "none")
    return json.loads(b.cli("mirror", "sync", "db", "--json", check=False).stdout or "[]")


def test_a_forced_group_failback_ships_only_the_differing_blocks_at_one_instant(pair):
    _pool, a, b = pair
    group_mirror = prefilled_group(a, b)
    writer = PairWriter(a.nbd_sock)
    writer.start()
    try:
        wait_writes(writer, 200)
        before = b.status()["incoming"][0]["applied_cycle"]
        wait_for(lambda: b.status()["incoming"][0]["applied_cycle"] >= before + 2, 60,
                 "two more group cycles under writes")
        a.kill()  # kill -9 in the middle of writing and mirroring
    finally:
        writer.close()
    out = json.loads(b.cli("mirror", "promote", f"hosta/{group_mirror}", "--force",
                           "--json").stdout)
    on_b = counters_at_one_instant(b)
    # Writes on the new primary, in both members: the blocks that differ from cycle k.
    written = 0
    for name, pattern, length in (("db", 5, 64 * 1024), ("log", 6, 32 * 1024)):
        run("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {3 * MiB} {length}", "-c",
            "flush", uri(b, name))
        written += length
    a.start()
    wait_for(lambda: {(role_row(a, n) or {}).get("role") for n in MEMBERS} == {"demoted"},
             60, "the old primary's members to be demoted")
    on_a = {name: counter_of(image_bytes(a, name)[:SLOTS * BS] + bytes(SIZE - SLOTS * BS),
                             f"{name} on a") for name in MEMBERS}
    # The group's lineage: one epoch for both members on b, branched from a's group cycle.
    rows = {name: role_row(b, name) for name in MEMBERS}
    assert {(r["parent"], r["promoted_from"]["cycle"]) for r in rows.values()} == {
        (out["parent"], out["cycle"])}
    assert {role_row(a, n)["epoch"] for n in MEMBERS} == {out["parent"].split(":")[0]}
    rows = mirror_group_back(b, a)
    if on_a != on_b:
        # a wrote after the common cycle too (kill -9 under writes): split brain, refused
        # with both sides named, nothing changed on a until the user names the loser.
        row = wait_for(lambda: [r for r in b.status()["mirrors"] if r["phase"] == "broken"],
                       60, "the split-brain refusal")[0]
        assert "split brain on group app" in row["last_error"], row
        assert "hosta" in row["last_error"] and "hostb" in row["last_error"], row
        assert {v["name"] for v in a.status()["volumes"]} >= set(MEMBERS)
        resolved = json.loads(b.cli("mirror", "resolve", "log", "--discard-changes-on",
                                    "hosta", "--json").stdout)
        assert resolved["volumes"] == list(MEMBERS), resolved
        b.cli("mirror", "resume", "db")
        rows = json.loads(b.cli("mirror", "sync", "db", "--json").stdout)
    assert {r["phase"] for r in rows} != {"broken"}, rows
    # No full copy: the wire carried the blocks b wrote since the promotion (framing and
    # messages on top), not the members' PREFILL data nor a's own divergent blocks.
    shipped = rows[0]["shipped_bytes_total"]
    assert written <= shipped <= 1.1 * written, (shipped, written)
    # ... known from the seeded owed set, not found by reading both sides' blocks.
    assert "a failback to hosta" in b.log() and "hash comparison" not in b.log()
    incoming = a.status()["incoming"]
    assert {(r["group"], r["source_name"], r["volume"]) for r in incoming} == {
        (group_mirror, "hostb", name) for name in MEMBERS}
    assert {role_row(a, n)["role"] for n in MEMBERS} == {"secondary"}
    for name in MEMBERS:  # images equal, byte for byte
        assert image_bytes(a, f"mirror/hostb/{name}") == image_bytes(b, name), name
    assert counters_at_one_instant(a, "mirror/hostb/") == on_b
    if on_a != on_b:  # a's divergent writes are kept, one file per member that wrote
        kept = [k for n in MEMBERS for k in role_row(a, n)["kept"]]
        assert kept and all(k["generation"] == out["parent"] for k in kept), kept
    # And a planned switchover of the group back to a: both members primary on a with
    # every write, b's members turned into a's images with no full copy.
    back = json.loads(b.cli("mirror", "switchover", "db", "--to", a.listen,
                            "--json").stdout)
    assert back["volumes"] == list(MEMBERS), back
    assert {role_row(a, n)["role"] for n in MEMBERS} == {"primary"}
    assert counters_at_one_instant(a) == on_b
    run("qemu-io", "-f", "raw", "-c", f"write -P 8 {3 * MiB} 4k", "-c", "flush", uri(a, "log"))
    wait_for(lambda: len(a.status()["mirrors"]) == 2, 60, "a's group mirror back to b")
    rows = json.loads(a.cli("mirror", "sync", "db", "--json").stdout)
    assert rows[0]["shipped_bytes_total"] <= 1.1 * 4096 + 4096, rows
    assert {role_row(b, n)["role"] for n in MEMBERS} == {"secondary"}
    for name in MEMBERS:
        assert image_bytes(b, f"mirror/hosta/{name}") == image_bytes(a, name), name


def _old_primary_group(tmp_path):
    """A store holding group db+log as an old primary: one epoch for both (the group's),
    frozen through cycle 3; returns (store, epoch)."""
    import time

    from cyclemirror.store import Store, roles

    store = Store.create(str(tmp_path / "old"))
    for i, name in enumerate(MEMBERS):
        store.create_volume(name, 2 * MiB).write(0, bytes([i + 1]) * 65536)
    recs = roles.group_records(store.path, list(MEMBERS), time.time())
    assert len({r.epoch for r in recs}) == 1
    for _ in range(3):
        store.freeze_group(list(MEMBERS))
    return store, recs[0].epoch


def _failback_open(store, epoch: str, written: int, discard_on: str = ""):
    import types

    from cyclemirror.receiver import resync

    server = types.SimpleNamespace(store=store, node_id=store.node_id, node_name="hosta",
                                   on_failback=None)
    open_msg = {"node_id": "b" * 16, "node_name": "hostb", "mirror": "app-0123abcd",
                "group": True, "volumes": [{"name": n, "size": 2 * MiB, "block_size": BS}
                                           for n in MEMBERS]}
    msg = {"epoch": "c" * 16, "parent": f"{epoch}:3", "parent_freeze_time": 1.0,
           "written_blocks": written, "discard_on": discard_on}
    return resync.prepare(server, open_msg, msg)


def test_group_failback_refusals_change_nothing_and_the_loser_is_kept(tmp_path):
    import os
    import time

    from cyclemirror.errors import ProtocolError, SplitBrainError
    from cyclemirror.receiver.state import MirrorState
    from cyclemirror.store import roles

    store, epoch = _old_primary_group(tmp_path)
    try:
        mirrors = os.path.join(store.path, "mirrors")
        # A member of another history (removed and re-created, say): the lineages do
        # not meet for the whole group, so nothing is turned.
        rec = roles.load_role(store.path, "log")
        rec.epoch, rec.changed = "d" * 16, time.time()
        roles.save_role(store.path, rec)
        with pytest.raises(ProtocolError, match="log is not a volume of that generation"):
            _failback_open(store, epoch, written=4)
        rec.epoch = epoch
        roles.save_role(store.path, rec)
        # The old primary wrote after the common cycle 3, and so did the new one.
        store.open_volume("log").write(8192, b"\x09" * BS)
        with pytest.raises(SplitBrainError, match=r"split brain on group app \(db, log\).*"
                                                  r"wrote 4096 bytes.*wrote 16384 bytes"):
            _failback_open(store, epoch, written=4)
        assert store.list_volumes() == sorted(MEMBERS) and not os.path.exists(mirrors)
        assert {roles.load_role(store.path, n).role for n in MEMBERS} == {"primary"}
        # The user named this node to lose: both members become the group's images at
        # cycle 3, in one state; log's divergent block is kept in a file.
        done = _failback_open(store, epoch, written=4, discard_on=store.node_id)
        assert done["cycle"] == 3 and len(done["kept"]) == 1, done
        st = MirrorState.load(os.path.join(mirrors, "b" * 16, "app-0123abcd.group.json"))
        assert (st.group, st.applied_cycle, [v.name for v in st.volumes]) == (
            True, 3, list(MEMBERS))
        assert st.extra["lineage"]["parent"] == f"{epoch}:3"
        assert store.list_volumes() == []
        for i, name in enumerate(MEMBERS):
            with open(os.path.join(mirrors, "b" * 16, name + ".img"), "rb") as f:
                image = f.read()
            assert image[:65536] == bytes([i + 1]) * 65536 and not any(image[65536:]), name
            assert roles.load_role(store.path, name).role == "secondary"
        with open(done["kept"][0]["path"], "rb") as f:
            f.seek(8192)
            assert f.read(BS) == b"\x09" * BS
    finally:
        store.close()


def test_a_promoted_group_that_loses_a_split_brain_turns_back_into_the_images(tmp_path):
    """discard-my-data on a promoted group: every member back to the group cycle's image,
    its writes kept, and the old primary's next cycle applies to the images as a delta."""
    import os

    from cyclemirror import keys
    from cyclemirror.receiver import TargetServer
    from cyclemirror.receiver.discard import discard_here
    from cyclemirror.receiver.promote import promote
    from cyclemirror.receiver.state import MirrorState
    from cyclemirror.sender import MirrorDriver, MirrorOptions
    from cyclemirror.sender.group import VolumeGroup
    from cyclemirror.store import Store, roles

    key = keys.generate_key()
    src = Store.create(str(tmp_path / "src"))
    dst = Store.create(str(tmp_path / "dst"))
    server = TargetServer(dst, key, ("127.0.0.1", 0))
    server.start()
    try:
        vols = [src.create_volume(name, 2 * MiB) for name in MEMBERS]
        for i, vol in enumerate(vols):
            vol.write(0, bytes([i + 1]) * 65536)

        def run_driver():
            driver = MirrorDriver(VolumeGroup(src, "app", vols), server.address, key,
                                  MirrorOptions(interval=3600, retry_initial=0.05,
                                                retry_max=0.2), store=src)
            driver.start()
            try:
                return driver.sync(30), next(iter(driver.status()["targets"].values()))
            finally:
                driver.stop()

        k, _row = run_driver()
        server.stop()
        out = promote(dst, None, src.node_id, "app", force=True)
        assert out["volumes"] == list(MEMBERS) and out["cycle"] == k
        dst.open_volume("db").write(65536, b"\x07" * 8192)  # the new primary's writes
        recs = roles.promoted_together(dst.path, roles.load_role(dst.path, "db"))
        released = []
        done = discard_here(dst, recs, released.append)
        assert released == list(MEMBERS) and done["group"] and done["cycle"] == k, done
        assert [kp["bytes"] for kp in done["kept"]] == [8192], done
        assert dst.list_volumes() == []
        ndir = os.path.join(dst.path, "mirrors", src.node_id)
        st = MirrorState.load(os.path.join(ndir, "app.group.json"))
        assert (st.applied_cycle, [v.name for v in st.volumes]) == (k, list(MEMBERS))
        assert st.extra["lineage"]["epoch"] == out["parent"].split(":")[0]
        assert {roles.load_role(dst.path, n).role for n in MEMBERS} == {"secondary"}
        # The old primary writes on and mirrors again: a delta into the same images.
        vols[1].write(4096 * 100, b"\x05" * 4096)
        server = TargetServer(dst, key, server.address)  # where the source knows it
        server.start()
        cycle, row = run_driver()
        assert cycle > k and row["full"] is False, row  # a delta: 4 KiB, not the group
        assert row["bytes_raw"] == 4096, row
        for vol in vols:
            with open(os.path.join(ndir, vol.name + ".img"), "rb") as f:
                assert f.read() == vol.read(0, vol.size), vol.name
    finally:
        server.stop()
        src.close()
        dst.close()


def test_a_group_demoted_by_a_lost_switchover_answer_is_reinstated_whole(pair):
    import subprocess
    import sys

    from tests.support.daemons import cli_env

    _pool, a, b = pair
    mirrored_group(a, b)
    b.stop()  # b dies inside its promotion, before the commit point: it never promotes
    b.args[b.args.index("--listen") + 1] = b.listen
    b.args += ["--failpoint", "promote.prepared=60"]
    b.start()
    switch = subprocess.Popen(
        [sys.executable, "-m", "cyclemirror.cli", "--store", a.store, "mirror", "switchover",
         "log", "--to", b.listen], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=cli_env())
    try:
        wait_for(lambda: "recording the promotion" in b.log(), 60, "b inside its promotion")
        b.kill()
        _out, err = switch.communicate(timeout=60)
    finally:
        if switch.poll() is None:
            switch.kill()
    assert switch.returncode == 10 and "mirror reinstate log" in err, err
    assert {role_row(a, n)["role"] for n in MEMBERS} == {"demoted"}
    b.args = b.args[:-2]
    b.start()
    # One member's name reinstates the group; b is asked (it holds the group's images).
    out = json.loads(a.cli("mirror", "reinstate", "db", "--json").stdout)
    assert (out["group"], out["volumes"], out["forced"]) == ("app", list(MEMBERS), False), out
    assert [x["answer"] for x in out["asked"]] == ["holds the image"] and out["mirror_resumed"]
    assert {role_row(a, n)["role"] for n in MEMBERS} == {"primary"}
    for name in MEMBERS:  # writable again, and mirrored on as the group
        run("qemu-io", "-f", "raw", "-c", f"write -P 6 {2 * MiB} 4k", "-c", "flush",
            uri(a, name))
    rows = json.loads(a.cli("mirror", "sync", "log", "--json").stdout)
    assert {r["phase"] for r in rows} != {"broken"}, rows
    for name in MEMBERS:
        assert image_bytes(b, f"mirror/hosta/{name}") == image_bytes(a, name), name
