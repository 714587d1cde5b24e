"""Bad peers against a real TargetServer, while it keeps serving another mirror.

Each fault runs while a real MirrorDriver mirrors volume ``good`` of another
source store back-to-back into the same target.  Proves, per fault: a clear
error (on the target, and sent back to the peer where it can be), nothing of
the bad stream applied, and the ``good`` mirror keeps applying cycles.

Faults: a wrong key; a payload byte and a header offset byte flipped in
flight by a frame-aware proxy (the source then retries and the image ends
equal to the freeze), in either direction (a damaged acknowledgement is
retried like a damaged data frame, never a reason to stop the target); a
truncated frame; oversized length fields; a data frame outside the volume;
garbage instead of a handshake.
"""

import logging
import os
import socket
import struct
import tempfile
import threading
import time

import pytest

from cyclemirror import keys
from cyclemirror._cext import frames
from cyclemirror.errors import AuthenticationError
from cyclemirror.receiver import TargetServer
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.store import Store
from cyclemirror.wire import handshake
from cyclemirror.wire.link import FrameLink, RemoteError
from tests.support.mirror import same_file, wait_for

MiB = 1 << 20


@pytest.fixture
def world(tmp_path):
    key = keys.generate_key()
    dst = Store.create(str(tmp_path / "dst"))
    server = TargetServer(dst, key)
    server.start()
    good_store = Store.create(str(tmp_path / "good"))
    good = good_store.create_volume("good", 4 * MiB)
    applied = []
    driver = MirrorDriver(good, server.address, key,
                          MirrorOptions(interval=0.02,
                                        on_applied=lambda c, label, s: applied.append(c)),
                          store=good_store)
    driver.start()
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            good.write((i % 1024) * 4096, os.urandom(4096))
            i += 7
            time.sleep(0.01)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    wait_for(lambda: applied, 30, "the good mirror's first cycle")
    w = {"tmp": tmp_path, "key": key, "server": server, "dst": dst, "applied": applied}
    yield w
    stop.set()
    t.join()
    driver.stop()
    server.stop()
    good_store.close()
    dst.close()


def good_mirror_keeps_going(w, n=2):
    before = len(w["applied"])
    wait_for(lambda: len(w["applied"]) >= before + n, 30, "the good mirror's next cycles")


def raw_session(w, key=None, volume="bad", size=4 * MiB):
    sock = socket.create_connection(w["server"].address, timeout=10)
    handshake.client_handshake(sock, key or w["key"])
    link = FrameLink(sock)
    link.send_message("open", node_id="badnode", node_name=None, mirror=volume, group=False,
                      volumes=[{"name": volume, "size": size, "block_size": 4096}])
    opened = link.recv_message({"opened"})
    link.send_message("begin", cycle=1, freeze_time=1.0, full=True, resume_from=0)
    assert link.recv_message({"ack"})["chunks"] == 0
    return sock, link, opened


def mirror_dir(w, node="badnode"):
    return os.path.join(str(w["tmp"] / "dst"), "mirrors", node)


def nothing_applied(w, node="badnode", volume="bad"):
    d = mirror_dir(w, node)
    return not os.path.exists(os.path.join(d, f"{volume}.img"))


def error_reply(link):
    with pytest.raises(RemoteError) as info:
        while True:
            link.recv_message({"ack", "applied"})
    return info.value


def data_frame(offset, data, cycle=1):
    (frame,) = frames.FramePacker(frames.CODEC_NONE, 0, len(data)).pack_extents(
        _fd_with(data), [(0, len(data))], cycle)
    # Re-address the chunk: rebuild the header at the wanted offset.
    h = frames.encode_header(frames.FT_DATA, 0, frames.CODEC_NONE, cycle, offset,
                             len(data), len(data), int.from_bytes(frame[32:40], "little"))
    return h + frame[frames.HEADER_SIZE:]


def _fd_with(data):
    """A descriptor of an unlinked temp file holding ``data`` (for FramePacker)."""
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        return os.open(f.name, os.O_RDONLY)


def test_wrong_key_breaks_that_mirror_permanently_and_others_go_on(world, tmp_path):
    store = Store.create(str(tmp_path / "intruder"))
    vol = store.create_volume("v", 1 * MiB)
    d = MirrorDriver(vol, world["server"].address, keys.generate_key(),
                     MirrorOptions(), store=store)
    d.start()
    wait_for(lambda: d.status()["phase"] == "broken", 30, "the driver to give up")
    (t,) = d.status()["targets"].values()
    assert t["phase"] == "broken" and "AuthenticationError" in t["last_error"]
    # It says which keys do not match and what to do (key ids, never the keys).
    assert "is not one of this target's keys" in t["last_error"]
    assert "key file" in t["last_error"]
    with pytest.raises(AuthenticationError):
        d.sync(5)
    good_mirror_keeps_going(world)
    assert not os.path.exists(mirror_dir(world, store.node_id))
    d.stop()
    store.close()


def test_truncated_frame_is_an_error_and_nothing_is_applied(world):
    sock, link, _ = raw_session(world)
    frame = data_frame(0, os.urandom(64 * 1024))
    sock.sendall(frame[: frames.HEADER_SIZE + 1000])
    sock.shutdown(socket.SHUT_WR)
    good_mirror_keeps_going(world)
    wait_for(lambda: any("of a frame payload" in e for e in world["server"].errors), 10,
             "the target to report the truncated frame")
    assert nothing_applied(world)
    sock.close()


@pytest.mark.parametrize("field, patch", [
    ("length", lambda h: h[:24] + struct.pack("<I", 0xFFFFFFF0) + h[28:]),
    ("raw_length", lambda h: h[:28] + struct.pack("<I", 0x7FFFFFFF) + h[32:]),
])
def test_oversized_lengths_get_an_error_naming_the_field(world, field, patch):
    sock, link, _ = raw_session(world)
    frame = data_frame(0, os.urandom(4096))
    bad = patch(frame[: frames.HEADER_SIZE])
    sock.sendall(bad)  # the header alone: the target must refuse before reading more
    err = error_reply(link)
    assert err.code == "FrameError" and field in str(err)
    assert nothing_applied(world)
    good_mirror_keeps_going(world)
    sock.close()


def test_extent_outside_the_volume_is_refused(world):
    sock, link, _ = raw_session(world, size=1 * MiB)
    sock.sendall(data_frame(1 * MiB, os.urandom(4096)))
    err = error_reply(link)
    assert "beyond the volume size" in str(err) or "runs past" in str(err)
    assert nothing_applied(world)
    sock.close()


def test_garbage_instead_of_a_handshake_is_dropped(world):
    s = socket.create_connection(world["server"].address, timeout=10)
    s.sendall(b"\x00" * 48)
    assert s.recv(100) == b""  # closed on us
    s.close()
    wait_for(lambda: any("bad magic" in e for e in world["server"].errors), 10, "the error")
    good_mirror_keeps_going(world)


class FlipProxy:
    """Forwards a mirror connection, flipping one byte of one frame in flight, once.

    ``direction`` "up" damages the source's first DATA frame, "down" the
    target's first ``ack``; ``where`` is "payload" (a checksum no longer
    matches) or "header offset" (the offset field becomes 1 MiB: still
    aligned, so a DATA frame fails only its header checksum, while a CONTROL
    frame, whose offset must be 0, fails that field's check).
    """

    def __init__(self, target, where, direction="up"):
        self.target, self.where, self.direction = target, where, direction
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.flipped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            u = socket.create_connection(self.target)
            up, down = (self._flip, self._pump) if self.direction == "up" else (
                self._pump, self._flip)
            threading.Thread(target=up, args=(c, u), daemon=True).start()
            threading.Thread(target=down, args=(u, c), daemon=True).start()

    @staticmethod
    def _close(*socks):
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @classmethod
    def _pump(cls, a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            cls._close(a, b)

    def _wanted(self, header, payload):
        if self.flipped:
            return False
        if self.direction == "up":
            return header[5] == frames.FT_DATA
        return header[5] == frames.FT_CONTROL and b'"type":"ack"' in payload

    def _flip(self, a, b):
        def exact(n):
            buf = b""
            while len(buf) < n:
                got = a.recv(n - len(buf))
                if not got:
                    raise OSError("eof")
                buf += got
            return buf

        try:
            if self.direction == "up":
                b.sendall(exact(48))  # HELLO
                b.sendall(exact(32))  # PROOF (sent after the target's challenge)
            else:
                b.sendall(exact(80))  # CHALLENGE
                verdict = exact(3)  # VERDICT: status, message length, message
                b.sendall(verdict + exact(int.from_bytes(verdict[1:3], "big")))
            while True:
                header = bytearray(exact(frames.HEADER_SIZE))
                payload = bytearray(exact(int.from_bytes(header[24:28], "little")))
                if self._wanted(header, payload):
                    self.flipped += 1
                    if self.where == "payload":
                        payload[len(payload) // 2] ^= 0x10
                    else:
                        header[18] ^= 0x10
                b.sendall(bytes(header) + bytes(payload))
        except OSError:
            pass
        finally:
            self._close(a, b)

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("where", ["payload", "header offset"])
def test_bit_flipped_in_flight_is_detected_never_applied_then_retried(world, tmp_path, where):
    store = Store.create(str(tmp_path / "flipsrc"))
    vol = store.create_volume("flip", 2 * MiB)
    vol.write(0, os.urandom(2 * MiB))
    proxy = FlipProxy(world["server"].address, where)
    exported = {}

    def on_frozen(frozen, reader):
        p = str(tmp_path / f"flip-{frozen.number}.img")
        reader.export_to(p)
        exported[frozen.number] = p

    d = MirrorDriver(vol, proxy.address, world["key"],
                     MirrorOptions(on_frozen=on_frozen, retry_initial=0.05), store=store)
    d.start()
    cycle = d.sync(60)
    assert proxy.flipped == 1
    word = "frame payload" if where == "payload" else "header_checksum"
    assert any("ChecksumError" in e and word in e for e in world["server"].errors), \
        world["server"].errors
    image = os.path.join(mirror_dir(world, store.node_id), "flip.img")
    assert same_file(image, exported[cycle])
    good_mirror_keeps_going(world)
    d.stop()
    proxy.close()
    store.close()


@pytest.mark.parametrize("where", ["payload", "header offset"])
def test_damaged_ack_is_retried_and_the_cycle_completes_without_a_resume(world, tmp_path, where,
                                                                         caplog):
    store = Store.create(str(tmp_path / "acksrc"))
    vol = store.create_volume("ackflip", 2 * MiB)
    vol.write(0, os.urandom(2 * MiB))
    proxy = FlipProxy(world["server"].address, where, direction="down")
    exported = {}

    def on_frozen(frozen, reader):
        p = str(tmp_path / f"ackflip-{frozen.number}.img")
        reader.export_to(p)
        exported[frozen.number] = p

    d = MirrorDriver(vol, proxy.address, world["key"],
                     MirrorOptions(on_frozen=on_frozen, retry_initial=0.05), store=store)
    caplog.set_level(logging.WARNING, logger="cyclemirror.sender.driver")
    d.start()
    cycle = d.sync(60)  # raises the error if the target were marked broken
    assert proxy.flipped == 1
    # The source read the damage itself (not the target's word for it) and retried.
    word = "ChecksumError" if where == "payload" else "FrameError"
    seen = [r.getMessage() for r in caplog.records if "ackflip" in r.getMessage()]
    assert any(word in m for m in seen), seen
    (t,) = d.status()["targets"].values()
    assert t["phase"] != "broken", t
    image = os.path.join(mirror_dir(world, store.node_id), "ackflip.img")
    assert same_file(image, exported[cycle])
    d.stop()
    proxy.close()
    store.close()
