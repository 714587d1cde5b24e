"""The sync rule both drivers share (``sender.targetsync.look``), as a property over every
mix of target states: each target lands in exactly one place, named targets are never
left out, and the sync is done exactly when docs/cli.md says (``mirror sync``).

The drivers' own use of it runs in the end-to-end tests with real daemons
(tests/test_e2e_one_target.py for volumes, tests/test_tree_slow_target.py and
tests/test_tree_daemon.py for trees).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror.sender import targetsync

WANT = 5


@dataclass
class T:
    label: str
    applied: int
    held: int
    broken: object
    paused: bool
    backoff: float
    failed_cycle: int
    gone: bool
    last_error: str | None = "ConnectionLostError: refused"


def targets():
    one = st.builds(T, label=st.just(""), applied=st.integers(3, 6), held=st.integers(3, 6),
                    broken=st.sampled_from([None, None, ValueError("bad key")]),
                    paused=st.booleans(), backoff=st.sampled_from([0.0, 0.4]),
                    failed_cycle=st.integers(3, 6), gone=st.booleans())
    return st.lists(one, min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(targets(), st.booleans())
def test_each_target_has_one_place_and_done_follows_the_documented_rule(ts, named):
    for i, t in enumerate(ts):
        t.label = f"t{i}"
        t.held = max(t.held, t.applied)  # a target holds what it applied
    s = targetsync.look(ts, WANT, named, lambda r: r.applied, lambda r: r.held,
                        lambda r: r.gone)
    broke = [t for t in ts if t.applied < WANT and (t.broken is not None or t.gone)]
    if named and broke:
        # the first named target that broke (in order) is reported, nothing decided
        assert s.named_broken is broke[0] and not s.done
        return
    assert s.named_broken is None
    places = ([t.label for t in s.applied] + [t.label for t in s.pending] + list(s.down)
              + list(s.left_out))
    assert sorted(places) == sorted(t.label for t in ts)  # each once
    for t in ts:
        if t.applied >= WANT:
            assert t in s.applied
        elif named:
            assert t in s.pending  # a named target is waited for, in a break or retrying
        elif t.broken is not None or t.gone or t.paused:
            assert t.label in s.left_out
        elif t.backoff > 0 and t.failed_cycle >= WANT and t.held < WANT:
            assert t.label in s.down and "down, retrying" in s.down[t.label]
        else:
            assert t in s.pending  # slow, or not failed at this cycle: waited for
    assert s.done == (not s.pending and (bool(s.applied) or not s.down))
    if s.down and not s.applied:
        assert not s.done  # down ones are left out only once another applied the cycle
