"""The target's side of a tree object: a plain directory tree, switched whole per cycle.

Layout, in a directory ``ROOT`` of the target's choosing::

    ROOT/NAME/                       the mirror: a plain tree any tool reads
    ROOT/.cyclemirror-tree-NAME/     ours: state.json, stage-K/ (the next version),
                                 next-A/ (a stage made ahead, ``prepare_next``)

A cycle is applied without ever touching ``ROOT/NAME``:

1. ``stage-K`` is made: empty for a full cycle, else a copy of the current
   tree.  On btrfs (as root) it is a subvolume, and the copy a writable
   snapshot of ``ROOT/NAME`` (constant time, but a transaction commit): made
   ahead by ``prepare_next`` after the previous switch where the caller asks
   (the daemon does, once ``applied`` is sent), and only renamed here;
   elsewhere a walk copies it (each file a reflink clone where the file
   system has them, else a copy; hard links, symlinks, FIFOs, devices,
   modes, owners, mtimes and extended attributes kept).
2. The ops of the delta (``wire.treeframes``) are applied inside it, which
   nobody else sees: an entry is replaced by removing the old one and making
   the new one in place (for a ``patch``, a clone of the previous version's
   ``ref``, then the ranges written; a ``patch`` of a path from itself whose
   stage file has no other name is written where it is, as that file is a
   copy of ``ref``); directory metadata is set last, deepest
   first, and directories whose own metadata did not change get their mtime
   back.  A file's small runs (up to ``FILE_HELD`` bytes in all) are written,
   with its metadata after them, by a pool of threads (``FileWriters``) while
   the next ops are read: a small write into a fresh snapshot mostly waits on
   btrfs, so many files are written at once; each then starts its own
   writeback (``sync_file_range``), which the ``syncfs`` below would
   otherwise start for all of them at once.  Everything else waits for the
   pool first.
3. Everything is made durable (``syncfs``), the record ``pending`` =
   {cycle, identity of ``stage-K``: inode and subvolume id} is written, and
   ``renameat2(RENAME_EXCHANGE)`` swaps ``stage-K`` and ``ROOT/NAME`` in one
   step (the first cycle: a rename with ``RENAME_NOREPLACE``).  Then the
   record says the cycle is applied and the previous version (now at
   ``stage-K``) is deleted.

After a crash at any moment, ``recover`` (run by every open) looks at
``pending``: if ``ROOT/NAME`` is the directory whose identity it names, the
exchange happened and cycle K is the one applied; otherwise it did not and
the previous cycle is.  Either way every stage in our directory is deleted.
So ``ROOT/NAME`` is always exactly one freeze instant.

Paths come from the wire (checked by ``messages.check_relpath``: no ``..``,
no absolute path) and are opened one component at a time from a directory
descriptor with ``O_NOFOLLOW | O_DIRECTORY``, and leaves are touched with
``*at`` calls that do not follow symlinks: a symlink in the tree, whatever
it points at, is never followed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat

from cyclemirror import failpoints
from cyclemirror.errors import ProtocolError, StoreError, UsageError
from cyclemirror.fileio import fsync_dir
from cyclemirror.receiver.fileops import punch_zeroes, pwrite_all
from cyclemirror.store import btrfsioctl, cowfs
from cyclemirror.store.btrfsioctl import BTRFS_SUBVOL_INO, subvolume_id
from cyclemirror.store.fileops import KernelCopier, atomic_write_json, data_runs, read_json
from cyclemirror.store.names import validate_volume_name
from cyclemirror.xattrs import apply as xattr_set
from cyclemirror.xattrs import read as xattr_get

STATE_FILE = "state.json"
STATE_FORMAT = 1
STAGE_PREFIX = "stage-"
NEXT_PREFIX = "next-"  # next-A: a stage made ahead, a writable snapshot of cycle A applied
FICLONE = 0x40049409
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
SYNC_FILE_RANGE_WRITE = 2
AT_FDCWD = -100
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
WRITER_THREADS = 8  # files of a cycle written at once (FileWriters)
FILE_HELD = 1 << 20  # a file's runs up to this many bytes are written by the pool
RUN_COST = 64  # what a held run counts on top of its bytes (a zero run has none)
QUEUED_BYTES = 32 << 20  # held runs of files waiting for the pool, at most
QUEUED_FILES = 64  # files waiting for the pool (each holds a descriptor), at most
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def renameat2(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str, flags: int) -> None:
    if _libc.renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), flags):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), f"{src} -> {dst}")


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "syncfs")


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages out now (``sync_file_range`` WRITE: it does
    not wait, and promises nothing), so the cycle's ``syncfs`` finds most of them on
    their way instead of starting them all.  A hint only: a failure is ignored."""
    _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), SYNC_FILE_RANGE_WRITE)


def dir_identity(fd: int) -> list[int]:
    """What tells one directory from another across a crash: its inode and, for a btrfs
    subvolume (whose root is always inode 256), the subvolume id."""
    return [os.fstat(fd).st_ino, subvolume_id(fd)]


def _open_dir(root_fd: int, rel: str) -> int:
    """A descriptor of directory ``rel`` under ``root_fd``, no symlink followed."""
    fd = os.dup(root_fd)
    if rel == ".":
        return fd
    try:
        for comp in rel.split("/"):
            nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _split(rel: str) -> tuple[str, str]:
    parent, _, leaf = rel.rpartition("/")
    return parent or ".", leaf


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _rm_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` (a directory with everything in it), no symlink
    followed."""
    st = _lstat_at(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        for entry in os.listdir(fd):
            _rm_at(fd, entry)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _clone_or_copy(src_fd: int, dst_fd: int) -> None:
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV):
            raise
    size = os.fstat(src_fd).st_size
    os.ftruncate(dst_fd, size)
    copier = KernelCopier(try_reflink=False)
    for begin, end in data_runs(src_fd, 0, size):
        try:
            copier.copy(src_fd, dst_fd, begin, end - begin)
        except OSError as exc:  # copy_file_range across file systems (a clone elsewhere)
            if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            pos = begin
            while pos < end:
                chunk = os.pread(src_fd, min(end - pos, 1 << 20), pos)
                if not chunk:
                    raise StoreError(f"copying a file stopped at offset {pos} of {end}: the "
                                     "source file is short") from None
                pwrite_all(dst_fd, chunk, pos)
                pos += len(chunk)


def _at_path(dir_fd: int, name: str) -> str:
    """A path to entry ``name`` of the open directory ``dir_fd`` for the calls that have
    no ``*at`` form (the xattr ones): the directory is the one opened, never looked up
    again, and the caller does not follow a symlink at ``name``."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def _set_meta(fd_or_name, mode: int | None, uid: int, gid: int, mtime_ns: int,
              dir_fd: int | None = None, xattrs=None, what: str = "") -> None:
    """Owner, then mode (chown clears set-id bits), then the extended attributes
    (exactly ``xattrs``, if given: chown clears a file capability), then mtime (atime
    = mtime); what is already so is not set again (each is a transaction's inode
    update).  With ``dir_fd``, ``fd_or_name`` is an entry of that directory that is not
    opened: a symlink (no mode on Linux: ``mode`` None), a FIFO or a device node."""
    if dir_fd is None:
        st = os.fstat(fd_or_name)
        chowned = (st.st_uid, st.st_gid) != (uid, gid)
        if chowned:
            os.fchown(fd_or_name, uid, gid)
        if mode is not None and (chowned or stat.S_IMODE(st.st_mode) != mode):
            os.fchmod(fd_or_name, mode)
        if xattrs is not None:
            xattr_set(fd_or_name, xattrs, what)
        os.utime(fd_or_name, ns=(mtime_ns, mtime_ns))
    else:
        st = os.stat(fd_or_name, dir_fd=dir_fd, follow_symlinks=False)
        chowned = (st.st_uid, st.st_gid) != (uid, gid)
        if chowned:
            os.chown(fd_or_name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        if mode is not None and not stat.S_ISLNK(st.st_mode) and (
                chowned or stat.S_IMODE(st.st_mode) != mode):
            os.chmod(fd_or_name, mode, dir_fd=dir_fd)  # not a symlink (just lstat'ed)
        if xattrs is not None:
            xattr_set(_at_path(dir_fd, fd_or_name), xattrs, what)
        os.utime(fd_or_name, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def _times(st: os.stat_result) -> tuple[int, int]:
    return st.st_atime_ns, st.st_mtime_ns


def copy_tree(src_fd: int, dst_fd: int) -> None:
    """Copy the tree open as ``src_fd`` into the empty directory ``dst_fd``: clones of the
    files (hard links kept as links), symlinks, directories, FIFOs, device nodes (as
    root), owners, modes, mtimes, mirrored extended attributes (ACLs among them).
    Anything else (a socket someone made here) is not copied."""
    links: dict[tuple[int, int], str] = {}  # inode -> its first name copied (relative)
    dirs: list[tuple[str, os.stat_result, tuple]] = []

    def walk(sfd: int, dfd: int, rel: str) -> None:
        for name in os.listdir(sfd):
            st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
            m = st.st_mode
            child = f"{rel}/{name}" if rel != "." else name
            if stat.S_ISDIR(m):
                os.mkdir(name, 0o700, dir_fd=dfd)
                cs = os.open(name, _DIR_FLAGS, dir_fd=sfd)
                try:
                    cd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                    try:
                        walk(cs, cd, child)
                    finally:
                        os.close(cd)
                    xa = xattr_get(cs, f"tree copy: {child}")
                finally:
                    os.close(cs)
                dirs.append((child, st, xa))
            elif stat.S_ISREG(m):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in links:
                    first_dir, first_name = _split(links[key])
                    ffd = _open_dir(dst_fd, first_dir)
                    try:
                        os.link(first_name, name, src_dir_fd=ffd, dst_dir_fd=dfd,
                                follow_symlinks=False)
                    finally:
                        os.close(ffd)
                    continue
                s = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
                try:
                    d = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                | os.O_CLOEXEC, 0o600, dir_fd=dfd)
                    try:
                        _clone_or_copy(s, d)
                        _set_meta(d, stat.S_IMODE(m), st.st_uid, st.st_gid, st.st_mtime_ns,
                                  xattrs=xattr_get(s, f"tree copy: {child}"),
                                  what=f"tree copy: {child}")
                    finally:
                        os.close(d)
                finally:
                    os.close(s)
                if st.st_nlink > 1:
                    links[key] = child
            elif stat.S_ISLNK(m) or stat.S_ISFIFO(m) or stat.S_ISCHR(m) or stat.S_ISBLK(m):
                if stat.S_ISLNK(m):
                    os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
                else:
                    make_node(dfd, name, m, st.st_rdev, f"tree copy: {child}")
                _set_meta(name, None if stat.S_ISLNK(m) else stat.S_IMODE(m), st.st_uid,
                          st.st_gid, st.st_mtime_ns, dir_fd=dfd,
                          xattrs=xattr_get(_at_path(sfd, name), f"tree copy: {child}"),
                          what=f"tree copy: {child}")

    walk(src_fd, dst_fd, ".")
    for rel, st, xa in dirs:  # children before parents (post-order): their times stay put
        fd = _open_dir(dst_fd, rel)
        try:
            _set_meta(fd, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                      xattrs=xa, what=f"tree copy: {rel}")
        finally:
            os.close(fd)
    st = os.fstat(src_fd)
    _set_meta(dst_fd, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
              xattrs=xattr_get(src_fd, "tree copy: ."), what="tree copy: .")


def make_node(dir_fd: int, name: str, mode: int, rdev: int, what: str) -> None:
    """Make FIFO or device node ``name`` in ``dir_fd`` (``mode``'s file type says which;
    permission bits 0600 until its metadata is set).  A device node only as root: it
    needs CAP_MKNOD, and a mirror made by anyone else could not hold one; refused
    then with a StoreError saying so."""
    if stat.S_ISFIFO(mode):
        os.mkfifo(name, 0o600, dir_fd=dir_fd)
        return
    if os.geteuid() != 0:
        raise StoreError(f"{what}: a device node ({os.major(rdev)}, {os.minor(rdev)}) is "
                         "made only when the target daemon runs as root (mknod needs "
                         "CAP_MKNOD); run the target as root, or remove device nodes from "
                         "the source tree")
    os.mknod(name, stat.S_IFMT(mode) | 0o600, rdev, dir_fd=dir_fd)


class _Apply:
    """One cycle's ops applied inside ``stage_fd``, reading refs from ``base_fd``.

    The stage is private until the switch, so an entry is replaced by removing the
    old one and making the new one where it belongs (no temp names, no renames): a
    crash in between leaves a stage that recovery deletes anyway."""

    def __init__(self, mirror: TreeMirror, stage_fd: int, base_fd: int | None, cycle: int):
        self.m = mirror
        self.stage = stage_fd
        self.base = base_fd
        self.cycle = cycle
        self.touched: dict[str, tuple[int, int]] = {}  # dir -> its (atime, mtime) before
        self.dir_meta: dict[str, dict] = {}
        self.open_file: tuple[int, dict] | None = None  # (fd, op)
        # The open file's data and zero runs, held to be written by the pool with its
        # metadata (None once it is past FILE_HELD: then written here as they come).
        self.held: list[tuple] | None = []
        self.held_bytes = 0
        self.files = FileWriters()

    def where(self, msg: dict) -> str:
        return f"tree mirror {self.m.name!r}, cycle {self.cycle}, {msg['op']} {msg['path']!r}"

    def _parent(self, path: str, msg: dict) -> tuple[int, str]:
        parent, leaf = _split(path)
        try:
            fd = _open_dir(self.stage, parent)
        except OSError as exc:
            raise ProtocolError(f"{self.where(msg)}: its directory {parent!r} is not a "
                                f"directory of the tree ({exc.strerror}); a symlink is never "
                                "followed") from None
        if parent not in self.touched:
            self.touched[parent] = _times(os.fstat(fd))
        return fd, leaf

    def _clear(self, pfd: int, leaf: str, msg: dict) -> None:
        """Make room for a new entry ``leaf``: remove a file or symlink there; a directory
        there is an error (the delta removes it first)."""
        st = _lstat_at(pfd, leaf)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            raise ProtocolError(f"{self.where(msg)}: a directory is in the way (the delta "
                                "should have removed it)")
        os.unlink(leaf, dir_fd=pfd)

    def op(self, msg: dict) -> None:
        self.finish_file()
        kind, path = msg["op"], msg["path"]
        if kind not in ("file", "patch"):  # links, metadata: after the files are written
            self.files.wait()
        if kind == "dir":
            if path != ".":
                pfd, leaf = self._parent(path, msg)
                try:
                    st = _lstat_at(pfd, leaf)
                    if st is None:
                        os.mkdir(leaf, 0o700, dir_fd=pfd)
                    elif not stat.S_ISDIR(st.st_mode):
                        raise ProtocolError(f"{self.where(msg)}: something else than a "
                                            "directory is in the way")
                finally:
                    os.close(pfd)
            self.dir_meta[path] = msg
            failpoints.hit("receiver.tree_op")
            return
        if kind == "link":
            self._link(msg)
            failpoints.hit("receiver.tree_op")
            return
        pfd, leaf = self._parent(path, msg)
        try:
            if kind == "rm":
                _rm_at(pfd, leaf)
            elif kind in ("file", "patch"):
                fd = self._in_place(pfd, leaf, msg) if kind == "patch" else None
                in_place = fd is not None
                if fd is None:
                    self._clear(pfd, leaf, msg)
                    fd = os.open(leaf, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=pfd)
                try:
                    if kind == "patch" and not in_place:
                        self._clone_ref(msg, fd)
                    # a transaction, even to the same size; with the file's writes
                    grow = not in_place or os.fstat(fd).st_size != msg["size"]
                except BaseException:
                    os.close(fd)
                    raise
                self.open_file = (fd, msg)
                if grow:
                    self._run(_truncate, msg["size"], None, 0)
            elif kind == "symlink":
                self._clear(pfd, leaf, msg)
                os.symlink(msg["ref"], leaf, dir_fd=pfd)
                _set_meta(leaf, None, msg["uid"], msg["gid"], msg["mtime_ns"], dir_fd=pfd,
                          xattrs=msg["xattrs"], what=self.where(msg))
            elif kind == "node":
                self._clear(pfd, leaf, msg)
                fmt = {"fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK}
                make_node(pfd, leaf, fmt[msg["ref"]], msg["rdev"], self.where(msg))
                _set_meta(leaf, msg["mode"], msg["uid"], msg["gid"], msg["mtime_ns"],
                          dir_fd=pfd, xattrs=msg["xattrs"], what=self.where(msg))
            elif kind == "meta":
                st = _lstat_at(pfd, leaf)
                if st is None:
                    raise ProtocolError(f"{self.where(msg)}: no such file in the tree")
                m = st.st_mode
                if stat.S_ISLNK(m) or stat.S_ISFIFO(m) or stat.S_ISCHR(m) or stat.S_ISBLK(m):
                    _set_meta(leaf, None if stat.S_ISLNK(m) else msg["mode"], msg["uid"],
                              msg["gid"], msg["mtime_ns"], dir_fd=pfd, xattrs=msg["xattrs"],
                              what=self.where(msg))
                elif stat.S_ISREG(m):
                    fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                    try:
                        _set_meta(fd, msg["mode"], msg["uid"], msg["gid"], msg["mtime_ns"],
                                  xattrs=msg["xattrs"], what=self.where(msg))
                    finally:
                        os.close(fd)
                else:
                    raise ProtocolError(f"{self.where(msg)}: 'meta' is for files, symlinks, "
                                        "FIFOs and device nodes; directories take 'dir'")
        finally:
            os.close(pfd)
        failpoints.hit("receiver.tree_op")

    def _in_place(self, pfd: int, leaf: str, msg: dict) -> int | None:
        """For a ``patch`` of a path from itself: the stage's own file there, opened to
        be patched where it is, if it is the previous version's file (the stage starts
        as a copy of it, and a path gets one content op a cycle) with no other name;
        else None (removed and made anew from a clone of the ref, as any patch).  Saves
        an unlink, a create, the ref's lookup and a clone per changed file."""
        if self.base is None or msg["ref"] != msg["path"]:
            return None
        try:
            fd = os.open(leaf, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=pfd)
        except OSError:
            return None  # gone, a symlink, a directory: the usual way says what is wrong
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            return fd
        os.close(fd)
        return None

    def _link(self, msg: dict) -> None:
        sfd, sleaf = self._parent(msg["ref"], msg)
        try:
            src = _lstat_at(sfd, sleaf)
            if src is None or not stat.S_ISREG(src.st_mode):
                raise ProtocolError(f"{self.where(msg)}: the link's target {msg['ref']!r} "
                                    "is not a regular file of the new version")
            pfd, leaf = self._parent(msg["path"], msg)
            try:
                old = _lstat_at(pfd, leaf)
                if old is not None and (old.st_dev, old.st_ino) == (src.st_dev, src.st_ino):
                    return  # already that link
                self._clear(pfd, leaf, msg)
                os.link(sleaf, leaf, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(pfd)
        finally:
            os.close(sfd)

    def _clone_ref(self, msg: dict, fd: int) -> None:
        if self.base is None:
            raise ProtocolError(f"{self.where(msg)}: a full cycle has no previous version "
                                "to patch")
        parent, leaf = _split(msg["ref"])
        try:
            pfd = _open_dir(self.base, parent)
            try:
                src = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            finally:
                os.close(pfd)
        except OSError as exc:
            raise ProtocolError(f"{self.where(msg)}: {msg['ref']!r} is not a file of the "
                                f"previous version ({exc.strerror}); a symlink is never "
                                "followed") from None
        try:
            if not stat.S_ISREG(os.fstat(src).st_mode):
                raise ProtocolError(f"{self.where(msg)}: {msg['ref']!r} is not a regular "
                                    "file of the previous version")
            _clone_or_copy(src, fd)
        finally:
            os.close(src)

    def data(self, offset: int, raw) -> None:
        if self.open_file is None:
            raise ProtocolError(f"tree mirror {self.m.name!r}, cycle {self.cycle}: data "
                                "where no file is open")
        self._run(pwrite_all, offset, raw, len(raw))

    def zero(self, offset: int, length: int) -> None:
        if self.open_file is None:
            raise ProtocolError(f"tree mirror {self.m.name!r}, cycle {self.cycle}: a zero "
                                "run where no file is open")
        self._run(punch_zeroes, offset, length, 0)

    def _run(self, fn, offset: int, arg, size: int) -> None:
        """One run of the open file (``_do_run``): held for the pool while the file's
        runs are small (``FILE_HELD`` bytes in all), else done here, in order, the held
        ones first."""
        if self.held is not None and self.held_bytes + size + RUN_COST <= FILE_HELD:
            self.held.append((fn, offset, arg))
            self.held_bytes += size + RUN_COST
            return
        fd = self.open_file[0]
        for f, off, a in self.held or ():
            _do_run(fd, f, off, a)
        self.held = None
        _do_run(fd, fn, offset, arg)

    def finish_file(self) -> None:
        if self.open_file is None:
            return
        fd, msg = self.open_file
        runs, self.held, self.held_bytes = self.held or [], [], 0
        self.open_file = None
        self.files.submit(fd, runs, msg, self.where(msg))

    def finish(self) -> None:
        self.finish_file()
        self.files.close(check=True)
        depth = lambda p: 0 if p == "." else p.count("/") + 1  # noqa: E731
        for path in sorted(set(self.touched) | set(self.dir_meta), key=depth, reverse=True):
            fd = _open_dir(self.stage, path)
            try:
                msg = self.dir_meta.get(path)
                if msg is not None:
                    _set_meta(fd, msg["mode"], msg["uid"], msg["gid"], msg["mtime_ns"],
                              xattrs=msg["xattrs"], what=self.where(msg))
                elif _times(os.fstat(fd)) != self.touched[path]:  # (files patched in
                    os.utime(fd, ns=self.touched[path])  # place leave it as it was)
            finally:
                os.close(fd)

    def close(self) -> None:
        if self.open_file is not None:
            os.close(self.open_file[0])
            self.open_file = None
        self.files.close()


def _truncate(fd: int, size: int, _unused) -> None:
    os.ftruncate(fd, size)


def _do_run(fd: int, fn, offset: int, arg) -> None:
    """One held run: ``pwrite_all`` of bytes ``arg`` at ``offset``, ``punch_zeroes`` of
    ``arg`` bytes at ``offset``, or ``_truncate`` to size ``offset``."""
    if fn is pwrite_all:
        pwrite_all(fd, arg, offset)
    else:
        fn(fd, offset, arg)


def _write_file(fd: int, runs: list[tuple], msg: dict, what: str) -> None:
    """A file's held runs done in order (its size set first), then its metadata (after
    the writes, which move its mtime); the descriptor is closed either way."""
    try:
        for fn, offset, arg in runs:
            _do_run(fd, fn, offset, arg)
        if runs:
            start_writeback(fd)
        _set_meta(fd, msg["mode"], msg["uid"], msg["gid"], msg["mtime_ns"],
                  xattrs=msg["xattrs"], what=what)
    finally:
        os.close(fd)


class FileWriters:
    """Finishes files of a cycle (their held runs, then their metadata) in
    ``WRITER_THREADS`` threads while the next ops are read and applied.

    Writing a small change into a file of a fresh snapshot mostly waits on the kernel
    (btrfs reads and copies the metadata it touches, the page cache fills), which
    lets go of the GIL: a cycle of many small changed files is written several at a
    time instead of one after the other.  Each file is one job with its own
    descriptor, so files are independent; ``wait`` (before anything that reads what
    they wrote: hard links, metadata-only ops, the directories' times, the switch)
    returns when every job is done and raises the first failure.  At most
    ``QUEUED_BYTES`` of held runs wait at once; past that ``submit`` waits for the
    oldest jobs."""

    def __init__(self):
        self.pool = None
        self.jobs: list = []  # (future, bytes held)
        self.queued = 0

    def submit(self, fd: int, runs: list[tuple], msg: dict, what: str) -> None:
        size = sum((len(a) if f is pwrite_all else 0) + RUN_COST for f, _, a in runs)
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="tree-apply")
        try:
            fut = self.pool.submit(_write_file, fd, runs, msg, what)
        except BaseException:
            os.close(fd)
            raise
        self.jobs.append((fut, size))
        self.queued += size
        while self.queued > QUEUED_BYTES or len(self.jobs) > QUEUED_FILES:
            fut, size = self.jobs.pop(0)
            self.queued -= size
            fut.result()

    def wait(self) -> None:
        jobs, self.jobs, self.queued = self.jobs, [], 0
        failed = None
        for fut, _ in jobs:  # every job is waited for, so none runs after a failure
            try:
                fut.result()
            except BaseException as exc:  # noqa: BLE001 - the first one is raised
                failed = failed or exc
        if failed is not None:
            raise failed

    def close(self, check: bool = False) -> None:
        """Wait for the jobs and stop the threads; with ``check`` raise the first failure
        (without, an apply that failed already is being cleaned up)."""
        try:
            self.wait()
        except BaseException:
            if check:
                raise
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
                self.pool = None


class TreeMirror:
    """The mirror of one tree object on a target: ``ROOT/NAME`` and our directory."""

    def __init__(self, root: str, name: str):
        self.name = validate_volume_name(name)
        if not os.path.isabs(root):
            raise UsageError(f"tree mirror {name!r}: the root must be absolute, got {root!r}")
        self.root = root
        self.path = os.path.join(root, name)
        self.work = os.path.join(root, f".cyclemirror-tree-{name}")
        os.makedirs(self.work, mode=0o700, exist_ok=True)
        st = os.lstat(self.work)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise StoreError(f"tree mirror {name!r}: {self.work} is not a directory of this "
                             "user (a symlink?); move it away")
        self._state_path = os.path.join(self.work, STATE_FILE)
        self.work_fd = os.open(self.work, _DIR_FLAGS)
        # Stages as btrfs subvolumes where that can work: snapshots need root here.
        self.subvolumes = cowfs.filesystem_of(self.work) == "btrfs" and os.geteuid() == 0
        self.state = self._read_state()
        self.last_stage = ""  # how the last apply's stage was made: ahead, snapshot, copy, empty
        self.recover()

    def close(self) -> None:
        if self.work_fd >= 0:
            os.close(self.work_fd)
            self.work_fd = -1

    @property
    def applied_cycle(self) -> int:
        return self.state["applied_cycle"]

    def _read_state(self) -> dict:
        try:
            st = read_json(self._state_path, f"tree mirror {self.name!r} state")
        except FileNotFoundError:
            return {"format": STATE_FORMAT, "name": self.name, "applied_cycle": 0,
                    "freeze_time": 0.0, "pending": None}
        p = st.get("pending")
        ok = (st.get("format") == STATE_FORMAT and st.get("name") == self.name
              and type(st.get("applied_cycle")) is int and st["applied_cycle"] >= 0
              and isinstance(st.get("freeze_time"), int | float)
              and (p is None or (isinstance(p, dict) and type(p.get("cycle")) is int
                                 and isinstance(p.get("stage_id"), list)
                                 and len(p["stage_id"]) == 2
                                 and all(type(x) is int for x in p["stage_id"])
                                 and isinstance(p.get("freeze_time"), int | float))))
        if not ok:
            raise StoreError(f"tree mirror {self.name!r}: its state {self._state_path} is "
                             "damaged; move the mirror away and mirror the tree again")
        return st

    def _save(self) -> None:
        atomic_write_json(self._state_path, self.state)

    def recover(self) -> None:
        """Settle a crashed apply (see the module's docstring) and delete our leftovers."""
        p = self.state.get("pending")
        if p is not None:
            try:
                fd = os.open(self.path, _DIR_FLAGS)
            except OSError:  # missing, or not a directory (a symlink someone put there)
                exchanged = False
            else:
                try:
                    exchanged = dir_identity(fd) == p["stage_id"]
                finally:
                    os.close(fd)
            if exchanged:
                self.state["applied_cycle"] = p["cycle"]
                self.state["freeze_time"] = p["freeze_time"]
            self.state["pending"] = None
            self._save()
        # By name, not through work_fd: btrfs lists to a long-open directory descriptor
        # only the entries that existed when it first read it.
        for entry in os.listdir(self.work):
            if entry.startswith((STAGE_PREFIX, NEXT_PREFIX)):
                self._remove(entry)
        fsync_dir(self.work)

    def apply(self, events, base: int | None = None) -> int:
        """Apply one cycle from ``TreeFrameReader.events()``; return its number.  On any
        error nothing of it is visible and the staging copy is deleted.

        ``base``: the cycle a delta was made from (a source ships a target that lags
        several cycles one delta from the cycle it holds); None means the cycle before
        it.  It must be the cycle applied here."""
        it = iter(events)
        first = next(it, None)
        if first is None or first[0] != "begin":
            raise ProtocolError(f"tree mirror {self.name!r}: a cycle starts with 'begin'")
        begin = first[1]
        cycle, full = begin["cycle"], begin["full"]
        has_tree = os.path.lexists(self.path)
        if full:
            if cycle <= self.applied_cycle:
                raise ProtocolError(f"tree mirror {self.name!r}: full cycle {cycle} is not "
                                    f"newer than the applied cycle {self.applied_cycle}")
        elif (base if base is not None else cycle - 1) != self.applied_cycle or \
                cycle <= self.applied_cycle or not has_tree:
            need = base if base is not None else cycle - 1
            raise ProtocolError(
                f"tree mirror {self.name!r}: delta cycle {cycle} needs cycle {need} "
                f"applied here; cycle {self.applied_cycle} is"
                + ("" if has_tree else f" and {self.path} is missing"))
        stage = f"{STAGE_PREFIX}{cycle}"
        self._remove(stage)
        base_fd = stage_fd = None
        job = None
        try:
            if not full:
                base_fd = os.open(self.path, _DIR_FLAGS)
            stage_fd = self._take_next(stage) if not full else None
            if stage_fd is None:
                stage_fd = self._make_stage(stage, base_fd)
            job = _Apply(self, stage_fd, base_fd, cycle)
            for ev in it:
                if ev[0] == "op":
                    job.op(ev[1])
                elif ev[0] == "data":
                    job.data(ev[1], ev[2])
                elif ev[0] == "zero":
                    job.zero(ev[1], ev[2])
                elif ev[0] == "end":
                    break
                else:
                    raise ProtocolError(f"tree mirror {self.name!r}: unexpected {ev[0]!r}")
            else:
                raise ProtocolError(f"tree mirror {self.name!r}: cycle {cycle} ended "
                                    "without 'end'")
            job.finish()
            syncfs(stage_fd)
            self._switch(stage, stage_fd, cycle, float(begin["freeze_time"]), has_tree)
        except BaseException:
            if job is not None:
                job.close()
            for fd in (stage_fd, base_fd):
                if fd is not None:
                    os.close(fd)
            stage_fd = base_fd = None
            if self.state.get("pending") is None:
                self._remove(stage)
            else:  # failed around the switch: settle it as a restart would
                self.recover()
            raise
        finally:
            for fd in (stage_fd, base_fd):
                if fd is not None:
                    os.close(fd)
        return cycle

    def prepare_next(self) -> bool:
        """Make the next delta cycle's stage now, off that cycle's path: a writable
        snapshot of the applied tree as ``next-A`` (A the applied cycle), which the next
        ``apply`` of a delta from A renames to its ``stage-K`` instead of taking the
        snapshot then (a btrfs transaction commit).  Only where stages are snapshots
        (btrfs, as root); returns whether one is ready.  Nobody writes the mirror, so
        the snapshot stays equal to it (``_take_next`` checks it is a snapshot of the
        subvolume that is the mirror now).  A
        crash leaves a ``next-`` entry that ``recover`` deletes like a stage.

        Nobody else may write the mirror (it is replaced whole each cycle): what
        someone writes there after this snapshot is gone at the next switch, where a
        stage snapshotted at the apply would have carried it on."""
        a = self.applied_cycle
        name = f"{NEXT_PREFIX}{a}"
        for entry in os.listdir(self.work):  # an older one: of a cycle no longer applied
            if entry.startswith(NEXT_PREFIX) and entry != name:
                self._remove(entry)
        if not self.subvolumes or not a or self.state.get("pending") is not None:
            return False
        if _lstat_at(self.work_fd, name) is not None:
            return True
        try:
            fd = os.open(self.path, _DIR_FLAGS)
        except OSError:
            return False
        try:
            if not subvolume_id(fd):
                return False
        finally:
            os.close(fd)
        btrfsioctl.snapshot(self.path, os.path.join(self.work, name), readonly=False)
        return True

    def _take_next(self, stage: str) -> int | None:
        """The stage ``prepare_next`` made for a delta from the applied cycle, renamed to
        ``stage`` and open; None where there is none or it is not a writable snapshot of
        the subvolume that is the mirror now (then it is deleted)."""
        name = f"{NEXT_PREFIX}{self.applied_cycle}"
        if not self.subvolumes or _lstat_at(self.work_fd, name) is None:
            return None
        try:
            nfd = os.open(name, _DIR_FLAGS, dir_fd=self.work_fd)
            try:
                mfd = os.open(self.path, _DIR_FLAGS)
                try:
                    mi, ni = btrfsioctl.subvolume_info(mfd), btrfsioctl.subvolume_info(nfd)
                    ours = subvolume_id(nfd) != 0 and subvolume_id(mfd) != 0
                finally:
                    os.close(mfd)
            finally:
                os.close(nfd)
        except OSError:
            ours = False
        if not ours or ni.parent_uuid != mi.uuid or ni.readonly:
            self._remove(name)
            return None
        renameat2(self.work_fd, name, self.work_fd, stage, RENAME_NOREPLACE)
        self.last_stage = "ahead"
        return os.open(stage, _DIR_FLAGS, dir_fd=self.work_fd)

    def _make_stage(self, stage: str, base_fd: int | None) -> int:
        """Make ``stage`` in our directory: empty (``base_fd`` None) or a copy of the tree
        open as ``base_fd``; return it open.  On btrfs (as root) the stage is a subvolume,
        and the copy a writable snapshot of the current tree when that is a subvolume too:
        constant time, however many files."""
        path = os.path.join(self.work, stage)
        if self.subvolumes and base_fd is not None and subvolume_id(base_fd):
            btrfsioctl.snapshot(self.path, path, readonly=False)
            self.last_stage = "snapshot"
            return os.open(stage, _DIR_FLAGS, dir_fd=self.work_fd)
        self.last_stage = "empty" if base_fd is None else "copy"
        if self.subvolumes:
            btrfsioctl.create_subvolume(path)
        else:
            os.mkdir(stage, 0o700, dir_fd=self.work_fd)
        fd = os.open(stage, _DIR_FLAGS, dir_fd=self.work_fd)
        try:
            if base_fd is not None:
                copy_tree(base_fd, fd)
            else:
                os.fchmod(fd, 0o700)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _remove(self, entry: str) -> None:
        """Delete ``entry`` of our directory: a subvolume by btrfs, the rest by unlinks."""
        st = _lstat_at(self.work_fd, entry)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode) and st.st_ino == BTRFS_SUBVOL_INO:
            fd = os.open(entry, _DIR_FLAGS, dir_fd=self.work_fd)
            try:
                is_subvolume = subvolume_id(fd) != 0
            finally:
                os.close(fd)
            if is_subvolume:
                btrfsioctl.delete_subvolume(os.path.join(self.work, entry))
                return
        _rm_at(self.work_fd, entry)

    def _switch(self, stage: str, stage_fd: int, cycle: int, freeze_time: float,
                has_tree: bool) -> None:
        self.state["pending"] = {"cycle": cycle, "freeze_time": freeze_time,
                                 "stage_id": dir_identity(stage_fd)}
        self._save()
        failpoints.hit("receiver.tree_switch")
        root_fd = os.open(self.root, _DIR_FLAGS)
        try:
            renameat2(self.work_fd, stage, root_fd, self.name,
                      RENAME_EXCHANGE if has_tree else RENAME_NOREPLACE)
            os.fsync(root_fd)
            os.fsync(self.work_fd)
        finally:
            os.close(root_fd)
        failpoints.hit("receiver.tree_switched")
        self.state.update(applied_cycle=cycle, freeze_time=freeze_time, pending=None)
        self._save()
        self._remove(stage)  # the previous version
