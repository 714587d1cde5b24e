"""The compiled transmission loop (cyclemirror._cext.nbdio) against the pure-Python model.

Hypothesis drives random request streams (valid and invalid: bad flags, zero
and oversized lengths, ranges past the end, unknown commands, truncated tails,
bad magic) through a real TransmissionSession on a socketpair over a real raw
image file; every reply and the final image must equal what the model in
tests/support/nbd_reference.py says (replies compared by handle: pipelined big writes
may be answered out of order, which NBD allows).  A golden transcript pins the exact reply bytes.
"""

from __future__ import annotations

import random
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cyclemirror._cext import nbdio
from cyclemirror.nbd import RawFileBackend
from cyclemirror.nbd import protocol as P
from tests.support import nbd_rawclient as C
from tests.support.nbd_reference import (
    TF_DF,
    TF_FAST_ZERO,
    TF_FLUSH,
    TF_FUA,
    TF_READ_ONLY,
    TF_TRIM,
    TF_ZEROES,
    ReferenceSession,
)
from tests.support.tools import SLOW

SIZE = 1 << 20
MAX_PAYLOAD = 512 * 1024  # above the 256 KiB receive buffer: exercises the big-payload path


def tflags_for(readonly: bool, structured: bool, fast_zero: bool) -> int:
    flags = 1 | (TF_DF if structured else 0)
    if readonly:
        return flags | TF_READ_ONLY
    return flags | TF_FLUSH | TF_FUA | TF_TRIM | TF_ZEROES | (TF_FAST_ZERO if fast_zero else 0)


def run_session(path: str, stream: bytes, *, readonly: bool, structured: bool, fast_zero: bool,
                context_id: int = 0, read_handles: dict[int, tuple[int, int]] | None = None,
                nreplies: int | None = None):
    """Serve `stream` with a real session; returns (replies, leftover bytes, end_reason)."""
    backend = RawFileBackend(path, readonly=readonly)
    if not fast_zero:
        backend.fast_zero = False
    server_end, client_end = socket.socketpair()
    session = nbdio.TransmissionSession(
        server_end.fileno(), "t", backend, backend.size,
        tflags_for(readonly, structured, fast_zero), structured, context_id, MAX_PAYLOAD)
    result = {}

    def serve():
        result["reason"] = session.run()
        server_end.close()

    def send():
        try:
            client_end.sendall(stream)
            client_end.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may end the session before taking everything

    threads = [threading.Thread(target=serve), threading.Thread(target=send)]
    for t in threads:
        t.start()
    client_end.settimeout(30)
    reader = C.ReplyReader(client_end, structured)
    for h, (off, n) in (read_handles or {}).items():
        reader.expect_read(h, off, n)
    replies = []
    try:
        while nreplies is None or len(replies) < nreplies:
            replies.append(reader.next())
    except (EOFError, ConnectionResetError):
        pass  # a reset: the server hung up with our unread requests still queued (bad magic...)
    leftover = b""
    while True:
        try:
            chunk = client_end.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        leftover += chunk
    for t in threads:
        t.join(30)
    client_end.close()
    backend.close()
    return replies, leftover, result["reason"]


def end_kind(reason: str) -> str:
    for needle, kind in (("end of stream", "eof"), ("truncated", "truncated"),
                         ("bad request magic", "magic"), ("maximum payload", "oversized"),
                         ("NBD_CMD_DISC", "disc")):
        if needle in reason:
            return kind
    return reason


@st.composite
def request_streams(draw):
    n = draw(st.integers(1, 25))
    parts, reads = [], {}
    for handle in range(1, n + 1):
        cmd = draw(st.sampled_from([C.CMD_READ] * 4 + [C.CMD_WRITE] * 4 + [
            C.CMD_FLUSH, C.CMD_TRIM, C.CMD_WRITE_ZEROES, C.CMD_BLOCK_STATUS, 5, 9, 0xFFFF]))
        flags = draw(st.sampled_from([0, 0, 0, C.FUA, C.DF, C.NO_HOLE, C.FAST_ZERO, C.REQ_ONE,
                                      0x8000, C.FUA | C.NO_HOLE]))
        offset = draw(st.one_of(st.integers(0, SIZE), st.just(SIZE - 1),
                                st.integers(0, 2**64 - 1)))
        length = draw(st.one_of(st.integers(0, 9000), st.integers(0, 600 * 1024),
                                st.just(2**32 - 1)))
        if cmd == C.CMD_FLUSH and draw(st.booleans()):
            offset = length = 0
        elif draw(st.booleans()):  # keep most requests in range so data moves
            offset %= SIZE
            length = min(length, SIZE - offset)
        payload = b""
        if cmd == C.CMD_WRITE and length <= MAX_PAYLOAD:
            payload = random.Random(handle * 7919 + length).randbytes(length)
        if cmd == C.CMD_READ:
            reads[handle] = (offset, length)
        parts.append(C.request(cmd, offset, length, flags=flags, handle=handle, payload=payload))
    tail = draw(st.sampled_from(["", "", "disc", "truncated", "magic"]))
    if tail == "disc":
        parts.append(C.request(C.CMD_DISC, handle=999))
    elif tail == "truncated":
        parts.append(C.request(C.CMD_READ, 0, 512, handle=998)[:draw(st.integers(1, 27))])
    elif tail == "magic":
        parts.append(C.request(C.CMD_READ, 0, 512, handle=997, magic=0x12345678))
    return b"".join(parts), reads


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("nbdsession")


@settings(max_examples=300 if SLOW else 60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(streams=request_streams(), readonly=st.booleans(), structured=st.booleans(),
       fast_zero=st.booleans())
def test_session_matches_the_reference_model(image_dir, streams, readonly, structured, fast_zero):
    stream, reads = streams
    initial = random.Random(len(stream)).randbytes(SIZE)
    path = str(image_dir / "img")
    with open(path, "wb") as f:
        f.write(initial)
    model = ReferenceSession(bytearray(initial), tflags_for(readonly, structured, fast_zero),
                             structured, MAX_PAYLOAD)
    model.run(stream)
    replies, leftover, reason = run_session(path, stream, readonly=readonly,
                                            structured=structured, fast_zero=fast_zero,
                                            read_handles=reads)
    assert leftover == b""
    assert end_kind(reason) == model.end, reason
    # Replies to big writes that were in flight together may overtake each other (NBD
    # lets replies come in any order; every other request waits for them), so the
    # replies are compared by handle; the handles of one stream are unique.
    got = sorted((r.handle, r.error, r.data) for r in replies)
    want = sorted((r.handle, r.error, r.data) for r in model.replies)
    assert got == want
    with open(path, "rb") as f:
        assert f.read() == bytes(model.image)


def test_golden_reply_transcript(tmp_path):
    """Exact bytes of simple and structured replies, pinned so an optimisation cannot move them."""
    path = tmp_path / "img"
    path.write_bytes(bytes(range(256)) * 16)  # 4096 bytes
    stream = (C.request(C.CMD_WRITE, 0, 4, handle=0x1111, payload=b"ABCD")
              + C.request(C.CMD_READ, 2, 4, handle=0x2222)
              + C.request(C.CMD_READ, 4095, 2, handle=0x3333))
    reads = {0x2222: (2, 4), 0x3333: (4095, 2)}

    def raw(structured):
        server_end, client_end = socket.socketpair()
        backend = RawFileBackend(str(path), readonly=False)
        s = nbdio.TransmissionSession(server_end.fileno(), "g", backend, backend.size,
                                      tflags_for(False, structured, True), structured, 0,
                                      MAX_PAYLOAD)
        client_end.sendall(stream + C.request(C.CMD_DISC))
        s.run()
        server_end.close()
        out = b""
        while chunk := client_end.recv(65536):
            out += chunk
        backend.close()
        return out

    assert reads  # both reads are answered below
    simple = raw(False).hex()
    assert simple == (
        "67446698" "00000000" "0000000000001111"
        "67446698" "00000000" "0000000000002222" "43440405"
        "67446698" "00000016" "0000000000003333")
    structured = raw(True)
    assert structured[:16].hex() == "67446698" "00000000" "0000000000001111"
    assert structured[16:48].hex() == (
        "668e33ef" "0001" "0001" "0000000000002222" "0000000c" "0000000000000002" "43440405")
    # error chunk: magic, DONE, type ERROR (0x8001), handle, length, EINVAL, message length, text
    err = structured[48:]
    magic, flags, rtype, handle, length = struct.unpack(">IHHQI", err[:20])
    assert (magic, flags, rtype, handle) == (0x668E33EF, 1, 0x8001, 0x3333)
    code, mlen = struct.unpack(">IH", err[20:26])
    assert code == 22 and length == 6 + mlen == len(err) - 20
    assert b"beyond the export's size" in err[26:]


def test_protocol_constants_agree_with_the_independent_client():
    assert P.OPT_LIST_META_CONTEXT == C.OPT["LIST_META_CONTEXT"] == 9
    assert P.OPT_SET_META_CONTEXT == C.OPT["SET_META_CONTEXT"] == 10
    assert (P.REQUEST_MAGIC, P.SIMPLE_REPLY_MAGIC, P.STRUCTURED_REPLY_MAGIC) == (
        C.REQUEST_MAGIC, C.SIMPLE_MAGIC, C.STRUCTURED_MAGIC)
    assert (P.CMD_FLAG_FUA, P.CMD_FLAG_NO_HOLE, P.CMD_FLAG_DF, P.CMD_FLAG_REQ_ONE,
            P.CMD_FLAG_FAST_ZERO) == (C.FUA, C.NO_HOLE, C.DF, C.REQ_ONE, C.FAST_ZERO)
    assert (P.EPERM, P.EIO, P.EINVAL, P.ENOSPC, P.EOVERFLOW, P.ENOTSUP) == (
        C.EPERM, C.EIO, C.EINVAL, C.ENOSPC, C.EOVERFLOW, C.ENOTSUP)


class _StatusBackend:
    """A backend whose block_status answer is chosen by the test (to check validation)."""

    size = 1 << 20
    block_size = 4096
    readonly = True

    def __init__(self, answer):
        self.answer = answer

    def read(self, offset, length):
        return bytes(length)

    def block_status(self, offset, length):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _status(answer, offset=0, length=65536, flags=0):
    server_end, client_end = socket.socketpair()
    backend = _StatusBackend(answer)
    s = nbdio.TransmissionSession(server_end.fileno(), "s", backend, backend.size,
                                  1 | TF_READ_ONLY | TF_DF, True, 7, MAX_PAYLOAD)
    client_end.sendall(C.request(C.CMD_BLOCK_STATUS, offset, length, flags=flags, handle=5)
                       + C.request(C.CMD_DISC))
    s.run()
    server_end.close()
    client_end.settimeout(5)
    reply = C.ReplyReader(client_end, True).next()
    client_end.close()
    return reply


def test_block_status_merges_runs_and_honours_req_one():
    answer = [(4096, 3), (4096, 3), (8192, 0), (49152, 3)]
    assert _status(answer).extents == [(8192, 3), (8192, 0), (49152, 3)]
    assert _status(answer, flags=C.REQ_ONE).extents == [(8192, 3)]


@pytest.mark.parametrize("answer", [
    [(0, 0)],                       # zero-length extent
    [(65536 + 4096, 0)],            # longer than the query
    [(32768, 0), (40960, 3)],       # sum passes the query
    [],                             # describes nothing
    [(-5, 0)],                      # negative
    [("x", 0)],                     # not a number
    OSError(5, "disk gone"),
])
def test_block_status_from_a_broken_backend_is_an_error_reply_not_a_crash(answer):
    reply = _status(answer)
    assert reply.error == C.EIO and reply.extents is None


def test_block_status_past_the_end_is_einval():
    assert _status([(4096, 0)], offset=(1 << 20) - 4096, length=8192).error == C.EINVAL


class _ReadBackend:
    """A read-only backend whose read answer is chosen by the test."""

    size = 1 << 20
    block_size = 4096
    readonly = True

    def __init__(self, answer):
        self.answer = answer

    def read(self, offset, length):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer(length)


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("answer,error", [
    (lambda n: bytes(n), 0),
    (lambda n: bytearray(b"\x07" * n), 0),          # served without a copy, like bytes
    (lambda n: bytes(n - 1), C.EIO),                 # short
    (lambda n: bytes(n + 1), C.EIO),                 # long
    (lambda n: memoryview(bytes(n)), C.EIO),         # not bytes
    (lambda n: None, C.EIO),
    (PermissionError(13, "no"), C.EPERM),
    (OSError(28, "full"), C.ENOSPC),
    (RuntimeError("bug in a backend"), C.EIO),
])
def test_what_a_backend_returns_from_read_is_checked(structured, answer, error):
    server_end, client_end = socket.socketpair()
    backend = _ReadBackend(answer)
    s = nbdio.TransmissionSession(server_end.fileno(), "r", backend, backend.size,
                                  1 | TF_READ_ONLY | (TF_DF if structured else 0), structured, 0,
                                  MAX_PAYLOAD)
    client_end.sendall(C.request(C.CMD_READ, 4096, 1000, handle=5)
                       + C.request(C.CMD_READ, 0, 10, handle=6) + C.request(C.CMD_DISC))
    s.run()
    server_end.close()
    client_end.settimeout(5)
    reader = C.ReplyReader(client_end, structured)
    reader.expect_read(5, 4096, 1000)
    reader.expect_read(6, 0, 10)
    first, second = reader.next(), reader.next()
    assert (first.handle, first.error) == (5, error)
    assert (first.data is not None) == (error == 0)
    assert second.handle == 6  # the session went on after the failure
    client_end.close()
