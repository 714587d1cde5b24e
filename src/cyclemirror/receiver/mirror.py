"""One mirror on the target: receive a delta durably, then apply it all-or-none.

A mirror is a single volume or a consistency group of one source node; it
lives in ``STORE/mirrors/<source node id>/`` as raw images ``<volume>.img``
and one state file (see ``state``).  The life of a cycle:

  begin      -> state.pending = {cycle, chunks 0}; a full cycle creates
                ``<volume>.img.new`` (sparse) and writes into it directly
                (``imagewriter``: O_DIRECT where the file system allows), so
                the first cycle never needs room for a second full copy plus
                a staged one; a delta cycle appends to the staging log.
  receive    -> every record was already verified by the session (frame
                checksums); it is written, not yet acknowledged.
  checkpoint -> fdatasync, then state.pending.chunks = N: the source may
                resume after chunk N, and we say so in an ack.
  finish     -> all chunks present: state.committed (the commit point), then
                redo: a delta is replayed from staging into the images, a full
                cycle renames ``.img.new`` over ``.img``; fsync; state.applied.

Readers (``readers.IMAGE_PINS``, e.g. the daemon's read-only NBD export of an
image) pin the image they opened.  A delta is replayed in place only while
nobody holds a pin (new readers wait for it); otherwise into a sparse clone
``<volume>.img.apply`` that is then renamed over ``.img``, so every reader
keeps the one applied cycle it opened.  A crash leaves ``.img`` untouched in
that case, and redo (idempotent: records are absolute) starts again.

Recovery (on every open) redoes a committed cycle and keeps a pending one for
resume; the image files are only ever touched by redo of a committed cycle,
so after any crash each image equals the source at some freeze instant, and
all members of a group at the same one.

Not thread-safe: the server lends a Mirror to one session at a time.
"""

from __future__ import annotations

import logging
import os
import time

from cyclemirror import failpoints
from cyclemirror.errors import ProtocolError, StoreError
from cyclemirror.receiver import fileops
from cyclemirror.receiver.imagewriter import ImageWriter
from cyclemirror.receiver.readers import IMAGE_PINS
from cyclemirror.receiver.staging import (
    REC_DATA,
    REC_TRIM,
    REC_ZERO,
    StagingWriter,
    read_records,
)
from cyclemirror.receiver.state import InFlight, MirrorState, VolumeSpec

log = logging.getLogger(__name__)


class Mirror:
    def __init__(self, directory: str, state: MirrorState, state_path: str, max_chunk: int):
        self.directory = directory
        self.state = state
        self.state_path = state_path
        self.max_chunk = max_chunk
        self._staging: StagingWriter | None = None
        self._new_images: list[ImageWriter] = []
        self._received = 0  # chunks received in the in-flight cycle (acked or not)
        self.recover()

    # -- paths -----------------------------------------------------------
    def image_path(self, index: int) -> str:
        return os.path.join(self.directory, self.state.volumes[index].name + ".img")

    def new_image_path(self, index: int) -> str:
        return self.image_path(index) + ".new"

    def clone_path(self, index: int) -> str:
        return self.image_path(index) + ".apply"

    @property
    def staging_path(self) -> str:
        suffix = ".group.staging" if self.state.group else ".staging"
        return os.path.join(self.directory, self.state.mirror + suffix)

    @staticmethod
    def state_file(directory: str, mirror: str, group: bool) -> str:
        return os.path.join(directory, mirror + (".group.json" if group else ".state.json"))

    @classmethod
    def open(cls, root: str, source_node: str, source_name: str | None, mirror: str,
             group: bool, volumes: list[VolumeSpec], max_chunk: int) -> Mirror:
        """Open (recovering) or create the mirror; refuse a geometry change."""
        directory = os.path.join(root, "mirrors", source_node)
        os.makedirs(directory, exist_ok=True)
        path = cls.state_file(directory, mirror, group)
        if os.path.exists(path):
            state = MirrorState.load(path)
            old = [(v.name, v.size, v.block_size) for v in state.volumes]
            new = [(v.name, v.size, v.block_size) for v in volumes]
            if old != new:
                raise ProtocolError(
                    f"mirror {mirror!r} of source {source_node}: the source now sends "
                    f"volumes {new} but this target holds {old}; a size or block-size "
                    f"change needs a new mirror (remove {directory}/{mirror}.* to re-seed)"
                )
            state.source_name = source_name
        else:
            state = MirrorState(mirror, group, source_node, source_name, list(volumes))
            state.save(path)
        return cls(directory, state, path, max_chunk)

    @property
    def has_image(self) -> bool:
        return self.state.applied_cycle > 0 and all(
            os.path.exists(self.image_path(i)) for i in range(len(self.state.volumes))
        )

    # -- recovery --------------------------------------------------------
    def recover(self) -> None:
        st = self.state
        if st.committed is not None:
            with IMAGE_PINS.applying(self.state_path, recovering=True):
                self._redo(st.committed)
        else:
            for i in range(len(st.volumes)):
                _unlink(self.clone_path(i))  # a clone left by a crash before its commit
        if st.pending is not None:
            ok = True
            if st.pending.full:
                ok = all(os.path.exists(self.new_image_path(i)) for i in range(len(st.volumes)))
            else:
                ok = (os.path.exists(self.staging_path)
                      and os.path.getsize(self.staging_path) >= st.pending.staged_bytes)
            if not ok:
                self._discard_pending()
        for i in range(len(st.volumes)):
            if st.applied_cycle > 0:
                size = os.path.getsize(self.image_path(i))
                if size != st.volumes[i].size:
                    raise StoreError(f"mirror image {self.image_path(i)} is {size} bytes, "
                                     f"expected {st.volumes[i].size}; re-seed it")

    def _discard_pending(self) -> None:
        self._close_inflight()
        for i in range(len(self.state.volumes)):
            _unlink(self.new_image_path(i))
        _unlink(self.staging_path)
        self.state.pending = None
        self.state.save(self.state_path)

    def _close_inflight(self) -> None:
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        for writer in self._new_images:
            writer.close()
        self._new_images = []

    # -- receiving -------------------------------------------------------
    def begin(self, cycle: int, freeze_time: float, full: bool, resume_from: int) -> int:
        """Start or resume receiving ``cycle``; return the chunk count we hold."""
        st = self.state
        if cycle <= st.applied_cycle:
            raise ProtocolError(f"mirror {st.mirror!r}: cycle {cycle} is not newer than the "
                                f"applied cycle {st.applied_cycle}")
        if not full and not self.has_image:
            raise ProtocolError(f"mirror {st.mirror!r}: a delta cycle needs an image; this "
                                "target has none (the source must send a full cycle)")
        p = st.pending
        if resume_from:
            if p is None or (p.cycle, p.full, p.chunks) != (cycle, full, resume_from):
                raise ProtocolError(
                    f"mirror {st.mirror!r}: cannot resume cycle {cycle} at chunk "
                    f"{resume_from}; this target holds "
                    + ("nothing in flight" if p is None else f"cycle {p.cycle} at {p.chunks}")
                )
        elif p is not None:
            self._discard_pending()
            p = None
        self._close_inflight()
        if p is None:
            p = st.pending = InFlight(cycle, freeze_time, full)
            st.save(self.state_path)
        if full:
            for i, vol in enumerate(st.volumes):
                self._new_images.append(ImageWriter(self.new_image_path(i), vol.size))
        else:
            self._staging = StagingWriter(self.staging_path, p.staged_bytes)
        self._received = p.chunks
        return p.chunks

    def check_extent(self, member: int, offset: int, length: int) -> None:
        vols = self.state.volumes
        if not 0 <= member < len(vols):
            raise ProtocolError(f"mirror {self.state.mirror!r}: member {member} does not exist")
        if offset < 0 or length < 0 or offset + length > vols[member].size:
            raise ProtocolError(
                f"mirror {self.state.mirror!r}: extent {offset}+{length} lies outside volume "
                f"{vols[member].name!r} of {vols[member].size} bytes"
            )

    def receive(self, kind: int, member: int, offset: int, length: int,
                data: bytes | None = None, checksum: int | None = None) -> None:
        """Take one verified chunk (REC_DATA with data, or REC_ZERO / REC_TRIM).

        ``checksum``: the verified xxh3-64 of ``data`` if the caller has it
        (the staging log records it instead of hashing the data again).
        """
        if self.state.pending is None:
            raise ProtocolError(f"mirror {self.state.mirror!r}: data before 'begin'")
        self.check_extent(member, offset, length)
        if self.state.pending.full:
            image = self._new_images[member]
            if kind == REC_DATA:
                image.write(data, offset)
            else:
                image.punch(offset, length)
        else:
            self._staging.append(kind, member, offset, length, data, checksum)
        self._received += 1

    def checkpoint(self) -> int:
        """Make everything received durable and acknowledgeable; return the chunk count."""
        p = self.state.pending
        if p is None:
            raise ProtocolError(f"mirror {self.state.mirror!r}: nothing in flight")
        if p.chunks == self._received:
            return p.chunks
        if p.full:
            for image in self._new_images:
                image.sync()
        else:
            self._staging.sync()
            p.staged_bytes = self._staging.size
        p.chunks = self._received
        self.state.save(self.state_path)
        return p.chunks

    def finish(self, cycle: int, chunks: int) -> tuple[int, float]:
        """All chunks sent: commit and apply; return (applied cycle, freeze time)."""
        p = self.state.pending
        if p is None or p.cycle != cycle:
            raise ProtocolError(f"mirror {self.state.mirror!r}: 'end' of cycle {cycle}, "
                                "which is not in flight")
        if chunks != self._received:
            raise ProtocolError(
                f"mirror {self.state.mirror!r}: source says cycle {cycle} has {chunks} "
                f"chunks, we received {self._received}; nothing applied"
            )
        self.checkpoint()
        self._close_inflight()
        # Readers opening the image from now on know an apply is under way (not a crash).
        with IMAGE_PINS.applying(self.state_path):
            # The commit point: from here recovery completes the apply.
            self.state.committed, self.state.pending = p, None
            self.state.save(self.state_path)
            self._redo(p)
        return self.state.applied_cycle, self.state.freeze_time

    def _redo(self, c: InFlight) -> None:
        """Apply committed cycle ``c``; idempotent, so recovery may run it again."""
        st = self.state
        if c.full:
            for i in range(len(st.volumes)):
                if os.path.exists(self.new_image_path(i)):
                    fd = os.open(self.new_image_path(i), os.O_RDWR)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.replace(self.new_image_path(i), self.image_path(i))
            fileops.fsync_dir(self.directory)
        else:
            in_place = IMAGE_PINS.start_in_place(self.state_path)
            if in_place:
                paths = [self.image_path(i) for i in range(len(st.volumes))]
                for i in range(len(st.volumes)):
                    _unlink(self.clone_path(i))  # left by a crash inside a cloned apply
            else:
                paths = [self.clone_path(i) for i in range(len(st.volumes))]
                t0 = time.monotonic()
                for i in range(len(st.volumes)):
                    fileops.copy_sparse(self.image_path(i), paths[i])
                # Worth a line: the copy costs time and room an operator may wonder about.
                log.info("mirror %s: readers hold the image; cycle %d is applied into a copy "
                         "(made in %.2fs)", st.mirror, c.cycle, time.monotonic() - t0)
            fds = [os.open(path, os.O_RDWR) for path in paths]
            try:
                for kind, member, offset, length, data in read_records(
                    self.staging_path, c.staged_bytes, self.max_chunk
                ):
                    self.check_extent(member, offset, length)
                    if kind == REC_DATA:
                        fileops.pwrite_all(fds[member], data, offset)
                    elif kind in (REC_ZERO, REC_TRIM):
                        fileops.punch_zeroes(fds[member], offset, length)
                    failpoints.hit("receiver.apply_record")
                for fd in fds:
                    os.fsync(fd)
            finally:
                for fd in fds:
                    os.close(fd)
            if not in_place:
                for i, path in enumerate(paths):
                    os.replace(path, self.image_path(i))
                fileops.fsync_dir(self.directory)
        st.applied_cycle, st.freeze_time, st.committed = c.cycle, c.freeze_time, None
        st.save(self.state_path)
        _unlink(self.staging_path)

    def close(self) -> None:
        self._close_inflight()

    def status(self) -> dict:
        st = self.state
        return {
            "mirror": st.mirror, "group": st.group, "source_node": st.source_node,
            "source_name": st.source_name, "volumes": [v.name for v in st.volumes],
            "applied_cycle": st.applied_cycle, "freeze_time": st.freeze_time,
            "rpo_age": (time.time() - st.freeze_time) if st.applied_cycle else None,
            "receiving": None if st.pending is None else
            {"cycle": st.pending.cycle, "chunks": st.pending.chunks, "full": st.pending.full},
        }


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
