"""Faults against an RBD target: kill -9, a cut link, flipped bits (docs/ceph.md).

The file backend's fault tests, ported to images kept in the session's
one-node Ceph cluster, small and few so they stay cheap:

* The serial writer of ``test_e2e_crash`` (generation g stamps every block in
  order, so the volume at any instant is a prefix pattern) writes through the
  source daemon's NBD export while the target, then both, are killed -9, the
  target's applies slowed so the kills land inside them.  After each kill,
  with both daemons down, the image's last cycle snapshot (read by Ceph's own
  ``rbd export``) is a prefix pattern, the volume at one instant; so is it
  after the target's recovery; no write the source acknowledged is lost; only
  the first cycle was a full copy; and after a final sync the last snapshot
  equals the source.  (The source alone killed -9 against an RBD target, and
  resuming without a full copy, is test_rbd_target's; nothing acknowledged is
  lost by a source kill whatever the target: test_e2e_crash.)
* A consistency group of two volumes, the serial writer stamping across both,
  the target killed -9 while its state shows a committed group delta: every
  member's last snapshot is of the same group cycle and together they read
  as the pair at one instant, before and after the target's recovery.
* A link cut in the middle of a cycle (a delta, and a full first cycle, whose
  checkpoints into RBD do not stop the stream): the source resumes after its last
  acknowledged chunk (no full copy) and the snapshot equals the freeze.
* A byte flipped in flight in a data frame: the target refuses the frame,
  applies nothing of it, and the retried cycle's snapshot equals the freeze.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time

import pytest

from cyclemirror import keys
from cyclemirror.daemon.nbd_client import NbdClient
from cyclemirror.errors import CycleMirrorError
from cyclemirror.receiver import TargetServer
from cyclemirror.receiver.state import MirrorState
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.store import Store
from tests.support.daemons import DaemonPool, make_key, wait_for
from tests.test_e2e_crash import (
    BLOCK,
    NBLOCKS,
    Writer,
    assert_prefix_pattern,
    read_pattern,
    stamp,
)
from tests.test_receiver_faults import FlipProxy

MiB = 1 << 20


def _binding_or_skip():
    try:
        from cyclemirror._cext import rbd  # noqa: F401
    except ImportError:
        pytest.skip("cyclemirror._cext.rbd is not built (install librbd-dev and librados-dev, "
                    "then rebuild: python3 setup.py build_ext --inplace)")


def _rbd_flags(cluster) -> tuple:
    return ("--rbd-pool", cluster.pool, "--ceph-conf", cluster.conf, "--ceph-keyring",
            cluster.keyring)


def _last_snapshot(cluster, store: str, volume: str) -> tuple[int, bytes] | None:
    """(cycle, bytes) of the snapshot of the cycle the target's state names applied, read
    with Ceph's own client; None before a first cycle.  A running target may apply the
    next cycle and remove that snapshot meanwhile: then the read is made again, of the
    cycle the state names now."""
    mdir = os.path.join(store, "mirrors")
    nodes = os.listdir(mdir) if os.path.isdir(mdir) else []
    if not nodes:
        return None
    path = os.path.join(mdir, nodes[0], f"{volume}.state.json")
    if not os.path.exists(path):
        return None
    while True:
        applied = MirrorState.load(path).applied_cycle
        if applied <= 0:
            return None
        out = os.path.join(store, f"export-{applied}.img")
        try:
            cluster.run("rbd", "export", "--no-progress",
                        f"{cluster.pool}/{nodes[0]}~{volume}@cyclemirror-{applied}", out)
        except RuntimeError:
            if MirrorState.load(path).applied_cycle > applied:
                continue  # a later cycle was applied and this one's snapshot removed
            raise
        with open(out, "rb") as f:
            data = f.read()
        os.unlink(out)
        return applied, data


@pytest.fixture
def daemons(tmp_path):
    with DaemonPool(tmp_path) as pool:
        yield pool


def test_serial_writer_kill_9_of_target_and_both_into_rbd(daemons, tmp_path,
                                                                 ceph_cluster):
    _binding_or_skip()
    key = make_key(tmp_path / "mirror.key")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slow = ("--failpoint", "receiver.apply_record=0.01")
    b = daemons.start("b", key_file=key, nbd=False, metrics=False,
                      extra=("--listen", f"127.0.0.1:{port}", *_rbd_flags(ceph_cluster), *slow))
    a = daemons.start("a", key_file=key, metrics=False)
    a.cli("volume", "create", "v", "--size", str(NBLOCKS * BLOCK))
    a.cli("mirror", "start", "v", "--to", b.listen, "--interval", "0.05", "--compress", "none")
    try:
        _rounds(a, b, ceph_cluster)
    except AssertionError as exc:  # keep the evidence: both daemons' logs
        raise AssertionError(f"{exc}\n--- source log ---\n{a.log()[-6000:]}\n"
                             f"--- target log ---\n{b.log()[-6000:]}") from None


def _applied(b) -> int:
    rows = [m for m in b.status()["incoming"] if m["volume"] == "v"]
    return rows[0]["applied_cycle"] if rows else 0


def _rounds(a, b, cluster):
    rng = random.Random(11)
    acked = [0] * NBLOCKS
    gen, index = 1, 0
    checked = 0
    for victim in ("target", "both"):
        writer = Writer(a.nbd_sock, gen, index, acked)
        writer.start()
        before = _applied(b)
        wait_for(lambda b4=before: _applied(b) > b4, 60, "a cycle applied")
        time.sleep(rng.uniform(0.0, 0.3))
        if victim in ("target", "both"):
            b.kill()
        if victim in ("source", "both"):
            a.kill()
        writer.stop.set()
        writer.join(10)
        gen, index = writer.gen, writer.index
        a.kill()
        b.kill()
        # Both down, nothing applying: the last snapshot is the volume at one instant.
        last = _last_snapshot(cluster, b.store, "v")
        assert last is not None, f"{victim}: no applied cycle before the kill"
        assert_prefix_pattern(read_pattern(last[1]), f"the last snapshot after a {victim} kill")
        checked += 1
        a.start()
        with NbdClient("v", unix_path=a.nbd_sock) as nbd:  # nothing acknowledged is lost
            after = read_pattern(nbd.read(0, NBLOCKS * BLOCK))
        lost = [i for i in range(NBLOCKS) if after[i] < acked[i]]
        assert not lost, f"{victim}: acknowledged writes lost in blocks {lost}"
        b.start()  # recovery (rolls back and redoes a cut apply)
        wait_for(lambda: _applied(b) > 0, 60, "the recovered target")
        again = _last_snapshot(cluster, b.store, "v")
        assert_prefix_pattern(read_pattern(again[1]), f"the snapshot recovered after {victim}")
    assert checked == 2
    a.cli("mirror", "sync", "v", "--timeout", "60")
    a.cli("mirror", "break", "v")
    with NbdClient("v", unix_path=a.nbd_sock) as nbd:
        source = nbd.read(0, NBLOCKS * BLOCK)
    assert _last_snapshot(cluster, b.store, "v")[1] == source
    # Every cycle after the first was a delta, across all restarts (the log appends).
    assert a.log().count(", full copy") == 1, a.log()[-4000:]


# -- a consistency group ---------------------------------------------------------------------

MEMBERS = ("db", "log")


class GroupWriter(threading.Thread):
    """The serial writer across a group: generation g stamps block j of the pair (db's
    blocks, then log's), so both members at one instant read as one prefix pattern."""

    def __init__(self, sock: str):
        super().__init__(daemon=True)
        self.sock = sock
        self.stop = threading.Event()
        self.gen = 1

    def run(self):
        try:
            with NbdClient("db", unix_path=self.sock) as db, \
                    NbdClient("log", unix_path=self.sock) as lg:
                while not self.stop.is_set():
                    for j in range(2 * NBLOCKS):
                        if self.stop.is_set():
                            return
                        nbd = db if j < NBLOCKS else lg
                        nbd.write((j % NBLOCKS) * BLOCK, stamp(self.gen, j), fua=True)
                    self.gen += 1
        except CycleMirrorError:
            pass  # the source was killed under us


def _group_snapshots(cluster, store: str) -> tuple[int, bytes]:
    """The group's applied cycle (its state) and both members' snapshots of it, in order;
    fails if a member lacks that cycle's snapshot."""
    mdir = os.path.join(store, "mirrors")
    (node,) = os.listdir(mdir)
    (state,) = [f for f in os.listdir(os.path.join(mdir, node)) if f.endswith(".group.json")]
    applied = MirrorState.load(os.path.join(mdir, node, state)).applied_cycle
    out = b""
    for name in MEMBERS:
        path = os.path.join(store, f"{name}-{applied}.img")
        cluster.run("rbd", "export", "--no-progress",
                    f"{cluster.pool}/{node}~{name}@cyclemirror-{applied}", path)
        with open(path, "rb") as f:
            out += f.read()
        os.unlink(path)
    return applied, out


def _group_committed(store: str) -> bool:
    mdir = os.path.join(store, "mirrors")
    for node in os.listdir(mdir) if os.path.isdir(mdir) else []:
        for f in os.listdir(os.path.join(mdir, node)):
            if f.endswith(".group.json"):
                try:
                    return MirrorState.load(os.path.join(mdir, node, f)).committed is not None
                except CycleMirrorError:
                    return False
    return False


def test_a_group_killed_9_mid_apply_keeps_every_member_at_one_group_cycle(daemons, tmp_path,
                                                                          ceph_cluster):
    _binding_or_skip()
    key = make_key(tmp_path / "mirror.key")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target_args = ("--listen", f"127.0.0.1:{port}", *_rbd_flags(ceph_cluster))
    slow = ("--failpoint", "receiver.apply_record=0.01")
    b = daemons.start("b", key_file=key, nbd=False, metrics=False, extra=(*target_args, *slow))
    a = daemons.start("a", key_file=key, metrics=False)
    for name in MEMBERS:
        a.cli("volume", "create", name, "--size", str(NBLOCKS * BLOCK))
        a.cli("mirror", "start", name, "--to", b.listen, "--group", "app", "--interval",
              "0.05", "--compress", "none")
    a.cli("mirror", "sync", "db", "--timeout", "60")  # both members hold a group cycle
    incoming = wait_for(lambda: [r for r in b.status()["incoming"] if r["applied_cycle"]], 60,
                        "the group on b")
    assert sorted(r["volume"] for r in incoming) == list(MEMBERS), incoming
    full_copies = a.log().count(", full copy")  # the group's first cycle (and a join's)
    writer = GroupWriter(a.nbd_sock)
    writer.start()
    store = b.store
    try:
        for _attempt in range(20):  # the apply may end between seeing it and the kill
            wait_for(lambda: _group_committed(store), 90, "a committed group delta")
            b.kill()
            if _group_committed(store):
                break
            b = daemons.start("b", key_file=key, nbd=False, metrics=False,
                              extra=(*target_args, *slow))
        else:
            pytest.fail("no kill landed inside a group's apply")
        # Target down inside an apply: every member's last snapshot is the same group cycle,
        # and together they are the pair at one instant.
        applied, data = _group_snapshots(ceph_cluster, b.store)
        assert applied >= 1
        assert_prefix_pattern(read_pattern_of(data), "the group's snapshots while down")
        b = daemons.start("b", key_file=key, nbd=False, metrics=False, extra=target_args)
        wait_for(lambda: not _group_committed(b.store), 60, "the recovered group")
        wait_for(lambda: min(r["applied_cycle"] for r in b.status()["incoming"]) > applied,
                 90, "a group cycle after the restart")
    finally:
        writer.stop.set()
        writer.join(30)
    a.cli("mirror", "sync", "db", "--timeout", "60")
    later, data = _group_snapshots(ceph_cluster, b.store)
    assert later > applied
    assert_prefix_pattern(read_pattern_of(data), "the group's snapshots after recovery")
    with NbdClient("db", unix_path=a.nbd_sock) as db, NbdClient("log", unix_path=a.nbd_sock) \
            as lg:
        source = db.read(0, NBLOCKS * BLOCK) + lg.read(0, NBLOCKS * BLOCK)
    assert data == source  # nothing written since the sync's freeze
    assert a.log().count(", full copy") == full_copies, a.log()[-4000:]  # none since


def read_pattern_of(data: bytes) -> list[int]:
    """``read_pattern`` over any number of blocks (the pair's 2 * NBLOCKS)."""
    gens = []
    for i in range(len(data) // BLOCK):
        block = data[i * BLOCK:(i + 1) * BLOCK]
        if block == bytes(BLOCK):
            gens.append(0)
            continue
        gen, index = struct.unpack_from("<QQ", block)
        assert block == stamp(gen, index), f"block {i} is torn inside itself"
        assert index == i, f"block {i} carries the stamp of block {index}"
        gens.append(gen)
    return gens


# -- the link: cut, or a byte flipped --------------------------------------------------------

class CutProxy:
    """Forwards a mirror connection; once ``arm(n)``-ed, cuts it after ``n`` more bytes
    went up (once)."""

    def __init__(self, target):
        self.target = target
        self.remaining: int | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.cuts = 0
        self.sent_up = 0  # bytes forwarded from the source
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            u = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def arm(self, after: int) -> None:
        self.remaining = after

    def _pump(self, a, b, up):
        try:
            while data := a.recv(65536):
                b.sendall(data)
                if up:
                    self.sent_up += len(data)
                if up and self.remaining is not None:
                    self.remaining -= len(data)
                    if self.remaining <= 0:
                        self.remaining = None
                        self.cuts += 1
                        break
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


@pytest.fixture
def rbd_target(tmp_path, ceph_cluster):
    _binding_or_skip()
    from tests.support.ceph import rbd_config

    key = keys.generate_key()
    dst = Store.create(str(tmp_path / "dst"))
    server = TargetServer(dst, key, rbd=rbd_config(ceph_cluster))
    server.start()
    yield server, key, ceph_cluster
    server.stop()
    dst.close()


def _mirror_through(tmp_path, server, key, proxy, name: str, size: int):
    store = Store.create(str(tmp_path / f"{name}-src"))
    vol = store.create_volume(name, size)
    vol.write(0, random.Random(2).randbytes(size))
    frozen, stats = {}, []

    def on_frozen(f, reader):
        frozen[f.number] = reader.read(0, size)

    d = MirrorDriver(vol, proxy.address, key,
                     MirrorOptions(on_frozen=on_frozen, retry_initial=0.05,
                                   on_applied=lambda c, label, s: stats.append(s)),
                     store=store)
    return store, vol, d, frozen, stats


def _snapshot(cluster, node: str, name: str, cycle: int) -> bytes:
    out = os.path.join(os.path.dirname(cluster.conf), f"{node}-{name}-{cycle}.img")
    cluster.run("rbd", "export", "--no-progress",
                f"{cluster.pool}/{node}~{name}@cyclemirror-{cycle}", out)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def test_a_link_cut_mid_cycle_resumes_without_a_full_copy(rbd_target, tmp_path):
    server, key, cluster = rbd_target
    size = 8 * MiB
    proxy = CutProxy(server.address)
    store, vol, d, frozen, stats = _mirror_through(tmp_path, server, key, proxy, "cut", size)
    try:
        d.start()
        first = d.sync(60)
        assert _snapshot(cluster, store.node_id, "cut", first) == frozen[first]
        vol.write(2 * MiB, os.urandom(3 * MiB))
        proxy.arm(MiB)  # inside the delta's data
        second = d.sync(60)
        assert proxy.cuts == 1
        # The delta went on after the cut: no full copy, at most the delta's 3 MiB again.
        assert not stats[-1]["full"] and stats[-1]["bytes_raw"] <= 3 * MiB, stats[-1]
        assert _snapshot(cluster, store.node_id, "cut", second) == frozen[second]
    finally:
        d.stop()
        proxy.close()
        store.close()


def test_a_link_cut_mid_full_cycle_resumes_after_the_last_checkpoint(rbd_target, tmp_path,
                                                                    monkeypatch):
    """A full cycle into RBD checkpoints without stopping (the writer acks once the
    cluster has the marked chunks): cut after 12 of 16 MiB, with a checkpoint every
    2 MiB, the retry resumes after the last one the target recorded, not from the
    start, and the snapshot equals the freeze."""
    from cyclemirror.receiver import session

    monkeypatch.setattr(session, "ACK_BYTES", 2 * MiB)
    server, key, cluster = rbd_target
    size = 16 * MiB
    proxy = CutProxy(server.address)
    store, vol, d, frozen, stats = _mirror_through(tmp_path, server, key, proxy, "cutfull",
                                                   size)
    try:
        proxy.arm(12 * MiB)  # inside the first cycle's data
        d.start()
        first = d.sync(120)
        assert proxy.cuts == 1 and stats[-1]["full"]
        # Random data (lz4 keeps its size): 12 MiB before the cut, then a restart from
        # zero would send the whole 16 MiB again; a resume sends at least 2 MiB less.
        assert proxy.sent_up < 26 * MiB, proxy.sent_up
        assert _snapshot(cluster, store.node_id, "cutfull", first) == frozen[first]
    finally:
        d.stop()
        proxy.close()
        store.close()


def test_a_byte_flipped_in_flight_is_never_applied_and_the_cycle_is_retried(rbd_target,
                                                                           tmp_path):
    server, key, cluster = rbd_target
    size = 2 * MiB
    proxy = FlipProxy(server.address, "payload")
    store, vol, d, frozen, stats = _mirror_through(tmp_path, server, key, proxy, "flip", size)
    try:
        d.start()
        cycle = d.sync(60)
        assert proxy.flipped == 1
        assert any("ChecksumError" in e and "frame payload" in e for e in server.errors), \
            server.errors
        assert _snapshot(cluster, store.node_id, "flip", cycle) == frozen[cycle]
    finally:
        d.stop()
        proxy.close()
        store.close()
