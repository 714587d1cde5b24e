"""btrfs subvolumes and snapshots through the kernel's ioctls (no btrfs-progs process).

* ``snapshot(src, dst, readonly)``: ``BTRFS_IOC_SNAP_CREATE_V2`` on the
  destination's parent directory; the kernel makes the snapshot in a
  transaction it commits before answering, so every file of ``src`` is in it
  as of one instant, durably.
* ``create_subvolume(path)``: ``BTRFS_IOC_SUBVOL_CREATE_V2``.
* ``delete_subvolume(path)``: ``BTRFS_IOC_SNAP_DESTROY`` (a read-only
  snapshot too; the space is freed in the background).
* ``subvolume_id(fd)``: the id of the subvolume whose root ``fd`` is, else 0.
* ``subvolume_info(fd)``: ``BTRFS_IOC_GET_SUBVOL_INFO`` of the subvolume ``fd``
  is in: its uuid, its parent's (the source of a snapshot), flags (read-only),
  ``ctransid`` (the transaction that last changed it) and ``otransid`` (the
  one that made it).
* ``changed_inodes(fd, since)``: ``BTRFS_IOC_TREE_SEARCH_V2`` over the tree of
  the subvolume ``fd`` is in, for the leaves written at or after transaction
  ``since`` (the kernel skips older ones): the inodes whose inode item, or
  whose directory entries, were written then (``_cext.btrfsitems`` reads the
  items).  What ``btrfs subvolume find-new`` reads, for inodes instead of
  extents.  Needs CAP_SYS_ADMIN.
* ``extent_map(fd, ino)``: the same search, for the ``EXTENT_DATA`` items of
  one inode of the subvolume ``fd`` is in: its extent map as
  ``cowfs.extent_map`` gives it (rows of logical, physical, length, FIEMAP
  flags), without opening the file or asking FIEMAP (which also works out,
  per extent, whether it is shared).  Needs CAP_SYS_ADMIN.

A failure is a StoreError naming what was being done, the path and the
kernel's reason (EPERM: these need root, or for deletion the
``user_subvol_rm_allowed`` mount option).
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from typing import NamedTuple

from cyclemirror.errors import StoreError

BTRFS_SUBVOL_INO = 256  # the root directory of every btrfs subvolume has this inode
BTRFS_SUBVOL_RDONLY = 1 << 1  # in the ioctls' flags
BTRFS_ROOT_SUBVOL_RDONLY = 1 << 0  # in a root item's flags (GET_SUBVOL_INFO)
_VOL_ARGS_SIZE = 4096
_NAME_OFFSET_V2 = 56  # fd, transid, flags, then a 32-byte union, then the name
_NAME_MAX = 4039
# _IOW(0x94, nr, 4096-byte args): 0x40000000 | 4096 << 16 | 0x94 << 8 | nr
BTRFS_IOC_SNAP_DESTROY = 0x5000940F
BTRFS_IOC_SNAP_CREATE_V2 = 0x50009417
BTRFS_IOC_SUBVOL_CREATE_V2 = 0x50009418
BTRFS_IOC_INO_LOOKUP = 0xD0009412  # _IOWR(0x94, 18, 4096)
BTRFS_IOC_TREE_SEARCH_V2 = 0xC0709411  # _IOWR(0x94, 17, 112-byte search_args_v2)
BTRFS_IOC_GET_SUBVOL_INFO = 0x81F8943C  # _IOR(0x94, 60, 504-byte get_subvol_info_args)
_SUBVOL_INFO_SIZE = 504
# btrfs_ioctl_search_key: tree_id, min/max objectid, min/max offset, min/max transid,
# min/max type, nr_items, unused, 4 unused u64; then (v2) buf_size, then the buffer.
_SEARCH_KEY = struct.Struct("<7Q4I4Q")
_SEARCH_BUF = 1 << 20
_U64_MAX = (1 << 64) - 1


def _parent_fd(path: str) -> tuple[int, str]:
    parent, name = os.path.split(os.path.normpath(path))
    raw = os.fsencode(name)
    if not raw or len(raw) > _NAME_MAX or name in (".", ".."):
        raise StoreError(f"btrfs: {path!r} does not end in a usable name")
    return os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), name


def _args_v2(name: str, fd: int = 0, flags: int = 0) -> bytearray:
    args = bytearray(_VOL_ARGS_SIZE)
    args[0:8] = fd.to_bytes(8, "little", signed=True)
    args[16:24] = flags.to_bytes(8, "little")
    raw = os.fsencode(name)
    args[_NAME_OFFSET_V2:_NAME_OFFSET_V2 + len(raw)] = raw
    return args


def _fail(what: str, path: str, exc: OSError) -> StoreError:
    hint = ""
    if exc.errno == 1:  # EPERM
        hint = " (needs root, or user_subvol_rm_allowed to delete)"
    elif exc.errno in (25, 95):  # ENOTTY, EOPNOTSUPP
        hint = " (not a btrfs file system?)"
    return StoreError(f"btrfs: {what} {path} failed: {exc.strerror}{hint}")


def snapshot(src: str, dst: str, readonly: bool) -> None:
    """Snapshot the subvolume ``src`` as the new ``dst`` (read-only or writable)."""
    sfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        pfd, name = _parent_fd(dst)
        try:
            fcntl.ioctl(pfd, BTRFS_IOC_SNAP_CREATE_V2,
                        _args_v2(name, sfd, BTRFS_SUBVOL_RDONLY if readonly else 0))
        except OSError as exc:
            raise _fail(f"snapshot of {src} as", dst, exc) from None
        finally:
            os.close(pfd)
    finally:
        os.close(sfd)


def create_subvolume(path: str) -> None:
    pfd, name = _parent_fd(path)
    try:
        fcntl.ioctl(pfd, BTRFS_IOC_SUBVOL_CREATE_V2, _args_v2(name))
    except OSError as exc:
        raise _fail("creating subvolume", path, exc) from None
    finally:
        os.close(pfd)


def delete_subvolume(path: str) -> None:
    """Delete the subvolume (or snapshot) ``path``; refuse anything that is not one."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_ino != BTRFS_SUBVOL_INO:
        raise StoreError(f"btrfs: {path} is not a subvolume; not deleting it")
    pfd, name = _parent_fd(path)
    args = bytearray(_VOL_ARGS_SIZE)
    raw = os.fsencode(name)
    args[8:8 + len(raw)] = raw
    try:
        fcntl.ioctl(pfd, BTRFS_IOC_SNAP_DESTROY, args)
    except OSError as exc:
        raise _fail("deleting subvolume", path, exc) from None
    finally:
        os.close(pfd)


def subvolume_id(fd: int) -> int:
    """The btrfs subvolume id of directory ``fd`` if it is a subvolume's root, else 0."""
    if os.fstat(fd).st_ino != BTRFS_SUBVOL_INO:
        return 0
    args = bytearray(_VOL_ARGS_SIZE)
    args[8:16] = BTRFS_SUBVOL_INO.to_bytes(8, "little")
    try:
        fcntl.ioctl(fd, BTRFS_IOC_INO_LOOKUP, args)
    except OSError:
        return 0  # not btrfs (an inode 256 elsewhere is a plain directory)
    return int.from_bytes(args[0:8], "little")


class SubvolumeInfo(NamedTuple):
    treeid: int
    uuid: bytes
    parent_uuid: bytes  # the subvolume a snapshot was taken of (zeros for none)
    readonly: bool
    ctransid: int  # the transaction that last changed it
    otransid: int  # the transaction that created it (a snapshot: its instant)


def subvolume_info(fd: int) -> SubvolumeInfo:
    """What btrfs says of the subvolume directory ``fd`` is in (OSError if not btrfs)."""
    args = bytearray(_SUBVOL_INFO_SIZE)
    fcntl.ioctl(fd, BTRFS_IOC_GET_SUBVOL_INFO, args)
    treeid = int.from_bytes(args[0:8], "little")
    flags = int.from_bytes(args[288:296], "little")
    return SubvolumeInfo(treeid, bytes(args[296:312]), bytes(args[312:328]),
                         bool(flags & BTRFS_ROOT_SUBVOL_RDONLY),
                         int.from_bytes(args[344:352], "little"),
                         int.from_bytes(args[352:360], "little"))


def changed_inodes(fd: int, since: int, later: set[int] | None = None) -> set[int]:
    """The inode numbers of the subvolume ``fd`` is in whose inode item or directory
    entries were written in transaction ``since`` or later (a superset of the inodes
    whose lstat or entries differ from a snapshot made by transaction ``since``);
    ``later``, if given, gets those written after ``since`` (what a search from
    ``since + 1`` answers: an item is never newer than its leaf, so the leaves that
    search skips hold none of them), from the same search.
    OSError from the kernel (EPERM without CAP_SYS_ADMIN); ValueError for a buffer
    the parser cannot vouch for."""
    from cyclemirror._cext import btrfsitems

    args = bytearray(_SEARCH_KEY.size + 8 + _SEARCH_BUF)
    view = memoryview(args)
    body = view[_SEARCH_KEY.size + 8:]
    changed: set[int] = set()
    key = (0, 0, 0)  # (objectid, type, offset) to start from
    while True:
        objectid, typ, offset = key
        # tree_id 0: the subvolume of fd.  The kernel compares whole keys: from
        # (objectid, typ, offset) to the end, every item type.
        _SEARCH_KEY.pack_into(args, 0, 0, objectid, _U64_MAX, offset, _U64_MAX, since,
                              _U64_MAX, typ, 255, 0xFFFFFFFF, 0, 0, 0, 0, 0)
        args[_SEARCH_KEY.size:_SEARCH_KEY.size + 8] = _SEARCH_BUF.to_bytes(8, "little")
        fcntl.ioctl(fd, BTRFS_IOC_TREE_SEARCH_V2, args)
        nr = int.from_bytes(args[64:68], "little")  # nr_items: how many came back
        if nr == 0:
            return changed
        _, last = btrfsitems.scan_items(body, nr, since, changed, later)
        objectid, typ, offset = last
        if offset < _U64_MAX:
            key = (objectid, typ, offset + 1)
        elif typ < 255:
            key = (objectid, typ + 1, 0)
        elif objectid < _U64_MAX:
            key = (objectid + 1, 0, 0)
        else:
            return changed


EXTENT_DATA_KEY = 108
# btrfs_file_extent_item (packed): generation, ram_bytes, compression, encryption,
# other_encoding, type; then (not inline) disk_bytenr, disk_num_bytes, offset, num_bytes.
_FILE_EXTENT = struct.Struct("<QQBBHB")
_FILE_EXTENT_REG = struct.Struct("<QQQQ")
_SEARCH_HEADER = struct.Struct("<QQQII")  # transid, objectid, offset, type, len
_EXTENT_INLINE, _EXTENT_REG, _EXTENT_PREALLOC = 0, 1, 2
# FIEMAP's flags, as cowfs reads them
_FIEMAP_UNKNOWN, _FIEMAP_ENCODED, _FIEMAP_NOT_ALIGNED = 0x2, 0x8, 0x100
_FIEMAP_INLINE, _FIEMAP_UNWRITTEN = 0x200, 0x800
_SECTOR = 4096
_MAP_BUF = 64 << 10


def extent_map(fd: int, ino: int) -> list[tuple[int, int, int, int]]:
    """The extent map of inode ``ino`` of the subvolume ``fd`` is in (a read-only
    snapshot: nothing in flight), from its ``EXTENT_DATA`` items: rows (logical,
    physical, length, flags) ascending, as ``cowfs.extent_map`` reads them with FIEMAP.
    A plain extent is at ``disk_bytenr + offset``; a compressed one is ENCODED at its
    ``disk_bytenr``; a preallocated one UNWRITTEN; inline data DATA_INLINE (which
    ``cowfs`` never takes as equal to anything); an encrypted or otherwise encoded one
    UNKNOWN (the same); a hole (``disk_bytenr`` 0, or no item) is not in the map.
    OSError from the kernel; ValueError for an item that does not parse."""
    if not 0 < ino < _U64_MAX:
        raise ValueError(f"inode number {ino} is out of range")
    args = bytearray(_SEARCH_KEY.size + 8 + _MAP_BUF)
    rows: list[tuple[int, int, int, int]] = []
    start = 0
    while True:
        _SEARCH_KEY.pack_into(args, 0, 0, ino, ino, start, _U64_MAX, 0, _U64_MAX,
                              EXTENT_DATA_KEY, EXTENT_DATA_KEY, 0xFFFFFFFF, 0, 0, 0, 0, 0)
        args[_SEARCH_KEY.size:_SEARCH_KEY.size + 8] = _MAP_BUF.to_bytes(8, "little")
        fcntl.ioctl(fd, BTRFS_IOC_TREE_SEARCH_V2, args)
        nr = int.from_bytes(args[64:68], "little")
        if nr == 0:
            return rows
        pos, end, last = _SEARCH_KEY.size + 8, len(args), start
        for i in range(nr):
            if end - pos < _SEARCH_HEADER.size:
                raise ValueError(f"extent items of inode {ino}: record {i} runs past the "
                                 "buffer")
            _, objectid, offset, typ, length = _SEARCH_HEADER.unpack_from(args, pos)
            pos += _SEARCH_HEADER.size
            if length > end - pos:
                raise ValueError(f"extent items of inode {ino}: record {i} runs past the "
                                 "buffer")
            if objectid != ino or typ != EXTENT_DATA_KEY or offset < last:
                raise ValueError(f"extent items of inode {ino}: the search answered item "
                                 f"({objectid}, {typ}, {offset}) out of order")
            row = _extent_row(args, pos, length, offset, ino)
            if row is not None:
                rows.append(row)
            pos += length
            last = offset
        if last >= _U64_MAX:
            return rows
        start = last + 1


def _extent_row(buf, pos: int, length: int, offset: int, ino: int):
    if length < _FILE_EXTENT.size:
        raise ValueError(f"extent item ({ino}, {offset}) is {length} bytes")
    _, ram_bytes, compression, encryption, other, kind = _FILE_EXTENT.unpack_from(buf, pos)
    if kind == _EXTENT_INLINE:
        end = -(-(offset + ram_bytes) // _SECTOR) * _SECTOR
        return offset, 0, end - offset, _FIEMAP_INLINE | _FIEMAP_NOT_ALIGNED
    if kind not in (_EXTENT_REG, _EXTENT_PREALLOC) or \
            length < _FILE_EXTENT.size + _FILE_EXTENT_REG.size:
        raise ValueError(f"extent item ({ino}, {offset}) of type {kind}, {length} bytes")
    bytenr, _, extent_offset, num_bytes = _FILE_EXTENT_REG.unpack_from(
        buf, pos + _FILE_EXTENT.size)
    if bytenr == 0 or num_bytes == 0:
        return None  # a hole
    if offset + num_bytes >= 1 << 62 or bytenr + extent_offset >= 1 << 62:
        raise ValueError(f"extent item ({ino}, {offset}) is past 2**62")
    if encryption or other:
        return offset, 0, num_bytes, _FIEMAP_UNKNOWN
    if compression:
        return offset, bytenr, num_bytes, _FIEMAP_ENCODED
    return (offset, bytenr + extent_offset, num_bytes,
            _FIEMAP_UNWRITTEN if kind == _EXTENT_PREALLOC else 0)
