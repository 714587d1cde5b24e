"""Durable small-file replacement: the one "temp file, fsync, rename, fsync directory".

Every state file of the package (a volume's ``volume.json``, the store's
``store.json``, a group freeze intent, the daemon's mirror book, the
source's driver state, a target's mirror journal, a saved extent bitmap) is
replaced through ``atomic_write``, so a crash at any instant leaves either
the whole old file or the whole new one under ``path``, never a mix, and a
returned call means the new one is on disk (the directory entry too).

The temporary file is a unique name beside ``path`` (``PATH.tmp-PID-RANDOM``,
created exclusively), so two writers never write into one temp file; it is
removed again if anything fails before the rename.  A crash can leave one
behind: harmless, as no reader looks at that name.

A leaf like ``errors``: it imports nothing from the package, so every
layer, the compiled modules in ``cyclemirror._cext`` included, can use it.
"""

from __future__ import annotations

import os
import secrets

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the directory entries of ``path`` (created, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data, mode: int = 0o600) -> None:
    """Replace ``path`` with the bytes-like ``data``: afterwards it holds all of it, durably.

    ``mode`` is the new file's permission bits (before the umask); the default
    keeps a daemon's state to its owner, files meant for others say 0o644.  Raises
    OSError (the caller names the file in its own error); ``path`` is then
    untouched.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
