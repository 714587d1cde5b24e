"""``--compress auto``: per batch, the codec and level that ship a cycle fastest.

Design.  A cycle's frames are packed (read, compressed) by a pool of threads
while each target's sender thread puts earlier ones on the wire, so a
batch's cost is that of the slower of the two stages.  For ``raw`` bytes
packed with candidate *c* that is ``max(raw / cpu_c, raw * ratio_c / link)``
with ``cpu_c`` the raw bytes per second one packing thread achieves with *c*
(times the pool's threads), timed by the wall clock while it packs: a CPU
shared with other work (the target on the same host, other daemons) makes
a codec slower, which CPU time would not show; ``ratio_c`` the wire bytes per raw byte it
produces, and ``link`` the bytes per second the slowest target's link
(including ``--bwlimit``) takes.  ``choose`` picks the candidate with the
least cost; it is pure and does no I/O, so it is tested alone.

The candidates run from ``none`` (bytes as they are: the cheapest on CPU, the
most on the wire) through lz4 to zstd 9.  ``none`` wins when the link takes
raw bytes faster than the threads can compress them (loopback, 10 GbE).  It
needs a measured link rate to be chosen: by CPU alone it would always win.

``AdaptivePacker`` is a ``FramePacker`` to the shipping code: it holds one
packer per candidate, packs each batch with the current choice, and learns
from what it sees: the time and the output size of every batch (an
exponentially weighted mean per candidate), and ``observe_link(label,
bytes, seconds, busy)`` from the sender threads, measured by a ``LinkMeter``:
the bytes the peer acknowledged (sent minus the socket's unsent queue,
``SIOCOUTQ``) per second, sampled just before each send.  Timing the sends
themselves would measure the kernel's socket buffer (megabytes), not the
link.  Over an interval in which the queue never ran empty (``busy``: it is
not empty at the end, and it only drains between two sends) that is the
link's rate and goes into the running mean.  An interval at whose end the
queue is empty had the link idle part of the time (the sender waited for
the packer): its rate is only a lower bound (the link took at least that
much), and it raises the estimate when it is above it, never lowers it.
Without these lower bounds a link faster than the packer (whose queue is
always empty) would never be measured, and ``none`` never chosen.
Every ``EXPLORE_EVERY``-th batch goes to a neighbour of the choice (the
level above, then the one below), so the estimates near the choice stay
current when the data or the link changes: from lz4 that is zstd 1 and
``none``, whose fast batches are what shows a fast link its lower bound.
The very first batch goes to ``none`` (``PROBE``): its frames reach the
sender at once, so the first sample of the link (which sets the estimate
outright) is taken at the pace of raw bytes, not of a codec: on a link
faster than the packer, where only lower bounds are ever measured, a
first estimate at zstd 1's pace is slow to climb (they only raise it).  The next batch goes to zstd 1 (``FIRST``),
and the batches packed before
the link is measured go to it too (a first cycle packs a few batches ahead
of the first send: on a slow link each of them packed with lz4 shipped a
third more bytes than zstd 1, on a fast one zstd 1 costs a few
milliseconds more CPU per batch).  Every other candidate gets its first
batch only once the link is measured and a lower bound of its cost is
under the choice's cost (``worth_trying``): a level above a measured one
is no faster on CPU than it, a level below one (lz4 and ``none`` below
zstd 1) ships no fewer bytes than it.  So a fast link never pays for a
first batch of zstd 9, and a slow one never ships a batch of lz4 or
``none`` just to learn that they lose.  Without a link rate the choice is
by CPU alone among the codecs that compress (zstd 1 at first, the only one
measured).  A batch that tries or explores another candidate than the
choice is packed with the choice as well when the choice is link-bound
(``link_bound``: the threads pack faster than the link takes it, so they
have time to spare), and the smaller of the two is shipped: on a slow link
learning costs idle CPU, not wire bytes, and a batch that another codec
happens to pack smaller ships smaller than with a fixed codec.

Determinism.  Resuming a cycle regenerates its frames and skips the first
N; that stays correct because chunk boundaries depend only on raw lengths
(``chunk_size``), never on the codec, and every frame names its own codec:
a resumed cycle may compress a chunk differently, never cover different
bytes.
"""

from __future__ import annotations

import fcntl
import logging
import struct
import termios
import threading
import time
from collections.abc import Sequence

from cyclemirror._cext import frames

# (codec, level), from the least CPU to the fewest bytes: none when the link outruns the
# compressors, lz4 when the CPU is the limit, zstd at higher levels the slower the link.
CANDIDATES: tuple[tuple[str, int], ...] = (("none", 0), ("lz4", 0), ("zstd", 1), ("zstd", 3),
                                           ("zstd", 9))
PROBE = ("none", 0)  # the very first batch: its frames go out at once (see the docstring)
FIRST = ("zstd", 1)  # the next, and the choice while the link is not measured
EXPLORE_EVERY = 16  # one batch in this many tries another candidate
WEIGHT = 0.3  # of a new observation in the running means
log = logging.getLogger(__name__)
_CODE = {"none": frames.CODEC_NONE, "lz4": frames.CODEC_LZ4, "zstd": frames.CODEC_ZSTD}


class LinkMeter:
    """The delivery rate of one connection: acknowledged bytes per second while busy."""

    def __init__(self, sock):
        self.sock = sock
        self._last: tuple[float, int, int] | None = None  # (time, delivered, unsent)

    def unsent(self) -> int:
        raw = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # = SIOCOUTQ
        return struct.unpack("i", raw)[0]

    def sample(self, bytes_sent: int) -> tuple[int, float, bool] | None:
        """(bytes delivered, seconds, busy) since the previous sample.

        Call it just before each send, with the bytes sent so far.  ``busy``:
        the unsent queue is not empty now.  Since the previous sample the
        queue only grew once (the previous send) and drained otherwise, so
        it never ran empty in between: the link had data to carry all along
        and the figures are its rate.  Else they are a lower bound of it (the
        link idled while the sender waited for the packer or ``--bwlimit``).
        """
        try:
            unsent = self.unsent()
        except OSError:
            return None
        now = time.monotonic()
        delivered = bytes_sent - unsent
        prev, self._last = self._last, (now, delivered, unsent)
        if prev is None or now <= prev[0]:
            return None
        return delivered - prev[1], now - prev[0], unsent > 0


def label(candidate: tuple[str, int]) -> str:
    codec, level = candidate
    return f"{codec}:{level}" if level else codec


def choose(link_rate: float | None, cpu_rates: Sequence[float | None],
           ratios: Sequence[float | None], threads: int = 1, *,
           stored: int | None = None, first: int = 0) -> int:
    """The index of the candidate with the least cost per raw byte (see the docstring).

    A candidate never measured (None) is not chosen, unless none is measured
    (then ``first``).  Without a link rate the cheapest on CPU wins, except
    ``stored`` (the index of the candidate that does not compress, if any),
    which is chosen only against a measured link: by CPU alone it always wins.
    """
    best, best_cost = first, None
    has_link = link_rate is not None and link_rate > 0
    for i, (cpu, ratio) in enumerate(zip(cpu_rates, ratios, strict=True)):
        if cpu is None or ratio is None or cpu <= 0 or (i == stored and not has_link):
            continue
        c = cost(link_rate, cpu, ratio, threads)
        if best_cost is None or c < best_cost:
            best, best_cost = i, c
    return best


def cost(link_rate: float | None, cpu_rate: float, ratio: float, threads: int = 1) -> float:
    """Seconds per raw byte: the slower of packing (``threads`` at ``cpu_rate``) and the link."""
    c = 1.0 / (cpu_rate * max(1, threads))
    if link_rate is not None and link_rate > 0:
        c = max(c, ratio / link_rate)
    return c


def link_bound(link_rate: float | None, cpu_rate: float | None, ratio: float | None,
               threads: int = 1, *, link_busy: bool = True) -> bool:
    """Whether a candidate's cost is the link's: it packs faster than the link takes it.

    Then the packing threads have time to spare, and an exploring batch is
    packed with the choice too and the smaller result shipped
    (``AdaptivePacker``): exploring costs no wire bytes where bytes are the
    cost.  Unknown figures say no, and so does a link rate made of lower
    bounds only (not ``link_busy``: a link faster than the packer, whose
    estimate is the packer's own pace).
    """
    if (not link_busy or link_rate is None or link_rate <= 0 or cpu_rate is None
            or cpu_rate <= 0 or ratio is None):
        return False
    return ratio / link_rate > 1.0 / (cpu_rate * max(1, threads))


def worth_trying(i: int, link_rate: float | None, cpu_rates: Sequence[float | None],
                 ratios: Sequence[float | None], threads: int, chosen: int,
                 always: Sequence[int] = (), *, link_busy: bool = False) -> bool:
    """Whether the untried candidate ``i`` could beat the choice (pure, like ``choose``).

    The candidates ``always`` are (the first one).  The others need a
    measured link, and a lower bound of their cost under the choice's cost.
    Candidates run from the least CPU to the fewest bytes, so a level above
    the nearest measured one below it is no faster on CPU than that one
    (``1 / (cpu_below * threads)`` bounds its cost), and a level below the
    nearest measured one above it ships no fewer bytes (``ratio_above /
    link``), a bound only when ``link_rate`` is the link's own rate
    (``link_busy``: measured while its queue never ran empty); a rate from
    lower bounds alone (a link faster than the packer) may be far below
    it.  So a fast link never pays for a first batch of zstd 9, a slow one
    never ships a batch of lz4 or ``none`` only to learn that they lose,
    and each still measures whatever could win before its first cycle is
    far along.
    """
    if i in always:
        return True
    if link_rate is None or link_rate <= 0:
        return False
    chosen_cpu, chosen_ratio = cpu_rates[chosen], ratios[chosen]
    if chosen_cpu is None or chosen_ratio is None or chosen_cpu <= 0:
        return True
    measured = [j for j in range(len(cpu_rates)) if j != i and cpu_rates[j] is not None
                and cpu_rates[j] > 0 and ratios[j] is not None]
    below = [j for j in measured if j < i]
    above = [j for j in measured if j > i]
    bound = 0.0
    if below:
        bound = max(bound, 1.0 / (cpu_rates[below[-1]] * max(1, threads)))
    if above and link_busy:
        bound = max(bound, ratios[above[0]] / link_rate)
    return bound < cost(link_rate, chosen_cpu, chosen_ratio, threads)


class AdaptivePacker:
    """Packs like ``FramePacker``, choosing codec and level per batch (``--compress auto``)."""

    def __init__(self, chunk_size: int = 1 << 20, threads: int = 1,
                 candidates: Sequence[tuple[str, int]] = CANDIDATES):
        self.candidates = tuple(candidates)
        self.packers = [frames.FramePacker(_CODE[c], lvl, chunk_size) for c, lvl in candidates]
        self.chunk_size = chunk_size
        self.threads = threads
        self._lock = threading.Lock()
        self._cpu: list[float | None] = [None] * len(self.candidates)
        self._ratio: list[float | None] = [None] * len(self.candidates)
        self._links: dict[str, float] = {}
        self._busy: dict[str, bool] = {}  # per link: was its last interval busy (its own rate)
        self._batches = 0
        self._started = [False] * len(self.candidates)
        self._stored = next((i for i, (c, _l) in enumerate(self.candidates) if c == "none"), None)
        self._first = self.candidates.index(FIRST) if FIRST in self.candidates else 0
        self._probe = self.candidates.index(PROBE) if PROBE in self.candidates else self._first
        self.chosen = self._first
        self.uses = [0] * len(self.candidates)

    def _choose(self) -> int:
        """``choose`` on what is known now (the caller holds the lock)."""
        link = min(self._links.values()) if self._links else None
        return choose(link, self._cpu, self._ratio, self.threads, stored=self._stored,
                      first=self._first)

    # -- what the sender threads tell us

    def observe_link(self, who: str, nbytes: int, seconds: float, busy: bool = True) -> None:
        """A target's link carried ``nbytes`` in ``seconds``; ``busy``: all along.

        A busy interval is the link's rate (into the running mean); another is a
        lower bound of it, which only ever raises the estimate.
        """
        if nbytes < 65536 or seconds <= 0:
            return  # too small to say anything about the link
        rate = nbytes / seconds
        with self._lock:
            old = self._links.get(who)
            if old is None:
                self._links[who] = rate
            elif busy or rate > old:
                self._links[who] = old + WEIGHT * (rate - old)
            self._busy[who] = bool(busy)
            self.chosen = self._choose()

    def forget_link(self, who: str) -> None:
        with self._lock:
            self._links.pop(who, None)
            self._busy.pop(who, None)

    # -- packing

    def _pick(self) -> tuple[int, int | None]:
        """The candidate of the next batch, and the one to pack it with as well (or None).

        A batch that tries or explores another candidate than the choice is
        packed with the choice too when the choice is link-bound (``link_bound``:
        the packing threads have time to spare), and the smaller result is
        shipped: on a slow link, learning costs CPU that is idle, not bytes.
        """
        with self._lock:
            self._batches += 1
            self.chosen = self._choose()
            link, busy = self._link()
            i = self._next_candidate(link, busy)
            c = self.chosen
            if i != c and link_bound(link, self._cpu[c], self._ratio[c], self.threads,
                                     link_busy=busy):
                return i, c
            return i, None

    def _link(self) -> tuple[float | None, bool]:
        """The slowest target's link rate, and whether it is that link's own (busy) rate."""
        if not self._links:
            return None, False
        who = min(self._links, key=self._links.get)
        return self._links[who], self._busy.get(who, False)

    def _next_candidate(self, link: float | None, busy: bool) -> int:
        """The caller holds the lock and has made the choice."""
        always = (self._probe, self._first)
        order = [*dict.fromkeys(always)] + [i for i in range(len(self.candidates))
                                            if i not in always]
        for i in order:  # a first batch to each candidate worth it, PROBE and FIRST first
            if not self._started[i] and worth_trying(
                    i, link, self._cpu, self._ratio, self.threads, self.chosen,
                    always, link_busy=busy):
                self._started[i] = True
                return i
        if self._batches % EXPLORE_EVERY == 0 and len(self.candidates) > 1:
            # a neighbour of the choice (the level above, then below): it is
            # where a change of data or link shows first, and cheap to try
            step = 1 if (self._batches // EXPLORE_EVERY) % 2 else -1
            j = self.chosen + step
            return j if 0 <= j < len(self.candidates) else self.chosen - step
        return self.chosen

    def _learn(self, i: int, raw: int, wire: int, seconds: float) -> None:
        if raw < 65536 or seconds <= 0:
            return
        with self._lock:
            self.uses[i] += 1
            cpu, ratio = raw / seconds, wire / raw
            old_cpu, old_ratio = self._cpu[i], self._ratio[i]
            self._cpu[i] = cpu if old_cpu is None else old_cpu + WEIGHT * (cpu - old_cpu)
            self._ratio[i] = (ratio if old_ratio is None
                              else old_ratio + WEIGHT * (ratio - old_ratio))
            self.chosen = self._choose()
            if log.isEnabledFor(logging.DEBUG):  # the choices over a cycle, to see where they go
                link = min(self._links.values()) if self._links else None
                log.debug("auto: batch %d %s raw %d wire %d in %.4fs; link %s; choice %s",
                          self._batches, label(self.candidates[i]), raw, wire, seconds,
                          "unmeasured" if link is None else f"{link / 1e6:.2f} MB/s",
                          label(self.candidates[self.chosen]))

    def _pack(self, method: str, fd, extents, cycle, raw_of, wire_of):
        i, also = self._pick()
        out = None
        for k in (i,) if also is None else (i, also):
            t0 = time.perf_counter()
            got = getattr(self.packers[k], method)(fd, extents, cycle)
            wire = wire_of(got)
            self._learn(k, raw_of(got), wire, time.perf_counter() - t0)
            if out is None or wire < out[1]:
                out = (got, wire)
        return out[0]

    def pack_extents(self, fd, extents, cycle):
        raw = sum(length for _o, length in extents)
        return self._pack("pack_extents", fd, extents, cycle, lambda _out: raw,
                          lambda out: sum(len(f) for f in out))

    def pack_scatter(self, fd, extents, cycle):
        return self._pack("pack_scatter", fd, extents, cycle,
                          lambda out: sum(n for _f, n in out),
                          lambda out: sum(len(f) for f, _n in out))

    def status(self) -> dict:
        """What ``status`` shows: the current pick and what it is based on."""
        with self._lock:
            link = min(self._links.values()) if self._links else None
            return {"codec": label(self.candidates[self.chosen]),
                    "link_rate": link,
                    "candidates": [{"codec": label(c), "cpu_rate": self._cpu[i],
                                    "ratio": self._ratio[i], "batches": self.uses[i]}
                                   for i, c in enumerate(self.candidates)]}
