"""Failback of a file object on the old source: its snapshot of the common cycle becomes
the new primary's mirror image.

A file object's mirror promoted on a target becomes a volume there
(``receiver.promote``), with the old source's generation ``E:k`` as its parent.
Mirrored back here (``mirror start NAME --to THIS-NODE`` there) its ``lineage``
names that parent; ``receiver.resync.prepare`` hands the open to ``prepare``
when ``NAME`` is a file object here of epoch ``E`` (demoted, or primary and not
yet told) and no such incoming mirror exists yet.  The file object still has
its reflink snapshot of cycle *k* (the base it kept for its next delta), which
is exactly the image the new primary was promoted from, so:

1. the snapshot of cycle *k* must be there, frozen at the time the lineage
   names (else ``ProtocolError``, nothing changed: remove the file object to
   take a full copy), and the sizes must agree;
2. what this node wrote after *k*: a freeze now, and the blocks that differ
   between the two snapshots (their extent maps, ``FileObject.changed_between``).
   Both sides written since *k* is split brain: refused (``SplitBrainError``)
   unless the user named this node to lose (``mirror resolve NAME
   --discard-changes-on THIS-NODE`` on the new primary), as for a volume;
3. the daemon lets go of the file object (``server.on_failback``: its outgoing
   mirrors stop and are removed);
4. the intent ``STORE/filefailback/<new primary>.NAME.json`` is written: the
   mirror state to make (applied cycle *k* of the new epoch), the snapshot it
   is made from, the live file and the name it is kept under.  That is the
   commit point; every step after it is skipped when done, or done again
   harmlessly, so ``finish`` runs again at the daemon's start after a crash
   (``finish_cut``, before the target serves):
   a. if the mirror state is not there: the mirror image ``mirrors/<new
      primary>/NAME.img`` is made a reflink clone of the snapshot of *k* (a copy
      where the store is on another file system) and the state written;
   b. the live file is renamed aside, whole, ``PATH.kept-<k>-<unix time>`` (it
      holds whatever this node wrote after *k*; never deleted);
   c. the file object is removed (record and snapshots) with its outgoing
      state;
   d. the role record lists the kept file and says ``secondary``;
   e. the intent goes, durably.

The failpoints ``filefailback.checked`` (before the commit point),
``.recorded``, ``.imaged``, ``.kept`` and ``.removed`` (after each step) let
``tests/test_file_failback_crash.py`` kill -9 the daemon there.

The new primary's driver was seeded with the blocks written since the promotion
(``sender.failback``), so its first cycle is a delta of exactly those.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from cyclemirror import failpoints
from cyclemirror.errors import CycleMirrorError, IntegrityError, ProtocolError, SplitBrainError
from cyclemirror.receiver import fileops
from cyclemirror.receiver.lineage import LINEAGE_KEY
from cyclemirror.receiver.state import MirrorState, VolumeSpec
from cyclemirror.receiver.treeops import _clone_or_copy
from cyclemirror.store import roles
from cyclemirror.store.names import validate_volume_name

log = logging.getLogger(__name__)
INTENT_DIR = "filefailback"
INTENT_KEY = "filefailback"


def prepare(server, open_msg: dict, msg: dict, rec: roles.RoleRecord, k: int) -> dict:
    """Turn file object ``open_msg['mirror']`` into the new primary's image of cycle ``k``
    (see the module's docstring)."""
    store = server.store
    root = os.fspath(store.path)
    name, source = open_msg["mirror"], open_msg["node_id"]
    who = open_msg["node_name"] or source
    me = server.node_name or server.node_id
    spec = open_msg["volumes"][0]
    obj = store.open_file(name)
    what = f"failback of file object {name} from {who}"
    if (spec["size"], spec["block_size"]) != (obj.size, obj.block_size):
        raise ProtocolError(f"{what}: it sends {spec['size']} bytes in blocks of "
                            f"{spec['block_size']}, the file here has {obj.size} in blocks "
                            f"of {obj.block_size}")
    kept_snap = obj.snapshot_of(k)
    if kept_snap is None or kept_snap[1] != msg["parent_freeze_time"]:
        raise ProtocolError(
            f"{what}: it branched from cycle {k} (frozen at {msg['parent_freeze_time']}) of "
            f"this file, whose snapshot is gone here (snapshots: "
            f"{', '.join(obj.snapshot_names()) or 'none'}); nothing was changed. Remove the "
            f"file object here ('cyclemirror mirror rm {name}', 'cyclemirror file rm "
            f"{name}'; the file stays) to take a full copy")
    m = obj.freeze().number  # what the live file holds now
    divergent = obj.changed_between(k, m)
    mine = divergent.count() * obj.block_size
    theirs = msg["written_blocks"] * obj.block_size
    if mine and theirs and msg["discard_on"] != server.node_id:
        loser = me if me != who else server.node_id  # two nodes of one name: by node id
        raise SplitBrainError(
            f"split brain on file object {name}: {me} (this node, the old primary) wrote "
            f"{mine} bytes after their last common cycle {msg['parent']}, and {who} (the "
            f"new primary) wrote {theirs} bytes since its promotion; nothing was changed. "
            f"Name the side whose changes lose: on {who} run 'cyclemirror mirror resolve "
            f"{name} --discard-changes-on {loser}' and resume the mirror ({me}'s file is "
            f"then kept whole beside it, at {obj.path}.kept-{k}-<time>)")
    if server.on_failback is not None:
        server.on_failback(name)  # the daemon lets go: its outgoing mirrors stop
    now = time.time()
    kept = {"path": f"{obj.path}.kept-{k}-{int(now)}", "blocks": divergent.count(),
            "bytes": mine, "generation": roles.generation(rec.epoch, k), "time": now}
    intent = MirrorState(mirror=name, group=False, source_node=source,
                         source_name=open_msg["node_name"],
                         volumes=[VolumeSpec(name, obj.size, obj.block_size)],
                         applied_cycle=k, freeze_time=msg["parent_freeze_time"],
                         extra={LINEAGE_KEY: {"epoch": msg["epoch"], "parent": msg["parent"],
                                              "since": now},
                                INTENT_KEY: {"snapshot": kept_snap[0], "live": obj.path,
                                             "kept": kept, "who": str(who)[:200]}})
    log.info("failback of file object %s from %s: checked; recording its intent", name, who)
    failpoints.hit("filefailback.checked")
    path = intent_path(root, source, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    intent.save(path)  # the commit point: from here the failback is finished, now or at start
    return finish(store, path, intent)


def intent_path(root: str, source: str, name: str) -> str:
    return os.path.join(root, INTENT_DIR, f"{source}.{name}.json")


def load_intent(path: str) -> MirrorState:
    """An intent file, checked: a mirror state plus what the failback keeps."""
    intent = MirrorState.load(path)  # checksum and fields; damage is an IntegrityError
    plan = intent.extra.get(INTENT_KEY)
    kept = plan.get("kept") if isinstance(plan, dict) else None
    ok = (isinstance(plan, dict) and isinstance(kept, dict)
          and all(isinstance(plan.get(key), str) and os.path.isabs(plan[key])
                  for key in ("snapshot", "live"))
          and isinstance(kept.get("path"), str)
          and kept["path"].startswith(plan["live"] + ".kept-") and "/" not in kept["path"][
              len(plan["live"]):]
          and all(type(kept.get(key)) is int and kept[key] >= 0 for key in ("blocks", "bytes"))
          and isinstance(plan.get("who"), str)
          and len(intent.volumes) == 1 and intent.volumes[0].name == intent.mirror
          and intent.applied_cycle >= 1 and not intent.group
          and os.path.basename(path) == f"{intent.source_node}.{intent.mirror}.json")
    if not ok:
        raise IntegrityError(f"file object failback intent {path}: damaged; look at the "
                             "daemon log, the file object it names is left as it is")
    try:
        validate_volume_name(intent.mirror)
    except CycleMirrorError as exc:
        raise IntegrityError(f"file object failback intent {path}: {exc}") from None
    return intent


def finish(store, path: str, intent: MirrorState) -> dict:
    """Every step after the commit point, each skipped (or done again harmlessly) when a
    crash left it done."""
    t0 = time.monotonic()
    root = os.fspath(store.path)
    plan = intent.extra[INTENT_KEY]
    name, k, kept = intent.mirror, intent.applied_cycle, plan["kept"]
    failpoints.hit("filefailback.recorded")
    ndir = os.path.join(root, "mirrors", intent.source_node)
    os.makedirs(ndir, exist_ok=True)
    state_path = os.path.join(ndir, name + ".state.json")
    if not os.path.exists(state_path):
        image = os.path.join(ndir, name + ".img")
        tmp = image + ".failback-tmp"
        try:
            sfd = os.open(plan["snapshot"], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise IntegrityError(f"failback of file object {name}: its snapshot of cycle {k} "
                                 f"({plan['snapshot']}) is gone before it became the mirror "
                                 "image; remove the intent and the file object to take a "
                                 "full copy") from None
        try:
            dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600)
            try:
                _clone_or_copy(sfd, dfd)  # a reflink where the store shares the file system
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        os.replace(tmp, image)
        extra = {key: value for key, value in intent.extra.items() if key != INTENT_KEY}
        MirrorState(mirror=name, group=False, source_node=intent.source_node,
                    source_name=intent.source_name, volumes=list(intent.volumes),
                    applied_cycle=k, freeze_time=intent.freeze_time,
                    extra=extra).save(state_path)  # its directory's fsync: the image's too
    failpoints.hit("filefailback.imaged")
    live = plan["live"]
    if os.path.lexists(live) and not os.path.lexists(kept["path"]):
        os.rename(live, kept["path"])  # the live file, kept whole for the user
        fileops.fsync_dir(os.path.dirname(live))
    failpoints.hit("filefailback.kept")
    if name in store.list_files():
        store.remove_file(name)
    shutil.rmtree(os.path.join(root, "outgoing", name), ignore_errors=True)
    failpoints.hit("filefailback.removed")
    rec = roles.load_role(root, name)
    if rec is not None:
        rec.kept = [kp for kp in rec.kept if kp.get("path") != kept["path"]] + [kept]
        rec.kept = rec.kept[-roles.MAX_KEPT:]
        rec.role, rec.discard_on, rec.changed = roles.SECONDARY, None, time.time()
        roles.save_role(root, rec)
    os.unlink(path)
    fileops.fsync_dir(os.path.dirname(path))  # durably gone: it must not run twice
    log.warning("failback of file object %s from %s: its snapshot of cycle %d is now the "
                "mirror image (generation %s), no copy (%.3fs); the file as this node left it "
                "(%d bytes written after cycle %d) is kept at %s until you delete it", name,
                plan["who"], k, intent.extra[LINEAGE_KEY]["parent"], time.monotonic() - t0,
                kept["bytes"], k, kept["path"])
    return {"cycle": k, "kept": kept["path"]}


def finish_cut(store, release) -> list[dict]:
    """At the daemon's start, before the target serves: finish every file object failback a
    crash cut short after its commit point (``release(name)`` drops the file object's
    outgoing mirror definitions).  Errors are logged, the intent left for a person."""
    directory = os.path.join(os.fspath(store.path), INTENT_DIR)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    done = []
    for entry in names:
        if entry.startswith(".") or not entry.endswith(".json"):
            continue
        path = os.path.join(directory, entry)
        try:
            intent = load_intent(path)
            release(intent.mirror)
            result = finish(store, path, intent)
        except (CycleMirrorError, OSError) as exc:
            log.error("a file object's failback was cut short and cannot be finished: %s "
                      "(intent %s)", exc, path)
            continue
        log.warning("finished the failback of file object %s cut short by a crash: it is "
                    "mirror %s/%s at cycle %d; kept %s", intent.mirror, intent.source_name
                    or intent.source_node, intent.mirror, result["cycle"], result["kept"])
        done.append(result)
    return done
