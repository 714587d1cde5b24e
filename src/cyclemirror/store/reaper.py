"""Closing the files of merged layers off the merge's path.

When the last descriptor of an unlinked file closes, the filesystem frees
all of its extents. For an overlay written by small random writes that is
one extent per run of blocks, and freeing them is ext4 work in the closing
thread: 1.9 s for an overlay of 27,000 runs, measured, against 0.35 s for the
rest of its merge. A merge therefore removes the names itself (cheap while a
descriptor is still open) and hands the layers to its volume's reaper, whose
one thread retires them at the lowest CPU priority, so neither the next freeze
nor the writers are held back by the freeing.

The names are gone when merge_through returns; ``drain`` waits until every
layer handed over is retired (Volume.close calls it, so a closed volume has
no descriptor left open).
"""

from __future__ import annotations

import logging
import os
import queue
import threading

from cyclemirror.store.layer import Layer

log = logging.getLogger(__name__)


NICE = 19  # Linux applies it to this thread only
IDLE_SECONDS = 5.0  # the thread ends after this long without work; the next merge starts another


class Reaper:
    """A background thread retiring layers, running only while there is work."""

    def __init__(self, name: str):
        self._name = name
        self._queue: queue.Queue[Layer | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def retire_later(self, layer: Layer) -> None:
        self._queue.put(layer)  # before the check below: a thread about to end sees it
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"reaper-{self._name}", daemon=True
                )
                self._thread.start()

    def drain(self) -> None:
        """Wait until every layer handed over so far is retired."""
        self._queue.join()

    def _run(self) -> None:
        try:
            # The freeing is filesystem work in this thread: let writers go first.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        except OSError:  # not allowed here: run at the caller's priority
            pass
        while True:
            try:
                layer = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._start_lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            try:
                layer.retire()
            except OSError as exc:  # the data is already merged: only the descriptor is lost
                log.warning("closing %s after its merge failed: %s", layer.path, exc)
            finally:
                self._queue.task_done()
