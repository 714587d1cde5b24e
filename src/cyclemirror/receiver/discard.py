"""Split brain won by the old primary: the new primary's writes lose, no full copy.

``mirror resolve VOLUME --discard-changes-on THIS-NODE`` on a promoted volume
(DRBD's "discard-my-data" on the side named).  The volume was promoted from
the old primary's mirror image at cycle *k* (``promoted_from``) and was
adopted with base = that image and overlay *k* open, so everything this node
wrote since the promotion is in its overlays *k* and newer
(``Volume.dirty_since``).  ``discard_here``:

1. checks every volume of the promotion (a group: every member promoted with
   it) still holds cycle *k* (overlays not merged away; else refused, nothing
   changed: remove the volume to take a full copy);
2. lets the daemon release them (``release(name)``: outgoing mirrors, NBD);
3. keeps this node's writes since the promotion in ``STORE/kept/<volume>-
   <epoch>-<k>.img`` (a sparse file holding only those blocks, listed in the
   role record and status, kept until the user removes it);
4. renames each base (the image of cycle *k*) back to the mirror image
   ``mirrors/<old primary>/<name>.img`` and writes the mirror's state, applied
   cycle *k* of the old primary's epoch, last (the commit point);
5. records the role ``secondary`` (the promotion stays in the record's
   history), so the old primary is no longer refused as demoted.

Steps 2 to 5 are ``receiver.turnback``: its intent, recorded after the checks,
is the commit point, so a kill -9 leaves the volumes untouched or, at the
daemon's next start, turned back whole.

The old primary then takes its demotion back (``mirror reinstate``, which asks
this node and hears that it no longer holds a promoted copy), its mirror
resumes, and its next cycle ships only what it wrote since cycle *k*.
"""

from __future__ import annotations

import logging
import time

from cyclemirror.errors import RoleError
from cyclemirror.receiver import turnback
from cyclemirror.receiver.lineage import LINEAGE_KEY
from cyclemirror.receiver.state import MirrorState, VolumeSpec
from cyclemirror.store import roles

log = logging.getLogger(__name__)


def discard_here(store, recs: list, release) -> dict:
    """Turn the volumes of one promotion (``recs``: their primary role records) back into
    the old primary's mirror image of cycle *k*, keeping their writes since then."""
    p = recs[0].promoted_from
    k = p["cycle"]
    old_epoch, _cycle = roles.parse_generation(p["generation"], "promoted_from.generation")
    group = len(recs) > 1 or (recs[0].volume != p["mirror"] and _was_group(recs[0]))
    who = p["source_name"] or p["source_node"]
    checked = []
    for rec in sorted(recs, key=lambda r: r.volume):
        vol = store.open_volume(rec.volume)
        divergent = vol.dirty_since(k)
        if divergent is None or vol.open_overlay < k:
            raise RoleError(
                f"volume {rec.volume}: its overlay {k} (the promotion's cycle) was merged "
                "already (a target of this node applied a newer cycle), so it cannot be "
                f"turned back into {who}'s image of that cycle; nothing was changed. Remove "
                f"the volume here ('cyclemirror volume rm {rec.volume}', after exporting what "
                f"you need) and mirror it from {who} to take a full copy")
        checked.append((rec, vol, divergent))
    t0 = time.monotonic()
    name = p["mirror"]
    state = MirrorState(
        mirror=name, group=group, source_node=p["source_node"], source_name=p["source_name"],
        volumes=[VolumeSpec(rec.volume if group else name, vol.size, vol.block_size)
                 for rec, vol, _div in checked],
        applied_cycle=k, freeze_time=p["freeze_time"],
        extra={LINEAGE_KEY: {"epoch": old_epoch, "parent": None, "since": time.time()}})
    kept_all = turnback.turn_back(store, state, [rec.volume for rec, _v, _d in checked],
                                  release, f"the split brain resolution of {name} in favour "
                                  f"of {who}")
    volumes = [rec.volume for rec, _v, _d in checked]
    log.warning("split brain on %s resolved by the user in favour of %s: this node's writes "
                "since cycle %d are discarded (kept in %s); %s %s the mirror image of %s "
                "again (%.3fs)", ", ".join(volumes), who, k,
                ", ".join(kp["path"] for kp in kept_all) or "nothing: none were written",
                ", ".join(volumes), "are" if len(volumes) > 1 else "is", who,
                time.monotonic() - t0)
    return {"volumes": volumes, "mirror": name, "group": group, "cycle": k,
            "generation": p["generation"], "kept": kept_all}


def _was_group(rec) -> bool:
    """A one-member group's promotion (its mirror is not named after the volume)."""
    return roles.group_name_of(rec.promoted_from["mirror"]) != rec.promoted_from["mirror"]
