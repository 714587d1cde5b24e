"""Frame payloads: decode_payload / verify_payload, including lz4 and zstd decompression.

Input: byte 0 picks the limits and options, then a 48-byte header (its
header checksum is always rewritten so the fuzzer reaches the payload;
with bit 3 of byte 0 the payload checksum is rewritten too, to the xxh3 of
the payload itself, which an uncompressed frame then passes), then the
payload.  A decompressor must never write more than ``raw_length``, and
whatever passes must be exactly ``raw_length`` bytes whose checksum matches.
"""

from __future__ import annotations

import struct

import lz4.block
import xxhash
import zstandard

from cyclemirror._cext import frames
from cyclemirror.wire import link
from fuzz.fuzz_frame_header import fix_header_checksum
from fuzz.harness import clean

MAX_LEN = 1 << 16
_LIMITS = [link.control_limits(), link.volume_limits(1 << 30, 4096),
           link.volume_limits(1 << 30, 512), link.volume_limits(1 << 40, 4096)]


def _frame(ftype, codec, offset, raw: bytes) -> bytes:
    if codec == frames.CODEC_LZ4:
        payload = lz4.block.compress(raw, store_size=False)
    elif codec == frames.CODEC_ZSTD:
        payload = zstandard.ZstdCompressor(level=3).compress(raw)
    else:
        payload = raw
    ck = xxhash.xxh3_64_intdigest(raw)
    return bytes(frames.encode_header(ftype, 0, codec, 1, offset, len(payload), len(raw),
                                      ck)) + payload


def seeds() -> list[bytes]:
    block = bytes(range(256)) * 16
    return [b"\x01" + _frame(frames.FT_DATA, frames.CODEC_NONE, 0, block),
            b"\x01" + _frame(frames.FT_DATA, frames.CODEC_LZ4, 4096, block * 2),
            b"\x01" + _frame(frames.FT_DATA, frames.CODEC_ZSTD, 8192, bytes(8192)),
            b"\x02" + _frame(frames.FT_DATA, frames.CODEC_ZSTD, 512, b"x" * 512 + bytes(512)),
            b"\x00" + bytes(frames.encode_control(3, b'{"type":"ack","cycle":3,"chunks":1}'))]


def test_one_input(data: bytes) -> None:
    if len(data) < 49:
        return
    limits = _LIMITS[data[0] & 3]
    header_bytes = bytearray(data[1:49])
    payload = data[49:]
    if data[0] & 8:
        struct.pack_into("<Q", header_bytes, 32, xxhash.xxh3_64_intdigest(payload))
    header = clean(frames.decode_header, fix_header_checksum(header_bytes), limits)
    if not isinstance(header, frames.FrameHeader):
        return
    payload = payload[:header.length]
    for decode in (frames.decode_payload, frames.verify_payload):
        raw = clean(decode, header, bytearray(payload))
        if isinstance(raw, Exception):
            continue
        if header.type in (frames.FT_DATA, frames.FT_CONTROL):
            assert len(raw) == header.raw_length, (len(raw), header.raw_length)
            assert xxhash.xxh3_64_intdigest(bytes(raw)) == header.checksum
        else:
            assert len(raw) == 0
