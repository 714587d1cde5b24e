"""Outgoing mirrors of RBD volumes: the daemon's side of a failback from an RBD target.

A volume promoted on an RBD target lives in the Ceph pool
(``receiver.rbdvolumes``).  ``mirror start NAME --to OLD-PRIMARY`` of it runs
the usual cycle driver over an ``sender.rbdsubject.RbdVolumeSubject``: this
module builds that subject from the volume's record (its image, geometry and
branch cycle), its role record (the branch's freeze time) and the daemon's
RBD settings, and lets go of it when the driver stops (its freeze snapshots
go with the last of its mirrors).
"""

from __future__ import annotations

import logging

from cyclemirror.errors import CycleMirrorError, UsageError

log = logging.getLogger(__name__)


def record(store, name: str):
    """The RBD volume record of ``name`` (``receiver.rbdvolumes.RbdVolume``), or None."""
    from cyclemirror.receiver import rbdvolumes

    return rbdvolumes.load(store.path, name)


def check_start(spec) -> None:
    """Refuse what a mirror of an RBD volume cannot do (nothing is changed)."""
    if spec.group:
        raise UsageError(f"RBD volume {spec.volume!r} cannot join group {spec.group!r}: its "
                         "freeze is a snapshot of its own image, one instant for it alone; "
                         "mirror it on its own (docs/ceph.md, 'Failback')")
    if spec.pace:
        raise UsageError(f"RBD volume {spec.volume!r}: --pace holds the writers of a store "
                         "volume; an RBD volume's writers cannot be paced (omit --pace)")


def subject(store, rbd, name: str, remote_name: str | None = None):
    """The mirror subject of RBD volume ``name``."""
    import os

    from cyclemirror.receiver.rbdbackend import connection, snap_name
    from cyclemirror.sender.persist import DriverState
    from cyclemirror.sender.rbdsubject import RbdVolumeSubject
    from cyclemirror.store import roles

    vol = record(store, name)
    if vol is None:
        raise UsageError(f"{name!r} is not an RBD volume of this store")
    if rbd is None:
        raise UsageError(f"volume {name!r} lives in RBD; mirror it from a daemon started with "
                         "--rbd-pool (and its Ceph settings)")
    try:
        rec = roles.load_role(store.path, name)
    except CycleMirrorError:
        rec = None
    freeze_time = (rec.promoted_from or {}).get("freeze_time", vol.time) if rec else vol.time
    # Cycle numbers continue where an earlier mirror of the volume left them.
    floor = DriverState(os.path.join(store.path, "outgoing", vol.name),
                        vol.size // vol.block_size).last_freeze
    return RbdVolumeSubject(
        connection(rbd), vol.name, size=vol.size, block_size=vol.block_size,
        branch_cycle=vol.cycle, branch_snap=snap_name(vol.cycle),
        branch_freeze_time=float(freeze_time), remote_name=remote_name, floor=floor)


def release(driver, last: bool) -> None:
    """A stopped driver's RBD subject lets go of its image; ``last``: no mirror of it is
    left, so its freeze snapshots go too (the branch snapshot stays)."""
    sub = getattr(driver, "subject", None)
    if not getattr(sub, "is_rbd", False):
        return
    try:
        if last:
            n = sub.remove_freezes()
            if n:
                log.info("RBD volume %s: no mirror left; its %d freeze snapshot(s) removed",
                         sub.image, n)
    except CycleMirrorError as exc:
        log.warning("RBD volume %s: its freeze snapshots could not be removed (%s); the next "
                    "mirror of it removes them", sub.image, exc)
    finally:
        sub.close()
