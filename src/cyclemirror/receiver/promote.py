"""Promote: an incoming mirror image becomes a writable volume of this store, no copy.

``promote(store, registry, source, mirror, as_name, force)``:

1. Find the mirror ``SOURCE/VOLUME`` (SOURCE: the source's node name or id).
   A source connected right now (a session holds the mirror) is refused
   unless ``force``; with ``force`` that session is cut and kept out.
2. Recover the mirror (a committed cycle is applied: it is as good as
   applied), then discard a half-received cycle: the image is exactly the
   last applied cycle *k*.
3. Record the promotion (the commit point of "this node is primary now"):
   role record ``primary`` with a new epoch whose parent is the image's
   generation ``E:k`` and ``promoted_from`` naming the source and mirror.
   From here a source sending that mirror is refused as demoted
   (``receiver.lineage``).
4. Rename the image into a work directory beside it as ``base.img``, drop
   the mirror's state and leftovers, and let the store adopt it
   (``Store.adopt_image``: open overlay *k*, so the volume's next freeze is
   cycle *k+1* and generations number on from the branch).  Nothing is
   copied: the time does not depend on the size.

A crash anywhere is finished by running the same promote again: a role
record that promotes a mirror whose volume does not exist yet is resumed.
Consistency groups are not promoted yet (refused, docs/failover.md).
"""

from __future__ import annotations

import logging
import os
import re
import time
import types

from cyclemirror.errors import (
    AlreadyExistsError,
    NotFoundError,
    ProtocolError,
    RoleError,
    UsageError,
)
from cyclemirror.receiver import lineage
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
    """(node id, state path, state) of single-volume mirror ``mirror`` from ``source``."""
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
                if st.group:
                    raise UsageError(f"{source}/{mirror} is a consistency group; promoting a "
                                     "group is not built yet (docs/failover.md)")
                return node, path, st
    raise NotFoundError(f"no incoming mirror {source}/{mirror} in this store (incoming: "
                        f"{', '.join(known) or 'none'}); name it SOURCE/VOLUME with the "
                        "source's node name or id, as 'cyclemirror status' lists it")


def promote(store, registry, source: str, mirror: str, as_name: str | None = None,
            force: bool = False) -> dict:
    """Promote incoming mirror ``source/mirror`` to a writable volume; see the module doc."""
    from cyclemirror.receiver.mirror import Mirror

    t0 = time.monotonic()
    root = os.fspath(store.path)
    resumed = _resume(store, source, mirror, as_name)
    if resumed is not None:
        return resumed
    node, path, st = find_mirror(root, source, mirror)
    name = validate_volume_name(as_name or mirror)
    if name in store.list_volumes():
        raise AlreadyExistsError(f"volume {name!r} already exists in this store; promote "
                                 f"{source}/{mirror} under another name with --as NAME")
    key = (node, mirror, False)
    connected = registry is not None and registry.holder(key) is not None
    if connected and not force:
        raise RoleError(
            f"the source {st.source_name or node} is connected and mirroring {mirror} into "
            "this image; promoting now would leave two primaries. For a planned role swap "
            f"stop the mirror on the source first ('cyclemirror mirror break {mirror}', then "
            f"'cyclemirror mirror rm {mirror}' there), then promote; if the source is lost "
            "or cut off, promote with --force (it is then told it was demoted)")
    hold = _Hold()
    if registry is not None:
        registry.acquire(key, hold)  # cuts a connected source (forced) and keeps it out
    try:
        state = MirrorState.load(path)
        if state.extra.get("backend"):
            raise UsageError(f"incoming mirror {source}/{mirror} is kept in RBD; promote of an "
                             "RBD mirror is not supported yet: clone its last snapshot "
                             "(rbd clone POOL/IMAGE@cyclemirror-N ...) with Ceph's tools")
        m = Mirror(os.path.dirname(path), state, path, MAX_CHUNK)
        try:
            if m.state.pending is not None:
                log.info("promote %s/%s: discarding half-received cycle %d", source, mirror,
                         m.state.pending.cycle)
                m._discard_pending()
            if not m.has_image:
                raise NotFoundError(f"incoming mirror {source}/{mirror} has no applied cycle "
                                    "yet: there is nothing to promote")
            st = m.state
            image = m.image_path(0)
            spec = st.volumes[0]
        finally:
            m.close()
        rec_lineage = lineage.recorded(st)
        old_epoch = rec_lineage["epoch"] if rec_lineage else roles.new_epoch()
        parent = roles.generation(old_epoch, st.applied_cycle)
        now = time.time()
        try:
            before = roles.load_role(root, name)  # a former primary of that name (failback)
        except Exception:  # noqa: BLE001 - a damaged old record must not block a failover
            before = None
        rec = roles.RoleRecord(
            volume=name, role=roles.PRIMARY, epoch=roles.new_epoch(), parent=parent,
            promoted_from={"source_node": node, "source_name": st.source_name,
                           "mirror": mirror, "generation": parent, "cycle": st.applied_cycle,
                           "freeze_time": st.freeze_time, "forced": bool(force),
                           "time": now},
            kept=list(before.kept) if before is not None else [], changed=now)
        roles.save_role(root, rec)  # the promotion is recorded: the source is demoted
        work = os.path.join(os.path.dirname(path), WORK_PREFIX + mirror)
        _drop_mirror_files(path, st)
        vol = store.adopt_image(name, image, spec.block_size, st.applied_cycle, work)
    finally:
        if registry is not None:
            registry.release(key, hold)
    seconds = time.monotonic() - t0
    log.warning("promoted incoming mirror %s/%s to volume %s%s: generation %s:%d, branched "
                "from %s (%.3fs); the source is demoted", source, mirror, name,
                " (forced, the source was connected)" if connected else
                (" (forced)" if force else ""), rec.epoch, st.applied_cycle, parent, seconds)
    return {"volume": name, "source_node": node, "source_name": st.source_name,
            "mirror": mirror, "cycle": st.applied_cycle, "freeze_time": st.freeze_time,
            "generation": roles.generation(rec.epoch, st.applied_cycle), "parent": parent,
            "forced": bool(force), "source_was_connected": connected, "size": vol.size,
            "block_size": vol.block_size, "seconds": seconds, "resumed": False}


def _drop_mirror_files(state_path: str, st: MirrorState) -> None:
    """The mirror's state and leftovers (the image itself is moved by the caller)."""
    directory = os.path.dirname(state_path)
    prefix = st.mirror + ".staging"
    vol = st.volumes[0].name
    for entry in os.listdir(directory):
        if (entry in (f"{vol}.img.new", f"{vol}.img.apply", f"{vol}.scrub",
                      f"{vol}.scrub.json")
                or entry == prefix or (entry.startswith(prefix + ".")
                                       and entry[len(prefix) + 1:].isdigit())):
            os.unlink(os.path.join(directory, entry))
    # Last: without it the image is no longer an incoming mirror (status, exports).
    os.unlink(state_path)


def _resume(store, source: str, mirror: str, as_name: str | None) -> dict | None:
    """Finish a promotion a crash cut short (its role record exists, its volume not)."""
    root = os.fspath(store.path)
    records, _problems = roles.all_roles(root)
    for rec in records:
        p = rec.promoted_from
        if (p is None or p["mirror"] != mirror or source not in (p["source_node"],
                                                                  p["source_name"])
                or (as_name and rec.volume != as_name)):
            continue
        if rec.volume in store.list_volumes():
            continue  # done: promoting again is refused below (the image is gone)
        directory = os.path.join(root, "mirrors", p["source_node"])
        work = os.path.join(directory, WORK_PREFIX + mirror)
        state_path = os.path.join(directory, mirror + ".state.json")
        image = os.path.join(directory, mirror + ".img")
        block_size = 4096
        if os.path.exists(state_path):
            st = MirrorState.load(state_path)
            block_size = st.volumes[0].block_size
            _drop_mirror_files(state_path, st)
        elif os.path.exists(os.path.join(work, "volume.json")):
            import json

            with open(os.path.join(work, "volume.json")) as f:
                block_size = json.load(f).get("block_size", 4096)
        if not (os.path.exists(image) or os.path.exists(os.path.join(work, "base.img"))):
            raise NotFoundError(f"the promotion of {source}/{mirror} to {rec.volume} was cut "
                                "short and its image is gone; restore it from a backup")
        vol = store.adopt_image(rec.volume, image, block_size, p["cycle"], work)
        log.warning("finished the promotion of %s/%s to volume %s cut short before",
                    source, mirror, rec.volume)
        return {"volume": rec.volume, "source_node": p["source_node"],
                "source_name": p["source_name"], "mirror": mirror, "cycle": p["cycle"],
                "freeze_time": p["freeze_time"],
                "generation": roles.generation(rec.epoch, p["cycle"]), "parent": rec.parent,
                "forced": p["forced"], "source_was_connected": False, "size": vol.size,
                "block_size": vol.block_size, "seconds": 0.0, "resumed": True}
    return None


def serve_switchover(session, msg: dict) -> None:
    """The target's half of a planned switchover (daemon/switchover.py): the source asks,
    between cycles, after its final cycle ``msg['cycle']`` was applied here.

    The session lets go of the mirror, promotes it (not forced: the source asked and
    holds its writes), answers ``switched`` and hands ``back_to`` to the daemon, which
    starts mirroring the new volume back to the old source."""
    mirror = session.mirror
    st = mirror.state
    if st.group:
        raise ProtocolError(f"switchover of group {st.mirror!r}: not built yet")
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
    session.link.send_message("switched", volume=result["volume"],
                              generation=result["generation"], epoch=result["generation"]
                              .split(":")[0])
    hook = getattr(server, "on_switchover", None)
    if hook is not None:
        hook(result, back_to)
