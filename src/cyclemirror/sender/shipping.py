"""What one cycle ships: a deterministic stream of frames from a frozen reader.

``cycle_frames`` yields whole frames (bytes) for the blocks in ``owed`` (None:
the whole volume) of frozen cycle ``cycle``: DATA frames packed (read, chunked,
compressed, checksummed) by ``FramePacker`` in bounded batches, ZERO records
for zero runs, and (``scatter``, for targets that speak protocol 2) SCATTER
frames that carry up to a chunk of small extents each: a delta of scattered
4 KiB blocks then costs each side one frame per chunk instead of one per
block.  For one frozen image and one bitmap the stream is always the
same, which is what lets an interrupted cycle resume at chunk N: we simply
regenerate it and skip the first N frames.  Batches are packed by several
threads at once (``PACK_THREADS``) and put back in order; the workers only
pread the layer descriptors the frozen reader pins, never the reader itself.

``block_differences`` compares the frozen image with the target's block
hashes, for the case where change tracking cannot be trusted.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cyclemirror._cext import blockhash, frames
from cyclemirror._cext.bitmap import ExtentBitmap

CODECS = {"none": frames.CODEC_NONE, "lz4": frames.CODEC_LZ4, "zstd": frames.CODEC_ZSTD}
BATCH_BYTES = 8 << 20  # bytes packed per FramePacker call: bounds memory per target
MAX_ZERO_RECORD = 1 << 31  # a ZERO frame's length field is 32 bits
# Batches packed at once: compression is the source's main CPU cost (lz4 makes
# about 600 MiB/s of text per core), so a first cycle uses every core.
PACK_THREADS = max(1, min(4, os.cpu_count() or 1))
POOL_MIN_EXTENT = 64 << 10  # batches of smaller extents (on average) are packed inline
# Data extents shorter than this travel in SCATTER frames (when the target takes them).
SCATTER_MAX_EXTENT = 256 << 10


def cycle_frames(reader, owed: ExtentBitmap | None, cycle: int, packer: frames.FramePacker,
                 block_size: int, threads: int | None = None,
                 scatter: bool = False) -> Iterator[tuple[bytes, int, int]]:
    """Yield (frame, data bytes it carries, volume bytes it covers), deterministically.

    A DATA or SCATTER frame carries and covers its data bytes; a ZERO record
    carries none and covers its run.  With ``scatter`` (delta cycles to targets
    that speak protocol 2) runs shorter than SCATTER_MAX_EXTENT go in SCATTER
    frames.

    Consecutive data extents of one file are packed in one ``pack_extents``
    call (up to BATCH_BYTES): a delta of scattered 4 KiB blocks would
    otherwise pay one call per block.  Batches are packed by ``threads``
    workers at once (default PACK_THREADS; packing reads, hashes and
    compresses without the GIL), at most ``2 * threads`` batches ahead of
    the consumer, and yielded strictly in extent order, so the stream is
    the same whatever the thread count.
    """
    threads = PACK_THREADS if threads is None else threads
    max_run_blocks = max(1, BATCH_BYTES // block_size)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="pack") if threads > 1 else None
    ahead: deque = deque()  # in stream order: a Future of a frame list, or a ZERO frame
    batch: list[tuple[int, int]] = []
    batch_fd, batch_bytes = -1, 0

    def submit():
        nonlocal batch
        if scatter:
            ahead.append(pool.submit(_pack_mixed, packer, batch_fd, batch, cycle) if pool
                         else _pack_mixed(packer, batch_fd, batch, cycle))
        elif pool is None or batch_bytes < POOL_MIN_EXTENT * len(batch):
            # Small extents (a delta's scattered blocks) are Python work per extent
            # under the GIL: workers would only fight over it (measured: 10,376
            # 4 KiB blocks took 0.08 s inline, 0.12 s on two workers).
            ahead.append(_data_frames(packer.pack_extents(batch_fd, batch, cycle)))
        else:
            ahead.append(pool.submit(_pack_data, packer, batch_fd, batch, cycle))
        batch = []

    def ready(limit):
        while len(ahead) > limit:
            item = ahead.popleft()
            if isinstance(item, tuple):
                yield item
                continue
            yield from item if isinstance(item, list) else item.result()

    try:
        for offset, length, kind, fd in reader.extents(owed, max_run_blocks):
            if batch and (kind != "data" or fd != batch_fd or batch_bytes + length > BATCH_BYTES):
                submit()
                batch_bytes = 0
            if kind == "data":
                batch.append((offset, length))
                batch_fd, batch_bytes = fd, batch_bytes + length
            else:
                end = offset + length
                while offset < end:
                    n = min(MAX_ZERO_RECORD, end - offset)
                    ahead.append((frames.encode_zero(frames.FT_ZERO, cycle, offset, n), 0, n))
                    offset += n
            yield from ready(2 * threads)
        if batch:
            submit()
        yield from ready(0)
    finally:
        if pool is not None:
            # Abandoned early (a break, a lost link): packs not started never run, and
            # the reader's files stay open until the running ones are done with them.
            for item in ahead:
                if not isinstance(item, tuple | list):
                    item.cancel()
            pool.shutdown(wait=True)


def _data_frames(frame_list: list[bytes]) -> list[tuple[bytes, int, int]]:
    out = []
    for frame in frame_list:
        n = frames.frame_raw_length(frame)
        out.append((frame, n, n))
    return out


def _pack_data(packer, fd: int, extents: list, cycle: int) -> list[tuple[bytes, int, int]]:
    return _data_frames(packer.pack_extents(fd, extents, cycle))


def _pack_mixed(packer, fd: int, extents: list, cycle: int) -> list[tuple[bytes, int, int]]:
    """Runs of small extents as SCATTER frames, longer extents as DATA frames, in order."""
    out: list[tuple[bytes, int, int]] = []
    small: list[tuple[int, int]] = []
    for ext in extents:
        if ext[1] < SCATTER_MAX_EXTENT:
            small.append(ext)
            continue
        if small:
            out.extend((f, n, n) for f, n in packer.pack_scatter(fd, small, cycle))
            small = []
        out.extend(_data_frames(packer.pack_extents(fd, [ext], cycle)))
    if small:
        out.extend((f, n, n) for f, n in packer.pack_scatter(fd, small, cycle))
    return out


HASH_SPAN_BLOCKS = 16384  # one hash_request: what fits one hashes message


def block_differences(reader, volume, fetch_hashes) -> ExtentBitmap:
    """Blocks where the frozen image differs from the target's image.

    ``fetch_hashes(start_block, count) -> bytes`` returns the target's xxh3-64
    digests (big-endian, 8 bytes each) for that span.
    """
    bs = volume.block_size
    # A file object's reader has its cycle's size; blocks past the end of the target's
    # image hash there as zero blocks (receiver/session.py).
    nblocks = getattr(reader, "nblocks", None) or volume.nblocks
    diff = ExtentBitmap(nblocks)
    for start in range(0, nblocks, HASH_SPAN_BLOCKS):
        count = min(HASH_SPAN_BLOCKS, nblocks - start)
        ours, _zero = blockhash.hash_buffer(reader.read(start * bs, count * bs), bs)
        theirs = np.frombuffer(fetch_hashes(start, count), dtype=">u8").astype(np.uint64)
        diff.union_update(blockhash.diff_hashes(np.asarray(ours, dtype=np.uint64), theirs,
                                                nblocks, start))
    return diff
