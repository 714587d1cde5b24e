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
"""

from __future__ import annotations

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
