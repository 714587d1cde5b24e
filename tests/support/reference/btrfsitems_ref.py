"""Plain-Python twin of ``cyclemirror._cext.btrfsitems.scan_items``, for obviousness.

Same records, same rules, same errors (ValueError), one ``struct`` unpack at a time.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("<QQQII")  # transid, objectid, offset, type, len
INODE_ITEM, XATTR_ITEM, DIR_ITEM, DIR_INDEX = 1, 24, 84, 96
DIR_ENTRY = struct.Struct("<17sQHHB")  # location key, transid, data_len, name_len, type


def scan_items(buf, nr_items: int, min_transid: int, changed: set, later: set | None = None):
    if nr_items < 0:
        raise ValueError(f"nr_items must be >= 0, got {nr_items}")
    buf = bytes(buf)
    pos = 0
    last = None
    for i in range(nr_items):
        if len(buf) - pos < HEADER.size:
            raise ValueError(f"search buffer: record {i} header runs past the buffer")
        _, objectid, offset, typ, length = HEADER.unpack_from(buf, pos)
        pos += HEADER.size
        if length > len(buf) - pos:
            raise ValueError(f"search buffer: record {i} runs past the buffer")
        item = buf[pos:pos + length]
        pos += length
        last = (objectid, typ, offset)
        if typ == INODE_ITEM:
            if length < 16:
                raise ValueError(f"search buffer: inode item {objectid} is {length} bytes")
            t = int.from_bytes(item[8:16], "little")
            if t >= min_transid:
                changed.add(objectid)
            if t > min_transid and later is not None:
                later.add(objectid)
        elif typ in (DIR_ITEM, DIR_INDEX, XATTR_ITEM):
            what = "xattrs of inode" if typ == XATTR_ITEM else "directory"
            q, hit, hit_later = 0, False, False
            while q < len(item):
                if len(item) - q < DIR_ENTRY.size:
                    raise ValueError(f"search buffer: {what} {objectid}: an entry runs "
                                     "past its item")
                _, transid, data_len, name_len, _ = DIR_ENTRY.unpack_from(item, q)
                hit = hit or transid >= min_transid
                hit_later = hit_later or transid > min_transid
                q += DIR_ENTRY.size + name_len + data_len
                if q > len(item):
                    raise ValueError(f"search buffer: {what} {objectid}: an entry runs "
                                     "past its item")
            if hit:
                changed.add(objectid)
            if hit_later and later is not None:
                later.add(objectid)
    return (nr_items, last) if nr_items else (0, None)
