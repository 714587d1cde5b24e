"""The target's side of a verify: hash spans of a mirror image, each at one applied cycle.

A source opens its own connection with ``verify_open`` (docs/verify.md); the
session that reads it hands the connection here, so a verify never takes
the mirror from the session that receives cycles: mirroring goes on.

**One cycle per span, without holding applies up.**  Every digest we send
says which applied cycle it was taken at.  ``ImageSpans.hash_span`` reads the
mirror's state file (the apply journal), hashes the span from the image, and
reads the state again: a cycle's apply writes the image only between its
commit point (state ``committed`` set) and the state that records it as
applied, so when both reads show the same applied cycle and no commit, no
apply touched the image in between and the span is exactly that cycle's.
Otherwise the span is read again (an apply came by); after ``OPTIMISTIC_TRIES``
such tries it is read under an image pin (``readers.IMAGE_PINS``), which
makes an apply that starts meanwhile write a clone instead (that costs the
clone, so it is the fallback, not the rule).  The source then compares each
span with its own frozen image of the cycle the span names.

**Serving requests.**  ``verify_request`` asks for the digests of a span at
a unit (docs/verify.md): top-level requests (64 MiB pieces) are answered one
piece at a time, as hashed, by one worker thread; finer requests (a piece
that differed) by a second one meanwhile, from the block digests of recently
hashed spans (``CACHE_SPANS``) when it lies inside one, else by hashing it
again -- at whatever cycle the image is then, which the answer says.  The
session thread reads requests.  Every
request is checked (member, unit, alignment, bounds, count, queue depth)
before it is queued.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import socket
import threading
import time

from cyclemirror.errors import (
    ConnectionLostError,
    CycleMirrorError,
    DeadlineError,
    NotFoundError,
    ProtocolError,
    UsageError,
)
from cyclemirror.fileio import atomic_write
from cyclemirror.receiver.readers import IMAGE_PINS
from cyclemirror.receiver.state import MirrorState
from cyclemirror.sender.ratelimit import RateLimiter
from cyclemirror.store import rangehash
from cyclemirror.wire import messages

log = logging.getLogger(__name__)

OPTIMISTIC_TRIES = 3
APPLY_WAIT = 300.0  # seconds to wait for an apply under way before giving up on a span
POLL = 0.02
CACHE_SPANS = 16
MAX_QUEUED = 1024  # requests a source may have outstanding


def _state_key(state_path: str) -> tuple[int, float] | None:
    """(applied cycle, freeze time), or None while an apply is under way (committed)."""
    st = MirrorState.load(state_path)
    if st.committed is not None:
        return None
    return st.applied_cycle, st.freeze_time


class ImageSpans:
    """Spans of one member image, each read at one applied cycle (see the module docstring)."""

    def __init__(self, state_path: str, image_path: str, block_size: int, throttle=None,
                 check=None):
        self.state_path = state_path
        self.image_path = image_path
        self.block_size = block_size
        self.throttle = throttle
        self.check = check
        self.bytes_read = 0
        self.retries = 0  # spans read again because an apply came by
        self.pinned_reads = 0

    def state_key(self) -> tuple[int, float] | None:
        return _state_key(self.state_path)

    def stable_key(self, timeout: float = APPLY_WAIT) -> tuple[int, float]:
        """The applied cycle once no apply is under way (waits for one to finish)."""
        deadline = time.monotonic() + timeout
        while True:
            key = self.state_key()
            if key is not None:
                return key
            if self.check is not None:
                self.check()
            if time.monotonic() > deadline:
                raise DeadlineError(f"mirror image {self.image_path}: an apply has been under "
                                    f"way for over {timeout:g}s; verify again later")
            time.sleep(POLL)

    def hash_span(self, offset: int, length: int):
        """(cycle, freeze time, block digests) of ``[offset, offset + length)``."""
        for _ in range(OPTIMISTIC_TRIES):
            key = self.stable_key()
            digests = self._hash(offset, length)
            if self.state_key() == key:
                return key[0], key[1], digests
            self.retries += 1
        # Applies keep coming by: read under a pin, so the next apply writes a clone.
        IMAGE_PINS.pin(self.state_path)
        try:
            while True:
                key = self.stable_key()
                fd = os.open(self.image_path, os.O_RDONLY)
                try:
                    # An apply that committed before our pin renames its clone in
                    # while committed is set: the key then changes and we look again.
                    if self.state_key() != key:
                        continue
                    self.pinned_reads += 1
                    digests = self._hash_fd(fd, offset, length)
                    return key[0], key[1], digests
                finally:
                    os.close(fd)
        finally:
            IMAGE_PINS.unpin(self.state_path)

    def _hash(self, offset: int, length: int):
        try:
            fd = os.open(self.image_path, os.O_RDONLY)
        except FileNotFoundError:
            raise NotFoundError(f"mirror image {self.image_path} is gone") from None
        try:
            return self._hash_fd(fd, offset, length)
        finally:
            os.close(fd)

    def _hash_fd(self, fd: int, offset: int, length: int):
        digests, n = rangehash.hash_file_span(fd, offset, length, self.block_size,
                                              self.throttle, self.check)
        self.bytes_read += n
        return digests


def mirror_state_path(root: str, node_id: str, mirror: str, group: bool) -> str:
    directory = os.path.join(root, "mirrors", node_id)
    return os.path.join(directory, mirror + (".group.json" if group else ".state.json"))


def verify_record_path(image_path: str) -> str:
    """The last verify a source reported for this image (informational, for status)."""
    return image_path[: -len(".img")] + ".verify.json" if image_path.endswith(".img") \
        else image_path + ".verify.json"


class VerifyTarget:
    """One verify connection on the target; ``run()`` returns when the source is done."""

    def __init__(self, server, link, msg: dict):
        self.server = server
        self.link = link
        self.state_path = mirror_state_path(server.root, msg["node_id"], msg["mirror"],
                                            msg["group"])
        who = msg["node_name"] or msg["node_id"]
        if not os.path.exists(self.state_path):
            raise NotFoundError(f"verify: this target holds no mirror {msg['mirror']!r} of "
                                f"source {who}")
        st = MirrorState.load(self.state_path)
        have = [(v.name, v.size, v.block_size) for v in st.volumes]
        want = [(v["name"], v["size"], v["block_size"]) for v in msg["volumes"]]
        if have != want:
            raise ProtocolError(f"verify of mirror {msg['mirror']!r} of source {who}: the "
                                f"source names volumes {want}, this target holds {have}")
        if st.applied_cycle <= 0:
            raise NotFoundError(f"verify: mirror {msg['mirror']!r} of source {who} has no "
                                "applied cycle yet")
        in_rbd = bool(st.extra.get("backend"))
        if in_rbd and getattr(server, "rbd", None) is None:
            raise UsageError(f"verify: mirror {msg['mirror']!r} of source {who} is kept in "
                             "RBD, and this daemon was started without --rbd-pool")
        self.mirror = msg["mirror"]
        self.volumes = st.volumes
        directory = os.path.dirname(self.state_path)
        rate = msg["read_rate"]
        throttle = RateLimiter(rate).consume if rate else None
        self._stop = threading.Event()
        if in_rbd:  # each span hashed from one cycle's snapshot
            from cyclemirror.receiver.rbdbackend import RbdImageSpans

            self.images = [RbdImageSpans(server.rbd, self.state_path, st.source_node, v.name,
                                         v.block_size, throttle, self._check)
                           for v in st.volumes]
        else:
            self.images = [ImageSpans(self.state_path,
                                      os.path.join(directory, v.name + ".img"),
                                      v.block_size, throttle, self._check)
                           for v in st.volumes]
        self._cond = threading.Condition()
        self._top: collections.deque = collections.deque()  # [index, offset, end, unit]
        self._detail: collections.deque = collections.deque()  # (index, offset, length, unit)
        self._cache: collections.deque = collections.deque(maxlen=CACHE_SPANS)
        self._queued = 0
        self.error: BaseException | None = None

    def _check(self) -> None:
        if self._stop.is_set():
            raise ConnectionLostError("verify connection closed")

    def run(self) -> None:
        key = self.images[0].stable_key()
        self.link.send_message("verify_opened", node_id=self.server.node_id,
                               applied_cycle=key[0], freeze_time=key[1])
        workers = [threading.Thread(target=self._work, args=(detail,), daemon=True,
                                    name="verify-target") for detail in (False, True)]
        for worker in workers:
            worker.start()
        try:
            while True:
                try:
                    msg = self.link.recv_message({"verify_request", "verify_result"})
                except ConnectionLostError as exc:
                    if self.error is not None:
                        raise self.error from None
                    if getattr(exc, "clean", False):
                        return
                    raise
                if msg["type"] == "verify_result":
                    self._record_result(msg)
                    continue
                self._queue(msg)
        finally:
            self._stop.set()
            with self._cond:
                self._cond.notify_all()
            for worker in workers:
                worker.join(30)

    def _queue(self, msg: dict) -> None:
        index, offset, length, unit = msg["index"], msg["offset"], msg["length"], msg["unit"]
        if index >= len(self.volumes):
            raise ProtocolError(f"verify_request: member {index} does not exist")
        vol = self.volumes[index]
        bs = vol.block_size
        if unit not in rangehash.levels(bs):
            raise ProtocolError(f"verify_request: unit {unit} is not one of "
                                f"{rangehash.levels(bs)} for volume {vol.name!r}")
        if (offset % bs or length % bs or length == 0 or offset + length > vol.size):
            raise ProtocolError(f"verify_request: span {offset}+{length} is not whole blocks "
                                f"of {bs} inside volume {vol.name!r} of {vol.size} bytes")
        if rangehash.count_pieces(offset, length, unit) > messages.MAX_HASH_BLOCKS:
            raise ProtocolError(f"verify_request: span {offset}+{length} at unit {unit} is "
                                f"over {messages.MAX_HASH_BLOCKS} pieces")
        top = unit == rangehash.levels(bs)[0]
        if not top and offset // rangehash.RANGE != (offset + length - 1) // rangehash.RANGE:
            raise ProtocolError(f"verify_request: a finer request ({offset}+{length} at "
                                f"{unit}) must lie inside one {rangehash.RANGE}-byte range")
        with self._cond:
            if self._queued >= MAX_QUEUED:
                raise ProtocolError(f"verify: over {MAX_QUEUED} requests outstanding")
            self._queued += 1
            if top:
                self._top.append([index, offset, offset + length, unit])
            else:
                self._detail.append((index, offset, length, unit))
            self._cond.notify_all()

    def _next(self, detail: bool):
        """The next piece of work for the detail or the top-level worker (None: stop)."""
        with self._cond:
            queue_ = self._detail if detail else self._top
            while not (queue_ or self._stop.is_set()):
                self._cond.wait()
            if self._stop.is_set():
                return None
            if detail:
                self._queued -= 1
                return self._detail.popleft()
            req = self._top[0]
            index, pos, end, unit = req
            stop = min(end, (pos // unit + 1) * unit)
            req[1] = stop
            if stop >= end:
                self._top.popleft()
                self._queued -= 1
            return index, pos, stop - pos, unit

    def _work(self, detail: bool) -> None:
        """One worker: top-level pieces, or finer requests (answered meanwhile, mostly from
        the cache, so a differing piece is narrowed down while the next one is hashed)."""
        try:
            while True:
                item = self._next(detail)
                if item is None:
                    return
                index, offset, length, unit = item
                cycle, digests = self._digests(index, offset, length)
                bs = self.volumes[index].block_size
                out = rangehash.piece_digests(digests, offset, length, unit, bs)
                self.link.send_message("verify_hashes", index=index, offset=offset, unit=unit,
                                       count=len(out), cycle=cycle,
                                       digests=rangehash.digests_to_hex(out))
        except BaseException as exc:  # noqa: BLE001 - told to the source, then the link closes
            if self._stop.is_set():
                return
            self._stop.set()
            self.error = exc
            log.warning("verify of mirror %s: %s: %s", self.mirror, type(exc).__name__, exc)
            self.link.send_error(exc, type(exc).__name__ if isinstance(exc, CycleMirrorError)
                                 else "internal")
            try:
                self.link.sock.shutdown(socket.SHUT_RDWR)
            except OSError as err:
                if err.errno != errno.ENOTCONN:
                    log.debug("verify: shutdown: %s", err)

    def _digests(self, index: int, offset: int, length: int):
        """(cycle, block digests) of the span: from a cached span that holds it, else read."""
        bs = self.volumes[index].block_size
        with self._cond:
            cached = list(self._cache)
        for c_index, c_off, c_len, cycle, digests in cached:
            if c_index == index and c_off <= offset and offset + length <= c_off + c_len:
                first = (offset - c_off) // bs
                return cycle, digests[first:first + length // bs]
        cycle, _ft, digests = self.images[index].hash_span(offset, length)
        with self._cond:
            self._cache.append((index, offset, length, cycle, digests))
        return cycle, digests

    def _record_result(self, msg: dict) -> None:
        index = msg["index"]
        if index >= len(self.volumes):
            raise ProtocolError(f"verify_result: member {index} does not exist")
        image = self.images[index]
        body = {"time": time.time(), "cycle": msg["cycle"], "offset": msg["offset"],
                "length": msg["length"], "mismatched_blocks": msg["mismatched_blocks"],
                "bytes_read": image.bytes_read}
        path = verify_record_path(image.image_path)
        try:  # several verifies of one image may end at once: each has its own temp name
            atomic_write(path, (json.dumps(body, sort_keys=True) + "\n").encode(), 0o644)
        except OSError as exc:  # only status reads it: never fail the verify for it
            log.warning("mirror %s: cannot record the verify result in %s: %s", self.mirror,
                        path, exc)
        log.info("mirror %s: the source verified %s at cycle %d: %d blocks differ", self.mirror,
                 self.volumes[index].name, msg["cycle"], msg["mismatched_blocks"])


def serve_verify(server, link, msg: dict) -> None:
    """Run a verify connection that began with ``verify_open`` (see VerifyTarget)."""
    VerifyTarget(server, link, msg).run()
