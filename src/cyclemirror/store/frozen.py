"""Frozen cycles and their readers: the view exactly as it was at a freeze instant.

Frozen cycle *k* is the image "overlays older than *k* over base". Its
overlays never change again, and base changes only when a merge folds in the
oldest overlay; merging overlay *j* alters the images of cycles <= *j*, so a
merge waits until no reader of such a cycle is open (``Volume`` keeps the
counts). A ``FrozenReader`` pins its layers (``Layer.acquire``) so that a
merge of an overlay *inside* its image may remove the files while the reader
keeps reading them through its descriptors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.errors import BitmapRangeError, UsageError
from cyclemirror.store.resolve import DATA, classify, read_range

EXTENT_WINDOW_BLOCKS = 1 << 20

if TYPE_CHECKING:
    from cyclemirror.store.layer import Layer
    from cyclemirror.store.volume import Volume


class FrozenCycle:
    """Cycle ``number``: freeze time, what overlay ``number - 1`` changed, and a reader.

    ``dirty`` and ``zeroed`` are private copies (None for cycle 1, which ships
    everything); callers may modify them freely.  A cycle frozen with
    ``Volume.freeze(sync=False)`` is readable at once; ``sync()`` makes the
    frozen overlay durable (a mirror overlaps it with shipping and calls it
    again, waiting, before the target may commit).
    """

    def __init__(
        self,
        volume: Volume,
        number: int,
        freeze_time: float,
        dirty: ExtentBitmap | None,
        zeroed: ExtentBitmap | None,
    ):
        self.volume = volume
        self.number = number
        self.freeze_time = freeze_time
        self.dirty = dirty
        self.zeroed = zeroed
        self._unsynced = None  # the frozen overlay while its fsync is still owed
        self._sync_lock = threading.Lock()

    @property
    def synced(self) -> bool:
        return self._unsynced is None

    def sync(self) -> None:
        """Make the frozen overlay durable (once; others wait for the first caller)."""
        with self._sync_lock:
            if self._unsynced is not None:
                self.volume._sync_frozen(self._unsynced, release=True)
                self._unsynced = None

    def reader(self) -> FrozenReader:
        return FrozenReader(self)

    def __repr__(self) -> str:
        return f"FrozenCycle({self.volume.name!r}, number={self.number})"


class FrozenReader:
    """A context manager holding the frozen image open. One thread at a time per reader."""

    def __init__(self, cycle: FrozenCycle):
        self.cycle = cycle
        self._volume = cycle.volume
        self._overlays: list[Layer] | None = None
        self._base: Layer | None = None

    def __enter__(self) -> FrozenReader:
        if self._overlays is not None:
            raise UsageError("this FrozenReader is already open; take a new one with cycle.reader()")
        self._overlays, self._base = self._volume._open_reader(self.cycle.number)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._overlays is None:
            return
        layers, base = self._overlays, self._base
        self._overlays = self._base = None
        self._volume._close_reader(self.cycle.number, layers, base)

    def _layers(self) -> tuple[list[Layer], Layer]:
        if self._overlays is None:
            raise UsageError(
                f"reader of cycle {self.cycle.number} of volume {self._volume.name!r} is not open; "
                "use it as 'with cycle.reader() as r:'"
            )
        return self._overlays, self._base

    def read(self, offset: int, length: int) -> bytes:
        overlays, base = self._layers()
        self._volume._check_range(offset, length, "frozen read")
        return read_range(overlays, base, offset, length, self._volume.block_size)

    def extents(
        self, blocks: ExtentBitmap | None, max_run_blocks: int
    ) -> Iterator[tuple[int, int, str, int]]:
        """(offset, length, "data"|"zero", fd) in ascending order over ``blocks`` (None = all)."""
        vol = self._volume
        if type(max_run_blocks) is not int or max_run_blocks < 1:
            raise UsageError(f"max_run_blocks must be a positive integer, got {max_run_blocks!r}")
        if blocks is None:
            ranges: Iterator[tuple[int, int]] = iter([(0, vol.nblocks)])
        else:
            if not isinstance(blocks, ExtentBitmap):
                raise UsageError(f"blocks must be an ExtentBitmap or None, got {type(blocks).__name__}")
            if blocks.nbits != vol.nblocks:
                raise BitmapRangeError(
                    f"block bitmap has {blocks.nbits} bits but volume {vol.name!r} has "
                    f"{vol.nblocks} blocks; it belongs to another volume or size"
                )
            ranges = blocks.iter_runs()
        self._layers()
        return self._extents(ranges, max_run_blocks)

    def _extents(self, ranges, max_run_blocks):
        bs = self._volume.block_size
        overlays, _base = self._layers()
        top = overlays[0] if overlays else None
        for start, count in ranges:
            if (top is not None and count <= max_run_blocks
                    and top.dirty.count_range(start, count) == count
                    and not (top.has_zeroed and top.zeroed.any_in_range(start, count))):
                # The common delta run: wholly data of the newest frozen overlay. Exactly
                # what classify() yields for it, without resolving it through the stack
                # (that Python walk per run was most of a scattered delta's packing time).
                self._layers()  # still open
                yield start * bs, count * bs, DATA, top.fd
                continue
            # Windows bound the segment lists of a fragmented image (a run crossing a
            # window edge is yielded as two runs, which every consumer accepts).
            for w in range(start, start + count, EXTENT_WINDOW_BLOCKS):
                overlays, base = self._layers()
                stop = min(w + EXTENT_WINDOW_BLOCKS, start + count)
                for s, c, kind, fd in classify(overlays, base, w, stop, bs, max_run_blocks):
                    yield s * bs, c * bs, kind, fd

    def export_to(self, path: str) -> None:
        """Write this frozen image to ``path`` as a sparse raw file (atomically replaced)."""
        from cyclemirror.store.exporter import write_image

        write_image(path, self._volume.size, self.extents(None, 1 << 18))
