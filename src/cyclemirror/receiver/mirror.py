"""One mirror on the target: receive a delta durably, then apply it all-or-none.

A mirror is a single volume or a consistency group of one source node; it
lives in ``STORE/mirrors/<source node id>/`` as one state file (see ``state``)
and its staging logs, with its images in a backend (``backend``): raw images
``<volume>.img`` there (``filebackend``), or RBD images in a Ceph pool
(``rbdbackend``).  The life of a cycle, as the file backend lives it:

  begin      -> state.pending = {cycle, chunks 0}; a full cycle creates
                ``<volume>.img.new`` (sparse) and writes into it directly
                (``imagewriter``: O_DIRECT where the file system allows), so
                the first cycle never needs room for a second full copy plus
                a staged one; a delta cycle appends to its own staging log
                ``<mirror>.staging.<cycle>``.
  receive    -> every record was already verified by the session (frame
                checksums); it is written, not yet acknowledged.
  checkpoint -> fdatasync, then state.pending.chunks = N: the source may
                resume after chunk N, and we say so in an ack.  A full
                cycle into RBD checkpoints asynchronously
                (``checkpoint_mark``, ``checkpoint_reached``): receiving
                goes on while the cluster makes the marked writes durable;
                the state and the ack follow once it has.
  commit     -> all chunks present: state.committed (the commit point).  From
                here the cycle is as good as applied: recovery finishes it.
  apply      -> redo: a delta is replayed from staging into the images, a full
                cycle renames ``.img.new`` over ``.img``; fsync; state.applied.

Pipelining (protocol 2): ``commit`` returns at once and ``start_apply`` runs
the redo in a thread of its own, so the next cycle's ``begin`` and data are
received (into the next staging log) while the previous one is applied.  At
most one cycle is committed at a time: the next ``commit`` waits until the
apply before it is done.  ``pending`` and ``committed`` may therefore both be
set, each with its own staging log.  Every change of the state file happens
under ``_state_lock``, by the session thread (pending) or the apply thread
(committed -> applied).

Readers (``readers.IMAGE_PINS``, e.g. the daemon's read-only NBD export of an
image) pin the image they opened.  A delta is replayed in place only while
nobody holds a pin (new readers wait for it); otherwise into a sparse clone
``<volume>.img.apply`` that is then renamed over ``.img``, so every reader
keeps the one applied cycle it opened.  A crash leaves ``.img`` untouched in
that case, and redo (idempotent: records are absolute) starts again.

Sizes: a cycle of a file object that grew or shrank carries its members' sizes
(``InFlight.sizes``, from the source's ``size`` messages).  Its extents are
checked against those sizes; a full cycle builds images of that size; a delta's
redo first sets each image to its new size (``DeltaApply.resize``: truncate, or
extend with a hole) and then replays the records, all of it before the state
names the cycle applied with the new sizes in one save.  So a crash mid-apply
rolls forward to the new size and content on recovery (the cycle is committed),
and a crash before the commit leaves the old size and content: never a mix.
An RBD image is resized the same way (``rbd_resize`` inside the redo, which
after a crash starts from the last cycle's snapshot, size included), and the
cycle's snapshot then has the new size.

Recovery (on every open) redoes a committed cycle and keeps a pending one for
resume; the image files are only ever touched by redo of a committed cycle,
so after any crash each image equals the source at some freeze instant, and
all members of a group at the same one.

The server lends a Mirror to one session at a time; that session's thread and
at most one apply thread use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from cyclemirror import failpoints
from cyclemirror._cext import frames
from cyclemirror.errors import NoSpaceError, ProtocolError, UsageError
from cyclemirror.receiver import scrub
from cyclemirror.receiver.backend import open_backend
from cyclemirror.receiver.readers import IMAGE_PINS
from cyclemirror.receiver.staging import (
    REC_DATA,
    REC_SCATTER,
    REC_TRIM,
    REC_ZERO,
    StagingWriter,
    read_records,
)
from cyclemirror.receiver.state import InFlight, MirrorState, VolumeSpec
from cyclemirror.wire import messages

log = logging.getLogger(__name__)


class Mirror:
    def __init__(self, directory: str, state: MirrorState, state_path: str, max_chunk: int,
                 rbd=None):
        self.directory = directory
        self.state = state
        self.state_path = state_path
        self.max_chunk = max_chunk
        self.backend = open_backend(directory, state, rbd)
        self._staging: StagingWriter | None = None
        self._new_images: list = []  # the backend's writers of a full cycle's images
        self._received = 0  # chunks received in the in-flight cycle (acked or not)
        self._state_lock = threading.Lock()  # every change and save of self.state
        self._apply_thread: threading.Thread | None = None
        self.apply_error: BaseException | None = None  # the last background apply's failure
        self.recover()

    # -- paths -----------------------------------------------------------
    def _files(self):
        if not getattr(self.backend, "keeps_files", False):
            raise UsageError(f"mirror {self.state.mirror!r}: its images are in "
                             f"{self.backend.kind}, not in files; this operation needs a "
                             "file-backed mirror")
        return self.backend

    def image_path(self, index: int) -> str:
        return self._files().image_path(index)

    def new_image_path(self, index: int) -> str:
        return self._files().new_image_path(index)

    def clone_path(self, index: int) -> str:
        return self._files().clone_path(index)

    def staging_file(self, c: InFlight) -> str:
        """The staging log of cycle ``c`` (a name recorded in the state, or the older
        single name ``<mirror>.staging`` of state files written before pipelining)."""
        return os.path.join(self.directory, c.staging or self._staging_prefix())

    def _staging_prefix(self) -> str:
        return self.state.mirror + (".group.staging" if self.state.group else ".staging")

    def _staging_name(self, cycle: int) -> str:
        return f"{self._staging_prefix()}.{cycle}"

    @property
    def staging_path(self) -> str:
        """The staging log of the cycle being received (or, between cycles, of the
        committed one)."""
        c = self.state.pending or self.state.committed
        if c is None:
            raise ProtocolError(f"mirror {self.state.mirror!r}: nothing in flight")
        return self.staging_file(c)

    @staticmethod
    def state_file(directory: str, mirror: str, group: bool) -> str:
        return os.path.join(directory, mirror + (".group.json" if group else ".state.json"))

    @classmethod
    def open(cls, root: str, source_node: str, source_name: str | None, mirror: str,
             group: bool, volumes: list[VolumeSpec], max_chunk: int, rbd=None,
             resizable: bool = False) -> Mirror:
        """Open (recovering) or create the mirror; refuse a geometry change, except a
        size change where the source said its sizes may change (``resizable``: a file
        object; each cycle then carries its sizes and the apply resizes)."""
        directory = os.path.join(root, "mirrors", source_node)
        os.makedirs(directory, exist_ok=True)
        path = cls.state_file(directory, mirror, group)
        if os.path.exists(path):
            state = MirrorState.load(path)
            old = [(v.name, v.size, v.block_size) for v in state.volumes]
            new = [(v.name, v.size, v.block_size) for v in volumes]
            common = {v[0] for v in old} & {v[0] for v in new}
            if old != new and resizable and [(n, b) for n, _s, b in old] == [
                    (n, b) for n, _s, b in new]:
                log.info("mirror %s of %s: the source's sizes are now %s, the images %s: "
                         "the next cycle resizes them", mirror, source_node,
                         [v[1] for v in new], [v[1] for v in old])
                state.source_name = source_name
                return cls(directory, state, path, max_chunk, rbd)
            if old != new and group and {v for v in old if v[0] in common} == {
                    v for v in new if v[0] in common}:
                # Members joined or left a group: the others keep their images.
                state.source_name = source_name
                mirror = cls(directory, state, path, max_chunk, rbd)
                mirror.change_members(list(volumes))
                return mirror
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
        return cls(directory, state, path, max_chunk, rbd)

    def change_members(self, volumes: list[VolumeSpec]) -> None:
        """A group's member list changed (names and geometry of the kept ones equal).

        A cycle in flight is discarded (its member numbers are the old ones).  A new
        member gets an all-zero image at once, listed as ``joining`` in the state
        until the next applied cycle, which the source makes carry all of its
        blocks; until then readers are not offered it.  A member that left loses its
        image.  Order: new images, the state (the commit point), then old images.
        """
        st = self.state
        if st.pending is not None:
            self._discard_pending()
        old = {v.name for v in st.volumes}
        new = {v.name for v in volumes}
        joining = set(st.extra.get("joining", [])) & new
        if st.applied_cycle > 0:
            for vol in volumes:
                if vol.name in old:
                    continue
                self.backend.new_member(vol.name, vol.size)
                joining.add(vol.name)
            self.backend.members_changed()
        with self._state_lock:
            st.volumes = list(volumes)
            if joining:
                st.extra["joining"] = sorted(joining)
            else:
                st.extra.pop("joining", None)
            self._save()
        for name in sorted(old - new):
            self.backend.remove_member(name)
        self.backend.members_changed()
        log.info("mirror %s of %s: members now %s (joined: %s; left: %s)", st.mirror,
                 st.source_node, ", ".join(v.name for v in volumes),
                 ", ".join(sorted(new - old)) or "none", ", ".join(sorted(old - new)) or "none")

    @property
    def has_image(self) -> bool:
        return self.state.applied_cycle > 0 and self.backend.images_present()

    def _save(self) -> None:
        self.state.save(self.state_path)

    # -- recovery --------------------------------------------------------
    def recover(self) -> None:
        st = self.state
        if st.committed is not None:
            with IMAGE_PINS.applying(self.state_path, recovering=True):
                self._redo(st.committed, recovering=True)
        else:
            self.backend.discard_partial_apply()
        if st.pending is not None:
            ok = True
            if st.pending.full:
                ok = self.backend.full_present()
            else:
                path = self.staging_file(st.pending)
                ok = os.path.exists(path) and os.path.getsize(path) >= st.pending.staged_bytes
            if not ok:
                self._discard_pending()
        self._remove_stray_staging()
        if st.applied_cycle > 0:
            self.backend.check_sizes()

    def _remove_stray_staging(self) -> None:
        """Staging logs no state entry names: left by a crash between a cycle's
        creation of its log and the state save that records it, or after an apply."""
        keep = {os.path.basename(self.staging_file(c))
                for c in (self.state.pending, self.state.committed) if c is not None}
        prefix = self._staging_prefix()
        for name in os.listdir(self.directory):
            if name in keep:
                continue
            if name == prefix or (name.startswith(prefix + ".")
                                  and name[len(prefix) + 1:].isdigit()):
                _unlink(os.path.join(self.directory, name))

    def _discard_pending(self) -> None:
        self._close_inflight()
        p = self.state.pending
        self.backend.discard_full()
        if p is not None and not p.full:
            path = self.staging_file(p)
            committed = self.state.committed
            if committed is None or self.staging_file(committed) != path:
                _unlink(path)
        with self._state_lock:
            self.state.pending = None
            self._save()

    def _close_inflight(self) -> None:
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        for writer in self._new_images:
            writer.close()
        self._new_images = []

    # -- receiving -------------------------------------------------------
    def sizes_of(self, c: InFlight | None) -> list[int]:
        """Each member's size in cycle ``c`` (the images' sizes unless it resizes)."""
        if c is not None and c.sizes is not None:
            return c.sizes
        return [v.size for v in self.state.volumes]

    def _check_sizes(self, cycle: int, sizes: list[int] | None) -> list[int] | None:
        """``sizes`` of ``cycle`` checked (bounds, room to grow, the backend); None when
        they are the sizes of the cycle before it: the committed one still applying, if
        any, else the images' (so None means the same before and after that apply)."""
        st = self.state
        current = self.sizes_of(st.committed)
        if sizes is None or list(sizes) == current:
            return None
        what = f"mirror {st.mirror!r} of source {st.source_name or st.source_node}"
        if len(sizes) != len(st.volumes):
            raise ProtocolError(f"{what}: cycle {cycle} gives {len(sizes)} sizes for "
                                f"{len(st.volumes)} members")
        for vol, size in zip(st.volumes, sizes, strict=True):
            if type(size) is not int or not 0 < size <= messages.MAX_VOLUME_SIZE or (
                    size % vol.block_size):
                raise ProtocolError(f"{what}: cycle {cycle} gives {vol.name!r} a size of "
                                    f"{size!r} bytes, not a positive multiple of its block "
                                    f"size {vol.block_size} within 2**56")
        if not getattr(self.backend, "resizes", False):
            changed = [f"{v.name} {v.size} -> {n}" for v, n in zip(st.volumes, sizes,
                                                                    strict=True) if v.size != n]
            raise UsageError(
                f"{what}: cycle {cycle} changes the size of {', '.join(changed)} bytes, and "
                f"this target keeps its images in {self.backend.kind}, which cannot follow a "
                "size change yet; mirror that file object to a target with raw image files, "
                "or give the file its old size back")
        growth = sum(max(0, n - v.size) for v, n in zip(st.volumes, sizes, strict=True))
        if growth and self.backend.keeps_files:  # (an RBD image grows thin: the pool's)
            vfs = os.statvfs(self.directory)
            free = vfs.f_bavail * vfs.f_frsize
            if growth > free:
                raise NoSpaceError(
                    f"{what}: cycle {cycle} grows its images by {growth} bytes, more than the "
                    f"{free} bytes free under {self.directory}; free space there (a grown "
                    "image must fit, even where it stays sparse): the source retries")
        return list(sizes)

    def begin(self, cycle: int, freeze_time: float, full: bool, resume_from: int,
              sizes: list[int] | None = None) -> int:
        """Start or resume receiving ``cycle``; return the chunk count we hold.
        ``sizes``: each member's size in this cycle (None: the images' sizes)."""
        self.raise_apply_error()
        st = self.state
        sizes = self._check_sizes(cycle, sizes)
        newest = max(st.applied_cycle, st.committed.cycle if st.committed else 0)
        if cycle <= newest:
            raise ProtocolError(f"mirror {st.mirror!r}: cycle {cycle} is not newer than the "
                                f"applied or committed cycle {newest}")
        if not full and not (self.has_image or st.committed is not None):
            raise ProtocolError(f"mirror {st.mirror!r}: a delta cycle needs an image; this "
                                "target has none (the source must send a full cycle)")
        p = st.pending
        if resume_from:
            if p is None or (p.cycle, p.full, p.chunks, p.sizes) != (cycle, full, resume_from,
                                                                    sizes):
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
            p = InFlight(cycle, freeze_time, full,
                         staging=None if full else self._staging_name(cycle), sizes=sizes)
            with self._state_lock:
                st.pending = p
                self._save()
        if full:
            for i, size in enumerate(self.sizes_of(p)):
                self._new_images.append(self.backend.full_writer(i, size))
        else:
            self._staging = StagingWriter(self.staging_file(p), p.staged_bytes)
        self._received = p.chunks
        return p.chunks

    def check_extent(self, member: int, offset: int, length: int,
                     c: InFlight | None = None) -> None:
        """The extent lies inside ``member`` as cycle ``c`` sizes it (default: the cycle
        being received)."""
        vols = self.state.volumes
        if not 0 <= member < len(vols):
            raise ProtocolError(f"mirror {self.state.mirror!r}: member {member} does not exist")
        size = self.sizes_of(c or self.state.pending)[member]
        if offset < 0 or length < 0 or offset + length > size:
            raise ProtocolError(
                f"mirror {self.state.mirror!r}: extent {offset}+{length} lies outside volume "
                f"{vols[member].name!r} of {size} bytes"
            )

    def check_scatter(self, member: int, first_offset: int, raw) -> int:
        """Validate a verified SCATTER payload for ``member``; return its data bytes."""
        vols = self.state.volumes
        if not 0 <= member < len(vols):
            raise ProtocolError(f"mirror {self.state.mirror!r}: member {member} does not exist")
        vol = vols[member]
        size = self.sizes_of(self.state.pending)[member]
        first, _count, data = frames.scatter_check(raw, size, vol.block_size)
        if first != first_offset:
            raise ProtocolError(
                f"mirror {self.state.mirror!r}: a SCATTER frame's header names offset "
                f"{first_offset} but its first extent is at {first}")
        if self.state.pending is not None and self.state.pending.full:
            raise ProtocolError(f"mirror {self.state.mirror!r}: SCATTER frames belong to delta "
                                "cycles, not to a full one")
        return data

    def receive(self, kind: int, member: int, offset: int, length: int,
                data: bytes | None = None, checksum: int | None = None) -> None:
        """Take one verified chunk (REC_DATA or REC_SCATTER with data, or REC_ZERO / REC_TRIM).

        ``checksum``: the verified xxh3-64 of ``data`` if the caller has it
        (the staging log records it instead of hashing the data again).
        """
        self.receive_batch([(kind, member, offset, length, data, checksum)])

    def receive_batch(self, chunks: list) -> None:
        """Take verified chunks (kind, member, offset, length, data, checksum) in order."""
        p = self.state.pending
        if p is None:
            raise ProtocolError(f"mirror {self.state.mirror!r}: data before 'begin'")
        for kind, member, offset, length, _data, _ck in chunks:
            if kind != REC_SCATTER:
                self.check_extent(member, offset, length)
        if p.full:
            for kind, member, offset, length, data, _ck in chunks:
                image = self._new_images[member]
                if kind == REC_DATA:
                    image.write(data, offset)
                elif kind == REC_SCATTER:
                    raise ProtocolError(f"mirror {self.state.mirror!r}: SCATTER frames belong "
                                        "to delta cycles, not to a full one")
                else:
                    image.punch(offset, length)
        else:
            self._staging.append_batch(chunks)
        self._received += len(chunks)

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
        with self._state_lock:
            if not p.full:
                p.staged_bytes = self._staging.size
            p.chunks = self._received
            self._save()
        return p.chunks

    def can_checkpoint_async(self) -> bool:
        """Whether the cycle in flight can use ``checkpoint_mark`` (a full cycle into
        images whose writers can mark: RBD images with an object writer)."""
        p = self.state.pending
        return bool(p is not None and p.full and self._new_images
                    and all(getattr(image, "can_mark", False) for image in self._new_images))

    def checkpoint_mark(self):
        """Start a checkpoint without waiting for it: a token for ``checkpoint_reached``,
        or None where this cycle cannot (a delta's staging log, an image with no
        object writer: ``checkpoint`` then).

        A full cycle into RBD images: everything received so far is sent to the
        cluster and marked; the writes that follow go on meanwhile.  Called by
        the thread that writes (the session's write-behind thread).
        """
        p = self.state.pending
        if p is None or not p.full or not self._new_images:
            return None
        marks = []
        for image in self._new_images:
            mark = image.sync_mark() if getattr(image, "can_mark", False) else None
            if mark is None:
                return None
            marks.append(mark)
        return self._received, marks

    def checkpoint_reached(self, token, wait: bool = False) -> int | None:
        """The chunk count of ``token`` once everything it marked is durable (the state
        then says so, and the caller may acknowledge it), else None; ``wait``: wait for
        it.  A write that failed is raised.  Same thread as ``checkpoint_mark``."""
        received, marks = token
        for image, mark in zip(self._new_images, marks, strict=True):
            if not image.sync_reached(mark, wait):
                return None
        p = self.state.pending
        with self._state_lock:
            if p.chunks < received:
                p.chunks = received
                self._save()
        return received

    def commit(self, cycle: int, chunks: int) -> contextlib.ExitStack:
        """All chunks sent: make the cycle committed (recovery will finish its apply).

        Waits for the apply of the cycle before it first.  Returns the hold that
        marks the mirror as being applied for readers (``IMAGE_PINS.applying``):
        pass it to ``apply_committed`` or ``start_apply``, which release it.
        """
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
        self.wait_applied()
        self.raise_apply_error()
        hold = contextlib.ExitStack()
        # Readers opening the image from now on know an apply is under way (not a crash).
        hold.enter_context(IMAGE_PINS.applying(self.state_path))
        try:
            with self._state_lock:
                # The commit point: from here recovery completes the apply.
                self.state.committed, self.state.pending = p, None
                self._save()
        except BaseException:
            hold.close()
            raise
        return hold

    def apply_committed(self, hold: contextlib.ExitStack, on_visible=None) -> tuple[int, float]:
        """Apply the committed cycle here and now; return (applied cycle, freeze time).
        ``on_visible(cycle, freeze_time)``, if given, is called as soon as the image shows
        the cycle (see ``_redo``)."""
        with hold:
            self._redo(self.state.committed, on_visible=on_visible)
        return self.state.applied_cycle, self.state.freeze_time

    def finish(self, cycle: int, chunks: int) -> tuple[int, float]:
        """Commit and apply in this thread (protocol 1, tests)."""
        return self.apply_committed(self.commit(cycle, chunks))

    def start_apply(self, hold: contextlib.ExitStack, on_done, on_visible=None) -> None:
        """Apply the committed cycle in a thread of its own; then call
        ``on_done(error)`` (None, or the exception that stopped the apply, which
        ``raise_apply_error`` also raises in the session from then on).
        ``on_visible`` as for ``apply_committed``."""
        def run() -> None:
            error = None
            try:
                self.apply_committed(hold, on_visible)
            except BaseException as exc:  # noqa: BLE001 - handed to the session
                error = self.apply_error = exc
                log.error("mirror %s: applying cycle %s failed: %s: %s", self.state.mirror,
                          getattr(self.state.committed, "cycle", "?"), type(exc).__name__, exc)
            on_done(error)

        self._apply_thread = threading.Thread(target=run, daemon=True,
                                              name=f"apply-{self.state.mirror}")
        self._apply_thread.start()

    def wait_applied(self) -> None:
        """Wait for a background apply to end (its failure stays in ``apply_error``)."""
        t = self._apply_thread
        if t is not None:
            t.join()
            self._apply_thread = None

    def raise_apply_error(self) -> None:
        if self.apply_error is not None:
            raise self.apply_error

    def _redo(self, c: InFlight, recovering: bool = False, on_visible=None) -> None:
        """Apply committed cycle ``c``; idempotent, so recovery may run it again.

        A delta whose writes readers see as they land (``visible_before_finish``: the
        file backend applying in place) calls ``on_visible(cycle, freeze_time)`` once
        its writes are in the images, before ``finish`` (the images' fsync: with
        scattered blocks the larger part of an apply, every block a random write on
        disk), and shows the cycle as applied from then on.  The cycle is safe at that
        point: it is committed, its staging log stays until the state file lets go of
        it, and recovery redoes a committed cycle whatever the state's applied cycle
        says (redo is idempotent).  Readers that arrive meanwhile still wait for the
        whole apply (the pin); the state file says applied at once too (with the cycle
        still committed), so it never lags what the source was told."""
        st = self.state
        previous = st.applied_cycle
        if c.full:
            self.backend.install_full(c.cycle)
        else:
            delta = self.backend.open_delta(c.cycle, self.state_path, recovering)
            sizes = self.sizes_of(c)
            try:
                if c.sizes is not None:  # first the new sizes: every record lies inside them
                    for i, size in enumerate(c.sizes):
                        delta.resize(i, size)
                    failpoints.hit("receiver.apply_resized")
                for kind, member, offset, length, data in read_records(
                    self.staging_file(c), c.staged_bytes, self.max_chunk
                ):
                    if kind == REC_SCATTER:
                        vol = st.volumes[member] if 0 <= member < len(st.volumes) else None
                        if vol is None:
                            self.check_extent(member, 0, 0, c)  # raises: no such member
                        delta.scatter(member, data, sizes[member], vol.block_size)
                        if failpoints.is_on("receiver.apply_record"):
                            # A SCATTER record holds many extents: one hit each, up to 10.
                            count = frames.scatter_check(data, sizes[member],
                                                         vol.block_size)[1]
                            for _ in range(min(10, count)):
                                failpoints.hit("receiver.apply_record")
                        continue
                    self.check_extent(member, offset, length, c)
                    if kind == REC_DATA:
                        delta.write(member, data, offset)
                    elif kind in (REC_ZERO, REC_TRIM):
                        delta.zero(member, offset, length)
                    failpoints.hit("receiver.apply_record")
                if on_visible is not None and getattr(delta, "visible_before_finish", False):
                    self._record_applied(c, still_committed=True)
                    on_visible(c.cycle, c.freeze_time)
                    failpoints.hit("receiver.apply_visible")
                delta.finish()
            finally:
                delta.close()
        self.backend.applied(c.cycle)
        scrub.record_apply(self, c, previous)  # the scrub record follows the image
        self._record_applied(c, still_committed=False)
        self.backend.after_state_saved(c.cycle)
        if not c.full:
            p = st.pending
            path = self.staging_file(c)
            if p is None or p.full or self.staging_file(p) != path:
                _unlink(path)

    def _record_applied(self, c: InFlight, still_committed: bool) -> None:
        """The state names ``c`` as applied (and, once its images are durable, no longer
        committed: from then on recovery has nothing to redo)."""
        st = self.state
        with self._state_lock:
            st.applied_cycle, st.freeze_time = c.cycle, c.freeze_time
            if c.sizes is not None:  # the images have the cycle's sizes from now on
                st.volumes = [VolumeSpec(v.name, n, v.block_size)
                              for v, n in zip(st.volumes, c.sizes, strict=True)]
            if not still_committed:
                st.committed = None
            st.extra.pop("joining", None)  # their blocks came whole in this cycle
            self._save()

    def close(self) -> None:
        self._close_inflight()
        self.wait_applied()
        self.backend.close()

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
