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
The first batches go one to each of lz4, ``none`` and zstd 1 (cheap to
try), lz4 first: a first cycle packs a few batches ahead before the first
byte is sent, so by the time the link has been measured they have been
too.  zstd 3 and 9 get their first batch only once the link is measured
and the CPU cost of the level below (a lower bound of theirs) is under the
choice's cost (``worth_trying``): a batch of zstd 9 costs a second or more,
which on a fast link is a good part of the cycle.  Without a link rate the
choice is by CPU alone among the codecs that compress (lz4).

Determinism.  Resuming a cycle regenerates its frames and skips the first
N; that stays correct because chunk boundaries depend only on raw lengths
(``chunk_size``), never on the codec, and every frame names its own codec:
a resumed cycle may compress a chunk differently, never cover different
bytes.
"""

from __future__ import annotations

import fcntl
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
FIRST = ("lz4", 0)  # the candidate of the first batch, and the choice while nothing is measured
CHEAP = (("none", 0), ("lz4", 0), ("zstd", 1))  # a first batch of each costs little: always tried
EXPLORE_EVERY = 16  # one batch in this many tries another candidate
WEIGHT = 0.3  # of a new observation in the running means
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


def worth_trying(i: int, link_rate: float | None, cpu_rates: Sequence[float | None],
                 ratios: Sequence[float | None], threads: int, chosen: int,
                 cheap: Sequence[int]) -> bool:
    """Whether the untried candidate ``i`` could beat the choice (pure, like ``choose``).

    The candidates ``cheap`` always are (lz4, none, zstd 1: a batch of each
    costs little).  The others are levels above them, never faster on CPU
    than the measured level below: that one's CPU cost is a lower bound of
    theirs.  Without a link rate nothing says they could win yet; with one,
    they are tried when that bound is below the choice's cost.  So a fast
    link never pays for a first batch of zstd 9, and a slow one still
    measures every level before its first cycle is far along.
    """
    if i in cheap:
        return True
    if link_rate is None or link_rate <= 0:
        return False
    below = [j for j in range(i) if cpu_rates[j] is not None and cpu_rates[j] > 0]
    chosen_cpu, chosen_ratio = cpu_rates[chosen], ratios[chosen]
    if not below or chosen_cpu is None or chosen_ratio is None or chosen_cpu <= 0:
        return True
    bound = 1.0 / (cpu_rates[below[-1]] * max(1, threads))
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
        self._batches = 0
        self._started = [False] * len(self.candidates)
        self._stored = next((i for i, (c, _l) in enumerate(self.candidates) if c == "none"), None)
        self._first = self.candidates.index(FIRST) if FIRST in self.candidates else 0
        self._cheap = tuple(i for i, c in enumerate(self.candidates) if c in CHEAP)
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
            self.chosen = self._choose()

    def forget_link(self, who: str) -> None:
        with self._lock:
            self._links.pop(who, None)

    # -- packing

    def _pick(self) -> int:
        with self._lock:
            self._batches += 1
            self.chosen = self._choose()
            order = [self._first] + [i for i in range(len(self.candidates)) if i != self._first]
            link = min(self._links.values()) if self._links else None
            for i in order:  # the first batches: one to each candidate worth it, lz4 first
                if not self._started[i] and worth_trying(
                        i, link, self._cpu, self._ratio, self.threads, self.chosen, self._cheap):
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

    def pack_extents(self, fd, extents, cycle):
        i = self._pick()
        t0 = time.perf_counter()
        out = self.packers[i].pack_extents(fd, extents, cycle)
        self._learn(i, sum(length for _o, length in extents), sum(len(f) for f in out),
                    time.perf_counter() - t0)
        return out

    def pack_scatter(self, fd, extents, cycle):
        i = self._pick()
        t0 = time.perf_counter()
        out = self.packers[i].pack_scatter(fd, extents, cycle)
        self._learn(i, sum(n for _f, n in out), sum(len(f) for f, _n in out),
                    time.perf_counter() - t0)
        return out

    def status(self) -> dict:
        """What ``status`` shows: the current pick and what it is based on."""
        with self._lock:
            link = min(self._links.values()) if self._links else None
            return {"codec": label(self.candidates[self.chosen]),
                    "link_rate": link,
                    "candidates": [{"codec": label(c), "cpu_rate": self._cpu[i],
                                    "ratio": self._ratio[i], "batches": self.uses[i]}
                                   for i, c in enumerate(self.candidates)]}
