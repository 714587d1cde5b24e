"""Freezing several volumes of one store at one instant (a consistency group).

A group freeze must put every write to every member wholly before or wholly
after one instant, and a crash must leave either no member or every member
frozen.  How:

1. Take every member's ``_freeze_lock`` in name order (a fixed order, so two
   group freezes sharing a volume cannot deadlock), and create each member's
   next overlay files (the part of a freeze that does I/O and can fail).
2. Write the group intent ``STORE/groups/freeze-<id>.json`` (members and the
   overlay number each one opens), atomically and fsynced.
3. Take every member's ``_lock`` in name order: from here no write reaches
   any member.  Commit each member's freeze (its volume.json rename) with one
   freeze time, then release the locks.  No write can fall between two
   members' commits, because all the locks are held across all commits.
4. fsync the frozen overlays, then delete the intent.

Crash recovery (``recover_group_freezes``, run by ``Store.open`` before
anyone can write): an intent whose members are not all frozen is rolled
forward by freezing the missing ones.  That is exact: the process died
holding every member's lock from the first commit on (or before any commit),
so no write reached an unfrozen member after the instant the committed ones
were frozen.  The rolled-forward members take the committed members' freeze
time (or the recovery time when none had committed).

Test hook: ``_after_member_commit(name)`` runs after each member's commit
(the crash tests kill the process there).
"""

from __future__ import annotations

import logging
import os
import time
import uuid

from cyclemirror.errors import NotFoundError, StoreError, UsageError
from cyclemirror.store import fileops
from cyclemirror.store.names import validate_volume_name

GROUPS_DIR = "groups"
INTENT_PREFIX = "freeze-"
MAX_MEMBERS = 64  # what one group mirror may carry on the wire (docs/protocol.md)

log = logging.getLogger(__name__)
_after_member_commit = None  # test hook: callable(name) after each member's commit


def check_member_names(names) -> list[str]:
    """The members, validated and in the fixed lock order; UsageError says what is wrong."""
    if isinstance(names, str) or not hasattr(names, "__iter__"):
        raise UsageError(f"a group freeze takes a list of volume names, got {names!r}")
    names = [validate_volume_name(n) for n in names]
    if not 1 <= len(names) <= MAX_MEMBERS:
        raise UsageError(f"a group has 1 to {MAX_MEMBERS} volumes, got {len(names)}")
    if len(set(names)) != len(names):
        raise UsageError(f"group members {names} name a volume twice")
    return sorted(names)


def freeze_group(store, names, sync: bool = True) -> dict:
    """Freeze every named volume of ``store`` at one instant; return {name: FrozenCycle}.

    ``sync=False``: each frozen overlay's fsync is left to its cycle's ``sync()``."""
    order = check_member_names(names)
    vols = [store.open_volume(n) for n in order]
    gdir = os.path.join(store.path, GROUPS_DIR)
    intent = os.path.join(gdir, f"{INTENT_PREFIX}{uuid.uuid4().hex}.json")
    held, prepared, committed = [], [], []
    try:
        for vol in vols:
            vol._freeze_lock.acquire()
            held.append(vol)
        for vol in vols:
            prepared.append(vol._freeze_prepare())
        try:
            os.makedirs(gdir, exist_ok=True)
            fileops.atomic_write_json(intent, {
                "members": {v.name: new.number for v, new in zip(vols, prepared, strict=True)}})
        except OSError as exc:
            raise fileops.store_error(f"writing the group freeze intent {intent}", exc) from exc
        locked = []
        try:
            for vol in vols:
                vol._lock.acquire()
                locked.append(vol)
            now = time.time()
            for vol, new in zip(vols, prepared, strict=True):
                committed.append(vol._freeze_commit_locked(new, now))
                if _after_member_commit is not None:
                    _after_member_commit(vol.name)
        finally:
            for vol in reversed(locked):
                vol._lock.release()
        cycles = {}
        for vol, new, old in zip(vols, prepared, committed, strict=True):
            cycles[vol.name] = vol._freeze_finish(new.number, old, sync)
        _remove_intent(intent, gdir)
        return cycles
    except BaseException:
        if len(committed) not in (0, len(vols)):
            # Some members froze, some did not (a failed commit): the intent stays, and
            # the next open of the store freezes the rest at the same instant.
            log.error("group freeze of %s stopped after %d of %d members; the store "
                      "completes it when it is opened next", order, len(committed), len(vols))
        else:
            for new in prepared[len(committed):]:
                new.retire()
                new.unlink()
            if not committed:
                _remove_intent(intent, gdir, missing_ok=True)
        raise
    finally:
        for vol in reversed(held):
            vol._freeze_lock.release()


def _remove_intent(path: str, gdir: str, missing_ok: bool = False) -> None:
    try:
        os.unlink(path)
        fileops.fsync_dir(gdir)
    except FileNotFoundError:
        if not missing_ok:
            raise
    except OSError as exc:
        raise fileops.store_error(f"removing the group freeze intent {path}", exc) from exc


def recover_group_freezes(store) -> list[dict]:
    """Complete every interrupted group freeze; return what was done (for logs and tests)."""
    gdir = os.path.join(store.path, GROUPS_DIR)
    if not os.path.isdir(gdir):
        return []
    done = []
    for entry in sorted(os.listdir(gdir)):
        path = os.path.join(gdir, entry)
        if not (entry.startswith(INTENT_PREFIX) and entry.endswith(".json")):
            os.unlink(path)  # a temp file of an intent write that never completed
            continue
        members = fileops.read_json(path, "group freeze intent").get("members")
        if not isinstance(members, dict) or not members or not all(
                isinstance(k, int) and k >= 1 for k in members.values()):
            raise StoreError(f"group freeze intent {path} is damaged ({members!r}); move it "
                             "away and check the member volumes' frozen cycles by hand")
        state = {}
        for name, k in members.items():
            try:
                vol = store.open_volume(validate_volume_name(name))
            except NotFoundError:
                continue  # deleted since: nothing to keep consistent with
            top = vol.open_overlay
            if top not in (k - 1, k):
                raise StoreError(f"group freeze intent {path}: volume {name!r} is at overlay "
                                 f"{top}, expected {k - 1} or {k}; move the intent away")
            state[name] = (vol, k, top == k)
        times = [vol.frozen(k).freeze_time for vol, k, froze in state.values() if froze]
        when = times[0] if times else time.time()
        rolled = []
        for name, (vol, k, froze) in sorted(state.items()):
            if not froze:
                with vol._freeze_lock:
                    new = vol._freeze_prepare()
                    with vol._lock:
                        old = vol._freeze_commit_locked(new, when)
                    vol._freeze_finish(k, old)
                rolled.append(name)
        _remove_intent(path, gdir)
        log.warning("completed an interrupted group freeze of %s: froze %s", sorted(state),
                    rolled or "nothing (all had frozen)")
        done.append({"members": sorted(state), "rolled_forward": rolled, "freeze_time": when})
    return done
