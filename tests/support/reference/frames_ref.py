"""Pure-Python model of cyclemirror._cext.frames, written from docs/protocol.md.

It encodes and validates the 48-byte frame header with ``struct`` and packs
extents with the ``xxhash``, ``lz4`` and ``zstandard`` packages, so the
compiled module is checked against an independent reading of the same
specification.  Errors are returned as ``(exception class name, field)`` by
``check_header`` so tests can compare them with the compiled module's.
"""

from __future__ import annotations

import os
import struct

import lz4.block
import xxhash
import zstandard

HEADER = struct.Struct("<4sBBBBQQIIQQ")
HEADER_SIZE = HEADER.size
MAGIC = b"CMFR"
VERSION = 1
FT_DATA, FT_ZERO, FT_TRIM, FT_CONTROL, FT_SCATTER = 1, 2, 3, 4, 5
MAX_SCATTER_EXTENTS = 1024
CODEC_NONE, CODEC_LZ4, CODEC_ZSTD = 0, 1, 2
FLAGS_RESERVED = 0xFE
MAX_CYCLE = 2**63 - 1


def encode_header(ftype, flags, codec, cycle, offset, length, raw_length, checksum) -> bytes:
    """Header bytes with any field values that fit their widths (valid or not)."""
    body = HEADER.pack(MAGIC, VERSION, ftype, flags, codec, cycle, offset, length,
                       raw_length, checksum, 0)[:40]
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def frame_raw_length(frame: bytes) -> int:
    """The raw_length field (u32 little-endian at byte 28) of a whole frame."""
    if len(frame) < HEADER_SIZE or frame[:4] != MAGIC:
        raise ValueError("not a whole frame")
    return HEADER.unpack_from(frame)[8]


def reseal(header: bytes) -> bytes:
    """Recompute the header checksum of a (possibly edited) header."""
    body = bytes(header[:40])
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def check_header(buf: bytes, max_payload, max_raw, max_control, volume_size, alignment=1):
    """Return the field tuple, or ("FrameError"/"ChecksumError", first bad field)."""
    if len(buf) < HEADER_SIZE:
        return ("FrameError", "header")
    (magic, version, ftype, flags, codec, cycle, offset, length, raw_length, checksum,
     header_checksum) = HEADER.unpack(buf[:HEADER_SIZE])
    extent = ftype in (FT_DATA, FT_ZERO, FT_TRIM, FT_SCATTER)
    payloadless = ftype in (FT_ZERO, FT_TRIM)

    def aligned(value):
        return value % alignment == 0

    checks = [
        ("magic", magic == MAGIC),
        ("version", version == VERSION),
        ("type", ftype in (FT_DATA, FT_ZERO, FT_TRIM, FT_CONTROL, FT_SCATTER)),
        ("flags", flags & FLAGS_RESERVED == 0),
        ("codec", codec in (CODEC_NONE, CODEC_LZ4, CODEC_ZSTD)),
        ("cycle", cycle <= MAX_CYCLE),
        ("codec", not payloadless or codec == CODEC_NONE),
        ("offset", offset == 0 if not extent else offset <= volume_size and aligned(offset)),
    ]
    if ftype == FT_SCATTER:
        # The payload is a table and scattered extents: only its size is checked here.
        checks += [
            ("raw_length", raw_length > 0),
            ("raw_length", raw_length <= max_raw),
            ("raw_length", raw_length >= 8 + 16 + 1),
        ]
    elif extent:
        checks += [
            ("raw_length", raw_length > 0),
            ("raw_length", ftype != FT_DATA or raw_length <= max_raw),
            ("raw_length", offset + raw_length <= volume_size),
            ("raw_length", aligned(raw_length) or offset + raw_length == volume_size),
        ]
    else:
        checks.append(("raw_length", raw_length <= max_control))
    if payloadless:
        checks.append(("length", length == 0))
    else:
        checks += [
            ("length", length <= max_payload),
            ("length", codec != CODEC_NONE or length == raw_length),
            ("length", codec == CODEC_NONE or 0 < length < raw_length),
        ]
    checks.append(("checksum", not payloadless or checksum == 0))
    for field, ok in checks:
        if not ok:
            return ("FrameError", field)
    if xxhash.xxh3_64_intdigest(buf[:40]) != header_checksum:
        return ("ChecksumError", "header_checksum")
    return (ftype, flags, codec, cycle, offset, length, raw_length, checksum)


def compress(codec: int, raw: bytes, level: int = 0) -> bytes:
    if codec == CODEC_LZ4:
        return lz4.block.compress(raw, mode="default", store_size=False)
    if codec == CODEC_ZSTD:
        return zstandard.ZstdCompressor(level=level or 3).compress(raw)
    return raw


def decompress(codec: int, payload: bytes, raw_length: int) -> bytes:
    if codec == CODEC_LZ4:
        return lz4.block.decompress(payload, uncompressed_size=raw_length)
    if codec == CODEC_ZSTD:
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw_length)
    return payload


def pack_extents(fd, extents, cycle, codec, chunk_size, level=0) -> list[bytes]:
    """Whole DATA frames: each extent cut into chunk_size chunks, compressed when smaller."""
    frames = []
    for offset, length in extents:
        data = os.pread(fd, length, offset)
        assert len(data) == length, "extent past end of file"
        for pos in range(0, length, chunk_size):
            raw = data[pos:pos + chunk_size]
            packed = compress(codec, raw, level)
            used = codec
            if codec == CODEC_NONE or len(packed) >= len(raw):
                packed, used = raw, CODEC_NONE
            header = encode_header(FT_DATA, 0, used, cycle, offset + pos, len(packed), len(raw),
                                   xxhash.xxh3_64_intdigest(raw))
            frames.append(header + packed)
    return frames


def scatter_payload(extents, data: bytes) -> bytes:
    """The raw SCATTER payload: count u32, reserved u32, (offset u64, length u32, 0 u32)
    per extent, then the extents' bytes in order (little-endian, docs/protocol.md)."""
    table = struct.pack("<II", len(extents), 0) + b"".join(
        struct.pack("<QII", off, ln, 0) for off, ln in extents)
    return table + data


def scatter_extents(raw: bytes, volume_size: int, alignment: int = 1):
    """The extents of a SCATTER payload, or ("FrameError", "payload") if a rule is broken."""
    bad = ("FrameError", "payload")
    if len(raw) < 8:
        return bad
    count, reserved = struct.unpack_from("<II", raw)
    if not 0 < count <= MAX_SCATTER_EXTENTS or reserved or 8 + 16 * count > len(raw):
        return bad
    out, end, total = [], 0, 0
    for i in range(count):
        off, ln, res = struct.unpack_from("<QII", raw, 8 + 16 * i)
        if ln == 0 or res or (i and off < end) or off + ln > volume_size:
            return bad
        if off % alignment or (ln % alignment and off + ln != volume_size):
            return bad
        out.append((off, ln))
        end = off + ln
        total += ln
    if total != len(raw) - 8 - 16 * count:
        return bad
    return out


def pack_scatter(fd, extents, cycle, codec, chunk_size, level=0) -> list[tuple[bytes, int]]:
    """SCATTER frames and their data bytes: extents in order, a frame closed when the next
    extent would take its data past chunk_size or it holds MAX_SCATTER_EXTENTS."""
    out, i = [], 0
    while i < len(extents):
        group = [extents[i]]
        data = extents[i][1]
        while (i + len(group) < len(extents) and len(group) < MAX_SCATTER_EXTENTS
               and data + extents[i + len(group)][1] <= chunk_size):
            data += extents[i + len(group)][1]
            group.append(extents[i + len(group)])
        raw = scatter_payload(group, b"".join(os.pread(fd, ln, off) for off, ln in group))
        packed = compress(codec, raw, level)
        used = codec
        if codec == CODEC_NONE or len(packed) >= len(raw):
            packed, used = raw, CODEC_NONE
        header = encode_header(FT_SCATTER, 0, used, cycle, group[0][0], len(packed), len(raw),
                               xxhash.xxh3_64_intdigest(raw))
        out.append((header + packed, data))
        i += len(group)
    return out
