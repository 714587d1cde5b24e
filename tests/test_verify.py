"""Verify, in-process with real sockets, stores and files (docs/verify.md).

Proves: the piece digests of ``store.rangehash`` equal a plain reference at
every unit and alignment, and reading skips holes without changing a digest;
a verify finds exactly the blocks flipped behind the target's back (the last
block of a volume whose size is no multiple of 64 MiB or 1 MiB included) and
nothing on a clean image, with a few hundred wire bytes per 64 MiB; a verify
while a writer writes and cycles apply back to back never reports a block
that is not corrupt; a target that lags behind what the source keeps gets
CycleGoneError, never a comparison; a peer that answers with bad digests
(wrong count, wrong span, wrong unit, a cycle out of range, garbage) gets a
ProtocolError naming it; a source that sends bad requests gets an error and
the target's mirror goes on.
"""

import os
import random
import socket
import threading
import time

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror import keys
from cyclemirror.errors import CycleGoneError, ProtocolError
from cyclemirror.receiver import TargetServer
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.sender.driver import TargetSpec
from cyclemirror.sender.group import SingleVolume
from cyclemirror.sender.verify import VerifyRun
from cyclemirror.store import Store, rangehash
from cyclemirror.wire import handshake
from cyclemirror.wire.link import FrameLink, RemoteError
from tests.support.corrupt import flip
from tests.support.mirror import wait_for

MiB = 1 << 20
BS = 4096


# -- digests ---------------------------------------------------------------------------

def reference_pieces(data: bytes, offset: int, unit: int, bs: int) -> list[int]:
    """Piece digests as docs/verify.md defines them, the slow and obvious way."""
    out, pos, end = [], offset, offset + len(data)
    while pos < end:
        stop = min(end, (pos // unit + 1) * unit)
        blocks = [xxhash.xxh3_64_intdigest(data[b - offset:b - offset + bs])
                  for b in range(pos, stop, bs)]
        if unit == bs:
            out.append(blocks[0])
        else:
            out.append(xxhash.xxh3_64_intdigest(b"".join(d.to_bytes(8, "little")
                                                          for d in blocks)))
        pos = stop
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.integers(1, 40), st.sampled_from([512, 4096]),
       st.sampled_from([1, 3, 8]), st.integers(0, 2**32))
def test_piece_digests_match_the_reference_at_any_alignment(first, count, bs, per_unit, seed):
    unit = bs * per_unit if per_unit > 1 else bs
    data = random.Random(seed).randbytes(count * bs)
    blocks = np.array([xxhash.xxh3_64_intdigest(data[i:i + bs])
                       for i in range(0, len(data), bs)], dtype=np.uint64)
    got = rangehash.piece_digests(blocks, first * bs, len(data), unit, bs)
    assert got.tolist() == reference_pieces(data, first * bs, unit, bs)
    assert rangehash.count_pieces(first * bs, len(data), unit) == len(got)


def test_hash_file_span_skips_holes_and_gives_the_same_digests(tmp_path):
    path = tmp_path / "sparse"
    size = 8 * MiB
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(MiB + 1000)
        f.write(os.urandom(5000))  # a run that starts and ends inside blocks
        f.seek(6 * MiB)
        f.write(os.urandom(MiB))
    data = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        got, read = rangehash.hash_file_span(fd, BS, size - 2 * BS, BS)
    finally:
        os.close(fd)
    want = [xxhash.xxh3_64_intdigest(data[o:o + BS]) for o in range(BS, size - BS, BS)]
    assert got.tolist() == want
    assert read < 2 * MiB  # the holes were not read


# -- a source, a target, a mirror -------------------------------------------------------

@pytest.fixture
def key():
    return keys.generate_key()


class World:
    def __init__(self, tmp, key, size, interval=3600.0):
        self.key = key
        self.src = Store.create(str(tmp / "src"))
        self.vol = self.src.create_volume("v", size)
        self.dst = Store.create(str(tmp / "dst"))
        self.server = TargetServer(self.dst, key)
        self.server.start()
        self.spec = TargetSpec(*self.server.address, key)
        self.driver = MirrorDriver(self.vol, [self.spec], key,
                                   MirrorOptions(interval=interval, retry_initial=0.05,
                                                 retry_max=0.2), store=self.src)

    @property
    def image(self):
        return os.path.join(self.dst.path, "mirrors", self.src.node_id, "v.img")

    def verify(self, **kw):
        return VerifyRun(self.driver.subject, 0, self.src, self.spec,
                         expect_node=self.dst.node_id, merges=self.driver, **kw).run()

    def close(self):
        self.driver.stop()
        self.server.stop()
        self.src.close()
        self.dst.close()




def runs(bitmap):
    return [tuple(r) for r in bitmap.iter_runs()]


def test_verify_finds_exactly_the_flipped_blocks_and_nothing_on_a_clean_image(tmp_path, key):
    size = 130 * MiB + 3 * BS  # neither 64 MiB nor 1 MiB divides it
    w = World(tmp_path, key, size)
    try:
        w.vol.write(0, os.urandom(66 * MiB))
        w.vol.write(size - 2 * BS, os.urandom(2 * BS))
        w.driver.start()
        w.driver.sync(60)
        clean = w.verify()
        assert clean.mismatched.count() == 0
        assert clean.cycles[0] == clean.cycles[1]  # nothing was written: one cycle
        # a clean image costs a few hundred bytes per 64 MiB piece, either way
        assert clean.wire_sent + clean.wire_received < 4096
        flip(w.image, [5 * MiB + 100, 65 * MiB + BS, 100 * MiB, size - 1])
        found = w.verify()
        nb = size // BS
        assert runs(found.mismatched) == [(5 * 256, 1), (65 * 256 + 1, 1), (100 * 256, 1),
                                          (nb - 1, 1)]
        # a span of the volume only: the last piece is short in both units
        part = w.verify(offset=64 * MiB, length=size - 64 * MiB - BS)
        assert runs(part.mismatched) == [(65 * 256 + 1, 1), (100 * 256, 1)]
    finally:
        w.close()


def test_verify_while_a_writer_writes_and_cycles_apply_never_reports_a_false_mismatch(
        tmp_path, key):
    size = 80 * MiB + BS
    w = World(tmp_path, key, size, interval=0.02)
    stop = threading.Event()
    try:
        w.vol.write(0, os.urandom(size))
        w.driver.start()
        w.driver.sync(60)
        # corruption in the last 8 MiB, which the writer never touches
        bad = [size - 8 * MiB + 17, size - 3 * MiB, size - 1]
        flip(w.image, bad)
        want = sorted({o // BS for o in bad})
        writable = (size - 8 * MiB) // BS

        def writer():
            rng = random.Random(7)
            while not stop.is_set():
                for _ in range(64):
                    w.vol.write(rng.randrange(writable) * BS, rng.randbytes(BS))
                w.vol.flush()
                time.sleep(0.002)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        moved, rounds = 0, 0
        deadline = time.monotonic() + 90
        while (rounds < 5 or not moved) and time.monotonic() < deadline:
            got = w.verify()
            assert [s for s, _n in runs(got.mismatched)] == want, got.cycles
            moved += got.cycles[0] != got.cycles[1]
            rounds += 1
        stop.set()
        t.join()
        # Verifies during which the target applied cycles: their digests came back at
        # newer cycles than at open, and were compared with patched ones.
        assert moved and not w.server.errors, (rounds, moved, w.server.errors)
    finally:
        stop.set()
        w.close()


def test_a_target_behind_the_merged_cycles_gets_cycle_gone_not_a_comparison(tmp_path, key):
    src = Store.create(str(tmp_path / "src"))
    vol = src.create_volume("v", 8 * MiB)
    vol.write(0, os.urandom(MiB))
    stores = [Store.create(str(tmp_path / n)) for n in ("a", "b")]
    servers = [TargetServer(s, key) for s in stores]
    for s in servers:
        s.start()
    specs = [TargetSpec(*s.address, key) for s in servers]
    driver = MirrorDriver(vol, specs, key, MirrorOptions(interval=3600, retry_initial=0.05,
                                                         retry_max=0.2), store=src)
    try:
        driver.start()
        driver.sync(60)
        servers[1].stop()  # b keeps its cycle; a goes on, and the source merges past it
        lag = driver.status()["targets"][specs[1].label]["applied_cycle"]
        for _ in range(3):
            vol.write(0, os.urandom(BS))
            driver.request_freeze()
            wait_for(lambda: driver.status()["targets"][specs[0].label]["applied_cycle"]
                     >= vol.open_overlay, 30, "a cycle on a")
        wait_for(lambda: (vol.frozen_cycles() or [vol.open_overlay + 1])[0] - 1 > lag, 30,
                 "the merges past b's cycle")
        driver.break_cycles(now=True)
        servers[1] = TargetServer(stores[1], key, specs[1].host and (specs[1].host,
                                                                     specs[1].port))
        servers[1].start()
        with pytest.raises(CycleGoneError, match="merged away"):
            VerifyRun(driver.subject, 0, src, specs[1]).run()
        assert VerifyRun(driver.subject, 0, src, specs[0]).run().mismatched.count() == 0
    finally:
        driver.stop()
        for s in servers:
            s.stop()
        for s in (src, *stores):
            s.close()


# -- bad peers --------------------------------------------------------------------------

class FakeTarget:
    """Answers one verify connection with what ``script(link, requests)`` sends."""

    def __init__(self, key, node_id, cycle, script):
        self.key, self.node_id, self.cycle, self.script = key, node_id, cycle, script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        try:
            handshake.server_handshake(conn, self.key)
            link = FrameLink(conn)
            link.recv_message({"verify_open"})
            link.send_message("verify_opened", node_id=self.node_id, applied_cycle=self.cycle,
                              freeze_time=1.0)
            first = link.recv_message({"verify_request"})
            self.script(link, first)
            time.sleep(2)
        except Exception:  # noqa: BLE001 - the source hung up: that is the point
            pass
        finally:
            conn.close()
            self.listener.close()


ZERO16 = "00" * 8


def _answer(**over):
    def script(link, req):
        msg = {"index": req["index"], "offset": req["offset"], "unit": req["unit"],
               "count": 1, "cycle": 1, "digests": ZERO16}
        msg.update(over)
        link.send_message("verify_hashes", **msg)
    return script


BAD_ANSWERS = {
    "wrong offset": _answer(offset=64 * MiB * 3),
    "wrong unit": _answer(unit=MiB),
    "too many digests": _answer(count=4, digests=ZERO16 * 4),
    "count and digests disagree": _answer(count=1, digests=ZERO16 * 2),
    "a cycle older than at open": _answer(cycle=0),
    "a cycle newer than any freeze": _answer(cycle=99),
    "another member": _answer(index=1),
}


@pytest.mark.parametrize("what", sorted(BAD_ANSWERS))
def test_bad_digest_messages_end_the_verify_with_a_protocol_error(tmp_path, key, what):
    src = Store.create(str(tmp_path / "src"))
    vol = src.create_volume("v", 130 * MiB)
    vol.freeze()
    fake = FakeTarget(key, "fake", 1, BAD_ANSWERS[what])
    spec = TargetSpec(*fake.address, key)
    with pytest.raises(ProtocolError):
        VerifyRun(SingleVolume(vol), 0, src, spec).run()
    src.close()


def test_an_error_from_the_target_reaches_the_source(tmp_path, key):
    src = Store.create(str(tmp_path / "src"))
    vol = src.create_volume("v", 4 * MiB)
    vol.freeze()
    dst = Store.create(str(tmp_path / "dst"))
    server = TargetServer(dst, key)
    server.start()
    try:
        spec = TargetSpec(*server.address, key)
        with pytest.raises(RemoteError, match="holds no mirror"):
            VerifyRun(SingleVolume(vol), 0, src, spec).run()
    finally:
        server.stop()
        src.close()
        dst.close()


BAD_REQUESTS = {
    "member out of range": dict(index=5, offset=0, length=MiB, unit=64 * MiB),
    "unit not a level": dict(index=0, offset=0, length=MiB, unit=2 * MiB),
    "span past the end": dict(index=0, offset=0, length=9 * MiB, unit=64 * MiB),
    "not whole blocks": dict(index=0, offset=100, length=MiB, unit=64 * MiB),
}


def test_bad_requests_get_an_error_and_the_mirror_goes_on(tmp_path, key):
    w = World(tmp_path, key, 8 * MiB, interval=0.05)
    try:
        w.vol.write(0, os.urandom(MiB))
        w.driver.start()
        w.driver.sync(60)
        specs = w.driver.subject.volume_specs()
        for what, req in BAD_REQUESTS.items():
            sock = socket.create_connection(w.server.address)
            handshake.client_handshake(sock, key)
            link = FrameLink(sock)
            link.send_message("verify_open", node_id=w.src.node_id, node_name=None,
                              mirror="v", group=False, volumes=specs, read_rate=0)
            link.recv_message({"verify_opened"})
            link.send_message("verify_request", **req)
            with pytest.raises(RemoteError) as err:
                link.recv_message({"verify_hashes"})
            assert "verify_request" in str(err.value), what
            sock.close()
        before = w.driver.cycle
        wait_for(lambda: w.driver.status()["targets"][w.spec.label]["applied_cycle"] > before,
                 30, "the mirror to go on applying")
        assert w.verify().mismatched.count() == 0
    finally:
        w.close()


def test_repair_ships_exactly_the_differing_blocks_and_survives_a_restart(tmp_path, key):
    size = 70 * MiB + 5 * BS
    w = World(tmp_path, key, size)
    try:
        w.vol.write(0, os.urandom(size))
        w.driver.start()
        w.driver.sync(60)
        bad = [3 * MiB + 5, 66 * MiB, size - 1]
        flip(w.image, bad)
        found = w.verify().mismatched
        assert [s for s, _n in runs(found)] == sorted(o // BS for o in bad)
        cycle = w.driver.owe_blocks(w.spec.label, found)
        assert w.driver.repair_pending(w.spec.label) in (0, 3)  # 0 once the freeze took them
        wait_for(lambda: w.driver.status()["targets"][w.spec.label]["applied_cycle"] >= cycle,
                 60, "the repair cycle")
        stats = w.driver.status()["targets"][w.spec.label]
        assert stats["bytes_raw"] == 3 * BS  # exactly the three blocks, nothing else
        assert stats["bytes_wire"] < 3 * BS + 4096
        assert w.verify().mismatched.count() == 0
        assert w.driver.repair_pending(w.spec.label) == 0
        # Blocks owed to a broken mirror are kept on disk and ship after a restart.
        flip(w.image, [10 * MiB])
        found = w.verify().mismatched
        w.driver.break_cycles(now=True)
        assert w.driver.owe_blocks(w.spec.label, found) is None
        w.driver.stop()
        w.driver = MirrorDriver(w.vol, [w.spec], key, MirrorOptions(interval=3600),
                                store=w.src)
        w.driver.start()  # its recovery asks for a freeze: the repair is waiting
        wait_for(lambda: w.verify().mismatched.count() == 0, 60, "the repair after restart")
        assert w.driver.status()["targets"][w.spec.label]["bytes_raw"] == BS
    finally:
        w.close()


def test_the_check_schedule_settings_are_read_and_checked(tmp_path):
    from cyclemirror.daemon.config import config_from_mapping
    from cyclemirror.errors import UsageError

    cfg = config_from_mapping({"verify_every": "24h", "verify_repair": True,
                               "verify_bwlimit": "100M", "scrub_every": 90,
                               "scrub_bwlimit": "1G"}, "x.toml")
    assert (cfg.verify_every, cfg.verify_repair, cfg.verify_bwlimit) == (86400.0, True,
                                                                          100 * MiB)
    assert (cfg.scrub_every, cfg.scrub_bwlimit) == (90.0, 1 << 30)
    assert config_from_mapping({}, "x.toml").verify_every == 0
    for bad in ({"verify_every": "often"}, {"verify_repair": "yes"},
                {"scrub_every": -1}, {"verify_bwlimit": "fast"}):
        with pytest.raises(UsageError, match="x.toml"):
            config_from_mapping(bad, "x.toml")


def test_merges_wait_for_a_verify_and_every_cycle_it_may_name_stays_readable(tmp_path, key):
    w = World(tmp_path, key, 70 * MiB)
    try:
        w.vol.write(0, os.urandom(70 * MiB))
        w.driver.start()
        w.driver.sync(60)
        # a merge the first cycle asked for may still run: it started before the hold
        wait_for(lambda: w.vol._merging is None and len(w.vol.frozen_cycles()) <= 1, 60,
                 "the first cycle's merge")
        result = {}

        def run():
            result["out"] = w.verify(read_rate=16 * MiB)  # ~4.5 s per side

        t = threading.Thread(target=run)
        t.start()
        wait_for(lambda: w.driver._merge_holds == 1, 10, "the verify to hold merges")
        first = w.vol.open_overlay
        for i in range(3):
            w.vol.write(i * BS, os.urandom(BS))
            w.driver.sync(60)  # each applied cycle asks for a merge
            # no merge is even asked for: so no cycle the target may name is refused
            assert w.vol._merging is None
        held = w.vol.frozen_cycles()
        t.join(120)
        assert result["out"].mismatched.count() == 0
        assert held[0] <= first  # the overlays piled up while the verify ran ...
        w.vol.write(0, os.urandom(BS))
        w.driver.sync(60)
        # ... and merge once it is done
        wait_for(lambda: (w.vol.frozen_cycles() or [w.vol.open_overlay + 1])[0] > first, 30,
                 "the merges after it")
    finally:
        w.close()
