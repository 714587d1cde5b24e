"""Source and target in separate processes on loopback, writes running all the time.

Proves: every cycle the target applied left an image byte-identical to the
source's view at that cycle's freeze instant (the source exports the frozen
image; the target snapshots its image right after each apply); cycle 1 is
full and later cycles ship only deltas; a final sync makes the image equal
the last freeze.

Then kill -9 of the target, the source, or both, at random moments and during
apply: after a restart the target's recovered image equals the source's view
at the freeze instant of the cycle its state says is applied (never a torn
mix); mirroring resumes (more cycles get applied); no cycle after the first is
a full copy (bytes shipped are counted); and after a final sync the image
equals the last freeze.  One trial kills the target exactly while its state
file shows a committed, not yet applied, delta.

A few trials by default; CYCLEMIRROR_SLOW=1 runs many more.
"""

import json
import os
import random

import pytest

from tests.support.mirror import Rig, same_file, wait_for
from tests.support.tools import SLOW

TRIALS = 40 if SLOW else 3
# Slow apply down (cyclemirror/failpoints.py: per staged record, and per extent of a
# SCATTER record up to 10) so kills land inside apply, and the next cycle arrives
# while the previous one still applies.
SLOW_APPLY = {"receiver.apply_record": 0.05}


def state_file(rig):
    mdir = os.path.join(rig.tmp, "dst", "mirrors")
    nodes = os.listdir(mdir) if os.path.isdir(mdir) else []
    return os.path.join(mdir, nodes[0], "v1.state.json") if nodes else None


def _state_body(rig) -> dict:
    try:
        return json.load(open(state_file(rig)))["body"]
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def committed_now(rig) -> bool:
    return _state_body(rig).get("committed") is not None


def overlapping_now(rig) -> bool:
    """The target applies one cycle while it already receives the next (protocol 2)."""
    body = _state_body(rig)
    return body.get("committed") is not None and body.get("pending") is not None


def check_recovered(rig):
    """Every recovery snapshot equals the export of the cycle it claims."""
    n = 0
    for name in os.listdir(rig.snapdir):
        if name.startswith("recovered-"):
            applied = int(name.rsplit("-", 1)[1].split(".")[0])
            assert same_file(os.path.join(rig.snapdir, name), rig.export(applied)), name
            n += 1
    return n


@pytest.fixture
def rig(tmp_path):
    r = Rig(str(tmp_path), size=8 << 20, interval=0.05)
    yield r
    r.close()


def test_kill_9_at_random_moments_keeps_the_image_at_a_freeze_instant(rig):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    rig.start_target(failpoints=SLOW_APPLY)
    rig.start_source()
    wait_for(lambda: len(rig.events()) >= 2, 60, "the first cycles")
    kills_in_apply = 0
    overlaps = 0
    plan = ["target-in-apply", "target-in-overlap", "source-in-overlap", "both-in-overlap"]
    plan += [rng.choice(["target", "source", "both"]) for _ in range(TRIALS)]
    for which in plan:
        before = len(rig.events())
        if which.endswith("-in-overlap"):
            who = which.split("-")[0]
            for _attempt in range(20):  # the overlap may end between seeing it and the kill
                wait_for(lambda: overlapping_now(rig), 60,
                         "a cycle received while the previous one applies")
                if who in ("target", "both"):
                    rig.kill("target")
                if who in ("source", "both"):
                    rig.kill("source")
                if who == "source" or overlapping_now(rig):
                    overlaps += 1
                    break
                rig.start_target(failpoints=SLOW_APPLY)
        elif which == "target-in-apply":
            for _attempt in range(20):  # the apply may finish between seeing it and the kill
                wait_for(lambda: committed_now(rig), 30, "a committed delta on the target")
                rig.kill("target")
                if committed_now(rig):
                    kills_in_apply += 1
                    break
                rig.start_target(failpoints=SLOW_APPLY)
        else:
            import time

            time.sleep(rng.uniform(0.0, 0.6))
            if which in ("target", "both"):
                rig.kill("target")
                kills_in_apply += committed_now(rig)
            if which in ("source", "both"):
                rig.kill("source")
        if rig.target.poll() is not None:
            rig.start_target(failpoints=SLOW_APPLY)
        if rig.source.poll() is not None:
            rig.start_source()
        # Mirroring resumes: new cycles are applied after the restart.
        wait_for(lambda b=before: len(rig.events()) >= b + 2, 60,
                 f"cycles after killing {which}:\n{rig.log('source')}")
    assert kills_in_apply >= 1, "no kill landed inside apply"
    assert overlaps == 3, "a kill did not land while a copy and an apply overlapped"
    final = rig.finish()
    events = rig.events()
    assert events[0]["full"] and events[0]["cycle"] == 1
    later = events[1:]
    assert later and all(not e["full"] for e in later), [e for e in later if e["full"]]
    # The writer changes ~100 blocks/s, so even a catch-up delta after an outage
    # is a fraction of the volume; a full copy would ship all its data.
    assert max(e["bytes_raw"] for e in later) < rig.size // 4, later
    recovered = check_recovered(rig)
    assert recovered >= 1
    print(f"\n{len(plan)} kills ({kills_in_apply} inside apply), {recovered} recoveries "
          f"checked, {len(events)} cycles applied")
    assert same_file(rig.image(), rig.export(final["cycle"]))

@pytest.fixture
def steady_rig(tmp_path):
    r = Rig(str(tmp_path))
    yield r
    r.close()


def test_every_applied_cycle_equals_the_source_at_its_freeze_instant(steady_rig):
    steady_rig.start_target()
    steady_rig.start_source()
    wait_for(lambda: len(steady_rig.events()) >= 6, 60, "six applied cycles")
    final = steady_rig.finish()
    events = steady_rig.events()
    assert events[0]["cycle"] == 1 and events[0]["full"]
    assert all(not e["full"] for e in events[1:])
    # Delta cycles ship a small part of the volume (the writer touches few blocks).
    assert max(e["bytes_raw"] for e in events[1:]) < steady_rig.size // 2
    checked = 0
    for e in events:
        snap = os.path.join(steady_rig.snapdir, f"{e['cycle']}.img")
        assert same_file(snap, steady_rig.export(e["cycle"])), f"cycle {e['cycle']} differs"
        checked += 1
    assert checked >= 6
    # The writer really ran during the cycles: consecutive freezes differ, so a
    # snapshot matching its own export (and not a neighbour's) means something.
    distinct = sum(not same_file(steady_rig.export(a["cycle"]), steady_rig.export(b["cycle"]))
                   for a, b in zip(events, events[1:], strict=False))
    assert distinct >= len(events) - 2
    assert same_file(steady_rig.image(), steady_rig.export(final["cycle"]))
    status = final["status"]["targets"]
    (tstatus,) = status.values()
    assert tstatus["applied_cycle"] == final["cycle"] and tstatus["last_error"] is None

