"""The delta between two snapshots of a tree object: a list of tree operations.

``tree_delta(old, new)`` walks both read-only snapshots (``old`` None for a
cycle that ships everything) and returns ``TreeOp``s in the order the target
applies them:

1. ``rm PATH``: the topmost paths that are gone, or whose kind changed (a
   file became a directory...); a directory goes with everything in it.
2. ``dir PATH``: directories that are new or whose mode, owner or mtime
   changed, parents first (``.`` is the tree's root).  The target creates
   them, and sets their metadata last, deepest first, so that its own
   changes inside do not leave a wrong mtime.
3. ``file PATH`` (new content: DATA frames of every data range follow) and
   ``patch PATH <- REF`` (the file is ``REF`` of the previous version with the
   ``data`` ranges rewritten and the ``zero`` ranges zeroed, truncated or
   grown to ``size``).  ``REF`` is where the same inode was in the previous
   snapshot (inode numbers survive a btrfs snapshot), so a **rename is a
   patch from the old path with no ranges plus an ``rm`` of the old path**:
   no data crosses the wire, the target copies the file from its previous
   version (a reflink where its file system has them).  Which ranges changed
   comes from the two snapshots' extent maps (FIEMAP, ``cowfs.compare_maps``,
   as for file objects); where the map cannot say (compressed extents) or
   the file system will not map the file, the block hashes of both (the
   Cython xxh3 hashes) decide.
4. ``symlink PATH -> REF`` (new, or a new target) and ``node PATH`` (``REF`` is
   its kind: ``fifo``, ``chr`` or ``blk``; ``rdev`` a device's number): a new
   FIFO or device node, or one of another kind or number.
5. ``link PATH <- REF``: a hard link to ``REF`` of the *new* version, for
   every further name of an inode whose content was just written, or a name
   that is new for an unchanged inode.
6. ``meta PATH``: a file, symlink, FIFO or device node whose only change is its
   mode, owner, mtime or extended attributes (a hard-linked inode's metadata
   goes with its first name).

Every op carries the new mode (permission bits), uid, gid, mtime (ns) and
extended attributes (the complete set of the mirrored namespaces,
``cyclemirror.xattrs``: user, trusted, security, POSIX ACLs) of its path,
where they apply.  Atimes are not mirrored.  Sockets are not mirrored (they
cannot be made meaningfully anywhere else): ``TreeDelta.skipped`` lists
them.  FIFOs and device nodes are, each name its own node (hard links
between them are not kept).  Names must be UTF-8 (the wire carries text);
another name is a StoreError naming it.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from cyclemirror import xattrs as xattrs_mod
from cyclemirror._cext import blockhash
from cyclemirror.errors import StoreError
from cyclemirror.store import btrfsioctl, cowfs

HASH_BLOCK = 4096
HASH_SPAN = 64 << 20  # bytes hashed per call
PROVE_SMALL = 64 << 10  # changed spans up to this size are compared by their bytes
COMPARE_THREADS = 8  # changed files compared at once (the kernel does most of the work)


class Entry(NamedTuple):
    """What a walk saw at one path (lstat, never following a symlink)."""

    kind: str  # "dir", "file", "symlink", "fifo", "chr", "blk" or "other" (a socket)
    mode: int  # permission bits
    uid: int
    gid: int
    mtime_ns: int
    size: int
    ino: int
    ctime_ns: int = 0  # moves with every change of the inode; nobody can set it back
    target: str = ""  # a symlink's target
    rdev: int = 0  # a device node's number
    xattrs: xattrs_mod.Xattrs = ()  # the mirrored extended attributes, sorted by name


NODE_KINDS = ("fifo", "chr", "blk")


@dataclass
class TreeOp:
    op: str
    path: str
    ref: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    rdev: int = 0  # a device node's number ('node' of ref 'chr' or 'blk')
    xattrs: xattrs_mod.Xattrs = ()  # the complete set, for every op but 'rm' and 'link'
    data: list[tuple[int, int]] = field(default_factory=list)  # (offset, length)
    zero: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class TreeDelta:
    ops: list[TreeOp]
    skipped: list[str]  # sockets: not mirrored
    data_bytes: int = 0
    methods: dict[str, int] = field(default_factory=dict)  # how changed files were compared
    new_walk: dict[str, Entry] = field(default_factory=dict, repr=False)  # for the next one


def _utf8(rel: str, root: str) -> str:
    if rel.isascii():
        return rel
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError(f"tree {root}: the name {rel.encode('utf-8', 'surrogateescape')!r} "
                         "is not UTF-8, which the wire cannot carry; rename it") from None
    return rel


class Walk(dict):
    """``walk``'s result: path -> Entry, with what the next delta needs to find its way
    without walking again: ``by_ino`` (inode -> its path, or a tuple of its paths),
    ``others`` (the paths of kind "other"), ``snapshot`` (the uuid and last-change
    transid of the read-only btrfs snapshot walked, b"" if it is not one) and ``how``
    it was made ("walk", or "search" when only what btrfs said changed was looked
    at)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.by_ino: dict[int, str | tuple[str, ...]] = {}
        self.others: set[str] = set()
        self.snapshot = b""
        self.how = "walk"

    def copy(self) -> Walk:
        w = Walk(self)
        w.by_ino = dict(self.by_ino)  # values are immutable: shared until replaced
        w.others = set(self.others)
        w.snapshot, w.how = self.snapshot, self.how
        return w

    def put(self, rel: str, e: Entry) -> None:
        old = self.get(rel)
        if old is not None:
            self.drop(rel)
        self[rel] = e
        names = self.by_ino.get(e.ino)
        self.by_ino[e.ino] = rel if names is None else (
            (names, rel) if type(names) is str else (*names, rel))
        if e.kind == "other":
            self.others.add(rel)

    def drop(self, rel: str) -> None:
        e = self.pop(rel)
        names = self.by_ino.get(e.ino)
        if names == rel:
            del self.by_ino[e.ino]
        elif type(names) is tuple:
            rest = tuple(n for n in names if n != rel)
            self.by_ino[e.ino] = rest[0] if len(rest) == 1 else rest
        self.others.discard(rel)

    def paths_of(self, ino: int) -> tuple[str, ...]:
        names = self.by_ino.get(ino)
        return () if names is None else (names,) if type(names) is str else names


def walk(root: str) -> Walk:
    """Every path under ``root`` (relative, "/"-separated; "." for the root) -> Entry."""
    out = Walk()
    out.snapshot = _snapshot_uuid(root)
    out.put(".", _entry(os.lstat(root), "", root, root))
    _walk_into(out, root, "", root)
    return out


def _walk_into(out: Walk, root: str, rel_top: str, abs_top: str,
               added: set[str] | None = None) -> None:
    """Add every path under directory ``rel_top`` ("" for the root) to ``out`` (and
    to ``added``, if given)."""
    stack = [(rel_top, abs_top)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        with os.scandir(abs_dir) as it:
            for de in it:
                rel = _utf8(f"{rel_dir}/{de.name}" if rel_dir else de.name, root)
                st = de.stat(follow_symlinks=False)
                target = os.readlink(de.path) if stat.S_ISLNK(st.st_mode) else ""
                e = _entry(st, _utf8(target, root), de.path, root)
                out.put(rel, e)
                if added is not None:
                    added.add(rel)
                if e.kind == "dir":
                    stack.append((rel, de.path))


def _snapshot_id(info: btrfsioctl.SubvolumeInfo) -> bytes:
    """What names one state of a snapshot: its uuid and the transaction that last
    changed it (which moves if someone made it writable and wrote to it)."""
    return info.uuid + info.ctransid.to_bytes(8, "little")


def _snapshot_uuid(root: str) -> bytes:
    """``_snapshot_id`` of the read-only btrfs snapshot whose root ``root`` is, else b""."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        if os.fstat(fd).st_ino != btrfsioctl.BTRFS_SUBVOL_INO:
            return b""
        info = btrfsioctl.subvolume_info(fd)
    except OSError:
        return b""  # not btrfs
    finally:
        os.close(fd)
    return _snapshot_id(info) if info.readonly else b""


def _entry(st: os.stat_result, target: str, path: str, root: str) -> Entry:
    m = st.st_mode
    kind = ("dir" if stat.S_ISDIR(m) else "file" if stat.S_ISREG(m)
            else "symlink" if stat.S_ISLNK(m) else "fifo" if stat.S_ISFIFO(m)
            else "chr" if stat.S_ISCHR(m) else "blk" if stat.S_ISBLK(m) else "other")
    xa = () if kind == "other" else xattrs_mod.read(path, f"tree entry {path}")
    return Entry(kind, stat.S_IMODE(m), st.st_uid, st.st_gid, st.st_mtime_ns,
                 st.st_size if kind == "file" else 0, st.st_ino, st.st_ctime_ns, target,
                 st.st_rdev if kind in ("chr", "blk") else 0, xa)


def _key(path: str) -> str:
    """Sorts paths as their tuples of components would (parents first, a directory's
    subtree together): NUL is below every character a name can hold."""
    return "" if path == "." else path.replace("/", "\0")


def _parent(path: str) -> str:
    return path.rpartition("/")[0] or "."


def _meta(e: Entry) -> tuple:
    return (e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs)


def _op(op: str, path: str, e: Entry, ref: str = "") -> TreeOp:
    return TreeOp(op, path, ref, e.mode, e.uid, e.gid, e.mtime_ns,
                  e.size if op in ("file", "patch") else 0,
                  e.rdev if op == "node" else 0, e.xattrs)


def tree_delta(old_root: str | None, new_root: str,
               old_walk: dict[str, Entry] | None = None, *, search: bool = True) -> TreeDelta:
    """The ops that turn snapshot ``old_root`` (None: an empty tree) into ``new_root``.

    ``old_walk`` is ``walk(old_root)`` if the caller kept it (the previous delta's
    ``new_walk``: a snapshot never changes), else both are walked.  With ``search``
    (the default), where both are read-only btrfs snapshots of one subvolume, only
    what btrfs says changed since ``old_root`` is looked at in ``new_root``
    (``_search_walk``); anything it cannot vouch for walks ``new_root`` whole, and
    the ops are the same either way.  ``delta.new_walk.how`` says which it was.

    A file whose lstat is the same in both (inode, ctime, size, metadata) is skipped
    without comparing its content only where btrfs also says its inode item was not
    written after ``old_root`` was made (``_written_since``): equal ctimes do not
    prove equal bytes (a write that began before the snapshot, and set the ctime
    that went into it, can have its bytes land after it, in the next snapshot with
    the same ctime; two writes in one clock tick, one on each side of a snapshot,
    leave one ctime too).  Where btrfs cannot say, every such file is compared."""
    cand = None  # paths that may differ; None: every path
    written = None  # inodes btrfs wrote after old_root was made; None: it cannot say
    if old_root is None:
        old, new = Walk(), walk(new_root)
    else:
        if isinstance(old_walk, Walk):
            old = old_walk
        elif old_walk is not None:
            old = Walk()
            for p, e in old_walk.items():
                old.put(p, e)
        elif search:
            old = walk(old_root)
        else:
            with ThreadPoolExecutor(2) as pool:  # lstat lets go of the GIL
                old_f = pool.submit(walk, old_root)
                new = walk(new_root)
                old = old_f.result()
        if old_walk is not None or search:
            new = None
            if search:
                try:
                    new, cand, written = _search_walk(old_root, new_root, old)
                except _Unsure as exc:
                    why = f" ({exc})"
            if new is None:
                new = walk(new_root)
                new.how = "walk" + (why if search else "")
        if written is None:
            written = _written_since(old_root, new_root)
    delta = TreeDelta([], sorted(new.others), new_walk=new)
    maps = _ItemMaps.open(old_root, new_root) if new.how == "search" else None
    try:
        if cand is None:
            _ops_all(old, new, old_root, new_root, written, delta, maps)
        else:
            _ops_of(old, new, cand, old_root, new_root, written, delta, maps)
    finally:
        if maps is not None:
            maps.close()
    return delta


class _ItemMaps:
    """Extent maps of files of two read-only snapshots of one subvolume by inode number,
    from btrfs's items (``btrfsioctl.extent_map``: one tree search per file, no open, no
    FIEMAP); ``None`` from ``old``/``new`` where the search fails (FIEMAP then)."""

    def __init__(self, ofd: int, nfd: int):
        self.fds = (ofd, nfd)

    @classmethod
    def open(cls, old_root: str, new_root: str) -> _ItemMaps | None:
        try:
            return cls(*_open_pair(old_root, new_root))
        except _Unsure:
            return None

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = (-1, -1)

    def old(self, ino: int):
        return self._map(0, ino)

    def new(self, ino: int):
        return self._map(1, ino)

    def _map(self, which: int, ino: int):
        try:
            return btrfsioctl.extent_map(self.fds[which], ino)
        except (OSError, ValueError):
            return None


def _ops_all(old: Walk, new: Walk, old_root, new_root, written: set[int] | None,
             delta: TreeDelta, maps: _ItemMaps | None = None) -> None:
    """The ops, every path considered (after a walk)."""
    old_order = sorted(old, key=_key)
    order = sorted(new, key=_key)
    old_names: dict[int, list[str]] = {}
    for p in old_order:
        if old[p].kind == "file":
            old_names.setdefault(old[p].ino, []).append(p)
    new_names: dict[int, list[str]] = {}
    for p in order:
        if new[p].kind == "file":
            new_names.setdefault(new[p].ino, []).append(p)
    _ops(old, new, old_order, order, new_names, old_names, old_root, new_root, written,
         delta, maps)


def _ops_of(old: Walk, new: Walk, cand: set[str], old_root, new_root,
            written: set[int] | None, delta: TreeDelta,
            maps: _ItemMaps | None = None) -> None:
    """The ops, only the paths of ``cand`` considered: every path whose entry differs
    between ``old`` and ``new`` is in it, and a path whose entry does not makes no op
    (so the ops equal ``_ops_all``'s).  An inode with a name in ``cand`` is looked at
    with all its names, in ``by_ino`` order of the paths (``_key``)."""
    old_order = sorted((p for p in cand if p in old), key=_key)
    order = sorted((p for p in cand if p in new), key=_key)
    inos = {e.ino for w in (old, new) for p in cand if (e := w.get(p)) and e.kind == "file"}

    def names(w: Walk, ino: int) -> list[str]:
        return sorted((p for p in w.paths_of(ino) if w[p].kind == "file"), key=_key)

    old_names = {ino: ns for ino in inos if (ns := names(old, ino))}
    firsts = sorted(((ns[0], ino, ns) for ino in inos if (ns := names(new, ino))),
                    key=lambda t: _key(t[0]))
    new_names = {ino: ns for _, ino, ns in firsts}
    _ops(old, new, old_order, order, new_names, old_names, old_root, new_root, written,
         delta, maps)


def _ops(old, new, old_order, order, new_names, old_names, old_root, new_root,
         written_inos: set[int] | None, delta: TreeDelta,
         maps: _ItemMaps | None = None) -> None:
    """Append the ops of the paths ``old_order`` (of ``old``) and ``order`` (of
    ``new``), both sorted by ``_key``, and of the inodes of ``new_names`` (inode ->
    its file names in ``new``, sorted, the inodes in the order of their first names;
    ``old_names`` the same of ``old``).  ``written_inos``: the inodes btrfs wrote
    after ``old_root`` was made (None: unknown, every file is compared)."""
    ops = delta.ops
    # 1. deletes: gone, or the kind changed (a directory must go before a file takes its
    # name, and the reverse); only the topmost of each deleted subtree.
    gone = set()
    for p in old_order:
        o, n = old[p], new.get(p)
        if p != "." and (n is None or n.kind != o.kind) and o.kind != "other":
            if _parent(p) not in gone:
                ops.append(TreeOp("rm", p))
            gone.add(p)
    # 2. directories, parents first
    for p in order:
        n = new[p]
        if n.kind == "dir":
            o = old.get(p)
            if o is None or o.kind != "dir" or _meta(o) != _meta(n):
                ops.append(_op("dir", p, n))
    # 3. regular files: one content op per inode, at its first name
    links: list[TreeOp] = []
    metas: list[TreeOp] = []
    plan = []  # (ino, names, base, compare): base None for a new file
    for ino, names in new_names.items():
        first, n = names[0], new[names[0]]
        base = None
        if ino in old_names:
            base = first if first in old_names[ino] else old_names[ino][0]
        elif first in old and old[first].kind == "file":
            base = first  # replaced by a new file (write and rename over): compare anyway
        # The same inode, untouched since the last freeze: the same lstat (a snapshot
        # keeps the inode) and btrfs wrote nothing of it since.  The same ctime alone
        # is not enough: a write's ctime can go into one snapshot and its bytes into
        # the next (see tree_delta).
        compare = base is not None and not (
            base == first and old[base] == n and written_inos is not None
            and ino not in written_inos)
        plan.append((ino, names, base, compare))
    compared = _compare_all([(os.path.join(old_root, base), os.path.join(new_root, names[0]),
                              new[names[0]].size, maps, (old[base].ino, ino))
                             for ino, names, base, compare in plan if compare])
    for ino, names, base, compare in plan:
        first, n = names[0], new[names[0]]
        written = True
        if base is None:
            op = _op("file", first, n)
            mn = maps.new(ino) if maps is not None else None
            op.data = _runs_merge(cowfs.data_ranges(mn, n.size)) if mn is not None \
                else _data_ranges(os.path.join(new_root, first), n.size)
            delta.methods["new"] = delta.methods.get("new", 0) + 1
            ops.append(op)
        elif not compare:
            written = False
        else:
            o = old[base]
            data, zero, method = next(compared)
            same_inode = old.get(first) is not None and old[first].ino == ino
            if data or zero or o.size != n.size or base != first or not same_inode:
                op = _op("patch", first, n, base)
                op.data, op.zero = data, zero
                delta.methods[method] = delta.methods.get(method, 0) + 1
                ops.append(op)
            else:
                written = False
                if _meta(o) != _meta(n):
                    metas.append(_op("meta", first, n))
        for q in names[1:]:
            oq = old.get(q)
            if written or oq is None or oq.kind != "file" or oq.ino != ino:
                links.append(TreeOp("link", q, first))
    for op in ops:
        delta.data_bytes += sum(n for _, n in op.data)
    # 4. symlinks, FIFOs and device nodes
    for p in order:
        n = new[p]
        if n.kind == "symlink":
            o = old.get(p)
            if o is None or o.kind != "symlink" or o.target != n.target:
                ops.append(_op("symlink", p, n, n.target))
            elif (o.uid, o.gid, o.mtime_ns, o.xattrs) != (n.uid, n.gid, n.mtime_ns, n.xattrs):
                metas.append(_op("meta", p, n))
        elif n.kind in NODE_KINDS:
            o = old.get(p)
            if o is None or o.kind != n.kind or o.rdev != n.rdev:
                ops.append(_op("node", p, n, n.kind))
            elif _meta(o) != _meta(n):
                metas.append(_op("meta", p, n))
    # 5. further names of inodes, 6. metadata only
    ops.extend(links)
    ops.extend(metas)


class _Failed(NamedTuple):
    exc: BaseException


def _in_threads(fn, items: list, threads: int, name: str) -> list:
    """``fn(*item)`` of every item by ``threads`` threads, each taking every
    ``threads``-th item in turn: the outcomes in the items' order, a ``_Failed`` where
    one raised.  One job per thread, not per item: a pool's future per item costs more
    in locks and GIL hand-offs than a small item's work."""
    out: list = [None] * len(items)

    def work(start: int) -> None:
        for i in range(start, len(items), threads):
            try:
                out[i] = fn(*items[i])
            except BaseException as exc:  # noqa: BLE001 - the caller raises it in order
                out[i] = _Failed(exc)

    ts = [threading.Thread(target=work, args=(n,), name=f"{name}-{n}", daemon=True)
          for n in range(min(threads, len(items)))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def _compare_all(jobs: list[tuple]) -> Iterator[tuple]:
    """``changed_content(*job)`` of each job, in order.  Many are compared by
    ``COMPARE_THREADS`` threads at once: a comparison mostly waits on the kernel (tree
    searches, reads of both versions), which lets go of the GIL, so a cycle of many
    changed files takes a fraction of the time one after the other does.  The first
    failure (in the jobs' order) is raised, as the loop one by one would."""
    if len(jobs) < 2 * COMPARE_THREADS:
        return (changed_content(*job) for job in jobs)
    out = _in_threads(changed_content, jobs, COMPARE_THREADS, "tree-compare")
    for r in out:
        if isinstance(r, _Failed):
            raise r.exc
    return iter(out)


class _Unsure(Exception):
    """The search cannot vouch for the new snapshot: walk it instead (says why)."""


def _open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _open_pair(old_root: str, new_root: str) -> tuple[int, int]:
    try:
        ofd = _open_dir(old_root)
    except OSError as exc:
        raise _Unsure(f"opening {old_root}: {exc.strerror}") from None
    try:
        return ofd, _open_dir(new_root)
    except OSError as exc:
        os.close(ofd)
        raise _Unsure(f"opening {new_root}: {exc.strerror}") from None


def _snapshot_infos(ofd: int, nfd: int):
    """The ``subvolume_info`` of two read-only btrfs snapshots, the old one first;
    _Unsure where they are not that."""
    try:
        oi, ni = btrfsioctl.subvolume_info(ofd), btrfsioctl.subvolume_info(nfd)
    except OSError as exc:
        raise _Unsure(f"not btrfs ({exc.strerror})") from None
    if not (oi.readonly and ni.readonly):
        raise _Unsure("not read-only snapshots")
    return oi, ni


def _changed_since(nfd: int, oi, ni, after: int = 0, later: set[int] | None = None
                   ) -> set[int]:
    """``btrfsioctl.changed_inodes`` of snapshot ``nfd`` since the transaction that
    made the snapshot of ``oi`` (``after`` 1: since the one after it; ``later`` gets
    those of after 1 from the same search); _Unsure where btrfs cannot say."""
    if oi.parent_uuid != ni.parent_uuid or not any(oi.parent_uuid) \
            or ni.otransid <= oi.otransid:
        raise _Unsure("not two snapshots of one subvolume, in order")
    try:
        return btrfsioctl.changed_inodes(nfd, oi.otransid + after, later)
    except OSError as exc:
        raise _Unsure(f"tree search: {exc.strerror}") from None
    except ValueError as exc:
        raise _Unsure(str(exc)) from None


def _written_since(old_root: str, new_root: str) -> set[int] | None:
    """The inodes of snapshot ``new_root`` whose inode item or entries btrfs wrote
    after snapshot ``old_root`` was made, or None where it cannot say (not two
    read-only snapshots of one subvolume in order, no CAP_SYS_ADMIN...).

    After: in a transaction later than the one that made ``old_root``.  A snapshot
    is made in its transaction's commit once every writer of that transaction is
    done, so what that transaction wrote is in it, and a write after it is in a
    later one: the bytes of a write whose ctime went into ``old_root`` land in a
    later transaction, which writes the inode item again (the file's extents and
    byte count), so the inode is here even though its lstat is not changed."""
    try:
        ofd, nfd = _open_pair(old_root, new_root)
    except _Unsure:
        return None
    try:
        oi, ni = _snapshot_infos(ofd, nfd)
        return _changed_since(nfd, oi, ni, after=1)
    except _Unsure:
        return None
    finally:
        os.close(ofd)
        os.close(nfd)


def _search_walk(old_root: str, new_root: str, old: Walk
                 ) -> tuple[Walk, set[str], set[int]]:
    """``walk(new_root)`` from ``old`` (``walk(old_root)``) and what btrfs says changed,
    the paths whose entries may differ, and ``_written_since(old_root, new_root)``
    (from the same search).  Raises _Unsure where it cannot vouch.

    Both must be read-only snapshots of one subvolume, ``old`` the walk of
    ``old_root``.  Every inode whose inode item or entries were written in the
    transaction that made ``old_root`` or later (``btrfsioctl.changed_inodes``)
    is looked at again at each of its old paths, top down: a directory's
    entries are read in both snapshots (names and inode numbers, no stat) and
    a name that is gone or now another inode takes its old subtree out, a name
    that is new or another inode is walked whole (a moved directory: its
    subtree); a file, symlink or other is lstat'ed again.  Everything else is
    as it was, because btrfs writes an inode's item whenever anything lstat
    shows of it changes, and a directory's whenever its entries do.  A path
    under a subtree already taken out is skipped (its new place was walked)."""
    ofd, nfd = _open_pair(old_root, new_root)
    try:
        oi, ni = _snapshot_infos(ofd, nfd)
        if not old.snapshot or old.snapshot != _snapshot_id(oi):
            raise _Unsure("the walk kept is not of the previous snapshot")
        written: set[int] = set()
        changed = _changed_since(nfd, oi, ni, later=written)
        new = old.copy()
        new.snapshot, new.how = _snapshot_id(ni), "search"
        cand: set[str] = set()
        _apply_changes(old_root, new_root, old, new, changed, cand)
        return new, cand, written
    finally:
        os.close(ofd)
        os.close(nfd)


def _apply_changes(old_root: str, new_root: str, old: Walk, new: Walk, changed: set[int],
                   cand: set[str]) -> None:
    work = sorted({p for ino in changed for p in old.paths_of(ino)}, key=_key)
    dropped: set[str] = set()  # old paths taken out with their subtrees

    def under_dropped(p: str) -> bool:
        while p != ".":
            if p in dropped:
                return True
            p = _parent(p)
        return False

    def restat(p: str, ino: int) -> Entry:
        full = os.path.join(new_root, p)
        try:
            st = os.lstat(full)
            target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else ""
        except OSError as exc:
            raise _Unsure(f"{p} is gone from where its directory says it is "
                          f"({exc.strerror})") from None
        if st.st_ino != ino:
            raise _Unsure(f"{p} is another inode than its directory says")
        return _entry(st, _utf8(target, new_root), full, new_root)

    def entries(root: str, p: str) -> dict[str, int]:
        with os.scandir(os.path.join(root, p)) as it:
            return {de.name: de.inode() for de in it}

    def take_out(q: str) -> None:
        """Take old path q and, for a directory, everything under it out of new."""
        dropped.add(q)
        gone = [q]
        if old[q].kind == "dir":
            stack = [q]
            while stack:
                d = stack.pop()
                with os.scandir(os.path.join(old_root, d)) as it:
                    for de in it:
                        r = f"{d}/{de.name}"
                        gone.append(r)
                        if de.is_dir(follow_symlinks=False):
                            stack.append(r)
        for r in gone:
            if r not in old or r not in new:
                raise _Unsure(f"{r} of the previous snapshot is not in the walk kept")
            new.drop(r)
            cand.add(r)

    def bring_in(q: str) -> None:
        """Walk new path q (a directory: all under it) into new."""
        full = os.path.join(new_root, q)
        st = os.lstat(full)
        target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else ""
        new.put(q, _entry(st, _utf8(target, new_root), full, new_root))
        cand.add(q)
        if stat.S_ISDIR(st.st_mode):
            _walk_into(new, new_root, q, full, cand)

    # The root is lstat'ed always: renaming a snapshot moves its root's ctime in memory
    # without writing its inode item (and the freeze renames each one into place).
    e = restat(".", old["."].ino)
    if e != new["."]:
        new.put(".", e)
    cand.add(".")
    for p in work:
        if under_dropped(p):
            continue
        o = old[p]
        e = restat(p, o.ino) if p != "." else new["."]
        if e != new[p]:
            new.put(p, e)
        cand.add(p)
        if e.kind != o.kind:  # an inode number used again for another kind
            take_out(p)
            bring_in(p)
            continue
        if o.kind != "dir":
            continue
        was, now = entries(old_root, p), entries(new_root, p)
        prefix = "" if p == "." else p + "/"
        for name, ino in was.items():
            if now.get(name) != ino:
                take_out(prefix + name)
        for name, ino in now.items():
            if was.get(name) != ino:
                bring_in(_utf8(prefix + name, new_root))


def _open(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _runs_merge(ranges) -> list[tuple[int, int]]:
    """(start, end) pairs, ascending, touching ones joined, as (offset, length)."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b - a) for a, b in out]


def _subtract(ranges, minus) -> list[tuple[int, int]]:
    """(start, end) ranges less the (start, end) ranges of ``minus`` (both ascending)."""
    out = []
    minus = sorted(minus)
    for a, b in ranges:
        pos = a
        for c, d in minus:
            if d <= pos or c >= b:
                continue
            if c > pos:
                out.append((pos, c))
            pos = max(pos, d)
        if pos < b:
            out.append((pos, b))
    return out


def _intersect(ranges, with_) -> list[tuple[int, int]]:
    out = []
    for a, b in ranges:
        for c, d in with_:
            lo, hi = max(a, c), min(b, d)
            if lo < hi:
                out.append((lo, hi))
    return out


def _data_ranges(path: str, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the ranges of a new file that may hold data."""
    fd = _open(path)
    try:
        return _runs_merge(_mapped(fd, size))
    finally:
        os.close(fd)


def _mapped(fd: int, size: int) -> list[tuple[int, int]]:
    try:
        return cowfs.data_ranges(cowfs.extent_map(fd), size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
            raise
    from cyclemirror.store.fileops import data_runs

    return list(data_runs(fd, 0, size))


def changed_content(old_path: str, new_path: str, size: int,
                    maps: _ItemMaps | None = None, inos: tuple[int, int] = (0, 0)):
    """(data, zero, method): the (offset, length) ranges of the new file (``size``
    bytes) to ship as data and to zero, so that the old file truncated or grown to
    ``size`` becomes the new one; ``method`` "fiemap", "fiemap+hash" or "hash" (or
    "items", "items+hash" where ``maps`` gave both extent maps from btrfs's items for
    ``inos`` = (old inode, new inode): then neither file is opened unless
    ranges of a compressed extent must be hashed)."""
    if maps is not None:
        mo, mn = maps.old(inos[0]), maps.new(inos[1])
        if mo is not None and mn is not None:
            changed, unproven = cowfs.compare_maps(mo, mn, size)
            method = "items"
            small = bool(changed) and sum(b - a for a, b in changed) <= PROVE_SMALL
            if unproven or small:  # compressed extents, a small span: the bytes decide
                fo, fn = _open(old_path), _open(new_path)
                try:
                    old_size = os.fstat(fo).st_size
                    if small:  # see below
                        changed = _hash_changed(fo, fn, changed, old_size, size)
                    changed = changed + _hash_changed(fo, fn, unproven, old_size, size)
                finally:
                    os.close(fo)
                    os.close(fn)
                method = "items+hash"
            return (*_data_and_zero(changed, cowfs.data_ranges(mn, size), size), method)
    fo, fn = _open(old_path), _open(new_path)
    try:
        old_size = os.fstat(fo).st_size
        try:
            mo, mn = cowfs.extent_map(fo), cowfs.extent_map(fn)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
            changed = _hash_changed(fo, fn, [(0, size)], old_size, size)
            method = "hash"
            new_data = _mapped(fn, size)
        else:
            changed, unproven = cowfs.compare_maps(mo, mn, size)
            method = "fiemap"
            if changed and sum(b - a for a, b in changed) <= PROVE_SMALL:
                # A small changed span is proven by its bytes: an inline extent (a
                # small file's data in the metadata) has no place FIEMAP can give, so
                # the map alone calls it changed whenever the file is looked at, as
                # after a read rewrote its inode (atime) since the last snapshot.
                changed = _hash_changed(fo, fn, changed, old_size, size)
                method = "fiemap+hash"
            if unproven:  # compressed extents: the bytes decide
                changed = changed + _hash_changed(fo, fn, unproven, old_size, size)
                method = "fiemap+hash"
            new_data = cowfs.data_ranges(mn, size)
        return (*_data_and_zero(changed, new_data, size), method)
    finally:
        os.close(fo)
        os.close(fn)


def _data_and_zero(changed, new_data, size: int):
    """The changed (start, end) ranges as (offset, length) ranges of data (where the new
    file may hold data) and of zeroes (the rest)."""
    changed = [(a, b) for a, b in ((a, min(b, size)) for a, b in changed) if a < b]
    data = _runs_merge(_intersect(changed, new_data))
    zero = _runs_merge(_subtract(changed, [(a, a + n) for a, n in data]))
    return data, zero


def _hash_changed(fo: int, fn: int, ranges, old_size: int, new_size: int):
    """(start, end) block ranges within ``ranges`` whose xxh3 block hashes differ between
    the two files (a short last block shared by both: its bytes); blocks past either
    file's end count as changed."""
    bs = HASH_BLOCK
    common = min(old_size, new_size)
    out = []
    for a, b in ranges:
        a = a - a % bs
        b = min(b, new_size)
        pos = a
        while pos < b:
            n = min(HASH_SPAN, b - pos)
            hn = min(n, max(0, common - pos))
            hn -= hn % bs
            if hn:
                h1, _ = blockhash.hash_file(fo, pos, hn, bs)
                h2, _ = blockhash.hash_file(fn, pos, hn, bs)
                diff = np.flatnonzero(np.asarray(h1) != np.asarray(h2))
                out.extend((pos + int(i) * bs, pos + (int(i) + 1) * bs) for i in diff)
            if hn < n:
                tail_a, tail_b = pos + hn, pos + n
                n_tail = tail_b - tail_a
                if not (tail_b <= common and n_tail < bs and os.pread(
                        fo, n_tail, tail_a) == os.pread(fn, n_tail, tail_a)):
                    out.append((tail_a, tail_b))  # a short last block: its bytes decide
            pos += n
    return out
