"""Frames packed ahead while a target is dialled (sender/prepack.py).

What ships must be exactly the stream the producer would have made itself,
wherever the packing ahead stopped (its byte limit, or the dial ending at any
frame); a prepack that is not used stops its pack threads and leaves the
frozen reader usable; it fits only the very owed set and protocol it was
packed for.
"""

from __future__ import annotations

import random
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror._cext import frames
from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.sender import shipping
from cyclemirror.sender.prepack import Prepack
from cyclemirror.store import Store

MiB = 1 << 20
BS = 4096


def _volume(tmp_path):
    """A 16 MiB volume with random data, and a delta of 500 scattered blocks frozen."""
    rng = random.Random(5)
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.write(rng.randbytes(16 * MiB))
    store = Store.create(str(tmp_path / "store"))
    vol = store.import_volume("v", str(src))
    vol.freeze()
    for _ in range(500):
        vol.write(rng.randrange(16 * MiB // BS) * BS, rng.randbytes(BS))
    return store, vol.freeze()


def _stream(reader, frozen, owed, threads=2):
    """The producer's items as a driver's subject yields them: (index, frame, raw, covered)."""
    packer = frames.FramePacker(frames.CODEC_NONE, chunk_size=256 << 10)
    for i, (frame, raw, covered) in enumerate(shipping.cycle_frames(
            reader, owed, frozen.number, packer, BS, threads=threads, scatter=True)):
        yield i, frame, raw, covered


def _copy(owed):
    out = ExtentBitmap(owed.nbits)
    for start, count in owed.iter_runs():
        out.set_range(start, count)
    return out


def test_taken_frames_and_the_rest_of_the_stream_are_the_stream(tmp_path):
    store, frozen = _volume(tmp_path)
    try:
        owed = frozen.dirty
        with frozen.reader() as reader:
            expected = list(_stream(reader, frozen, owed, threads=1))
        assert len(expected) > 4
        biggest = max(len(item[1]) for item in expected)

        @settings(max_examples=25, deadline=None)
        @given(limit=st.integers(0, sum(len(f[1]) for f in expected) + 1),
               threads=st.integers(1, 3), dial_done_first=st.booleans())
        def check(limit, threads, dial_done_first):
            with frozen.reader() as reader:
                pre = Prepack(_stream(reader, frozen, owed, threads), owed, True, limit=limit)
                assert pre.fits(owed, True)
                if not dial_done_first:
                    pre.wait()  # it stops by itself: at its limit, or at the stream's end
                    assert pre.finished or limit <= pre.nbytes < limit + biggest
                ahead, rest = pre.take()
                got = list(ahead) + list(rest)
                assert not pre.fits(owed, True)  # taken once
                pre.discard()  # after take: a no-op
            assert got == expected
            assert pre.nbytes < limit + biggest  # never more than its limit and a frame

        check()
    finally:
        store.close()


def test_a_prepack_fits_only_its_own_owed_set_and_protocol(tmp_path):
    store, frozen = _volume(tmp_path)
    try:
        owed = _copy(frozen.dirty)
        with frozen.reader() as reader:
            pre = Prepack(_stream(reader, frozen, owed), owed, True)
            assert pre.fits(owed, True)
            assert not pre.fits(owed, False)  # a protocol-1 target: no SCATTER frames
            assert not pre.fits(_copy(owed), True)  # the plan made another set (a compare)
            assert not pre.fits(None, True)  # the plan chose a full copy
            owed.set_range(0, owed.nbits)  # changed in place (a repair owed more blocks)
            assert not pre.fits(owed, True)
            pre.discard()
    finally:
        store.close()


def test_a_discarded_prepack_stops_its_workers_and_keeps_the_reader_usable(tmp_path):
    store, frozen = _volume(tmp_path)
    try:
        owed = frozen.dirty
        before = {t.name for t in threading.enumerate()}
        with frozen.reader() as reader:
            pre = Prepack(_stream(reader, frozen, owed, threads=3), owed, True, limit=BS)
            pre.discard()
            assert not [t for t in threading.enumerate()
                        if t.name.startswith(("pack", "prepack")) and t.name not in before]
            again = list(_stream(reader, frozen, owed))
        with frozen.reader() as reader:
            assert again == list(_stream(reader, frozen, owed, threads=1))
    finally:
        store.close()


def test_a_failing_stream_fails_the_take():
    class Boom(Exception):
        pass

    def stream():
        yield 0, b"frame", 5, 5
        raise Boom("the frozen overlay could not be read")

    class Owed:
        def count(self):
            return 1

    pre = Prepack(stream(), Owed(), True)
    try:
        pre.take()
    except Boom as exc:
        assert "could not be read" in str(exc)
    else:
        raise AssertionError("take() did not raise the stream's error")
