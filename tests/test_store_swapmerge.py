"""Swap merges: an overlay that holds most of the volume becomes base instead of being copied.

The merge copies base's other blocks into the overlay and renames it over
base.img (docs/store.md, "Merge"). Checked here on real files: which way a
merge goes, that images, holes and zeroes come out right, that readers pinned
before the swap keep their images, and the two on-disk states a crash can
leave (during the fill, and after the rename but before the state is saved).
The random kill -9 loop of test_store_crash.py also lands in swap merges.
Last, big writes hand base's cached pages of their range to the open overlay
(docs/store.md, "Merge and the page cache"): checked with fincore.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

from cyclemirror.store import Store
from tests.support.tools import require_tool

KiB, MiB = 1 << 10, 1 << 20
BS = 16 * KiB


@pytest.fixture
def store(tmp_path):
    s = Store.create(str(tmp_path / "store"))
    yield s
    s.close()


def _reopen(store):
    path = store.path
    store.close()
    return Store.open(path)


def _allocated_ranges(path: str) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        out, pos, size = [], 0, os.fstat(fd).st_size
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole))
            pos = hole
        return out
    finally:
        os.close(fd)


def _base_with_a_hole(store, nblocks: int = 32):
    """Volume whose base has data everywhere except blocks 20..23 (a hole); returns (vol, image)."""
    vol = store.create_volume("v", nblocks * BS, BS)
    image = bytearray(os.urandom(nblocks * BS))
    image[20 * BS : 24 * BS] = bytes(4 * BS)
    vol.write(0, bytes(image))
    vol.trim(20 * BS, 4 * BS)
    vol.freeze()
    vol.merge_through(0)  # overlay 0 held every block: a swap already
    assert vol.merges_swapped == 1
    return vol, image


def test_an_overlay_holding_most_of_the_volume_becomes_base_without_copying_it(store):
    vol, image = _base_with_a_hole(store)
    copied_before = vol.merged_bytes_copied + vol.merged_bytes_reflinked
    # Overlay 1 rewrites blocks 0..24 except 3, zeroes 5..6; 25..31 and 3 stay base's
    # (20..23 of them are base's hole, inside the rewritten range, so rewritten too).
    new = os.urandom(25 * BS)
    vol.write(0, new)
    image[0 : 25 * BS] = new
    vol.write_zeroes(5 * BS, 2 * BS)
    image[5 * BS : 7 * BS] = bytes(2 * BS)
    old = vol.read(3 * BS, BS)
    vol.write(3 * BS, old)  # same bytes: still a dirty block
    vol.freeze()
    vol.write(BS, b"n" * BS)  # overlay 2: after the freeze
    later = bytearray(image)
    later[BS : 2 * BS] = b"n" * BS
    cycle3 = vol.freeze()
    with cycle3.reader() as pinned:  # pins base and overlays 1 and 2 across the swap
        vol.merge_through(1)
        assert vol.merges_swapped == 2
        assert vol.merged_bytes_copied + vol.merged_bytes_reflinked == copied_before
        # Only base's 7 blocks under the overlay's clean range were copied.
        assert vol.swap_filled_bytes == 7 * BS
        assert pinned.read(0, vol.size) == bytes(later)
    assert vol.read(0, vol.size) == bytes(later)
    assert vol.frozen_cycles() == [3]
    with vol.frozen(3).reader() as r:
        assert r.read(0, vol.size) == bytes(later)
    vdir = vol.dir
    assert sorted(f for f in os.listdir(vdir) if f.startswith("overlay-1")) == []
    with open(os.path.join(vdir, "base.img"), "rb") as f:
        assert f.read() == bytes(image)
    # The zeroed blocks are holes in the new base, not written zeroes.
    holes_at = [(5 * BS, 7 * BS)]
    for lo, hi in _allocated_ranges(os.path.join(vdir, "base.img")):
        for hs, he in holes_at:
            assert he <= lo or hi <= hs, f"base allocates [{lo}, {hi}), the zeroed range is a hole"
    with open(os.path.join(vdir, "volume.json")) as f:
        state = json.load(f)
    assert state["merged_through"] == 1 and state["merging"] is None and state["merge_mode"] is None
    store2 = _reopen(store)
    try:
        vol2 = store2.open_volume("v")
        assert vol2.read(0, vol2.size) == bytes(later)
    finally:
        store2.close()


def test_base_holes_under_the_clean_blocks_stay_holes(store):
    vol, image = _base_with_a_hole(store)
    # Rewrite everything but 16..27: base's hole 20..23 is under the clean range.
    first, last = os.urandom(16 * BS), os.urandom(4 * BS)
    vol.write(0, first)
    vol.write(28 * BS, last)
    image[: 16 * BS], image[28 * BS :] = first, last
    vol.freeze()
    vol.merge_through(1)
    assert vol.merges_swapped == 2 and vol.swap_filled_bytes == 8 * BS
    base = os.path.join(vol.dir, "base.img")
    for lo, hi in _allocated_ranges(base):
        assert hi <= 20 * BS or 24 * BS <= lo, f"base allocates [{lo}, {hi}) inside its old hole"
    assert vol.read(0, vol.size) == bytes(image)


def test_a_small_overlay_is_still_copied_into_base(store):
    vol, image = _base_with_a_hole(store)
    data = os.urandom(10 * BS)
    vol.write(2 * BS, data)
    image[2 * BS : 12 * BS] = data
    vol.freeze()
    ino = os.stat(os.path.join(vol.dir, "base.img")).st_ino
    vol.merge_through(1)
    assert vol.merges_swapped == 1  # only the first one
    assert vol.merged_bytes_copied + vol.merged_bytes_reflinked == 10 * BS
    assert os.stat(os.path.join(vol.dir, "base.img")).st_ino == ino
    assert vol.read(0, vol.size) == bytes(image)


def test_freezes_and_merges_alternate_with_a_reader_of_every_cycle(store):
    """Swap after swap, with readers of newer cycles open across each: every image stays."""
    vol = store.create_volume("v", 16 * BS, BS)
    images = {}
    view = bytearray(vol.size)
    readers = []
    for k in range(1, 8):
        chunk = os.urandom(vol.size if k % 2 else 4 * BS)  # odd cycles rewrite everything
        off = 0 if k % 2 else (k % 4) * 3 * BS
        vol.write(off, chunk)
        view[off : off + len(chunk)] = chunk
        cycle = vol.freeze()
        images[cycle.number] = bytes(view)
        reader = cycle.reader()
        reader.__enter__()
        readers.append((cycle.number, reader))
        # Close the previous cycle's reader so its overlay can merge; keep this one open.
        while len(readers) > 1:
            n, r = readers.pop(0)
            assert r.read(0, vol.size) == images[n]
            r.__exit__(None, None, None)
            vol.merge_through(n - 1)
        assert readers[0][1].read(0, vol.size) == images[cycle.number]
    assert vol.merges_swapped >= 3
    for _, r in readers:
        r.__exit__(None, None, None)
    assert vol.read(0, vol.size) == bytes(view)


def _swap_pending(store, nblocks: int = 32):
    """A volume whose overlay 1 holds blocks 0..23 (frozen), closed: (path, image, view)."""
    vol, image = _base_with_a_hole(store, nblocks)
    new = os.urandom(24 * BS)
    vol.write(0, new)
    image[: 24 * BS] = new
    vol.freeze()
    vol.write(30 * BS, b"t" * BS)  # overlay 2, open
    view = bytearray(image)
    view[30 * BS : 31 * BS] = b"t" * BS
    vdir = vol.dir
    store.close()
    state_path = os.path.join(vdir, "volume.json")
    with open(state_path) as f:
        state = json.load(f)
    state["merging"], state["merge_mode"] = 1, "swap"
    with open(state_path, "w") as f:
        json.dump(state, f)
    return vdir, bytes(image), bytes(view)


def _check_finished(path: str, vdir: str, image: bytes, view: bytes) -> None:
    with Store.open(path) as s:
        vol = s.open_volume("v")
        assert vol.read(0, vol.size) == view
        assert vol.frozen_cycles() == []
        with open(os.path.join(vdir, "volume.json")) as f:
            state = json.load(f)
        assert (state["merged_through"], state["merging"], state["merge_mode"]) == (1, None, None)
        assert [o["number"] for o in state["overlays"]] == [2]
        assert not any(f.startswith("overlay-1.") for f in os.listdir(vdir))
        with open(os.path.join(vdir, "base.img"), "rb") as f:
            assert f.read() == image
        assert vol.read(0, vol.size) == view


def test_a_crash_during_the_fill_is_redone_on_reopen(store):
    path = store.path
    vdir, image, view = _swap_pending(store)
    # Part of the fill done: block 24 whole, block 25's first half only (a torn copy).
    ov = os.open(os.path.join(vdir, "overlay-1.img"), os.O_RDWR)
    try:
        os.pwrite(ov, image[24 * BS : 25 * BS + BS // 2], 24 * BS)
    finally:
        os.close(ov)
    _check_finished(path, vdir, image, view)


def test_a_crash_after_the_rename_only_finishes_the_state(store):
    path = store.path
    vdir, image, view = _swap_pending(store)
    ov = os.open(os.path.join(vdir, "overlay-1.img"), os.O_RDWR)
    try:
        os.pwrite(ov, image[24 * BS :], 24 * BS)  # the whole fill
    finally:
        os.close(ov)
    os.rename(os.path.join(vdir, "overlay-1.img"), os.path.join(vdir, "base.img"))
    assert os.path.exists(os.path.join(vdir, "overlay-1.zlog"))
    _check_finished(path, vdir, image, view)


@pytest.mark.parametrize("mode", ["sideways", 3])
def test_a_damaged_merge_mode_is_refused_naming_the_file(store, mode):
    path = store.path
    vdir, _, _ = _swap_pending(store)
    state_path = os.path.join(vdir, "volume.json")
    with open(state_path) as f:
        state = json.load(f)
    state["merge_mode"] = mode
    with open(state_path, "w") as f:
        json.dump(state, f)
    with Store.open(path) as s, pytest.raises(Exception, match="merge_mode") as err:
        s.open_volume("v")
    assert state_path in str(err.value)


def test_a_merge_mode_without_a_merge_is_refused(store):
    path = store.path
    vol = store.create_volume("v", 4 * BS, BS)
    vdir = vol.dir
    store.close()
    state_path = os.path.join(vdir, "volume.json")
    with open(state_path) as f:
        state = json.load(f)
    state["merge_mode"] = "swap"
    with open(state_path, "w") as f:
        json.dump(state, f)
    with Store.open(path) as s, pytest.raises(Exception, match="no merge is in progress"):
        s.open_volume("v")


def test_big_writes_in_flight_across_swap_merges_keep_every_image(tmp_path):
    """Two threads rewrite their half of the volume in writes big enough to free base's
    cached pages first (volume.FEED_MIN), while the main thread freezes, reads each frozen
    image, and merges the one before (mostly swaps) with the newer cycle's reader open."""
    s = Store.create(str(tmp_path / "store"))
    half = 32 * BS  # 512 KiB: over FEED_MIN, so every write takes the feeding path
    vol = s.create_volume("v", 2 * half, BS)
    done = [0, 0]
    stop = threading.Event()
    errors: list[BaseException] = []

    def stamp(t: int, n: int) -> bytes:
        return (bytes([t + 1]) + n.to_bytes(7, "little")) * (half // 8)

    def writer(t: int) -> None:
        try:
            n = 0
            while not stop.is_set():
                n += 1
                vol.write(t * half, stamp(t, n))
                done[t] = n
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    previous = None
    try:
        for _ in range(40):
            before = list(done)
            cycle = vol.freeze()
            after = list(done)
            reader = cycle.reader()
            reader.__enter__()
            image = reader.read(0, vol.size)
            for t in range(2):
                got = image[t * half : (t + 1) * half]
                assert any(got == (stamp(t, n) if n else bytes(half))
                           for n in range(before[t], after[t] + 1)), (
                    f"cycle {cycle.number}: half {t} is no single write of {before[t]}..{after[t]}")
            if previous is not None:
                old_cycle, old_reader = previous
                old_reader.__exit__(None, None, None)
                vol.merge_through(old_cycle.number - 1)
                assert reader.read(0, vol.size) == image, f"cycle {cycle.number} changed under a merge"
            previous = (cycle, reader)
            time.sleep(0.005)
    finally:
        stop.set()
        for th in threads:
            th.join(30)
        if previous is not None:
            previous[1].__exit__(None, None, None)
    assert not errors, errors
    assert vol.merges_swapped >= 5, f"only {vol.merges_swapped} merges swapped: the test missed its path"
    final = stamp(0, done[0]) + stamp(1, done[1])
    assert vol.read(0, vol.size) == final
    s.close()
    with Store.open(str(tmp_path / "store")) as s2:
        assert s2.open_volume("v").read(0, 2 * half) == final


def _resident(path: str) -> int:
    fincore = require_tool("fincore")
    out = subprocess.run([fincore, "--bytes", "--noheadings", "--output", "RES", path],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def _volume_with_cached_base(store, data: bytes):
    """A volume whose base.img holds ``data`` and is wholly in the page cache (a swap merge
    of overlay 0 made it base with its pages); skips if memory pressure evicted them."""
    vol = store.create_volume("v", len(data), BS)
    for off in range(0, len(data), MiB):
        vol.write(off, data[off:off + MiB])
    vol.freeze()
    vol.merge_through(0)
    base = os.path.join(vol.dir, "base.img")
    if _resident(base) != len(data):
        pytest.skip(f"base.img is not wholly in the page cache ({_resident(base)} bytes): "
                    "memory pressure evicted it, so there is nothing to hand over")
    return vol, base


def test_a_big_write_hands_base_s_cached_pages_of_its_range_to_the_overlay(store):
    # The kernel drops whole folios only; the store's writes make folios of at most
    # WRITE_PIECE (64 KiB, tests/test_pagewrite.py), so 1 MiB ranges drop exactly.
    vol, base = _volume_with_cached_base(store, os.urandom(8 * MiB))
    vol.write(2 * MiB, os.urandom(MiB))  # over FEED_MIN: base's pages of the range go first
    assert _resident(base) == 7 * MiB
    vol.write(5 * MiB, os.urandom(BS))  # small writes leave the cache alone
    assert _resident(base) == 7 * MiB
    with open(base, "rb") as f:
        f.seek(2 * MiB)
        f.read(MiB)  # base's copy of the range cached again
    assert _resident(base) == 8 * MiB
    vol.write(2 * MiB, os.urandom(MiB))  # a rewrite needs no new pages: nothing handed over
    assert _resident(base) == 8 * MiB
    assert vol.read(0, 2 * MiB) == open(base, "rb").read(2 * MiB)  # data untouched


def test_a_freeze_hands_over_base_s_pages_under_the_frozen_overlay_s_long_runs(store):
    data = os.urandom(8 * MiB)
    vol, base = _volume_with_cached_base(store, data)
    # Overlay 1 gets a 1 MiB run from writes under FEED_MIN (which hand nothing over
    # themselves) and a run of one block.
    new = os.urandom(MiB)
    for off in range(0, MiB, 128 * KiB):
        vol.write(2 * MiB + off, new[off:off + 128 * KiB])
    small = os.urandom(BS)
    vol.write(5 * MiB, small)
    assert _resident(base) == 8 * MiB
    vol.freeze()  # base's pages under the 1 MiB run are dead for the view: handed over
    assert _resident(base) == 7 * MiB
    assert vol.read(2 * MiB, MiB) == new
    with open(base, "rb") as f:
        assert f.read() == data  # only the cache went; base's bytes are untouched
    vol.merge_through(1)
    assert vol.read(0, 8 * MiB) == data[:2 * MiB] + new + data[3 * MiB:5 * MiB] + small + \
        data[5 * MiB + BS:]
