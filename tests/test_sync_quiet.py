"""A sync while the last freeze's cycle is on its way, nothing written since, waits for it.

``MirrorDriver.sync`` promises that every write completed before it is on the
targets when it returns.  When the open overlay holds no block, the last
freeze's cycle already holds them all: a sync right after ``mirror start``
waits for the first cycle, not for an extra empty one.  Once every target
holds that cycle a sync freezes anew (the empty cycle proves the targets are
still there), as does a sync after a write; a repair (``owe_blocks``) always
gets a new cycle.  Real store, real target server, real driver.
"""

import os

from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.sender import MirrorOptions
from tests.support.mirror import local_mirror, wait_for


def test_a_quiet_volume_is_synced_without_an_extra_cycle(tmp_path):
    # 1 MiB of random data at 512 KiB/s: the first cycle takes about two seconds
    options = MirrorOptions(interval=3600, bwlimit=512 * 1024, codec="none")
    with local_mirror(tmp_path, 1 << 20, options) as (vol, d):
        vol.write(0, os.urandom(1 << 20))
        d.start()
        wait_for(lambda: vol.open_overlay == 1, 10, "the first freeze")
        # the first cycle is under way and holds every write: sync waits for it
        first = d.sync(60)
        assert first == vol.open_overlay == 1
        # every target holds it now: a sync freezes anew (an empty cycle proves the
        # targets are there)
        second = d.sync(60)
        assert second == first + 1 == vol.open_overlay
        # a completed write needs the next freeze too
        vol.write(4096, b"w" * 4096)
        third_sync = d.sync(60)
        assert third_sync == second + 1 == vol.open_overlay
        second = third_sync
        # a repair needs a cycle to carry it, quiet or not
        blocks = ExtentBitmap(vol.nblocks)
        blocks.set_range(0, 1)
        (label,) = [r.label for r in d.targets]
        third = d.owe_blocks(label, blocks)
        assert third == second + 1
        assert d.wait_applied(third, 60) == third
