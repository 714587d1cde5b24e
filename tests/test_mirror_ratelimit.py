"""Bandwidth caps on a simulated clock (no timing assertions on the real one).

Proves: a RateLimiter lets through ``rate`` bytes per second after its burst;
a SharedRate splits a daemon-wide cap equally among the mirrors that joined
it, and a mirror's own --bwlimit still applies when it is lower.
"""

import pytest

from cyclemirror.sender import ratelimit


class Clock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        assert seconds >= 0
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(ratelimit.time, "monotonic", c.monotonic)
    monkeypatch.setattr(ratelimit.time, "sleep", c.sleep)
    return c


def send(limiter, clock, total, piece=65536):
    start = clock.now
    for _ in range(total // piece):
        limiter.consume(piece)
    return clock.now - start


def test_a_mirror_cap_limits_the_rate(clock):
    lim = ratelimit.RateLimiter(1 << 20)
    took = send(lim, clock, 8 << 20)
    assert 7.0 <= took <= 8.0  # 8 MiB at 1 MiB/s, less at most the quarter-second burst


def test_no_cap_never_waits(clock):
    assert send(ratelimit.RateLimiter(0), clock, 64 << 20) == 0


def test_daemon_wide_cap_is_shared_equally(clock):
    shared = ratelimit.SharedRate(4 << 20)
    a = ratelimit.RateLimiter(0, shared)
    b = ratelimit.RateLimiter(0, shared)
    shared.join()
    assert send(a, clock, 8 << 20) == pytest.approx(2.0, abs=0.3)  # alone: 4 MiB/s
    shared.join()
    assert send(b, clock, 8 << 20) == pytest.approx(4.0, abs=0.3)  # two mirrors: 2 MiB/s each
    slow = ratelimit.RateLimiter(1 << 20, shared)  # its own lower cap wins
    assert send(slow, clock, 4 << 20) == pytest.approx(4.0, abs=0.3)
    shared.leave()
    shared.leave()
