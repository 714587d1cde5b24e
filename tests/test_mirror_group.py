"""Consistency groups and --as names through the real driver and target (in-process, sockets).

Proves: a group of two volumes is frozen at one instant and applied on the
target as one mirror (one applied cycle and freeze time for every member),
each member image equal to that member's frozen image; later cycles are
deltas of exactly the changed blocks; a restarted driver continues without a
full copy; lost change tracking compares each member's hashes; a mirror
named with ``remote_name`` lands under that name; the owed-set mapping
between a group's joined block space and its members matches a plain
reference.
"""

import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror import keys
from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.errors import UsageError
from cyclemirror.receiver import TargetServer
from cyclemirror.receiver.state import MirrorState
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.sender.group import VolumeGroup
from cyclemirror.store import Store
from tests.support.mirror import same_file, wait_for

MiB = 1 << 20
BS = 4096


@pytest.fixture
def key():
    return keys.generate_key()


@pytest.fixture
def world(tmp_path, key):
    src = Store.create(str(tmp_path / "src"))
    dst = Store.create(str(tmp_path / "dst"))
    server = TargetServer(dst, key, ("127.0.0.1", 0))
    server.start()
    yield {"src": src, "dst": dst, "server": server, "key": key, "tmp": tmp_path}
    server.stop()
    src.close()
    dst.close()


class Recorder:
    """Exports every member's frozen image of every cycle, and keeps the applied stats."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.exports = {}
        self.events = []

    def on_frozen(self, frozen, reader):
        for name, rd in reader.members.items():
            path = os.path.join(self.tmp, f"{name}-{frozen.number}.img")
            if not os.path.exists(path):
                rd.export_to(path)
            self.exports[(name, frozen.number)] = path

    def on_applied(self, cycle, label, stats):
        self.events.append((cycle, stats))

    def stats_of(self, cycle: int) -> dict:
        """The applied stats of ``cycle``: the driver calls on_applied just after a sync
        or wait_applied may have returned, so wait for it."""
        def found():
            return [s for cc, s in self.events if cc == cycle]
        wait_for(found, 10, f"the applied stats of cycle {cycle}")
        (stats,) = found()
        return stats

    def options(self, **kw):
        return MirrorOptions(on_frozen=self.on_frozen, on_applied=self.on_applied,
                             retry_initial=0.05, retry_max=0.2, interval=3600, **kw)


def group_driver(w, rec, vols, name="app", remote_name=None, **kw):
    group = VolumeGroup(w["src"], name, vols, remote_name=remote_name)
    return MirrorDriver(group, w["server"].address, w["key"], rec.options(**kw),
                        store=w["src"])


def target_dir(w):
    return os.path.join(w["dst"].path, "mirrors", w["src"].node_id)


def test_a_group_is_frozen_at_one_instant_and_applied_as_one_mirror(world):
    w, rec = world, Recorder(str(world["tmp"]))
    db = w["src"].create_volume("db", 4 * MiB)
    lg = w["src"].create_volume("log", 2 * MiB, block_size=8192)
    db.write(0, os.urandom(MiB))
    lg.write(MiB, os.urandom(256 * 1024))
    d = group_driver(w, rec, [lg, db])
    d.start()
    try:
        c1 = d.sync(30)
        state = MirrorState.load(os.path.join(target_dir(w), "app.group.json"))
        assert state.applied_cycle == c1 and [v.name for v in state.volumes] == ["db", "log"]
        # The merger folds the applied cycle into each member in turn, after sync
        # returns: the members agree once it is done with both.
        wait_for(lambda: db.frozen_cycles() == lg.frozen_cycles(), 10,
                 "the members' merges of the applied cycle")
        for name in ("db", "log"):
            assert same_file(os.path.join(target_dir(w), f"{name}.img"), rec.exports[(name, c1)])
        # cycle 1 was the full copy (a sync that came after its freeze needed a second)
        assert rec.stats_of(1)["full"]
        db.write(5 * BS, b"d" * BS)
        lg.write(3 * 8192, b"l" * 8192)
        c2 = d.sync(30)
        state = MirrorState.load(os.path.join(target_dir(w), "app.group.json"))
        assert state.applied_cycle == c2 == c1 + 1
        assert state.freeze_time == db.frozen(c2).freeze_time == lg.frozen(c2).freeze_time
        stats = rec.stats_of(c2)
        assert not stats["full"] and stats["bytes_raw"] == BS + 8192
        for name in ("db", "log"):
            assert same_file(os.path.join(target_dir(w), f"{name}.img"), rec.exports[(name, c2)])
        status = d.status()
        assert status["group"] is True and status["members"] == ["db", "log"]
        assert status["volume"] == "app"
    finally:
        d.stop()


def test_a_restarted_group_driver_goes_on_with_deltas_and_lost_state_compares_hashes(world):
    w, rec = world, Recorder(str(world["tmp"]))
    a = w["src"].create_volume("a", 2 * MiB)
    b = w["src"].create_volume("b", 2 * MiB)
    a.write(0, os.urandom(MiB))
    d = group_driver(w, rec, [a, b])
    want = d.request_freeze()
    d.start()
    d.wait_applied(want, 30)
    d.stop()
    b.write(7 * BS, b"x" * BS)
    d = group_driver(w, rec, [a, b])  # a restart: state from the store
    want = d.request_freeze()
    d.start()
    c = d.wait_applied(want, 30)
    d.stop()
    stats = rec.stats_of(c)
    assert not stats["full"] and stats["bytes_raw"] == BS
    assert same_file(os.path.join(target_dir(w), "b.img"), rec.exports[("b", c)])
    # Lose the driver's state: the next cycle compares every member's hashes.
    shutil.rmtree(os.path.join(w["src"].path, "outgoing", ".group-app"))
    a.write(9 * BS, b"y" * 2 * BS)
    d = group_driver(w, rec, [a, b])
    want = d.request_freeze()
    d.start()
    c = d.wait_applied(want, 30)
    d.stop()
    stats = rec.stats_of(c)
    assert not stats["full"] and stats["bytes_raw"] == 2 * BS
    for name in ("a", "b"):
        assert same_file(os.path.join(target_dir(w), f"{name}.img"), rec.exports[(name, c)])


def test_an_interrupted_group_cycle_resumes_after_the_acknowledged_chunk(world):
    """A restarted driver resumes its group cycle mid-stream; the member switch is
    re-sent, so resumed chunks land in the right member's image."""
    w, rec = world, Recorder(str(world["tmp"]))
    a = w["src"].create_volume("a", 4 * MiB)
    b = w["src"].create_volume("b", 4 * MiB)
    a.write(0, os.urandom(4 * MiB))
    b.write(0, os.urandom(4 * MiB))
    d = group_driver(w, rec, [a, b], bwlimit=MiB, codec="none")
    d.start()
    # 8 chunks of 1 MiB at 1 MiB/s, acknowledged every 2 s: wait for an ack inside
    # member b (chunks 4..7), about 2 s before the cycle would end.
    wait_for(lambda: d.targets[0].link is not None and d.targets[0].link.acked[1] > 4, 30,
             "an acknowledgement inside the second member")
    d.stop()
    d = group_driver(w, rec, [a, b], codec="none")
    d.start()
    try:
        c = d.sync(60)
    finally:
        d.stop()
    resumed = [s for cycle, s in rec.events if cycle == 1]
    assert resumed and resumed[0]["resumed_from"] > 4
    for name in ("a", "b"):
        assert same_file(os.path.join(target_dir(w), f"{name}.img"), rec.exports[(name, c)])


def test_members_at_different_overlays_are_aligned_then_compared(world):
    w, rec = world, Recorder(str(world["tmp"]))
    a = w["src"].create_volume("a", MiB)
    b = w["src"].create_volume("b", MiB)
    a.write(0, b"a" * BS)
    a.freeze()
    a.freeze()  # a was mirrored on its own before: overlay 2, b at 0
    d = group_driver(w, rec, [a, b])
    d.start()
    try:
        c = d.sync(30)
        assert a.open_overlay == b.open_overlay == c
        for name in ("a", "b"):
            assert same_file(os.path.join(target_dir(w), f"{name}.img"), rec.exports[(name, c)])
    finally:
        d.stop()


def test_remote_name_names_the_mirror_on_the_target(world):
    w = world
    v = w["src"].create_volume("v", MiB)
    v.write(0, os.urandom(BS))
    d = MirrorDriver(v, w["server"].address, w["key"], MirrorOptions(interval=3600),
                     store=w["src"], remote_name="v-copy")
    d.start()
    try:
        d.sync(30)
    finally:
        d.stop()
    assert os.path.exists(os.path.join(target_dir(w), "v-copy.state.json"))
    with open(os.path.join(target_dir(w), "v-copy.img"), "rb") as f:
        assert f.read(BS) == v.read(0, BS)
    with pytest.raises(UsageError, match="not allowed"):
        MirrorDriver(v, w["server"].address, w["key"], store=w["src"], remote_name="../x")


def test_a_group_refuses_a_volume_listed_twice(world):
    v = world["src"].create_volume("v", MiB)
    with pytest.raises(UsageError, match="twice"):
        VolumeGroup(world["src"], "g", [v, v])


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4),
       runs=st.lists(st.tuples(st.integers(0, 1199), st.integers(1, 40)), max_size=12))
def test_split_and_join_match_a_plain_reference(sizes, runs):
    class Vol:
        def __init__(self, name, n):
            self.name, self.nblocks, self.size, self.block_size = name, n, n * BS, BS

    vols = [Vol(f"v{i}", n) for i, n in enumerate(sizes)]
    group = VolumeGroup(None, "g", vols)
    total = sum(sizes)
    joined = ExtentBitmap(total)
    bits = set()
    for s, n in runs:
        s %= total
        n = min(n, total - s)
        joined.set_range(s, n)
        bits.update(range(s, s + n))
    parts = group.split(joined)
    # Reference: member i owns bits [sum(sizes[:i]), sum(sizes[:i+1])).
    start = 0
    for part, n in zip(parts, sizes, strict=True):
        want = sorted(b - start for b in bits if start <= b < start + n)
        got = [s + k for s, c in part.iter_runs() for k in range(c)]
        assert part.nbits == n and got == want
        start += n
    assert group.join(parts) == joined
    assert group.split(None) == [None] * len(sizes)


def test_members_join_and_leave_without_a_full_copy_of_the_others(world):
    """A group's target keeps the members it had: a newcomer arrives whole inside an
    ordinary delta of the others, a leaver's image goes, nothing else is re-sent."""
    w, rec = world, Recorder(str(world["tmp"]))
    db = w["src"].create_volume("db", 4 * MiB)
    lg = w["src"].create_volume("log", 2 * MiB)
    db.write(0, os.urandom(2 * MiB))
    lg.write(0, os.urandom(MiB))
    d = group_driver(w, rec, [db, lg], remote_name="app-fixed")
    d.start()
    d.sync(30)
    d.stop()
    state_path = os.path.join(target_dir(w), "app-fixed.group.json")

    # A third member joins (a fresh volume, behind the others' overlays).
    ix = w["src"].create_volume("idx", 1 * MiB)
    ix.write(0, os.urandom(256 * 1024))
    db.write(7 * BS, b"d" * BS)
    rec.events.clear()
    d = group_driver(w, rec, [db, lg, ix], remote_name="app-fixed")
    d.start()
    try:
        c = d.sync(30)
        stats = rec.stats_of(c)
        assert not stats["full"]
        # the changed block of db plus all of idx (256 KiB of data; its zero blocks
        # travel as zero runs, no data bytes)
        assert stats["bytes_raw"] == BS + 256 * 1024, stats
        state = MirrorState.load(state_path)
        assert [v.name for v in state.volumes] == ["db", "idx", "log"]
        assert "joining" not in state.extra
        for name in ("db", "idx", "log"):
            assert same_file(os.path.join(target_dir(w), f"{name}.img"),
                             rec.exports[(name, c)])
    finally:
        d.stop()

    # log leaves: its image goes, the others' stay and get a delta.
    lg_image = os.path.join(target_dir(w), "log.img")
    assert os.path.exists(lg_image)
    ix.write(BS, b"i" * BS)
    rec.events.clear()
    d = group_driver(w, rec, [db, ix], remote_name="app-fixed")
    d.start()
    try:
        c = d.sync(30)
        stats = rec.stats_of(c)
        assert not stats["full"] and stats["bytes_raw"] == BS
        assert [v.name for v in MirrorState.load(state_path).volumes] == ["db", "idx"]
        assert not os.path.exists(lg_image)
        for name in ("db", "idx"):
            assert same_file(os.path.join(target_dir(w), f"{name}.img"),
                             rec.exports[(name, c)])
    finally:
        d.stop()


def test_a_changed_member_size_is_still_refused_by_the_target(world):
    w, rec = world, Recorder(str(world["tmp"]))
    a = w["src"].create_volume("a", 1 * MiB)
    b = w["src"].create_volume("b", 1 * MiB)
    d = group_driver(w, rec, [a, b], remote_name="g-fixed")
    d.start()
    d.sync(30)
    d.stop()
    w["src"].delete_volume("b")
    shutil.rmtree(os.path.join(w["src"].path, "outgoing"))
    b = w["src"].create_volume("b", 2 * MiB)
    d = group_driver(w, rec, [a, b], remote_name="g-fixed")
    d.start()
    try:
        wait_for(lambda: d.status()["phase"] == "broken", 30, "the driver to stop")
        (t,) = d.status()["targets"].values()
        assert "size or block-size change" in t["last_error"]
    finally:
        d.stop()
