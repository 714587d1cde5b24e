"""Store.freeze_group: several volumes frozen at one instant, and crash-safe across volumes."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from cyclemirror.errors import NotFoundError, UsageError
from cyclemirror.store import Store
from tests.support.procenv import child_env

BS = 4096


@pytest.fixture
def store(tmp_path):
    with Store.create(str(tmp_path / "s")) as s:
        yield s


def test_members_share_one_freeze_time_and_each_gets_its_dirty_set(store):
    a = store.create_volume("a", 16 * BS)
    b = store.create_volume("b", 32 * BS)
    first = store.freeze_group(["b", "a"])
    assert sorted(first) == ["a", "b"]
    assert first["a"].number == first["b"].number == 1
    assert first["a"].freeze_time == first["b"].freeze_time
    assert first["a"].dirty is None  # cycle 1 is a full copy
    a.write(3 * BS, b"x" * BS)
    b.write(30 * BS, b"y" * BS)
    second = store.freeze_group(["a", "b"])
    assert second["a"].freeze_time == second["b"].freeze_time > first["a"].freeze_time
    assert list(second["a"].dirty.iter_runs()) == [(3, 1)]
    assert list(second["b"].dirty.iter_runs()) == [(30, 1)]
    assert a.open_overlay == b.open_overlay == 2
    assert not os.listdir(os.path.join(store.path, "groups"))  # the intent is gone


@pytest.mark.parametrize("names, error", [
    ([], UsageError), (["a", "a"], UsageError), (["../x"], UsageError), ("a", UsageError),
    (["a", "nosuch"], NotFoundError),
])
def test_bad_member_lists_are_refused_and_freeze_nothing(store, names, error):
    a = store.create_volume("a", 4 * BS)
    with pytest.raises(error):
        store.freeze_group(names)
    assert a.open_overlay == 0


def _counter_at(reader, block):
    return int.from_bytes(reader.read(block * BS, 8), "little")


def test_no_write_falls_on_different_sides_of_the_freeze_in_different_members(store):
    """Writer 1 writes n to a then to b; writer 2 writes n to b then to a (other blocks).

    At any single instant a - b is 0 or 1 for writer 1's block (and b - a for
    writer 2's), so every frozen pair must show that; freezing the members one
    after another would let the second member run ahead.
    """
    a = store.create_volume("a", 16 * BS)
    b = store.create_volume("b", 16 * BS)
    stop = threading.Event()

    def writer(first, second, block):
        n = 0
        while not stop.is_set():
            n += 1
            data = n.to_bytes(8, "little") * (BS // 8)
            first.write(block * BS, data)
            second.write(block * BS, data)

    threads = [threading.Thread(target=writer, args=(a, b, 1)),
               threading.Thread(target=writer, args=(b, a, 2))]
    for t in threads:
        t.start()
    try:
        seen = 0
        for _ in range(60):
            cycles = store.freeze_group(["a", "b"])
            with cycles["a"].reader() as ra, cycles["b"].reader() as rb:
                a1, b1 = _counter_at(ra, 1), _counter_at(rb, 1)
                a2, b2 = _counter_at(ra, 2), _counter_at(rb, 2)
            assert a1 - b1 in (0, 1), (a1, b1)
            assert b2 - a2 in (0, 1), (a2, b2)
            seen = max(seen, a1, b2)
            n = cycles["a"].number
            a.merge_through(n - 1)
            b.merge_through(n - 1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert seen > 0  # the writers really ran between freezes


CHILD = r"""
import os, signal, sys
from cyclemirror.store import Store, group
path = sys.argv[1]
s = Store.open(path)
a, b = s.open_volume("a"), s.open_volume("b")
a.write(0, b"A" * 4096)
b.write(0, b"B" * 4096)
def die(name):
    os.kill(os.getpid(), signal.SIGKILL)
group._after_member_commit = die
s.freeze_group(["a", "b"])
print("not killed", flush=True)
"""


def test_kill_9_between_member_commits_recovers_with_every_member_frozen(tmp_path):
    path = str(tmp_path / "s")
    with Store.create(path) as s:
        s.create_volume("a", 8 * BS)
        s.create_volume("b", 8 * BS)
    proc = subprocess.run([sys.executable, "-c", CHILD, path], env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Before recovery: a committed its freeze, b did not, and the intent says both.
    intents = os.listdir(os.path.join(path, "groups"))
    assert len(intents) == 1
    states = {n: json.load(open(os.path.join(path, "volumes", n, "volume.json")))
              for n in ("a", "b")}
    assert len(states["a"]["overlays"]) == 2 and len(states["b"]["overlays"]) == 1
    with Store.open(path) as s:
        a, b = s.open_volume("a"), s.open_volume("b")
        assert a.open_overlay == b.open_overlay == 1
        fa, fb = a.frozen(1), b.frozen(1)
        assert fa.freeze_time == fb.freeze_time
        with fa.reader() as ra, fb.reader() as rb:
            assert ra.read(0, BS) == b"A" * BS and rb.read(0, BS) == b"B" * BS
        assert not os.listdir(os.path.join(path, "groups"))


def test_an_intent_with_no_member_frozen_freezes_all_on_open(tmp_path):
    path = str(tmp_path / "s")
    with Store.create(path) as s:
        s.create_volume("a", 8 * BS).write(0, b"a" * BS)
        s.create_volume("b", 8 * BS)
        # A crash right after the intent was written, before any commit.
        os.makedirs(os.path.join(path, "groups"))
        with open(os.path.join(path, "groups", "freeze-x.json"), "w") as f:
            json.dump({"members": {"a": 1, "b": 1}}, f)
        with open(os.path.join(path, "groups", "freeze-y.json.tmp"), "w") as f:
            f.write("{")  # a torn temp file of another intent: removed
    with Store.open(path) as s:
        a, b = s.open_volume("a"), s.open_volume("b")
        assert a.open_overlay == b.open_overlay == 1
        assert a.frozen(1).freeze_time == b.frozen(1).freeze_time
        with a.frozen(1).reader() as r:
            assert r.read(0, BS) == b"a" * BS
        assert os.listdir(os.path.join(path, "groups")) == []


def test_a_damaged_intent_stops_the_open_with_a_clear_error(tmp_path):
    from cyclemirror.errors import StoreError

    path = str(tmp_path / "s")
    with Store.create(path) as s:
        s.create_volume("a", 8 * BS)
    os.makedirs(os.path.join(path, "groups"))
    with open(os.path.join(path, "groups", "freeze-x.json"), "w") as f:
        json.dump({"members": {"a": 5}}, f)
    with pytest.raises(StoreError, match="expected 4 or 5"):
        Store.open(path)
    # The failed open released the store's lock.
    os.unlink(os.path.join(path, "groups", "freeze-x.json"))
    Store.open(path).close()
