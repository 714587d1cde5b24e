"""Readers of mirror images: pins that keep a reader on one applied cycle.

Why.  A mirror image may be read while the target applies new cycles (the
daemon exports each image read-only over NBD).  A reader must never see a
torn, half-applied image, and a client reading the whole image must see one
cycle throughout, so a reader *pins* the image as of the moment it opens it:

* A full cycle never touches the image: it is built in ``.img.new`` and
  renamed over ``.img``; a pinned reader keeps the old file (inode) open.
* A delta cycle is applied in place only while nobody holds a pin; new
  readers wait until that apply is done (``in_place``).  While pins are held,
  apply clones the image (``.img.apply``, a sparse copy), applies into the
  clone and renames it over the image, so the pinned readers keep theirs.
* After a crash, an image whose cycle was committed but not yet redone may be
  torn: it is refused until recovery (the target server's start) redid it,
  and new readers wait while recovery redoes it.

``ImagePins`` is per process (one daemon per store), keyed by the real path
of the mirror's state file, so a group's members share one entry.  Locking:
one condition variable guards every entry; nothing blocks under it except
waiting for an in-place apply to end.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cyclemirror.errors import CycleMirrorError, DeadlineError, NotFoundError, StoreError
from cyclemirror.receiver.state import MirrorState

PIN_WAIT = 60.0  # seconds a new reader waits for an in-place apply to finish
MIRROR_EXPORT_PREFIX = "mirror/"


@dataclass
class _Entry:
    pins: int = 0
    applying: int = 0  # nested applies of this mirror (finish, recovery)
    in_place: bool = False


class ImagePins:
    """Counts readers per mirror and tells an apply whether it may write in place."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self.clones = 0  # applies that wrote a clone because readers held pins

    @staticmethod
    def key(state_path: str) -> str:
        return os.path.realpath(state_path)

    def _entry(self, key: str) -> _Entry:
        return self._entries.setdefault(key, _Entry())

    def _forget_if_idle(self, key: str, e: _Entry) -> None:
        if not e.pins and not e.applying:
            self._entries.pop(key, None)

    @contextmanager
    def applying(self, state_path: str, recovering: bool = False) -> Iterator[None]:
        """Mark the mirror as being applied (from before its commit point until done).

        ``recovering``: the redo of a cycle a crash cut, so the image may be torn
        right now; new readers wait until it is done.
        """
        key = self.key(state_path)
        with self._cond:
            e = self._entry(key)
            e.applying += 1
            if recovering:
                e.in_place = True
        try:
            yield
        finally:
            with self._cond:
                e = self._entry(key)
                e.applying -= 1
                if not e.applying:
                    e.in_place = False
                    self._forget_if_idle(key, e)
                self._cond.notify_all()

    def start_in_place(self, state_path: str) -> bool:
        """True: no readers, write in place (new readers wait); False: write a clone."""
        key = self.key(state_path)
        with self._cond:
            e = self._entry(key)
            if e.pins:
                self.clones += 1
                return False
            e.in_place = True
            return True

    def pin(self, state_path: str, timeout: float = PIN_WAIT) -> bool:
        """Take a pin; returns whether an apply of this mirror is under way in this process."""
        key = self.key(state_path)
        with self._cond:
            e = self._entry(key)
            if not self._cond.wait_for(lambda: not e.in_place, timeout):
                raise DeadlineError(f"mirror {state_path}: an apply has held the image for over "
                                    f"{timeout:g}s; retry when the cycle is applied")
            e = self._entry(key)  # the entry may have been forgotten and made anew
            e.pins += 1
            return e.applying > 0

    def unpin(self, state_path: str) -> None:
        key = self.key(state_path)
        with self._cond:
            e = self._entries.get(key)
            if e is None or e.pins <= 0:
                raise StoreError(f"mirror {state_path}: unpin without a pin (a bookkeeping bug)")
            e.pins -= 1
            self._forget_if_idle(key, e)
            self._cond.notify_all()

    def pinned(self, state_path: str) -> int:
        with self._cond:
            e = self._entries.get(self.key(state_path))
            return e.pins if e else 0


IMAGE_PINS = ImagePins()


@dataclass(frozen=True)
class MirrorImage:
    """One member image of an incoming mirror, as the export names it."""

    node_id: str
    node_name: str | None
    volume: str
    state_path: str
    image_path: str
    size: int
    block_size: int
    applied_cycle: int
    backend: str = "file"  # or "rbd": the image is an RBD snapshot, image_path unused


def mirror_images(root: str) -> list[MirrorImage]:
    """Every incoming mirror image of the store at ``root`` that has an applied cycle."""
    base = os.path.join(root, "mirrors")
    out: list[MirrorImage] = []
    for node in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        ndir = os.path.join(base, node)
        for name in sorted(os.listdir(ndir)) if os.path.isdir(ndir) else []:
            if not name.endswith((".state.json", ".group.json")):
                continue
            path = os.path.join(ndir, name)
            try:
                st = MirrorState.load(path)
            except (CycleMirrorError, OSError):
                continue  # a damaged state is reported by the target's status, not here
            if st.applied_cycle <= 0:
                continue
            joining = st.extra.get("joining", [])  # all zeros until their first cycle
            kind = "rbd" if st.extra.get("backend") else "file"
            for vol in st.volumes:
                if vol.name in joining:
                    continue
                out.append(MirrorImage(node, st.source_name, vol.name, path,
                                       os.path.join(ndir, vol.name + ".img"), vol.size,
                                       vol.block_size, st.applied_cycle, kind))
    return out


def export_names(images: list[MirrorImage]) -> dict[str, MirrorImage]:
    """``mirror/<source>/<volume>`` for each image; <source> is the node id, and also the
    node's name where that name belongs to one source node only."""
    owners: dict[str, set[str]] = {}
    for im in images:
        if im.node_name:
            owners.setdefault(im.node_name, set()).add(im.node_id)
    names: dict[str, MirrorImage] = {}
    for im in images:
        names[f"{MIRROR_EXPORT_PREFIX}{im.node_id}/{im.volume}"] = im
        if im.node_name and owners[im.node_name] == {im.node_id} and "/" not in im.node_name:
            names.setdefault(f"{MIRROR_EXPORT_PREFIX}{im.node_name}/{im.volume}", im)
    return names


def listed_export_names(images: list[MirrorImage]) -> list[str]:
    """One name per image for NBD_OPT_LIST: by node name where unambiguous, else by id."""
    names = export_names(images)
    shown: dict[tuple[str, str], str] = {}
    for name, im in names.items():
        k = (im.state_path, im.volume)
        by_id = name.startswith(f"{MIRROR_EXPORT_PREFIX}{im.node_id}/")
        if k not in shown or not by_id:
            shown[k] = name
    return sorted(shown.values())


class PinnedImage:
    """A reader's hold on one mirror image; ``release()`` gives it back (once)."""

    def __init__(self, image: MirrorImage, pins: ImagePins = IMAGE_PINS,
                 timeout: float = PIN_WAIT):
        self.image = image
        self._pins = pins
        busy = pins.pin(image.state_path, timeout)
        self._held = True
        try:
            st = MirrorState.load(image.state_path)
            if st.committed is not None and not busy:
                raise StoreError(
                    f"mirror image {image.image_path}: cycle {st.committed.cycle} was cut by a "
                    "crash and is not redone yet; it is exported once the target has recovered "
                    "(start the daemon with --listen)")
            if st.applied_cycle <= 0 or (image.backend == "file"
                                         and not os.path.exists(image.image_path)):
                raise NotFoundError(f"mirror image {image.image_path} has no applied cycle")
            # The cycle as of the pin (an RBD reader opens its snapshot, which the pin
            # keeps; the listing may be a cycle older).
            self.applied_cycle = st.applied_cycle
        except BaseException:
            self.release()
            raise

    @property
    def path(self) -> str:
        return self.image.image_path

    def release(self) -> None:
        if self._held:
            self._held = False
            self._pins.unpin(self.image.state_path)
