"""Planned switchover of a tree object: the target promotes its mirror, then mirrors back.

``cyclemirror mirror switchover TREE --to HOST:PORT [--target-path PATH]`` on the
source (docs/trees.md, "Switchover").  A tree's writers write its files
directly, so nothing of ours can hold them (a read-only subvolume still lets
a descriptor opened before it write): stop them first.  Then:

1. **Final cycle**: a freeze now, applied on the target (``sync_targets``).
2. The tree's mirror is broken and the tree recorded as demoted (by the
   target, planned), before the target is asked: its mirror back may arrive
   at once.
3. A connection of its own opens the tree mirror on the target
   (``tree_open``), checks that it holds the final cycle (or a newer one), and
   asks it to promote (``tree_switchover`` {cycle, back_to, path}): the target
   promotes the mirror to a tree object at ``path`` (not forced: the source
   asked; ``receiver.treepromote``), answers ``switched`` and mirrors the new
   tree back to ``back_to``.
4. That mirror back is a failback (``receiver.treefailback``): this node's
   snapshot of the final cycle becomes its incoming mirror, its live tree is
   kept whole aside (``PATH.kept-<k>-<time>``: anything a writer still
   running wrote after the final freeze is there, never lost).

If anything fails before the target was asked, or the target refuses before
its promotion's commit point (a path that exists or is not on btrfs, say),
the demotion is taken back and the mirror resumed.  If the target was asked
but its answer was lost,
the tree stays demoted (two primaries would be worse): ``mirror reinstate``
asks the target and takes it back if it did not promote.
"""

from __future__ import annotations

import logging
import time

from cyclemirror.errors import CycleMirrorError, NotFoundError, ProtocolError, RoleError

log = logging.getLogger(__name__)
SWITCH_TIMEOUT = 600.0
REFUSALS = {"UsageError", "AlreadyExistsError", "NotFoundError", "ProtocolError"}


def switchover_tree(service, name: str, to: str, back_to: str, timeout: float,
                    path: str | None) -> dict:
    from cyclemirror.daemon import roles as dr_roles

    out = service.outgoing
    store = service.store
    with out._lock:
        entries = out._entries_of(name)
        if not entries:
            raise NotFoundError(f"tree {name!r} is not mirrored from this node; switchover "
                                "runs on the source of a mirror")
        if to not in [t for t, _e in entries]:
            raise NotFoundError(f"tree {name!r} is not mirrored to {to} (its targets: "
                                f"{', '.join(t for t, _e in entries)})")
        driver = out._running_driver(out._unit_of(name))
    if driver is None:
        raise NotFoundError(f"the mirror of tree {name!r} is not running (see the daemon "
                            "log and 'cyclemirror status')")
    tree = driver.tree
    if tree.demoted is not None:
        raise RoleError(f"tree {name!r} is demoted on this node, not primary: there is "
                        "nothing to switch over from here")
    path = path or tree.path
    spec = next(r.spec for r in driver.targets if r.label == to)
    t0 = time.monotonic()
    asked: list = []
    try:
        cycle, _skipped = driver.sync_targets([to], timeout)
        out.break_cycles(name, None, False)
        tree.mark_demoted(spec.label, f"planned switchover of tree {name} to {spec.label} "
                                      f"after cycle {cycle}")
        switched = _ask(store, driver, spec, cycle, back_to, path, asked)
    except BaseException as exc:
        # The target's error naming a refusal before its promotion's commit point: it did
        # not promote (serve_tree_switchover says so with another code if it did).
        refused = getattr(exc, "code", None) in REFUSALS
        if asked and not refused:
            raise RoleError(
                f"switchover of tree {name!r}: {spec.label} was asked to promote its mirror "
                f"but did not answer ({type(exc).__name__}: {exc}); this node's tree stays "
                f"demoted. Check 'cyclemirror status' on {spec.label}: if it shows tree "
                f"{name} promoted, its mirror back fails this node back; if not, "
                f"'cyclemirror mirror reinstate {name}' makes this node primary again once "
                "the target says it did not promote (docs/trees.md)") from exc
        tree.clear_demoted()
        try:
            out.resume(name, None)
        except CycleMirrorError:
            pass
        raise
    dr_roles.release_volume(service, name)  # (the failback may have done it already)
    log.warning("tree %s: planned switchover to %s after cycle %d: tree object %s at %s "
                "there is primary now; this node is demoted", name, spec.label,
                switched["cycle"], switched["volume"], path)
    return {"volume": name, "group": None, "volumes": [name], "kind": "tree",
            "to": spec.label, "cycle": switched["cycle"], "path": path,
            "generation": switched["generation"], "epoch": None,
            "mirroring_back_to": back_to or None, "writes_held_seconds": None,
            "seconds": time.monotonic() - t0}


def _ask(store, driver, spec, cycle: int, back_to: str, path: str, asked: list) -> dict:
    """A connection of its own: open the tree mirror, check the cycle, ask to promote."""
    from cyclemirror.sender.connection import TargetLink

    link = TargetLink((spec.host, spec.port), spec.key, tls=spec.tls, insecure=spec.insecure)
    frame_link = link.dial()
    try:
        frame_link.send_message("tree_open", node_id=store.node_id,
                                node_name=store.node_name, mirror=driver.remote_name)
        opened = frame_link.recv_message({"tree_opened"})
        final = opened["applied_cycle"]
        if final < cycle:
            raise ProtocolError(f"switchover: target {spec.label} holds cycle {final} of the "
                                f"tree, older than the final cycle {cycle}")
        frame_link.sock.settimeout(SWITCH_TIMEOUT)
        asked.append(final)
        frame_link.send_message("tree_switchover", cycle=final, back_to=back_to, path=path)
        return {**frame_link.recv_message({"switched"}), "cycle": final}
    finally:
        frame_link.close()
