"""A file object's life as a state machine on a real XFS or btrfs file system (hypothesis).

Random writes, hole punches, resizes (the file truncated shorter or longer),
freezes, merges and crashes (the store closed and opened again with a crash's
leftovers planted in the snapshot directory) against a model that keeps the
file's bytes at every freeze.  After every step: the snapshot directory holds
exactly the snapshots of the cycles not merged; every snapshot reads back as
the file was at its freeze, with its size; each frozen cycle's dirty set has
that cycle's blocks and holds every block that differs from the freeze before
(and every block past the previous end); the zero runs a reader reports are
zeroes.  And a target model: a bytes image that receives, now and then, one
delta of the blocks owed since the cycle it holds (the dirty sets folded the
way the mirror driver folds them, resized with ``resized_bitmap``), resized
to the cycle's size first as the target's apply does; it must then equal the
snapshot byte for byte, whatever shrinks and growths came in between.
"""

from __future__ import annotations

import itertools
import os
import subprocess

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror._cext.pagewrite import punch_hole
from cyclemirror.store import Store
from cyclemirror.store.fileobject import resized_bitmap

K = 4096
NBLOCKS = 64
_count = itertools.count()


@pytest.fixture(params=["xfs", "btrfs", "btrfs_zstd"])
def cowfs_mount(request):
    """XFS, btrfs, and btrfs compressing (extents the map cannot vouch for: hashed)."""
    return request.getfixturevalue(f"{request.param}_mount")


def test_file_object_snapshots_follow_the_model(cowfs_mount, tmp_path):
    class FileObjectMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self):
            n = next(_count)
            self.dir = os.path.join(cowfs_mount, f"m{n}")
            os.makedirs(self.dir)
            self.path = os.path.join(self.dir, "f.img")
            with open(self.path, "wb") as fh:
                fh.truncate(NBLOCKS * K)
            self.store_path = str(tmp_path / f"store{n}")
            self.store = Store.create(self.store_path)
            self.obj = self.store.add_file("f", self.path)
            self.live = bytearray(NBLOCKS * K)
            self.snaps: dict[int, bytes] = {}
            self.top, self.merged = 0, -1
            self.target: bytes | None = None  # the target model's image (None: no cycle)
            self.owed: ExtentBitmap | None = None  # blocks it is owed (None: all)

        def teardown(self):
            if hasattr(self, "store"):
                self.store.close()
                subprocess.run(["rm", "-rf", self.dir], check=False)

        @rule(block=st.integers(0, 2 * NBLOCKS - 1), n=st.integers(1, 4),
              byte=st.integers(1, 255))
        def write(self, block, n, byte):
            block = block % (len(self.live) // K)
            n = min(n, len(self.live) // K - block)
            data = bytes([byte]) * (n * K)
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, block * K)
            finally:
                os.close(fd)
            self.live[block * K:(block + n) * K] = data

        @rule(block=st.integers(0, 2 * NBLOCKS - 1), n=st.integers(1, 8))
        def punch(self, block, n):
            block = block % (len(self.live) // K)
            n = min(n, len(self.live) // K - block)
            fd = os.open(self.path, os.O_WRONLY)
            try:
                punch_hole(fd, block * K, n * K)
            finally:
                os.close(fd)
            self.live[block * K:(block + n) * K] = bytes(n * K)

        @rule(nblocks=st.integers(1, 2 * NBLOCKS))
        def resize(self, nblocks):
            os.truncate(self.path, nblocks * K)
            size = nblocks * K
            self.live = self.live[:size] + bytearray(max(0, size - len(self.live)))

        @rule()
        def freeze(self):
            cycle = self.obj.freeze()
            self.top += 1
            assert cycle.number == self.top
            self.snaps[self.top] = bytes(self.live)
            assert cycle.size == len(self.live) and self.obj.size == cycle.size
            self._check_dirty(self.top, cycle.dirty)
            # Folded as the driver folds it (sender/driver.py, _fold).
            if cycle.dirty is None:
                self.owed = None
            elif self.owed is not None:
                self.owed = resized_bitmap(self.owed, cycle.dirty.nbits)
                self.owed.union_update(cycle.dirty)

        @precondition(lambda self: self.top >= 1)
        @rule()
        def ship_to_the_target(self):
            """One delta (or a full copy) of the newest cycle, applied as a target does:
            the image takes the cycle's size, then the extents are written."""
            k = self.top
            snap = self.snaps[k]
            image = bytearray(len(snap)) if self.target is None else bytearray(self.target)
            image = image[:len(snap)] + bytearray(max(0, len(snap) - len(image)))
            with self.obj.frozen_reader(k) as rd:
                for off, n, kind, _fd in rd.extents(self.owed, 8):
                    image[off:off + n] = rd.read(off, n) if kind == "data" else bytes(n)
            assert bytes(image) == snap, f"the target after cycle {k} differs"
            self.target = bytes(image)
            self.owed = ExtentBitmap(len(snap) // K)

        def _check_dirty(self, k, dirty):
            if k == 1:
                assert dirty is None
                return
            before, now = self.snaps[k - 1], self.snaps[k]
            assert dirty.nbits == len(now) // K
            for b in range(len(now) // K):
                if b >= len(before) // K or before[b * K:(b + 1) * K] != now[b * K:(b + 1) * K]:
                    assert dirty.test(b), f"cycle {k}: block {b} changed, not in the delta"

        @precondition(lambda self: self.top - 1 > self.merged)
        @rule(data=st.data())
        def merge(self, data):
            j = data.draw(st.integers(self.merged + 1, self.top - 1))
            self.obj.merge_through(j)
            self.merged = j

        @rule(leftovers=st.booleans())
        def crash_and_open(self, leftovers):
            if leftovers:
                for name in [".tmp-99", f"snap-{self.top + 1}",
                             *([f"snap-{self.merged}"] if self.merged >= 1 else [])]:
                    with open(os.path.join(self.obj.snapshots, name), "wb") as fh:
                        fh.write(b"left by a crash")
            self.store.close()
            self.store = Store.open(self.store_path)
            self.obj = self.store.open_file("f")
            assert self.obj.open_overlay == self.top

        @invariant()
        def snapshots_are_exactly_the_unmerged_ones(self):
            if not hasattr(self, "obj"):
                return
            want = sorted(f"snap-{j}" for j in range(max(1, self.merged + 1), self.top + 1))
            assert self.obj.snapshot_names() == want
            assert self.obj.frozen_cycles() == list(range(max(1, self.merged + 2),
                                                          self.top + 1))

        @invariant()
        def every_snapshot_reads_as_at_its_freeze(self):
            if not hasattr(self, "obj"):
                return
            for k in range(max(1, self.merged + 1), self.top + 1):
                with self.obj.frozen_reader(k) as rd:
                    assert rd.size == len(self.snaps[k]), f"snapshot {k}'s size"
                    assert rd.read(0, rd.size) == self.snaps[k], f"snapshot {k}"
                    for off, n, kind, _fd in rd.extents(None, 8):
                        assert n <= 8 * K
                        if kind == "zero":
                            assert self.snaps[k][off:off + n] == bytes(n)
            for k in self.obj.frozen_cycles():
                self._check_dirty(k, self.obj.frozen(k).dirty)

    run_state_machine_as_test(
        FileObjectMachine,
        settings=settings(max_examples=20, stateful_step_count=20, deadline=None))
