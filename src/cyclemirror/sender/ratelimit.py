"""Bandwidth caps: a token bucket per mirror, and a daemon-wide cap shared fairly.

``RateLimiter(rate)`` blocks ``consume(n)`` until ``n`` bytes fit the rate
(burst: a quarter second of traffic).  ``SharedRate(total)`` is the daemon's
cap: each mirror registers and gets ``total / active mirrors``; its own
``--bwlimit`` applies on top (the smaller wins).  Thread-safe: one lock each.
"""

from __future__ import annotations

import threading
import time


class SharedRate:
    def __init__(self, total: int):
        self.total = total
        self._lock = threading.Lock()
        self._active = 0

    def join(self) -> None:
        with self._lock:
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active = max(0, self._active - 1)

    def share(self) -> float:
        with self._lock:
            return self.total / max(1, self._active)


class RateLimiter:
    def __init__(self, rate: int = 0, shared: SharedRate | None = None):
        self.rate = rate
        self.shared = shared
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._stamp = time.monotonic()

    def _current_rate(self) -> float:
        rates = [r for r in (self.rate, self.shared.share() if self.shared else 0) if r > 0]
        return min(rates) if rates else 0.0

    def consume(self, n: int) -> None:
        rate = self._current_rate()
        if rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            burst = rate / 4
            self._tokens = min(burst, self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            self._tokens -= n
            wait = -self._tokens / rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
