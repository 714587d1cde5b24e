"""Planned switchover: swap the roles of a volume's source and one target with zero loss.

``cyclemirror mirror switchover VOLUME --to HOST:PORT`` on the source:

1. **Hold writes**: the volume refuses new writes (NBD: EPERM) once every
   write in flight has landed (``Volume.hold_writes``); reads go on.  Every
   write acknowledged before this point is in the view.
2. **Final cycle**: ``mirror sync`` freezes now and waits until every target
   applied that cycle *k*, so the target's image holds every acknowledged write.
3. The mirror is broken (the driver idles), and a connection of its own asks
   the target to **promote** the image (``switchover`` message, protocol 3):
   the target checks it applied exactly cycle *k*, promotes (not forced: the
   source asked), answers ``switched`` with its new generation, and starts
   mirroring back to ``back_to`` (this daemon's listen address, or
   ``--back-to``).
4. **Demote** here: the role record says demoted (by the target, planned);
   the outgoing mirror definitions of the volume are removed.  The held
   writes stay refused: the volume turns into the new primary's image when
   its mirror back opens (``receiver.resync``), with nothing to keep, since
   nothing was written after freeze *k*.

If anything fails before the target promoted, writes are allowed again and
the mirror resumed: the source stays primary.

A file object switches over the same way, except that nothing of ours holds
its writers (they write the file directly): stop them first.  The final
cycle has every write made before its freeze; anything a writer still
running wrote after it is not lost: the mirror back (``receiver.filefailback``)
keeps the live file whole beside it (``PATH.kept-<k>-<time>``) and, if the
new primary wrote too, refuses as split brain until a user names the loser.
A tree switches over in ``daemon.treeswitchover`` (its target promotes the
mirror to a tree object at a path, and the mirror back is a tree's failback).

A consistency group switches over whole (``VOLUME`` names any member): writes
are held on every member, the final cycle freezes them all at one instant,
every member is demoted, and the target promotes the group's mirror (every
member as of that cycle) and mirrors the members back as one group.  The
members share one generation history (``store.roles.group_records``), so that
mirror back is a failback of the whole group: the demoted members turn into
the images of the group's mirror (``receiver.resync``), no copy.
"""

from __future__ import annotations

import logging
import time

from cyclemirror.errors import (
    CycleMirrorError,
    NotFoundError,
    ProtocolError,
    RoleError,
    UsageError,
)
from cyclemirror.store import roles

log = logging.getLogger(__name__)
SWITCH_TIMEOUT = 600.0


def op_switchover(service, args: dict) -> dict:
    from cyclemirror.daemon import roles as dr_roles

    volume = service._arg(args, "volume", str, "volume")
    to = service._arg(args, "to", str, "--to")
    back_to = service._arg(args, "back_to", str, "--back-to", None)
    timeout = float(service._arg(args, "timeout", (int, float), "--timeout", 300))
    if back_to is None:
        back_to = service.listen_address or ""
        if back_to.startswith(("0.0.0.0:", "[::]:")):
            raise UsageError(f"switchover: this daemon listens on {back_to}; give the address "
                             "the target reaches it at with --back-to HOST:PORT")
    out = service.outgoing
    store = service.store
    if volume in store.list_trees():
        from cyclemirror.daemon.treeswitchover import switchover_tree

        return switchover_tree(service, volume, to, back_to, timeout,
                               service._arg(args, "path", str, "--target-path", None))
    if service._arg(args, "path", str, "--target-path", None) is not None:
        raise UsageError(f"switchover of {volume!r}: --target-path is for a tree object (the "
                         "path its promoted tree is made at on the target)")
    # A file object's writers write its file directly: nothing of ours can hold them.
    is_file = volume in store.list_files()
    with out._lock:
        entries = out._entries_of(volume)
        if not entries:
            raise NotFoundError(f"volume {volume!r} is not mirrored from this node; switchover "
                                "runs on the source of a mirror")
        if to not in [t for t, _e in entries]:
            raise NotFoundError(f"volume {volume!r} is not mirrored to {to} (its targets: "
                                f"{', '.join(t for t, _e in entries)})")
        group = entries[0][1]["spec"].group
        unit = out._unit_of(volume)
        # A group switches over whole: every member, at the one freeze of its final cycle.
        members = (sorted({v for (v, _t), _e in out._unit_entries(unit)}) if group
                   else [volume])
        driver = out._drivers.get(unit)
    what = f"group {group!r} ({', '.join(members)})" if group else f"volume {volume!r}"
    # A group's members share one epoch (made so here, before anything is changed).
    recs = (dict(zip(members, roles.group_records(store.path, members, time.time()),
                     strict=True)) if group
            else {volume: dr_roles.ensure_role(store, volume)})
    for member, rec in recs.items():
        if rec.role != roles.PRIMARY:
            raise RoleError(f"volume {member!r} is {rec.role} on this node, not primary: "
                            f"there is nothing to switch over from here ({what})")
    if driver is None:
        raise NotFoundError(f"the mirror of {what} is not running (see the daemon log)")
    spec = next(r.spec for r in driver.targets if r.label == to)
    vols = [] if is_file else [store.open_volume(m) for m in members]
    t0 = time.monotonic()
    held_vols = []
    promoted = None
    asked = []  # set once the target was asked: from then on it may have promoted
    try:
        for vol in vols:  # each returns once its writes in flight landed
            vol.hold_writes(f"switchover of {what} to {to}")
            held_vols.append(vol)
        cycle = driver.sync(timeout)  # one freeze: every member's final image, one instant
        held = time.monotonic() - t0
        out.break_cycles(volume, None, False)
        # Still primary: the target records this generation, the parent of its promotion.
        lineage = (dr_roles.group_lineage_for(store, group, members) if group
                   else dr_roles.lineage_for(store, volume))
        # Demoted before the target is asked: its mirror back may arrive at once.
        for member in members:
            _set_role(store, recs[member], roles.DEMOTED, {
                "by": spec.label, "time": time.time(),
                "message": f"planned switchover of {what} to {spec.label} after cycle "
                           f"{cycle}"})
        promoted = _ask_target(store, driver, spec, cycle, back_to, lineage, asked,
                               group=bool(group))
    except BaseException as exc:
        if asked:
            # The answer was lost after the question: the target may be primary now.  Two
            # primaries are worse than a held volume: stay demoted, say what to check.
            raise RoleError(
                f"switchover of {what}: {spec.label} was asked to promote its image but "
                f"did not answer ({type(exc).__name__}: {exc}); this node stays demoted with "
                f"its writes held. Check 'cyclemirror status' on {spec.label}: if it shows "
                f"{what} as primary, its mirror back resyncs this node; if not, "
                f"'cyclemirror mirror reinstate {volume}' makes this node primary again "
                "once the target says it did not promote (docs/failover.md)") from exc
        if promoted is None:
            for member in members:
                if recs[member].role != roles.PRIMARY:
                    _set_role(store, recs[member], roles.PRIMARY, None)
            for vol in held_vols:
                vol.release_writes()
            try:
                out.resume(volume, None)
            except CycleMirrorError:
                pass
        raise
    message = (f"planned switchover: {promoted['volume']} on {spec.label} is primary now "
               f"(generation {promoted['generation']}, from cycle {cycle})")
    for member in members:
        now = roles.load_role(store.path, member)
        if now is not None and now.role == roles.DEMOTED:  # (not yet resynced by the mirror
            _set_role(store, now, roles.DEMOTED, {"by": spec.label, "message": message,
                                                   "time": time.time()})  # back)
    for member in members:
        dr_roles.release_volume(service, member)
    log.warning("%s: %s; this node is demoted and takes no writes", what, message)
    return {"volume": volume, "group": group, "volumes": members, "to": spec.label,
            "cycle": promoted["cycle"], "generation": promoted["generation"],
            "epoch": promoted["epoch"], "mirroring_back_to": back_to or None,
            "writes_held_seconds": None if is_file else held, "kind": "file" if is_file
            else "volume", "seconds": time.monotonic() - t0}


def _set_role(store, rec, role: str, demoted: dict | None) -> None:
    rec.role, rec.demoted, rec.changed = role, demoted, time.time()
    roles.save_role(store.path, rec)


def _ask_target(store, driver, spec, cycle: int, back_to: str, lineage: dict | None,
                asked: list, group: bool = False) -> dict:
    """A connection of its own: open the mirror, check cycle, ask the target to promote."""
    from cyclemirror.sender.connection import TargetLink
    from cyclemirror.wire.handshake import LINEAGE_VERSION

    link = TargetLink((spec.host, spec.port), spec.key, tls=spec.tls, insecure=spec.insecure)
    frame_link = link.dial()
    try:
        if link.version < LINEAGE_VERSION:
            raise ProtocolError(f"target {spec.label} speaks protocol {link.version}; a "
                                "switchover needs 3: upgrade it")
        if lineage is not None:
            frame_link.send_message("lineage", **lineage)
        frame_link.send_message("open", node_id=store.node_id, node_name=store.node_name,
                                mirror=driver.subject.remote_name, group=group,
                                volumes=driver.subject.volume_specs())
        opened = frame_link.recv_message({"opened"})
        # Cycles after the final one (the driver may have frozen again before the break)
        # carry no writes: they were held.  The target's newest applied one is as good.
        final = opened["applied_cycle"]
        if final < cycle:
            raise ProtocolError(f"switchover: target {spec.label} holds cycle {final}, older "
                                f"than the final cycle {cycle}")
        frame_link.sock.settimeout(SWITCH_TIMEOUT)
        asked.append(final)
        frame_link.send_message("switchover", cycle=final, back_to=back_to)
        return {**frame_link.recv_message({"switched"}), "cycle": final}
    finally:
        frame_link.close()
