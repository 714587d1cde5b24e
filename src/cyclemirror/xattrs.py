"""Extended attributes of a tree's entries: which are mirrored, their limits, read and set.

A tree object mirrors the extended attributes of every directory, file,
symlink, FIFO and device node in these namespaces (docs/trees.md):

* ``user.*``, ``trusted.*`` (seen only by root), ``security.*`` (file
  capabilities, SELinux and other labels);
* ``system.posix_acl_access`` and ``system.posix_acl_default``: POSIX ACLs,
  which the kernel keeps as these two attributes (what ``getfacl`` shows).

Others (``btrfs.*`` properties, other ``system.*`` names) are not mirrored.
An entry's attributes travel as a complete set: the target gives the entry
exactly those, removing any other of these namespaces it has.

Limits, the same on both sides (``check_xattrs`` says what is wrong): a name
of at most 255 bytes, its namespace one of the above and something after the
prefix; a value of at most 64 KiB (Linux's own ``XATTR_SIZE_MAX``); at most
``MAX_COUNT`` attributes and ``MAX_TOTAL`` bytes of names and values on one
entry, so that one entry's set fits in one control message.

A leaf like ``errors``: it imports nothing from the package but ``errors``.
"""

from __future__ import annotations

import errno
import os

from cyclemirror.errors import StoreError

PREFIXES = ("user.", "trusted.", "security.")
ACLS = ("system.posix_acl_access", "system.posix_acl_default")
MAX_NAME = 255  # bytes, XATTR_NAME_MAX
MAX_VALUE = 64 << 10  # bytes, XATTR_SIZE_MAX
MAX_COUNT = 128
MAX_TOTAL = 512 << 10  # names and values of one entry, before base64

Xattrs = tuple[tuple[str, bytes], ...]  # sorted by name


def mirrored(name: str) -> bool:
    """Whether an attribute of this name is mirrored (its namespace is known)."""
    if name in ACLS:
        return True
    return name.startswith(PREFIXES) and name not in PREFIXES


def check_xattrs(pairs, what: str) -> str | None:
    """Why ``pairs`` ((name, value) ...) is not a set we mirror, or None if it is."""
    total = 0
    seen = set()
    if len(pairs) > MAX_COUNT:
        return f"{what}: {len(pairs)} extended attributes, more than {MAX_COUNT}"
    for name, value in pairs:
        try:
            raw = name.encode("utf-8")
        except UnicodeEncodeError:
            return f"{what}: an extended attribute's name {name[:80]!r} is not UTF-8"
        if not mirrored(name) or "\0" in name:
            return (f"{what}: extended attribute {name[:80]!r} is not in a mirrored "
                    f"namespace ({', '.join(PREFIXES)} or {' / '.join(ACLS)})")
        if len(raw) > MAX_NAME:
            return f"{what}: extended attribute name {name[:80]!r}... is over {MAX_NAME} bytes"
        if len(value) > MAX_VALUE:
            return (f"{what}: extended attribute {name!r} holds {len(value)} bytes, "
                    f"more than {MAX_VALUE}")
        if name in seen:
            return f"{what}: extended attribute {name!r} is given twice"
        seen.add(name)
        total += len(raw) + len(value)
    if total > MAX_TOTAL:
        return f"{what}: its extended attributes hold {total} bytes, more than {MAX_TOTAL}"
    return None


def read(fd_or_path, what: str) -> Xattrs:
    """The mirrored attributes of an open file or of a path (never following a symlink
    at its end), sorted by name.  A file system without attributes has none; a set
    past the limits is a StoreError naming ``what`` (the path)."""
    is_path = not isinstance(fd_or_path, int)
    kw = {"follow_symlinks": False} if is_path else {}
    try:
        names = os.listxattr(fd_or_path, **kw)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise
    if not names:
        return ()
    out = []
    for name in sorted(names):
        if not mirrored(name):
            continue
        try:
            out.append((name, os.getxattr(fd_or_path, name, **kw)))
        except OSError as exc:
            if exc.errno == errno.ENODATA:  # removed meanwhile (a live tree)
                continue
            raise
    why = check_xattrs(out, what)
    if why:
        raise StoreError(f"{why}; the tree mirror cannot carry it: remove or shorten it")
    return tuple(out)


def apply(fd_or_path, want: Xattrs, what: str) -> None:
    """Give an open file, or a path (never following a symlink at its end; a caller's
    ``/proc/self/fd/N/leaf`` for an entry in directory N), exactly the mirrored
    attributes ``want``: set those that differ, remove the others of the mirrored
    namespaces.  A refusal is a StoreError naming ``what`` and the attribute."""
    is_path = not isinstance(fd_or_path, int)
    kw = {"follow_symlinks": False} if is_path else {}
    have = dict(read(fd_or_path, what))
    wanted = dict(want)
    name_now = ""
    try:
        for name in have:
            if name not in wanted:
                name_now = name
                try:
                    os.removexattr(fd_or_path, name, **kw)
                except OSError as exc:
                    if exc.errno != errno.ENODATA:
                        raise
        for name, value in want:
            name_now = name
            if have.get(name) != value:
                os.setxattr(fd_or_path, name, value, 0, **kw)
    except OSError as exc:
        hint = ""
        if exc.errno in (errno.EPERM, errno.EACCES) and not name_now.startswith("user."):
            hint = ("; trusted.*, security.* and ACLs of files one does not own need the "
                    "target daemon to run as root")
        elif exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            hint = ("; the target's file system does not take it (mount it with xattr/acl "
                    "support)")
        raise StoreError(f"{what}: setting extended attribute {name_now!r} failed: "
                         f"{exc.strerror}{hint}") from None

