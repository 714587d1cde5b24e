"""The target's receive path without copies: frames.verify_payload, new_payload_buffer,
sockio.recv_into_exact and FrameLink.recv_frame over real sockets.

Proves: verify_payload agrees with decode_payload (the reference behaviour)
on every codec, for intact and corrupted payloads, and hands an uncompressed
receive buffer back as the same object; a frame's payload handed to the
caller is never overwritten by the frames received after it (the link
reuses only the compressed scratch buffer); header caps still reject a frame
before a payload byte is read; a truncated payload is a ConnectionLostError;
MSG_WAITALL reads still assemble payloads that arrive in small pieces, with
and without a socket timeout; the frame checksum is the staging log's
checksum, which is what lets staging reuse it, and a staged record with a wrong
checksum is still caught at replay.
"""

import os
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror import errors
from cyclemirror._cext import frames
from cyclemirror.receiver.staging import data_checksum
from cyclemirror.wire import link as wirelink
from cyclemirror.wire.sockio import recv_into_exact
from tests.support.tools import SLOW

LIMITS = frames.FrameLimits(1 << 20, 1 << 20, 1 << 16, 1 << 30, 512)
CODECS = [frames.CODEC_NONE, frames.CODEC_LZ4, frames.CODEC_ZSTD]


def packed_frames(tmp_path, data: bytes, codec: int, chunk_size: int = 4096) -> list[bytes]:
    path = tmp_path / "src.img"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        return frames.FramePacker(codec, chunk_size=chunk_size).pack_extents(
            fd, [(0, len(data))], 7)
    finally:
        os.close(fd)


def split(frame: bytes):
    return frames.decode_header(frame[:frames.HEADER_SIZE], LIMITS), frame[frames.HEADER_SIZE:]


def outcome(fn, header, payload):
    try:
        return bytes(fn(header, payload))
    except errors.CycleMirrorError as exc:
        return (type(exc).__name__, getattr(exc, "field", None))


blocks = st.lists(st.sampled_from([b"\0" * 512, b"abc" * 170 + b"xy", None]), min_size=1,
                  max_size=8)


@settings(max_examples=200 if SLOW else 25, deadline=None)
@given(parts=blocks, codec=st.sampled_from(CODECS), flip=st.integers(-1, 4000),
       seed=st.binary(min_size=512, max_size=512))
def test_verify_payload_agrees_with_decode_payload(tmp_path_factory, parts, codec, flip, seed):
    data = b"".join(p if p is not None else seed for p in parts)
    for frame in packed_frames(tmp_path_factory.mktemp("f"), data, codec, chunk_size=1024):
        header, payload = split(frame)
        if 0 <= flip < len(payload) * 8:
            damaged = bytearray(payload)
            damaged[flip // 8] ^= 1 << (flip % 8)
            payload = bytes(damaged)
        expected = outcome(frames.decode_payload, header, payload)
        assert outcome(frames.verify_payload, header, payload) == expected
        assert outcome(frames.verify_payload, header, bytearray(payload)) == expected
        assert outcome(frames.verify_payload, header, memoryview(payload)) == expected


def test_verify_payload_returns_an_uncompressed_buffer_itself(tmp_path):
    (frame,) = packed_frames(tmp_path, os.urandom(4096), frames.CODEC_NONE)
    header, payload = split(frame)
    buf = bytearray(payload)
    assert frames.verify_payload(header, buf) is buf
    # decode_payload keeps its old contract: a copy for anything but bytes.
    copy = frames.decode_payload(header, buf)
    assert type(copy) is bytes and copy == buf


def test_verify_payload_checks_the_length_and_the_header_origin(tmp_path):
    (frame,) = packed_frames(tmp_path, os.urandom(4096), frames.CODEC_NONE)
    header, payload = split(frame)
    with pytest.raises(errors.FrameError) as exc:
        frames.verify_payload(header, bytearray(payload) + b"x")
    assert exc.value.field == "length"
    with pytest.raises(errors.UsageError):
        frames.verify_payload(frames.FrameHeader(), b"")


def test_new_payload_buffer_sizes_and_refusals():
    buf = frames.new_payload_buffer(1 << 20)
    assert type(buf) is bytearray and len(buf) == 1 << 20
    assert frames.new_payload_buffer(0) == bytearray()
    for bad in (-1, 1 << 32, 1.5):
        with pytest.raises(errors.UsageError):
            frames.new_payload_buffer(bad)


def test_frame_checksum_is_the_staging_checksum(tmp_path):
    data = os.urandom(3000) + b"\0" * 1096
    for frame in packed_frames(tmp_path, data, frames.CODEC_LZ4):
        header, payload = split(frame)
        assert header.checksum == data_checksum(frames.decode_payload(header, payload))


@pytest.fixture
def pair():
    # TCP over loopback, as the link really runs (peer names are host:port).
    with socket.create_server(("127.0.0.1", 0)) as lst:
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    yield a, b
    a.close()
    b.close()


def sender(sock, pieces, delay=0.0):
    def run():
        for p in pieces:
            sock.sendall(p)
            if delay:
                time.sleep(delay)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("codec", CODECS)
def test_recv_frame_hands_over_payloads_that_later_frames_never_touch(tmp_path, pair, codec):
    # Text compresses (scratch buffer path), random does not (raw path); mixed
    # sizes make the scratch buffer grow between frames.
    parts = [b"log line %d\n" % i * 40 for i in range(6)] + [os.urandom(4096) for _ in range(3)]
    data = b"".join(p[:4096].ljust(4096, b".") for p in parts)
    sent = packed_frames(tmp_path, data, codec)
    a, b = pair
    t = sender(a, sent)
    link = wirelink.FrameLink(b, LIMITS)
    got = [link.recv_frame() for _ in sent]
    t.join()
    assert b"".join(bytes(p) for _h, p in got) == data
    raw_payloads = [p for h, p in got if h.codec == frames.CODEC_NONE]
    assert len({id(p) for p in raw_payloads}) == len(raw_payloads)
    assert link.bytes_received == sum(len(f) for f in sent)


def test_recv_frame_checks_caps_before_reading_a_payload(pair):
    a, b = pair
    # A DATA frame claiming 2 MiB against a 1 MiB cap: refused from the header alone,
    # although not one payload byte follows it.
    header = frames.encode_header(frames.FT_DATA, 0, frames.CODEC_NONE, 1, 0, 2 << 20, 2 << 20, 0)
    a.sendall(header)
    b.settimeout(5)
    with pytest.raises(errors.FrameError) as exc:
        wirelink.FrameLink(b, LIMITS).recv_frame()
    assert exc.value.field in ("raw_length", "length")


def test_recv_frame_truncated_payload_is_a_lost_connection(tmp_path, pair):
    (frame,) = packed_frames(tmp_path, os.urandom(4096), frames.CODEC_NONE)
    a, b = pair
    a.sendall(frame[:-100])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(errors.ConnectionLostError) as exc:
        wirelink.FrameLink(b, LIMITS).recv_frame()
    assert "3996 of 4096 bytes of a frame payload" in str(exc.value)
    assert not getattr(exc.value, "clean", False)


def test_recv_frame_corrupted_payload_is_a_checksum_error(tmp_path, pair):
    (frame,) = packed_frames(tmp_path, os.urandom(4096), frames.CODEC_NONE)
    bad = bytearray(frame)
    bad[-1] ^= 0x40
    a, b = pair
    a.sendall(bytes(bad))
    with pytest.raises(errors.ChecksumError):
        wirelink.FrameLink(b, LIMITS).recv_frame()


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_recv_into_exact_assembles_small_pieces(pair, timeout):
    a, b = pair
    data = os.urandom(64 << 10)
    t = sender(a, [data[i:i + 1000] for i in range(0, len(data), 1000)], delay=0.0005)
    b.settimeout(timeout)
    buf = bytearray(len(data))
    recv_into_exact(b, buf, "a test payload")
    t.join()
    assert buf == data


def test_recv_into_exact_clean_close_between_messages(pair):
    a, b = pair
    a.close()
    with pytest.raises(errors.ConnectionLostError) as exc:
        recv_into_exact(b, bytearray(48), "a frame header")
    assert exc.value.clean


def test_staging_records_a_passed_checksum_and_replay_still_verifies_it(tmp_path):
    from cyclemirror.receiver.staging import REC_DATA, REC_ZERO, StagingWriter, read_records

    data = bytearray(os.urandom(4096))
    path = str(tmp_path / "m.staging")
    w = StagingWriter(path, 0)
    w.append(REC_DATA, 0, 0, len(data), data, data_checksum(data))
    w.append(REC_ZERO, 0, 4096, 4096, None, 12345)  # a ZERO record's checksum is always 0
    w.append(REC_DATA, 0, 8192, len(data), data)    # no checksum given: hashed here
    w.sync()
    size = w.size
    w.close()
    recs = list(read_records(path, size, 1 << 20))
    assert [(r[0], r[2], r[4]) for r in recs] == [(REC_DATA, 0, data), (REC_ZERO, 4096, None),
                                                 (REC_DATA, 8192, data)]
    # A wrong checksum handed in is caught at replay, before anything is applied.
    bad = str(tmp_path / "bad.staging")
    w = StagingWriter(bad, 0)
    w.append(REC_DATA, 0, 0, len(data), data, data_checksum(data) ^ 1)
    w.close()
    with pytest.raises(errors.IntegrityError):
        list(read_records(bad, w.size, 1 << 20))
