"""Concurrent writers against freezes and merges: every frozen image is a cut, every byte lands.

Whole-block writes copy their data outside the volume lock, so several run at
once; read-modify-write, zeroing, trimming and the freeze's switch wait for
them (``Volume._drain_writes_locked``).  These tests drive that with real
threads on a real store: each thread runs its own seeded list of operations
(aligned and unaligned writes, write_zeroes, trim) on a region of its own,
one after the other, while the main thread freezes, reads every frozen image
and merges, again and again.

What must hold:
* a frozen image shows, for every thread, exactly the state after some
  prefix of its operations: no operation torn by a freeze, none reordered;
  the prefix lies between what had completed before freeze() was called and
  what had completed when it returned;
* after all threads are done, the view equals each thread's model, and so
  does a fresh open of the store (after close), byte for byte.
The models are plain bytearrays replayed in Python (the reference lives here,
independent of the store's code).
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from cyclemirror.store import Store, group
from tests.support.tools import SLOW

BS = 4096
REGION = 128 * BS  # per thread: big aligned writes (slow enough to be in flight) and small ones
THREADS = 4
OPS = 300 if SLOW else 80


def make_ops(seed: int) -> list[tuple]:
    rnd = random.Random(seed)
    ops = []
    nblocks = REGION // BS
    for i in range(OPS):
        kind = rnd.choice(["aligned", "aligned", "aligned", "unaligned", "zero", "trim"])
        if kind == "aligned":
            b0 = rnd.randrange(nblocks)
            n = rnd.randint(1, nblocks - b0)
            ops.append(("write", b0 * BS, rnd.randbytes(8) * (n * BS // 8)))
        elif kind == "unaligned":
            off = rnd.randrange(REGION - 1)
            n = rnd.randint(1, min(3 * BS, REGION - off))
            ops.append(("write", off, bytes([i % 251 + 1]) * n))
        else:
            off = rnd.randrange(REGION - 1)
            n = rnd.randint(1, min(16 * BS, REGION - off))
            ops.append((kind, off, n))
    return ops


class Model:
    """One thread's region replayed in Python; state(k) = after its first k operations."""

    def __init__(self, ops: list[tuple]):
        self.ops = ops
        self.k = 0
        self.img = bytearray(REGION)

    @staticmethod
    def _apply(img: bytearray, op: tuple) -> None:
        kind, off, arg = op
        if kind == "write":
            img[off:off + len(arg)] = arg
        else:  # write_zeroes and trim both read back as zeroes
            img[off:off + arg] = bytes(arg)

    def states(self, lo: int, hi: int) -> dict[int, bytes]:
        """The states lo..hi (lo never goes back between calls)."""
        while self.k < lo:
            self._apply(self.img, self.ops[self.k])
            self.k += 1
        img = bytearray(self.img)
        out = {lo: bytes(img)}
        for k in range(lo, hi):
            self._apply(img, self.ops[k])
            out[k + 1] = bytes(img)
        return out


def apply(vol, base: int, op: tuple) -> None:
    kind, off, arg = op
    if kind == "write":
        vol.write(base + off, arg)
    elif kind == "zero":
        vol.write_zeroes(base + off, arg)
    else:
        vol.trim(base + off, arg)


@pytest.mark.parametrize("seed", [1, 2] if not SLOW else [1, 2, 3, 4, 5, 6])
def test_frozen_images_are_cuts_of_every_writer_and_every_byte_lands(tmp_path, seed):
    store = Store.create(str(tmp_path / "store"))
    vol = store.create_volume("v", THREADS * REGION, block_size=BS)
    ops = [make_ops(seed * 100 + t) for t in range(THREADS)]
    models = [Model(o) for o in ops]
    done = [0] * THREADS  # operations completed per thread (written by that thread only)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for op in ops[t]:
                apply(vol, t * REGION, op)
                done[t] += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    checked = 0
    previous = None  # (cycle, image) of the last freeze
    try:
        while any(th.is_alive() for th in threads) or checked < 3:
            before = list(done)
            cycle = vol.freeze()
            after = list(done)
            with cycle.reader() as reader:
                image = reader.read(0, vol.size)
            for t in range(THREADS):
                got = image[t * REGION:(t + 1) * REGION]
                cuts = [k for k, state in models[t].states(before[t], after[t]).items()
                        if state == got]
                assert cuts, (f"cycle {cycle.number}, thread {t}: the frozen region is no state "
                              f"after {before[t]}..{after[t]} of its operations")
            if previous is not None:
                # The frozen image never changes, and the cycle's dirty set covers every
                # block that differs from the previous image (what the cycle ships).
                old_cycle, old_image = previous
                with cycle.reader() as reader:
                    assert reader.read(0, vol.size) == image, f"cycle {cycle.number} changed"
                for b in range(vol.nblocks):
                    if image[b * BS:(b + 1) * BS] != old_image[b * BS:(b + 1) * BS]:
                        assert cycle.dirty.test(b), (
                            f"cycle {cycle.number}: block {b} changed but is not in its dirty set")
                vol.merge_through(old_cycle.number - 1)
            previous = (cycle, image)
            checked += 1
    finally:
        for th in threads:
            th.join(60)
    assert not errors, errors
    assert checked >= 3
    for t in range(THREADS):
        final = models[t].states(OPS, OPS)[OPS]
        assert vol.read(t * REGION, REGION) == final, f"thread {t}: view differs"
    store.close()
    reopened = Store.open(str(tmp_path / "store")).open_volume("v")
    for t in range(THREADS):
        final = models[t].states(OPS, OPS)[OPS]
        assert reopened.read(t * REGION, REGION) == final, f"thread {t}: reopen differs"


def test_partial_block_writes_never_undo_a_whole_block_write_in_flight(tmp_path):
    """A read-modify-write of a partial block waits for whole-block writes in flight: it
    never writes back a stale copy of the block around its few bytes.

    Each round, one thread writes 32 whole blocks with the round's stamp while another
    writes a few bytes into the first of them, both released at once; the block is new
    to the overlay (a freeze starts every round), so the small write is a
    read-modify-write.  Either order is fine; the previous round's stamp is not."""
    store = Store.create(str(tmp_path / "store"))
    vol = store.create_volume("v", 64 * BS, block_size=BS)
    span, small_at, small_len = 32 * BS, 1000, 100
    rounds = 1500 if SLOW else 400
    gate = threading.Barrier(3)
    errors: list[BaseException] = []

    def big_writer() -> None:
        try:
            for r in range(1, rounds + 1):
                gate.wait()
                vol.write(0, r.to_bytes(8, "little") * (span // 8))
                gate.wait()
        except BaseException as exc:
            errors.append(exc)
            gate.abort()

    def small_writer() -> None:
        try:
            for _ in range(rounds):
                gate.wait()
                vol.write(small_at, b"\xee" * small_len)
                gate.wait()
        except BaseException as exc:
            errors.append(exc)
            gate.abort()

    threads = [threading.Thread(target=big_writer), threading.Thread(target=small_writer)]
    for th in threads:
        th.start()
    try:
        for r in range(1, rounds + 1):
            gate.wait()  # go
            gate.wait()  # both done
            image = vol.read(0, span)
            expected = bytearray(r.to_bytes(8, "little") * (span // 8))
            if image[small_at:small_at + small_len] == b"\xee" * small_len:
                expected[small_at:small_at + small_len] = b"\xee" * small_len
            assert image == bytes(expected), (
                f"round {r}: block 0 holds {image[:8].hex()} around the small write, a stale "
                "copy from before the big write")
            cycle = vol.freeze()
            vol.merge_through(cycle.number - 1)
    finally:
        gate.abort()
        for th in threads:
            th.join(60)
    assert not errors or all(isinstance(e, threading.BrokenBarrierError) for e in errors), errors
    store.close()


def test_a_freeze_waits_for_a_whole_block_write_in_flight(tmp_path, monkeypatch):
    """The switch to the new overlay happens with no write copying data: a long write that
    is in flight when the freeze starts lands wholly in one image."""
    store = Store.create(str(tmp_path / "store"))
    vol = store.create_volume("v", 256 << 20, block_size=BS)
    big = b"\x5a" * (128 << 20)  # tens of milliseconds of copying
    in_flight_at_commit = []
    monkeypatch.setattr(group, "_after_member_commit",
                        lambda name: in_flight_at_commit.append(vol._writing))
    started = threading.Event()

    def writer() -> None:
        started.set()
        vol.write(0, big)

    th = threading.Thread(target=writer)
    th.start()
    started.wait()
    time.sleep(0.002)
    cycle = group.freeze_group(store, ["v"])["v"]
    th.join(60)
    assert in_flight_at_commit == [0]
    with cycle.reader() as reader:
        head, tail = reader.read(0, BS), reader.read(len(big) - BS, BS)
    assert head == tail and head in (bytes(BS), big[:BS]), "the write is split by the freeze"
    assert vol.read(len(big) - BS, BS) == big[:BS]
    store.close()


def test_parallel_whole_block_writes_to_one_range_leave_one_of_them(tmp_path):
    """Overlapping whole-block writes in flight together: each block ends as one whole write
    (no mix of two writes inside a block), and a freeze between them cuts cleanly."""
    store = Store.create(str(tmp_path / "store"))
    vol = store.create_volume("v", 64 * BS, block_size=BS)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        n = 0
        try:
            while not stop.is_set():
                n += 1
                vol.write(0, (bytes([t + 1]) + n.to_bytes(7, "little")) * (64 * BS // 8))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    try:
        for _ in range(8):
            cycle = vol.freeze()
            with cycle.reader() as reader:
                for b in range(64):
                    block = reader.read(b * BS, BS)
                    assert block == block[:8] * (BS // 8), f"block {b} mixes two writes"
            vol.merge_through(cycle.number - 1)
    finally:
        stop.set()
        for th in threads:
            th.join(60)
    assert not errors, errors
    store.close()
