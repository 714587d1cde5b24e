"""The 48-byte frame header decoder (cext/frames.pyx ``decode_header``).

Byte 0 picks the limits (before an open: CONTROL only; after: a volume's
caps and alignment); the rest is the header.  A flag bit in byte 0 makes the
harness write the correct header checksum, so mutations of the fields get
past the checksum and exercise every field check and its combinations.
"""

from __future__ import annotations

import struct

import xxhash

from cyclemirror._cext import frames
from cyclemirror.wire import link
from fuzz.harness import clean

MAX_LEN = 64
_LIMITS = [link.control_limits(), link.volume_limits(1 << 30, 4096),
           link.volume_limits(12288 + 512, 512), link.volume_limits(1 << 56, 1 << 20)]


def fix_header_checksum(header: bytes) -> bytes:
    head = bytes(header[:40]).ljust(40, b"\0")
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))


def seeds() -> list[bytes]:
    out = [b"\x00" + bytes(frames.encode_control(1, b'{"type":"ack"}')[:48]),
           b"\x05" + bytes(frames.encode_zero(frames.FT_ZERO, 2, 4096, 8192)),
           b"\x05" + bytes(frames.encode_zero(frames.FT_TRIM, 2, 0, 4096)),
           b"\x05" + bytes(frames.encode_header(frames.FT_DATA, 0, frames.CODEC_LZ4, 3, 8192,
                                                100, 4096, 1234)),
           b"\x06" + bytes(frames.encode_header(frames.FT_DATA, 0, frames.CODEC_NONE, 3, 12288,
                                                512, 512, 99))]
    return out


def test_one_input(data: bytes) -> None:
    if not data:
        return
    limits = _LIMITS[data[0] & 3]
    header = data[1:]
    if data[0] & 4:
        header = fix_header_checksum(header)
    result = clean(frames.decode_header, header, limits)
    if isinstance(result, frames.FrameHeader):
        # What passed is within the caps it was checked against.
        assert result.length <= limits.max_payload
        if result.type != frames.FT_CONTROL:
            assert result.offset + result.raw_length <= limits.volume_size
