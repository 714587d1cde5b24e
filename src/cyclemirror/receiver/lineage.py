"""Generations on the target: which epoch an incoming image belongs to, and refusals.

A source speaking protocol 3 sends ``lineage`` before ``open``: the epoch of
its volume (``store.roles``), the generation that epoch branched from (empty
for an original primary), how many blocks it wrote since that branch, and the
node the user named to lose a split brain (``discard_on``).  The target keeps
``{"epoch", "parent", "since"}`` in its mirror state (``extra["lineage"]``),
so the generation of its image is ``<epoch>:<applied_cycle>``, recorded with
every apply by the same atomic state write.

Checks at ``open``, before the mirror is touched:

* This store promoted that very mirror (a role record's ``promoted_from``
  names the source node and mirror): the source was demoted.  Refused with
  ``DemotedError``, a permanent error the source records as its role.
* The source's epoch is the image's: the usual case (the target lags or is
  level).
* The source's epoch branched from exactly the image's generation (its
  ``parent`` is ``<our epoch>:<our applied cycle>``): the image is the common
  cycle; it is re-labelled with the new epoch at cycle 0, so the next cycle
  of the new primary applies as a delta.
* Anything else (another epoch, a parent we never held, our image newer than
  the branch): the two share no cycle we can prove; refused with a
  ``ProtocolError`` naming both generations, and nothing changes.

A source below protocol 3 sends no lineage: only the demotion check applies.
"""

from __future__ import annotations

import logging
import re
import time

from cyclemirror.errors import DemotedError, ProtocolError
from cyclemirror.store import roles
from cyclemirror.wire.messages import NODE_RE

log = logging.getLogger(__name__)
LINEAGE_KEY = "lineage"
_EPOCH = re.compile(r"[0-9a-f]{16}")


def check_lineage_message(msg: dict) -> dict:
    """Validate the free-text fields of a ``lineage`` message (the schema checked kinds)."""
    if not _EPOCH.fullmatch(msg["epoch"]):
        raise ProtocolError(f"lineage: epoch {msg['epoch']!r:.40} is not 16 hex digits")
    if msg["parent"] and roles.GENERATION_RE.fullmatch(msg["parent"]) is None:
        raise ProtocolError(f"lineage: parent {msg['parent']!r:.60} is not a generation id "
                            "(EPOCH:CYCLE)")
    if msg["discard_on"] and not NODE_RE.fullmatch(msg["discard_on"]):
        raise ProtocolError(f"lineage: discard_on {msg['discard_on']!r:.60} is not a node id")
    return msg


def refuse_if_promoted(root: str, node_id: str, node_name: str | None, source_node: str,
                       source_name: str | None, mirror: str, msg: dict | None = None) -> None:
    """Raise DemotedError if this store promoted ``mirror`` of ``source_node`` and is still
    the primary of that epoch: a source whose lineage branched from it (a failback or a
    switchover back) is not refused."""
    rec = roles.promoted_from(root, source_node, mirror)
    if rec is None or rec.role != roles.PRIMARY:
        return
    if msg is not None and msg["parent"] and msg["parent"].split(":")[0] == rec.epoch:
        return
    p = rec.promoted_from
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(p["time"]))
    who = source_name or source_node
    raise DemotedError(
        f"mirror {mirror!r} from {who}: {node_name or node_id} promoted its image to volume "
        f"{rec.volume!r} at {when} ({'forced, ' if p['forced'] else ''}from generation "
        f"{p['generation']}; now primary in epoch {rec.epoch}); {who}'s volume is demoted and "
        f"must not mirror over the new primary. To fail back, mirror {rec.volume} from "
        f"{node_name or node_id} to {who} (docs/failover.md)")


def recorded(state) -> dict | None:
    """The lineage a mirror state records, checked (None if it has none yet)."""
    value = state.extra.get(LINEAGE_KEY)
    if value is None:
        return None
    if (not isinstance(value, dict) or set(value) != {"epoch", "parent", "since"}
            or not isinstance(value["epoch"], str) or not _EPOCH.fullmatch(value["epoch"])
            or not (value["parent"] is None or (isinstance(value["parent"], str)
                    and roles.GENERATION_RE.fullmatch(value["parent"])))
            or type(value["since"]) not in (int, float)):
        from cyclemirror.receiver.state import _damaged

        raise _damaged(state.mirror, f"extra.lineage is {value!r:.80}, not a lineage record")
    return value


def generation_of(state) -> str | None:
    rec = recorded(state)
    return None if rec is None else roles.generation(rec["epoch"], state.applied_cycle)


def adopt(mirror, msg: dict, source: str) -> None:
    """Check the source's lineage against the image's, and record it (see the module doc).

    ``mirror`` is an open receiver Mirror; raises ProtocolError and changes nothing
    when the two share no cycle."""
    st = mirror.state
    mine = recorded(st)
    epoch, parent = msg["epoch"], msg["parent"] or None
    if mine is not None and mine["epoch"] == epoch:
        return
    holds = mirror.has_image or st.committed is not None
    if mine is None and (not holds or parent is None):
        # A new image, or one made before generations were recorded: its cycles are
        # this epoch's (the source's cycle numbers and owed sets decide what ships).
        _record(mirror, epoch, parent)
        return
    ours = None if mine is None else roles.generation(mine["epoch"], st.applied_cycle)
    if parent is not None and ours is not None and parent == ours and st.committed is None:
        # The source branched from exactly this image: it is the common cycle.  The new
        # epoch numbers its cycles on from the branch, so the image is that epoch's
        # cycle too; a cycle of the old epoch in flight is dropped: it is not shared.
        if st.pending is not None:
            mirror._discard_pending()
        _record(mirror, epoch, parent)
        log.info("mirror %s from %s: the source's epoch %s branched from this image "
                 "(generation %s)", st.mirror, source, epoch, parent)
        return
    if not holds:
        _record(mirror, epoch, parent)
        return
    raise ProtocolError(
        f"mirror {st.mirror!r} from {source}: the source's volume is of epoch {epoch}"
        f"{f' (branched from {parent})' if parent else ''}, but this image holds generation "
        f"{ours or f'?:{st.applied_cycle}'}: they share no cycle this target can prove, so "
        "nothing was applied. If the source is right, remove the image on this target to "
        "re-seed it (docs/failover.md)")


def _record(mirror, epoch: str, parent: str | None) -> None:
    with mirror._state_lock:
        mirror.state.extra[LINEAGE_KEY] = {"epoch": epoch, "parent": parent,
                                           "since": time.time()}
        mirror._save()
