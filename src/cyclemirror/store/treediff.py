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
4. ``symlink PATH -> REF`` (new, or a new target).
5. ``link PATH <- REF``: a hard link to ``REF`` of the *new* version, for
   every further name of an inode whose content was just written, or a name
   that is new for an unchanged inode.
6. ``meta PATH``: a file or symlink whose only change is its mode, owner or
   mtime (a hard-linked inode's metadata goes with its first name).

Every op carries the new mode (permission bits), uid, gid and mtime (ns) of
its path, where they apply.  Atimes are not mirrored.  Sockets, FIFOs and
device nodes are not mirrored: ``TreeDelta.skipped`` lists them.  Names must
be UTF-8 (the wire carries text); another name is a StoreError naming it.
"""

from __future__ import annotations

import errno
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from cyclemirror._cext import blockhash
from cyclemirror.errors import StoreError
from cyclemirror.store import cowfs

HASH_BLOCK = 4096
HASH_SPAN = 64 << 20  # bytes hashed per call


class Entry(NamedTuple):
    """What a walk saw at one path (lstat, never following a symlink)."""

    kind: str  # "dir", "file", "symlink" or "other"
    mode: int  # permission bits
    uid: int
    gid: int
    mtime_ns: int
    size: int
    ino: int
    ctime_ns: int = 0  # moves with every change of the inode; nobody can set it back
    target: str = ""  # a symlink's target


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
    data: list[tuple[int, int]] = field(default_factory=list)  # (offset, length)
    zero: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class TreeDelta:
    ops: list[TreeOp]
    skipped: list[str]  # sockets, FIFOs, device nodes: not mirrored
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


def walk(root: str) -> dict[str, Entry]:
    """Every path under ``root`` (relative, "/"-separated; "." for the root) -> Entry."""
    out: dict[str, Entry] = {".": _entry(os.lstat(root), "")}
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        with os.scandir(abs_dir) as it:
            for de in it:
                rel = _utf8(f"{rel_dir}/{de.name}" if rel_dir else de.name, root)
                st = de.stat(follow_symlinks=False)
                target = os.readlink(de.path) if stat.S_ISLNK(st.st_mode) else ""
                e = out[rel] = _entry(st, _utf8(target, root))
                if e.kind == "dir":
                    stack.append((rel, de.path))
    return out


def _entry(st: os.stat_result, target: str) -> Entry:
    m = st.st_mode
    kind = ("dir" if stat.S_ISDIR(m) else "file" if stat.S_ISREG(m)
            else "symlink" if stat.S_ISLNK(m) else "other")
    return Entry(kind, stat.S_IMODE(m), st.st_uid, st.st_gid, st.st_mtime_ns,
                 st.st_size if kind == "file" else 0, st.st_ino, st.st_ctime_ns, target)


def _key(path: str) -> str:
    """Sorts paths as their tuples of components would (parents first, a directory's
    subtree together): NUL is below every character a name can hold."""
    return "" if path == "." else path.replace("/", "\0")


def _parent(path: str) -> str:
    return path.rpartition("/")[0] or "."


def _meta(e: Entry) -> tuple:
    return (e.mode, e.uid, e.gid, e.mtime_ns)


def _op(op: str, path: str, e: Entry, ref: str = "") -> TreeOp:
    return TreeOp(op, path, ref, e.mode, e.uid, e.gid, e.mtime_ns,
                  e.size if op in ("file", "patch") else 0)


def tree_delta(old_root: str | None, new_root: str,
               old_walk: dict[str, Entry] | None = None) -> TreeDelta:
    """The ops that turn snapshot ``old_root`` (None: an empty tree) into ``new_root``.

    ``old_walk`` is ``walk(old_root)`` if the caller kept it (the previous delta's
    ``new_walk``: a snapshot never changes), else both are walked, side by side."""
    if old_root is None:
        old, new = {}, walk(new_root)
    elif old_walk is not None:
        old, new = old_walk, walk(new_root)
    else:
        with ThreadPoolExecutor(2) as pool:  # lstat lets go of the GIL
            old_f = pool.submit(walk, old_root)
            new = walk(new_root)
            old = old_f.result()
    delta = TreeDelta([], sorted(p for p, e in new.items() if e.kind == "other"),
                      new_walk=new)
    ops = delta.ops
    # 1. deletes: gone, or the kind changed (a directory must go before a file takes its
    # name, and the reverse); only the topmost of each deleted subtree.
    gone = set()
    old_order = sorted(old, key=_key)
    for p in old_order:
        o, n = old[p], new.get(p)
        if p != "." and (n is None or n.kind != o.kind) and o.kind != "other":
            if _parent(p) not in gone:
                ops.append(TreeOp("rm", p))
            gone.add(p)
    order = sorted(new, key=_key)
    # 2. directories, parents first
    for p in order:
        n = new[p]
        if n.kind == "dir":
            o = old.get(p)
            if o is None or o.kind != "dir" or _meta(o) != _meta(n):
                ops.append(_op("dir", p, n))
    # 3. regular files: one content op per inode, at its first name
    old_names: dict[int, list[str]] = {}
    for p in old_order:
        if old[p].kind == "file":
            old_names.setdefault(old[p].ino, []).append(p)
    new_names: dict[int, list[str]] = {}
    for p in order:
        if new[p].kind == "file":
            new_names.setdefault(new[p].ino, []).append(p)
    links: list[TreeOp] = []
    metas: list[TreeOp] = []
    for ino, names in new_names.items():
        first, n = names[0], new[names[0]]
        base = None
        if ino in old_names:
            base = first if first in old_names[ino] else old_names[ino][0]
        elif first in old and old[first].kind == "file":
            base = first  # replaced by a new file (write and rename over): compare anyway
        written = True
        if base is None:
            op = _op("file", first, n)
            op.data = _data_ranges(os.path.join(new_root, first), n.size)
            delta.methods["new"] = delta.methods.get("new", 0) + 1
            ops.append(op)
        elif base == first and old[base].ino == ino and old[base].ctime_ns == n.ctime_ns \
                and old[base] == n:
            # The same inode, untouched since the last freeze (a snapshot keeps the
            # inode, its ctime moves with every write, chmod or link): nothing to compare.
            written = False
        else:
            o = old[base]
            data, zero, method = changed_content(os.path.join(old_root, base),
                                                 os.path.join(new_root, first), n.size)
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
    # 4. symlinks
    for p in order:
        n = new[p]
        if n.kind != "symlink":
            continue
        o = old.get(p)
        if o is None or o.kind != "symlink" or o.target != n.target:
            ops.append(_op("symlink", p, n, n.target))
        elif (o.uid, o.gid, o.mtime_ns) != (n.uid, n.gid, n.mtime_ns):
            metas.append(_op("meta", p, n))
    # 5. further names of inodes, 6. metadata only
    ops.extend(links)
    ops.extend(metas)
    return delta


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


def changed_content(old_path: str, new_path: str, size: int):
    """(data, zero, method): the (offset, length) ranges of the new file (``size``
    bytes) to ship as data and to zero, so that the old file truncated or grown to
    ``size`` becomes the new one; ``method`` "fiemap", "fiemap+hash" or "hash"."""
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
            if unproven:  # compressed extents: the bytes decide
                changed = changed + _hash_changed(fo, fn, unproven, old_size, size)
                method = "fiemap+hash"
            new_data = cowfs.data_ranges(mn, size)
        changed = [(a, b) for a, b in ((a, min(b, size)) for a, b in changed) if a < b]
        data = _runs_merge(_intersect(changed, new_data))
        zero = _runs_merge(_subtract(changed, [(a, a + n) for a, n in data]))
        return data, zero, method
    finally:
        os.close(fo)
        os.close(fn)


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
