"""Write pacing: hold a volume's writers to a rate while its mirror cannot keep up.

``mirror start --rpo S --pace`` (docs/mirroring.md, "Write pacing"): when the
mirror's predicted RPO age nears the objective although cycles already run
back to back, the only way left to keep the objective is to slow down what
fills the next cycle.  The driver owns one ``WritePacer`` per mirror and hangs
it on each of its volumes (``Volume.write_pacer``); every data write through
the store calls ``admit(nbytes)`` before it takes any lock, and waits there
while the writers are ahead of the limit.  Zero writes and trims are not paced:
they travel as records of a few bytes.

The limit comes from ``limit_fn`` (the driver's view of sender/rpo.py's
``pace_limit``), asked again at most every ``REFRESH`` seconds from inside
``admit``, so nothing runs while nobody writes.  The bucket is a GCRA: each
write moves a theoretical arrival time ``n / limit`` ahead, a write waits for
what it is ahead of now by more than ``BURST`` seconds, and never longer than
``MAX_WAIT`` at a time, so an NBD client never sees a stall near its timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

REFRESH = 0.1  # seconds between two questions to limit_fn
BURST = 0.05  # seconds of writes at the limit let through without waiting
MAX_WAIT = 1.0  # seconds one write waits at most


class WritePacer:
    def __init__(self, limit_fn: Callable[[], float | None], *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self._limit_fn = limit_fn
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._refresh_at = 0.0
        self._tat = 0.0  # the bucket's theoretical arrival time
        self.limit: float | None = None  # bytes/s now; None: writers are not held
        self.waited = 0.0  # seconds writers spent waiting, in total
        self.paced_writes = 0  # writes that waited
        self.paced_bytes = 0

    def admit(self, nbytes: int) -> None:
        """Wait, if need be, until ``nbytes`` more may be written."""
        now = self._clock()
        if now >= self._refresh_at:
            self.refresh(now)
        with self._lock:
            limit = self.limit
            if limit is None:
                return
            tat = max(self._tat, now)
            wait = min(tat - now - BURST, MAX_WAIT)
            self._tat = tat + nbytes / limit
            if wait > 0:
                self.waited += wait
                self.paced_writes += 1
                self.paced_bytes += nbytes
        if wait > 0:
            self._sleep(wait)

    def refresh(self, now: float | None = None) -> None:
        """Ask limit_fn for the limit now (outside the lock: it takes the driver's)."""
        now = self._clock() if now is None else now
        with self._lock:
            if now < self._refresh_at:
                return  # another writer is asking
            self._refresh_at = now + REFRESH
        limit = self._limit_fn()
        with self._lock:
            if limit is None or limit <= 0:
                self.limit = None
                self._tat = now  # no debt carried into the next paced stretch
            else:
                self.limit = float(limit)

    def status(self) -> dict:
        with self._lock:
            return {"limit": self.limit, "waited_seconds": round(self.waited, 3),
                    "paced_writes": self.paced_writes, "paced_bytes": self.paced_bytes}
