"""Failback on the new primary: the first cycle to the old primary is a delta.

A promoted volume branched from the old primary's cycle *k*; the old primary
turns its volume back into the image of that cycle (``receiver.resync``), so
it needs exactly the blocks this volume wrote since the promotion: those of
its overlays *k* and newer (``Volume.dirty_since``).  ``seed`` records that
before the driver first runs for such a target: held cycle *k*, the old
primary's node id, and that owed set.  If another node answers at the
address, or the old primary could not keep its volume (it then has no image),
the driver's plan compares block hashes or sends a full copy as for any
target: the seed never makes a wrong delta, only saves the full one.

A promoted consistency group is seeded the same way for all its members at
once (``seed_group``): one owed set over the group's block space, the target
holding the group's cycle *k*.

A volume promoted on an RBD target (``sender.rbdsubject``) is seeded by
``seed_rbd``: the target holds cycle *k*, whose snapshot is still on the image,
and the owed set is what its freezes since then changed (none yet: the first
freeze's dirty set is then what the volume wrote since the promotion).
"""

from __future__ import annotations

import json
import logging
import os

from cyclemirror.sender.persist import DriverState

log = logging.getLogger(__name__)


def seed(store, volume: str, label: str, promoted_from: dict) -> bool:
    """Seed the driver state of ``volume`` for target ``label`` (HOST:PORT) if it has no
    record of it yet; return True if it did."""
    vol = store.open_volume(volume)
    state = DriverState(os.path.join(store.path, "outgoing", volume), vol.nblocks)
    if label in state.targets or not state.trusted:
        return False
    k = promoted_from["cycle"]
    owed = vol.dirty_since(k)
    if owed is None:
        return False  # merged away since: the plan compares hashes instead
    e = state.entry(label)
    e.held_cycle, e.freeze_time = k, promoted_from["freeze_time"]
    e.target_node = promoted_from["source_node"]
    state.save_owed(label, owed)
    state.last_freeze = max(state.last_freeze, vol.open_overlay)
    state.save()
    log.info("mirror %s -> %s: a failback to %s: it holds cycle %d, owes %d blocks written "
             "since the promotion", volume, label, promoted_from["source_name"]
             or promoted_from["source_node"], k, owed.count())
    return True


def seed_group(store, members: list[str], remote_name: str, label: str,
               promoted_from: dict) -> bool:
    """``seed`` for a promoted consistency group: every member owes the blocks it wrote
    since the group's promotion at cycle *k*, laid end to end in the group's block space
    (``sender.group``), the target holding cycle *k*.  Also re-seeds a state the driver
    made for an incomplete member set (before the last member was added) if that target
    never held a cycle from it; returns True if it seeded."""
    from cyclemirror._cext.bitmap import ExtentBitmap
    from cyclemirror.fileio import atomic_write
    from cyclemirror.sender.group import GROUP_STATE_PREFIX, LAYOUT_FILE

    vols = [store.open_volume(name) for name in sorted(members)]
    nblocks = sum(v.nblocks for v in vols)
    directory = os.path.join(store.path, "outgoing", GROUP_STATE_PREFIX + remote_name)
    state = DriverState(directory, nblocks)
    if not state.trusted:
        return False
    e = state.targets.get(label)
    if e is not None and not (e.held_cycle == 0 and e.full and e.in_flight == 0
                              and e.target_node is None):
        return False  # it knows that target: its own records decide
    k = promoted_from["cycle"]
    # A driver made for an incomplete member set may have frozen some members alone:
    # level them now (every overlay since k is in the owed set below), so the driver
    # finds them level and has no reason to distrust the seed.
    top = max(v.open_overlay for v in vols)
    if any(v.open_overlay < top for v in vols):
        for vol in vols:
            while vol.open_overlay < top:
                vol.freeze()
        # Those freezes were not one instant: one group freeze on top, so the cycle the
        # driver ships first is the group at one instant.
        store.freeze_group([v.name for v in vols])
        top += 1
    owed = ExtentBitmap(nblocks)
    offset = 0
    for vol in vols:
        part = vol.dirty_since(k)
        if part is None:
            return False  # merged away since: the plan compares hashes instead
        for start, count in part.iter_runs():
            owed.set_range(offset + start, count)
        offset += vol.nblocks
    atomic_write(os.path.join(directory, LAYOUT_FILE),
                 json.dumps([[v.name, v.nblocks] for v in vols]).encode())
    e = state.entry(label)
    e.held_cycle, e.freeze_time = k, promoted_from["freeze_time"]
    e.target_node = promoted_from["source_node"]
    e.untrusted = False  # (set by an incomplete driver's freezes: the seed knows better)
    state.save_owed(label, owed)
    state.last_freeze = max(state.last_freeze, top)
    state.save()
    log.info("group mirror %s -> %s: a failback to %s: it holds group cycle %d, owes %d "
             "blocks the members (%s) wrote since the promotion", remote_name, label,
             promoted_from["source_name"] or promoted_from["source_node"], k, owed.count(),
             ", ".join(v.name for v in vols))
    return True


def seed_rbd(store, subject, label: str, promoted_from: dict) -> bool:
    """``seed`` for an RBD volume (``sender.rbdsubject``): the target holds the branch
    cycle *k*; owed is what the volume's freezes since *k* changed (nothing before its
    first freeze: that freeze's dirty set, folded in by the driver, is then exactly what
    the volume wrote since the promotion).  False if the driver knows that target, or
    the branch snapshot is gone (the plan then compares block hashes)."""
    state = DriverState(os.path.join(store.path, "outgoing", subject.state_dir_name),
                        subject.nblocks)
    if label in state.targets or not state.trusted:
        return False
    k = promoted_from["cycle"]
    if k != subject.branch_cycle:
        log.warning("mirror %s -> %s: promoted at cycle %d but its RBD volume branched at %d; "
                    "the target will be compared by block hashes", subject.name, label, k,
                    subject.branch_cycle)
        return False
    snaps = subject.snapshots()
    if k not in snaps:
        return False
    top = max(snaps)
    owed = subject._diff(snaps[k][0], snaps[top][0]) if top > k else None
    if owed is None:
        from cyclemirror._cext.bitmap import ExtentBitmap

        owed = ExtentBitmap(subject.nblocks)
    e = state.entry(label)
    e.held_cycle, e.freeze_time = k, promoted_from["freeze_time"]
    e.target_node = promoted_from["source_node"]
    state.save_owed(label, owed)
    state.last_freeze = max(state.last_freeze, top)
    state.save()
    log.info("mirror %s -> %s: a failback to %s from RBD image %s: it holds cycle %d, owes "
             "%d blocks frozen since the promotion (and what the next freeze adds)",
             subject.name, label, promoted_from["source_name"] or promoted_from["source_node"],
             subject.image, k, owed.count())
    return True
