"""Outgoing mirrors of one daemon: their definitions on disk and the drivers that run them.

``MirrorBook`` is the record of every ``mirror start`` (its options and
whether it is broken) in ``STORE/daemon/mirrors.json``, replaced atomically
(temp, fsync, rename, fsync dir) on every change, so a restarted daemon
resumes exactly the mirrors that were running and keeps broken ones broken.
The cycle state itself (cycle numbers, what each target applied) is the
driver's, kept in the store by ``cyclemirror.sender``.

``OutgoingMirrors`` maps the book onto ``cyclemirror.sender.MirrorDriver``
objects and turns their ``status()`` into
the stable rows of ``status --json`` (docs/cli.md).  The driver's
``on_applied`` hook gives one info log line per applied cycle per target,
the running totals and, with metrics on, the observations of the cycle
histograms (``daemon.metrics.CycleHistograms``).  The progress of a running cycle is the driver's own
per-target ``progress`` figures (exact counts, no estimate), turned into a
rate and time left here.  The driver itself logs every failure with volume and target.

Units: one driver per *unit*, which is either a volume (key: its name; all
its targets) or a consistency group (key: ``group:NAME``; every member, all
the group's targets).  A group's members share targets, interval,
compression and rate cap: ``mirror start`` of a new member adds it to every
target of the group, and a new target to every member.  Sync, break, resume
and rm of a member act on its whole group.  On the target a group is one
mirror named ``NAME-<digest of its first member names>`` (``group_mirror_name``),
recorded in the book (``groups``) when the group first runs and kept while
members come and go: the target keeps the other members' images and the
driver relays its owed sets out (``sender.group``), so a member change costs
no full copy.

Locking: ``_lock`` (re-entrant) guards the book and the driver table;
``_figures_lock`` the totals the driver hook writes.  Driver
calls that block for long (sync, break) run outside both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import threading
import time

from cyclemirror.daemon.config import (
    MirrorSpec,
    check_mirror_tls,
    mirror_spec_from_mapping,
    parse_hostport,
)
from cyclemirror.errors import (
    AlreadyExistsError,
    CycleMirrorError,
    NotFoundError,
    StoreError,
    UsageError,
)
from cyclemirror.jsontext import loads_strict
from cyclemirror.store.fileops import atomic_write_json

BOOK_FILE = "mirrors.json"
BOOK_FORMAT = 1
BREAK_WAIT = 20.0  # seconds 'mirror break' waits for the running cycle to end
PHASES = ("freezing", "copying", "applying", "idle", "broken", "reconnecting")
# The settings of the one cycle all targets of a volume (and all members of a group) share.
CYCLE_SETTINGS = ("interval", "rpo", "pace", "compress", "bwlimit")

log = logging.getLogger("cyclemirror.mirror")


class MirrorBook:
    """Persisted definitions, keyed by (volume, target). Not locked: the owner locks."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, BOOK_FILE)
        self.entries: dict[tuple[str, str], dict] = {}
        # group -> its mirror name on the targets, fixed when the group first runs, so
        # members may come and go while the targets keep the group's images.
        self.groups: dict[str, str] = {}
        # A damaged entry never stops the daemon: it is left out (and logged, and shown
        # in status as a problem), and kept as it was in the file on every save.
        self.problems: list[str] = []
        self._kept: list = []
        # A file that cannot be read at all: no outgoing mirror runs, the daemon serves
        # the rest, and save() refuses (it would overwrite what a person must look at).
        self.load_error: str | None = None
        try:
            self._load()
        except StoreError as exc:
            self.entries, self._kept = {}, []
            self.load_error = str(exc)
            self.problems.append(self.load_error)
            log.error("%s; no outgoing mirror runs until it is fixed", exc)

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"mirror definitions {self.path} are unreadable ({exc}); "
                             "restore it from a backup or move it away and start the "
                             "mirrors again") from None
        data = loads_strict(raw, f"mirror definitions {self.path} (restore it from a backup "
                            "or move it away and start the mirrors again)", StoreError)
        if not isinstance(data, dict) or data.get("format") != BOOK_FORMAT or not isinstance(
                data.get("mirrors"), list):
            raise StoreError(f"mirror definitions {self.path} are not of format {BOOK_FORMAT}; "
                             "restore it from a backup or move it away and start the "
                             "mirrors again")
        groups = data.get("groups", {})
        if not isinstance(groups, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and _MIRROR_NAME.fullmatch(v)
                for k, v in groups.items()):
            raise StoreError(f"mirror definitions {self.path}: 'groups' is malformed; restore "
                             "it from a backup or move it away and start the mirrors again")
        self.groups = dict(groups)
        for index, item in enumerate(data["mirrors"]):
            where = f"{self.path} entry {index + 1}"
            try:
                if not isinstance(item, dict) or not isinstance(item.get("broken"), bool):
                    raise StoreError(f"{where}: malformed (expected spec and broken)")
                spec = mirror_spec_from_mapping(item.get("spec"), where)
            except CycleMirrorError as exc:
                self.problems.append(f"{exc}; this mirror does not run until the entry is "
                                     "fixed (the other mirrors do)")
                self._kept.append(item)
                log.error("%s", self.problems[-1])
                continue
            self.entries[(spec.volume, str(spec.to))] = {"spec": spec, "broken": item["broken"]}

    def save(self) -> None:
        if self.load_error is not None:
            raise StoreError(f"{self.load_error}; mirror definitions cannot change until then")
        data = {"format": BOOK_FORMAT,
                "mirrors": [{"spec": e["spec"].to_json(), "broken": e["broken"]}
                            for e in self.entries.values()] + self._kept,
                "groups": dict(sorted(self.groups.items()))}
        try:
            atomic_write_json(self.path, data)
        except OSError as exc:
            raise StoreError(f"saving mirror definitions to {self.path} failed: "
                             f"{exc.strerror or exc}") from None


GROUP_UNIT = "group:"  # a unit key no volume name can have (names have no ':')
_MIRROR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def unit_of_spec(spec: MirrorSpec) -> str:
    return GROUP_UNIT + spec.group if spec.group else spec.volume


def group_mirror_name(group: str, member_names: list[str]) -> str:
    """The group's mirror name on the target: the group name and a digest of its members."""
    digest = hashlib.sha256("\n".join(sorted(member_names)).encode()).hexdigest()[:8]
    return f"{group[:55]}-{digest}"


def _select(entries, volume: str, target: str | None) -> list[tuple[str, str]]:
    keys = [k for k in entries if k[0] == volume and (target is None or k[1] == target)]
    if not keys:
        where = f" to {target}" if target else ""
        known = ", ".join(f"{v} -> {t}" for v, t in entries) or "none"
        raise NotFoundError(f"no mirror of volume {volume!r}{where} (mirrors: {known}); "
                            f"start one with 'cyclemirror mirror start {volume} --to HOST:PORT'")
    return sorted(keys)


class OutgoingMirrors:
    """The daemon's outgoing mirrors: book + one driver per unit. Thread-safe (``_lock``).

    A unit's targets share one ``MirrorDriver`` (it reads, compresses and
    checksums each chunk once for all of them), so they share its interval,
    compression and rate cap, and a break or resume acts on all of them.
    Adding or removing a target rebuilds that volume's driver; its cycle state
    lives in the store (``STORE/outgoing/<volume>/``), so nothing is re-sent.
    """

    def __init__(self, store, daemon_dir: str, *, default_key_file: str | None,
                 daemon_bwlimit: int, client_cert: tuple[str | None, str | None] = (None, None),
                 insecure: bool = False, histograms=None, rbd_config=None):
        from cyclemirror.sender.ratelimit import SharedRate

        self.store = store
        self._rbd_config = rbd_config  # () -> the daemon's RBD settings (RBD volumes), or None
        self.default_key_file = default_key_file
        # The daemon's certificate, shown to targets that ask for one (serve --tls-cert),
        # and serve --insecure: plaintext allowed to every non-loopback target.
        self.client_cert = client_cert
        self.insecure = insecure
        self._lock = threading.RLock()
        self.book = MirrorBook(daemon_dir)
        self._drivers: dict[str, object] = {}  # unit -> MirrorDriver
        self._build_errors: dict[str, str] = {}  # unit -> why its driver could not start
        # The driver hooks write these from driver threads under _figures_lock only, never
        # _lock: _rebuild holds _lock while it joins a driver thread that may be in a hook.
        self._figures_lock = threading.Lock()
        self._totals: dict[tuple[str, str], dict] = {}  # (unit, target), since this daemon started
        # With metrics on: CycleHistograms, and the freeze time of the cycle each
        # (unit, target) applied last, for the RPO age the next apply ends.
        self._histograms = histograms
        self._applied_freeze: dict[tuple[str, str], float] = {}
        self._shared_rate = SharedRate(daemon_bwlimit) if daemon_bwlimit else None

    # -- set-up ---------------------------------------------------------------------------

    def restore(self, configured: tuple[MirrorSpec, ...]) -> None:
        """Rebuild every recorded mirror (broken ones stay broken), then config-only ones."""
        with self._lock:
            if self.book.load_error is not None:
                return  # logged by the book; status shows it; everything else is served
            for spec in configured:
                key = (spec.volume, str(spec.to))
                if key not in self.book.entries:
                    self._check_compatible(spec)
                    self.book.entries[key] = {"spec": spec, "broken": False}
                    if spec.group:
                        self._complete_group(spec.group)
            for unit in sorted({unit_of_spec(e["spec"]) for e in self.book.entries.values()}):
                self._fix_group_name(unit)
            self.book.save()
            for unit in sorted({unit_of_spec(e["spec"]) for e in self.book.entries.values()}):
                try:
                    self._rebuild(unit)
                except CycleMirrorError as exc:
                    log.error("mirror of %s to %s cannot start: %s", _unit_text(unit),
                              ", ".join(sorted({t for (_, t), _ in self._unit_entries(unit)})),
                              exc)

    def _read_key(self, spec: MirrorSpec) -> bytes:
        from cyclemirror.keys import read_key_file

        path = spec.key_file or self.default_key_file
        if path is None:
            raise UsageError(
                f"mirror {spec.volume} -> {spec.to}: no key; pass --key-file to 'mirror start' "
                "or start the daemon with --key-file")
        return read_key_file(path)

    def _tls_of(self, spec: MirrorSpec):
        """The TLS settings of a mirror's connection, or None for plaintext."""
        from cyclemirror.wire.handshake import TlsConfig

        if spec.tls_ca is None:
            return None
        cert, key = self.client_cert
        return TlsConfig(certfile=cert, keyfile=key, cafile=spec.tls_ca,
                         server_hostname=spec.tls_server_name)

    def _entries_of(self, volume: str) -> list[tuple[str, dict]]:
        return sorted((t, e) for (v, t), e in self.book.entries.items() if v == volume)

    def _unit_of(self, volume: str) -> str:
        entries = self._entries_of(volume)
        return unit_of_spec(entries[0][1]["spec"]) if entries else volume

    def _unit_entries(self, unit: str) -> list[tuple[tuple[str, str], dict]]:
        """The book entries a unit's driver runs, sorted by (volume, target)."""
        if unit.startswith(GROUP_UNIT):
            group = unit[len(GROUP_UNIT):]
            return sorted((k, e) for k, e in self.book.entries.items()
                          if e["spec"].group == group)
        return sorted((k, e) for k, e in self.book.entries.items()
                      if k[0] == unit and e["spec"].group is None)

    def _target_mirror(self, unit: str, entries) -> str:
        """The unit's mirror name on its targets (a group's: as recorded when it first
        ran, else made from its members now)."""
        if unit.startswith(GROUP_UNIT):
            group = unit[len(GROUP_UNIT):]
            if group in self.book.groups:
                return self.book.groups[group]
            names = sorted({e["spec"].remote_name for _, e in entries})
            return group_mirror_name(group, names)
        return entries[0][1]["spec"].remote_name

    def _fix_group_name(self, unit: str) -> None:
        """Record a group's mirror name before its members change (lock held)."""
        entries = self._unit_entries(unit)
        if unit.startswith(GROUP_UNIT) and entries:
            self.book.groups.setdefault(unit[len(GROUP_UNIT):],
                                        self._target_mirror(unit, entries))

    def _rebuild(self, unit: str) -> None:
        """Replace the unit's driver by one for its recorded members and targets (lock held)."""
        old = self._drivers.pop(unit, None)
        entries = self._unit_entries(unit)
        if old is not None:
            self._stop_driver(old, last=not entries)
        self._build_errors.pop(unit, None)
        if not entries:
            return
        try:
            self._drivers[unit] = self._new_driver(unit, entries)
        except CycleMirrorError as exc:
            # Shown in status (phase broken, last_error) until a resume or restart succeeds.
            self._build_errors[unit] = f"{type(exc).__name__}: {exc}"
            raise

    @staticmethod
    def _stop_driver(driver, last: bool) -> None:
        """Stop a driver; an RBD volume's lets go of its image (``last``: and of its
        freeze snapshots, no mirror of it being left)."""
        from cyclemirror.daemon import rbdmirror

        driver.stop()
        rbdmirror.release(driver, last)

    def _rbd_subject(self, name: str, remote_name: str | None = None):
        """The mirror subject of RBD volume ``name`` (a promoted RBD image), or None if
        ``name`` is not one."""
        from cyclemirror.daemon import rbdmirror

        if rbdmirror.record(self.store, name) is None:
            return None
        rbd = self._rbd_config() if self._rbd_config is not None else None
        return rbdmirror.subject(self.store, rbd, name, remote_name)

    def _target_spec(self, spec: MirrorSpec):
        from cyclemirror.sender.driver import TargetSpec

        return TargetSpec(spec.to.host, spec.to.port, self._read_key(spec),
                          tls=self._tls_of(spec))

    def _running_driver(self, unit: str):
        """The unit's driver if its cycle loop runs (lock held), else None."""
        driver = self._drivers.get(unit)
        thread = getattr(driver, "_thread", None)
        return driver if thread is not None and thread.is_alive() else None

    def _new_driver(self, unit: str, entries: list[tuple[tuple[str, str], dict]]):
        from cyclemirror.daemon import roles as dr_roles
        from cyclemirror.sender import MirrorDriver, MirrorOptions
        from cyclemirror.sender.group import VolumeGroup

        first = entries[0][1]["spec"]
        made: dict[str, object] = {}  # the driver, for the hook (set before it starts)
        per_target: dict[str, MirrorSpec] = {}
        for (_v, t), e in entries:
            per_target.setdefault(t, e["spec"])
        for spec in per_target.values():
            check_mirror_tls(spec, self.insecure)
        targets = [self._target_spec(spec) for _t, spec in sorted(per_target.items())]
        options = MirrorOptions(
            interval=first.interval, rpo=first.rpo, pace=first.pace, codec=first.compress.codec,
            level=first.compress.level,
            bwlimit=first.bwlimit, shared_rate=self._shared_rate,
            on_applied=lambda cycle, label, stats, u=unit: self._on_applied(
                u, cycle, label, stats, made.get("driver")))
        subject = None if first.group else (self._rbd_subject(unit, first.remote_name)
                                            or self.store.open_subject(unit))
        if getattr(subject, "is_tree", False):  # a tree object (sender/treedriver.py)
            from cyclemirror.sender.treedriver import TreeDriver

            driver = TreeDriver(subject, targets, options, store=self.store,
                                remote_name=first.remote_name)
            made["driver"] = driver
            for t in sorted({t for (_v, t), e in entries if e["broken"]}):
                driver.break_target(_label(t))
            driver.start()
            return driver
        try:
            dr_roles.attach(options, self.store, sorted({v for (v, _t), _e in entries}),
                            first.group, sorted({t for (_v, t), _e in entries}),
                            remote_name=(self._target_mirror(unit, entries) if first.group
                                         else None),
                            subject=subject if getattr(subject, "is_rbd", False) else None)
        except BaseException:
            if getattr(subject, "is_rbd", False):
                subject.close()
            raise
        if first.group:
            remote = {v: e["spec"].remote_name for (v, _t), e in entries}
            members = sorted(remote)
            subject = VolumeGroup(self.store, first.group,
                                  [self.store.open_volume(v) for v in members],
                                  [remote[v] for v in members],
                                  remote_name=self._target_mirror(unit, entries))
            driver = MirrorDriver(subject, targets, options=options, store=self.store)
        elif getattr(subject, "is_rbd", False):  # an RBD volume (daemon/rbdmirror.py)
            driver = MirrorDriver(subject, targets, options=options, store=self.store)
        else:
            driver = MirrorDriver(subject, targets, options=options,
                                  store=self.store, remote_name=first.remote_name)
        made["driver"] = driver
        # Before start: it recovers its state; a broken target waits for its resume (all
        # of them broken: the whole mirror waits), the others cycle.
        for t in sorted({t for (_v, t), e in entries if e["broken"]}):
            driver.break_target(_label(t))
        driver.start()
        return driver

    # -- driver hooks (called from the driver's thread) -----------------------------------

    def _on_applied(self, unit: str, cycle: int, label: str, stats: dict,
                    driver=None) -> None:
        """Count, log and observe an applied cycle (the driver's thread; must not raise)."""
        # A volume logs under its name, a group as "group NAME".
        volume = unit if not unit.startswith(GROUP_UNIT) else "group " + unit[len(GROUP_UNIT):]
        with self._figures_lock:
            totals = self._totals.setdefault((unit, label), {"bytes": 0, "cycles": 0})
            totals["bytes"] += int(stats.get("bytes_wire") or 0)
            totals["cycles"] += 1
        resumed = stats.get("resumed_from") or 0
        log.info("mirror %s -> %s: cycle %d applied, %d bytes sent (%d raw) in %.2fs, "
                 "ratio %s%s%s", volume, label, cycle, stats.get("bytes_wire") or 0,
                 stats.get("bytes_raw") or 0, stats.get("duration") or 0.0,
                 "-" if stats.get("compression_ratio") is None
                 else f"{stats['compression_ratio']:.2f}",
                 ", full copy" if stats.get("full") else "",
                 f", resumed after chunk {resumed}" if resumed else "")
        if self._histograms is not None and driver is not None:
            try:
                self._observe(unit, label, stats, driver)
            except Exception:  # a metric must never stop a mirror
                log.exception("mirror %s -> %s: observing cycle %d for metrics failed",
                              volume, label, cycle)

    def _observe(self, unit: str, label: str, stats: dict, driver) -> None:
        """Feed the cycle histograms: one observation per member volume of the unit."""
        now = time.time()
        st = driver.status()  # after the apply: its rpo_age dates the cycle just applied
        rpo_age = st["targets"].get(label, {}).get("rpo_age")
        with self._figures_lock:
            before = self._applied_freeze.get((unit, label))
            if rpo_age is not None:
                self._applied_freeze[(unit, label)] = now - rpo_age
        # The RPO age this apply ended: now minus the freeze time of the cycle applied
        # before it.  Unknown for the first cycle this daemon applies to a target.
        self._histograms.observe(
            st.get("members") or [unit], label, duration=stats.get("duration"),
            wire_bytes=stats.get("bytes_wire"),
            rpo_age_before=(now - before) if before is not None else None)

    # -- requests -------------------------------------------------------------------------

    def pairs(self) -> list[tuple[str, str]]:
        """Every (volume, target) mirrored out, sorted."""
        with self._lock:
            return sorted(self.book.entries)

    def check_subject(self, volume: str, target: str | None):
        """For a verify (daemon/checks.py): (driver, member index, [(target, run)]).

        ``target`` None means every target of the volume.  The driver may be broken: a
        verify needs only the store and the target, a repair waits for a resume.
        """
        with self._lock:
            keys = _select(self.book.entries, volume, target)
            unit = self._unit_of(volume)
            driver = self._drivers.get(unit)
            why = self._build_errors.get(unit)
        if driver is None:
            raise NotFoundError(f"the mirror of {_unit_text(unit)} is not running"
                                + (f" ({why})" if why else "") + "; see the daemon log")
        if not hasattr(driver, "subject"):  # a tree's driver (sender/treedriver.py)
            raise UsageError(f"{volume!r} is a tree object: verify compares the blocks of "
                             "volumes and file objects; a tree's target equals a snapshot "
                             "by construction (docs/trees.md)")
        if getattr(driver.subject, "is_rbd", False):
            raise UsageError(f"{volume!r} is an RBD volume: verify reads a store volume's "
                             "frozen cycles and is not built for an RBD volume's mirror "
                             "(docs/ceph.md, 'Not yet'); compare its image with the target's "
                             "with nbdcopy or cmp meanwhile")
        index = [v.name for v in driver.subject.volumes].index(volume)
        runs = []
        for _volume, label in keys:
            addr = parse_hostport(label, "target")
            run = next((r for r in driver.targets
                        if (r.spec.host, r.spec.port) == (addr.host, addr.port)), None)
            if run is None:
                raise NotFoundError(f"the mirror of {_unit_text(unit)} has no running target "
                                    f"{label}")
            runs.append((label, run))
        return driver, index, runs

    def mirrors_of(self, volume: str) -> list[str]:
        with self._lock:
            return [t for t, _ in self._entries_of(volume)]

    def _check_compatible(self, spec: MirrorSpec) -> None:
        for target, entry in self._entries_of(spec.volume):
            other = entry["spec"]
            for field_name in (*CYCLE_SETTINGS, "group", "remote_name"):
                if getattr(other, field_name) != getattr(spec, field_name):
                    shown = {"remote_name": "--as name"}.get(field_name, field_name)
                    raise UsageError(
                        f"volume {spec.volume!r} is already mirrored to {target} with "
                        f"{shown} {getattr(other, field_name)}; all targets of a volume "
                        f"share one cycle, so give the same {shown} (or omit it)")
        for (volume, target), entry in self.book.entries.items():
            # The target keeps one image per name for each source store: two of our
            # volumes under one name there would overwrite each other's image.
            if volume != spec.volume and entry["spec"].remote_name == spec.remote_name and (
                    target == str(spec.to) or (spec.group and entry["spec"].group == spec.group)):
                raise UsageError(
                    f"volume {volume!r} already arrives at {target} as {spec.remote_name!r}; "
                    f"give volume {spec.volume!r} another name there with --as")
        if spec.group is None:
            return
        for (volume, target), entry in self._unit_entries(GROUP_UNIT + spec.group):
            other = entry["spec"]
            if volume == spec.volume:
                continue
            for field_name in CYCLE_SETTINGS:
                if getattr(other, field_name) != getattr(spec, field_name):
                    raise UsageError(
                        f"group {spec.group!r}: member {volume!r} (to {target}) has "
                        f"{field_name} {getattr(other, field_name)}; the members of a group "
                        f"freeze together in one cycle, so give the same {field_name} "
                        "(or omit it)")

    def _complete_group(self, group: str) -> list[tuple[str, str]]:
        """Give every member of the group every target of the group; return the keys added.

        A group is one mirror on each target, so its members cannot have different
        targets: a new member joins every target, a new target gets every member.
        """
        entries = self._unit_entries(GROUP_UNIT + group)
        members: dict[str, MirrorSpec] = {}
        targets: dict[str, MirrorSpec] = {}
        for (volume, target), entry in entries:
            members.setdefault(volume, entry["spec"])
            targets.setdefault(target, entry["spec"])
        added = []
        for volume, mspec in sorted(members.items()):
            for target, tspec in sorted(targets.items()):
                if (volume, target) in self.book.entries:
                    continue
                spec = dataclasses.replace(tspec, volume=volume, remote_name=mspec.remote_name)
                # As the group stands to that target (a new target: broken only when
                # the whole group is).
                same = [e["broken"] for (_v, t), e in entries if t == target]
                broken = any(same) if same else bool(entries) and all(
                    e["broken"] for _, e in entries)
                self.book.entries[(volume, target)] = {"spec": spec, "broken": broken}
                added.append((volume, target))
        return added

    def start(self, request: dict) -> dict:
        """``mirror start``: options not given are inherited from the volume's other targets."""
        with self._lock:
            volume = request.get("volume")
            existing = self._entries_of(volume) if isinstance(volume, str) else []
            if existing:
                inherited = existing[0][1]["spec"].to_json()
                for name in (*CYCLE_SETTINGS, "group", "as"):
                    if name in inherited:
                        request.setdefault(name, inherited[name])
            elif isinstance(request.get("group"), str):
                fellows = self._unit_entries(GROUP_UNIT + request["group"])
                if fellows:  # a new member takes the group's cycle settings
                    inherited = fellows[0][1]["spec"].to_json()
                    for name in CYCLE_SETTINGS:
                        if name in inherited:
                            request.setdefault(name, inherited[name])
            spec = mirror_spec_from_mapping(request, "mirror start")
            key = (spec.volume, str(spec.to))
            if key in self.book.entries:
                raise AlreadyExistsError(
                    f"volume {spec.volume!r} is already mirrored to {spec.to}; after a break "
                    f"use 'cyclemirror mirror resume {spec.volume}'")
            from cyclemirror.daemon import rbdmirror

            if rbdmirror.record(self.store, spec.volume) is not None:
                rbdmirror.check_start(spec)  # a promoted RBD image: failback (docs/ceph.md)
                subject = None
            else:
                subject = self.store.open_subject(spec.volume)  # NotFoundError names it
            if spec.group and getattr(subject, "is_file", False):
                raise UsageError(
                    f"file object {spec.volume!r} cannot join group {spec.group!r}: a file "
                    "is frozen by a reflink of its own, so its freeze is one instant only "
                    "for itself, never together with other objects (status says "
                    "'consistency: per-file'); mirror it on its own")
            if getattr(subject, "is_tree", False):
                if spec.group:
                    raise UsageError(
                        f"tree object {spec.volume!r} cannot join group {spec.group!r}: a "
                        "tree is frozen by a btrfs snapshot of its own subvolume, one "
                        "instant for that tree only; snapshots of several subvolumes are "
                        "several instants (docs/trees.md); mirror it on its own")
                if spec.pace:
                    raise UsageError(
                        f"tree object {spec.volume!r}: --pace holds a volume's writers; a "
                        "tree's writers write its files directly and cannot be paced")
            self._check_compatible(spec)
            check_mirror_tls(spec, self.insecure)  # says what to add for a remote target
            self._read_key(spec)  # a bad key file fails here, not later in the driver
            tls = self._tls_of(spec)
            if tls is not None:
                tls.client_context()  # an unreadable CA file fails here, named
            unit = unit_of_spec(spec)
            self._fix_group_name(unit)  # before a new member changes the digest
            fellows = self._unit_entries(unit)
            # A new target of a mirror broken as a whole waits for its resume too; one
            # of a mirror that still cycles to some target starts at once.
            self.book.entries[key] = {"spec": spec, "broken": bool(fellows) and all(
                e["broken"] for _, e in fellows)}
            added = [key]
            if spec.group:
                added += self._complete_group(spec.group)
            known_members = {v for (v, _t), _ in fellows}
            known_targets = {t for (_v, t), _ in fellows}
            driver = self._running_driver(unit)
            try:
                if (driver is not None and all(v in known_members for v, _t in added)
                        and all(t not in known_targets for _v, t in added)):
                    # Only a target is new: it joins the running cycle loop, whose other
                    # targets go on with their deltas (no restart, no full copy to them).
                    driver.add_target(self._target_spec(spec))
                    if self.book.entries[key]["broken"]:
                        driver.break_target(_label(str(spec.to)))
                else:
                    self._rebuild(unit)
            except BaseException:
                for k in added:
                    del self.book.entries[k]
                try:  # bring the unit's other targets back as they were
                    self._rebuild(unit)
                except CycleMirrorError as exc:
                    log.error("mirror of %s cannot restart: %s", _unit_text(unit), exc)
                raise
            self.book.save()
        log.info("mirror %s -> %s started (%s, compress %s%s%s)",
                 spec.volume, spec.to,
                 f"RPO objective {spec.rpo:g}s" if spec.rpo else f"interval {spec.interval:g}s",
                 spec.compress,
                 f", bwlimit {spec.bwlimit} B/s" if spec.bwlimit else "",
                 f", group {spec.group}" if spec.group else "")
        return {"volume": spec.volume, "target": str(spec.to), "remote_name": spec.remote_name,
                "interval": spec.interval, "rpo": spec.rpo, "pace": spec.pace,
                "compress": str(spec.compress),
                "bwlimit": spec.bwlimit, "group": spec.group,
                "target_mirror": self._target_mirror(unit, self._unit_entries(unit))}

    def _unit_keys(self, volume: str, target: str | None):
        """(unit, keys) a verb acts on: every member of the volume's unit, to ``target``
        only when one is named (a group's members share their targets)."""
        _select(self.book.entries, volume, target)  # NotFoundError names what exists
        unit = self._unit_of(volume)
        keys = [k for k, _ in self._unit_entries(unit) if target is None or k[1] == target]
        return unit, keys

    def _rows(self, keys) -> list[dict]:
        want = set(keys)
        return [r for r in self.status() if (r["volume"], r["target"]) in want]

    def sync(self, volume: str, target: str | None, timeout: float) -> list[dict]:
        """Freeze now and wait for ``target``, or for every target that is not broken
        or down; each row says whether it was waited for (``synced``) and if not,
        why (``skipped``)."""
        with self._lock:
            unit, keys = self._unit_keys(volume, target)
            driver = self._drivers.get(unit)
            why = self._build_errors.get(unit)
        if driver is None:
            raise NotFoundError(f"the mirror of {_unit_text(unit)} is not running"
                                + (f" ({why})" if why else "") + "; see the daemon log")
        labels = sorted({_label(t) for _v, t in keys}) if target is not None else None
        try:
            _cycle, skipped = driver.sync_targets(labels, timeout)
        except CycleMirrorError:
            raise
        except Exception as exc:  # the driver re-raises what broke a target, whatever it was
            raise CycleMirrorError(
                f"the mirror of {volume!r} stopped on {type(exc).__name__}: {exc}; see the "
                f"daemon log, fix the cause, then 'cyclemirror mirror resume {volume}'") from exc
        rows = self._rows(keys)
        for row in rows:
            row["skipped"] = skipped.get(_label(row["target"]))
            row["synced"] = row["skipped"] is None
        if skipped:
            log.info("mirror %s: sync did not wait for %s", _unit_text(unit),
                     "; ".join(f"{t}: {w}" for t, w in sorted(skipped.items())))
        return rows

    def break_cycles(self, volume: str, target: str | None, now: bool,
                     wait: bool = True) -> list[dict]:
        """Break the volume's mirror (to one target, or all); ``wait=False``: do not wait
        for the drivers to say broken (a caller that removes the mirror next: that stops
        the driver and waits for it anyway)."""
        with self._lock:
            unit, keys = self._unit_keys(volume, target)
            for k in keys:
                self.book.entries[k]["broken"] = True
            self.book.save()
            driver = self._drivers.get(unit)
            whole = all(e["broken"] for _, e in self._unit_entries(unit))
        targets = sorted({t for _, t in keys})
        if driver is not None:
            if target is None:
                driver.break_cycles(now=now)
            else:
                driver.break_target(_label(target), now=now)
            # Without --now the running cycle finishes first. Wait a while for that, but
            # not for ever: a cycle to an unreachable target only ends with --now. The
            # break is recorded either way; the rows say which phase the mirror is in.
            deadline = time.monotonic() + (BREAK_WAIT if wait else 0.0)
            while time.monotonic() < deadline and not self._all_broken(driver, targets, whole):
                time.sleep(0.05)
        log.info("mirror %s -> %s: broken%s", _unit_text(unit), ", ".join(targets),
                 " now (running cycle abandoned)" if now else "")
        return self._rows(keys)

    @staticmethod
    def _all_broken(driver, targets: list[str], whole: bool) -> bool:
        st = driver.status()
        if whole:
            return st["phase"] == "broken"
        return all(st["targets"].get(_label(t), {}).get("phase") == "broken" for t in targets)

    def resume(self, volume: str, target: str | None) -> list[dict]:
        with self._lock:
            unit, keys = self._unit_keys(volume, target)
            for k in keys:
                self.book.entries[k]["broken"] = False
            self.book.save()
            driver = self._running_driver(unit)
            if target is not None and driver is not None:
                # One target: the others go on as they are (broken ones stay broken).
                for t in sorted({t for (_v, t), e in self._unit_entries(unit)
                                 if e["broken"]}):
                    driver.break_target(_label(t))
                driver.resume_target(_label(target))
            else:
                # A fresh driver, not driver.resume(): it also recovers a driver whose
                # thread ended on an unexpected error. Its state is in the store, so
                # nothing is re-sent.
                self._rebuild(unit)
        log.info("mirror %s -> %s: resumed", _unit_text(unit),
                 ", ".join(sorted({t for _, t in keys})))
        return self._rows(keys)

    def remove(self, volume: str, target: str | None) -> list[dict]:
        """Remove a volume's mirror (to one target, or all).  For a group member: without
        --to the member leaves the group; with --to that target leaves the whole group.
        A target removed while others remain leaves the running cycle loop, which goes on."""
        with self._lock:
            keys = _select(self.book.entries, volume, target)
            unit = self._unit_of(volume)
            if unit.startswith(GROUP_UNIT) and target is not None:
                keys = [k for k, _ in self._unit_entries(unit) if k[1] == target]
            running = [f"{v} -> {t}" for v, t in keys if not self.book.entries[(v, t)]["broken"]]
            if running:
                to = f" --to {target}" if target is not None else ""
                raise UsageError(f"the mirror {', '.join(running)} is running; "
                                 f"break it first ('cyclemirror mirror break {volume}{to}')")
            others = {t for (_v, t), _ in self._unit_entries(unit)} - {t for _v, t in keys}
            driver = self._running_driver(unit)
            if target is not None and others and driver is not None:
                # One target leaves the running cycle loop; the others go on.
                try:
                    driver.remove_target(_label(target), timeout=BREAK_WAIT * 3)
                except NotFoundError:
                    pass  # let go of already (an earlier rm that ran out of time)
                for key in keys:
                    del self.book.entries[key]
                self.book.save()
            else:
                members_left = {v for (v, _t), _ in self._unit_entries(unit)} - {
                    v for v, _t in keys}
                if target is None and unit.startswith(GROUP_UNIT) and members_left:
                    # A member leaves its group: the targets keep the other members'
                    # images and the driver its owed sets (sender/group.py relays them
                    # out), so nothing already mirrored is copied again.
                    self._fix_group_name(unit)
                    old = self._drivers.pop(unit, None)
                    if old is not None:
                        self._stop_driver(old, last=False)
                else:
                    self._forget_targets(unit, sorted({t for _, t in keys}))
                for key in keys:
                    del self.book.entries[key]
                if unit.startswith(GROUP_UNIT) and not self._unit_entries(unit):
                    self.book.groups.pop(unit[len(GROUP_UNIT):], None)
                self.book.save()
                self._rebuild(unit)
        log.info("mirror %s: removed %s", _unit_text(unit),
                 ", ".join(f"{v} -> {t}" for v, t in keys))
        return [{"volume": v, "target": t} for v, t in keys]

    def _forget_targets(self, unit: str, targets: list[str]) -> None:
        """Drop the driver's record of removed targets (lock held, driver stopped).

        A target added again later then counts as never known: the driver
        compares block hashes with it (if it has an image) instead of trusting
        an owed set that stopped growing while the target was out.
        """
        from cyclemirror.sender.group import GROUP_STATE_PREFIX
        from cyclemirror.sender.persist import DriverState

        driver = self._drivers.pop(unit, None)
        entries = self._unit_entries(unit)
        if driver is not None:
            # The last target going: an RBD volume's freeze snapshots go with it.
            gone = {t for (_v, t), _ in entries} <= set(targets)
            self._stop_driver(driver, last=gone)
        if not unit.startswith(GROUP_UNIT) and unit in self.store.list_trees():
            from cyclemirror.sender.treedriver import forget_targets

            forget_targets(self.store, unit, [_label(t) for t in targets])
            return
        if unit.startswith(GROUP_UNIT):
            name = GROUP_STATE_PREFIX + self._target_mirror(unit, entries)
        else:
            name = unit
        nblocks = sum(self._nblocks_of(v) for v in {v for (v, _), _ in entries})
        state = DriverState(os.path.join(self.store.path, "outgoing", name), nblocks)
        for t in targets:
            state.targets.pop(t, None)
        state.save()

    def _nblocks_of(self, name: str) -> int:
        from cyclemirror.daemon import rbdmirror

        vol = rbdmirror.record(self.store, name)
        if vol is not None:
            return vol.size // vol.block_size
        return self.store.open_subject(name).nblocks

    def _key_ids(self, key_files) -> dict:
        """key_file (None: the daemon's) -> id of the key the mirror proves, or None."""
        from cyclemirror.keys import read_key_file
        from cyclemirror.wire.handshake import key_id

        out = {}
        for path in key_files:
            out[path] = None
            if path or self.default_key_file:
                try:
                    out[path] = key_id(read_key_file(path or self.default_key_file))
                except CycleMirrorError:
                    pass
        return out

    def close(self) -> None:
        with self._lock:
            drivers = list(self._drivers.values())
            self._drivers.clear()
        for driver in drivers:
            try:
                self._stop_driver(driver, last=False)
            except Exception:
                log.exception("stopping the mirror of %s failed", driver.volume.name)

    # -- status ---------------------------------------------------------------------------

    def status(self, now: float | None = None) -> list[dict]:
        """The ``mirrors`` rows of ``status --json`` (docs/cli.md), one per volume and target."""
        now = time.time() if now is None else now
        with self._lock:
            entries = sorted(self.book.entries.items())
            drivers = dict(self._drivers)
            build_errors = dict(self._build_errors)
        with self._figures_lock:
            totals = {k: dict(v) for k, v in self._totals.items()}
        rows = []
        key_ids = self._key_ids({e["spec"].key_file for _, e in entries})
        kinds = self._kinds()
        with self._lock:
            mirror_names = {}
            for unit in {unit_of_spec(e["spec"]) for _, e in entries}:
                mirror_names[unit] = self._target_mirror(unit, self._unit_entries(unit))
        for (volume, target), entry in entries:
            spec = entry["spec"]
            unit = unit_of_spec(spec)
            driver = drivers.get(unit)
            st = driver.status() if driver is not None else {"cycle": 0, "targets": {}}
            t = st["targets"].get(target, {})
            phase = t.get("phase", "broken" if entry["broken"] or driver is None else "idle")
            if entry["broken"] and st.get("phase") == "broken":
                phase = "broken"
            if phase not in PHASES:  # the driver's finer steps, in the documented words
                phase = {"connecting": "reconnecting", "comparing": "copying"}.get(phase, phase)
            rpo_age = t.get("rpo_age")
            applied = t.get("applied_cycle", 0)
            last = None
            if t.get("last_cycle"):
                last = {"cycle": t["last_cycle"], "bytes": t.get("bytes_wire"),
                        "raw_bytes": t.get("bytes_raw"), "duration": t.get("duration"),
                        "throughput": t.get("throughput"),
                        "compression_ratio": t.get("compression_ratio"),
                        "full": t.get("full"), "chunks": t.get("chunks"),
                        "resumed_from": t.get("resumed_from"), "phases": t.get("phases")}
                if "base_cycle" in t:  # a tree's: the cycle its delta started from
                    last["base_cycle"] = t["base_cycle"]
            running = t.get("progress")
            row_progress = None
            if running and applied < running["cycle"]:
                row_progress = _progress(running, now)
            tot = totals.get((unit, target), {"bytes": 0, "cycles": 0})
            rows.append({
                "volume": volume, "kind": kinds.get(volume, "volume"), "target": target,
                "remote_name": spec.remote_name,
                "group": spec.group, "target_mirror": mirror_names[unit],
                "interval": spec.interval, "interval_now": st.get("interval"),
                "compress": str(spec.compress), "bwlimit": spec.bwlimit,
                "compress_auto": st.get("compress_auto"),
                "pacing": st.get("pacing"),
                "tls": spec.tls_ca is not None, "key_id": key_ids.get(spec.key_file),
                "cycle": st.get("cycle", 0), "phase": phase,
                "applied_cycle": applied, "committed_cycle": t.get("committed_cycle", applied),
                "rpo": t.get("rpo") if spec.rpo else None,
                "applied_freeze_time": (now - rpo_age) if rpo_age is not None else None,
                "rpo_age": rpo_age, "last_cycle": last,
                "shipped_bytes_total": tot["bytes"], "cycles_total": tot["cycles"],
                "progress": row_progress,
                "last_error": (build_errors.get(unit) or t.get("last_error")
                               or (st.get("last_error") if phase == "broken" else None)),
            })
        return rows

    def _kinds(self) -> dict[str, str]:
        """Object name -> "file" or "tree" for the store's file and tree objects."""
        try:
            return {**{n: "file" for n in self.store.list_files()},
                    **{n: "tree" for n in self.store.list_trees()}}
        except (CycleMirrorError, OSError):
            return {}


def _label(target: str) -> str:
    """A book target ("host:port", "[v6]:port") as the driver labels it ("host:port")."""
    addr = parse_hostport(target, "target")
    return f"{addr.host}:{addr.port}"


def _unit_text(unit: str) -> str:
    """A unit as a person reads it: "volume 'db'" or "group 'app'"."""
    if unit.startswith(GROUP_UNIT):
        return f"group {unit[len(GROUP_UNIT):]!r}"
    return f"volume {unit!r}"


def _progress(running: dict, now: float) -> dict:
    """The ``progress`` of a row: the driver's exact counts, with a rate and time left.

    The rate leaves out what a resume skipped (already on the target, no time
    spent), so the time left is not flattered by it.
    """
    done, total = running["done_bytes"], running["total_bytes"]
    elapsed = max(1e-6, now - running["started"])
    rate = max(0, done - running.get("skipped_bytes", 0)) / elapsed
    return {"cycle": running["cycle"], "done": done, "total": total, "rate": rate,
            "eta": (total - done) / rate if rate > 0 else None,
            "full": running["full"], "raw_bytes": running["bytes_raw"],
            "wire_bytes": running["bytes_wire"], "chunks": running["chunks_sent"],
            "resumed_from": running["resumed_from"], "started": running["started"]}
