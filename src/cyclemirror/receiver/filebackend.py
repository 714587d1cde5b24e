"""The file backend: each member's mirror image is a raw file ``<volume>.img``.

A full cycle is built in ``<volume>.img.new`` (``imagewriter``: O_DIRECT
where the file system allows) and renamed over ``.img`` at apply.  A delta is
replayed in place while no reader holds a pin (``readers.IMAGE_PINS``; new
readers wait), else into a sparse clone ``<volume>.img.apply`` renamed over
``.img`` afterwards, so each pinned reader keeps the cycle it opened.  The
interface is described in ``receiver.backend``.
"""

from __future__ import annotations

import logging
import os
import time

from cyclemirror._cext import frames
from cyclemirror.errors import StoreError
from cyclemirror.receiver import fileops
from cyclemirror.receiver.imagewriter import ImageWriter
from cyclemirror.receiver.readers import IMAGE_PINS

log = logging.getLogger(__name__)


class FileBackend:
    kind = "file"
    keeps_files = True
    resizes = True  # a cycle may change an image's size (DeltaApply.resize)  # scrub, verify, promote and clone read the image files

    def __init__(self, directory: str, state):
        self.directory = directory
        self.state = state

    def image_path(self, index: int) -> str:
        return os.path.join(self.directory, self.state.volumes[index].name + ".img")

    def new_image_path(self, index: int) -> str:
        return self.image_path(index) + ".new"

    def clone_path(self, index: int) -> str:
        return self.image_path(index) + ".apply"

    def _members(self) -> range:
        return range(len(self.state.volumes))

    def images_present(self) -> bool:
        return all(os.path.exists(self.image_path(i)) for i in self._members())

    def check_sizes(self) -> None:
        for i in self._members():
            size = os.path.getsize(self.image_path(i))
            if size != self.state.volumes[i].size:
                raise StoreError(f"mirror image {self.image_path(i)} is {size} bytes, "
                                 f"expected {self.state.volumes[i].size}; re-seed it")

    # -- full cycles ---------------------------------------------------------
    def full_writer(self, index: int, size: int) -> ImageWriter:
        return ImageWriter(self.new_image_path(index), size)

    def full_present(self) -> bool:
        return all(os.path.exists(self.new_image_path(i)) for i in self._members())

    def discard_full(self) -> None:
        for i in self._members():
            _unlink(self.new_image_path(i))

    def install_full(self, cycle: int) -> None:
        for i in self._members():
            if os.path.exists(self.new_image_path(i)):
                fd = os.open(self.new_image_path(i), os.O_RDWR)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(self.new_image_path(i), self.image_path(i))
        fileops.fsync_dir(self.directory)

    # -- deltas ----------------------------------------------------------------
    def discard_partial_apply(self) -> None:
        for i in self._members():
            _unlink(self.clone_path(i))  # a clone left by a crash before its commit

    def open_delta(self, cycle: int, state_path: str, recovering: bool) -> FileDeltaApply:
        st = self.state
        in_place = IMAGE_PINS.start_in_place(state_path)
        if in_place:
            paths = [self.image_path(i) for i in self._members()]
            self.discard_partial_apply()  # left by a crash inside a cloned apply
        else:
            paths = [self.clone_path(i) for i in self._members()]
            t0 = time.monotonic()
            for i in self._members():
                fileops.copy_sparse(self.image_path(i), paths[i])
            # Worth a line: the copy costs time and room an operator may wonder about.
            log.info("mirror %s: readers hold the image; cycle %d is applied into a copy "
                     "(made in %.2fs)", st.mirror, cycle, time.monotonic() - t0)
        return FileDeltaApply(self, paths, in_place)

    def applied(self, cycle: int) -> None:
        pass  # the renamed or rewritten files are the consistent copy

    def after_state_saved(self, cycle: int) -> None:
        pass

    # -- group membership ----------------------------------------------------
    def new_member(self, name: str, size: int) -> None:
        fd = os.open(os.path.join(self.directory, name + ".img"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, 0)  # a leftover of a crashed change: zeros again
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def members_changed(self) -> None:
        fileops.fsync_dir(self.directory)

    def remove_member(self, name: str) -> None:
        from cyclemirror.receiver.removal import remove_member_files

        remove_member_files(self.directory, name)

    def describe(self) -> dict:
        return {"backend": "file",
                "images": [self.image_path(i) for i in self._members()]}

    def close(self) -> None:
        pass


class FileDeltaApply:
    """Replays one delta into the image files (or their clones)."""

    def __init__(self, backend: FileBackend, paths: list[str], in_place: bool):
        self.backend = backend
        self.paths = paths
        self.in_place = in_place
        self.fds: list[int] = []
        try:
            for path in paths:
                self.fds.append(os.open(path, os.O_RDWR))
        except BaseException:
            self.close()
            raise

    def write(self, member: int, data, offset: int) -> None:
        fileops.pwrite_all(self.fds[member], data, offset)

    def zero(self, member: int, offset: int, length: int) -> None:
        fileops.punch_zeroes(self.fds[member], offset, length)

    def resize(self, member: int, size: int) -> None:
        """The image takes cycle's size first (a shrink drops its tail, a growth adds a
        hole); idempotent, like the records replayed after it."""
        os.ftruncate(self.fds[member], size)

    def scatter(self, member: int, raw, volume_size: int, block_size: int) -> None:
        frames.scatter_write(self.fds[member], raw, volume_size, block_size)

    @property
    def visible_before_finish(self) -> bool:
        """Writes in place are in the image readers open at once; a clone's only after
        ``finish`` renames it in."""
        return self.in_place

    def finish(self) -> None:
        """Everything durable; a clone replaces its image."""
        for fd in self.fds:
            os.fsync(fd)
        self.close()
        if not self.in_place:
            for i, path in enumerate(self.paths):
                os.replace(path, self.backend.image_path(i))
            fileops.fsync_dir(self.backend.directory)

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
