"""Parse the buffer ``BTRFS_IOC_TREE_SEARCH_V2`` fills: which inodes changed since a transid.

The kernel returns ``nr_items`` records back to back, each a 32-byte
``btrfs_ioctl_search_header`` (u64 transid of the leaf, u64 objectid, u64
offset, u32 type, u32 len, little-endian) followed by ``len`` bytes of the
item.  ``scan_items`` walks them and adds to ``changed`` the objectid (the
inode number) of

* every ``INODE_ITEM`` (type 1) whose own ``transid`` (bytes 8..16 of
  ``btrfs_inode_item``: the transaction that last wrote the inode) is at least
  ``min_transid``;
* every ``DIR_ITEM`` / ``DIR_INDEX`` (types 84, 96: the entries of directory
  ``objectid``) holding an entry (``btrfs_dir_item``: a 17-byte location key,
  u64 transid, u16 data_len, u16 name_len, u8 type, then name and data) whose
  ``transid`` is at least ``min_transid``;
* every ``XATTR_ITEM`` (type 24: extended attributes of inode ``objectid``, in
  the same ``btrfs_dir_item`` form, the value as its data) holding an
  attribute whose ``transid`` is at least ``min_transid`` (btrfs also writes
  the inode item when an attribute is set or removed; this is the second
  witness, and a removal has only the first).

It returns ``(items, last)``: how many records it read and the key
``(objectid, type, offset)`` of the last one (None when there were none),
from which the caller continues the search.  A record or an entry that runs
past the buffer, or an inode item too short to hold its transid, is a
ValueError: the caller then cannot vouch for the search and walks instead.

Pure-Python twin: tests/support/reference/btrfsitems_ref.py (the
differential test is tests/test_btrfsitems.py).  It is here because a search
over a tree with many changed leaves returns hundreds of thousands of items,
whose headers cost about a microsecond each in Python.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    HEADER = 32
    INODE_ITEM = 1
    XATTR_ITEM = 24
    DIR_ITEM = 84
    DIR_INDEX = 96
    DIR_ENTRY = 30  # sizeof(struct btrfs_dir_item), packed


cdef inline uint64_t _u64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)  # x86-64 and aarch64 are little-endian, as btrfs's disk format is
    return v


cdef inline uint32_t _u32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint16_t _u16(const uint8_t *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


cdef str _what(uint32_t typ):
    return "xattrs of inode" if typ == XATTR_ITEM else "directory"


def scan_items(const uint8_t[::1] buf, Py_ssize_t nr_items, uint64_t min_transid,
               set changed, set later=None):
    """Add to ``changed`` the inodes the first ``nr_items`` records of ``buf`` say
    changed at or after ``min_transid``, and to ``later`` (if given) those they say
    changed after it (what a scan from ``min_transid + 1`` adds to ``changed``);
    return ``(items, last_key or None)``."""
    if nr_items < 0:
        raise ValueError(f"nr_items must be >= 0, got {nr_items}")
    cdef Py_ssize_t size = buf.shape[0]
    cdef Py_ssize_t pos = 0, i, end, q
    cdef const uint8_t *b = &buf[0] if size else NULL
    cdef uint64_t objectid = 0, offset = 0
    cdef uint32_t typ = 0, length
    cdef uint16_t name_len, data_len
    cdef bint hit, hit_later
    cdef uint64_t t
    for i in range(nr_items):
        if size - pos < HEADER:
            raise ValueError(f"search buffer: record {i} header runs past the "
                             f"{size}-byte buffer at {pos}")
        objectid = _u64(b + pos + 8)
        offset = _u64(b + pos + 16)
        typ = _u32(b + pos + 24)
        length = _u32(b + pos + 28)
        pos += HEADER
        if <uint64_t>length > <uint64_t>(size - pos):
            raise ValueError(f"search buffer: record {i} ({length} bytes) runs past the "
                             f"{size}-byte buffer at {pos}")
        end = pos + length
        hit = hit_later = False
        if typ == INODE_ITEM:
            if length < 16:
                raise ValueError(f"search buffer: inode item {objectid} is {length} bytes")
            t = _u64(b + pos + 8)
            hit = t >= min_transid
            hit_later = t > min_transid
        elif typ == DIR_ITEM or typ == DIR_INDEX or typ == XATTR_ITEM:
            q = pos
            while q < end:
                if end - q < DIR_ENTRY:
                    raise ValueError(f"search buffer: {_what(typ)} {objectid}: an entry "
                                     "runs past its item")
                data_len = _u16(b + q + 25)
                name_len = _u16(b + q + 27)
                t = _u64(b + q + 17)
                if t >= min_transid:
                    hit = True
                if t > min_transid:
                    hit_later = True
                q += DIR_ENTRY + name_len + data_len
                if q > end:
                    raise ValueError(f"search buffer: {_what(typ)} {objectid}: an entry "
                                     "runs past its item")
        if hit:
            changed.add(objectid)
        if hit_later and later is not None:
            later.add(objectid)
        pos = end
    if nr_items == 0:
        return 0, None
    return nr_items, (objectid, typ, offset)
