"""The cycle's frame stream is the same whatever the number of packing threads.

Resume depends on it: an interrupted cycle is regenerated and its first N
frames skipped, so the N-th frame must be the same chunk every time.  Also:
a stream abandoned half way (a break, a lost link) stops its workers and
leaves the frozen reader usable.
"""

from __future__ import annotations

import random

import pytest

from cyclemirror._cext import frames
from cyclemirror.sender import shipping
from cyclemirror.store import Store

MiB = 1 << 20
BS = 4096


@pytest.fixture
def frozen_volume(tmp_path):
    """A 24 MiB volume with random, compressible and zero parts, then a delta on top."""
    rng = random.Random(3)
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(24 * MiB)
        for i in range(24):
            f.seek(i * MiB)
            if i % 3 == 0:
                f.write(rng.randbytes(MiB))
            elif i % 3 == 1:
                f.write(b"cyclemirror " * (MiB // 12))
    store = Store.create(str(tmp_path / "store"))
    vol = store.import_volume("v", str(src))
    first = vol.freeze()
    for _ in range(300):
        vol.write(rng.randrange(24 * MiB // BS) * BS, rng.randbytes(BS))
    second = vol.freeze()
    yield vol, first, second
    store.close()


def stream(frozen, owed, threads, codec=frames.CODEC_LZ4, scatter=False):
    packer = frames.FramePacker(codec, chunk_size=256 << 10)
    with frozen.reader() as reader:
        return list(shipping.cycle_frames(reader, owed, frozen.number, packer, BS,
                                          threads=threads, scatter=scatter))


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_full_and_delta_streams_do_not_depend_on_the_thread_count(frozen_volume, threads):
    vol, first, second = frozen_volume
    assert stream(first, None, threads) == stream(first, None, 1)
    owed = second.dirty
    assert owed.count() > 0
    assert stream(second, owed, threads) == stream(second, owed, 1)
    assert stream(second, owed, threads, scatter=True) == stream(second, owed, 1, scatter=True)


def test_the_stream_covers_the_volume_once(frozen_volume):
    vol, first, _second = frozen_volume
    covered = 0
    for frame, raw, extent in stream(first, None, 4):
        header = frames.decode_header(frame[:frames.HEADER_SIZE],
                                      frames.FrameLimits(64 * MiB, 64 * MiB, 1 << 20, vol.size))
        covered += header.raw_length
        assert raw == (header.raw_length if header.type == frames.FT_DATA else 0)
        assert extent == header.raw_length
    assert covered == vol.size


def test_a_scattered_delta_travels_in_scatter_frames_that_cover_exactly_the_owed_blocks(
        frozen_volume):
    vol, _first, second = frozen_volume
    owed = second.dirty
    limits = frames.FrameLimits(64 * MiB, 64 * MiB, 1 << 20, vol.size, BS)
    blocks, data_bytes, kinds = set(), 0, set()
    with second.reader() as reader:
        expected = {b: reader.read(b * BS, BS) for s, n in owed.iter_runs()
                    for b in range(s, s + n)}
    frames_out = stream(second, owed, 2, scatter=True)
    for frame, raw, extent in frames_out:
        header = frames.decode_header(frame[:frames.HEADER_SIZE], limits)
        kinds.add(header.type)
        assert raw == extent
        payload = frames.decode_payload(header, frame[frames.HEADER_SIZE:])
        if header.type == frames.FT_SCATTER:
            pos = frames.SCATTER_TABLE_HEAD + frames.SCATTER_ENTRY * len(
                frames.scatter_extents(payload, vol.size, BS))
            for off, ln in frames.scatter_extents(payload, vol.size, BS):
                for k in range(ln // BS):
                    b = off // BS + k
                    assert payload[pos + k * BS:pos + (k + 1) * BS] == expected[b]
                    blocks.add(b)
                pos += ln
        else:
            assert header.type == frames.FT_DATA
            for k in range(header.raw_length // BS):
                assert payload[k * BS:(k + 1) * BS] == expected[header.offset // BS + k]
                blocks.add(header.offset // BS + k)
        data_bytes += raw
    assert frames.FT_SCATTER in kinds
    assert blocks == set(expected) and data_bytes == len(expected) * BS
    # Far fewer frames than blocks: that is what SCATTER is for.
    assert len(frames_out) * 8 < len(expected)


def test_an_abandoned_stream_stops_its_workers_and_keeps_the_reader_usable(frozen_volume):
    import threading

    vol, first, _second = frozen_volume
    before = {t.name for t in threading.enumerate()}
    packer = frames.FramePacker(frames.CODEC_ZSTD, level=3, chunk_size=256 << 10)
    with first.reader() as reader:
        gen = shipping.cycle_frames(reader, None, first.number, packer, BS, threads=4)
        next(gen)
        gen.close()
        assert not [t for t in threading.enumerate()
                    if t.name.startswith("pack") and t.name not in before]
        # The reader still serves a whole new stream.
        again = list(shipping.cycle_frames(reader, None, first.number, packer, BS, threads=2))
    with first.reader() as reader:
        serial = list(shipping.cycle_frames(reader, None, first.number, packer, BS, threads=1))
    assert again == serial
