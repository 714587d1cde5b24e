"""The RPO objective's decisions (sender/rpo.py) as tables of measured figures.

Proves: the latency model learns base and rate from applied cycles; a target
is ok, at risk (the predicted worst age passes the objective) or violated
(the age already did), and leaves at_risk / violated only once its figures are
back under the hysteresis line, so it never flaps on the line; the interval
is zero while any target is not ok, else the longest wait that keeps the
peak age at the headroom share of the objective, never above a user's cap;
and status --check turns states into one line and the exit code monitoring
systems expect.
"""

import pytest

from cyclemirror.daemon.render import check_status
from cyclemirror.sender import rpo
from cyclemirror.sender.rpo import AT_RISK, OK, VIOLATED, LatencyModel

MiB = 1 << 20


def model(base=0.2, rate=100 * MiB):
    return LatencyModel(base=base, rate=rate)


def test_the_latency_model_learns_base_from_small_cycles_and_rate_from_big_ones():
    m = LatencyModel()
    assert m.latency(50 * MiB) == rpo.DEFAULT_BASE  # nothing measured: the base alone
    for _ in range(30):
        m.observe(4096, 0.1)  # small cycles: only the base moves
    assert m.rate is None and m.base == pytest.approx(0.1, abs=1e-3)
    for _ in range(30):
        m.observe(100 * MiB, 0.1 + 1.0)  # 100 MiB take a second on top of the base
    assert m.rate == pytest.approx(100 * MiB, rel=0.01)
    assert m.latency(50 * MiB) == pytest.approx(0.6, rel=0.02)
    m.observe(MiB, 0.0)  # a nonsense figure is ignored
    assert m.rate == pytest.approx(100 * MiB, rel=0.01)


# (objective, age, owed MiB, previous state) -> expected state
ASSESS = [
    (2.0, 0.5, 0, OK, OK),                  # idle and fresh
    (2.0, 0.5, 100, OK, OK),                # 0.5 + 0.2 + 1.0 = 1.7 < 2
    (2.0, 0.9, 100, OK, AT_RISK),           # 0.9 + 1.2 = 2.1 > 2: predicted over
    (2.0, 1.9, 0, OK, AT_RISK),             # 1.9 + 0.2 = 2.1 > 2
    (2.0, 2.5, 0, OK, VIOLATED),            # already over
    (2.0, 1.7, 0, VIOLATED, VIOLATED),      # under the objective, not yet under 80 %
    (2.0, 1.5, 0, VIOLATED, AT_RISK),       # under 80 % in age, predicted 1.7 > 1.6 still
    (2.0, 1.2, 0, VIOLATED, OK),            # well under: ok again
    (2.0, 1.5, 0, AT_RISK, AT_RISK),        # predicted 1.7 is above the 1.6 line
    (2.0, 1.3, 0, AT_RISK, OK),             # predicted 1.5 is below it
    (10.0, 3.0, 800, OK, AT_RISK),          # 3 + 0.2 + 8 = 11.2 > 10
    (10.0, 3.0, 600, OK, OK),               # 3 + 0.2 + 6 = 9.2
]


@pytest.mark.parametrize("objective, age, owed_mib, previous, expected", ASSESS)
def test_assess(objective, age, owed_mib, previous, expected):
    a = rpo.assess(objective, age, owed_mib * MiB, model(), previous)
    assert a.state == expected, a
    assert a.predicted == pytest.approx(age + 0.2 + owed_mib / 100)
    assert f"{objective:g}s" in a.reason


def test_a_target_that_never_applied_is_at_risk_until_its_first_cycle_lands():
    a = rpo.assess(2.0, None, 10 * MiB, model(), OK)
    assert a.state == AT_RISK and "no cycle applied yet" in a.reason


def test_hovering_on_the_line_does_not_flap():
    m, state, seen = model(), OK, []
    for age in [1.75, 1.85, 1.75, 1.85, 1.75, 1.85]:  # predicted 1.95 / 2.05 / ...
        state = rpo.assess(2.0, age, 0, m, state).state
        seen.append(state)
    assert seen == [OK, AT_RISK, AT_RISK, AT_RISK, AT_RISK, AT_RISK]


# (objective, base, rate MiB/s, owed MiB, states, cap) -> interval
INTERVALS = [
    (2.0, 0.2, 100, 0, [OK], None, 1.0),            # 0.6 * 2 - 0.2
    (2.0, 0.2, 100, 50, [OK], None, 0.5),           # 1.2 - 0.7
    (2.0, 0.2, 100, 200, [OK], None, 0.0),          # cannot wait at all
    (2.0, 0.2, 100, 0, [OK, AT_RISK], None, 0.0),   # one target lags: back to back
    (2.0, 0.2, 100, 0, [VIOLATED], None, 0.0),
    (60.0, 0.2, 100, 0, [OK], None, 35.8),          # a quiet volume: rare freezes, few merges
    (60.0, 0.2, 100, 0, [OK], 10.0, 10.0),          # never above a user's --interval
    (60.0, 0.2, None, 500, [OK], None, 35.8),       # rate unknown: the base alone
]


@pytest.mark.parametrize("objective, base, rate, owed, states, cap, expected", INTERVALS)
def test_auto_interval(objective, base, rate, owed, states, cap, expected):
    m = LatencyModel(base=base, rate=None if rate is None else rate * MiB)
    assert rpo.auto_interval(objective, m, owed * MiB, states, cap) == pytest.approx(expected)


def test_worst_of_states():
    assert rpo.worst([]) == OK
    assert rpo.worst([OK, VIOLATED, AT_RISK]) == VIOLATED
    assert rpo.worst([OK, AT_RISK]) == AT_RISK


def row(volume="v", target="t:1", phase="idle", state=None, reason="", error=None):
    return {"volume": volume, "target": target, "phase": phase, "last_error": error,
            "rpo": None if state is None else {"state": state, "objective": 2.0,
                                               "reason": reason}}


# rows -> (exit code, start of the line)
CHECKS = [
    ([], 0, "OK: no outgoing mirrors"),
    ([row(), row("w", state=OK)], 0, "OK: 2 mirror(s), 1 with an RPO objective"),
    ([row(state=OK), row("w", state=AT_RISK, reason="predicted 2.5s")], 1,
     "AT RISK: w -> t:1: predicted 2.5s"),
    ([row(state=AT_RISK, reason="x"), row("w", state=VIOLATED, reason="age 3s")], 2,
     "VIOLATED: w -> t:1: age 3s"),
    ([row(phase="broken", error="AuthenticationError: bad key")], 2,
     "VIOLATED: v -> t:1: broken: AuthenticationError: bad key"),
    ([row(state=AT_RISK, reason="a"), row("w", state=AT_RISK, reason="b")], 1,
     "AT RISK: v -> t:1: a (and 1 more)"),
]


@pytest.mark.parametrize("rows, code, line", CHECKS)
def test_status_check(rows, code, line):
    got_code, got_line = check_status({"mirrors": rows})
    assert got_code == code and got_line.startswith(line), got_line
