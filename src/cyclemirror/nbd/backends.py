"""Export backends: what an NBD export reads from and writes to.

A backend is any object with ``size``, ``block_size``, ``read(offset, length)
-> bytes``, ``write(offset, data, fua=False)``, ``write_zeroes(offset, length,
fua=False)``, ``trim(offset, length)``, ``flush()`` and ``block_status(offset,
length) -> [(length, flags)]`` (flags: 1 hole, 2 zero), the signatures of a
store ``Volume``, except that ``write_zeroes`` also takes the keywords
``no_hole`` (keep the range allocated) and ``fast_only`` (return False, touching
nothing, where zeroing would mean writing data).  Attributes tell the server
what it may advertise (absent means no): ``readonly``; ``can_multi_conn``
(every connection sees one coherent image and a flush covers writes from all
of them); ``fast_zero`` (``fast_only`` is honoured).  Objects that are not
backends of this module (and do not set ``nbd_backend = True``), such as a
store ``Volume``, are wrapped in ``VolumeBackend`` by ``as_backend``.

The server hands ``write`` a memoryview of its receive buffer: a backend must
be done with ``data`` when ``write`` returns.  Big writes of one connection
are pipelined (cext/nbdio.pyx): a writable backend's ``write`` is called from
several threads at once, for ranges that do not overlap; every other call
comes only when no write is in flight.

Lifecycle.  A backend that sets ``per_connection = True`` belongs to the one
lookup that returned it: the server calls its ``release()`` exactly once when
it is done with it (at once after an INFO or meta-context probe, at the end of
the session after GO or EXPORT_NAME), through ``release_backend``.  Backends
without the attribute are shared and never released by the server.

Two backends live here:

* ``RawFileBackend``: a plain raw image file, read-only by default (how a
  target exports a mirror image), optionally writable.  Thread-safe without a
  lock: every call uses positioned I/O (pread/pwrite/fallocate) on one fd, and
  the kernel's page cache is shared by all connections, which is also why
  multi-conn is safe.  With ``per_connection=True`` it is one connection's
  private view (a target's mirror image pinned as of connection time): it
  then does not advertise multi-conn (two connections may hold different
  cycles) and ``release()`` closes the file and calls ``on_release`` (if the
  constructor raises, ``on_release`` is not called: the caller still owns it).
* ``VolumeBackend``: a store ``Volume`` (thread-safe itself; one object per
  name per process) with the capability attributes the server looks for.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

from cyclemirror._cext import pagewrite
from cyclemirror.errors import NotFoundError, StoreError, UsageError
from cyclemirror.extents import HOLE, ZERO, check_range
from cyclemirror.store import fileops

log = logging.getLogger("cyclemirror.nbd")

_UNSUPPORTED = fileops.FALLOCATE_UNSUPPORTED


def _check_range(what: str, name: str, size: int, offset: int, length: int) -> None:
    check_range(offset, length, size, f"{what} on {name}")


class RawFileBackend:
    """A raw image file exported as is (see the module docstring for the thread model)."""

    can_multi_conn = True

    def __init__(self, path: str | os.PathLike[str], readonly: bool = True, *,
                 block_size: int = 4096, per_connection: bool = False,
                 on_release: Callable[[], None] | None = None):
        self.path = os.fspath(path)
        self.per_connection = bool(per_connection)
        if self.per_connection:
            self.can_multi_conn = False  # each connection may hold another version of the file
        self._on_release = on_release
        self.readonly = bool(readonly)
        self.block_size = block_size
        self.fast_zero = not self.readonly
        try:
            fd = os.open(self.path, (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise NotFoundError(f"raw image {self.path} does not exist") from exc
        except OSError as exc:
            raise StoreError(f"cannot open raw image {self.path}: {exc.strerror}") from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise UsageError(f"raw image {self.path} is not a regular file")
        self._fd = fd
        self.size = st.st_size

    def __repr__(self) -> str:
        return f"RawFileBackend({self.path!r}, readonly={self.readonly})"

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def release(self) -> None:
        """The server is done with this backend: close the file, then tell the owner (once)."""
        self.close()
        callback, self._on_release = self._on_release, None
        if callback is not None:
            callback()

    def _writable(self, what: str) -> None:
        if self.readonly:
            raise PermissionError(errno.EPERM, f"{what}: raw image {self.path} is exported read-only")

    def read(self, offset: int, length: int) -> bytes:
        _check_range("read", self.path, self.size, offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            # The file shrank under us: that is damage, not zeroes.
            raise StoreError(f"raw image {self.path}: short read at {offset}+{length} "
                             f"({len(data)} bytes); was the file truncated?")
        return data

    def write(self, offset: int, data: Any, fua: bool = False) -> None:
        self._writable("write")
        view = memoryview(data).cast("B")
        _check_range("write", self.path, self.size, offset, len(view))
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)
        if fua:
            os.fdatasync(self._fd)

    def write_zeroes(self, offset: int, length: int, fua: bool = False, *,
                     no_hole: bool = False, fast_only: bool = False) -> bool:
        """Zero a range: punch a hole, or with ``no_hole`` zero it in place (stays allocated).

        Falls back to writing zero bytes only where the file system has neither;
        with ``fast_only`` it then returns False and leaves the range untouched.
        """
        self._writable("write zeroes")
        _check_range("write zeroes", self.path, self.size, offset, length)
        if length:
            ways = ((pagewrite.zero_range,) if no_hole
                    else (pagewrite.punch_hole, pagewrite.zero_range))
            for way in ways:
                try:
                    way(self._fd, offset, length)
                    break
                except OSError as exc:
                    if exc.errno not in _UNSUPPORTED:
                        raise
            else:
                if fast_only:
                    return False
                fileops.write_zero_bytes(self._fd, offset, length)
        if fua:
            os.fdatasync(self._fd)
        return True

    def trim(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads back as zeroes afterwards."""
        self._writable("trim")
        _check_range("trim", self.path, self.size, offset, length)
        # Where holes cannot be punched, zero bytes: a trim must still read back as zeroes.
        fileops.punch_hole(self._fd, offset, length)

    def flush(self) -> None:
        if not self.readonly:
            os.fsync(self._fd)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Holes (hole|zero) and data (0) from SEEK_HOLE/SEEK_DATA, covering exactly the range."""
        _check_range("block status", self.path, self.size, offset, length)
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            try:
                data_at = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but hole up to EOF
                    data_at = end
                elif exc.errno in _UNSUPPORTED or exc.errno == errno.EINVAL:
                    out.append((end - pos, 0))  # unknown: report plain data
                    break
                else:
                    raise
            if data_at > pos:
                stop = min(data_at, end)
                out.append((stop - pos, HOLE | ZERO))
                pos = stop
                continue
            try:
                hole_at = os.lseek(self._fd, pos, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                hole_at = end
            stop = min(max(hole_at, pos + 1), end)
            out.append((stop - pos, 0))
            pos = stop
        return out


class VolumeBackend:
    """A store Volume as an export.

    The store keeps zeroed and trimmed ranges in its own bitmaps, so zeroing
    never writes data (``fast_zero``) and every connection shares the one
    Volume object per name (``can_multi_conn``).  A ``readonly`` view refuses
    writes with EPERM.
    """

    can_multi_conn = True

    def __init__(self, volume: Any, readonly: bool = False):
        self.volume = volume
        self.name = getattr(volume, "name", repr(volume))
        self.size = volume.size
        self.block_size = volume.block_size
        self.readonly = bool(readonly)
        self.fast_zero = not self.readonly
        # Bound once: the request loop calls these directly.
        self.read = volume.read
        self.block_status = volume.block_status
        if not self.readonly:
            self.write = volume.write
            self.trim = volume.trim
            self.flush = volume.flush

    def __repr__(self) -> str:
        return f"VolumeBackend({self.name!r}, readonly={self.readonly})"

    def _refuse(self, what: str) -> None:
        raise PermissionError(errno.EPERM, f"{what}: volume {self.name} is exported read-only")

    def write(self, offset: int, data: Any, fua: bool = False) -> None:  # replaced when writable
        self._refuse("write")

    def trim(self, offset: int, length: int) -> None:  # replaced when writable
        self._refuse("trim")

    def flush(self) -> None:  # replaced when writable
        pass

    def write_zeroes(self, offset: int, length: int, fua: bool = False, *,
                     no_hole: bool = False, fast_only: bool = False) -> bool:
        # The store records zeroes in its bitmaps and decides allocation itself (a
        # redirect-on-write overlay has no fixed allocation to keep), so no_hole is moot
        # and zeroing never degrades to a data write beyond the partial edge blocks.
        if self.readonly:
            self._refuse("write zeroes")
        self.volume.write_zeroes(offset, length, fua)
        return True


def as_backend(obj: Any) -> Any:
    """What the server serves for a lookup result: our backends as they are, anything
    else with the Volume signatures (a store Volume) wrapped in a VolumeBackend."""
    if isinstance(obj, (RawFileBackend, VolumeBackend)) or getattr(obj, "nbd_backend", False):
        return obj
    return VolumeBackend(obj, readonly=bool(getattr(obj, "readonly", False)))


def release_backend(backend: Any) -> None:
    """Give back a lookup result the server no longer needs (only ``per_connection`` ones).

    A failing release is logged, never raised: it must not end other work of
    the connection thread, and the owner's own bookkeeping says what leaked.
    """
    if backend is None or not getattr(backend, "per_connection", False):
        return
    try:
        backend.release()
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("nbd: releasing backend %r failed", backend)
