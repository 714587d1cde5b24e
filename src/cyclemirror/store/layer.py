"""One layer of a volume: the base image, or one overlay with its bitmaps and zero log.

An overlay file is sparse and as large as the volume; a block is in the
overlay when its ``dirty`` bit is set. Every dirty block is either fully
allocated in the file (data) or a hole listed in ``zeroed`` (reads as zeroes
because holes do). Keeping that "whole block or nothing" shape is what lets
recovery rebuild the bitmaps from the file's allocation map (see
``recover_overlay``) and spot a write torn by a crash: a block that is only
partly allocated.

Lifetime: a layer is shared by the view and by frozen readers. ``acquire``
and ``release`` count readers outside the volume lock; ``retire`` (after a
merge) closes the files once the last user releases. ``_ref_lock`` guards the
count only.
"""

from __future__ import annotations

import os
import threading

from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.errors import StoreError
from cyclemirror.store import fileops
from cyclemirror.store.zerolog import ZeroLog


def overlay_paths(vol_dir: str, number: int) -> tuple[str, str]:
    return (
        os.path.join(vol_dir, f"overlay-{number}.img"),
        os.path.join(vol_dir, f"overlay-{number}.zlog"),
    )


class Layer:
    """A file the view reads through; ``number`` is None for base."""

    def __init__(self, number: int | None, path: str, fd: int, nblocks: int, zlog: ZeroLog | None):
        self.number = number
        self.path = path
        self.fd = fd
        self.zlog = zlog
        self.dirty = ExtentBitmap(nblocks)
        self.zeroed = ExtentBitmap(nblocks)
        self.has_zeroed = False  # lets a plain write skip clearing zeroed bits
        self.closed_at: float | None = None  # freeze time of the cycle that froze this overlay
        self.synced = True  # False between a freeze and the fsync of the frozen overlay
        self._ref_lock = threading.Lock()
        self._users = 0
        self._retired = False
        self._closed = False

    @property
    def is_base(self) -> bool:
        return self.number is None

    # -- creation and opening -------------------------------------------------

    @classmethod
    def open_base(cls, path: str) -> Layer:
        # Base has no bitmaps: it holds every block no overlay holds.
        return cls(None, path, os.open(path, os.O_RDWR), 0, None)

    @classmethod
    def create_overlay(cls, vol_dir: str, number: int, size: int, nblocks: int) -> Layer:
        """Make a new empty overlay on disk (file and zero log fsynced, directory too)."""
        img, zpath = overlay_paths(vol_dir, number)
        for stale in (img, zpath):  # leftovers of a freeze that crashed before committing
            if os.path.exists(stale):
                os.unlink(stale)
        try:
            fd = os.open(img, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            os.ftruncate(fd, size)
            os.fsync(fd)
            zlog = ZeroLog.create(zpath)
            fileops.fsync_dir(vol_dir)
        except OSError as exc:
            raise fileops.store_error(f"creating overlay {number} in {vol_dir}", exc) from exc
        return cls(number, img, fd, nblocks, zlog)

    @classmethod
    def open_overlay(cls, vol_dir: str, number: int, size: int, nblocks: int) -> Layer:
        img, zpath = overlay_paths(vol_dir, number)
        try:
            fd = os.open(img, os.O_RDWR)
        except FileNotFoundError as exc:
            raise StoreError(
                f"overlay {number} of volume {vol_dir} is listed in its state but {img} is missing; "
                "the volume is damaged (restore it from a mirror)"
            ) from exc
        if os.fstat(fd).st_size != size:
            os.close(fd)
            raise StoreError(f"overlay file {img} is not {size} bytes long; the volume is damaged")
        try:
            zlog = ZeroLog.open(zpath)
        except FileNotFoundError as exc:
            os.close(fd)
            # Without it, zeroed blocks would look untouched and older data would reappear.
            raise StoreError(
                f"overlay {number} of volume {vol_dir} has no zero log {zpath}; the volume is "
                "damaged (restore it from a mirror)"
            ) from exc
        return cls(number, img, fd, nblocks, zlog)

    # -- sharing ----------------------------------------------------------------

    def acquire(self) -> None:
        with self._ref_lock:
            if self._closed:
                raise StoreError(f"layer {self.path} is already closed")
            self._users += 1

    def release(self) -> None:
        with self._ref_lock:
            self._users -= 1
            close_now = self._retired and self._users == 0
        if close_now:
            self._close_files()

    def retire(self) -> None:
        """No new users; close the files when the last current one releases."""
        with self._ref_lock:
            self._retired = True
            close_now = self._users == 0
        if close_now:
            self._close_files()

    def _close_files(self) -> None:
        with self._ref_lock:
            if self._closed:
                return
            self._closed = True
        os.close(self.fd)
        if self.zlog is not None:
            self.zlog.close()

    def unlink(self, image: bool = True) -> None:
        """Remove this overlay's files (open descriptors stay valid until closed); with
        ``image=False`` only its zero log (a swap merge renamed the image to base)."""
        for path in (self.path if image else None, self.zlog.path if self.zlog else None):
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
