"""A delta's frames packed while its target is still being dialled.

A cycle to a target that needs a new connection waits for the dial: the
connect, the handshake and the target's ``opened``.  On a failback that wait
holds the old primary's whole turn-back (intent, kept copy, renames, fsyncs,
a tenth of a second or more), and a reconnect after a lost link waits for
the target's recovery.  Reading and framing the owed blocks does not need
the link, so the driver starts it at the dial (``Prepack``): a thread pulls
frames from the cycle's stream (``subject.cycle_frames``, deterministic for
one frozen reader, owed set and cycle) into memory, up to ``PREPACK_BYTES``.

When the cycle ships, ``take`` stops that thread and hands over the frames
packed so far and the rest of the same stream, so the shipped stream is
exactly the one the producer would have made itself.  It is used only if the
plan kept the very owed set it was packed from (not a full copy, not a hash
comparison's set) and the target speaks the protocol it was packed for
(SCATTER frames); otherwise it is dropped (``discard``) and the cycle packs
as it always did.  Nothing here touches the link or the driver's state.
"""

from __future__ import annotations

import threading
import time

PREPACK_BYTES = 64 << 20  # frames held at most while a dial is under way


class Prepack:
    """Frames of ``stream`` (an iterator of the producer's items) packed in a thread."""

    def __init__(self, stream, owed, scatter: bool, limit: int = PREPACK_BYTES):
        self.stream = stream
        self.owed = owed  # the very owed set the frames are packed from (identity)
        self.owed_count = owed.count()
        self.scatter = scatter
        self.limit = limit
        self.items: list = []
        self.nbytes = 0
        self.seconds = 0.0
        self.finished = False  # the whole stream is in items
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._taken = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="prepack")
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            while not self._stop.is_set() and self.nbytes < self.limit:
                item = next(self.stream, None)
                if item is None:
                    self.finished = True
                    break
                self.items.append(item)
                self.nbytes += len(item[1])
        except BaseException as exc:  # noqa: BLE001 - raised again by take()
            self.error = exc
        self.seconds = time.monotonic() - t0

    def fits(self, owed, scatter: bool) -> bool:
        """Packed from this owed set, unchanged, for a target of this protocol."""
        return (not self._taken and owed is self.owed and owed.count() == self.owed_count
                and scatter == self.scatter)

    def wait(self) -> None:
        """Until it stopped by itself: at its limit, or at the stream's end."""
        self._thread.join()

    def take(self):
        """Stop packing ahead; return (items packed so far, the rest of the stream)."""
        self._stop.set()
        self._thread.join()
        self._taken = True
        if self.error is not None:
            raise self.error
        items, self.items = self.items, []
        return items, self.stream

    def discard(self) -> None:
        """Stop and drop it (the stream's pack threads are shut down); idempotent."""
        self._stop.set()
        self._thread.join()
        self.items = []
        if not self._taken:
            self._taken = True
            self.stream.close()
