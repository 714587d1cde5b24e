"""The staging log: a received delta, verified, made durable, not yet applied.

One file per mirror (``<mirror>.staging``), a sequence of records:

    magic "CMSR" | kind u8 | reserved u8 | member u16 | offset u64 | length u64
    | xxh3-64 of the data u64 | data (length bytes, only for kind DATA)

all big-endian, 32-byte header.  Kinds: 1 DATA, 2 ZERO, 3 TRIM.  Data is
stored uncompressed: the receiver already decompressed it to verify the frame
checksum, and apply then needs no codec.  The log is only ever appended; the
state file records how many bytes of it are acknowledged, and a restart
truncates any unacknowledged tail.  Replaying records is idempotent (each is
"these bytes at this offset"), which makes apply a redo journal.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import xxhash

from cyclemirror.errors import IntegrityError

REC_DATA, REC_ZERO, REC_TRIM = 1, 2, 3
_MAGIC = b"CMSR"
_HEADER = struct.Struct(">4sBBHQQQ")
HEADER_SIZE = _HEADER.size
READ_BUFFER = 4 << 20


def data_checksum(data: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data)


class StagingWriter:
    """Appends records; ``sync()`` makes everything appended so far durable.

    Not thread-safe: one receiving session owns it.
    """

    def __init__(self, path: str, start_bytes: int):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        # Drop any tail that was written but never acknowledged.
        os.ftruncate(self._fd, start_bytes)
        self.size = start_bytes

    def append(self, kind: int, member: int, offset: int, length: int,
               data: bytes | None = None, checksum: int | None = None) -> None:
        """Append one record; ``checksum``, if given, must be the xxh3-64 of ``data``.

        The session passes the frame checksum it has just verified against
        these very bytes (the same hash), which saves hashing every byte twice.
        """
        if kind != REC_DATA:
            checksum = 0
        elif checksum is None:
            checksum = data_checksum(data)
        header = _HEADER.pack(_MAGIC, kind, 0, member, offset, length, checksum)
        if kind == REC_DATA:
            if data is None or len(data) != length:
                raise ValueError("a DATA record needs exactly `length` bytes")
            os.pwritev(self._fd, [header, data], self.size)
        else:
            os.pwrite(self._fd, header, self.size)
        self.size += HEADER_SIZE + (length if kind == REC_DATA else 0)

    @property
    def fd(self) -> int:
        return self._fd

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_records(path: str, total: int, max_length: int) -> Iterator[tuple]:
    """Yield (kind, member, offset, length, data) up to ``total`` bytes, re-verifying.

    ``max_length`` caps one record's data (the chunk cap) so a damaged length
    cannot make us allocate gigabytes.
    """
    # Read sequentially through a big buffer: a delta of scattered blocks is
    # thousands of small records (10,000 of 4 KiB: 22 ms with two preads each, 16 ms so).
    with open(path, "rb", buffering=READ_BUFFER) as f:
        pos = 0
        while pos < total:
            raw = f.read(HEADER_SIZE)
            if len(raw) != HEADER_SIZE:
                raise IntegrityError(f"staging {path}: truncated record header at byte {pos}")
            magic, kind, _r, member, offset, length, checksum = _HEADER.unpack(raw)
            if magic != _MAGIC or kind not in (REC_DATA, REC_ZERO, REC_TRIM):
                raise IntegrityError(f"staging {path}: bad record header at byte {pos}")
            pos += HEADER_SIZE
            data = None
            if kind == REC_DATA:
                if length > max_length or pos + length > total:
                    raise IntegrityError(f"staging {path}: record length {length} at byte "
                                         f"{pos - HEADER_SIZE} exceeds the cap or the log")
                data = f.read(length)
                if len(data) != length or data_checksum(data) != checksum:
                    raise IntegrityError(
                        f"staging {path}: data at byte {pos} fails its checksum (disk "
                        "corruption); the mirror must be re-seeded"
                    )
                pos += length
            yield kind, member, offset, length, data
