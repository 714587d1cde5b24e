"""Pipelined big writes: the transmission loop reads the next request while writes are written.

A WRITE whose payload does not fit the 256 KiB receive buffer is received into
its own buffer and queued for the connection's one write thread (up to four
in flight), which writes them in request order; every other request waits
until those are done and answered.  These tests use a real
NbdServer over a store Volume and the independent raw client (tests/
nbd_rawclient.py), sending many requests before reading any reply:

* reads, flushes and small writes queued behind pipelined writes see them all,
  and overlapping writes land in request order (the result equals a
  sequential model, byte for byte);
* a big write that fails its checks gets its error, in order, and the session
  goes on;
* several connections pipelining big writes while the volume freezes and
  merges every few milliseconds: every frozen image holds whole writes only,
  and at the end every byte reads back as the last write put it.
"""

from __future__ import annotations

import random
import threading

import pytest

from cyclemirror.nbd import NbdServer, VolumeBackend
from cyclemirror.store import Store
from tests.support import nbd_rawclient as C
from tests.support.nbd import run_under_freezer
from tests.support.tools import SLOW

KiB = 1 << 10
MiB = 1 << 20
BIG = 384 * KiB  # above the receive buffer: takes the pipelined path


@pytest.fixture
def served(tmp_path):
    store = Store.create(str(tmp_path / "store"))
    vols = {"vol": store.create_volume("vol", 16 * MiB)}
    server = NbdServer(lambda n: VolumeBackend(vols[n]) if n in vols else None,
                       unix_path=str(tmp_path / "nbd.sock")).start()
    try:
        yield server, vols["vol"]
    finally:
        server.stop()
        store.close()


def connect(server):
    sock = C.connect_unix(server.unix_path)
    C.open_export(sock, "vol")
    return sock, C.ReplyReader(sock, structured=True)


def test_requests_behind_pipelined_writes_see_them_in_request_order(served):
    server, _vol = served
    rnd = random.Random(5)
    model = bytearray(16 * MiB)
    stream = []
    handle = 0
    reads = {}
    # Big writes (a long one, then one overlapping its tail, disjoint ones, FUA) and
    # right behind them a read over all of it; then a small write into a big one, another
    # read and a flush: all sent before any reply is read.
    batches = [[(0, 12 * MiB, 0), (12 * MiB - 200 * KiB, BIG, 0), (13 * MiB, MiB, 0),
                (14 * MiB, 2 * BIG, C.FUA), (8 * MiB, 4 * MiB, 0)],
               [(8 * MiB + 7, 4096, 0)]]
    for batch in batches:
        for offset, length, flags in batch:
            handle += 1
            data = rnd.randbytes(length)
            model[offset:offset + length] = data
            stream.append(C.request(C.CMD_WRITE, offset, length, flags=flags, handle=handle,
                                    payload=data))
        handle += 1
        reads[handle] = (0, 16 * MiB, bytes(model))
        stream.append(C.request(C.CMD_READ, 0, 16 * MiB, handle=handle))
    handle += 1
    stream.append(C.request(C.CMD_FLUSH, handle=handle))
    sock, reader = connect(server)
    for h, (off, n, _want) in reads.items():
        reader.expect_read(h, off, n)
    sender = threading.Thread(target=sock.sendall, args=(b"".join(stream),))
    sender.start()
    replies = {}
    for _ in range(handle):
        r = reader.next()
        replies[r.handle] = r
    sender.join(30)
    assert sorted(replies) == list(range(1, handle + 1))
    assert all(r.error == 0 for r in replies.values()), {h: r.error for h, r in replies.items()}
    for h, (_off, _n, want) in reads.items():
        assert replies[h].data == want, f"read {h} missed writes sent before it"
    sock.close()


def test_a_refused_big_write_is_answered_and_the_session_goes_on(served):
    server, vol = served
    sock, reader = connect(server)
    good = b"\x11" * BIG
    stream = (C.request(C.CMD_WRITE, 0, BIG, handle=1, payload=good)
              + C.request(C.CMD_WRITE, 16 * MiB - 4096, BIG, handle=2, payload=b"\x22" * BIG)
              + C.request(C.CMD_WRITE, 0, BIG, flags=0x40, handle=3, payload=b"\x33" * BIG)
              + C.request(C.CMD_WRITE, BIG, BIG, handle=4, payload=good))
    sock.sendall(stream)
    replies = {r.handle: r for r in (reader.next() for _ in range(4))}
    assert replies[1].error == 0 and replies[4].error == 0
    assert replies[2].error == C.ENOSPC  # past the end
    assert replies[3].error == C.EINVAL  # a flag nobody negotiated
    assert vol.read(0, 2 * BIG) == good * 2
    sock.close()


def test_pipelining_clients_through_freezes_and_merges_keep_every_byte(served):
    server, vol = served
    clients, rounds, slots = 3, (12 if SLOW else 5), 8
    region = slots * BIG  # per client, 3 MiB
    errors: list[BaseException] = []
    done = threading.Event()
    frozen_checks = []

    def stamp(client: int, round_: int, slot: int) -> bytes:
        return bytes([client + 1, round_, slot, 0xA5]) * (BIG // 4)

    def client(c: int) -> None:
        try:
            sock, reader = connect(server)
            handle = 0
            for r in range(1, rounds + 1):
                stream = []
                for s in random.Random(c * 100 + r).sample(range(slots), slots):
                    handle += 1
                    stream.append(C.request(C.CMD_WRITE, c * region + s * BIG, BIG, handle=handle,
                                            payload=stamp(c, r, s)))
                handle += 1
                stream.append(C.request(C.CMD_FLUSH, handle=handle))
                sock.sendall(b"".join(stream))
                for _ in range(slots + 1):
                    reply = reader.next()
                    assert reply.error == 0, reply
            sock.close()
        except BaseException as exc:
            errors.append(exc)

    def freezer() -> None:
        try:
            while not done.is_set():
                cycle = vol.freeze()
                with cycle.reader() as reader:
                    image = reader.read(0, clients * region)
                for i in range(clients * slots):
                    chunk = image[i * BIG:(i + 1) * BIG]
                    assert chunk == chunk[:4] * (BIG // 4), (
                        f"cycle {cycle.number}: slot {i} holds parts of two writes")
                vol.merge_through(cycle.number - 1)
                frozen_checks.append(cycle.number)
        except BaseException as exc:
            errors.append(exc)

    run_under_freezer([threading.Thread(target=client, args=(c,)) for c in range(clients)],
                      threading.Thread(target=freezer), done, errors, timeout=120)
    assert len(frozen_checks) >= 2, f"only {len(frozen_checks)} freezes ran during the writes"
    sock, reader = connect(server)
    for c in range(clients):
        reader.expect_read(c + 1, c * region, region)
        sock.sendall(C.request(C.CMD_READ, c * region, region, handle=c + 1))
        got = reader.next().data
        assert got == b"".join(stamp(c, rounds, s) for s in range(slots)), f"client {c}"
    sock.close()
