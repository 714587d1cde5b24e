"""The scrub record and the scrub, in-process with a real target and source (docs/verify.md).

Proves: a full cycle writes a record of every block's digest and each delta
keeps it current, so a scrub of an untouched image finds nothing, and finds
exactly the blocks flipped behind the target's back (the last block of an
odd-sized volume included), without the source; an image with no record, or
a record of another cycle, gets a new baseline (nothing reported, everything
checked the next time); a damaged record page is counted, refilled and never
taken for rot; a scrub while a writer writes and cycles apply back to back
reports exactly the flipped blocks; kill -9 of the target inside applies
leaves a record that still matches the image; the record's header is pinned.
"""

import os
import random
import threading
import time

import pytest
import xxhash

from cyclemirror import keys
from cyclemirror.receiver import TargetServer
from cyclemirror.receiver.scrub import PAGE, ScrubRecord, record_path, scrub_image
from cyclemirror.receiver.state import MirrorState
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.store import Store
from tests.support.corrupt import flip
from tests.support.mirror import Rig
from tests.support.mirror import wait_for as wait_until

MiB = 1 << 20
BS = 4096


class Target:
    def __init__(self, tmp, size, interval=3600.0):
        key = keys.generate_key()
        self.src = Store.create(str(tmp / "src"))
        self.vol = self.src.create_volume("v", size)
        self.dst = Store.create(str(tmp / "dst"))
        self.server = TargetServer(self.dst, key)
        self.server.start()
        self.driver = MirrorDriver(self.vol, self.server.address, key,
                                   MirrorOptions(interval=interval), store=self.src)
        ndir = os.path.join(self.dst.path, "mirrors", self.src.node_id)
        self.image = os.path.join(ndir, "v.img")
        self.state = os.path.join(ndir, "v.state.json")

    def scrub(self, **kw):
        spec = MirrorState.load(self.state).volumes[0]
        return scrub_image(self.state, self.image, spec, **kw)

    def close(self):
        self.driver.stop()
        self.server.stop()
        self.src.close()
        self.dst.close()


@pytest.fixture
def target(tmp_path):
    made = []

    def make(size, **kw):
        made.append(Target(tmp_path, size, **kw))
        return made[-1]

    yield make
    for t in made:
        t.close()




def blocks_of(bitmap):
    return [s for s, n in bitmap.iter_runs() for s in range(s, s + n)]


def test_the_record_follows_every_cycle_and_a_scrub_finds_exactly_the_rot(target):
    size = 9 * MiB + 3 * BS  # not a whole number of record pages (2 MiB) either
    t = target(size)
    t.vol.write(0, os.urandom(size))
    t.driver.start()
    t.driver.sync(60)
    assert os.path.exists(record_path(t.image))
    rng = random.Random(5)
    for _ in range(3):
        for _ in range(50):
            t.vol.write(rng.randrange(t.vol.nblocks) * BS, rng.randbytes(BS))
        t.vol.trim(rng.randrange(t.vol.nblocks - 8) * BS, 8 * BS)
        t.driver.sync(60)
    clean = t.scrub()
    assert clean.bad.count() == 0
    assert clean.checked_blocks == size // BS and clean.unchecked_blocks == 0
    bad = [BS + 7, 4 * MiB, size - 1]
    flip(t.image, bad)
    found = t.scrub()
    assert blocks_of(found.bad) == sorted(o // BS for o in bad)
    part = t.scrub(offset=3 * MiB, length=2 * MiB)
    assert blocks_of(part.bad) == [4 * MiB // BS]


def test_no_record_or_one_of_another_cycle_gets_a_new_baseline(target):
    t = target(6 * MiB)
    t.vol.write(0, os.urandom(MiB))
    t.driver.start()
    t.driver.sync(60)
    os.unlink(record_path(t.image))
    t.vol.write(0, os.urandom(BS))
    t.driver.sync(60)  # a delta with no record: nothing to update, no record made
    assert not os.path.exists(record_path(t.image))
    first = t.scrub()
    assert first.new_record and first.checked_blocks == 0
    assert first.unchecked_blocks == 6 * MiB // BS and first.bad.count() == 0
    flip(t.image, [MiB])
    assert blocks_of(t.scrub().bad) == [MiB // BS]
    # A record left at another cycle (as if a hook had been lost) is never trusted.
    rec = ScrubRecord.open(record_path(t.image))
    rec.set_cycle(rec.cycle + 5)
    rec.close()
    stale = t.scrub()
    assert stale.new_record and stale.bad.count() == 0 and stale.checked_blocks == 0


def test_a_damaged_record_page_is_refilled_not_reported_as_rot(target):
    t = target(8 * MiB)
    t.vol.write(0, os.urandom(8 * MiB))
    t.driver.start()
    t.driver.sync(60)
    rec = ScrubRecord.open(record_path(t.image))
    data_off = rec.data_off
    rec.close()
    flip(record_path(t.image), [data_off + PAGE + 100])  # page 1's digests
    got = t.scrub()
    assert got.bad.count() == 0 and got.damaged_pages == 1
    assert got.unchecked_blocks == 512
    again = t.scrub()
    assert again.damaged_pages == 0 and again.checked_blocks == 8 * MiB // BS


def test_a_scrub_while_cycles_apply_reports_exactly_the_rot(target):
    size = 16 * MiB
    t = target(size, interval=0.02)
    t.vol.write(0, os.urandom(size))
    t.driver.start()
    t.driver.sync(60)
    bad = [size - 4 * MiB + 1, size - 1]  # the writer stays below size - 4 MiB
    flip(t.image, bad)
    stop = threading.Event()

    def writer():
        rng = random.Random(9)
        while not stop.is_set():
            for _ in range(32):
                t.vol.write(rng.randrange((size - 4 * MiB) // BS) * BS, rng.randbytes(BS))
            time.sleep(0.002)

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    try:
        cycles, rounds = set(), 0
        deadline = time.monotonic() + 60
        while (len(cycles) < 3 or rounds < 5) and time.monotonic() < deadline:
            got = t.scrub()
            assert blocks_of(got.bad) == sorted(o // BS for o in bad)
            assert got.unchecked_blocks == 0
            cycles.update(got.cycles)
            rounds += 1
        assert len(cycles) >= 3  # cycles applied between and during the scrubs
    finally:
        stop.set()
        w.join()


def test_the_record_header_is_pinned(tmp_path):
    path = str(tmp_path / "r.scrub")
    ScrubRecord.create(path, 4096, 1000, 7).close()
    with open(path, "rb") as f:
        head = f.read(56)
    body = (b"CMSCRUB1" + (1).to_bytes(2, "big") + bytes(2) + (4096).to_bytes(4, "big")
            + (1000).to_bytes(8, "big") + (7).to_bytes(8, "big") + (2).to_bytes(8, "big")
            + (4096).to_bytes(8, "big"))
    assert head == body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "big")
    assert os.path.getsize(path) == PAGE + PAGE + 2 * PAGE


def test_kill_9_of_the_target_inside_apply_leaves_a_record_that_matches_the_image(tmp_path):
    """The hook runs inside the redo, before the state says applied: recovery redoes both."""
    rig = Rig(str(tmp_path), size=8 << 20, interval=0.05)
    slow = {"receiver.apply_record": 0.003}  # failpoints.py: a kill can land inside apply
    try:
        rig.start_target(failpoints=slow)
        rig.start_source()
        wait_until(lambda: len(rig.events()) >= 2, 60, "the first cycles")
        kills = 0
        for _ in range(40):
            wait_until(lambda: committed_now(rig), 30, "a committed delta on the target")
            rig.kill("target")
            kills += committed_now(rig)
            rig.start_target(failpoints=slow)
            if kills >= 3:
                break
        assert kills >= 1, "no kill landed inside an apply"
        before = len(rig.events())
        wait_until(lambda: len(rig.events()) >= before + 2, 60, "cycles after the kills")
        final = rig.finish()
        rig.kill("target")
        image = rig.image()
        state = os.path.join(os.path.dirname(image), "v1.state.json")
        got = scrub_image(state, image, MirrorState.load(state).volumes[0])
        assert got.bad.count() == 0
        assert got.unchecked_blocks == 0 and not got.new_record  # the record was kept current
        assert got.cycles == [final["cycle"], final["cycle"]]
    finally:
        rig.close()


def committed_now(rig) -> bool:
    mdir = os.path.join(rig.tmp, "dst", "mirrors")
    try:
        (node,) = os.listdir(mdir)
        return MirrorState.load(os.path.join(mdir, node, "v1.state.json")).committed is not None
    except Exception:  # noqa: BLE001 - not there yet, or damaged mid-kill
        return False


def test_a_scrub_resumed_from_a_point_keeps_what_was_found_and_reads_only_the_rest(target):
    size = 12 * MiB
    t = target(size)
    t.vol.write(0, os.urandom(size))
    t.driver.start()
    t.driver.sync(60)
    flip(t.image, [MiB, 9 * MiB])
    full = t.scrub()
    halfway = 8 * MiB  # a whole number of record pages, as progress reports them
    earlier = full.bad.copy()
    earlier.clear_range(halfway // BS, (size - halfway) // BS)
    resumed = t.scrub(resume_from=halfway, found=earlier)
    assert blocks_of(resumed.bad) == [MiB // BS, 9 * MiB // BS]
    assert resumed.resumed_from == halfway
    assert resumed.bytes_read == size - halfway
