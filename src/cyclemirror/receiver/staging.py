"""The staging log: a received delta, verified, made durable, not yet applied.

One file per delta in flight (``<mirror>.staging.<cycle>``; state files
written before pipelining name ``<mirror>.staging``), a sequence of records:

    magic "CMSR" | kind u8 | reserved u8 | member u16 | offset u64 | length u64
    | xxh3-64 of the data u64 | data (length bytes, only for kinds DATA, SCATTER)

all big-endian, 32-byte header.  Kinds: 1 DATA, 2 ZERO, 3 TRIM, 4 SCATTER (a
SCATTER frame's raw payload as it arrived: its extent table, then the data of
each extent; ``offset`` is its first extent's).  Data is stored uncompressed:
the receiver already decompressed it to verify the frame checksum, and apply
then needs no codec.  Records are appended in batches, one ``pwritev`` each.  The log is only ever appended; the
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

REC_DATA, REC_ZERO, REC_TRIM, REC_SCATTER = 1, 2, 3, 4
_WITH_DATA = (REC_DATA, REC_SCATTER)
IOV_MAX = 1024
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
        self.append_batch([(kind, member, offset, length, data, checksum)])

    def append_batch(self, records) -> None:
        """Append records (kind, member, offset, length, data, checksum) with one pwritev
        per IOV_MAX buffers: a delta of scattered blocks is thousands of records."""
        parts: list = []
        size = self.size
        pos = size
        for kind, member, offset, length, data, checksum in records:
            if kind in _WITH_DATA:
                if data is None or len(data) != length:
                    raise ValueError("a DATA or SCATTER record needs exactly `length` bytes")
                if checksum is None:
                    checksum = data_checksum(data)
                parts.append(_HEADER.pack(_MAGIC, kind, 0, member, offset, length, checksum))
                parts.append(data)
                size += HEADER_SIZE + length
            else:
                parts.append(_HEADER.pack(_MAGIC, kind, 0, member, offset, length, 0))
                size += HEADER_SIZE
            if len(parts) >= IOV_MAX - 1:
                pos += _pwritev_all(self._fd, parts, pos)
                parts = []
        if parts:
            pos += _pwritev_all(self._fd, parts, pos)
        self.size = size

    @property
    def fd(self) -> int:
        return self._fd

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pwritev_all(fd: int, parts: list, pos: int) -> int:
    """Write every buffer at ``pos`` (retrying short writes); return the bytes written."""
    total = sum(len(p) for p in parts)
    done = os.pwritev(fd, parts, pos)
    if done < total:
        # Rare on regular files (a signal, a full disk reports ENOSPC on the retry).
        rest = b"".join(bytes(p) for p in parts)[done:]
        while rest:
            n = os.pwrite(fd, rest, pos + done)
            done += n
            rest = rest[n:]
    return total


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
            if magic != _MAGIC or kind not in (REC_DATA, REC_ZERO, REC_TRIM, REC_SCATTER):
                raise IntegrityError(f"staging {path}: bad record header at byte {pos}")
            pos += HEADER_SIZE
            data = None
            if kind in _WITH_DATA:
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
