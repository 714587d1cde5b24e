"""Roles in the daemon: the promote verb, roles in status, the lineage of outgoing mirrors.

The record format and its rules live in ``store.roles``; the target's side in
``receiver.lineage`` and ``receiver.promote``.  Here the daemon:

* gives every outgoing (single-volume) mirror's driver a ``lineage`` hook: at
  each connect it reads the volume's role record (making it, role primary with
  a new epoch, the first time), refuses to connect from a demoted volume
  (``DemotedError``), and otherwise hands the driver the ``lineage`` message;
* records a target's "you were demoted" answer in the role record
  (``on_demoted``), after which new NBD connections get the volume read-only;
* answers ``mirror.promote``;
* adds ``roles`` to ``status`` and each outgoing row's role and generations.

A consistency group's driver gets the same hooks for the group as a whole: its
members share one epoch (``store.roles.group_records``), the lineage message
sums their blocks written since the branch, a demoted member keeps the group
from connecting, and a promoted group's failback is seeded for every member at
once (``sender.failback.seed_group``).  Groups are promoted and switched over
whole (``receiver.promote``, ``daemon.switchover``).
"""

from __future__ import annotations

import logging
import os
import time

from cyclemirror.errors import CycleMirrorError, DemotedError, RoleError, UsageError
from cyclemirror.store import roles

log = logging.getLogger(__name__)
UNKNOWN_BLOCKS = 2**63 - 1  # "written since the branch" when the overlays were merged away


def ensure_role(store, volume: str) -> roles.RoleRecord:
    rec = roles.load_role(store.path, volume)
    if rec is None:
        rec = roles.RoleRecord(volume=volume, role=roles.PRIMARY, epoch=roles.new_epoch(),
                               changed=time.time())
        roles.save_role(store.path, rec)
        log.info("volume %s: primary, epoch %s", volume, rec.epoch)
    return rec


def written_since_branch(store, rec: roles.RoleRecord, subject=None) -> int | None:
    """Blocks this volume wrote since its epoch branched (a promoted volume), or None.
    ``subject``: an RBD volume's mirror subject (``sender.rbdsubject``), which knows."""
    if rec.promoted_from is None:
        return None
    src = subject if subject is not None else store.open_volume(rec.volume)
    dirty = src.dirty_since(rec.promoted_from["cycle"])
    return UNKNOWN_BLOCKS if dirty is None else dirty.count()


def lineage_for(store, volume: str, subject=None) -> dict:
    rec = ensure_role(store, volume)
    if rec.role == roles.DEMOTED:
        d = rec.demoted or {}
        raise DemotedError(
            f"volume {volume!r} on this node is demoted ({d.get('by', '?')} said: "
            f"{d.get('message', '?')}); it must not mirror over the new primary. Fail back by "
            "mirroring from the new primary to this node (docs/failover.md)")
    written = written_since_branch(store, rec, subject)
    return {"epoch": rec.epoch, "parent": rec.parent or "",
            "parent_freeze_time": rec.promoted_from["freeze_time"] if rec.promoted_from else 0.0,
            "written_blocks": written or 0, "discard_on": rec.discard_on or ""}


def mark_demoted(store, volume: str, label: str, message: str) -> None:
    """A target said ``volume`` was promoted there: record this node's volume as demoted."""
    try:
        rec = ensure_role(store, volume)
        if rec.role == roles.DEMOTED:
            return
        rec.role = roles.DEMOTED
        rec.demoted = {"by": label[:4096], "message": message[:4096], "time": time.time()}
        rec.changed = time.time()
        roles.save_role(store.path, rec)
        log.error("volume %s is DEMOTED: %s says: %s", volume, label, message)
    except Exception:  # noqa: BLE001 - a hook of the driver's thread must not raise
        log.exception("volume %s: recording its demotion failed", volume)


def forget(store, volume: str) -> None:
    """``volume rm``: the volume's role record goes with it (a new volume of that name
    starts a new lineage); kept files stay in STORE/kept/ until the user removes them."""
    try:
        rec = roles.load_role(store.path, volume)
    except CycleMirrorError:
        return  # a damaged record stays for a person to look at
    if rec is not None:
        for kept in rec.kept:
            log.warning("volume %s removed; its kept divergent data stays in %s", volume,
                        kept["path"])
        roles.remove_role(store.path, volume)


class MembersMissingError(RoleError):
    """A promoted group mirrored back without all the members promoted with it: the
    failback would not be one instant.  Temporary: a ``mirror start`` of the other
    members (the daemon starts them one by one after a switchover) lets it go on."""

    temporary = True


def group_lineage_for(store, group: str, members: list[str]) -> dict:
    """The ``lineage`` message of a consistency group: its members' one epoch (and
    parent, once promoted), the blocks all of them wrote since the branch."""
    recs = roles.group_records(store.path, members, time.time())
    for rec in recs:
        if rec.role == roles.DEMOTED:
            d = rec.demoted or {}
            raise DemotedError(
                f"group {group!r}: member {rec.volume!r} on this node is demoted "
                f"({d.get('by', '?')} said: {d.get('message', '?')}); the group must not "
                "mirror over the new primary. Fail back by mirroring the group from the new "
                "primary to this node (docs/failover.md)")
    first = recs[0]
    missing = sorted({r.volume for r in roles.promoted_together(store.path, first)
                      if r.role == roles.PRIMARY} - set(members))
    missing = [v for v in missing if v in store.list_volumes()]
    if missing:
        raise MembersMissingError(
            f"group {group!r}: {', '.join(missing)} {'were' if len(missing) > 1 else 'was'} "
            f"promoted with {', '.join(members)} (generation {first.parent}) but "
            f"{'are' if len(missing) > 1 else 'is'} not in this mirror: the group fails back "
            f"as a whole, at one instant. Add {'them' if len(missing) > 1 else 'it'} "
            f"('cyclemirror mirror start NAME --to HOST:PORT --group {group}'); the mirror "
            "waits meanwhile")
    written = 0
    for rec in recs:
        n = written_since_branch(store, rec)
        if first.parent is not None and n is None:
            n = UNKNOWN_BLOCKS  # joined after the promotion: no branch of its own
        written = min(UNKNOWN_BLOCKS, written + (n or 0))
    discard = {rec.discard_on for rec in recs}
    return {"epoch": first.epoch, "parent": first.parent or "",
            "parent_freeze_time": (first.promoted_from["freeze_time"]
                                   if first.promoted_from else 0.0),
            "written_blocks": written,
            "discard_on": (discard.pop() or "") if len(discard) == 1 else ""}


def attach(options, store, volumes: list[str], group: str | bool | None,
           targets: list[str] = (), remote_name: str | None = None, subject=None) -> None:
    """Give a driver's options the lineage hooks of its volume or group; for a promoted
    volume or group, seed a failback to each target it has no record of (before the
    driver reads its state).  ``group``: the group's name (a group's driver);
    ``remote_name``: its mirror name on the targets (its driver state's name);
    ``subject``: an RBD volume's mirror subject (``sender.rbdsubject``; a failback from
    an RBD target is seeded by ``sender.failback.seed_rbd``)."""
    if group:
        members = sorted(volumes)
        name = group if isinstance(group, str) else (remote_name or members[0])
        recs = roles.group_records(store.path, members, time.time())
        if (recs[0].promoted_from is not None and recs[0].role == roles.PRIMARY
                and remote_name is not None
                and all(r.promoted_from is not None for r in recs)):
            from cyclemirror.sender.failback import seed_group

            promoted = {r.volume for r in roles.promoted_together(store.path, recs[0])}
            if promoted <= set(members):
                for label in targets:
                    seed_group(store, members, remote_name, label, recs[0].promoted_from)
        options.lineage = lambda: group_lineage_for(store, name, members)
        options.on_demoted = lambda label, message: [
            mark_demoted(store, v, label, message) for v in members]
        return
    if len(volumes) != 1:
        return
    volume = volumes[0]
    rec = ensure_role(store, volume)
    if rec.promoted_from is not None and rec.role == roles.PRIMARY:
        from cyclemirror.sender.failback import seed, seed_rbd

        for label in targets:
            if subject is not None:
                seed_rbd(store, subject, label, rec.promoted_from)
            else:
                seed(store, volume, label, rec.promoted_from)
    options.lineage = lambda: lineage_for(store, volume, subject)
    options.on_demoted = lambda label, message: mark_demoted(store, volume, label, message)


def is_demoted(store, volume: str) -> bool:
    try:
        rec = roles.load_role(store.path, volume)
    except CycleMirrorError:
        return True  # a damaged record: safer read-only until it is looked at
    return rec is not None and rec.role == roles.DEMOTED


# -- control ops --------------------------------------------------------------------------

def op_promote(service, args: dict) -> dict:
    from cyclemirror.receiver.promote import promote

    image = service._arg(args, "image", str, "SOURCE/VOLUME")
    source, sep, mirror = image.partition("/")
    if not sep or not source or not mirror or "/" in mirror:
        raise UsageError(f"promote: {image!r} is not SOURCE/VOLUME (the source's node name or "
                         "id, a slash, the volume)")
    as_name = service._arg(args, "as", str, "--as", None)
    force = service._arg(args, "force", bool, "--force", False)
    registry = service.target.registry if service.target is not None else None
    path = service._arg(args, "path", str, "PATH", None)
    from cyclemirror.receiver.treeclone import find_tree_mirror

    is_tree = find_tree_mirror(str(service.store.path), source, mirror) is not None
    if path is not None or is_tree:
        if path is None:
            raise UsageError(f"promote: {source}/{mirror} is a tree mirror: name the path the "
                             "promoted tree is made at ('mirror promote SOURCE/TREE PATH', "
                             "a path on btrfs that does not exist)")
        if not is_tree:
            from cyclemirror.receiver.readers import mirror_images

            if not any(im.volume == mirror and source in (im.node_id, im.node_name)
                       for im in mirror_images(str(service.store.path))):
                from cyclemirror.errors import NotFoundError
                from cyclemirror.receiver.treeclone import known_tree_mirrors

                known = known_tree_mirrors(str(service.store.path))
                raise NotFoundError(f"promote: no tree mirror {source}/{mirror} in this "
                                    f"store (tree mirrors: {', '.join(known) or 'none'})")
            raise UsageError(f"promote: there is no tree mirror {source}/{mirror}: a PATH is "
                             "only for a tree mirror (a volume's image becomes a volume of "
                             "this store, named by --as)")
        from cyclemirror.receiver.treepromote import promote_tree

        with service._admin_lock:
            return promote_tree(service.store, registry, source, mirror, path, as_name,
                                force)
    with service._admin_lock:
        result = promote(service.store, registry, source, mirror, as_name, force,
                         rbd=service.config.rbd_config())
    with service._backend_lock:
        for volume in result["volumes"]:
            service._backends.pop(volume, None)
    return result


def finish_promotions(service) -> None:
    """At start, before the target and NBD serve anything: finish what a crash cut short.

    Turn-backs of volumes into mirror images (``receiver.turnback.finish_cut``) and file
    objects' failbacks go first: a turn-back cut after its commit point leaves a
    promoted role record beside a moved volume or a mirror state, which
    ``receiver.promote.finish_cut`` would otherwise take for a promotion cut short and
    redo before the turn-back undid it again.  Then the promotions, so no half-promoted
    group is seen, and the trees'."""
    from cyclemirror.receiver.filefailback import finish_cut as finish_file_failbacks
    from cyclemirror.receiver.promote import finish_cut
    from cyclemirror.receiver.treediscard import finish_cut as finish_tree_discards
    from cyclemirror.receiver.treepromote import finish_cut as finish_trees
    from cyclemirror.receiver.turnback import finish_cut as finish_turnbacks

    # A failback's or a split brain's turn-back into mirror images (each logs itself).
    finish_turnbacks(service.store, lambda volume: forget_outgoing(service.store, volume))
    # A file object's failback into a mirror image, cut short (each logs itself).
    finish_file_failbacks(service.store, lambda name: forget_outgoing(service.store, name))
    for result in finish_cut(service.store, service.config.rbd_config()):
        log.warning("finished the promotion of %s/%s cut short by a crash: volume%s %s, "
                    "generation %s", result["source_name"] or result["source_node"],
                    result["mirror"], "s" if result["group"] else "",
                    ", ".join(result["volumes"]), result["generation"])
    finish_trees(service.store)  # tree mirrors' (docs/trees.md); each logs what it did
    # A tree's split brain lost here, cut short (each logs itself), and its outgoing
    # mirrors' definitions, which the live verb removed before its commit point.
    for done in finish_tree_discards(service.store):
        forget_outgoing(service.store, done["tree"])


def forget_outgoing(store, volume: str) -> None:
    """At start, before the outgoing mirrors run: drop the definitions of ``volume``'s
    mirrors that a turn-back cut short by a crash did not get to (``release_volume``)."""
    from cyclemirror.daemon.mirrors import MirrorBook

    book = MirrorBook(os.path.join(store.path, "daemon"))
    drop = [key for key in book.entries if key[0] == volume]
    if not drop:
        return
    for key in drop:
        del book.entries[key]
    left = {e["spec"].group for e in book.entries.values()}
    for group in [g for g in book.groups if g not in left]:
        del book.groups[group]
    try:
        book.save()
    except CycleMirrorError as exc:  # (an unreadable book) the turn-back goes on
        log.error("volume %s is a mirror image now, but its outgoing mirrors stay defined: "
                  "%s; remove them ('cyclemirror mirror rm %s') once the definitions are "
                  "fixed", volume, exc, volume)
        return
    log.warning("volume %s is a mirror image now: its outgoing mirror%s to %s removed",
                volume, "s" if len(drop) > 1 else "", ", ".join(t for _v, t in drop))


def op_resolve(service, args: dict) -> dict:
    """``mirror resolve VOLUME --discard-changes-on NODE`` on the new primary: the user's
    word on a split brain (the loser's changes are kept in a file there)."""
    from cyclemirror.store.names import validate_volume_name

    volume = validate_volume_name(service._arg(args, "volume", str, "volume"))
    node = service._arg(args, "discard_changes_on", str, "--discard-changes-on")
    store = service.store
    if volume in store.list_trees():
        return _resolve_tree(service, volume, node)
    rec = roles.load_role(store.path, volume)
    if rec is None or rec.promoted_from is None or rec.role != roles.PRIMARY:
        from cyclemirror.errors import RoleError

        raise RoleError(f"volume {volume!r} is not a promoted primary on this node (role "
                        f"{rec.role if rec else 'none'}); resolve a split brain on the node "
                        "that was promoted")
    p = rec.promoted_from
    if node in (store.node_id, store.node_name):
        return _discard_here(service, rec)
    if node not in (p["source_node"], p["source_name"]):
        raise UsageError(f"--discard-changes-on {node!r}: the two sides of {volume} are "
                         f"{store.node_name or store.node_id} (this node) and "
                         f"{p['source_name'] or p['source_node']}")
    together = roles.promoted_together(store.path, rec)  # a group: every member
    for member in together:
        member.discard_on = p["source_node"]
        member.changed = time.time()
        roles.save_role(store.path, member)
    volumes = sorted(r.volume for r in together)
    log.warning("volume%s %s: split brain resolved by the user: %s's changes lose (kept "
                "there)", "s" if len(volumes) > 1 else "", ", ".join(volumes),
                p["source_name"] or p["source_node"])
    return {"volume": volume, "volumes": volumes, "discard_changes_on": p["source_node"],
            "discard_changes_on_name": p["source_name"]}


def _resolve_tree(service, name: str, node: str) -> dict:
    """``mirror resolve TREE --discard-changes-on NODE`` on a promoted tree: naming the old
    source, the failback goes on over its changes, which it keeps; naming this node, the
    tree goes back to being the old source's mirror (``receiver.treediscard``), kept whole
    beside its path (docs/trees.md)."""
    from cyclemirror.errors import RoleError

    store = service.store
    obj = store.open_tree(name)
    p = obj.promoted_from
    if p is None:
        raise RoleError(f"tree {name!r} was not promoted on this node; resolve a split "
                        "brain on the node that was promoted")
    old = p["source_name"] or p["source_node"]
    if node != p["source_node"] and node == store.node_name == p["source_name"]:
        raise UsageError(f"--discard-changes-on {node!r}: both sides of tree {name} are "
                         f"named {node!r}; name the loser by its node id ({p['source_node']} "
                         f"is {old}, {store.node_id} this node)")
    if node != p["source_node"] and node in (store.node_id, store.node_name):
        return _discard_tree_here(service, name, p)
    if node not in (p["source_node"], p["source_name"]):
        raise UsageError(f"--discard-changes-on {node!r}: the two sides of tree {name} are "
                         f"{store.node_name or store.node_id} (this node) and {old}")
    obj.set_discard_on(p["source_node"])
    log.warning("tree %s: split brain resolved by the user: %s's changes lose (kept there)",
                name, old)
    return {"volume": name, "volumes": [name], "kind": "tree",
            "discard_changes_on": p["source_node"], "discard_changes_on_name": p["source_name"]}


def _discard_tree_here(service, name: str, p: dict) -> dict:
    """The user named this node to lose a tree's split brain: the promoted tree is kept
    whole beside its path and the mirror it came from is the old source's again."""
    from cyclemirror.receiver.treediscard import discard_here

    store = service.store
    registry = service.target.registry if service.target is not None else None
    with service._admin_lock:
        done = discard_here(store, registry, name,
                            lambda tree: release_volume(service, tree))
    who = p["source_name"] or p["source_node"]
    return {"volume": name, "volumes": [name], "kind": "tree",
            "discard_changes_on": store.node_id, "discard_changes_on_name": store.node_name,
            "discarded_here": True, "cycle": done["cycle"], "image": done["image"],
            "kept": [{"path": done["kept"], "generation": None, "time": time.time()}],
            "next": f"on {who}: 'cyclemirror mirror reinstate {p['mirror']}' (it asks this "
                    "node, which holds its mirror again), and its mirror resumes with a "
                    f"delta of what it changed since cycle {done['cycle']}"}


def _discard_here(service, rec: roles.RoleRecord) -> dict:
    """The user named this node (the new primary) to lose: its writes since the promotion
    are kept aside and its volume(s) turned back into the old primary's image
    (``receiver.discard``); the old primary then reinstates itself and mirrors on."""
    from cyclemirror.receiver.discard import discard_here

    store = service.store
    p = rec.promoted_from
    together = roles.promoted_together(store.path, rec)
    with service._admin_lock:
        done = discard_here(store, together,
                            lambda volume: release_volume(service, volume))
    who = p["source_name"] or p["source_node"]
    return {"volume": rec.volume, "volumes": done["volumes"],
            "discard_changes_on": store.node_id, "discard_changes_on_name": store.node_name,
            "discarded_here": True, "kept": done["kept"], "cycle": done["cycle"],
            "image": f"{who}/{done['mirror']}",
            "next": f"on {who}: 'cyclemirror mirror reinstate {p['mirror'] if not done['group'] else done['volumes'][0]}'"
                    " (it asks this node, which no longer holds a promoted copy), and its "
                    "mirror resumes with only the blocks it wrote since cycle "
                    f"{done['cycle']}"}


def release_volume(service, volume: str) -> None:
    """The target's failback hook: stop mirroring ``volume`` out, forget it in NBD."""
    out = service.outgoing
    if out is not None:
        try:
            out.break_cycles(volume, None, True, wait=False)  # remove() stops the driver
        except CycleMirrorError:
            pass  # not mirrored (any more)
        try:
            out.remove(volume, None)
        except CycleMirrorError as exc:
            log.warning("failback of %s: its outgoing mirror stays defined: %s", volume, exc)
    with service._backend_lock:
        service._backends.pop(volume, None)


def op_clone(service, args: dict) -> dict:
    from cyclemirror.receiver.clone import clone

    image = service._arg(args, "image", str, "SOURCE/VOLUME")
    source, sep, mirror = image.partition("/")
    if not sep or not source or not mirror or "/" in mirror:
        raise UsageError(f"clone: {image!r} is not SOURCE/VOLUME (the source's node name or "
                         "id, a slash, the volume)")
    name = service._arg(args, "name", str, "NAME")
    if name.startswith("/"):  # a path: a file or a tree (docs/files.md, docs/trees.md)
        return clone_to_path(service, source, mirror, name)
    if "/" in name:
        raise UsageError(f"clone: {name!r} is neither a volume name nor an absolute path; "
                         "give a name for a volume clone, or an absolute path for a file or "
                         "tree clone (e.g. /srv/app-test)")
    from cyclemirror.receiver.treeclone import find_tree_mirror

    if find_tree_mirror(str(service.store.path), source, mirror) is not None:
        raise UsageError(f"clone: {source}/{mirror} is a tree mirror: its clone is a "
                         f"directory tree at a path you name, not volume {name!r}; give an "
                         "absolute path, e.g. /srv/app-test")
    with service._admin_lock:
        result = clone(service.store, source, mirror, name, rbd=service.config.rbd_config())
    with service._backend_lock:
        service._backends.pop(result["volume"], None)
    return result


def clone_to_path(service, source: str, mirror: str, path: str) -> dict:
    """``mirror clone SOURCE/NAME PATH``: a writable copy of tree mirror NAME at ``PATH``,
    or of mirror image NAME (a file object's or a volume's) as a plain file there."""
    from cyclemirror.receiver.treeclone import clone_tree, find_tree_mirror

    root = str(service.store.path)
    if find_tree_mirror(root, source, mirror) is None:
        from cyclemirror.receiver.imageclone import clone_image_to_file, find_image

        if find_image(root, source, mirror) is not None:  # a file (or volume) mirror's image
            with service._admin_lock:
                return clone_image_to_file(service.store, source, mirror, path)
    with service._admin_lock:
        return clone_tree(root, source, mirror, path)


def after_switchover(service, result: dict, back_to: str) -> None:
    """The target's switchover hook: serve the new volumes, and mirror them back (a
    group's members as one group again, named after the group's mirror without its
    digest, so the old source receives one group mirror)."""
    volumes = result["volumes"] or ([result["tree"]] if result.get("kind") == "tree" else [])
    with service._backend_lock:
        for volume in volumes:
            service._backends.pop(volume, None)
    group = group_name_of(result["mirror"]) if result["group"] else None
    what = f"group {group}" if group else volumes[0]
    if not back_to:
        log.warning("switchover of %s: the old source gave no address to mirror back to; "
                    "start it with 'cyclemirror mirror start VOLUME --to HOST:PORT%s' for "
                    "%s", what, f" --group {group}" if group else "", ", ".join(volumes))
        return
    for volume in volumes:
        request = {"volume": volume, "to": back_to}
        if group:
            request["group"] = group
        try:
            with service._admin_lock:
                service.outgoing.start(request)
        except CycleMirrorError as exc:
            log.error("switchover of %s: mirroring %s back to %s did not start: %s", what,
                      volume, back_to, exc)


group_name_of = roles.group_name_of  # (kept here for the callers of the daemon)


def op_switchover(service, args: dict) -> dict:
    from cyclemirror.daemon.switchover import op_switchover as run

    return run(service, args)


def op_reinstate(service, args: dict) -> dict:
    from cyclemirror.daemon.reinstate import op_reinstate as run

    with service._admin_lock:
        return run(service, args)


OPS = {"mirror.promote": op_promote, "mirror.resolve": op_resolve,
       "mirror.switchover": op_switchover, "mirror.clone": op_clone,
       "mirror.reinstate": op_reinstate}


# -- status -------------------------------------------------------------------------------

def annotate(store, doc: dict) -> None:
    """Add ``roles`` (one row per role record) and each outgoing row's role/generations."""
    records, problems = roles.all_roles(store.path)
    by_volume = {rec.volume: rec for rec in records}
    for row in doc.get("mirrors", []):
        rec = by_volume.get(row.get("volume"))
        row["role"] = rec.role if rec else None
        row["generation"] = (roles.generation(rec.epoch, row.get("cycle") or 0)
                             if rec else None)
        applied = row.get("applied_cycle") or 0
        row["common_generation"] = (roles.generation(rec.epoch, applied)
                                    if rec and applied else None)
    rows = []
    for rec in records:
        try:
            vol = store.open_volume(rec.volume)
            cycle = vol.open_overlay
        except CycleMirrorError:
            vol, cycle = None, None
        written = None
        if vol is not None and rec.promoted_from is not None:
            try:
                written = written_since_branch(store, rec)
            except CycleMirrorError:
                written = None
        peers = [{"peer": row["target"], "common_cycle": row.get("applied_cycle") or 0,
                  "common_generation": row.get("common_generation")}
                 for row in doc.get("mirrors", []) if row.get("volume") == rec.volume]
        if rec.promoted_from is not None:
            p = rec.promoted_from
            peers.append({"peer": p["source_name"] or p["source_node"],
                          "common_cycle": p["cycle"], "common_generation": p["generation"]})
        rows.append({
            "volume": rec.volume, "role": rec.role, "epoch": rec.epoch,
            "generation": roles.generation(rec.epoch, cycle) if cycle is not None else None,
            "parent": rec.parent, "promoted_from": rec.promoted_from, "demoted": rec.demoted,
            "written_since_branch_bytes": (None if written in (None, UNKNOWN_BLOCKS) or vol is None
                                           else written * vol.block_size),
            "peers": peers, "kept": list(rec.kept), "error": None,
        })
    for text in problems:
        rows.append({"volume": None, "role": None, "error": text})
    doc["roles"] = rows
