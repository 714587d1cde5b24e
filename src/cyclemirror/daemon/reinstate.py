"""Reinstate: make a demoted volume (or group) primary again, when no target promoted it.

``cyclemirror mirror reinstate VOLUME [--force]`` on a demoted former primary.
A switchover whose answer was lost leaves the source demoted with its writes
held, while the target may or may not have promoted its image; and after a
split brain settled in this node's favour (``mirror resolve
--discard-changes-on NEW-PRIMARY`` there) the other side turned its volume
back into this node's mirror image, so this node is the only primary again.
In both cases this verb takes the demotion back, but only when it is safe:

1. The volume must be demoted here (exit 10 otherwise).  A member of a
   consistency group reinstates its whole group (every member demoted).
2. Every target of its mirror (the outgoing mirror's book entries) is
   **asked**: a connection of its own opens the mirror without a lineage, as
   an older source would; a target that promoted the image and is primary
   answers ``DemotedError`` and the reinstate is refused (exit 10: fail back
   from that target instead), while a target that answers ``opened`` holds
   this node's image (at the cycle it names) and is not primary.
3. A target that cannot be reached (or speaks no protocol 3) refuses the
   reinstate unless ``--force``: then it goes on, and the result and the log
   say the risk (if that target did promote, there are two primaries: their
   writes diverge until a failback settles it, and its mirror here is
   refused as demoted when it reconnects).  A volume with no target to ask
   also needs ``--force``.
4. Each member's role record becomes primary again (the demotion recorded in
   the log), its held writes are released, and the mirror is resumed, so the
   targets get the cycles they missed as deltas.
"""

from __future__ import annotations

import logging
import time

from cyclemirror.errors import (
    CycleMirrorError,
    DemotedError,
    NotFoundError,
    RoleError,
    UsageError,
)
from cyclemirror.store import roles
from cyclemirror.store.names import validate_volume_name

log = logging.getLogger(__name__)
ASK_TIMEOUT = 30.0


def op_reinstate(service, args: dict) -> dict:
    volume = validate_volume_name(service._arg(args, "volume", str, "volume"))
    force = service._arg(args, "force", bool, "--force", False)
    store, out = service.store, service.outgoing
    if volume in store.list_trees():
        return _reinstate_tree(service, volume, force)
    is_file = volume in store.list_files()  # its role record is a volume's (docs/files.md)
    if volume not in store.list_volumes() and not is_file:
        raise NotFoundError(f"no volume, file object or tree object {volume!r} on this node")
    members, group, asks = [volume], None, []
    if out is not None:
        with out._lock:
            entries = out._entries_of(volume)
            if entries:
                group = entries[0][1]["spec"].group
                unit = out._unit_of(volume)
                unit_entries = out._unit_entries(unit)
                if group:
                    members = sorted({v for (v, _t), _e in unit_entries})
                remote = out._target_mirror(unit, unit_entries)
                seen = set()
                for (_v, t), e in unit_entries:
                    if t not in seen:
                        seen.add(t)
                        asks.append((t, out._target_spec(e["spec"]), remote))
    what = f"group {group!r} ({', '.join(members)})" if group else f"volume {volume!r}"
    recs = {m: roles.load_role(store.path, m) for m in members}
    for m, rec in recs.items():
        if rec is None or rec.role != roles.DEMOTED:
            raise RoleError(f"volume {m!r} is {rec.role if rec else 'not mirrored'} on this "
                            f"node, not demoted: there is nothing to reinstate ({what})")
    vols = [store.open_file(m) if is_file else store.open_volume(m) for m in members]
    specs = [{"name": _remote_name(out, m), "size": v.size, "block_size": v.block_size}
             for m, v in zip(members, vols, strict=True)]
    answers, unreachable = [], []
    for label, spec, remote in asks:
        _asked(label, what, lambda spec=spec, remote=remote: _ask(
            store, spec, remote, bool(group), specs), answers, unreachable)
    risk = _risk(what, unreachable, asks, force)
    now = time.time()
    for m, rec in recs.items():
        d = rec.demoted or {}
        log.warning("volume %s: reinstated as primary%s (it was demoted by %s: %s)", m,
                    " (forced: " + risk + ")" if risk else "", d.get("by", "?"),
                    d.get("message", "?"))
        rec.role, rec.demoted, rec.changed = roles.PRIMARY, None, now
        roles.save_role(store.path, rec)
    for vol in vols:
        if not is_file:  # a file object's writers write its file: nothing of ours to hold
            vol.release_writes()
    with service._backend_lock:
        for m in members:
            service._backends.pop(m, None)  # new NBD connections get it writable
    resumed = False
    if asks:
        try:
            out.resume(volume, None)
            resumed = True
        except CycleMirrorError as exc:
            log.error("reinstate %s: its mirror did not resume: %s", what, exc)
    return {"volume": volume, "group": group, "volumes": members, "asked": answers,
            "forced": bool(risk), "risk": risk, "mirror_resumed": resumed}


def _asked(label: str, what: str, ask, answers: list, unreachable: list) -> None:
    """Ask one target; a target that promoted its copy refuses the reinstate."""
    try:
        opened = ask()
    except CycleMirrorError as exc:
        if getattr(exc, "code", None) == "DemotedError" or isinstance(exc, DemotedError):
            raise RoleError(
                f"reinstate {what}: {label} promoted its copy and is primary ({exc}); "
                "this node stays demoted. Fail back from it instead: mirror it from "
                f"{label} to this node (docs/failover.md); nothing was changed") from exc
        unreachable.append((label, f"{type(exc).__name__}: {exc}"))
        answers.append({"target": label, "answer": "unreachable",
                        "error": f"{type(exc).__name__}: {exc}"})
        return
    except OSError as exc:
        unreachable.append((label, f"{type(exc).__name__}: {exc}"))
        answers.append({"target": label, "answer": "unreachable",
                        "error": f"{type(exc).__name__}: {exc}"})
        return
    answers.append({"target": label, "answer": "holds the image",
                    "applied_cycle": opened["applied_cycle"], "error": None})


def _reinstate_tree(service, name: str, force: bool) -> dict:
    """``mirror reinstate TREE``: a demoted tree object is made primary again once every
    target of its mirror says it holds its mirror and did not promote it (``tree_open``
    answered by ``tree_opened``, not a ``DemotedError``); then its mirror resumes, with a
    delta from the cycle each target holds (docs/trees.md, "Split brain")."""
    store, out = service.store, service.outgoing
    obj = store.open_tree(name)
    what = f"tree {name!r}"
    if obj.demoted is None:
        raise RoleError(f"{what} is primary on this node, not demoted: there is nothing to "
                        "reinstate")
    asks = []
    if out is not None:
        with out._lock:
            entries = out._entries_of(name)
            for t, e in entries:
                if t not in [a[0] for a in asks]:
                    asks.append((t, out._target_spec(e["spec"]), e["spec"].remote_name))
    answers, unreachable = [], []
    for label, spec, remote in asks:
        _asked(label, what, lambda spec=spec, remote=remote: _ask_tree(store, spec, remote),
               answers, unreachable)
    risk = _risk(what, unreachable, asks, force)
    d = obj.demoted or {}
    driver = None
    if out is not None:
        with out._lock:
            driver = out._running_driver(out._unit_of(name)) if out._entries_of(name) \
                else None
    # Through the running driver's own object, which would write its record back.
    obj.close()
    tree = driver.tree if driver is not None else store.open_tree(name)
    tree.clear_demoted()
    if driver is None:
        tree.close()
    log.warning("tree %s: reinstated as primary%s (it was demoted by %s: %s)", name,
                " (forced: " + risk + ")" if risk else "", d.get("by", "?"),
                d.get("message", "?"))
    resumed = False
    if asks:
        try:
            out.resume(name, None)
            resumed = True
        except CycleMirrorError as exc:
            log.error("reinstate %s: its mirror did not resume: %s", what, exc)
    return {"volume": name, "group": None, "volumes": [name], "kind": "tree",
            "asked": answers, "forced": bool(risk), "risk": risk, "mirror_resumed": resumed}


def _risk(what: str, unreachable: list, asks: list, force: bool) -> str | None:
    if not unreachable and asks:
        return None
    who = ", ".join(t for t, _e in unreachable) or "no target (the mirror was removed)"
    risk = (f"{who} could not be asked whether it promoted its copy of {what}: if it "
            "did, both are primary and their writes diverge until a failback settles "
            "it (it is refused here as demoted when it reconnects)")
    if not force:
        detail = "; ".join(f"{t}: {e}" for t, e in unreachable)
        raise RoleError(
            f"reinstate {what}: {who} could not be asked{f' ({detail})' if detail else ''}"
            "; this node stays demoted. Check that target first ('cyclemirror status' "
            "there: if it shows the object as primary, fail back from it). If it is lost "
            "for good and you are sure it did not promote, run again with --force; "
            "nothing was changed")
    return risk


def _ask_tree(store, spec, remote: str) -> dict:
    """Open the tree mirror on the target and close it: ``tree_opened`` if it holds it and
    did not promote it; its ``DemotedError`` if it did."""
    from cyclemirror.sender.connection import TargetLink

    link = TargetLink((spec.host, spec.port), spec.key, tls=spec.tls, insecure=spec.insecure)
    frame_link = link.dial()
    try:
        frame_link.sock.settimeout(ASK_TIMEOUT)
        frame_link.send_message("tree_open", node_id=store.node_id,
                                node_name=store.node_name, mirror=remote)
        return frame_link.recv_message({"tree_opened"})
    finally:
        frame_link.close()


def _remote_name(out, volume: str) -> str:
    """The volume's name on its targets (``--as``), as its mirror's book entry says."""
    entries = out._entries_of(volume) if out is not None else []
    return entries[0][1]["spec"].remote_name if entries else volume


def _ask(store, spec, remote: str, group: bool, specs: list[dict]) -> dict:
    """Open the mirror on the target without a lineage and close it: ``opened`` if it
    holds the image and is not primary; its ``DemotedError`` if it promoted it."""
    from cyclemirror.sender.connection import TargetLink
    from cyclemirror.wire.handshake import LINEAGE_VERSION

    link = TargetLink((spec.host, spec.port), spec.key, tls=spec.tls, insecure=spec.insecure)
    frame_link = link.dial()
    try:
        if link.version < LINEAGE_VERSION:
            raise UsageError(f"target {spec.label} speaks protocol {link.version}: it cannot "
                             "say whether it promoted the image (it needs 3)")
        frame_link.sock.settimeout(ASK_TIMEOUT)
        frame_link.send_message("open", node_id=store.node_id, node_name=store.node_name,
                                mirror=remote, group=group, volumes=specs)
        return frame_link.recv_message({"opened"})
    finally:
        frame_link.close()
