"""A sync on a volume written nothing since its last freeze waits for that freeze's cycle.

``MirrorDriver.sync`` promises that every write completed before it is on the
targets when it returns.  When the open overlay holds no block, the last
freeze's cycle already holds them all, so no extra (empty) cycle is made: a
sync right after ``mirror start`` waits for the first cycle only, and a sync
of a volume at rest returns once what is under way is applied.  A write
brings the freeze back; a repair (``owe_blocks``) always gets a new cycle.
Real store, real target server, real driver.
"""

import os

from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.sender import MirrorOptions
from tests.support.mirror import local_mirror


def test_a_quiet_volume_is_synced_without_an_extra_cycle(tmp_path):
    with local_mirror(tmp_path, 1 << 20, MirrorOptions(interval=3600)) as (vol, d):
        vol.write(0, os.urandom(8192))
        first = d.request_freeze()
        d.start()
        assert d.wait_applied(first, 60) == first
        # nothing written since: the same cycle, and no freeze asked for
        assert d.sync(60) == first
        assert vol.open_overlay == first
        assert d.sync(60) == first
        # a completed write needs the next freeze
        vol.write(4096, b"w" * 4096)
        second = d.sync(60)
        assert second == first + 1 and vol.open_overlay == second
        # a repair needs a cycle to carry it, quiet or not
        blocks = ExtentBitmap(vol.nblocks)
        blocks.set_range(0, 1)
        (label,) = [r.label for r in d.targets]
        third = d.owe_blocks(label, blocks)
        assert third == second + 1
        assert d.wait_applied(third, 60) == third
