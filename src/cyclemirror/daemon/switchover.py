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
the mirror resumed: the source stays primary.  Groups are not switched yet.
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
    with out._lock:
        entries = out._entries_of(volume)
        if not entries:
            raise NotFoundError(f"volume {volume!r} is not mirrored from this node; switchover "
                                "runs on the source of a mirror")
        if to not in [t for t, _e in entries]:
            raise NotFoundError(f"volume {volume!r} is not mirrored to {to} (its targets: "
                                f"{', '.join(t for t, _e in entries)})")
        if any(e["spec"].group for _t, e in entries):
            raise UsageError(f"volume {volume!r} is in a consistency group; switching a group "
                             "over is not built yet (docs/failover.md)")
        driver = out._drivers.get(out._unit_of(volume))
    rec = dr_roles.ensure_role(store, volume)
    if rec.role != roles.PRIMARY:
        raise RoleError(f"volume {volume!r} is {rec.role} on this node, not primary: there is "
                        "nothing to switch over from here")
    if driver is None:
        raise NotFoundError(f"the mirror of {volume!r} is not running (see the daemon log)")
    spec = next(r.spec for r in driver.targets if r.label == to)
    vol = store.open_volume(volume)
    t0 = time.monotonic()
    vol.hold_writes(f"switchover of {volume} to {to}")
    promoted = None
    asked = []  # set once the target was asked: from then on it may have promoted
    try:
        cycle = driver.sync(timeout)
        held = time.monotonic() - t0
        out.break_cycles(volume, None, False)
        lineage = dr_roles.lineage_for(store, volume)  # while still primary
        # Demoted before the target is asked: its mirror back may arrive at once.
        _set_role(store, rec, roles.DEMOTED, {
            "by": spec.label, "time": time.time(),
            "message": f"planned switchover to {spec.label} after cycle {cycle}"})
        promoted = _ask_target(store, driver, spec, cycle, back_to, lineage, asked)
    except BaseException as exc:
        if asked:
            # The answer was lost after the question: the target may be primary now.  Two
            # primaries are worse than a held volume: stay demoted, say what to check.
            raise RoleError(
                f"switchover of {volume!r}: {spec.label} was asked to promote its image but "
                f"did not answer ({type(exc).__name__}: {exc}); this node stays demoted with "
                f"its writes held. Check 'cyclemirror status' on {spec.label}: if it shows "
                f"volume {volume!r} as primary, its mirror back resyncs this node; if not, "
                "there is no verb yet to make this volume primary again (docs/failover.md, "
                "'Not built yet')") from exc
        if promoted is None:
            _set_role(store, rec, roles.PRIMARY, None)
            vol.release_writes()
            try:
                out.resume(volume, None)
            except CycleMirrorError:
                pass
        raise
    message = (f"planned switchover: {promoted['volume']} on {spec.label} is primary now "
               f"(generation {promoted['generation']}, from cycle {cycle})")
    now = roles.load_role(store.path, volume)
    if now is not None and now.role == roles.DEMOTED:  # (not yet resynced by the mirror back)
        _set_role(store, now, roles.DEMOTED, {"by": spec.label, "message": message,
                                               "time": time.time()})
    dr_roles.release_volume(service, volume)
    log.warning("volume %s: %s; this node is demoted and takes no writes", volume, message)
    return {"volume": volume, "to": spec.label, "cycle": promoted["cycle"],
            "generation": promoted["generation"], "epoch": promoted["epoch"],
            "mirroring_back_to": back_to or None, "writes_held_seconds": held,
            "seconds": time.monotonic() - t0}


def _set_role(store, rec, role: str, demoted: dict | None) -> None:
    rec.role, rec.demoted, rec.changed = role, demoted, time.time()
    roles.save_role(store.path, rec)


def _ask_target(store, driver, spec, cycle: int, back_to: str, lineage: dict,
                asked: list) -> dict:
    """A connection of its own: open the mirror, check cycle, ask the target to promote."""
    from cyclemirror.sender.connection import TargetLink
    from cyclemirror.wire.handshake import LINEAGE_VERSION

    link = TargetLink((spec.host, spec.port), spec.key, tls=spec.tls, insecure=spec.insecure)
    frame_link = link.dial()
    try:
        if link.version < LINEAGE_VERSION:
            raise ProtocolError(f"target {spec.label} speaks protocol {link.version}; a "
                                "switchover needs 3: upgrade it")
        frame_link.send_message("lineage", **lineage)
        frame_link.send_message("open", node_id=store.node_id, node_name=store.node_name,
                                mirror=driver.subject.remote_name, group=False,
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
