"""The daemon: one process per store that hosts every part and answers the CLI.

``Daemon(config).start()`` opens (or creates) the store, which also takes the
store's lock so a second daemon on the same store fails at once; then it
serves the volumes over NBD, accepts incoming mirrors (``TargetServer``),
restarts the outgoing mirrors recorded in the store (``OutgoingMirrors``),
serves metrics, and last opens the control socket, so a CLI that can connect
finds everything running.  ``stop()`` undoes it in reverse.

NBD exports: each volume under its own name, read-write; each incoming mirror
image read-only under ``mirror/<source node>/<volume>`` (volume names cannot
contain ``/``, so the two never collide).  A connection to a mirror image
pins the image as of connection time (``receiver.readers``) and gives the pin
back when the connection ends, so every client reads one applied cycle.

Everything a restart must know lives in the store (volumes, cycle state,
mirror definitions in ``STORE/daemon/mirrors.json``), never only in memory.

Concurrency: the control server calls ``handle`` from one thread per CLI
connection.  Volume create/rm and mirror start/rm are serialised by
``_admin_lock`` so a volume cannot be removed while a mirror of it starts;
the parts themselves (Store, Volume, NBD, target, drivers) are thread-safe.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import threading
import time

from cyclemirror import __version__
from cyclemirror.daemon import memtune
from cyclemirror.daemon import roles as dr_roles
from cyclemirror.daemon.config import (
    DaemonConfig,
    check_listen_tls,
    check_name,
    check_nbd_tls,
    tls_settings,
)
from cyclemirror.daemon.control import ControlServer, control_socket_path
from cyclemirror.daemon.mirrors import OutgoingMirrors
from cyclemirror.errors import (
    AlreadyExistsError,
    CycleMirrorError,
    NoSpaceError,
    NotFoundError,
    StoreError,
    UsageError,
)
from cyclemirror.units import parse_seconds, parse_size

STATUS_SCHEMA = 1
log = logging.getLogger("cyclemirror.daemon")


def open_or_create_store(path: str, node_name: str | None):
    from cyclemirror.store import Store

    if os.path.exists(os.path.join(path, "store.json")):
        store = Store.open(path)
    else:
        store = Store.create(path, node_name=node_name)
        log.info("created store %s with node id %s", path, store.node_id)
    return store


class Daemon:
    def __init__(self, config: DaemonConfig):
        if not config.store:
            raise UsageError("the daemon needs a store directory (--store)")
        self.config = config
        self.store = None
        self.control: ControlServer | None = None
        self.nbd_servers: list = []
        self._backends: dict[str, object] = {}  # one NBD backend per volume, under _backend_lock
        self._backend_lock = threading.Lock()
        self.target = None
        self.metrics = None
        self.outgoing: OutgoingMirrors | None = None
        self.checks = None  # daemon.checks.Checks: verify and scrub
        self.started_at = time.time()
        self._admin_lock = threading.Lock()
        self._stopped = threading.Event()
        self._keys: list[bytes] | None = None  # the incoming keys last read
        self.nbd_addresses: list[str] = []
        self._nbd_tls_settings = None
        self.listen_address: str | None = None
        self.metrics_address: str | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        try:
            self.store = open_or_create_store(cfg.store, cfg.node_name)
            if cfg.node_name and cfg.node_name != self.store.node_name:
                log.warning("node name %r not applied: store %s was created as %r and keeps "
                            "the name it got then", cfg.node_name, self.store.path,
                            self.store.node_name)
            daemon_dir = os.path.join(self.store.path, "daemon")
            os.makedirs(daemon_dir, exist_ok=True)
            dr_roles.finish_promotions(self)  # a promotion a crash cut short: whole first
            tls_settings(cfg.tls_cert, cfg.tls_key, cfg.tls_ca, "serve")
            check_listen_tls(cfg)
            check_nbd_tls(cfg)
            if cfg.link_timeout is not None:  # before any mirror link is made
                from cyclemirror.wire import sockio

                sockio.set_link_timeout(cfg.link_timeout)
            keys = self._incoming_keys() if cfg.key_file else None  # bad files fail here
            for endpoint in cfg.nbd:
                self._start_nbd(endpoint)
            if cfg.listen is not None:
                self._start_target(keys)
            histograms = None
            if cfg.metrics is not None:
                from cyclemirror.daemon.metrics import CycleHistograms

                histograms = CycleHistograms()  # observed from the first applied cycle on
            self.outgoing = OutgoingMirrors(self.store, daemon_dir, default_key_file=cfg.key_file,
                                            daemon_bwlimit=cfg.bwlimit,
                                            client_cert=(cfg.tls_cert, cfg.tls_key),
                                            insecure=cfg.insecure, histograms=histograms,
                                            rbd_config=cfg.rbd_config)
            self.outgoing.restore(cfg.mirrors)
            from cyclemirror.daemon.checks import Checks

            self.checks = Checks(self.store, self.outgoing, cfg)
            self.checks.start()
            if cfg.metrics is not None:
                from cyclemirror.daemon.metrics import MetricsServer

                self.metrics = MetricsServer(cfg.metrics.host, cfg.metrics.port, self.status,
                                             histograms)
                self.metrics.start()
                host, port = self.metrics.address
                self.metrics_address = f"{host}:{port}"
            self.control = ControlServer(control_socket_path(self.store.path), self.handle)
            self.control.start()
        except OSError as exc:
            self.stop()
            raise start_error(cfg.store, exc) from exc
        except BaseException:
            self.stop()
            raise
        log.info("daemon of store %s (node %s, %s) ready: control %s%s%s%s",
                 self.store.path, self.store.node_name, self.store.node_id, self.control.path,
                 "".join(f", nbd {a}" for a in self.nbd_addresses),
                 f", mirrors in on {self.listen_address}" if self.listen_address else "",
                 f", metrics http://{self.metrics_address}/metrics"
                 if self.metrics_address else "")

    def _incoming_keys(self) -> list[bytes]:
        """Every key of every --key-file: incoming sources may prove any (rotation)."""
        from cyclemirror.keys import read_keys

        out: list[bytes] = []
        for path in (self.config.key_file, *self.config.extra_key_files):
            out += [k for k in read_keys(path) if k not in out]
        return out

    def _current_keys(self) -> list[bytes]:
        """The keys for one incoming connection: the files as they are now, so a rotation
        needs no restart; if they cannot be read, the last keys read (and a log line)."""
        try:
            self._keys = self._incoming_keys()
        except CycleMirrorError as exc:
            log.error("key files unreadable, keeping the keys read before: %s", exc)
        return self._keys

    def _nbd_tls(self):
        """The NBD TLS settings (made once, shared by the TCP endpoints), or None."""
        cfg = self.config
        if not (cfg.nbd_tls_psk or cfg.nbd_tls_cert):
            return None
        if self._nbd_tls_settings is None:
            from cyclemirror.nbd.tls import NbdTls

            self._nbd_tls_settings = NbdTls(psk_file=cfg.nbd_tls_psk, certfile=cfg.nbd_tls_cert,
                                            keyfile=cfg.nbd_tls_key, client_ca=cfg.nbd_tls_ca)
        return self._nbd_tls_settings

    def _start_nbd(self, endpoint) -> None:
        from cyclemirror.nbd import NbdServer

        if endpoint.kind == "unix":  # the socket file's permissions are its access control
            server = NbdServer(self._nbd_lookup, list_names=self._nbd_names,
                               unix_path=endpoint.path)
        else:
            server = NbdServer(self._nbd_lookup, list_names=self._nbd_names,
                               tcp=(endpoint.address.host, endpoint.address.port),
                               tls=self._nbd_tls(), access=self.config.nbd_clients)
        server.start()
        self.nbd_servers.append(server)
        if endpoint.kind == "tcp" and endpoint.address.port == 0:
            host, port = server.tcp_address
            self.nbd_addresses.append(f"tcp:{host}:{port}")
        else:
            self.nbd_addresses.append(str(endpoint))

    def _nbd_names(self) -> list[str]:
        """NBD_OPT_LIST: the volumes, then the mirror images (``mirror/<node>/<volume>``)."""
        from cyclemirror.receiver import rbdvolumes
        from cyclemirror.receiver.readers import listed_export_names, mirror_images

        return list(self.store.list_volumes()) + rbdvolumes.names(self.store.path) + \
            listed_export_names(
            mirror_images(self.store.path))

    def _nbd_lookup(self, name: str):
        """Export NAME is the volume NAME, or a mirror image's ``mirror/<node>/<volume>``;
        unknown or invalid names are refused by NBD."""
        from cyclemirror.nbd import VolumeBackend
        from cyclemirror.receiver.readers import MIRROR_EXPORT_PREFIX

        if name.startswith(MIRROR_EXPORT_PREFIX):
            return self._mirror_backend(name)
        try:
            volume = self.store.open_volume(name)
        except (NotFoundError, UsageError):
            from cyclemirror.receiver import rbdvolumes  # a volume kept in RBD (promote, clone)

            return rbdvolumes.nbd_backend(self.store, self.config.rbd_config(), name)
        if dr_roles.is_demoted(self.store, name):  # a former primary: reads only
            return VolumeBackend(volume, readonly=True)
        with self._backend_lock:
            backend = self._backends.get(name)
            if backend is None or getattr(backend, "volume", volume) is not volume:
                backend = self._backends[name] = VolumeBackend(volume)
            return backend

    def _mirror_backend(self, name: str):
        """A read-only backend of one connection, pinning the image as of now (or None)."""
        from cyclemirror.nbd import RawFileBackend
        from cyclemirror.receiver.readers import PinnedImage, export_names, mirror_images

        image = export_names(mirror_images(self.store.path)).get(name)
        if image is None:
            return None
        pin = PinnedImage(image)  # errors (crash not recovered, timeout) reach the client
        try:
            if image.backend == "rbd":  # the snapshot of the applied cycle, never the head
                from cyclemirror.receiver.rbdbackend import RbdSnapshotReader

                rbd = self.config.rbd_config()
                if rbd is None:
                    raise UsageError(f"mirror image {name} lives in RBD; start the daemon "
                                     "with --rbd-pool to export it")
                return RbdSnapshotReader(rbd, image.node_id, image.volume,
                                         pin.applied_cycle, image.block_size,
                                         on_release=pin.release)
            return RawFileBackend(pin.path, readonly=True, block_size=image.block_size,
                                  per_connection=True, on_release=pin.release)
        except BaseException:
            pin.release()
            raise

    def _start_target(self, keys: list[bytes] | None) -> None:
        from cyclemirror.receiver import TargetServer
        from cyclemirror.wire.handshake import TlsConfig

        cfg = self.config
        addr = cfg.listen
        tls = (TlsConfig(certfile=cfg.tls_cert, keyfile=cfg.tls_key, cafile=cfg.tls_ca)
               if cfg.tls_cert else None)
        self._keys = keys
        rbd = cfg.rbd_config()
        if rbd is not None:
            from cyclemirror.receiver import rbdbackend

            rbdbackend.load_binding()  # without librbd: say what to install, now
            try:
                rbdbackend.connection(rbd)
            except StoreError as exc:  # a cluster that is down: sessions retry later
                log.warning("%s", exc)
        self.target = TargetServer(self.store, self._current_keys, listen=(addr.host, addr.port),
                                   tls=tls, rbd=rbd)
        self.target.on_failback = lambda volume: dr_roles.release_volume(self, volume)
        self.target.on_switchover = lambda res, back: dr_roles.after_switchover(self, res, back)
        self.target.start()
        host, port = self.target.address
        self.listen_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def stop(self) -> None:
        """Stop serving: control first (no new work), then mirrors, target, NBD, store."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        steps = [("control socket", self.control and self.control.close),
                 ("metrics", self.metrics and self.metrics.close),
                 ("checks", self.checks and self.checks.close),
                 ("outgoing mirrors", self.outgoing and self.outgoing.close),
                 ("target server", self.target and self._stop_target)]
        steps += [("nbd server", s.stop) for s in self.nbd_servers]
        steps.append(("store", self.store and self.store.close))
        for what, step in steps:
            if not step:
                continue
            try:
                step()
            except Exception:
                log.exception("stopping the %s failed", what)

    def _stop_target(self) -> None:
        # Closing a listening socket does not wake a thread blocked in accept() on
        # Linux; shutting it down does, so stop() need not wait out its join timeout.
        listener = getattr(self.target, "_listener", None)
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.target.stop()

    def wait(self) -> None:
        self._stopped.wait()

    # -- control requests ---------------------------------------------------------------------

    def handle(self, op: str, args: dict):
        method = self._OPS.get(op)
        if method is None:
            raise UsageError(f"unknown control operation {op!r}; known: "
                             f"{', '.join(sorted(self._OPS))}")
        return method(self, args)

    @staticmethod
    def _arg(args: dict, key: str, kind, what: str | None = None, default=...):
        if key not in args or args[key] is None:
            if default is ...:
                raise UsageError(f"{what or key} is required")
            return default
        value = args[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise UsageError(f"{what or key} must be an integer, got {value!r}")
        if kind is not int and not isinstance(value, kind):
            raise UsageError(f"{what or key} has the wrong type: {value!r}")
        return value

    def _op_ping(self, args):
        return {"node_id": self.store.node_id, "node_name": self.store.node_name,
                "pid": os.getpid(), "version": __version__}

    def _volume_info(self, vol) -> dict:
        return {"name": vol.name, "size": vol.size, "block_size": vol.block_size}

    def _op_volume_create(self, args):
        name = check_name(self._arg(args, "name", str, "volume name"), "volume name")
        size = parse_size(self._arg(args, "size", int, "--size"), "--size")
        block_size = parse_size(self._arg(args, "block_size", int, "--block-size", 4096),
                                "--block-size")
        with self._admin_lock:
            from cyclemirror.receiver import rbdvolumes

            if name in rbdvolumes.names(self.store.path):
                raise AlreadyExistsError(f"volume {name!r} already exists in this store (an RBD "
                                         "volume, docs/ceph.md); pick another name")
            vol = self.store.create_volume(name, size, block_size)
        log.info("volume %s created: %d bytes, block size %d", name, size, block_size)
        return self._volume_info(vol)

    def _op_volume_import(self, args):
        name = check_name(self._arg(args, "name", str, "volume name"), "volume name")
        path = self._absolute(self._arg(args, "path", str, "--from"), "--from")
        block_size = parse_size(self._arg(args, "block_size", int, "--block-size", 4096),
                                "--block-size")
        if not os.path.exists(path):
            raise NotFoundError(f"import source {path} does not exist")
        with self._admin_lock:
            vol = self.store.import_volume(name, path, block_size)
        log.info("volume %s imported from %s: %d bytes", name, path, vol.size)
        return self._volume_info(vol)

    def _op_volume_export(self, args):
        name = self._arg(args, "name", str, "volume name")
        path = self._absolute(self._arg(args, "path", str, "--to"), "--to")
        vol = self.store.open_volume(name)
        vol.export(path)
        log.info("volume %s exported to %s", name, path)
        return {"name": name, "path": path, "size": vol.size}

    def _op_volume_list(self, args):
        out = []
        for name in self.store.list_volumes():
            try:
                out.append(self._volume_info(self.store.open_volume(name)))
            except CycleMirrorError as exc:  # one damaged volume must not hide the others
                log.error("volume %s cannot be opened: %s", name, exc)
                out.append({"name": name, "size": 0, "block_size": 0, "error": str(exc)})
        from cyclemirror.receiver import rbdvolumes

        for name in rbdvolumes.names(self.store.path):  # kept in RBD (promote, clone)
            try:
                out.append(rbdvolumes.load(self.store.path, name).info())
            except CycleMirrorError as exc:
                out.append({"name": name, "size": 0, "block_size": 0, "error": str(exc)})
        return out

    def _refuse_if_mirrored(self, what: str, name: str) -> None:
        users = self.outgoing.mirrors_of(name)
        if users:
            raise UsageError(
                f"{what} {name!r} is mirrored to {', '.join(users)}; remove those mirrors "
                f"first ('cyclemirror mirror break {name}' then 'cyclemirror mirror rm "
                f"{name}')")

    def _op_volume_rm(self, args):
        name = check_name(self._arg(args, "name", str, "volume name"), "volume name")
        with self._admin_lock:
            self._refuse_if_mirrored("volume", name)
            from cyclemirror.receiver import rbdvolumes

            if name in rbdvolumes.names(self.store.path):  # kept in RBD (promote, clone)
                rbdvolumes.remove(self.store, self.config.rbd_config(), name)
            else:
                self.store.delete_volume(name)
            dr_roles.forget(self.store, name)  # its role and generations go with it
            with self._backend_lock:
                self._backends.pop(name, None)
        log.info("volume %s removed", name)
        return {"name": name}

    # -- file objects (docs/files.md) -----------------------------------------------------

    def _op_file_add(self, args):
        name = check_name(self._arg(args, "name", str, "file object name"), "file object name")
        path = self._absolute(self._arg(args, "path", str, "PATH"), "PATH")
        block_size = parse_size(self._arg(args, "block_size", int, "--block-size", 4096),
                                "--block-size")
        with self._admin_lock:
            obj = self.store.add_file(name, path, block_size)
        log.info("file object %s added: %s (%s, %d bytes)", name, path, obj.fs, obj.size)
        return obj.info()

    def _op_file_list(self, args):
        return _object_infos("file", self.store.list_files(), self.store.open_file)

    def _op_file_rm(self, args):
        name = check_name(self._arg(args, "name", str, "file object name"), "file object name")
        with self._admin_lock:
            self._refuse_if_mirrored("file object", name)
            self.store.remove_file(name)
            dr_roles.forget(self.store, name)
        log.info("file object %s removed (its snapshots deleted, the file kept)", name)
        return {"name": name}

    # -- tree objects (docs/trees.md) -----------------------------------------------------

    def _op_tree_add(self, args):
        name = check_name(self._arg(args, "name", str, "tree object name"), "tree object name")
        path = self._absolute(self._arg(args, "path", str, "PATH"), "PATH")
        with self._admin_lock:
            obj = self.store.add_tree(name, path)
        log.info("tree object %s added: %s", name, path)
        return obj.info()

    def _op_tree_list(self, args):
        return _object_infos("tree", self.store.list_trees(), self.store.open_tree)

    def _op_tree_rm(self, args):
        name = check_name(self._arg(args, "name", str, "tree object name"), "tree object name")
        with self._admin_lock:
            self._refuse_if_mirrored("tree object", name)
            self.store.remove_tree(name)
        log.info("tree object %s removed (its snapshots deleted, the tree kept)", name)
        return {"name": name}

    @staticmethod
    def _absolute(path: str, what: str) -> str:
        if not os.path.isabs(path):
            raise UsageError(f"{what}: the daemon needs an absolute path, got {path!r}")
        return path

    def _op_mirror_start(self, args):
        with self._admin_lock:
            return self.outgoing.start(dict(args))

    def _select(self, args) -> tuple[str, str | None]:
        volume = self._arg(args, "volume", str, "volume")
        target = self._arg(args, "to", str, "--to", None)
        return volume, target

    def _op_mirror_sync(self, args):
        volume, target = self._select(args)
        timeout = parse_seconds(self._arg(args, "timeout", (int, float), "--timeout", 300),
                                "--timeout", allow_zero=False)
        return self.outgoing.sync(volume, target, timeout)

    def _op_mirror_break(self, args):
        volume, target = self._select(args)
        now = self._arg(args, "now", bool, "--now", False)
        return self.outgoing.break_cycles(volume, target, now)

    def _op_mirror_resume(self, args):
        volume, target = self._select(args)
        return self.outgoing.resume(volume, target)

    def _op_mirror_rm(self, args):
        if args.get("image") is not None:  # on a target: an incoming mirror, SOURCE/NAME
            from cyclemirror.daemon.incoming import remove_incoming

            image = self._arg(args, "image", str, "SOURCE/NAME")
            force = self._arg(args, "force", bool, "--force", False)
            with self._admin_lock:
                return remove_incoming(self.store.path, self.target, image, force)
        volume, target = self._select(args)
        if self._arg(args, "force", bool, "--force", False):
            raise UsageError("--force is for removing an incoming mirror on a target "
                             "('mirror rm SOURCE/NAME --force'); an outgoing mirror is "
                             f"broken first ('cyclemirror mirror break {volume}')")
        with self._admin_lock:
            try:
                return self.outgoing.remove(volume, target)
            except NotFoundError as exc:
                from cyclemirror.receiver.removal import incoming_mirrors

                here = [f"{m.source_name or m.node_id}/{m.mirror}"
                        for m in incoming_mirrors(self.store.path) if m.mirror == volume]
                if not here:
                    raise
                raise NotFoundError(f"{exc}; this store holds the incoming mirror "
                                    f"{', '.join(here)}: on a target, name it SOURCE/NAME "
                                    f"('cyclemirror mirror rm {here[0]}')") from None

    def _span(self, args) -> dict:
        offset = parse_size(self._arg(args, "offset", int, "--offset", 0), "--offset")
        length = parse_size(self._arg(args, "length", int, "--length", 0), "--length")
        bwlimit = parse_size(self._arg(args, "bwlimit", int, "--bwlimit", 0), "--bwlimit")
        restart = self._arg(args, "restart", bool, "--restart", False)
        return {"offset": offset, "length": length, "bwlimit": bwlimit, "restart": restart}

    def _op_mirror_verify(self, args):
        volume, target = self._select(args)
        repair = self._arg(args, "repair", bool, "--repair", False)
        return self.checks.verify(volume, target, repair=repair, **self._span(args))

    def _op_mirror_scrub(self, args):
        name = self._arg(args, "image", str, "SOURCE/VOLUME")
        return self.checks.scrub(name, **self._span(args))

    def _op_status(self, args):
        return self.status()

    _OPS = {
        "ping": _op_ping,
        "volume.create": _op_volume_create,
        "volume.import": _op_volume_import,
        "volume.export": _op_volume_export,
        "volume.list": _op_volume_list,
        "volume.rm": _op_volume_rm,
        "file.add": _op_file_add,
        "file.list": _op_file_list,
        "file.rm": _op_file_rm,
        "tree.add": _op_tree_add,
        "tree.list": _op_tree_list,
        "tree.rm": _op_tree_rm,
        "mirror.start": _op_mirror_start,
        "mirror.sync": _op_mirror_sync,
        "mirror.break": _op_mirror_break,
        "mirror.resume": _op_mirror_resume,
        "mirror.rm": _op_mirror_rm,
        "mirror.verify": _op_mirror_verify,
        "mirror.scrub": _op_mirror_scrub,
        "status": _op_status,
    }
    _OPS.update(dr_roles.OPS)  # promote (daemon/roles.py)

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict:
        now = time.time()
        doc = {
            "schema": STATUS_SCHEMA,
            "time": now,
            "node": {"id": self.store.node_id, "name": self.store.node_name,
                     "store": self.store.path, "pid": os.getpid(), "version": __version__,
                     "started": self.started_at, "listen": self.listen_address,
                     "nbd": list(self.nbd_addresses), "metrics": self.metrics_address,
                     "bwlimit": self.config.bwlimit,
                     "tls": bool(self.config.tls_cert and self.target is not None),
                     "key_ids": self._key_ids()},
            "volumes": self._op_volume_list({}),
            "files": self._op_file_list({}),
            "trees": self._op_tree_list({}),
            "mirrors": self.outgoing.status(now) if self.outgoing else [],
            "incoming": self._incoming_status(now),
            "incoming_trees": _incoming_trees(self.store.path, now),  # docs/trees.md
            # The target's most recent session failures (bad key, protocol, disk), newest last.
            "incoming_errors": list(getattr(self.target, "errors", []) or [])[-10:],
            # Damaged mirror definitions (the file, or single entries) the daemon left out.
            "mirror_errors": list(self.outgoing.book.problems) if self.outgoing else [],
        }
        if self.checks is not None:
            self.checks.annotate(doc)  # each mirror's verify, each image's scrub
        dr_roles.annotate(self.store, doc)  # roles and generations (docs/failover.md)
        return doc

    def _key_ids(self) -> list[str]:
        from cyclemirror.wire.handshake import key_id

        return [key_id(k) for k in (getattr(self, "_keys", None) or [])]

    def _incoming_status(self, now: float) -> list[dict]:
        from cyclemirror.daemon.incoming import incoming_status

        rows = incoming_status(self.store.path, now)
        use = dict(self.target.key_use) if self.target is not None else {}
        rbd = self.config.rbd_config()
        for row in rows:
            if rbd is not None and str(row.get("image") or "").startswith("rbd:"):
                row["keep_cycles"] = rbd.keep_cycles  # cycle snapshots kept (--keep-cycles)
            # Which key (and whether TLS) the source's latest session used; unknown (null)
            # until it connects after a daemon start.
            seen = use.get((row["source_node"], row["group"] or row["volume"]), {})
            row["key_id"] = seen.get("key_id")
            row["tls"] = seen.get("tls")
            row["peer"] = seen.get("peer")
        return rows


# -- the foreground process -------------------------------------------------------------------

def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def start_error(store: str, exc: OSError) -> CycleMirrorError:
    """What a user sees when the daemon cannot start for a reason the system gave."""
    what = f"starting the daemon of store {store} failed: {exc.strerror or exc}"
    if exc.filename:
        what += f" ({exc.filename})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(f"{what}; free space on the store's filesystem and start it again")
    if exc.errno == errno.EADDRINUSE:
        return UsageError(f"{what}; another process listens on that address: stop it, or "
                          "choose another port (--listen, --nbd, --metrics)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return UsageError(f"{what}; no interface of this host has that address: "
                          "check --listen, --nbd and --metrics")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StoreError(f"{what}; check the permissions of the store and the "
                          "addresses (ports under 1024 need root)")
    return StoreError(what)


def run_daemon(config: DaemonConfig) -> int:
    """``cyclemirror serve``: run until SIGTERM or SIGINT, then stop cleanly; returns 0."""
    setup_logging(config.log_level)
    memtune.keep_freed_buffers()
    daemon = Daemon(config)
    stop_requested = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.start()
    # A short wait in a loop keeps the main thread responsive to signals.
    while not stop_requested.wait(0.5):
        pass
    daemon.stop()
    log.info("daemon of store %s stopped", config.store)
    return 0


def _incoming_trees(store_path: str, now: float) -> list[dict]:
    from cyclemirror.receiver.treesession import tree_status

    return tree_status(store_path, now)


def _object_infos(kind: str, names, open_object) -> list[dict]:
    """``file.list`` / ``tree.list``: each object's info, or its name and why it cannot
    be opened (one damaged record must not hide the others)."""
    out = []
    for name in names:
        try:
            out.append(open_object(name).info())
        except CycleMirrorError as exc:
            log.error("%s object %s cannot be opened: %s", kind, name, exc)
            out.append({"name": name, "kind": kind, "error": str(exc)})
    return out
