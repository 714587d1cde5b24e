"""What one cycle ships: a deterministic stream of frames from a frozen reader.

``cycle_frames`` yields whole frames (bytes) for the blocks in ``owed`` (None:
the whole volume) of frozen cycle ``cycle``: DATA frames packed (read, chunked,
compressed, checksummed) by ``FramePacker`` in bounded batches, ZERO records
for zero runs.  For one frozen image and one bitmap the stream is always the
same, which is what lets an interrupted cycle resume at chunk N: we simply
regenerate it and skip the first N frames.

``block_differences`` compares the frozen image with the target's block
hashes, for the case where change tracking cannot be trusted.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from cyclemirror._cext import blockhash, frames
from cyclemirror._cext.bitmap import ExtentBitmap

CODECS = {"none": frames.CODEC_NONE, "lz4": frames.CODEC_LZ4, "zstd": frames.CODEC_ZSTD}
BATCH_BYTES = 8 << 20  # bytes packed per FramePacker call: bounds memory per target
MAX_ZERO_RECORD = 1 << 31  # a ZERO frame's length field is 32 bits


def cycle_frames(reader, owed: ExtentBitmap | None, cycle: int, packer: frames.FramePacker,
                 block_size: int) -> Iterator[tuple[bytes, int]]:
    """Yield (frame, raw DATA bytes it carries; 0 for a ZERO record), deterministically.

    Consecutive data extents of one file are packed in one ``pack_extents``
    call (up to BATCH_BYTES): a delta of scattered 4 KiB blocks would
    otherwise pay one call per block.  The order of frames is the order of
    the extents either way.
    """
    max_run_blocks = max(1, BATCH_BYTES // block_size)
    batch: list[tuple[int, int]] = []
    batch_fd, batch_bytes = -1, 0

    def flush():
        for frame in packer.pack_extents(batch_fd, batch, cycle):
            # raw_length: u32 little-endian at byte 28 of the header (docs/protocol.md)
            yield frame, int.from_bytes(frame[28:32], "little")
        batch.clear()

    for offset, length, kind, fd in reader.extents(owed, max_run_blocks):
        if batch and (kind != "data" or fd != batch_fd or batch_bytes + length > BATCH_BYTES):
            yield from flush()
            batch_bytes = 0
        if kind == "data":
            batch.append((offset, length))
            batch_fd, batch_bytes = fd, batch_bytes + length
        else:
            end = offset + length
            while offset < end:
                n = min(MAX_ZERO_RECORD, end - offset)
                yield frames.encode_zero(frames.FT_ZERO, cycle, offset, n), 0
                offset += n
    if batch:
        yield from flush()


HASH_SPAN_BLOCKS = 16384  # one hash_request: what fits one hashes message


def block_differences(reader, volume, fetch_hashes) -> ExtentBitmap:
    """Blocks where the frozen image differs from the target's image.

    ``fetch_hashes(start_block, count) -> bytes`` returns the target's xxh3-64
    digests (big-endian, 8 bytes each) for that span.
    """
    bs = volume.block_size
    diff = ExtentBitmap(volume.nblocks)
    for start in range(0, volume.nblocks, HASH_SPAN_BLOCKS):
        count = min(HASH_SPAN_BLOCKS, volume.nblocks - start)
        ours, _zero = blockhash.hash_buffer(reader.read(start * bs, count * bs), bs)
        theirs = np.frombuffer(fetch_hashes(start, count), dtype=">u8").astype(np.uint64)
        diff.union_update(blockhash.diff_hashes(np.asarray(ours, dtype=np.uint64), theirs,
                                                volume.nblocks, start))
    return diff
