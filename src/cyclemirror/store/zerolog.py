"""The zero log of an overlay: which whole blocks were zeroed or trimmed, written ahead.

A zeroed block leaves a hole in the overlay file, and a hole cannot be told
apart from "never touched" by the allocation map. So before the hole is
punched, one 24-byte record ``<start_block u64, count u64, xxh64 u64>`` is
appended here (the checksum covers the first 16 bytes). The file starts with
an 8-byte magic. Only the tail can be torn (appends), so a short or bad last
record is dropped: it belongs to an operation that was never acknowledged
(flush fsyncs this file before it returns). A bad record anywhere else is
damage and raises IntegrityError.
"""

from __future__ import annotations

import os
import struct

import xxhash

from cyclemirror.errors import IntegrityError

MAGIC = b"CMZLOG1\n"
_REC = struct.Struct("<QQQ")
RECORD_SIZE = _REC.size


def encode_record(start: int, count: int) -> bytes:
    head = struct.pack("<QQ", start, count)
    return head + struct.pack("<Q", xxhash.xxh64_intdigest(head))


class ZeroLog:
    """Append-only record of zeroed block ranges for one overlay. Callers serialise appends."""

    def __init__(self, path: str, fd: int):
        self.path = path
        self.fd = fd
        self.dirty = False  # appended since the last sync

    @classmethod
    def create(cls, path: str) -> ZeroLog:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        os.write(fd, MAGIC)
        os.fsync(fd)
        return cls(path, fd)

    @classmethod
    def open(cls, path: str) -> ZeroLog:
        return cls(path, os.open(path, os.O_RDWR | os.O_APPEND))

    def append(self, start: int, count: int) -> None:
        os.write(self.fd, encode_record(start, count))
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            self.dirty = False
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def read_ranges(self, nblocks: int) -> list[tuple[int, int]]:
        """All intact records, in order; drops a torn tail, raises on damage elsewhere."""
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0)
        if data[: len(MAGIC)] != MAGIC:
            if len(data) < len(MAGIC) and MAGIC.startswith(data):
                return []  # torn at creation: nothing was ever zeroed
            raise IntegrityError(f"zero log {self.path} has no valid header; the overlay is damaged")
        body = data[len(MAGIC) :]
        nrec = len(body) // RECORD_SIZE
        ranges = []
        for i in range(nrec):
            start, count, check = _REC.unpack_from(body, i * RECORD_SIZE)
            good = check == xxhash.xxh64_intdigest(body[i * RECORD_SIZE : i * RECORD_SIZE + 16])
            if not good:
                if i == nrec - 1 and len(body) % RECORD_SIZE == 0:
                    break  # torn last record of an unacknowledged zeroing
                raise IntegrityError(
                    f"zero log {self.path}: record {i} fails its checksum; the overlay is damaged"
                )
            if count == 0 or start + count > nblocks:
                raise IntegrityError(
                    f"zero log {self.path}: record {i} covers blocks {start}+{count}, "
                    f"outside the volume's {nblocks} blocks"
                )
            ranges.append((start, count))
        return ranges
