"""Failback on the old primary: its demoted volume becomes the new primary's mirror image.

When a new primary (a promoted volume, ``lineage.parent`` = ``E:k``) opens a
mirror here and this store has no such mirror yet but holds the volume of epoch
``E`` (demoted, or primary and not yet told), no full copy is needed: the
volume as of its freeze *k* is exactly the image the new primary branched from.

``prepare(server, open_msg, lineage_msg)``:

1. The daemon lets go of the volume (``server.on_failback``: its outgoing
   mirrors are removed, NBD connections closed).
2. Overlays older than *k* are merged, so base is the image of cycle *k*.
3. The blocks this host wrote after freeze *k* (overlays *k* and newer) are
   its divergent writes.  If the new primary wrote too (``written_blocks``)
   that is split brain: refused (``SplitBrainError``, naming both sides and
   their divergent bytes) unless the user named this node to lose
   (``discard_on``).  Divergent writes are never dropped silently: they are
   first copied to ``STORE/kept/<volume>-<epoch>-<k>.img`` (a sparse file of
   the volume's size holding only those blocks; the role record and status
   list it) and stay there until the user removes the file.
4. base.img is renamed to the mirror image ``mirrors/<new primary>/<v>.img``,
   the mirror state written with applied cycle *k* and the new epoch, the
   volume's directory, its outgoing state and overlays dropped.  The role
   record becomes ``secondary`` (keeping its history and the kept files).

Steps 1, 2 and 4 and the kept copy of step 3 are ``receiver.turnback``:
after the checks it records its intent first, so a kill -9 anywhere leaves the
volume untouched or, at the daemon's next start, turned back whole.

A file object of epoch ``E`` fails back the same way, through an intent of its
own, from its reflink snapshot of cycle *k* (``receiver.filefailback``).

The new primary then ships, as a delta, only the blocks it wrote since the
promotion (``sender.failback`` seeds its owed set).  The image stays the
image of cycle *k* until that delta applies atomically: consistent throughout.

A consistency group (``prepare_group``) fails back whole: the group's mirror
names its members, each of which must be a volume here of the parent epoch
(the members of a group share one, ``store.roles.group_records``), each is
checked as above before anything changes, the split-brain question is asked
of the group (its divergent bytes summed), and then every member in turn is
merged to cycle *k*, its divergent blocks kept, and renamed into the group's
mirror; the group's mirror state, written after them, records them all at the
one group cycle *k* (one intent covers the group: never half turned).
"""

from __future__ import annotations

import logging
import os
import time

from cyclemirror.errors import ProtocolError, SplitBrainError
from cyclemirror.receiver import turnback
from cyclemirror.receiver.lineage import LINEAGE_KEY
from cyclemirror.receiver.state import MirrorState, VolumeSpec
from cyclemirror.store import roles

log = logging.getLogger(__name__)
KEPT_DIR = turnback.KEPT_DIR


def prepare(server, open_msg: dict, msg: dict) -> dict | None:
    """Turn the local volume into the new primary's image if this is a failback; None if
    it is not one (the usual open then follows)."""
    store = getattr(server, "store", None)
    if store is None or not msg["parent"]:
        return None
    if open_msg["group"]:
        return prepare_group(server, open_msg, msg)
    root = os.fspath(store.path)
    source = open_msg["node_id"]
    name = open_msg["mirror"]
    if os.path.exists(os.path.join(root, "mirrors", source, name + ".state.json")):
        return None
    rec = roles.load_role(root, name)
    if rec is None or rec.role == roles.SECONDARY:
        return None
    epoch, k = roles.parse_generation(msg["parent"], "lineage parent")
    if epoch == rec.epoch and name in store.list_files():  # a file object's failback
        from cyclemirror.receiver.filefailback import prepare as prepare_file

        return prepare_file(server, open_msg, msg, rec, k)
    if epoch != rec.epoch or name not in store.list_volumes():
        return None
    who = open_msg["node_name"] or source
    me = server.node_name or server.node_id
    spec = open_msg["volumes"][0]
    vol, divergent = _member_checked(store, name, rec, k, who, me, spec)
    mine = divergent.count() * vol.block_size
    theirs = msg["written_blocks"] * vol.block_size
    if mine and theirs and msg["discard_on"] != server.node_id:
        raise SplitBrainError(
            f"split brain on volume {name}: {me} (this node, the old primary) wrote "
            f"{mine} bytes after their last common cycle {msg['parent']}, and {who} (the new "
            f"primary) wrote {theirs} bytes since its promotion; nothing was changed. Name "
            f"the side whose changes lose: on {who} run 'cyclemirror mirror resolve {name} "
            f"--discard-changes-on {me}' and resume the mirror ({me}'s changes are then kept "
            f"in a file under {os.path.join(root, KEPT_DIR)}), or keep {me}'s changes: on "
            f"{who} run 'cyclemirror mirror resolve {name} --discard-changes-on {who}', then "
            f"'cyclemirror mirror reinstate {name}' here")
    t0 = time.monotonic()
    state = MirrorState(mirror=name, group=False, source_node=source,
                        source_name=open_msg["node_name"],
                        volumes=[VolumeSpec(name, spec["size"], spec["block_size"])],
                        applied_cycle=k, freeze_time=msg["parent_freeze_time"],
                        extra={LINEAGE_KEY: {"epoch": msg["epoch"], "parent": msg["parent"],
                                             "since": time.time()}})
    kept = turnback.turn_back(store, state, [name], _releaser(server),
                              f"the failback of {name} from {who}")
    kept = kept[0] if kept else None
    log.warning("failback of %s from %s: this volume is now its mirror image as of cycle %d "
                "(generation %s), no copy (%.3fs)%s", name, who, k, msg["parent"],
                time.monotonic() - t0,
                f"; this node's {kept['bytes']} divergent bytes are kept in {kept['path']}"
                if kept else "")
    return {"cycle": k, "kept": kept}


def _releaser(server):
    """The daemon's hook that lets go of a volume (outgoing mirrors, NBD), or none."""
    hook = server.on_failback
    return hook if hook is not None else (lambda _volume: None)


def _member_checked(store, name, rec, k, who, me, spec):
    """A volume (or a group member), checked for a failback to cycle ``k`` of its epoch;
    the volume and its divergent blocks."""
    vol = store.open_volume(name)
    if (spec["size"], spec["block_size"]) != (vol.size, vol.block_size):
        raise ProtocolError(f"failback of {name} from {who}: it sends {spec['size']} bytes in "
                            f"blocks of {spec['block_size']}, the volume here has {vol.size} "
                            f"in blocks of {vol.block_size}")
    if not 1 <= k <= vol.open_overlay:
        raise ProtocolError(f"failback of {name} from {who}: it says it branched from cycle "
                            f"{k} of epoch {rec.epoch}, but this volume froze only "
                            f"{vol.open_overlay} cycles: they share no cycle")
    divergent = vol.dirty_since(k)
    if divergent is None:
        raise ProtocolError(
            f"failback of {name} from {who}: cycle {k} was merged here already (another "
            f"target of {me} applied a newer cycle), so this volume cannot be turned back "
            "into the image of that cycle; remove the volume here to take a full copy")
    return vol, divergent


def prepare_group(server, open_msg: dict, msg: dict) -> dict | None:
    """``prepare`` for a consistency group's mirror: every member or none (module doc)."""
    store = server.store
    root = os.fspath(store.path)
    source = open_msg["node_id"]
    name = open_msg["mirror"]
    if os.path.exists(os.path.join(root, "mirrors", source, name + ".group.json")):
        return None
    epoch, k = roles.parse_generation(msg["parent"], "lineage parent")
    specs = open_msg["volumes"]
    existing = set(store.list_volumes())
    recs = {}
    for spec in specs:
        rec = roles.load_role(root, spec["name"]) if spec["name"] in existing else None
        if rec is not None and rec.role != roles.SECONDARY and rec.epoch == epoch:
            recs[spec["name"]] = rec
    if not recs:
        return None  # none of ours: a new group mirror (a full copy)
    who = open_msg["node_name"] or source
    me = server.node_name or server.node_id
    if len(recs) != len(specs):
        lacking = [s["name"] for s in specs if s["name"] not in recs]
        raise ProtocolError(
            f"failback of group mirror {name} from {who}: it branched from generation "
            f"{msg['parent']} of this node's group ({', '.join(sorted(recs))}), but "
            f"{', '.join(lacking)} {'are' if len(lacking) > 1 else 'is'} not a volume of that "
            "generation here: the group cannot be turned back into one instant; nothing "
            f"was changed. Mirror the group from {who} without those members, or remove "
            "the group's volumes here to take a full copy")
    checked = [(spec, recs[spec["name"]],
                *_member_checked(store, spec["name"], recs[spec["name"]], k, who, me,
                                  spec)) for spec in specs]
    bs = checked[0][2].block_size
    mine = sum(div.count() * vol.block_size for _s, _r, vol, div in checked)
    theirs = msg["written_blocks"] * bs
    members = ", ".join(spec["name"] for spec in specs)
    if mine and theirs and msg["discard_on"] != server.node_id:
        raise SplitBrainError(
            f"split brain on group {group_label(name)} ({members}): {me} (this node, the old "
            f"primary) wrote {mine} bytes after their last common cycle {msg['parent']}, "
            f"and {who} (the new primary) wrote {theirs} bytes since its promotion; nothing "
            f"was changed. Name the side whose changes lose: on {who} run 'cyclemirror "
            f"mirror resolve {specs[0]['name']} --discard-changes-on {me}' (it names the "
            f"whole group) and resume the mirror ({me}'s changes are then kept in files "
            f"under {os.path.join(root, KEPT_DIR)}), or keep {me}'s changes: '... "
            f"--discard-changes-on {who}' there, then 'cyclemirror mirror reinstate "
            f"{specs[0]['name']}' here")
    t0 = time.monotonic()
    state = MirrorState(mirror=name, group=True, source_node=source,
                        source_name=open_msg["node_name"],
                        volumes=[VolumeSpec(s["name"], s["size"], s["block_size"])
                                 for s in specs],
                        applied_cycle=k, freeze_time=msg["parent_freeze_time"],
                        extra={LINEAGE_KEY: {"epoch": msg["epoch"], "parent": msg["parent"],
                                             "since": time.time()}})
    kept_all = turnback.turn_back(store, state, [s["name"] for s in specs],
                                  _releaser(server), f"the failback of group mirror {name} "
                                  f"from {who}")
    log.warning("failback of group mirror %s from %s: members %s are now its images as of "
                "group cycle %d (generation %s), no copy (%.3fs)%s", name, who, members, k,
                msg["parent"], time.monotonic() - t0,
                f"; this node's {mine} divergent bytes are kept in "
                f"{', '.join(kp['path'] for kp in kept_all)}" if kept_all else "")
    return {"cycle": k, "kept": kept_all}


def group_label(mirror: str) -> str:
    return roles.group_name_of(mirror)
