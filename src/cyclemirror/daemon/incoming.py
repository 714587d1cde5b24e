"""The incoming side of ``status``: every mirror image this store holds, read from disk.

Reads the target's state files under ``STORE/mirrors/<source node>/`` (the
apply journal, see ``cyclemirror.receiver.state``) without locking: each is
replaced atomically, so a read sees an old or a new version, never a mix.
A member of a group gets one row per volume, all with the group's cycle and
freeze time.  An unreadable state file becomes a row with its error rather
than disappearing, so a damaged mirror is visible.

``remove_incoming`` is ``mirror rm SOURCE/NAME`` on a target.
"""

from __future__ import annotations

import os

from cyclemirror.errors import CycleMirrorError, NotFoundError, UsageError

STATE_SUFFIXES = (".state.json", ".group.json")
_LOCAL = None  # the registry of a daemon that runs no target server (remove_incoming)


def incoming_status(store_path: str, now: float) -> list[dict]:
    from cyclemirror.receiver.backend import backend_record, rbd_status
    from cyclemirror.receiver.lineage import recorded
    from cyclemirror.receiver.state import MirrorState

    base = os.path.join(store_path, "mirrors")
    rows = []
    nodes = sorted(os.listdir(base)) if os.path.isdir(base) else []
    for node in nodes:
        ndir = os.path.join(base, node)
        if not os.path.isdir(ndir):
            continue
        for entry in sorted(os.listdir(ndir)):
            if not entry.endswith(STATE_SUFFIXES):
                continue
            path = os.path.join(ndir, entry)
            try:
                st = MirrorState.load(path)
            except (CycleMirrorError, OSError) as exc:
                rows.append({"source_node": node, "source_name": None, "volume": entry,
                             "group": None, "image": None, "applied_cycle": 0,
                             "freeze_time": None, "rpo_age": None, "receiving": None,
                             "error": str(exc)})
                continue
            applied = st.applied_cycle > 0
            inflight = st.committed or st.pending
            try:
                lineage = recorded(st)
            except CycleMirrorError as exc:
                lineage, lineage_error = None, str(exc)
            else:
                lineage_error = None
            try:
                rbd = backend_record(st)
            except CycleMirrorError as exc:
                rbd, lineage_error = None, str(exc)
            for vol in st.volumes:
                image = os.path.join(ndir, vol.name + ".img")
                if rbd is not None:  # pool/image@snapshot of the applied cycle
                    where = rbd_status(st, rbd)
                    image = f"rbd:{where['pool']}/" + (
                        f"{where['namespace']}/" if where["namespace"] else "") + \
                        f"{st.source_node}~{vol.name}" + (
                        f"@{where['snapshot']}" if where["snapshot"] else "")
                rows.append({
                    "source_node": st.source_node,
                    "source_name": st.source_name,
                    "volume": vol.name,
                    "group": st.mirror if st.group else None,
                    "size": vol.size,
                    "block_size": vol.block_size,
                    # a member new to the group: its image is zeros until the next
                    # applied cycle, which carries all of it
                    "joining": vol.name in st.extra.get("joining", []),
                    "image": image,
                    "applied_cycle": st.applied_cycle,
                    "freeze_time": st.freeze_time if applied else None,
                    "rpo_age": now - st.freeze_time if applied else None,
                    "receiving": None if inflight is None else {
                        "cycle": inflight.cycle, "full": inflight.full,
                        "chunks": inflight.chunks, "staged_bytes": inflight.staged_bytes},
                    "error": lineage_error,
                    # roles and generations (docs/failover.md): an image is a secondary;
                    # its generation is its epoch and applied cycle (null: not recorded)
                    "role": "secondary",
                    "generation": (f"{lineage['epoch']}:{st.applied_cycle}"
                                   if lineage and applied else None),
                    "epoch": lineage["epoch"] if lineage else None,
                    "parent": lineage["parent"] if lineage else None,
                })
    return rows


def remove_incoming(store_path: str, target, name: object, force: bool) -> dict:
    """Delete the incoming mirror ``SOURCE/NAME`` (``receiver.removal``): refused while its
    source is connected unless ``force``; ``target`` is the TargetServer (None without
    --listen: no source can be connected)."""
    import logging

    from cyclemirror.receiver.backend import backend_record
    from cyclemirror.receiver.removal import find_incoming, remove_files
    from cyclemirror.receiver.server import MirrorRegistry

    global _LOCAL

    try:
        m = find_incoming(store_path, name)
    except NotFoundError:  # a tree mirror, SOURCE being its node id (docs/trees.md)?
        from cyclemirror.receiver.treesession import remove_tree_mirror

        if target is None and _LOCAL is None:
            _LOCAL = MirrorRegistry()
        done = remove_tree_mirror(store_path, target.registry if target is not None
                                  else _LOCAL, name, force)
        if done is None:
            raise
        return done
    rbd_record = backend_record(m.state) if m.state is not None else None
    rbd = getattr(target, "rbd", None)
    if rbd_record is not None and rbd is None:
        raise UsageError(f"incoming mirror {name}: its images are in RBD pool "
                         f"{rbd_record.get('pool')!r}; run this on a daemon started with "
                         "--rbd-pool (and its Ceph settings) so they are removed too")
    key = (m.node_id, m.mirror, m.group)
    if target is None and _LOCAL is None:
        _LOCAL = MirrorRegistry()  # no sources without --listen; two removals still exclude
    registry = target.registry if target is not None else _LOCAL
    holder = registry.hold(key, force=force)
    try:
        removed = remove_files(m)  # the state first: from here nothing names the images
        if rbd_record is not None:
            from cyclemirror.receiver.rbdbackend import remove_mirror_images

            removed += remove_mirror_images(rbd, m.node_id, m.volumes)
    finally:
        registry.release(key, holder)
    logging.getLogger("cyclemirror.daemon").info(
        "incoming mirror %s/%s (source %s) removed%s: %d files", m.source_name or m.node_id,
        m.mirror, m.node_id, " with --force" if force else "", len(removed))
    return {"source_node": m.node_id, "source_name": m.source_name, "mirror": m.mirror,
            "group": m.group, "volumes": m.volumes, "removed": removed}
