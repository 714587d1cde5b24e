"""Write pacing (``mirror start --rpo S --pace``): the limit as a table, the bucket on a fake clock.

Proves: ``rpo.pace_limit`` holds nobody while the predicted age is under
``PACE_FROM`` of the objective, before the first applied cycle, or before a
rate was measured; from there the limit falls continuously from twice the
sustainable rate (back-to-back cycles with the peak age at the headroom share)
to a quarter of it, never below the floor.  ``WritePacer`` lets writers through
at the limit over time (whatever the sizes of their writes), lets a short burst
through without waiting, never makes one write wait longer than ``MAX_WAIT``,
asks for the limit at most every ``REFRESH`` seconds, and carries no debt over
a stretch without a limit.  The clock is a fake one that only the pacer's
sleeps move, so these are exact, not timed.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror.daemon.render import check_status
from cyclemirror.sender import pacing, rpo
from cyclemirror.sender.pacing import WritePacer
from cyclemirror.sender.rpo import LatencyModel

MiB = 1 << 20
SUSTAINABLE = 100 * (1 - 0.4 / 1.2)  # MiB/s at base 0.2 s, rate 100 MiB/s, objective 2 s


def model(base=0.2, rate=100.0):
    return LatencyModel(base=base, rate=None if rate is None else rate * MiB)


# (objective, age, owed MiB, base, rate MiB/s) -> limit in MiB/s (None: writers not held)
LIMITS = [
    (2.0, 0.5, 0, 0.2, 100, None),                        # predicted 0.7 s: far from it
    (2.0, 1.0, 0, 0.2, 100, None),                        # predicted 1.2: auto_interval's aim
    (2.0, 1.2, 0, 0.2, 100, 2 * SUSTAINABLE),             # predicted 1.4 = PACE_FROM: 2x
    (2.0, 1.2, 20, 0.2, 100, (2 - 0.1 / 0.3) * SUSTAINABLE),  # predicted 1.6: on the way down
    (2.0, 1.6, 20, 0.2, 100, SUSTAINABLE),                # predicted 2.0: at the objective
    (2.0, 2.3, 20, 0.2, 100, 0.65 * SUSTAINABLE),         # past it: below the sustainable
    (2.0, 5.0, 0, 0.2, 100, 0.25 * SUSTAINABLE),          # far past: a quarter, no lower
    (2.0, None, 500, 0.2, 100, None),                     # the first cycle: never paced
    (2.0, 5.0, 500, 0.2, None, None),                     # no rate measured yet
    (2.0, 5.0, 0, 0.2, 1, 1.0),                           # the floor: slowed, never stopped
    (0.5, 0.4, 0, 0.2, 100, 8.0),  # objective under 2 bases: a tenth of the rate, x 0.8
]


@pytest.mark.parametrize("objective, age, owed, base, rate, expected", LIMITS)
def test_pace_limit(objective, age, owed, base, rate, expected):
    got = rpo.pace_limit(objective, age, owed * MiB, model(base, rate))
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected * MiB, rel=1e-9)


def test_the_limit_falls_continuously_as_the_prediction_grows():
    m = model()
    ages = [0.8 + i * 0.01 for i in range(400)]
    limits = [rpo.pace_limit(2.0, a, 0, m) or float("inf") for a in ages]
    assert all(b <= a for a, b in zip(limits, limits[1:], strict=False))
    finite = [x for x in limits if x != float("inf")]
    # no jump bigger than the slope allows between two 10 ms steps of age
    assert max(a - b for a, b in zip(finite, finite[1:], strict=False)) < 0.1 * SUSTAINABLE * MiB


def test_a_cycle_on_its_way_lends_its_rate_until_one_was_learnt():
    learnt = model(rate=50.0)
    assert rpo.provisional(learnt, 100 * MiB, 1.0) is learnt  # a learnt rate stays
    fresh = model(rate=None)
    assert rpo.provisional(fresh, 100 * MiB, 0.1) is fresh  # too short to tell
    assert rpo.provisional(fresh, 4096, 10.0) is fresh  # too little to tell
    got = rpo.provisional(fresh, 40 * MiB, 10.0)
    assert got.rate == 4 * MiB and got.base == fresh.base and fresh.rate is None


def test_sustainable_rate_keeps_the_peak_age_at_the_headroom_share():
    m = model(base=0.2, rate=100.0)
    w = rpo.sustainable_rate(2.0, m)
    period = m.base / (1 - w / m.rate)  # a back-to-back cycle's time at that write rate
    assert 2 * period == pytest.approx(rpo.HEADROOM * 2.0)


class FakeTime:
    def __init__(self):
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def pacer_at(limit, t: FakeTime, calls: list | None = None):
    def limit_fn():
        if calls is not None:
            calls.append(t.now)
        return limit() if callable(limit) else limit
    return WritePacer(limit_fn, clock=t.clock, sleep=t.sleep)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 4 * MiB), min_size=1, max_size=200),
       limit_mib=st.floats(1, 500))
def test_writers_get_through_at_the_limit_over_time(sizes, limit_mib):
    t = FakeTime()
    p = pacer_at(limit_mib * MiB, t)
    start = t.now
    for n in sizes:
        p.admit(n)
    elapsed = t.now - start
    ideal = (sum(sizes) - sizes[-1]) / (limit_mib * MiB)  # the last write passes at its start
    assert elapsed <= ideal + 1e-9
    # Only the burst (and a write's wait above MAX_WAIT) passes without waiting.
    capped = sum(max(0.0, n / (limit_mib * MiB) - pacing.MAX_WAIT) for n in sizes)
    assert elapsed >= ideal - pacing.BURST - capped - 1e-9
    assert all(s <= pacing.MAX_WAIT for s in t.slept)
    assert p.status()["waited_seconds"] == pytest.approx(sum(t.slept), abs=1e-3)


def test_no_limit_no_wait_and_no_debt_carried_over():
    t = FakeTime()
    box = {"limit": 1 * MiB}
    p = pacer_at(lambda: box["limit"], t)
    for _ in range(5):
        p.admit(MiB)  # 5 MiB at 1 MiB/s: about 4 s of waits
    assert sum(t.slept) == pytest.approx(4 - pacing.BURST)
    box["limit"] = None
    t.now += pacing.REFRESH
    waited = len(t.slept)
    for _ in range(100):
        p.admit(MiB)
    assert len(t.slept) == waited and p.limit is None
    box["limit"] = 1 * MiB
    t.now += pacing.REFRESH
    p.admit(MiB)  # a fresh start: the writes made while unlimited are not owed
    assert len(t.slept) == waited


def test_a_short_burst_passes_without_waiting():
    t = FakeTime()
    p = pacer_at(10 * MiB, t)
    p.admit(MiB // 2)  # 0.05 s worth at 10 MiB/s: within the burst
    p.admit(1)
    assert t.slept == []


def test_the_limit_is_asked_at_most_every_refresh_seconds():
    t = FakeTime()
    calls: list[float] = []
    p = pacer_at(None, t, calls)
    for _ in range(1000):
        p.admit(4096)
        t.now += 0.001  # one second of writes, 1000 of them
    assert 9 <= len(calls) <= 11
    assert all(b - a >= pacing.REFRESH - 1e-9 for a, b in zip(calls, calls[1:], strict=False))


def test_status_check_says_when_writers_are_paced():
    def row(volume, state, limit):
        return {"volume": volume, "target": "t:1", "phase": "copying", "last_error": None,
                "rpo": {"state": state, "objective": 2.0, "reason": f"{volume} reason"},
                "pacing": {"limit": limit}}
    code, line = check_status({"mirrors": [row("v", "ok", 80 * MiB), row("w", "ok", None)]})
    assert code == 0 and line.endswith("all within it; writers of 1 volume(s) paced"), line
    code, line = check_status({"mirrors": [row("v", "at_risk", 80 * MiB)]})
    assert code == 1 and line.startswith("AT RISK: v -> t:1: v reason; writers paced to 80"), line
    code, line = check_status({"mirrors": [row("v", "ok", None)]})
    assert code == 0 and "paced" not in line
