"""Turning volumes back into a mirror image, no copy, crash-safe: an intent first.

Two verbs end the same way: the old primary's failback (``receiver.resync``:
its demoted volume or group becomes the new primary's image of their common
cycle *k*) and a split brain lost by the new primary (``receiver.discard``:
its promoted volume or group becomes the old primary's image of *k* again).
For each member: overlays older than *k* are merged (base = the image of
cycle *k*), the blocks written since *k* are kept in ``STORE/kept/`` (never
dropped silently), base is renamed to the mirror image; then the mirror state
is written and the role records become ``secondary``.

That is many files, and a kill -9 between two of them must not leave a group
half turned, an image without its state or a volume without its base.  So
``turn_back`` first writes the whole intent, ``STORE/turnback/<node>.<mirror>
.json`` (the mirror state it will write, the members' volume names, *k*):
that is the commit point.  Every step after it can be done again harmlessly:

* a member whose volume still has its base is merged, kept (the same file,
  rewritten) and its base renamed to the image;
* a member whose base is the image already loses its volume directory;
* the mirror state is written if it is not there, the outgoing state and role
  records again; the intent goes last.

``finish_cut`` (at the daemon's start, before the target or NBD serve
anything) finishes every intent it finds, so after a crash the volumes are
either untouched (no intent: only checks had run) or turned back whole.
The failpoints ``turnback.checked`` (before the commit point),
``turnback.recorded`` (after it), ``turnback.released`` (after each member's
base became its image) and ``turnback.committed`` (after the mirror state,
before the role records) let tests kill -9 the daemon there.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from cyclemirror import failpoints
from cyclemirror.errors import CycleMirrorError, IntegrityError
from cyclemirror.receiver import fileops
from cyclemirror.receiver.state import MirrorState
from cyclemirror.store import roles
from cyclemirror.store.names import validate_volume_name
from cyclemirror.store.volume import BASE_FILE

log = logging.getLogger(__name__)
INTENT_DIR = "turnback"
INTENT_KEY = "turnback"
KEPT_DIR = "kept"
COPY_STEP = 8 << 20


def intent_path(root: str, node: str, mirror: str) -> str:
    return os.path.join(root, INTENT_DIR, f"{node}.{mirror}.json")


def state_path(root: str, st: MirrorState) -> str:
    return os.path.join(root, "mirrors", st.source_node,
                        st.mirror + (".group.json" if st.group else ".state.json"))


def turn_back(store, st: MirrorState, volumes: list[str], release, what: str) -> list[dict]:
    """Turn ``volumes`` (in the order of ``st.volumes``, whose names are the images') into
    the mirror ``st`` at its applied cycle *k*; ``release(volume)`` lets the daemon let go
    of each first.  Returns the kept files' records.  Checks must have run: from the
    intent on, the job is finished, now or at the next start."""
    root = os.fspath(store.path)
    if len(volumes) != len(st.volumes):
        raise ValueError("one volume per member of the mirror state")
    log.info("%s: checked; recording the turn-back into mirror %s/%s at cycle %d", what,
             st.source_node, st.mirror, st.applied_cycle)
    failpoints.hit("turnback.checked")
    intent = MirrorState(mirror=st.mirror, group=st.group, source_node=st.source_node,
                         source_name=st.source_name, volumes=list(st.volumes),
                         applied_cycle=st.applied_cycle, freeze_time=st.freeze_time,
                         extra={**st.extra, INTENT_KEY: {"volumes": list(volumes),
                                                          "what": what[:200]}})
    directory = os.path.join(root, INTENT_DIR)
    os.makedirs(directory, exist_ok=True)
    path = intent_path(root, st.source_node, st.mirror)
    steps = {"start": time.monotonic()}
    # An NBD client still connected to a member writes into the overlays until the
    # volume is closed: a write after the kept copy was taken would be acknowledged and
    # then deleted with the volume.  So writes are refused (EPERM, saying why) from here,
    # once those in flight have landed; each acknowledged one is in the kept file.
    held = _hold_writes(store, volumes, what, st)
    try:
        intent.save(path)  # the commit point (written whole and durably, directory included)
    except BaseException:
        for vol in held:
            vol.release_writes()  # nothing changed: the volumes take writes again
        raise
    steps["intent"] = time.monotonic()
    failpoints.hit("turnback.recorded")
    for volume in volumes:
        release(volume)
    steps["release"] = time.monotonic()
    kept = _finish(store, path, intent, steps)
    log.info("%s: turned back in %s", what, ", ".join(
        f"{name} {at - before:.3f}s" for (name, at), before in
        zip(list(steps.items())[1:], list(steps.values())[:-1], strict=True)))
    return kept


def _hold_writes(store, volumes: list[str], what: str, st: MirrorState) -> list:
    """Refuse every write to ``volumes`` from now on (``Volume.hold_writes``); returns
    the volumes held."""
    held = []
    image = f"{st.source_name or st.source_node}/{st.mirror}"
    try:
        for volume in volumes:
            vol = store.open_volume(volume)
            vol.hold_writes(f"{what}: this volume becomes mirror image {image} of cycle "
                            f"{st.applied_cycle} (docs/failover.md)")
            held.append(vol)
    except BaseException:
        for vol in held:
            vol.release_writes()
        raise
    return held


def _finish(store, path: str, intent: MirrorState, steps: dict | None = None) -> list[dict]:
    """Every step after the commit point, each safe to do again (module doc); ``steps``
    gets the instant each ended (for the log)."""
    steps = {} if steps is None else steps
    root = os.fspath(store.path)
    plan = intent.extra[INTENT_KEY]
    volumes, k = plan["volumes"], intent.applied_cycle
    ndir = os.path.join(root, "mirrors", intent.source_node)
    os.makedirs(ndir, exist_ok=True)
    kept_all = []
    for volume, spec in zip(volumes, intent.volumes, strict=True):
        kept = _member(store, volume, os.path.join(ndir, spec.name + ".img"), k)
        if kept is not None:
            kept_all.append(kept)
        failpoints.hit("turnback.released")
    steps["members"] = time.monotonic()
    target = state_path(root, intent)
    if not os.path.exists(target):
        extra = {key: value for key, value in intent.extra.items() if key != INTENT_KEY}
        MirrorState(mirror=intent.mirror, group=intent.group, source_node=intent.source_node,
                    source_name=intent.source_name, volumes=list(intent.volumes),
                    applied_cycle=k, freeze_time=intent.freeze_time,
                    extra=extra).save(target)  # durably, with the images renamed before
    steps["state"] = time.monotonic()
    failpoints.hit("turnback.committed")
    for volume in volumes:
        shutil.rmtree(os.path.join(root, "outgoing", volume), ignore_errors=True)
        rec = roles.load_role(root, volume)
        if rec is not None and (rec.role, rec.discard_on) != (roles.SECONDARY, None):
            rec.role, rec.discard_on, rec.changed = roles.SECONDARY, None, time.time()
            roles.save_role(root, rec)
    os.unlink(path)
    # Durably gone: an intent a crash brought back after the images moved on (promoted
    # again, say) would turn them back once more.
    fileops.fsync_dir(os.path.dirname(path))
    steps["roles"] = time.monotonic()
    return kept_all


def _member(store, volume: str, image: str, k: int) -> dict | None:
    """One member: merged to cycle *k*, its writes since kept, its base renamed to
    ``image``; a member a crash left with its base renamed already is finished."""
    root = os.fspath(store.path)
    vol_dir = os.path.join(root, "volumes", volume)
    has_base = os.path.exists(os.path.join(vol_dir, BASE_FILE))
    if not has_base:
        if not os.path.exists(image):
            raise IntegrityError(f"turning volume {volume} back into mirror image {image}: "
                                 f"neither its base nor the image exists; restore the volume "
                                 "from a backup")
        if os.path.isdir(vol_dir):
            store.release_base(volume, image)  # the base is there already: the rest goes
        return None
    vol = store.open_volume(volume)
    vol.merge_through(k - 1)  # base becomes the image of cycle k (a no-op if it is)
    divergent = vol.dirty_since(k)
    if divergent is None:  # checked before the commit point; merges never go past k - 1
        raise IntegrityError(f"volume {volume}: cycle {k} was merged away while it was "
                             "turned back into a mirror image; the turn-back cannot finish")
    kept = None
    if divergent.count():
        rec = roles.load_role(root, volume)
        kept = keep(root, vol, divergent, rec.epoch if rec else "unknown", k)
        if rec is not None:
            rec.kept = [kp for kp in rec.kept if kp.get("path") != kept["path"]] + [kept]
            rec.kept = rec.kept[-roles.MAX_KEPT:]
            rec.changed = time.time()
            roles.save_role(root, rec)
    store.release_base(volume, image)
    return kept


def keep(root: str, vol, divergent, epoch: str, k: int) -> dict:
    """Copy the divergent blocks (as the view reads them now) into a sparse kept file."""
    directory = os.path.join(root, KEPT_DIR)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{vol.name}-{epoch}-{k}.img")
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, vol.size)
        bs = vol.block_size
        for start, count in divergent.iter_runs():
            offset, end = start * bs, (start + count) * bs
            while offset < end:
                n = min(COPY_STEP, end - offset)
                fileops.pwrite_all(fd, vol.read(offset, n), offset)
                offset += n
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fileops.fsync_dir(directory)
    blocks = divergent.count()
    return {"path": path, "blocks": blocks, "bytes": blocks * vol.block_size,
            "generation": roles.generation(epoch, k), "time": time.time()}


def load_intent(path: str) -> MirrorState:
    """An intent file, checked: a mirror state plus the members' volume names."""
    intent = MirrorState.load(path)  # checksum and fields; damage is an IntegrityError
    plan = intent.extra.get(INTENT_KEY)
    if (not isinstance(plan, dict) or not isinstance(plan.get("volumes"), list)
            or len(plan["volumes"]) != len(intent.volumes)
            or not all(isinstance(v, str) for v in plan["volumes"])
            or not isinstance(plan.get("what"), str) or intent.applied_cycle < 1):
        raise IntegrityError(f"turn-back intent {path}: damaged (no member list matching "
                             "its mirror state); look at the daemon log, the volumes it "
                             "names are left as they are")
    try:
        for volume in plan["volumes"]:
            validate_volume_name(volume)
        for spec in intent.volumes:
            validate_volume_name(spec.name)
    except CycleMirrorError as exc:
        raise IntegrityError(f"turn-back intent {path}: {exc}") from None
    if os.path.basename(path) != f"{intent.source_node}.{intent.mirror}.json":
        raise IntegrityError(f"turn-back intent {path}: it names mirror {intent.source_node}/"
                             f"{intent.mirror}, not the one its file name says")
    return intent


def finish_cut(store, release) -> list[dict]:
    """At the daemon's start: finish every turn-back a crash cut short after its commit
    point (``release(volume)`` drops what the daemon still defines for the volume, such
    as its outgoing mirrors).  One result per intent; errors are logged, the intent and
    its volumes left for a person to look at."""
    root = os.fspath(store.path)
    directory = os.path.join(root, INTENT_DIR)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    done = []
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(".") or not name.endswith(".json"):
            continue
        try:
            intent = load_intent(path)
            volumes = intent.extra[INTENT_KEY]["volumes"]
            for volume in volumes:
                release(volume)
            kept = _finish(store, path, intent)
        except (CycleMirrorError, OSError) as exc:
            log.error("a turn-back into mirror image was cut short and cannot be finished: "
                      "%s (intent %s)", exc, path)
            continue
        log.warning("finished %s cut short by a crash: %s %s now mirror %s/%s at cycle %d%s",
                    intent.extra[INTENT_KEY]["what"], ", ".join(volumes),
                    "are" if len(volumes) > 1 else "is", intent.source_name
                    or intent.source_node, intent.mirror, intent.applied_cycle,
                    f"; kept {', '.join(kp['path'] for kp in kept)}" if kept else "")
        done.append({"volumes": volumes, "mirror": intent.mirror,
                     "source_node": intent.source_node, "cycle": intent.applied_cycle,
                     "kept": kept})
    return done
