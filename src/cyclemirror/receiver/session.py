"""One source connection on the target: handshake, open a mirror, receive cycles.

The loop reads frames strictly in protocol order (see docs/protocol.md,
"Cycle"): ``begin``, then ``member`` switches and DATA/ZERO/TRIM frames of
that cycle, then ``end``; ``hash_request`` is allowed between cycles, and so are
``size`` messages, which give a member's size in the cycle whose ``begin``
follows (a file object that grew or shrank; ``resizable`` before ``open``
lets ``open`` name sizes other than the images').  Every
value is checked before use: frame headers by the link's limits, extents
against the member volume, cycle numbers against the one in flight.  A
protocol error ends this connection only, after an ``error`` message that
says what was wrong; whatever was staged stays unapplied (and resumable).

Acknowledgements: after each ``ACK_BYTES`` of payload or ``ACK_SECONDS``,
the mirror is checkpointed (fdatasync + state) and an ``ack`` goes back, so
the source can resume an interrupted cycle after the last acked chunk.  A
full cycle into RBD checkpoints without stopping to read: the write-behind
thread acks once the cluster has made the marked chunks durable
(``WriteBehind``).

Pipelining (protocol 2): at ``end`` the cycle is committed and ``committed``
goes back at once; the apply runs in the mirror's apply thread, which sends
``applied`` as soon as the image shows the cycle (before the image's fsync:
the committed staging log keeps it safe until then), while this loop already
receives the next cycle.  A protocol-1 source gets the old order: apply, then ``applied``.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time

import numpy as np

from cyclemirror import failpoints
from cyclemirror._cext import frames
from cyclemirror.errors import (
    ConnectionLostError,
    CycleMirrorError,
    NoSpaceError,
    ProtocolError,
)
from cyclemirror.receiver import lineage, rbdbackend, resync
from cyclemirror.receiver.mirror import Mirror
from cyclemirror.receiver.staging import REC_DATA, REC_SCATTER, REC_TRIM, REC_ZERO
from cyclemirror.receiver.state import VolumeSpec
from cyclemirror.wire import link as wirelink
from cyclemirror.wire import messages
from cyclemirror.wire.handshake import PIPELINED_VERSION

log = logging.getLogger(__name__)

ACK_BYTES = 256 << 20
ACK_SECONDS = 2.0
_KIND = {frames.FT_DATA: REC_DATA, frames.FT_ZERO: REC_ZERO, frames.FT_TRIM: REC_TRIM,
         frames.FT_SCATTER: REC_SCATTER}


def block_digests(path: str, start_block: int, count: int, block_size: int) -> bytes:
    """xxh3-64 of each block (big-endian bytes), read from the mirror image."""
    from cyclemirror._cext import blockhash

    with open(path, "rb") as f:
        hashes, _zero = blockhash.hash_file(f.fileno(), start_block * block_size,
                                            count * block_size, block_size)
    return np.asarray(hashes, dtype=">u8").tobytes()


def zero_block_digest(block_size: int) -> bytes:
    """The digest (as ``block_digests`` gives it) of a block of zeroes."""
    from cyclemirror._cext import blockhash

    hashes, _zero = blockhash.hash_buffer(bytes(block_size), block_size)
    return np.asarray(hashes, dtype=">u8").tobytes()


class WriteBehind:
    """Writes received chunks in a helper thread, so disk writes overlap the network.

    The session validates each chunk, then ``put``s it; only this thread calls
    ``mirror.receive`` while a cycle streams, and the session calls
    ``drain()`` (wait for every queued write, re-raise a failure) before it
    touches the mirror itself (checkpoint, finish).  The queue is bounded, so
    a slow disk pushes back on the source through TCP.

    Asynchronous checkpoints (a full cycle into RBD: ``Mirror.checkpoint_mark``):
    ``checkpoint()`` queues a mark behind the chunks put so far and returns
    False at once (True: this cycle cannot, the caller checkpoints the usual
    way).  This thread sends the marked writes to the cluster and goes on
    writing; once they are durable (polled between batches, and while the
    queue is idle) the state records the checkpoint and ``on_durable(chunks)``
    sends the ack.  A chunk is acknowledged only when durable, as before, but
    the session never stops reading for a flush.  ``drain()`` also waits for
    every mark (so the session may touch the mirror after it).
    """

    DEPTH = 8
    BATCH_BYTES = 1 << 20
    BATCH_COUNT = 256
    POLL_SECONDS = 0.02  # how often an idle writer looks at marks in flight

    _MARK = object()
    _SETTLE = object()

    def __init__(self, mirror: Mirror, on_durable=None):
        self.mirror = mirror
        self.on_durable = on_durable
        self.queue: queue.Queue = queue.Queue(self.DEPTH)
        self.error: BaseException | None = None
        self._batch: list[tuple] = []
        self._batch_bytes = 0
        self._marks: list = []  # checkpoint tokens in flight, oldest first (this thread's)
        self._can_mark = on_durable is not None
        self.thread = threading.Thread(target=self._run, daemon=True, name="target-writer")
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=self.POLL_SECONDS if self._marks else None)
            except queue.Empty:
                self._poll_marks(False)
                continue
            try:
                if item is None:
                    return
                if self.error is None:
                    if item is self._MARK:
                        self._mark()
                    elif item is self._SETTLE:
                        self._poll_marks(True)
                    else:
                        self.mirror.receive_batch(item)
                        self._poll_marks(False)
            except BaseException as exc:  # noqa: BLE001 - re-raised by put/drain
                self.error = exc
                self._marks = []
            finally:
                self.queue.task_done()

    def _mark(self) -> None:
        token = self.mirror.checkpoint_mark()
        if token is None:  # cannot mark after all: a checkpoint here, the usual way
            self.on_durable(self.mirror.checkpoint())
            return
        self._marks.append(token)

    def _poll_marks(self, wait: bool) -> None:
        """Record and ack the newest mark that is durable (``wait``: wait for all)."""
        durable = None
        try:
            while self._marks and self.error is None:
                chunks = self.mirror.checkpoint_reached(self._marks[0], wait)
                if chunks is None:
                    break
                self._marks.pop(0)
                durable = chunks
            if durable is not None:
                self.on_durable(durable)
        except BaseException as exc:  # noqa: BLE001 - re-raised by put/drain
            self.error = exc
            self._marks = []

    def checkpoint(self) -> bool:
        """Queue an asynchronous checkpoint; True if the caller must checkpoint itself
        (after ``drain()``): made without ``on_durable`` (a delta, file images...)."""
        if not self._can_mark:
            return True
        if self.error is not None:
            raise self.error
        self._flush()
        self.queue.put(self._MARK)
        return False

    def put(self, chunk) -> None:
        """Queue one chunk; small ones travel to the thread in batches (one handoff each)."""
        if self.error is not None:
            raise self.error
        self._batch.append(chunk)
        self._batch_bytes += chunk[3]
        if self._batch_bytes >= self.BATCH_BYTES or len(self._batch) >= self.BATCH_COUNT:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            self.queue.put(self._batch)
            self._batch, self._batch_bytes = [], 0

    def drain(self) -> None:
        self._flush()
        self.queue.put(self._SETTLE)  # marks in flight: durable and acknowledged first
        self.queue.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop the thread; marks in flight are waited for and recorded first (unless a
        write failed), so a connection lost mid-cycle resumes after them."""
        self.queue.put(self._SETTLE)
        self.queue.put(None)
        self.thread.join()


class Session:
    """Owns one connection after the handshake; run() returns when it ends."""

    def __init__(self, server, link: wirelink.FrameLink, version: int = PIPELINED_VERSION):
        self.server = server
        self.link = link
        self.version = version
        self.mirror: Mirror | None = None
        self.key = None  # registry key of the mirror we hold
        self._told_applied = 0  # the newest cycle 'applied' was sent for

    def run(self) -> None:
        try:
            self._serve()
        except OSError as exc:
            if self.mirror is not None and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(self.mirror, exc) from exc
            cfg = getattr(self.server, "rbd", None)
            named = None
            if cfg is not None and self.key is not None:  # the open's recovery, in the pool
                named = rbdbackend.cluster_error(cfg, _what(self.key[1], self.source), exc)
            if named is None:
                raise
            raise named from exc
        finally:
            if self.mirror is not None:
                self.mirror.close()  # waits for an apply still running: it must not overlap
            if self.key is not None:  # the recovery of a next session's open
                self.server.registry.release(self.key, self)

    def _serve(self) -> None:
        first = self.link.recv_message({"open", "verify_open", "lineage", "tree_open",
                                        "tree_branch", "resizable"})
        self.lineage = None
        resizable = False
        branch = None
        if first["type"] == "tree_branch":  # a promoted tree: a failback may follow
            branch = first
            first = self.link.recv_message({"tree_open"})
        if first["type"] == "tree_open":  # a tree object's mirror (receiver/treesession.py)
            from cyclemirror.receiver.treesession import TreeSession

            return TreeSession(self.server, self.link, first, branch).run()
        if first["type"] == "lineage":  # protocol 3: the source's generation, then 'open'
            self.lineage = lineage.check_lineage_message(first)
            first = self.link.recv_message({"open", "resizable"})
        if first["type"] == "resizable":  # a file object: sizes may differ from the images'
            resizable = True
            first = self.link.recv_message({"open"})
        if first["type"] == "verify_open":  # verify hook: a connection of its own (verify.py)
            from cyclemirror.receiver.verify import serve_verify

            return serve_verify(self.server, self.link, first)
        self._open(first, resizable)
        while True:
            try:
                header, payload = self.link.recv_frame()
            except ConnectionLostError as exc:
                if getattr(exc, "clean", False):
                    log.info("mirror %s: source %s closed the connection between cycles",
                             self.mirror.state.mirror, self.link.peer)
                    return
                raise
            msg = self.link.message_from(header, payload,
                                         {"begin", "hash_request", "switchover", "size"})
            if msg["type"] == "size":
                self._take_size(msg)
            elif msg["type"] == "begin":
                self._receive_cycle(msg)
            elif msg["type"] == "switchover":  # a planned role swap (daemon/switchover.py)
                from cyclemirror.receiver.promote import serve_switchover

                return serve_switchover(self, msg)
            else:
                self._answer_hashes(msg)

    def _take_size(self, msg: dict) -> None:
        """A ``size`` message: member ``index``'s size in the cycle whose ``begin`` follows
        (checked against the volume's block size here, against free space at ``begin``)."""
        vols = self.mirror.state.volumes
        index, size, cycle = msg["index"], msg["size"], msg["cycle"]
        what = f"mirror {self.mirror.state.mirror!r} of source {self.source}"
        if index >= len(vols):
            raise ProtocolError(f"{what}: 'size' names member {index}, there are {len(vols)}")
        bs = vols[index].block_size
        if not 0 < size <= messages.MAX_VOLUME_SIZE or size % bs:
            raise ProtocolError(f"{what}: 'size' gives {vols[index].name!r} {size} bytes, not "
                                f"a positive multiple of its block size {bs} within 2**56")
        if self._size_cycle not in (None, cycle):
            raise ProtocolError(f"{what}: 'size' messages name cycles {self._size_cycle} and "
                                f"{cycle} before one 'begin'")
        self._size_cycle = cycle
        self._next_sizes[index] = size
        self._raise_limits(size)

    def _raise_limits(self, size: int) -> None:
        """Frames may address up to the largest size this connection has named."""
        if size > self._limit_size:
            self._limit_size = size
            self.link.limits = wirelink.volume_limits(size, self._align)

    def _cycle_sizes(self, cycle: int) -> list[int] | None:
        """The members' sizes in ``cycle``: 'open''s, as 'size' messages amend them
        (None where the connection may not resize and named none)."""
        if self._size_cycle not in (None, cycle):
            raise ProtocolError(f"mirror {self.mirror.state.mirror!r}: 'size' named cycle "
                                f"{self._size_cycle}, then 'begin' cycle {cycle}")
        sizes = list(self._declared)
        for index, size in self._next_sizes.items():
            sizes[index] = size
        self._next_sizes, self._size_cycle = {}, None
        return sizes

    def _open(self, msg: dict, resizable: bool = False) -> None:
        log.debug("mirror %s from %s: open from %s", msg["mirror"], msg["node_id"],
                  self.link.peer)
        vols = [VolumeSpec(v["name"], v["size"], v["block_size"]) for v in msg["volumes"]]
        if not msg["group"] and (len(vols) != 1 or vols[0].name != msg["mirror"]):
            raise ProtocolError("open: a single-volume mirror must be named after its volume")
        self.key = (msg["node_id"], msg["mirror"], msg["group"])
        self.source = msg["node_name"] or msg["node_id"]
        refuse = (self.server.root, self.server.node_id, getattr(self.server, "node_name", None),
                  msg["node_id"], msg["node_name"], msg["mirror"], self.lineage)
        lineage.refuse_if_promoted(*refuse)  # a demoted source: refused, nothing touched
        self.server.registry.acquire(self.key, self)
        lineage.refuse_if_promoted(*refuse)  # promoted while we waited for the mirror
        if self.lineage is not None:
            resync.prepare(self.server, msg, self.lineage)  # a failback: no full copy
        self.mirror = Mirror.open(self.server.root, msg["node_id"], msg["node_name"],
                                  msg["mirror"], msg["group"], vols, wirelink.MAX_CHUNK,
                                  rbd=getattr(self.server, "rbd", None), resizable=resizable)
        # Each cycle's sizes: those 'open' declared (the images' unless 'resizable'),
        # amended by the 'size' messages before its 'begin'.
        self._declared = [v.size for v in vols]
        self._next_sizes: dict[int, int] = {}
        self._size_cycle: int | None = None
        if self.lineage is not None:
            lineage.adopt(self.mirror, self.lineage, msg["node_name"] or msg["node_id"])
        st = self.mirror.state
        self._align = align = min(v.block_size for v in vols)
        self._limit_size = max([v.size for v in vols] + [v.size for v in st.volumes])
        self.link.limits = wirelink.volume_limits(self._limit_size, align)
        p = st.pending
        self.link.send_message(
            "opened", node_id=self.server.node_id, applied_cycle=st.applied_cycle,
            freeze_time=st.freeze_time, has_image=self.mirror.has_image,
            pending_cycle=p.cycle if p else 0, pending_chunks=p.chunks if p else 0,
        )
        log.info("mirror %s from %s opened by %s", st.mirror, st.source_node, self.link.peer)

    def _receive_cycle(self, begin: dict) -> None:
        cycle = begin["cycle"]
        mirror = self.mirror
        chunks = mirror.begin(cycle, begin["freeze_time"], begin["full"], begin["resume_from"],
                              sizes=self._cycle_sizes(cycle))
        self.link.send_message("ack", cycle=cycle, chunks=chunks)
        log.debug("mirror %s: cycle %d begun", mirror.state.mirror, cycle)
        member = 0
        unacked_bytes, last_ack = 0, time.monotonic()
        ack = None
        if mirror.can_checkpoint_async():
            def ack(n: int) -> None:
                self.link.send_message("ack", cycle=cycle, chunks=n)
        writer = WriteBehind(mirror, ack)
        try:
            self._receive_frames(cycle, mirror, writer, member, unacked_bytes, last_ack)
        finally:
            writer.close()

    def _receive_frames(self, cycle, mirror, writer, member, unacked_bytes, last_ack):
        while True:
            header, payload = self.link.recv_frame()
            if header.type == frames.FT_CONTROL:
                msg = self.link.message_from(header, payload, {"member", "end"})
                if msg["type"] == "member":
                    if msg["index"] >= len(mirror.state.volumes):
                        raise ProtocolError(f"member index {msg['index']} out of range")
                    member = msg["index"]
                    continue
                if msg["cycle"] != cycle:
                    raise ProtocolError(f"'end' names cycle {msg['cycle']}, in flight is {cycle}")
                writer.drain()
                log.debug("mirror %s: cycle %d received, %d chunks; committing",
                          mirror.state.mirror, cycle, msg["chunks"])
                failpoints.hit("receiver.commit")
                hold = mirror.commit(cycle, msg["chunks"])
                log.debug("mirror %s: cycle %d committed", mirror.state.mirror, cycle)
                if self.server.on_committed is not None:
                    self.server.on_committed(mirror)
                if self.version >= PIPELINED_VERSION:
                    self.link.send_message("committed", cycle=cycle)
                    mirror.start_apply(hold, self._applied_in_background,
                                       on_visible=self._visible)
                else:
                    mirror.apply_committed(hold)
                    self._tell_applied(mirror)
                return
            if header.cycle != cycle:
                raise ProtocolError(
                    f"a data frame of cycle {header.cycle} arrived while cycle {cycle} is in "
                    "flight; nothing of it is applied"
                )
            kind = _KIND[header.type]
            if kind == REC_SCATTER:
                if self.version < PIPELINED_VERSION:
                    raise ProtocolError("a SCATTER frame on a protocol-1 connection")
                mirror.check_scatter(member, header.offset, payload)
            else:
                mirror.check_extent(member, header.offset, header.raw_length)
            # The frame checksum was just verified against these bytes: staging reuses it.
            writer.put((kind, member, header.offset, header.raw_length,
                        payload if kind in (REC_DATA, REC_SCATTER) else None, header.checksum))
            unacked_bytes += header.raw_length if kind in (REC_DATA, REC_SCATTER) else 0
            now = time.monotonic()
            if unacked_bytes >= ACK_BYTES or now - last_ack >= ACK_SECONDS:
                if writer.checkpoint():  # else the writer acks once the mark is durable
                    writer.drain()
                    self.link.send_message("ack", cycle=cycle, chunks=mirror.checkpoint())
                unacked_bytes, last_ack = 0, now

    def _tell_applied(self, mirror: Mirror) -> None:
        st = mirror.state
        if self.server.on_applied is not None:
            self.server.on_applied(mirror)
        if self._told_applied != st.applied_cycle:
            self.link.send_message("applied", cycle=st.applied_cycle, freeze_time=st.freeze_time)
            self._told_applied = st.applied_cycle
        log.info("mirror %s applied cycle %d", st.mirror, st.applied_cycle)

    def _visible(self, cycle: int, freeze_time: float) -> None:
        """The apply thread's writes are in the image (its fsync follows): the source may
        count the cycle as applied now (``Mirror._redo`` says why that is safe)."""
        try:
            self.link.send_message("applied", cycle=cycle, freeze_time=freeze_time)
            self._told_applied = cycle
            log.debug("mirror %s: cycle %d visible, told applied", self.mirror.state.mirror,
                      cycle)
        except CycleMirrorError as exc:
            log.info("mirror %s: could not tell %s about the apply: %s",
                     self.mirror.state.mirror, self.link.peer, exc)

    def _applied_in_background(self, error: BaseException | None) -> None:
        """The mirror's apply thread is done: tell the source (its loop reads acks
        from any thread; a link closed meanwhile is the next session's business)."""
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT,
                                                         errno.ETIMEDOUT):
            error = _no_space(self.mirror, error)
        try:
            if error is None:
                self._tell_applied(self.mirror)
            else:
                self.link.send_error(error, error_code(error))
                self.link.close()  # the session's loop ends; the next open redoes it
        except CycleMirrorError as exc:
            log.info("mirror %s: could not tell %s about the apply: %s",
                     self.mirror.state.mirror, self.link.peer, exc)

    def _answer_hashes(self, msg: dict) -> None:
        mirror = self.mirror
        mirror.wait_applied()  # hashes of an image half way through an apply mean nothing
        mirror.raise_apply_error()
        index, start, count = msg["index"], msg["start_block"], msg["count"]
        if index >= len(mirror.state.volumes):
            raise ProtocolError(f"hash_request: member {index} out of range")
        vol = mirror.state.volumes[index]
        nblocks = vol.size // vol.block_size
        # A file object may be larger at the source than the image: blocks past the
        # image's end hash as zero blocks (what they read as once a cycle grows it).
        limit = max(nblocks, self._declared[index] // vol.block_size)
        if not mirror.has_image:
            raise ProtocolError("hash_request: this target has no image of the mirror yet")
        if count == 0 or count > messages.MAX_HASH_BLOCKS or start + count > limit:
            raise ProtocolError(
                f"hash_request: blocks {start}+{count} outside 0..{limit} or over the cap "
                f"{messages.MAX_HASH_BLOCKS}"
            )
        inside = max(0, min(count, nblocks - start))
        digests = b""
        if inside and mirror.backend.keeps_files:
            digests = block_digests(mirror.image_path(index), start, inside, vol.block_size)
        elif inside:
            digests = mirror.backend.block_digests(index, start, inside, vol.block_size)
        if inside < count:
            digests = bytes(digests) + zero_block_digest(vol.block_size) * (count - inside)
        self.link.send_message("hashes", index=index, start_block=start, count=count,
                               digests=digests.hex())


def _what(mirror: str, source: str) -> str:
    return f"mirror {mirror!r} of source {source}"


def _no_space(mirror: Mirror, exc: OSError) -> CycleMirrorError | OSError:
    # Worth retrying once an operator frees space: the source backs off and
    # resumes after the last acknowledged chunk, which stays on disk.
    st = mirror.state
    if mirror.backend.kind == "rbd":  # the pool is full (or the cluster silent), not a disk
        return rbdbackend.cluster_error(mirror.backend.cfg,
                                        _what(st.mirror, st.source_name or st.source_node),
                                        exc) or exc
    if exc.errno == errno.ETIMEDOUT:
        return exc
    return NoSpaceError(
        f"mirror {st.mirror!r} of source {st.source_name or st.source_node}: the "
        f"target's disk is full ({exc.strerror}) under {mirror.directory}; "
        "free space there (a first cycle needs the volume's size, a delta its "
        "changed bytes again): the source retries and resumes after its last ack")


def error_code(exc: BaseException) -> str:
    if isinstance(exc, CycleMirrorError):
        return type(exc).__name__
    return "internal"
