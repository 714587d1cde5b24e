"""Crash safety of the store: SIGKILL a child running a random workload, reopen, check.

Each trial creates a store, starts tests/support/store_crash_child.py on it, kills it
with SIGKILL after a random delay, reopens the store here and checks against
the model replayed up to the last operation the child reported (and the one
after it, which may have run partly, wholly or not at all):

* every 4 KiB page of the view holds its content after the last reported
  operation or after the one in flight: nothing completed is lost (so nothing
  acknowledged after a flush is), and nothing is torn inside a page;
* the frozen cycles are those before or after the in-flight operation (an
  interrupted freeze or merge is all or nothing), each frozen image is exact,
  and its dirty and zeroed sets are exactly what the model says;
* every third trial crashes a second time while a new process reopens the
  store (recovery itself must be restartable);
* the open overlay's recovered dirty set (seen by freezing it) holds every
  block the model touched and nothing outside that plus the in-flight
  operation's blocks: a safe superset, never a full copy.

A few trials run by default; CYCLEMIRROR_SLOW=1 runs 60.
"""

from __future__ import annotations

import copy
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cyclemirror.store import Store
from tests.support.procenv import child_env
from tests.support.reference.store_model import VolumeModel
from tests.support.store_crash_child import workload
from tests.support.tools import SLOW

TRIALS = 60 if SLOW else 4
NBLOCKS = 64
PAGE = 4096
CHILD = Path(__file__).parent / "support" / "store_crash_child.py"


def _apply(model: VolumeModel, op: tuple) -> None:
    kind = op[0]
    if kind == "write":
        model.write(op[1], op[2])
    elif kind in ("write_zeroes", "trim"):
        model.write_zeroes(op[1], op[2])
    elif kind == "freeze":
        model.freeze()
    elif kind == "merge":
        model.merge_through(op[1])


def _op_blocks(op: tuple | None, bs: int) -> set[int]:
    if op is None or op[0] not in ("write", "write_zeroes", "trim"):
        return set()
    off = op[1]
    length = len(op[2]) if op[0] == "write" else op[2]
    return set(range(off // bs, (off + length + bs - 1) // bs))


def _bits(bitmap) -> set[int]:
    return {b for s, n in bitmap.iter_runs() for b in range(s, s + n)}


def _run_child_and_kill(store_path: str, seed: int, delay: float) -> tuple[int, bool, int]:
    env = child_env()
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), store_path, str(seed), "1000000"],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        first = proc.stdout.readline()
        assert first == b"ready\n", f"crash child did not start: {first!r}"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
    lines = out.split()
    done = b"done" in lines
    indexes = [int(x) for x in lines if x.isdigit()]
    return (max(indexes) if indexes else -1), done, lines.count(b"swap")


def _kill_during_reopen(store_path: str, delay: float) -> None:
    """A second crash, while the store recovers (redoing a merge, repairing torn blocks)."""
    env = child_env()
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), store_path, "0", "0"], stdout=subprocess.DEVNULL, env=env
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _trial(tmp_path: Path, seed: int) -> dict:
    rng = random.Random(seed)
    bs = 4096 if seed % 2 == 0 else 16384
    size = NBLOCKS * bs
    store_path = str(tmp_path / f"store-{seed}")
    with Store.create(store_path) as store:
        store.create_volume("v", size, bs)
    last, done, swaps = _run_child_and_kill(store_path, seed, rng.uniform(0.0, 0.4))
    if seed % 3 == 0:
        _kill_during_reopen(store_path, rng.uniform(0.0, 0.3))

    ops = list(workload(seed, size, bs, last + 2))
    before = VolumeModel(size, bs)
    for op in ops[: last + 1]:
        _apply(before, op)
    inflight = None if done or len(ops) <= last + 1 else ops[last + 1]
    after = copy.deepcopy(before)
    if inflight is not None:
        _apply(after, inflight)
    inflight_blocks = _op_blocks(inflight, bs)

    with Store.open(store_path) as store:
        vol = store.open_volume("v")
        cycles = vol.frozen_cycles()
        assert cycles in (before.frozen_cycles(), after.frozen_cycles()), (
            f"seed {seed}: frozen cycles {cycles} are neither the pre- nor the post-state"
        )
        model = before if cycles == before.frozen_cycles() else after

        view = vol.read(0, size)
        for p in range(0, size, PAGE):
            page = view[p : p + PAGE]
            assert page in (before.view[p : p + PAGE], after.view[p : p + PAGE]), (
                f"seed {seed}: page at {p} lost completed data (last op {last}, in flight {inflight and inflight[0]})"
            )

        for k in cycles:
            image, dirty, zeroed = model.frozen[k]
            cycle = vol.frozen(k)
            with cycle.reader() as reader:
                assert reader.read(0, size) == image, f"seed {seed}: frozen image {k} differs"
            if dirty is None:
                assert cycle.dirty is None
            else:
                assert _bits(cycle.dirty) == dirty, f"seed {seed}: cycle {k} dirty set"
                assert _bits(cycle.zeroed) == zeroed, f"seed {seed}: cycle {k} zeroed set"

        opened = vol.open_overlay
        new = vol.freeze()
        if opened > 0:
            got = _bits(new.dirty)
            must = before.touched if model is before else after.touched
            may = must | after.touched | inflight_blocks
            assert must <= got, f"seed {seed}: recovered dirty set lost {sorted(must - got)[:8]}"
            assert got <= may, f"seed {seed}: recovered dirty set has extra {sorted(got - may)[:8]}"
            zeroed = _bits(new.zeroed)
            for b in set(range(NBLOCKS)) - inflight_blocks:
                assert (b in zeroed) == (b in model.zeroed), f"seed {seed}: block {b} zeroed flag"
        with new.reader() as reader:
            assert reader.read(0, size) == view
        return {"last": last, "inflight": inflight and inflight[0], "torn": vol.torn_blocks_repaired,
                "swaps": swaps}


@pytest.mark.timeout(600)
def test_kill_minus_nine_keeps_completed_writes_frozen_images_and_dirty_sets(tmp_path):
    results = [_trial(tmp_path, seed) for seed in range(1000, 1000 + TRIALS)]
    ops = [r["last"] for r in results]
    print(f"\n{TRIALS} kill -9 trials; ops completed per trial {ops}; "
          f"torn blocks repaired {sum(r['torn'] for r in results)}; "
          f"merges by swap {[r['swaps'] for r in results]}; "
          f"in flight {[r['inflight'] for r in results]}")
    assert max(ops) > 0, "the child never completed an operation: the test checked nothing"
    assert sum(r["swaps"] for r in results), "no merge swapped files: that path went unchecked"
