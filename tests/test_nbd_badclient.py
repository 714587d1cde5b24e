"""Malformed traffic never crashes the server nor disturbs another client's session.

A well-behaved client writes and verifies patterns on its own connection the
whole time, while tests/support/nbd_badclient.py throws bad options, bad magic,
truncated requests, huge lengths and a client that never reads its replies at
the same server.  Each attack must get the reaction the protocol prescribes,
and the good client must keep making progress without a single error.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.support import nbd_badclient as bad
from tests.support import nbd_rawclient as C
from tests.support.nbd import raw_server, run
from tests.support.tools import require_tool

MiB = 1 << 20


class GoodClient(threading.Thread):
    """Writes a distinct pattern, reads it back, round after round, on one connection."""

    def __init__(self, path: str, name: str):
        super().__init__(daemon=True)
        self.path, self.name = path, name
        self.rounds = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self):
        try:
            with C.connect_unix(self.path, timeout=20) as s:
                C.open_export(s, self.name)
                reader = C.ReplyReader(s, True)
                while not self.stop.is_set():
                    n = self.rounds
                    offset = (n * 7919 * 512) % (4 * MiB)
                    data = bytes([n % 251 + 1]) * 65536
                    s.sendall(C.request(C.CMD_WRITE, offset, len(data), handle=2 * n, payload=data)
                              + C.request(C.CMD_READ, offset, len(data), handle=2 * n + 1))
                    reader.expect_read(2 * n + 1, offset, len(data))
                    w, r = reader.next(), reader.next()
                    assert (w.handle, w.error) == (2 * n, 0)
                    assert (r.handle, r.error, r.data) == (2 * n + 1, 0, data)
                    self.rounds += 1
                s.sendall(C.request(C.CMD_DISC))
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.fixture
def served(tmp_path):
    with raw_server(tmp_path, {"vol": (8 * MiB, False), "mirror": (bytes(range(256)) * 4096, True)},
                    negotiation_timeout=5.0) as (srv, paths):
        good = GoodClient(srv.unix_path, "vol")
        good.start()
        yield srv, good
        good.stop.set()
        good.join(30)
        assert good.error is None, f"the well-behaved client failed: {good.error!r}"


def _progress(good: GoodClient, timeout: float = 20.0) -> None:
    start = good.rounds
    deadline = time.monotonic() + timeout
    while good.rounds < start + 3:
        assert good.error is None, f"the well-behaved client failed: {good.error!r}"
        assert time.monotonic() < deadline, "the well-behaved client made no progress"
        time.sleep(0.01)


@pytest.mark.parametrize("attack", bad.ATTACKS, ids=lambda a: a.__name__)
def test_each_attack_gets_the_prescribed_reaction_and_the_good_client_goes_on(served, attack):
    srv, good = served
    _progress(good)
    outcome = attack(srv.unix_path, "vol")
    assert outcome in ("closed", "served"), outcome
    _progress(good)


def test_all_attacks_at_once_then_the_server_is_still_healthy(served):
    srv, good = served
    failures = []

    def launch(attack):
        try:
            if attack(srv.unix_path, "vol") not in ("closed", "served"):
                failures.append(attack.__name__)
        except Exception as exc:
            failures.append(f"{attack.__name__}: {exc!r}")

    threads = [threading.Thread(target=launch, args=(a,)) for a in bad.ATTACKS * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    _progress(good)
    require_tool("nbdinfo")
    assert b"8388608" in run("nbdinfo", "--size", srv.uri("vol")).stdout
    # every attacker's connection is gone; only the good client remains
    deadline = time.monotonic() + 10
    while srv.connection_count() != 1:
        assert time.monotonic() < deadline, srv.connection_count()
        time.sleep(0.05)


def test_read_only_export_answers_writes_trims_and_zeroes_with_eperm(served):
    srv, good = served
    errors, data = bad.writes_to_read_only_export(srv.unix_path, "mirror")
    assert errors == [C.EPERM, C.EPERM, C.EPERM]
    assert data == bytes([0, 1, 2, 3])
    _progress(good)


def test_a_client_that_never_reads_replies_stalls_only_itself(served):
    srv, good = served
    hog = bad.never_reads_replies(srv.unix_path, "vol")
    try:
        _progress(good)
        _progress(good)
    finally:
        hog.close()
    _progress(good)


def test_stop_ends_every_session_and_joins_its_threads(tmp_path):
    with raw_server(tmp_path, {"vol": (MiB, False)}) as (srv, _):
        socks = []
        for _ in range(5):
            s = C.connect_unix(srv.unix_path)
            C.open_export(s, "vol")
            socks.append(s)
        idle = C.connect_unix(srv.unix_path)  # still negotiating
        C.greet(idle)
        while srv.connection_count() != 6:
            time.sleep(0.01)
        # These clients never hang up: stop() must end their sessions itself, not
        # wait for them (a hang guard, not a speed check).
        stopper = threading.Thread(target=srv.stop, daemon=True)
        stopper.start()
        stopper.join(60)
        assert not stopper.is_alive(), "stop() waited for clients that never disconnect"
        assert srv.connection_count() == 0
        for s in socks + [idle]:
            s.settimeout(5)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
            s.close()


def test_a_stopped_server_can_start_again(tmp_path):
    with raw_server(tmp_path, {"vol": (MiB, False)}) as (srv, _):
        srv.stop()
        srv.start()
        with C.connect_unix(srv.unix_path) as s:
            assert C.open_export(s, "vol").size == MiB
