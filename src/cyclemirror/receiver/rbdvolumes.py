"""Volumes made from RBD mirror images: promote and clone without copying, and their export.

A target that keeps its mirror images in a Ceph pool (``receiver.rbdbackend``)
makes writable volumes out of them inside the cluster, never by reading and
writing the data through the daemon:

* **promote** (``adopt_members``, called by ``receiver.promote`` after the
  commit point, the role records): each member's image ``NODE~VOLUME`` is
  rolled back to its last cycle snapshot ``cyclemirror-<k>`` (the head is the
  apply's scratch; after recovery it equals that snapshot, so this is the
  belt to those braces) and renamed to the volume's name.  Its cycle
  snapshots stay (the last one is the branch point).
* **clone** (``clone``): a copy-on-write RBD clone ``NAME`` of the image's
  last cycle snapshot, clone format 2 (no protected snapshot needed; the
  parent snapshot, once pruned, waits in the image's trash while a clone
  still needs it), or format 1 with the snapshot protected where the cluster
  does not allow format 2 (clients older than mimic allowed).  Mirroring into
  the image goes on.

Either way the volume is an RBD image ``NAME`` in the daemon's pool (a volume
name has no ``~``, so it never collides with a mirror image), recorded in
``STORE/rbd-volumes/NAME.json``.  The daemon exports it read-write over NBD
under its name (``RbdVolumeBackend``), and other Ceph clients (``rbd map``,
qemu's ``rbd:POOL/NAME``) may use it directly.  ``volume rm NAME`` removes the
image and the record (``remove``).

Crash safety of promote: every step is repeatable.  Rollback runs only while
the image still has its mirror name; the rename is done once; the record is
written after the rename and before the mirror state is dropped, so a resumed
promotion (``receiver.promote._resume``) finds each member either still a
mirror image, renamed without a record, or done.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass

from cyclemirror.errors import (
    AlreadyExistsError,
    IntegrityError,
    NotFoundError,
    StoreError,
    UsageError,
)
from cyclemirror.fileio import atomic_write
from cyclemirror.jsontext import loads_strict
from cyclemirror.receiver.rbdbackend import connection, image_name, snap_name
from cyclemirror.store.names import validate_volume_name

log = logging.getLogger(__name__)

RECORDS_DIR = "rbd-volumes"
KINDS = ("promoted", "clone")


@dataclass
class RbdVolume:
    """One RBD volume of this store (``STORE/rbd-volumes/NAME.json``)."""

    name: str
    size: int
    block_size: int
    pool: str
    namespace: str | None
    kind: str  # promoted or clone
    source_node: str
    source_name: str | None
    mirror: str
    member: str
    cycle: int
    parent: str | None  # a clone's IMAGE@SNAPSHOT
    time: float

    @property
    def image(self) -> str:
        return self.name

    def where(self) -> str:
        pool = f"{self.pool}/{self.namespace}" if self.namespace else self.pool
        return f"rbd:{pool}/{self.name}"

    def info(self) -> dict:
        return {"name": self.name, "size": self.size, "block_size": self.block_size,
                "backend": "rbd", "image": self.where(), "kind": self.kind,
                "cycle": self.cycle, "parent": self.parent}


def _dir(root) -> str:
    return os.path.join(os.fspath(root), RECORDS_DIR)


def record_path(root, name: str) -> str:
    return os.path.join(_dir(root), validate_volume_name(name) + ".json")


def _check(rec: dict, where: str) -> RbdVolume:
    fields = set(RbdVolume.__dataclass_fields__)
    if type(rec) is not dict or set(rec) != fields:
        raise IntegrityError(f"RBD volume record {where} is damaged: its fields are not "
                             f"{sorted(fields)}; look at it, or remove it with its image")
    ints = ("size", "block_size", "cycle")
    bad = [k for k in ints if type(rec[k]) is not int or rec[k] < 0] + [
        k for k in ("name", "pool", "source_node", "mirror", "member")
        if not isinstance(rec[k], str) or not rec[k] or len(rec[k]) > 1024]
    if rec["kind"] not in KINDS:
        bad.append("kind")
    if type(rec["time"]) not in (int, float):
        bad.append("time")
    for k in ("namespace", "source_name", "parent"):
        if rec[k] is not None and (not isinstance(rec[k], str) or len(rec[k]) > 1024):
            bad.append(k)
    if bad:
        raise IntegrityError(f"RBD volume record {where} is damaged ({', '.join(bad)}); look "
                             "at it, or remove it with its image")
    return RbdVolume(**rec)


def load(root, name: str) -> RbdVolume | None:
    path = record_path(root, name)
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except FileNotFoundError:
        return None
    rec = loads_strict(data, f"RBD volume record {path}", IntegrityError)
    vol = _check(rec, path)
    if vol.name != name:
        raise IntegrityError(f"RBD volume record {path} names volume {vol.name!r}")
    return vol


def names(root) -> list[str]:
    """The RBD volumes of the store at ``root``."""
    try:
        entries = os.listdir(_dir(root))
    except FileNotFoundError:
        return []
    return sorted(e[:-5] for e in entries if e.endswith(".json") and not e.startswith("."))


def save(root, vol: RbdVolume) -> None:
    os.makedirs(_dir(root), exist_ok=True)
    atomic_write(record_path(root, vol.name),
                 (json.dumps(asdict(vol), sort_keys=True) + "\n").encode(), 0o644)


def _exists(io, name: str) -> bool:
    try:
        io.open(name, None, True).close()
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def _need(rbd, what: str):
    if rbd is None:
        raise UsageError(f"{what} lives in RBD; run this on a daemon started with --rbd-pool "
                         "(and its Ceph settings)")
    return rbd


def _pool(rbd) -> str:
    return f"{rbd.pool}/{rbd.namespace}" if rbd.namespace else rbd.pool


def check_free(store, rbd, volume_names: list[str]) -> None:
    """Refuse names that an RBD image of the pool or an RBD volume already has."""
    io = connection(_need(rbd, "the mirror"))
    for name in volume_names:
        if load(store.path, name) is not None:
            raise AlreadyExistsError(f"RBD volume {name!r} already exists in this store; pick "
                                     "another name (nothing was changed)")
        if _exists(io, name):
            raise AlreadyExistsError(
                f"an RBD image {_pool(rbd)}/{name} already exists (not one of this store's "
                "volumes); pick another name, or remove that image (nothing was changed)")


def adopt_members(store, rbd, st, volume_names: list[str]) -> list[RbdVolume]:
    """Promote: each member image becomes the RBD volume of its name (see the module doc).

    Repeatable from any point a crash cut it at."""
    io = connection(_need(rbd, f"incoming mirror {st.mirror}"))
    snap = snap_name(st.applied_cycle)
    vols = []
    for name, spec in zip(volume_names, st.volumes, strict=True):
        vol = load(store.path, name)
        if vol is None:
            src = image_name(st.source_node, spec.name)
            if _exists(io, src):
                img = io.open(src)
                try:
                    img.snap_rollback(snap)  # the head is the apply's scratch
                finally:
                    img.close()
                io.rename(src, name)
            elif not _exists(io, name):
                raise NotFoundError(
                    f"the promotion of {st.source_name or st.source_node}/{st.mirror} to "
                    f"volume {name} was cut short and neither RBD image {_pool(rbd)}/{src} "
                    f"nor {_pool(rbd)}/{name} exists; restore it from a backup")
            vol = RbdVolume(name=name, size=spec.size, block_size=spec.block_size,
                            pool=rbd.pool, namespace=rbd.namespace, kind="promoted",
                            source_node=st.source_node, source_name=st.source_name,
                            mirror=st.mirror, member=spec.name, cycle=st.applied_cycle,
                            parent=None, time=time.time())
            save(store.path, vol)
            log.info("promote: RBD image %s/%s@%s is volume %s", _pool(rbd), src, snap, name)
        vols.append(vol)
        from cyclemirror import failpoints

        failpoints.hit("promote.adopted")
    return vols


def clone(store, rbd, image, name: str) -> dict:
    """A writable RBD clone ``name`` of mirror image ``image``'s last cycle snapshot."""
    from cyclemirror.receiver.readers import PinnedImage

    t0 = time.monotonic()
    io = connection(_need(rbd, f"mirror image {image.node_id}/{image.volume}"))
    if name in store.list_volumes():
        raise AlreadyExistsError(f"volume {name!r} already exists in this store; pick another "
                                 "name for the clone")
    check_free(store, rbd, [name])
    parent = image_name(image.node_id, image.volume)
    pin = PinnedImage(image)  # the snapshot stays while we clone it
    try:
        cycle = pin.applied_cycle
        snap = snap_name(cycle)
        try:
            io.clone(parent, snap, name, 2)
        except OSError as exc:  # the cluster allows clients older than mimic: format 1
            log.info("clone format 2 of %s/%s@%s refused (%s); protecting the snapshot for "
                     "format 1", _pool(rbd), parent, snap, exc)
            img = io.open(parent)
            try:
                if not img.snap_is_protected(snap):
                    img.snap_protect(snap)
            finally:
                img.close()
            io.clone(parent, snap, name, 1)
        vol = RbdVolume(name=name, size=image.size, block_size=image.block_size,
                        pool=rbd.pool, namespace=rbd.namespace, kind="clone",
                        source_node=image.node_id, source_name=image.node_name,
                        mirror=image.volume, member=image.volume, cycle=cycle,
                        parent=f"{parent}@{snap}", time=time.time())
        save(store.path, vol)
    finally:
        pin.release()
    seconds = time.monotonic() - t0
    log.info("cloned RBD mirror image %s/%s@%s to volume %s (%.3fs)", _pool(rbd), parent,
             snap, name, seconds)
    return {"volume": name, "source_node": image.node_id, "source_name": image.node_name,
            "mirror": image.volume, "cycle": cycle, "size": image.size,
            "block_size": image.block_size, "seconds": seconds, "backend": "rbd",
            "image": vol.where(), "parent": vol.parent}


def remove(store, rbd, name: str) -> dict:
    """``volume rm`` of an RBD volume: its image (and snapshots), then its record."""
    from cyclemirror.receiver.rbdbackend import remove_image

    vol = load(store.path, name)
    if vol is None:
        raise NotFoundError(f"no RBD volume {name!r} in this store")
    io = connection(_need(rbd, f"volume {name}"))
    try:
        remove_image(io, name)
    except OSError as exc:
        raise StoreError(f"RBD volume {name}: its image {_pool(rbd)}/{name} cannot be removed "
                         f"({exc}); a client may still have it open ('rbd status "
                         f"{_pool(rbd)}/{name}'); try again") from exc
    os.unlink(record_path(store.path, name))
    return {"name": name}


class RbdVolumeBackend:
    """An RBD volume exported read-write over NBD: reads and writes go to its head.

    One librbd handle per NBD connection; writes wait for librbd before the
    reply (so the client's buffer is not borrowed past it), flush is librbd's.
    """

    # served as it is (not wrapped as a store volume), released per connection
    nbd_backend = True
    readonly = False
    can_multi_conn = False
    per_connection = True
    fast_zero = False

    def __init__(self, rbd, vol: RbdVolume):
        self.name = f"{_pool(rbd)}/{vol.name}"
        self.block_size = vol.block_size
        self._lock = threading.Lock()  # one librbd handle, several NBD worker threads
        try:
            self._image = connection(rbd).open(vol.name)
        except OSError as exc:
            raise StoreError(f"cannot open RBD volume {self.name}: {exc}") from exc
        self.size = self._image.size()

    def __repr__(self) -> str:
        return f"RbdVolumeBackend({self.name!r})"

    def _range(self, what: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"{what} {offset}+{length} outside {self.name}")

    def read(self, offset: int, length: int) -> bytes:
        self._range("read", offset, length)
        with self._lock:
            return self._image.read(offset, length)

    def write(self, offset: int, data, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        self._range("write", offset, len(view))
        with self._lock:
            self._image.write(view, offset)
            if fua:
                self._image.flush()
            else:
                self._image.drain()

    def write_zeroes(self, offset: int, length: int, fua: bool = False, *,
                     no_hole: bool = False, fast_only: bool = False) -> bool:
        self._range("write zeroes", offset, length)
        with self._lock:
            self._image.write_zeroes(offset, length)
            if fua:
                self._image.flush()
            else:
                self._image.drain()
        return True

    def trim(self, offset: int, length: int) -> None:
        self._range("trim", offset, length)
        with self._lock:
            self._image.discard(offset, length)

    def flush(self) -> None:
        with self._lock:
            self._image.flush()

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]  # all data: cheap and always true

    def release(self) -> None:
        with self._lock:
            image, self._image = self._image, None
        if image is not None:
            image.close()

    close = release


def nbd_backend(store, rbd, name: str):
    """The NBD backend of RBD volume ``name``, or None if there is none."""
    try:
        vol = load(store.path, name)
    except (UsageError, IntegrityError) as exc:
        log.error("%s", exc)
        return None
    if vol is None:
        return None
    return RbdVolumeBackend(_need(rbd, f"volume {name}"), vol)
