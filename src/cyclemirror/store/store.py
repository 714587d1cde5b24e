"""A store: a directory of named volumes on one host.

Layout::

    STORE/store.json             node id and name (made once, at create)
    STORE/.lock                  flock held by the one process that has the store open
    STORE/volumes/NAME/          one directory per volume (see volume.py, docs/store.md)
    STORE/volumes/.new-NAME-*    a volume being created or imported (removed on open)
    STORE/volumes/.trash-NAME-*  a volume being deleted (removed on open)
    STORE/groups/freeze-*.json   a group freeze in progress (completed on open, see group.py)
    STORE/files/NAME.json        a file object: a live file elsewhere (fileobject.py)
    STORE/trees/NAME.json        a tree object: a btrfs subvolume elsewhere (tree.py)

Volumes, file objects and tree objects share one namespace: a name is one of them.

A volume appears under its name only when complete: it is built in a dot
directory and renamed into place, and deleted by the reverse rename first.
Locking: ``_lock`` guards the cache of open Volume objects (one per name).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import stat
import threading
import uuid

from cyclemirror import failpoints
from cyclemirror.errors import AlreadyExistsError, NotFoundError, StoreError, UsageError
from cyclemirror.store import fileobject, fileops, group, tree
from cyclemirror.store.layer import Layer
from cyclemirror.store.names import validate_volume_name
from cyclemirror.store.volume import BASE_FILE, STATE_FILE, Volume, check_geometry, initial_state

STORE_FILE = "store.json"
STORE_FORMAT = 1
IMPORT_CHUNK = 1 << 20


class Store:
    """The volumes of one host. Thread-safe."""

    def __init__(self, path: str, meta: dict, lock_fd: int):
        self.path = path
        self.node_id: str = meta["node_id"]
        self.node_name: str = meta["node_name"]
        self._lock_fd = lock_fd
        self._lock = threading.Lock()
        self._volumes: dict[str, Volume] = {}
        self._releasing: set[str] = set()  # release_base() under way: not opened again
        self._files: dict[str, fileobject.FileObject] = {}
        self._trees: dict[str, tree.TreeObject] = {}
        self._closed = False
        self._volumes_dir = os.path.join(path, "volumes")

    @classmethod
    def create(cls, path: str, node_name: str | None = None) -> Store:
        path = os.path.abspath(path)
        if node_name is not None and (not isinstance(node_name, str) or not 0 < len(node_name) <= 255):
            raise UsageError(f"node name {node_name!r} must be a string of 1 to 255 characters")
        if os.path.exists(os.path.join(path, STORE_FILE)):
            raise AlreadyExistsError(f"a store already exists at {path}; open it instead")
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise UsageError(f"cannot create a store at {path}: it exists and is not an empty directory")
        try:
            os.makedirs(os.path.join(path, "volumes"), exist_ok=True)
            meta = {
                "format": STORE_FORMAT,
                "node_id": uuid.uuid4().hex,
                "node_name": node_name or socket.gethostname(),
            }
            fileops.atomic_write_json(os.path.join(path, STORE_FILE), meta)
        except OSError as exc:
            raise fileops.store_error(f"creating store {path}", exc) from exc
        return cls.open(path)

    @classmethod
    def open(cls, path: str) -> Store:
        path = os.path.abspath(path)
        try:
            meta = fileops.read_json(os.path.join(path, STORE_FILE), "store metadata")
        except FileNotFoundError as exc:
            raise NotFoundError(f"no store at {path} (no {STORE_FILE}); create one first") from exc
        if meta.get("format") != STORE_FORMAT or not isinstance(meta.get("node_id"), str):
            raise StoreError(f"{path}/{STORE_FILE} is not a store of format {STORE_FORMAT}")
        meta.setdefault("node_name", "")
        lock_fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(lock_fd)
            raise StoreError(
                f"store {path} is open in another process (its .lock is held); stop that process first"
            ) from exc
        store = cls(path, meta, lock_fd)
        try:
            store._remove_leftovers()
            # Before anyone can write: a group freeze cut by a crash is completed.
            group.recover_group_freezes(store)
        except BaseException:
            store.close()
            raise
        return store

    def _remove_leftovers(self) -> None:
        for entry in os.listdir(self._volumes_dir):
            if entry.startswith((".new-", ".trash-")):
                shutil.rmtree(os.path.join(self._volumes_dir, entry), ignore_errors=True)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.path} is closed")

    def _dir_of(self, name: str) -> str:
        return os.path.join(self._volumes_dir, validate_volume_name(name))

    # -- volumes ----------------------------------------------------------------------

    def list_volumes(self) -> list[str]:
        self._check_open()
        return sorted(e for e in os.listdir(self._volumes_dir) if not e.startswith("."))

    def create_volume(self, name: str, size: int, block_size: int = 4096) -> Volume:
        check_geometry(size, block_size)
        return self._build_volume(name, size, block_size, None)

    def import_volume(self, name: str, src_path: str, block_size: int = 4096) -> Volume:
        """Copy a raw image file or a block device into a new volume (holes and zero blocks stay sparse)."""
        try:
            fd = os.open(src_path, os.O_RDONLY)
        except OSError as exc:
            raise fileops.store_error(f"opening import source {src_path}", exc) from exc
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise UsageError(f"import source {src_path} is neither a regular file nor a block device")
            size = os.lseek(fd, 0, os.SEEK_END)
            check_geometry(size, block_size)
            return self._build_volume(name, size, block_size, (fd, stat.S_ISREG(mode)))
        finally:
            os.close(fd)

    def _build_volume(self, name: str, size: int, block_size: int, source) -> Volume:
        self._check_open()
        final = self._dir_of(name)
        with self._lock:
            if os.path.exists(final):
                raise AlreadyExistsError(f"volume {name!r} already exists in store {self.path}")
            if os.path.exists(fileobject.record_path(self.path, name)):
                raise AlreadyExistsError(f"{name!r} is a file object of store {self.path}; "
                                         "give the volume another name")
            if os.path.exists(tree.record_path(self.path, name)):
                raise AlreadyExistsError(f"{name!r} is a tree object of store {self.path}; "
                                         "give the volume another name")
            tmp = os.path.join(self._volumes_dir, f".new-{name}-{uuid.uuid4().hex[:8]}")
            try:
                os.mkdir(tmp)
                fd = os.open(os.path.join(tmp, BASE_FILE), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.ftruncate(fd, size)
                    if source is not None:
                        _copy_into_base(source[0], fd, size, sparse_source=source[1])
                    os.fsync(fd)
                finally:
                    os.close(fd)
                Layer.create_overlay(tmp, 0, size, size // block_size).retire()
                fileops.atomic_write_json(os.path.join(tmp, STATE_FILE), initial_state(size, block_size))
                os.rename(tmp, final)
                fileops.fsync_dir(self._volumes_dir)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise fileops.store_error(f"creating volume {name!r} in {self.path}", exc) from exc
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return self._open_locked(name)

    def adopt_image(self, name: str, image_path: str, block_size: int, first_overlay: int,
                    work_dir: str) -> Volume:
        """Make the raw file ``image_path`` volume ``name`` without copying it (promote).

        The file is renamed into ``work_dir`` (a directory on this file system outside
        ``volumes/``, which the caller owns) as the base; the volume's open overlay is
        number ``first_overlay`` and everything below it counts as merged, so the
        volume's next freeze is cycle ``first_overlay + 1``.  The directory appears
        under ``volumes/`` by one rename, the commit point.  Run again after a crash,
        it finishes the job (the image may already be in ``work_dir``)."""
        self._check_open()
        final = self._dir_of(name)
        with self._lock:
            if os.path.exists(final):
                raise AlreadyExistsError(f"volume {name!r} already exists in store {self.path}")
            base = os.path.join(work_dir, BASE_FILE)
            try:
                os.makedirs(work_dir, exist_ok=True)
                if os.path.exists(image_path):
                    os.replace(image_path, base)
                    fileops.fsync_dir(work_dir)
                    fileops.fsync_dir(os.path.dirname(image_path))
                size = os.stat(base).st_size
                check_geometry(size, block_size)
                for entry in os.listdir(work_dir):
                    if entry != BASE_FILE:
                        os.unlink(os.path.join(work_dir, entry))
                Layer.create_overlay(work_dir, first_overlay, size, size // block_size).retire()
                state = initial_state(size, block_size)
                state["merged_through"] = first_overlay - 1
                state["overlays"] = [{"number": first_overlay, "closed_at": None}]
                fileops.atomic_write_json(os.path.join(work_dir, STATE_FILE), state)
                failpoints.hit("store.adopt_image")
                os.rename(work_dir, final)
                fileops.fsync_dir(self._volumes_dir)
            except OSError as exc:
                raise fileops.store_error(f"making image {image_path} volume {name!r}",
                                          exc) from exc
            return self._open_locked(name)

    # -- file objects (fileobject.py) ---------------------------------------------------

    def list_files(self) -> list[str]:
        self._check_open()
        return fileobject.list_files(self.path)

    def add_file(self, name: str, path: str, block_size: int = 4096) -> fileobject.FileObject:
        """Make the live file ``path`` (on XFS with reflink, or btrfs) object ``name``."""
        self._check_open()
        with self._lock:
            if os.path.isdir(self._dir_of(name)):
                raise AlreadyExistsError(f"{name!r} is a volume of store {self.path}; give "
                                         "the file object another name")
            if os.path.exists(tree.record_path(self.path, name)):
                raise AlreadyExistsError(f"{name!r} is a tree object of store {self.path}; "
                                         "give the file object another name")
            fileobject.add_file(self.path, self.node_id, name, path, block_size)
        return self.open_file(name)

    def open_file(self, name: str) -> fileobject.FileObject:
        self._check_open()
        with self._lock:
            obj = self._files.get(name)
            if obj is None:
                obj = self._files[name] = fileobject.FileObject(self.path, name)
            return obj

    def remove_file(self, name: str) -> None:
        """Forget file object ``name`` and delete its snapshots; the file stays."""
        self._check_open()
        with self._lock:
            self._files.pop(name, None)
            fileobject.remove_file(self.path, name)

    # -- tree objects (tree.py) ----------------------------------------------------------

    def list_trees(self) -> list[str]:
        self._check_open()
        return tree.list_trees(self.path)

    def add_tree(self, name: str, path: str, base: dict | None = None,
                 promoted_from: dict | None = None) -> tree.TreeObject:
        """Make the btrfs subvolume ``path`` tree object ``name`` (a promoted tree: with
        the base its failback starts from, ``tree.add_tree``)."""
        self._check_open()
        with self._lock:
            for taken, kind in ((os.path.isdir(self._dir_of(name)), "a volume"),
                                (os.path.exists(fileobject.record_path(self.path, name)),
                                 "a file object")):
                if taken:
                    raise AlreadyExistsError(f"{name!r} is {kind} of store {self.path}; "
                                             "give the tree object another name")
            tree.add_tree(self.path, self.node_id, name, path, base, promoted_from)
        return self.open_tree(name)

    def open_tree(self, name: str) -> tree.TreeObject:
        self._check_open()
        with self._lock:
            obj = self._trees.get(name)
            if obj is None:
                obj = self._trees[name] = tree.TreeObject(self.path, name)
            return obj

    def remove_tree(self, name: str) -> None:
        """Forget tree object ``name`` and delete its snapshots; the tree stays."""
        self._check_open()
        with self._lock:
            self._trees.pop(name, None)
            tree.remove_tree(self.path, name)

    def open_subject(self, name: str):
        """What ``mirror start NAME`` mirrors: the volume, file object or tree object NAME."""
        try:
            return self.open_volume(name)
        except NotFoundError:
            if name in self.list_trees():
                return self.open_tree(name)
            if name not in self.list_files():
                raise NotFoundError(f"no volume, file object or tree object {name!r} in "
                                    f"store {self.path}") from None
        return self.open_file(name)

    def freeze_group(self, names, sync: bool = True) -> dict:
        """Freeze several volumes at one instant, crash-safely: {name: FrozenCycle} (store.group)."""
        self._check_open()
        return group.freeze_group(self, names, sync)

    def open_volume(self, name: str) -> Volume:
        self._check_open()
        with self._lock:
            return self._open_locked(name)

    def _open_locked(self, name: str) -> Volume:
        vol = self._volumes.get(name)
        if vol is None:
            if name in self._releasing:
                raise NotFoundError(f"volume {name!r} in store {self.path} is being turned "
                                    "into a mirror image")
            vol_dir = self._dir_of(name)
            if not os.path.isdir(vol_dir):
                raise NotFoundError(f"no volume {name!r} in store {self.path}")
            vol = Volume.open(name, vol_dir, on_close=self._forget)
            self._volumes[name] = vol
        return vol

    def _forget(self, vol: Volume) -> None:
        with self._lock:
            if self._volumes.get(vol.name) is vol:
                del self._volumes[vol.name]

    def delete_volume(self, name: str) -> None:
        self._check_open()
        vol_dir = self._dir_of(name)
        with self._lock:
            vol = self._volumes.pop(name, None)
        if vol is not None:
            vol.close()
        with self._lock:
            if not os.path.isdir(vol_dir):
                raise NotFoundError(f"no volume {name!r} in store {self.path}")
            trash = os.path.join(self._volumes_dir, f".trash-{name}-{uuid.uuid4().hex[:8]}")
            os.rename(vol_dir, trash)
            fileops.fsync_dir(self._volumes_dir)
        shutil.rmtree(trash, ignore_errors=True)

    def release_base(self, name: str, dest: str) -> None:
        """Close volume ``name``, move its base image to ``dest`` (a rename, no copy) and
        delete the rest of the volume (failback: the base becomes a mirror image)."""
        self._check_open()
        vol_dir = self._dir_of(name)
        with self._lock:
            vol = self._volumes.pop(name, None)
            # Not opened again (an NBD client's new connection) between the close and the
            # move: writes to such a volume would go with it.
            self._releasing.add(name)
        try:
            if vol is not None:
                vol.close()
            trash = self._move_base(name, vol_dir, dest)
        finally:
            with self._lock:
                self._releasing.discard(name)
        # Freeing big scattered overlays takes seconds on ext4: not on the caller's path
        # (a crash leaves a .trash- directory, which the next open removes).
        threading.Thread(target=shutil.rmtree, args=(trash, True), daemon=True,
                         name=f"trash-{name}").start()

    def _move_base(self, name: str, vol_dir: str, dest: str) -> str:
        """release_base's renames; returns the trash directory the rest went to."""
        with self._lock:
            if not os.path.isdir(vol_dir):
                raise NotFoundError(f"no volume {name!r} in store {self.path}")
            base = os.path.join(vol_dir, BASE_FILE)
            try:
                # A crash after this rename leaves the directory without a base: running
                # it again only removes the rest (receiver/turnback.py).
                if os.path.exists(base) or not os.path.exists(dest):
                    os.replace(base, dest)
                fileops.fsync_dir(os.path.dirname(dest))
                trash = os.path.join(self._volumes_dir, f".trash-{name}-{uuid.uuid4().hex[:8]}")
                os.rename(vol_dir, trash)
                fileops.fsync_dir(self._volumes_dir)
            except OSError as exc:
                raise fileops.store_error(f"moving the base of volume {name!r} to {dest}",
                                          exc) from exc
        return trash

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            volumes = list(self._volumes.values())
        for vol in volumes:
            vol.close()
        os.close(self._lock_fd)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _copy_into_base(src_fd: int, dst_fd: int, size: int, sparse_source: bool) -> None:
    """Copy an image into base leaving holes where the source has holes or zero chunks."""
    if sparse_source:
        copier = fileops.KernelCopier()
        for ds, de in fileops.data_runs(src_fd, 0, size):
            copier.copy(src_fd, dst_fd, ds, de - ds)
        return
    zero = bytes(IMPORT_CHUNK)
    pos = 0
    while pos < size:
        chunk = os.pread(src_fd, min(IMPORT_CHUNK, size - pos), pos)
        if not chunk:
            raise StoreError(f"import source ended at {pos} of {size} bytes")
        if chunk != zero[: len(chunk)]:
            fileops.pwrite_all(dst_fd, chunk, pos)
        pos += len(chunk)
