"""The RBD backend: each member's mirror image is an RBD image in a Ceph pool.

Names: member ``VOLUME`` of a mirror from source node ``NODE`` is the image
``NODE~VOLUME`` in the configured pool (and namespace); ``~`` appears in
neither a node id nor a volume name, so fan-in of two sources with the same
volume name gets two images.  The consistent copy is the snapshot
``cyclemirror-<cycle>`` of the last applied cycle; the image's head is
scratch that only an apply writes.

* Full cycle: built in a new image ``NODE~VOLUME~new`` (so the head and its
  snapshots stay as they are while the next cycle is received and the one
  before is applied), written with librbd's asynchronous writes, zero runs as
  write-zeroes (which deallocates whole objects).  Install (the apply): the old image is renamed to ``~old``, the
  new one takes the name, the old one is removed with its snapshots.  Each
  step is idempotent, so recovery may run them again.
* Delta: rollback of the head to the last cycle's snapshot when recovery
  redoes a cycle a crash cut (the head may hold part of it), then the records
  are replayed into the head (data through the binding's object writer, one
  RADOS operation per 4 MiB object, where the image is plain; else, and zero
  runs, through librbd, with no cache: ``CLIENT_OPTIONS`` says why);
  ``finish`` makes them durable.
* ``applied(cycle)``: snapshot ``cyclemirror-<cycle>`` of every member (an
  existing one, left by a crash after it, is made again).  Once the state
  names the cycle as applied, older ``cyclemirror-*`` snapshots are removed
  (in a thread, while the source hears of the apply) but for the last ``keep_cycles`` (``serve --keep-cycles N``, default 1) of
  them, which stay as remote history (while a reader of this daemon holds a
  snapshot, nothing is removed; a later cycle does it).  A full cycle installs a
  new image, so the history starts again with it.

Readers (the NBD export) open the snapshot of the applied cycle read-only, so
they never see a half-applied head.  The cluster connection is shared by all
mirrors of a daemon (``connection``); a cluster that is down or unreachable
raises ``OSError`` (ETIMEDOUT after the configured timeouts).  A full pool
(over its quota, or an OSD over the full ratio) fails a write that needs room
at once with EDQUOT or ENOSPC: the I/O context asks for that
(``set_pool_full_try``), where librados would otherwise pause every write,
even an image's open, until the pool has room or the op timeout ends it.
``cluster_error`` turns those into errors that name the pool and what to do;
all are temporary: the source retries and resumes after its last
acknowledged chunk.
"""

from __future__ import annotations

import errno
import logging
import threading

from cyclemirror.errors import (
    ClusterUnavailableError,
    NoSpaceError,
    StoreError,
    UsageError,
)
from cyclemirror.receiver.backend import RbdConfig
from cyclemirror.receiver.readers import IMAGE_PINS

log = logging.getLogger(__name__)

SNAP_PREFIX = "cyclemirror-"
SNAP_NAMESPACE_USER, SNAP_NAMESPACE_TRASH = 0, 2  # librbd's snapshot namespaces
NEW_SUFFIX = "~new"
OLD_SUFFIX = "~old"
# A cluster that does not answer is an error after these (seconds), not a hang.
TIMEOUTS = {"client_mount_timeout": 30, "rados_mon_op_timeout": 30,
            "rados_osd_op_timeout": 60}
# No librbd cache: its write-around mode completes a write before the OSD has it,
# and a write the OSD then refused (EDQUOT from a full pool) was seen to reach no
# flush: the apply's last flush returned 0, the cycle's snapshot was taken without
# the delta (tests/test_rbd_full.py).  Without it each write's completion carries
# the OSD's answer, which ``Image.drain`` raises.
CLIENT_OPTIONS = {"rbd_cache": "false"}

_connections: dict[tuple, object] = {}
_conn_lock = threading.Lock()


def load_binding():
    """The compiled librbd binding, or a UsageError that says what to install."""
    try:
        from cyclemirror._cext import rbd
    except ImportError as exc:
        if "cannot open shared object" in str(exc):  # built, but librbd is not installed
            raise UsageError(
                f"an RBD target needs librbd and librados, which cyclemirror's binding "
                f"cannot load ({exc}); install them (Debian: apt-get install librbd1 "
                "librados2; the cyclemirror package recommends them)") from None
        raise UsageError(
            "an RBD target needs cyclemirror's librbd binding (cyclemirror._cext.rbd), which "
            f"this build lacks ({exc}); install librbd-dev and librados-dev (Debian: "
            "apt-get install librbd-dev librados-dev) and rebuild cyclemirror "
            "(pip install . or python3 setup.py build_ext --inplace)") from None
    return rbd


def connection(cfg: RbdConfig):
    """The shared I/O context for ``cfg``'s cluster, client, pool and namespace."""
    key = (cfg.conf, cfg.client, cfg.keyring, cfg.pool, cfg.namespace)
    with _conn_lock:
        io = _connections.get(key)
        if io is not None:
            return io
        rbd = load_binding()
        try:
            cluster = rbd.Cluster(cfg.conf, cfg.client, cfg.keyring,
                                  {**TIMEOUTS, **CLIENT_OPTIONS})
            cluster.connect()
            io = cluster.ioctx(cfg.pool, cfg.namespace)
            # A full pool: EDQUOT/ENOSPC for writes that need room, not a 60 s pause.
            io.set_pool_full_try()
        except OSError as exc:
            raise ClusterUnavailableError(
                f"RBD target: cannot reach pool {cfg.pool!r} of the Ceph cluster "
                f"({cfg.conf or 'default config'}, as {cfg.client}): {exc}; check the cluster "
                "config, the client's keyring and that the pool exists (sources retry)"
            ) from exc
        _connections[key] = io
        return io


def cluster_error(cfg: RbdConfig, what: str, exc: OSError):
    """``exc`` from librbd as an error that names ``cfg``'s pool and what to do, or None.

    A pool over its quota (EDQUOT), a cluster too full for the pool (ENOSPC) and
    a cluster that did not answer within the timeouts (ETIMEDOUT) are temporary:
    the source retries with backoff and resumes after its last acknowledged chunk
    (the last cycle's snapshot is untouched meanwhile).  ``what`` names the
    mirror and its source.
    """
    pool = f"{cfg.pool}/{cfg.namespace}" if cfg.namespace else cfg.pool
    resume = "the source retries and resumes after its last ack"
    if exc.errno == errno.EDQUOT:
        return NoSpaceError(
            f"{what}: the Ceph pool {cfg.pool!r} is full: over its quota ({exc.strerror}; "
            f"ceph osd pool get-quota {cfg.pool}); raise or lift the quota (ceph osd pool "
            f"set-quota {cfg.pool} max_bytes BYTES, 0 for none) or free space in the pool: "
            f"{resume}")
    if exc.errno == errno.ENOSPC:
        return NoSpaceError(
            f"{what}: the Ceph cluster is full for pool {pool!r} ({exc.strerror}: an OSD is "
            "over its full ratio; ceph health detail); add capacity or free space in the "
            f"cluster: {resume}")
    if exc.errno == errno.ETIMEDOUT:
        return ClusterUnavailableError(
            f"{what}: the Ceph cluster did not answer for pool {pool!r} within the client "
            f"timeouts ({exc}); check the cluster (ceph -s) and the network to it: {resume}")
    return None


def remove_image(io, name: str) -> bool:
    """Remove image ``name`` and its snapshots; False if there was none."""
    try:
        img = io.open(name)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    try:
        for snap, snap_id, namespace in img.snap_ids():
            if namespace == SNAP_NAMESPACE_USER:
                img.snap_remove(snap)
            else:  # e.g. trashed by a removal that a kill -9 cut short: by its id
                img.snap_remove_by_id(snap_id)
    finally:
        img.close()
    io.remove(name)
    return True


def remove_mirror_images(cfg: RbdConfig, node: str, volumes: list[str]) -> list[str]:
    """``mirror rm`` of an RBD mirror: every image of its members; returns pool/image names."""
    io = connection(cfg)
    removed = []
    for vol in volumes:
        base = image_name(node, vol)
        for name in (base, base + NEW_SUFFIX, base + OLD_SUFFIX):
            if remove_image(io, name):
                removed.append(f"{cfg.pool}/{name}")
    return removed


def image_name(node: str, volume: str) -> str:
    return f"{node}~{volume}"


def snap_name(cycle: int) -> str:
    return f"{SNAP_PREFIX}{cycle}"


def snap_cycle(name: str) -> int | None:
    """The cycle of a snapshot ``cyclemirror-<cycle>``; None for any other name."""
    if not name.startswith(SNAP_PREFIX):
        return None
    digits = name[len(SNAP_PREFIX):]
    if not digits.isascii() or not digits.isdigit() or digits != str(int(digits)):
        return None
    return int(digits)


def stale_snapshots(names: list[str], applied: int, keep: int) -> list[str]:
    """The cycle snapshots among ``names`` to remove once ``applied`` is the applied cycle.

    Kept: ``cyclemirror-<applied>`` and the ``keep - 1`` newest cycle snapshots
    before it (remote history).  Removed: older ones, and any of a cycle after
    ``applied`` (a crash's leftover; the redo of that cycle makes it anew).
    Snapshots of other names (an administrator's) are never touched.
    """
    cycles = sorted((c for c in map(snap_cycle, names) if c is not None and c <= applied),
                    reverse=True)
    kept = set(cycles[:max(1, keep)]) | {applied}
    return [n for n in names if (c := snap_cycle(n)) is not None and c not in kept]


class RbdBackend:
    kind = "rbd"
    keeps_files = False
    resizes = True  # a cycle may change an image's size (RbdDeltaApply.resize)

    def __init__(self, directory: str, state, cfg: RbdConfig, record: dict):
        self.directory = directory
        self.state = state
        self.cfg = cfg
        if record.get("pool") != cfg.pool or (record.get("namespace") or None) != (
                cfg.namespace or None):
            raise UsageError(
                f"mirror {state.mirror!r}: its images are in pool {record.get('pool')!r} "
                f"namespace {record.get('namespace')!r}, but this daemon is configured for "
                f"pool {cfg.pool!r} namespace {cfg.namespace!r}; configure that pool")
        self.io = connection(cfg)
        self._pruner: threading.Thread | None = None  # after_state_saved's removals

    # -- names ---------------------------------------------------------------
    def image_name(self, index: int) -> str:
        return image_name(self.state.source_node, self.state.volumes[index].name)

    def _members(self) -> range:
        return range(len(self.state.volumes))

    def _open(self, name: str, snapshot: str | None = None, read_only: bool = False):
        return self.io.open(name, snapshot, read_only)

    def _exists(self, name: str) -> bool:
        try:
            self._open(name, read_only=True).close()
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def _remove(self, name: str) -> None:
        remove_image(self.io, name)

    def images_present(self) -> bool:
        return all(self._exists(self.image_name(i)) for i in self._members())

    def check_sizes(self) -> None:
        snap = snap_name(self.state.applied_cycle)
        for i in self._members():
            name = self.image_name(i)
            try:
                img = self._open(name, snap, read_only=True)
            except OSError as exc:
                raise StoreError(f"mirror {self.state.mirror!r}: RBD image "
                                 f"{self.cfg.pool}/{name}@{snap} cannot be opened ({exc}); "
                                 "re-seed the mirror") from exc
            try:
                size = img.size()
            finally:
                img.close()
            if size != self.state.volumes[i].size:
                raise StoreError(f"RBD image {self.cfg.pool}/{name}@{snap} is {size} bytes, "
                                 f"expected {self.state.volumes[i].size}; re-seed it")

    # -- full cycles ---------------------------------------------------------
    def full_writer(self, index: int, size: int) -> RbdWriter:
        self.wait_pruned()
        name = self.image_name(index) + NEW_SUFFIX
        fresh = not self._exists(name)
        if fresh:
            self.io.create(name, size)
        img = self._open(name)
        try:
            return RbdWriter(img, fresh)
        except BaseException:
            img.close()
            raise

    def full_present(self) -> bool:
        return all(self._exists(self.image_name(i) + NEW_SUFFIX) for i in self._members())

    def discard_full(self) -> None:
        self.wait_pruned()
        for i in self._members():
            self._remove(self.image_name(i) + NEW_SUFFIX)

    def install_full(self, cycle: int) -> None:
        """``~new`` takes the image's name; the old image goes (idempotent: recovery
        may run it again from any point)."""
        self.wait_pruned()
        for i in self._members():
            name = self.image_name(i)
            new, old = name + NEW_SUFFIX, name + OLD_SUFFIX
            if self._exists(new):
                self._remove(old)  # a leftover of a crash before (usually none)
                try:
                    self.io.rename(name, old)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:  # no image yet: a first cycle
                        raise
                self.io.rename(new, name)
            try:
                self._remove(old)
            except OSError as exc:  # a reader still has it open: a later cycle retries
                log.info("RBD image %s/%s: not removed yet (%s)", self.cfg.pool, old, exc)

    # -- deltas ----------------------------------------------------------------
    def discard_partial_apply(self) -> None:
        pass  # the head is only written by the redo of a committed cycle

    def open_delta(self, cycle: int, state_path: str, recovering: bool) -> RbdDeltaApply:
        self.wait_pruned()
        images = []
        try:
            for i in self._members():
                img = self._open(self.image_name(i))
                images.append(img)
                if recovering and self.state.applied_cycle > 0:
                    # The head may hold part of this cycle: start from the last one.
                    img.snap_rollback(snap_name(self.state.applied_cycle))
            return RbdDeltaApply(images)
        except BaseException:
            for img in images:
                img.close()
            raise

    def applied(self, cycle: int) -> None:
        self.wait_pruned()
        snap = snap_name(cycle)
        for i in self._members():
            img = self._open(self.image_name(i))
            try:
                img.flush()
                if any(s == snap for s, _ in img.snap_list()):
                    img.snap_remove(snap)  # made before a crash: the head is that cycle anew
                img.snap_create(snap)
            finally:
                img.close()

    def after_state_saved(self, cycle: int) -> None:
        """Remove the snapshots of cycles older than the last ``keep_cycles``, unless a
        reader here holds one.

        In a thread of its own: each removal is a monitor round trip (about a second
        on a small cluster) that the source need not wait for, since the state names
        the cycle as applied already.  Whatever touches the images next waits for it
        (``wait_pruned``); a crash meanwhile leaves snapshots the next cycle removes.
        """
        from cyclemirror.receiver.mirror import Mirror

        self.wait_pruned()
        state_path = Mirror.state_file(self.directory, self.state.mirror, self.state.group)
        if IMAGE_PINS.pinned(state_path):
            return
        thread = threading.Thread(target=self._prune, args=(cycle,), daemon=True,
                                  name=f"rbd-prune-{self.state.mirror}")
        self._pruner = thread
        thread.start()

    def _prune(self, cycle: int) -> None:
        for i in self._members():
            try:
                img = self._open(self.image_name(i))
                try:
                    names = [snap for snap, _size in img.snap_list()]
                    for snap in stale_snapshots(names, cycle, self.cfg.keep_cycles):
                        img.snap_remove(snap)
                finally:
                    img.close()
            except OSError as exc:  # not worth failing an applied cycle: next time
                log.warning("RBD image %s/%s: old snapshots not removed: %s", self.cfg.pool,
                            self.image_name(i), exc)

    def wait_pruned(self) -> None:
        """Wait for the removal of old snapshots ``after_state_saved`` started, if any."""
        thread = self._pruner  # not cleared: callers in two threads both wait for it
        if thread is not None:
            thread.join()

    # -- group membership ----------------------------------------------------
    def new_member(self, name: str, size: int) -> None:
        self.wait_pruned()
        full = image_name(self.state.source_node, name)
        self._remove(full)  # a leftover of a crashed change: zeros again
        self.io.create(full, size)
        if self.state.applied_cycle > 0:
            img = self._open(full)
            try:
                img.snap_create(snap_name(self.state.applied_cycle))
            finally:
                img.close()

    def members_changed(self) -> None:
        pass

    def remove_member(self, name: str) -> None:
        self.wait_pruned()
        remove_mirror_images(self.cfg, self.state.source_node, [name])

    def describe(self) -> dict:
        from cyclemirror.receiver.backend import backend_record, rbd_status

        return rbd_status(self.state, backend_record(self.state))

    def block_digests(self, index: int, start: int, count: int, block_size: int) -> bytes:
        """xxh3-64 of each block (big-endian), read from the applied cycle's snapshot."""
        import numpy as np

        from cyclemirror._cext import blockhash

        img = self._open(self.image_name(index), snap_name(self.state.applied_cycle),
                         read_only=True)
        out = []
        try:
            step = max(1, (8 << 20) // block_size)
            for b0 in range(start, start + count, step):
                n = min(step, start + count - b0)
                data = img.read(b0 * block_size, n * block_size)
                hashes, _zero = blockhash.hash_buffer(data, block_size)
                out.append(np.asarray(hashes, dtype=">u8").tobytes())
        finally:
            img.close()
        return b"".join(out)

    # -- the scrub record (receiver.scrub) -----------------------------------------
    def image_path_of(self, index: int) -> str:
        """Where a file image would be: the scrub record goes beside it, in the store."""
        import os

        return os.path.join(self.directory, self.state.volumes[index].name + ".img")

    def snapshot_hasher(self, index: int, cycle: int) -> _SnapshotHasher:
        """Block digests of spans of member ``index`` at cycle ``cycle``'s snapshot."""
        return _SnapshotHasher(self._open(self.image_name(index), snap_name(cycle),
                                          read_only=True),
                               self.state.volumes[index].block_size)

    def close(self) -> None:
        self.wait_pruned()  # the connection is shared; images are closed after each use


class _SnapshotHasher:
    """``digests(offset, length)`` of one open snapshot; ``close()`` when done."""

    def __init__(self, image, block_size: int):
        self.image = image
        self.block_size = block_size

    def __call__(self, offset: int, length: int):
        import numpy as np

        from cyclemirror._cext import blockhash

        hashes, _zero = blockhash.hash_buffer(self.image.read(offset, length), self.block_size)
        return np.asarray(hashes, dtype=np.uint64)

    def close(self) -> None:
        self.image.close()


class _ImageWrites:
    """The writes of one apply into one open image: data through the image's
    ``ObjectWriter`` where the image is plain (the binding says), zero runs
    and everything of another kind of image through librbd.

    The object writer gathers the writes per 4 MiB data object and sends one
    RADOS operation per object with all of its extents: 1% of scattered 4 KiB
    blocks is about a tenth as many operations on the OSD as writes through
    librbd, and a full cycle's 1 MiB chunks go as one operation per object.
    Zero runs go through librbd's write-zeroes (it deallocates whole
    objects).  The two ways never overlap in flight: before librbd's
    write-zeroes the gathered writes are sent and waited for, and before the
    next gathered write librbd's are flushed.
    """

    def __init__(self, image):
        self.image = image
        self.writer = image.object_writer()
        self._librbd_unflushed = False

    def write(self, data, offset: int) -> None:
        writer = self.writer
        if writer is None:
            self.image.write(data, offset)
            return
        if self._librbd_unflushed:
            self.image.flush()
            self._librbd_unflushed = False
        writer.write(data, offset)

    def zero(self, offset: int, length: int) -> None:
        if self.writer is not None:
            self.writer.flush()
            self._librbd_unflushed = True
        # Not discard: librbd skips partial-object discards (rbd_skip_partial_discard).
        self.image.write_zeroes(offset, length)

    def flush(self) -> None:
        """Every write so far is durable when this returns."""
        if self.writer is not None:
            self.writer.flush()
        self.image.flush()
        self._librbd_unflushed = False

    def resize(self, size: int) -> None:
        """Resize the image; the object writer (which knows the image's size) is made
        anew for the new size."""
        self.flush()
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()
        self.image.resize(size)
        self.writer = self.image.object_writer()

    def mark(self):
        """Start making every write so far durable, without waiting: a mark for
        ``reached``, or None where this image has no object writer (``flush`` then)."""
        if self.writer is None:
            return None
        if self._librbd_unflushed:  # zero runs through librbd: rare in a full cycle
            self.image.flush()
            self._librbd_unflushed = False
        return self.writer.mark()

    def reached(self, mark, wait: bool = False) -> bool:
        """Whether the writes before ``mark`` are durable (``wait``: wait until they are);
        a failed write is raised."""
        return self.writer.reached(mark, wait)

    def close(self) -> None:
        writer, self.writer = self.writer, None
        try:
            if writer is not None:
                writer.close()
        finally:
            self.image.close()


class RbdWriter:
    """A full cycle's writer into one RBD image (the ``ImageWriter`` interface).

    ``fresh``: the image was created for this cycle, so it reads as zeroes
    beyond the end of everything written to it so far: a zero run there (a
    full cycle's extents come in offset order) needs no I/O, which saves a
    cluster round trip per zero run.  Anywhere else, and on a resumed
    cycle's image, the run is written as zeroes.
    """

    def __init__(self, image, fresh: bool = False):
        self.image = image
        self.writes = _ImageWrites(image)
        self.fresh = fresh
        self.written_end = 0  # the end of the furthest write into this image

    def write(self, data, offset: int) -> None:
        writer = self.writes.writer
        if writer is not None:
            # A full cycle streams in offset order: the objects behind this write are
            # complete, so they go to the OSD now instead of piling up.
            writer.send_before(offset)
        self.writes.write(data, offset)
        self.written_end = max(self.written_end, offset + len(data))

    def punch(self, offset: int, length: int) -> None:
        if self.fresh and offset >= self.written_end:
            return
        self.writes.zero(offset, length)
        self.written_end = max(self.written_end, offset + length)

    def sync(self) -> None:
        self.writes.flush()

    @property
    def can_mark(self) -> bool:
        """Whether ``sync_mark`` works here (the image has an object writer)."""
        return self.writes.writer is not None

    def sync_mark(self):
        """An asynchronous ``sync``: a mark for ``sync_reached``, or None (then ``sync``)."""
        return self.writes.mark()

    def sync_reached(self, mark, wait: bool = False) -> bool:
        return self.writes.reached(mark, wait)

    def close(self) -> None:
        self.writes.close()


class RbdDeltaApply:
    """Replays one delta into the members' heads (see ``_ImageWrites``)."""

    def __init__(self, images: list):
        self.images = images
        self.writes: list[_ImageWrites] = []
        for img in images:
            self.writes.append(_ImageWrites(img))

    def write(self, member: int, data, offset: int) -> None:
        self.writes[member].write(data, offset)

    def zero(self, member: int, offset: int, length: int) -> None:
        self.writes[member].zero(offset, length)

    def resize(self, member: int, size: int) -> None:
        """The head takes the cycle's size first (a file object that grew or shrank);
        a redo after a crash starts from the last cycle's snapshot, rolled back with its
        size, so this is idempotent like the records replayed after it."""
        self.writes[member].resize(size)

    def scatter(self, member: int, raw, volume_size: int, block_size: int) -> None:
        from cyclemirror._cext import frames

        extents = frames.scatter_extents(raw, volume_size, block_size)
        view = memoryview(raw)
        pos = len(view) - sum(length for _off, length in extents)
        writes = self.writes[member]
        for offset, length in extents:
            writes.write(view[pos:pos + length], offset)
            pos += length

    def finish(self) -> None:
        for writes in self.writes:
            writes.flush()

    def close(self) -> None:
        writes, self.writes = self.writes, []
        images, self.images = self.images, []
        for w in writes:
            w.close()
        for img in images[len(writes):]:  # opened, but no writer made for it
            img.close()


class RbdSnapshotReader:
    """A read-only NBD backend of one RBD mirror image at one cycle's snapshot.

    The snapshot never changes, so a reader sees one applied cycle throughout;
    the daemon's pin keeps the snapshot from being removed while it reads.
    """

    # served as it is (not wrapped as a store volume), released per connection
    nbd_backend = True
    readonly = True
    can_multi_conn = False  # another connection may read another cycle's snapshot
    per_connection = True
    fast_zero = False

    def __init__(self, cfg: RbdConfig, node: str, volume: str, cycle: int, block_size: int,
                 on_release=None):
        self.name = f"{cfg.pool}/{image_name(node, volume)}@{snap_name(cycle)}"
        self.block_size = block_size
        self._on_release = on_release
        self._lock = threading.Lock()  # one librbd image handle, several NBD worker threads
        try:
            self._image = connection(cfg).open(image_name(node, volume), snap_name(cycle), True)
        except OSError as exc:
            raise StoreError(f"cannot open RBD image {self.name}: {exc}") from exc
        self.size = self._image.size()

    def __repr__(self) -> str:
        return f"RbdSnapshotReader({self.name!r})"

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"read {offset}+{length} outside {self.name}")
        return self._image.read(offset, length)

    def flush(self) -> None:
        pass

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]  # all data: cheap and always true

    def _refuse(self, *args, **kwargs):
        raise PermissionError(errno.EPERM, f"{self.name} is exported read-only")

    write = trim = write_zeroes = _refuse

    def release(self) -> None:
        image, self._image = self._image, None
        if image is not None:
            image.close()
        callback, self._on_release = self._on_release, None
        if callback is not None:
            callback()


class RbdImageSpans:
    """Spans of one RBD mirror image, each hashed from one applied cycle's snapshot.

    The ``receiver.verify.ImageSpans`` interface for verify (and scrub): a
    snapshot never changes, so no apply can tear a span; the image pin held
    while it is read keeps the snapshot from being pruned meanwhile.
    ``image_path`` is where a file image would be: the verify and scrub
    records go beside the mirror's state under that name.
    """

    READ_STEP = 8 << 20

    def __init__(self, cfg: RbdConfig, state_path: str, node: str, volume: str,
                 block_size: int, throttle=None, check=None):
        import os

        self.cfg = cfg
        self.state_path = state_path
        self.image = image_name(node, volume)
        self.image_path = os.path.join(os.path.dirname(state_path), volume + ".img")
        self.block_size = block_size
        self.throttle = throttle
        self.check = check
        self.bytes_read = 0
        self.retries = 0
        self.pinned_reads = 0

    def state_key(self) -> tuple[int, float]:
        from cyclemirror.receiver.state import MirrorState

        st = MirrorState.load(self.state_path)  # its applied cycle's snapshot always exists
        return st.applied_cycle, st.freeze_time

    def stable_key(self, timeout: float = 0.0) -> tuple[int, float]:
        return self.state_key()

    def hash_span(self, offset: int, length: int):
        """(cycle, freeze time, block digests) of ``[offset, offset + length)``."""
        import numpy as np

        from cyclemirror._cext import blockhash

        bs = self.block_size
        if offset % bs or length % bs:
            raise UsageError(f"RBD image {self.image}: span {offset}+{length} is not whole "
                             f"blocks of {bs}")
        IMAGE_PINS.pin(self.state_path)
        try:
            for _ in range(3):
                key = self.state_key()
                try:
                    img = connection(self.cfg).open(self.image, snap_name(key[0]), True)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    self.retries += 1  # a prune that began before our pin: look again
                    continue
                try:
                    out = []
                    pos, end = offset, offset + length
                    while pos < end:
                        if self.check is not None:
                            self.check()
                        n = min(self.READ_STEP, end - pos)
                        if self.throttle is not None:
                            self.throttle(n)
                        hashes, _zero = blockhash.hash_buffer(img.read(pos, n), bs)
                        out.append(np.asarray(hashes, dtype=np.uint64))
                        self.bytes_read += n
                        pos += n
                finally:
                    img.close()
                self.pinned_reads += 1
                return key[0], key[1], (np.concatenate(out) if out
                                        else np.empty(0, dtype=np.uint64))
        finally:
            IMAGE_PINS.unpin(self.state_path)
        raise StoreError(f"RBD image {self.cfg.pool}/{self.image}: the snapshot of its applied "
                         "cycle kept disappearing; verify again later")
