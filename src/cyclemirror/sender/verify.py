"""The source's side of a verify: prove that a target's image equals the source, cheaply.

``VerifyRun(...).run()`` compares one member volume of a mirror with its
image on one target over a connection of its own (``verify_open``, see
docs/verify.md), so the mirror's cycles go on meanwhile.  Only digests cross
the wire, hierarchically: one per 64 MiB piece, then, for a piece that
differs, one per 1 MiB, then one per block for the 1 MiB pieces that differ
(``store.rangehash`` defines them).  Both sides read their image once, in
parallel; a clean volume costs a few hundred bytes per 64 MiB on the wire.

**Like with like.**  The target says, for every digest it sends, which applied
cycle it was taken at (the target may apply cycles while the verify runs).
Here that cycle's frozen image is the reference:

* Before asking the target anything we tell the mirror's driver to start no
  merge (``merges.hold_merges()``) and hold the oldest readable cycle *m* of
  the volume open (``MergeHold``): a merge of overlay *j* waits for readers of
  cycles <= *j*, so from then on every cycle from *m* to the newest freeze
  stays as it is until the verify ends (overlays pile up meanwhile; the
  mirror's merger thread waits, its cycles do not).  The driver's pause is
  what keeps them *readable*: the store refuses new readers of cycles <= *j*
  as soon as a merge of *j* is asked for, even while it waits for us.  Without
  a driver (``merges=None``) such a refusal fails the verify (a NotFoundError,
  never a comparison).
* The target's cycle at open must be >= *m* (else the source merged it away:
  ``CycleGoneError``, retried by the caller once the target caught up) and
  every later digest names a cycle >= that one (an applied cycle only grows).
* We hash every piece speculatively at the target's cycle *s* at open, in a
  thread of our own, while the target hashes its side.  A digest that comes
  back at a newer cycle *k* is compared with our block digests patched at the
  blocks that changed between images *s* and *k* (the dirty sets of overlays
  *s* .. *k-1*, read from image *k*): no piece is read twice in full.

So a block is reported only if image *k* of the source and image *k* of the
target differ there: never a false mismatch because a cycle moved on.

**Untrusted answers.**  Every ``verify_hashes`` must answer exactly the next
pieces of one of our outstanding requests (member, unit, offset), with the
right number of digests, at a cycle between the one at open and our newest
freeze; anything else ends the verify with a ProtocolError and nothing found
in it is repaired.

**Resume.**  ``on_progress`` gets the end of the prefix of the span that is
fully compared (every finer request answered) and the blocks found so far; a
caller that records them can start a later run there (``resume_from``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.errors import (
    ConnectionLostError,
    CycleGoneError,
    NotFoundError,
    ProtocolError,
    UsageError,
)
from cyclemirror.sender.connection import TargetLink
from cyclemirror.sender.ratelimit import RateLimiter
from cyclemirror.store import rangehash
from cyclemirror.store.frozen import FrozenCycle
from cyclemirror.wire import messages

log = logging.getLogger(__name__)

WINDOW = 8  # top-level pieces hashed ahead of the comparisons (bounds memory)
MAX_IN_FLIGHT = 64  # finer requests outstanding at once
OPEN_TIMEOUT = 330.0  # the target may wait out an apply (receiver.verify.APPLY_WAIT) first


def _reader_of(volume, k: int):
    """A reader of image ``k`` of a volume, or of a file object (its snapshot ``k``)."""
    if getattr(volume, "is_file", False):
        return volume.frozen_reader(k)
    return FrozenCycle(volume, k, 0.0, None, None).reader()


class MergeHold:
    """Holds the oldest readable cycle of a volume open, so no merge changes a newer one."""

    def __init__(self, volume):
        self.volume = volume
        self.cycle = 0
        self._reader = None

    def __enter__(self) -> MergeHold:
        cycles = self.volume.frozen_cycles()
        low = cycles[0] - 1 if cycles else self.volume.open_overlay
        for k in range(max(1, low), self.volume.open_overlay + 1):
            reader = _reader_of(self.volume, k)
            try:
                reader.__enter__()
            except NotFoundError:
                continue  # merged (or being merged) since we looked: the next one
            self._reader, self.cycle = reader, k
            return self
        raise NotFoundError(f"volume {self.volume.name!r} has no frozen cycle to verify "
                            "against (it was never frozen: start its mirror first)")

    def __exit__(self, *exc) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


@dataclass
class VerifyOutcome:
    """What a run found; ``mismatched`` holds the member volume's differing blocks."""

    volume: str
    target: str
    index: int
    offset: int
    length: int
    block_size: int
    mismatched: ExtentBitmap
    resumed_from: int = 0
    cycles: list = field(default_factory=list)  # [lowest, highest] cycle compared
    source_bytes_read: int = 0
    wire_sent: int = 0
    wire_received: int = 0
    duration: float = 0.0
    target_node: str | None = None


class _Request:
    __slots__ = ("index", "offset", "length", "unit", "next", "left", "owner", "top")

    def __init__(self, index, offset, length, unit, owner, top):
        self.index, self.offset, self.length, self.unit = index, offset, length, unit
        self.next = offset
        self.left = rangehash.count_pieces(offset, length, unit)
        self.owner, self.top = owner, top


class VerifyRun:
    """Compare member ``index`` of ``subject`` with its image on one target (see above)."""

    def __init__(self, subject, index: int, store, spec, *, offset: int = 0,
                 length: int | None = None, read_rate: int = 0, resume_from: int | None = None,
                 found: ExtentBitmap | None = None, expect_node: str | None = None,
                 on_progress: Callable | None = None, cancel: threading.Event | None = None,
                 merges=None):
        self.subject = subject
        self.index = index
        self.volume = subject.volumes[index]
        self.store = store
        self.spec = spec
        vol = self.volume
        bs = vol.block_size
        if length is None or length == 0:
            length = vol.size - offset
        if offset % bs or length % bs or offset < 0 or length <= 0 or offset + length > vol.size:
            raise UsageError(f"verify of {vol.name!r}: --offset {offset} / --length {length} "
                             f"must be whole blocks of {bs} inside the volume's {vol.size} "
                             "bytes")
        self.offset, self.length, self.end = offset, length, offset + length
        self.start = offset if resume_from is None else resume_from
        if not offset <= self.start <= self.end or (self.start - offset) % bs:
            raise UsageError(f"verify of {vol.name!r}: cannot resume at byte {self.start}")
        self.read_rate = read_rate
        self.throttle = RateLimiter(read_rate).consume if read_rate else None
        self.expect_node = expect_node
        self.merges = merges  # the mirror's driver: hold_merges() / release_merges()
        self.on_progress = on_progress
        self.cancel = cancel or threading.Event()
        self._stop = threading.Event()  # ends our threads when the run ends
        self.levels = rangehash.levels(bs)
        self.found = found.copy() if found is not None else ExtentBitmap(vol.nblocks)
        self.outcome = VerifyOutcome(vol.name, spec.label, index, offset, length, bs,
                                     self.found, resumed_from=self.start - offset)

    # -- the run ------------------------------------------------------------------------
    def run(self) -> VerifyOutcome:
        t0 = time.monotonic()
        if self.merges is not None:
            self.merges.hold_merges()
        try:
            with MergeHold(self.volume) as hold:
                self.hold = hold
                self._readers: dict[int, object] = {}
                self._changed: dict[int, ExtentBitmap] = {}
                try:
                    self._run()
                finally:
                    for reader in self._readers.values():
                        reader.close()
        finally:
            if self.merges is not None:
                self.merges.release_merges()
        self.outcome.duration = time.monotonic() - t0
        return self.outcome

    def _check(self) -> None:
        if self.cancel.is_set() or self._stop.is_set():
            raise ConnectionLostError(f"verify of {self.volume.name!r} to {self.spec.label} "
                                      "was cancelled")

    def _run(self) -> None:
        spec = self.spec
        link = TargetLink((spec.host, spec.port), spec.key, tls=spec.tls,
                          insecure=spec.insecure).dial()
        self.link = link
        try:
            link.sock.settimeout(OPEN_TIMEOUT)
            link.send_message(
                "verify_open", node_id=self.store.node_id, node_name=self.store.node_name,
                mirror=self.subject.remote_name, group=self.subject.group,
                volumes=self.subject.volume_specs(), read_rate=self.read_rate)
            opened = link.recv_message({"verify_opened"})
            link.sock.settimeout(None)  # keepalive finds a dead peer; hashing may take long
            self._opened(opened)
            self._compare()
            link.send_message("verify_result", index=self.index, offset=self.offset,
                              length=self.length, cycle=self.outcome.cycles[-1],
                              mismatched_blocks=self.found.count())
        finally:
            self.outcome.wire_sent = link.bytes_sent
            self.outcome.wire_received = link.bytes_received
            link.close()

    def _opened(self, opened: dict) -> None:
        label, vol = self.spec.label, self.volume
        self.outcome.target_node = opened["node_id"]
        if self.expect_node is not None and opened["node_id"] != self.expect_node:
            raise ProtocolError(
                f"verify of {vol.name!r}: {label} is now store {opened['node_id']}, not the "
                f"store {self.expect_node} this mirror ships to; nothing to compare")
        a0 = opened["applied_cycle"]
        if a0 <= 0:
            raise NotFoundError(f"target {label} has no applied cycle of {vol.name!r} yet")
        if a0 > vol.open_overlay:
            raise ProtocolError(f"target {label} claims cycle {a0} of {vol.name!r}, newer than "
                                f"its newest freeze {vol.open_overlay}")
        if a0 < self.hold.cycle:
            raise CycleGoneError(
                f"target {label} holds cycle {a0} of {vol.name!r}, which the source has merged "
                f"away (it keeps cycles {self.hold.cycle}..{vol.open_overlay}): the target "
                "lags; verify again once it caught up ('cyclemirror mirror sync')")
        self.first_cycle = a0
        self.outcome.cycles = [a0, a0]

    # -- our digests --------------------------------------------------------------------
    def _reader(self, k: int):
        reader = self._readers.get(k)
        if reader is None:
            reader = _reader_of(self.volume, k)
            reader.__enter__()
            self._readers[k] = reader
        return reader

    def _hash_span(self, reader, offset: int, length: int) -> np.ndarray:
        bs = self.volume.block_size
        blocks = ExtentBitmap(self.volume.nblocks)
        blocks.set_range(offset // bs, length // bs)
        digests, n = rangehash.hash_extents(reader.extents(blocks, 1 << 16), offset, length,
                                            bs, self.throttle, self._check)
        self.outcome.source_bytes_read += n
        return digests

    def _changed_since_first(self, k: int) -> ExtentBitmap | None:
        """Blocks where images first_cycle and k may differ (None: all of them)."""
        got = self._changed.get(k)
        if got is not None or k in self._changed:
            return got
        acc = ExtentBitmap(self.volume.nblocks)
        start = self.first_cycle
        for j in sorted(self._changed):
            if j < k and self._changed[j] is not None:
                acc, start = self._changed[j].copy(), j
        for j in range(start + 1, k + 1):
            dirty = self.volume.frozen(j).dirty  # overlay j-1: unmerged while we hold
            if dirty is None:
                self._changed[k] = None
                return None
            acc.union_update(dirty)
        self._changed[k] = acc
        return acc

    def _blocks_at(self, piece: int, k: int) -> np.ndarray:
        """Our block digests of top piece ``piece`` in image ``k``."""
        off, ln = self.pieces[piece]
        base = self.mine[piece]
        if k == self.first_cycle:
            return base
        cached = self._patched.get((piece, k))
        if cached is not None:
            return cached
        bs = self.volume.block_size
        changed = self._changed_since_first(k)
        b0 = off // bs
        if changed is None:
            out = self._hash_span(self._reader(k), off, ln)
        else:
            out = base
            for start, count in changed.iter_runs(b0, b0 + ln // bs):
                if out is base:
                    out = base.copy()
                out[start - b0:start - b0 + count] = self._hash_span(
                    self._reader(k), start * bs, count * bs)
        self._patched[(piece, k)] = out
        return out

    def _hasher(self) -> None:
        try:
            reader = _reader_of(self.volume, self.first_cycle)
            with reader:
                for piece, (off, ln) in enumerate(self.pieces):
                    with self._cond:
                        while piece - self._first_open >= WINDOW and not self._stop.is_set():
                            self._cond.wait(0.5)
                    self._check()
                    self._events.put(("mine", piece, self._hash_span(reader, off, ln)))
        except BaseException as exc:  # noqa: BLE001 - handed to the main loop
            self._events.put(("error", exc))

    def _listen(self) -> None:
        try:
            while True:
                self._events.put(("msg", self.link.recv_message({"verify_hashes"})))
        except BaseException as exc:  # noqa: BLE001 - handed to the main loop
            self._events.put(("error", exc))

    # -- the comparison -----------------------------------------------------------------
    def _compare(self) -> None:
        top = self.levels[0]
        self.pieces = list(rangehash.pieces(self.start, self.end - self.start, top))
        n = len(self.pieces)
        self.mine: dict[int, np.ndarray] = {}
        self.theirs: dict[int, tuple[int, int]] = {}
        self._patched: dict = {}
        self.waiting = [0] * n  # finer requests outstanding per piece
        self.resolved = [False] * n
        self._first_open = 0
        self._cond = threading.Condition()
        self._events: queue.Queue = queue.Queue()
        self.requests: list[_Request] = []
        self.backlog: list[_Request] = []
        self._topped: set[int] = set()  # pieces whose top digests were compared
        if n == 0:
            self._progress()
            return
        pos = 0
        while pos < n:  # top-level requests of at most MAX_HASH_BLOCKS pieces each
            first_off = self.pieces[pos][0]
            last = min(n, pos + messages.MAX_HASH_BLOCKS) - 1
            end = self.pieces[last][0] + self.pieces[last][1]
            self._send(_Request(self.index, first_off, end - first_off, top, None, True))
            pos = last + 1
        threads = [threading.Thread(target=self._hasher, daemon=True, name="verify-hash"),
                   threading.Thread(target=self._listen, daemon=True, name="verify-listen")]
        for t in threads:
            t.start()
        try:
            while self._first_open < n:
                kind, *rest = self._events.get()
                if kind == "error":
                    raise rest[0]
                if kind == "mine":
                    piece, digests = rest
                    self.mine[piece] = digests
                    self._try_top(piece)
                else:
                    self._answer(rest[0])
                if self._advance():
                    self._progress()  # once per 64 MiB piece at most: what a resume needs
            self._progress()
        finally:
            self._stop.set()  # stops the hasher; the listener ends when the link closes
            with self._cond:
                self._cond.notify_all()

    def _send(self, req: _Request) -> None:
        if not req.top and len([r for r in self.requests if not r.top]) >= MAX_IN_FLIGHT:
            self.backlog.append(req)
            return
        self.requests.append(req)
        self.link.send_message("verify_request", index=req.index, offset=req.offset,
                               length=req.length, unit=req.unit)

    def _answer(self, msg: dict) -> None:
        vol, label = self.volume, self.spec.label
        match = [r for r in self.requests if r.index == msg["index"] and r.unit == msg["unit"]
                 and r.next == msg["offset"]]
        if len(match) != 1:
            raise ProtocolError(
                f"verify of {vol.name!r}: {label} sent digests of {msg['offset']} at unit "
                f"{msg['unit']} (member {msg['index']}), which no request of ours asks for")
        req = match[0]
        count = msg["count"]
        if not 1 <= count <= req.left:
            raise ProtocolError(f"verify of {vol.name!r}: {label} sent {count} digests where "
                                f"1..{req.left} were asked for at {req.next}")
        if len(msg["digests"]) != 16 * count:
            raise ProtocolError(f"verify of {vol.name!r}: {label} sent "
                                f"{len(msg['digests']) // 16} digests but says {count}")
        cycle = msg["cycle"]
        if not self.first_cycle <= cycle <= vol.open_overlay:
            raise ProtocolError(f"verify of {vol.name!r}: {label} sent digests of cycle "
                                f"{cycle}, outside {self.first_cycle}..{vol.open_overlay}")
        theirs = rangehash.digests_from_hex(msg["digests"])
        spans = []
        pos = req.next
        for _ in range(count):
            stop = min(req.offset + req.length, (pos // req.unit + 1) * req.unit)
            spans.append((pos, stop - pos))
            pos = stop
        req.next, req.left = pos, req.left - count
        if req.left == 0:
            self.requests.remove(req)
        self.outcome.cycles = [min(self.outcome.cycles[0], cycle),
                               max(self.outcome.cycles[1], cycle)]
        if req.top:
            for (off, _ln), digest in zip(spans, theirs.tolist(), strict=True):
                piece = self._piece_of(off)
                self.theirs[piece] = (cycle, digest)
                self._try_top(piece)
        else:
            self._detail(req, spans, theirs, cycle)
        while self.backlog and len([r for r in self.requests if not r.top]) < MAX_IN_FLIGHT:
            self._send(self.backlog.pop(0))

    def _piece_of(self, offset: int) -> int:
        top = self.levels[0]
        return (offset // top) - (self.start // top)

    def _try_top(self, piece: int) -> None:
        if piece not in self.mine or piece not in self.theirs or self.resolved[piece]:
            return
        if piece in self._topped:
            return
        self._topped.add(piece)
        cycle, digest = self.theirs[piece]
        off, ln = self.pieces[piece]
        bs = self.volume.block_size
        ours = rangehash.piece_digests(self._blocks_at(piece, cycle), off, ln,
                                       self.levels[0], bs)
        if int(ours[0]) == digest:
            self.resolved[piece] = True
            return
        self._descend(piece, [(off, ln)], 1)

    def _descend(self, piece: int, spans: list[tuple[int, int]], level: int) -> None:
        """Ask for the digests of these spans of ``piece`` at ``levels[level]``."""
        unit = self.levels[level]
        # Neighbouring spans go in one request, up to the message cap.
        merged: list[list[int]] = []
        for off, ln in spans:
            if merged and merged[-1][0] + merged[-1][1] == off and rangehash.count_pieces(
                    merged[-1][0], merged[-1][1] + ln, unit) <= messages.MAX_HASH_BLOCKS:
                merged[-1][1] += ln
            else:
                merged.append([off, ln])
        for off, ln in merged:
            self.waiting[piece] += 1
            self._send(_Request(self.index, off, ln, unit, piece, False))

    def _detail(self, req: _Request, spans, theirs: np.ndarray, cycle: int) -> None:
        piece = req.owner
        p_off, p_len = self.pieces[piece]
        bs = self.volume.block_size
        blocks = self._blocks_at(piece, cycle)
        first = (spans[0][0] - p_off) // bs
        span_len = sum(ln for _o, ln in spans)
        ours = rangehash.piece_digests(blocks[first:first + span_len // bs], spans[0][0],
                                       span_len, req.unit, bs)
        differ = [span for span, a, b in zip(spans, ours.tolist(), theirs.tolist(), strict=True)
                  if a != b]
        if differ:
            if req.unit == bs:
                for off, ln in differ:
                    self.found.set_range(off // bs, ln // bs)
            else:
                self._descend(piece, differ, self.levels.index(req.unit) + 1)
        if req.left == 0:
            self.waiting[piece] -= 1
            if self.waiting[piece] == 0:
                self.resolved[piece] = True

    def _advance(self) -> bool:
        moved = False
        while self._first_open < len(self.pieces) and self.resolved[self._first_open]:
            piece = self._first_open
            self.mine.pop(piece, None)
            self.theirs.pop(piece, None)
            for key in [k for k in self._patched if k[0] == piece]:
                del self._patched[key]
            self._topped.discard(piece)
            self._first_open += 1
            moved = True
        if moved:
            with self._cond:
                self._cond.notify_all()
        return moved

    def _progress(self) -> None:
        if self.on_progress is None:
            return
        if self._first_open < len(self.pieces):
            done = self.pieces[self._first_open][0]
        else:
            done = self.end
        self.on_progress(done, self.found, self.outcome)
