"""An interrupted cycle resumes after the last acknowledged chunk, not from zero.

The first (full) cycle is slowed by --bwlimit; the target is killed -9 in the
middle of it and restarted on the same port.  Proves: the cycle completes
with ``resumed_from`` > 0 and ships fewer raw bytes after the restart than
the whole cycle holds; and the image equals the freeze.  (The rate cap only
makes the cycle slow enough to cut; test_mirror_ratelimit checks the cap.)
"""

import os
import time

import pytest

from tests.support.mirror import Rig, same_file, wait_for


@pytest.fixture
def rig(tmp_path):
    r = Rig(str(tmp_path), size=16 << 20, interval=0.2)
    yield r
    r.close()


def test_killed_target_resumes_the_cycle_after_the_last_ack(rig):
    rate = 1 << 20  # 4 MiB of random data at 1 MiB/s: about 4 s
    rig.start_target()
    t0 = time.monotonic()
    rig.start_source(MIRROR_TEST_BWLIMIT=rate)
    staged = os.path.join(rig.tmp, "dst", "mirrors")

    def acked_some():
        for node in os.listdir(staged) if os.path.isdir(staged) else []:
            path = os.path.join(staged, node, "v1.state.json")
            if os.path.exists(path) and '"chunks": 0' not in open(path).read() \
                    and '"pending": {' in open(path).read():
                return True
        return False

    wait_for(acked_some, 30, "a first acknowledged chunk")
    rig.kill("target")
    assert rig.events() == []  # the cycle was really cut off
    rig.start_target()
    wait_for(lambda: rig.events(), 60, "the resumed first cycle")
    elapsed = time.monotonic() - t0
    first = rig.events()[0]
    assert first["cycle"] == 1 and first["full"]
    assert first["resumed_from"] > 0
    assert first["bytes_raw"] < rig.size // 4  # the 4 MiB of data, minus what was acked
    final = rig.finish()
    assert same_file(rig.image(), rig.export(final["cycle"]))
    assert same_file(os.path.join(rig.snapdir, "1.img"), rig.export(1))
    print(f"first cycle with a kill in the middle took {elapsed:.1f}s at {rate} B/s")
