"""Promote: an incoming mirror image becomes a writable volume of this store, no copy.

``promote(store, registry, source, mirror, as_name, force)``; ``mirror`` is a
volume's mirror or a consistency group's (its ``target_mirror`` name: every
member becomes a volume under its own name, all as of the same group cycle):

1. Find the mirror ``SOURCE/MIRROR`` (SOURCE: the source's node name or id).
   A source connected right now (a session holds the mirror) is refused
   unless ``force``; with ``force`` that session is cut and kept out.
2. Recover the mirror (a committed cycle is redone into every member: it is
   as good as applied), then discard a half-received cycle: every image is
   exactly the last applied cycle *k*, the one cycle a group's state records
   for all its members.  A group member that joined after cycle *k* holds no
   cycle yet (zeros): refused, since promoting it would mix instants.
3. Record the promotion (the commit point of "this node is primary now"):
   one role record per volume, role ``primary``, one new epoch for all of
   them whose parent is the image's generation ``E:k``, ``promoted_from``
   naming the source and the mirror (for a group: the group's mirror).  From
   the first record on a source sending that mirror is refused as demoted
   (``receiver.lineage``), so the images cannot move on.
4. Each image is renamed into a work directory beside it as ``base.img`` and
   adopted by the store (``Store.adopt_image``: open overlay *k*, so the
   volume's next freeze is cycle *k+1*).  Nothing is copied: the time does
   not depend on the size.  A mirror kept in RBD is rolled back to its last
   cycle snapshot and renamed in its pool instead (``receiver.rbdvolumes``).
5. Last, the mirror's state and leftovers are dropped.

A crash anywhere after step 3 is finished from the records, with the geometry
the still-present mirror state gives: by running the same promote again, and
at the daemon's start (``finish_cut``), so after a restart the mirror is
either still the untouched mirror image or promoted whole.  Promote of a
mirror already promoted answers with that promotion (``resumed``).  The
failpoints ``promote.prepared`` (before the commit point), ``promote.recorded``
(after each role record) and
``promote.adopted`` (after each member made a volume) let tests kill -9 the
daemon inside a promotion.
"""

from __future__ import annotations

import logging
import os
import re
import time
import types

from cyclemirror import failpoints
from cyclemirror.errors import (
    AlreadyExistsError,
    CycleMirrorError,
    IntegrityError,
    NotFoundError,
    ProtocolError,
    RoleError,
    UsageError,
)
from cyclemirror.receiver import fileops, lineage
from cyclemirror.receiver.state import MirrorState
from cyclemirror.store import roles
from cyclemirror.store.names import validate_volume_name
from cyclemirror.wire.link import MAX_CHUNK

log = logging.getLogger(__name__)
WORK_PREFIX = ".promote-"
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]{1,253}):[0-9]{1,5}")


class _Hold:
    """Stands in the target's registry for the mirror while it is promoted, so no source
    session can open it meanwhile."""

    def __init__(self) -> None:
        self.link = types.SimpleNamespace(peer="(promote)", key_id=None, tls=False, sock=None)


def find_mirror(root: str, source: str, mirror: str) -> tuple[str, str, MirrorState]:
    """(node id, state path, state) of mirror ``mirror`` from ``source``: a volume's mirror,
    or a consistency group's (its ``target_mirror`` name, as 'status' lists it)."""
    base = os.path.join(root, "mirrors")
    known = []
    for node in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        ndir = os.path.join(base, node)
        if not os.path.isdir(ndir):
            continue
        for entry in sorted(os.listdir(ndir)):
            if not entry.endswith((".state.json", ".group.json")):
                continue
            path = os.path.join(ndir, entry)
            st = MirrorState.load(path)  # a damaged state is an IntegrityError, named
            known.append(f"{st.source_name or node}/{st.mirror}")
            if st.mirror == mirror and source in (node, st.source_name):
                return node, path, st
    raise NotFoundError(f"no incoming mirror {source}/{mirror} in this store (incoming: "
                        f"{', '.join(known) or 'none'}); name it SOURCE/VOLUME (or "
                        "SOURCE/GROUP-MIRROR for a consistency group) with the source's node "
                        "name or id, as 'cyclemirror status' lists it")


def _work_dir(directory: str, mirror: str, group: bool, member: str) -> str:
    """Where a member's image is made a volume (beside the image: one file system)."""
    return os.path.join(directory, WORK_PREFIX + mirror + (f".{member}" if group else ""))


def _volume_names(st: MirrorState, as_name: str | None) -> list[str]:
    """The volumes the promotion makes, one per member, in member order."""
    if st.group:
        if as_name:
            raise UsageError(f"{st.mirror} is a consistency group: its members become volumes "
                             "under their own names; --as names one volume, drop it")
        return [validate_volume_name(v.name) for v in st.volumes]
    return [validate_volume_name(as_name or st.mirror)]


def _volumes(store) -> set[str]:
    """The store's volumes, those kept in RBD (``receiver.rbdvolumes``) included."""
    from cyclemirror.receiver import rbdvolumes

    return set(store.list_volumes()) | set(rbdvolumes.names(store.path))


def _open_volume(store, name: str):
    from cyclemirror.receiver import rbdvolumes

    vol = rbdvolumes.load(store.path, name)
    return vol if vol is not None else store.open_volume(name)


def promote(store, registry, source: str, mirror: str, as_name: str | None = None,
            force: bool = False, rbd=None) -> dict:
    """Promote incoming mirror ``source/mirror`` (a volume's or a group's) to writable
    volumes; see the module doc.  ``rbd``: the daemon's ``RbdConfig``, for a mirror kept
    in RBD (``receiver.rbdvolumes``)."""
    from cyclemirror.receiver.mirror import Mirror

    t0 = time.monotonic()
    root = os.fspath(store.path)
    resumed = _resume(store, source, mirror, as_name, rbd)
    if resumed is not None:
        return resumed
    node, path, st = find_mirror(root, source, mirror)
    what = f"{'group ' if st.group else ''}{source}/{mirror}"
    cut = [rec.volume for rec in _records_of(root, source, mirror)
           if rec.volume not in _volumes(store)]
    if cut:  # (only a different --as gets here: _resume finishes the rest)
        raise UsageError(f"a promotion of {what} to volume {cut[0]} was cut short; finish it "
                         f"with 'cyclemirror mirror promote {source}/{mirror} --as {cut[0]}' "
                         "(nothing was changed)")
    names = _volume_names(st, as_name)
    taken = [n for n in names if n in _volumes(store)]
    if taken:
        raise AlreadyExistsError(
            f"volume{'s' if len(taken) > 1 else ''} {', '.join(map(repr, taken))} already "
            f"exist{'' if len(taken) > 1 else 's'} in this store; "
            + ("remove them first ('cyclemirror volume rm NAME': for instance the demoted "
               "members a switchover of this group left here) "
               if st.group else f"promote {what} under another name with --as NAME")
            + " (nothing was changed)")
    key = (node, mirror, st.group)
    connected = registry is not None and registry.holder(key) is not None
    if connected and not force:
        verb = (f"'cyclemirror mirror switchover {names[0]} --to THIS-NODE' (the whole "
                "group switches)" if st.group else
                f"'cyclemirror mirror switchover {mirror} --to THIS-NODE'")
        raise RoleError(
            f"the source {st.source_name or node} is connected and mirroring {what} into "
            "this store; promoting now would leave two primaries. For a planned role swap "
            f"run {verb} on the source, or stop the mirror there first ('cyclemirror "
            f"mirror break {names[0]}', then 'cyclemirror mirror rm {names[0]}'), then "
            "promote; if the source is lost or cut off, promote with "
            "--force (it is then told it was demoted)")
    hold = _Hold()
    if registry is not None:
        registry.acquire(key, hold)  # cuts a connected source (forced) and keeps it out
    try:
        state = MirrorState.load(path)
        in_rbd = bool(state.extra.get("backend"))
        if in_rbd:
            from cyclemirror.receiver import rbdvolumes

            rbdvolumes.check_free(store, rbd, names)
        # redoes a committed cycle
        m = Mirror(os.path.dirname(path), state, path, MAX_CHUNK, rbd)
        try:
            if m.state.pending is not None:
                log.info("promote %s: discarding half-received cycle %d", what,
                         m.state.pending.cycle)
                m._discard_pending()
            if not m.has_image:
                raise NotFoundError(f"incoming mirror {what} has no applied cycle "
                                    "yet: there is nothing to promote")
            st = m.state
            joining = sorted(st.extra.get("joining") or [])
            if joining:
                raise RoleError(
                    f"group {source}/{mirror}: member{'s' if len(joining) > 1 else ''} "
                    f"{', '.join(joining)} joined the group after its last applied cycle "
                    f"{st.applied_cycle} and hold{'' if len(joining) > 1 else 's'} no cycle "
                    "yet (zeros until the next one applies): promoting now would mix "
                    "instants. Let the source apply one more cycle ('cyclemirror mirror "
                    "sync' there); if the source is lost, the group cannot be promoted "
                    "whole (docs/failover.md); nothing was changed")
            if in_rbd:  # recovery checked the sizes of the last snapshots
                images = []
            else:
                images = [m.image_path(i) for i in range(len(st.volumes))]
        finally:
            m.close()
        for spec, image in zip(st.volumes if images else [], images, strict=True):
            size = os.path.getsize(image)
            if size != spec.size:  # recover checked it; a file changed meanwhile is damage
                raise IntegrityError(f"promote {what}: image {image} is {size} bytes, the "
                                     f"state says {spec.size}; nothing was changed")
        log.info("promote %s: every image is cycle %d; recording the promotion", what,
                 st.applied_cycle)
        failpoints.hit("promote.prepared")
        rec_lineage = lineage.recorded(st)
        old_epoch = rec_lineage["epoch"] if rec_lineage else roles.new_epoch()
        parent = roles.generation(old_epoch, st.applied_cycle)
        epoch = roles.new_epoch()  # one epoch for all members: the group's generation
        promoted_from = {"source_node": node, "source_name": st.source_name,
                         "mirror": mirror, "generation": parent, "cycle": st.applied_cycle,
                         "freeze_time": st.freeze_time, "forced": bool(force),
                         "time": time.time()}
        # The commit point is the first role record: from it on the source is refused as
        # demoted (receiver.lineage), so the image cannot move on, and a promote run again
        # (or the daemon's start, ``finish_cut``) finishes the job from the records.
        for name in names:
            _save_record(root, name, epoch, parent, promoted_from)
            failpoints.hit("promote.recorded")
        vols = _adopt_members(store, os.path.dirname(path), st, names, rbd)
        _drop_mirror_files(path, st)
    finally:
        if registry is not None:
            registry.release(key, hold)
    seconds = time.monotonic() - t0
    log.warning("promoted incoming mirror %s to volume%s %s%s: generation %s:%d, branched "
                "from %s (%.3fs); the source is demoted", what, "s" if st.group else "",
                ", ".join(names), " (forced, the source was connected)" if connected else
                (" (forced)" if force else ""), epoch, st.applied_cycle, parent, seconds)
    return _result(names, vols, promoted_from, epoch, parent, st.group,
                   source_was_connected=connected, seconds=seconds, resumed=False)


def _save_record(root: str, name: str, epoch: str, parent: str, promoted_from: dict) -> None:
    try:
        before = roles.load_role(root, name)  # a former primary of that name (failback)
    except Exception:  # noqa: BLE001 - a damaged old record must not block a failover
        before = None
    roles.save_role(root, roles.RoleRecord(
        volume=name, role=roles.PRIMARY, epoch=epoch, parent=parent,
        promoted_from=dict(promoted_from),
        kept=list(before.kept) if before is not None else [], changed=time.time()))


def _adopt_members(store, directory: str, st: MirrorState, names: list[str],
                   rbd=None) -> list:
    """Each member's image becomes its volume (a rename, no copy); members already made
    (a resumed promotion) are opened.  The mirror state stays until all are done: it
    holds their geometry for a promotion a crash cuts short here."""
    if st.extra.get("backend"):  # RBD images: renamed in the pool
        from cyclemirror.receiver import rbdvolumes

        return rbdvolumes.adopt_members(store, rbd, st, names)
    vols = []
    existing = set(store.list_volumes())
    for name, spec in zip(names, st.volumes, strict=True):
        if name in existing:
            vols.append(store.open_volume(name))
            continue
        image = os.path.join(directory, spec.name + ".img")
        work = _work_dir(directory, st.mirror, st.group, spec.name)
        if not (os.path.exists(image) or os.path.exists(os.path.join(work, "base.img"))):
            raise NotFoundError(f"the promotion of {st.source_name or st.source_node}/"
                                f"{st.mirror} to volume {name} was cut short and its image "
                                f"{image} is gone; restore it from a backup")
        vols.append(store.adopt_image(name, image, spec.block_size, st.applied_cycle, work))
        failpoints.hit("promote.adopted")
    return vols


def _result(names, vols, p: dict, epoch: str, parent: str | None, group: bool, *,
            source_was_connected: bool, seconds: float, resumed: bool) -> dict:
    return {"volume": names[0] if not group else None, "volumes": list(names),
            "group": group, "source_node": p["source_node"], "source_name": p["source_name"],
            "mirror": p["mirror"], "cycle": p["cycle"], "freeze_time": p["freeze_time"],
            "generation": roles.generation(epoch, p["cycle"]), "parent": parent,
            "forced": p["forced"], "source_was_connected": source_was_connected,
            "size": vols[0].size if not group else None,
            "block_size": vols[0].block_size if not group else None,
            "members": [{"volume": v.name, "size": v.size, "block_size": v.block_size}
                        for v in vols],
            "seconds": seconds, "resumed": resumed}


def _drop_mirror_files(state_path: str, st: MirrorState) -> None:
    """The mirror's state and leftovers (the images were moved before)."""
    directory = os.path.dirname(state_path)
    prefix = st.mirror + (".group.staging" if st.group else ".staging")
    leftovers = set()
    for vol in st.volumes:
        leftovers |= {f"{vol.name}.img.new", f"{vol.name}.img.apply", f"{vol.name}.scrub",
                      f"{vol.name}.scrub.json"}
    for entry in os.listdir(directory):
        if (entry in leftovers or entry == prefix
                or (entry.startswith(prefix + ".") and entry[len(prefix) + 1:].isdigit())):
            os.unlink(os.path.join(directory, entry))
    # Last: without it the images are no longer an incoming mirror (status, exports).
    os.unlink(state_path)
    fileops.fsync_dir(directory)


def _records_of(root: str, source: str, mirror: str) -> list[roles.RoleRecord]:
    """The primary role records of a promotion of ``source/mirror`` (done or cut short)."""
    records, _problems = roles.all_roles(root)
    return [rec for rec in records
            if rec.role == roles.PRIMARY and rec.promoted_from is not None
            and rec.promoted_from["mirror"] == mirror
            and source in (rec.promoted_from["source_node"], rec.promoted_from["source_name"])]


def _resume(store, source: str, mirror: str, as_name: str | None,
            rbd=None) -> dict | None:
    """Finish a promotion a crash cut short, from its role records; None if there is none.

    Records exist from the commit point on; the mirror state goes last, so while it
    exists it names every member and its geometry.  A promotion that was finished is
    answered as such (promote is safe to run again), unless a new mirror of that name
    arrived since (then the usual refusal follows)."""
    root = os.fspath(store.path)
    recs = _records_of(root, source, mirror)
    if as_name:
        recs = [rec for rec in recs if rec.volume == as_name]
    if not recs:
        return None
    p = recs[0].promoted_from
    mixed = {(rec.epoch, rec.parent, rec.promoted_from["cycle"]) for rec in recs}
    if len(mixed) > 1:
        raise IntegrityError(
            f"the promotion of {source}/{mirror} recorded different cycles or epochs for "
            f"its volumes ({', '.join(f'{r.volume}: {r.parent}' for r in recs)}): promoting "
            "them would mix instants; nothing was changed. Look at STORE/roles/ and the "
            "daemon log")
    directory = os.path.join(root, "mirrors", p["source_node"])
    st = None
    for group in (True, False):
        path = os.path.join(directory, mirror + (".group.json" if group else ".state.json"))
        if os.path.exists(path):
            st = MirrorState.load(path)
            break
    existing = _volumes(store)
    if st is None:
        names = [rec.volume for rec in recs]
        if all(n in existing for n in names):
            return _result(names, [_open_volume(store, n) for n in names], p, recs[0].epoch,
                           recs[0].parent, _was_group(recs), source_was_connected=False,
                           seconds=0.0, resumed=True)
        return _resume_without_state(store, directory, recs, mirror)
    if st.applied_cycle != p["cycle"]:
        raise IntegrityError(
            f"the promotion of {source}/{mirror} recorded cycle {p['cycle']} but its image "
            f"is at cycle {st.applied_cycle}: promoting would not give the recorded instant; "
            "nothing was changed. Look at STORE/roles/ and the daemon log")
    names = _volume_names(st, None if st.group else recs[0].volume)
    by_name = {rec.volume: rec for rec in recs}
    if st.group and set(by_name) - set(names):
        return None  # records of an older promotion; this mirror is a new one
    if all(n in existing for n in names) and any(
            os.path.exists(os.path.join(directory, v.name + ".img")) for v in st.volumes):
        return None  # a new mirror of that name arrived: the usual refusal follows
    for name in names:
        if name not in by_name:  # cut between the records of a group's members
            _save_record(root, name, recs[0].epoch, recs[0].parent, p)
    state_path = os.path.join(directory, mirror + (".group.json" if st.group
                                                   else ".state.json"))
    vols = _adopt_members(store, directory, st, names, rbd)
    _drop_mirror_files(state_path, st)
    log.warning("finished the promotion of %s/%s to volume%s %s cut short before",
                source, mirror, "s" if st.group else "", ", ".join(names))
    return _result(names, vols, p, recs[0].epoch, recs[0].parent, st.group,
                   source_was_connected=False, seconds=0.0, resumed=True)


def _was_group(recs) -> bool:
    return len(recs) > 1 or recs[0].volume != recs[0].promoted_from["mirror"]


def _resume_without_state(store, directory: str, recs, mirror: str) -> dict:
    """A promotion of the release before this one dropped the state before the images
    were adopted: take each image's geometry from its work directory."""
    import json

    names, vols = [rec.volume for rec in recs], []
    group = _was_group(recs) and os.path.isdir(_work_dir(directory, mirror, True,
                                                          recs[0].volume))
    p = recs[0].promoted_from
    for rec in recs:
        if rec.volume in store.list_volumes():
            vols.append(store.open_volume(rec.volume))
            continue
        member = rec.volume if group else mirror
        work = _work_dir(directory, mirror, group, member)
        image = os.path.join(directory, member + ".img")
        meta = os.path.join(work, "volume.json")
        if not os.path.exists(meta):
            raise NotFoundError(
                f"the promotion of {p['source_name'] or p['source_node']}/{mirror} to "
                f"volume {rec.volume} was cut short and neither its mirror state nor its "
                f"work directory {work} says the image's block size; restore from a backup")
        with open(meta) as f:
            block_size = json.load(f).get("block_size", 4096)
        vols.append(store.adopt_image(rec.volume, image, block_size, p["cycle"], work))
    return _result(names, vols, p, recs[0].epoch, recs[0].parent, group,
                   source_was_connected=False, seconds=0.0, resumed=True)


def finish_cut(store, rbd=None) -> list[dict]:
    """At the daemon's start: finish every promotion a crash cut short (role records of
    promoted volumes that do not exist yet, or whose mirror state is still there), before a source or an NBD client can see a
    half-promoted group.  Errors are logged (and the promote verb repeats them)."""
    root = os.fspath(store.path)
    try:
        records, _problems = roles.all_roles(root)
    except CycleMirrorError as exc:
        log.error("checking for cut promotions: %s", exc)
        return []
    existing = _volumes(store)

    def cut(rec) -> bool:  # a volume not made yet, or the mirror's state not dropped yet
        p = rec.promoted_from
        directory = os.path.join(root, "mirrors", p["source_node"])
        return rec.volume not in existing or any(
            os.path.exists(os.path.join(directory, p["mirror"] + suffix))
            for suffix in (".state.json", ".group.json"))

    todo = sorted({(rec.promoted_from["source_node"], rec.promoted_from["mirror"])
                   for rec in records if rec.role == roles.PRIMARY
                   and rec.promoted_from is not None and cut(rec)})
    done = []
    for node, mirror in todo:
        try:
            result = _resume(store, node, mirror, None, rbd)
        except CycleMirrorError as exc:
            log.error("the promotion of %s/%s was cut short and cannot be finished: %s "
                      "(run 'cyclemirror mirror promote %s/%s' to see it again)", node,
                      mirror, exc, node, mirror)
            continue
        if result is not None:
            done.append(result)
    return done


def serve_switchover(session, msg: dict) -> None:
    """The target's half of a planned switchover (daemon/switchover.py): the source asks,
    between cycles, after its final cycle ``msg['cycle']`` was applied here.

    The session lets go of the mirror, promotes it (not forced: the source asked and
    holds its writes), answers ``switched`` and hands ``back_to`` to the daemon, which
    starts mirroring the new volume back to the old source.  A consistency group is
    promoted whole (every member as of the final group cycle); ``switched`` then names
    the group's mirror."""
    mirror = session.mirror
    st = mirror.state
    if st.extra.get("backend"):
        raise UsageError(f"switchover of {st.mirror!r}: this target keeps the mirror in RBD, "
                         "and a switchover to an RBD target is not built (its promoted volume "
                         "cannot be mirrored back); stop the writers and run 'cyclemirror "
                         "mirror promote' on the target instead (docs/ceph.md)")
    mirror.wait_applied()
    mirror.raise_apply_error()
    if st.applied_cycle != msg["cycle"] or st.committed is not None:
        raise ProtocolError(f"switchover of {st.mirror!r}: the source's final cycle is "
                            f"{msg['cycle']}, this image applied {st.applied_cycle}")
    back_to = msg["back_to"]
    if back_to and not _ADDRESS.fullmatch(back_to):
        raise ProtocolError(f"switchover: back_to {back_to!r:.80} is not HOST:PORT")
    server = session.server
    mirror.close()
    session.mirror = None
    server.registry.release(session.key, session)
    session.key = None
    result = promote(server.store, server.registry, st.source_node, st.mirror)
    session.link.send_message("switched", volume=result["volume"] or st.mirror,
                              generation=result["generation"], epoch=result["generation"]
                              .split(":")[0])
    hook = getattr(server, "on_switchover", None)
    if hook is not None:
        hook(result, back_to)
