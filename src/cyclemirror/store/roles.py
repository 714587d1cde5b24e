"""Roles and generations: which host may write a volume, and the history two hosts share.

A volume that is mirrored out, or that was promoted from a mirror image, has a
role record ``STORE/roles/<volume>.json`` (docs/failover.md):

    role           primary (writable, mirrored out) or demoted (a former
                   primary: read-only until it is resynced from the new one)
    epoch          16 hex digits, made when this host became primary (the
                   first ``mirror start``, or a promotion).  The generation of
                   cycle *k* of that epoch is ``<epoch>:<k>``; every applied
                   cycle is recorded by its generation on both sides (the
                   target in its mirror state, the source per target).
    parent         the generation this epoch branched from (``<epoch>:<k>``,
                   the last cycle the promoted image had applied), or null
    promoted_from  for a promoted volume: the source node and mirror it was
                   an image of, the cycle, and whether the promotion was
                   forced (the source still connected or unreachable)
    demoted        for a demoted volume: which peer said so (HOST:PORT), its
                   words (they name the new primary and the generation), when
    kept           divergent data kept for the user (files, until removed)
    discard_on     on a new primary: the node the user named to lose a split
                   brain (``mirror resolve --discard-changes-on``), or null

An incoming mirror image is a *secondary*; its generation is its mirror
state's epoch and applied cycle (``receiver.lineage``), no role file.

Two hosts find their last common cycle by comparing generations: the same
epoch means one side is simply ahead (a target lags); a peer whose epoch's
parent is ``<our epoch>:<k>`` branched from us at cycle *k*; anything else
shares no cycle.  Whether a side *moved on* after the common cycle is
answered by its blocks written since then (overlays, owed sets), never
guessed.

The file is replaced atomically and carries an xxh64 of its canonical body,
like the mirror state: a damaged file is an IntegrityError naming it, never
trusted.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from dataclasses import asdict, dataclass, field

import xxhash

from cyclemirror.errors import IntegrityError, NotFoundError
from cyclemirror.fileio import atomic_write
from cyclemirror.jsontext import loads_strict
from cyclemirror.store.names import validate_volume_name

FORMAT = 1
ROLES_DIR = "roles"
PRIMARY, SECONDARY, DEMOTED = "primary", "secondary", "demoted"
# A role file holds primary or demoted, or secondary for a former primary resynced
# from the new one (its record keeps the divergent data it kept and its history).
ROLES = (PRIMARY, SECONDARY, DEMOTED)
EPOCH_RE = re.compile(r"[0-9a-f]{16}")
GENERATION_RE = re.compile(r"([0-9a-f]{16}):([0-9]{1,19})")
NODE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_KEPT = 64
_MAX_COUNT = 2**63 - 1


def new_epoch() -> str:
    return secrets.token_hex(8)


def generation(epoch: str, cycle: int) -> str:
    return f"{epoch}:{cycle}"


def parse_generation(text: object, what: str) -> tuple[str, int]:
    """(epoch, cycle) of a generation id; IntegrityError naming ``what`` if it is not one."""
    m = GENERATION_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None or int(m.group(2)) > _MAX_COUNT:
        raise IntegrityError(f"{what}: {text!r:.60} is not a generation id (EPOCH:CYCLE, "
                             "EPOCH 16 hex digits)")
    return m.group(1), int(m.group(2))


@dataclass
class RoleRecord:
    volume: str
    role: str
    epoch: str
    parent: str | None = None
    promoted_from: dict | None = None
    demoted: dict | None = None
    kept: list = field(default_factory=list)
    discard_on: str | None = None  # split brain: the node whose changes lose (its word)
    changed: float = 0.0

    @property
    def generation_parent(self) -> tuple[str, int] | None:
        return None if self.parent is None else parse_generation(self.parent, "parent")

    def to_bytes(self) -> bytes:
        body = asdict(self)
        digest = xxhash.xxh64_hexdigest(_canonical(body))
        return (json.dumps({"format": FORMAT, "body": body, "xxh64": digest}, indent=1,
                           sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> RoleRecord:
        doc = loads_strict(data, f"role record {where}", IntegrityError)
        if not isinstance(doc, dict) or set(doc) != {"format", "body", "xxh64"}:
            raise _damaged(where, "not a role record (expected format, body, xxh64)")
        if doc["format"] != FORMAT:
            raise IntegrityError(f"role record {where}: format {doc['format']!r:.20}; this "
                                 f"version reads {FORMAT}")
        body = doc["body"]
        try:
            canonical = _canonical(body)
        except (TypeError, ValueError, RecursionError):
            raise _damaged(where, "its body cannot be checked") from None
        if not isinstance(doc["xxh64"], str) or xxhash.xxh64_hexdigest(canonical) != doc["xxh64"]:
            raise IntegrityError(f"role record {where}: checksum mismatch (a torn or edited "
                                 "file); move it away and run 'mirror promote' or 'mirror "
                                 "start' again")
        if not isinstance(body, dict) or set(body) != {f for f in cls.__dataclass_fields__}:
            raise _damaged(where, "its fields are not those of a role record")
        rec = cls(**body)
        rec.check(where)
        return rec

    def check(self, where: str) -> None:
        try:
            validate_volume_name(self.volume)
        except Exception:  # noqa: BLE001 - any refusal is damage here
            raise _damaged(where, f"volume {self.volume!r:.60} is not a volume name") from None
        if self.role not in ROLES:
            raise _damaged(where, f"role {self.role!r:.20} is not one of {', '.join(ROLES)}")
        if not isinstance(self.epoch, str) or not EPOCH_RE.fullmatch(self.epoch):
            raise _damaged(where, f"epoch {self.epoch!r:.40} is not 16 hex digits")
        if self.parent is not None:
            parse_generation(self.parent, f"role record {where}: parent")
        _check_obj(self.promoted_from, where, "promoted_from",
                   {"source_node": "node", "source_name": "opt_text", "mirror": "text",
                    "generation": "gen", "cycle": "count", "freeze_time": "time",
                    "forced": "bool", "time": "time"})
        _check_obj(self.demoted, where, "demoted",
                   {"by": "text", "message": "text", "time": "time"})
        if not isinstance(self.kept, list) or len(self.kept) > MAX_KEPT:
            raise _damaged(where, f"kept must list at most {MAX_KEPT} entries")
        for i, entry in enumerate(self.kept):
            _check_obj(entry, where, f"kept[{i}]",
                       {"path": "text", "blocks": "count", "bytes": "count",
                        "generation": "gen", "time": "time"}, required=True)
        if self.discard_on is not None and (not isinstance(self.discard_on, str)
                                            or not NODE_RE.fullmatch(self.discard_on)):
            raise _damaged(where, f"discard_on {self.discard_on!r:.40} is not a node id")
        if not _is_time(self.changed):
            raise _damaged(where, f"changed is {self.changed!r:.40}")


def _is_time(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and v >= 0


def _check_obj(obj, where: str, what: str, table: dict[str, str], required: bool = False):
    if obj is None and not required:
        return
    if type(obj) is not dict or set(obj) != set(table):
        raise _damaged(where, f"{what} must be an object with {sorted(table)}")
    for key, kind in table.items():
        v = obj[key]
        ok = {
            "node": lambda v: isinstance(v, str) and NODE_RE.fullmatch(v) is not None,
            "opt_text": lambda v: v is None or (isinstance(v, str) and len(v) <= 1024),
            "text": lambda v: isinstance(v, str) and len(v) <= 4096,
            "gen": lambda v: isinstance(v, str) and GENERATION_RE.fullmatch(v) is not None,
            "count": lambda v: type(v) is int and 0 <= v <= _MAX_COUNT,
            "time": _is_time,
            "bool": lambda v: type(v) is bool,
        }[kind](v)
        if not ok:
            raise _damaged(where, f"{what}.{key} is {v!r:.40}, not a valid {kind}")


def _canonical(body) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _damaged(where: str, why: str) -> IntegrityError:
    return IntegrityError(f"role record {where}: {why}; the file is damaged: move it away")


def role_path(store_path: str, volume: str) -> str:
    return os.path.join(store_path, ROLES_DIR, validate_volume_name(volume) + ".json")


def load_role(store_path: str, volume: str) -> RoleRecord | None:
    """The role record of ``volume``, or None if it has none (never mirrored nor promoted)."""
    path = role_path(store_path, volume)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return RoleRecord.from_bytes(data, path)


def save_role(store_path: str, rec: RoleRecord) -> None:
    rec.check("(being written)")
    os.makedirs(os.path.join(store_path, ROLES_DIR), exist_ok=True)
    atomic_write(role_path(store_path, rec.volume), rec.to_bytes())


def remove_role(store_path: str, volume: str) -> None:
    try:
        os.unlink(role_path(store_path, volume))
    except FileNotFoundError:
        pass


def all_roles(store_path: str) -> tuple[list[RoleRecord], list[str]]:
    """Every role record of the store, and the errors of damaged ones (one each)."""
    directory = os.path.join(store_path, ROLES_DIR)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return [], []
    records, problems = [], []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            rec = load_role(store_path, name[:-5])
        except (IntegrityError, NotFoundError, OSError, ValueError) as exc:
            problems.append(str(exc))
            continue
        if rec is not None:
            records.append(rec)
    return records, problems


def promoted_from(store_path: str, source_node: str, mirror: str) -> RoleRecord | None:
    """The local volume promoted from ``mirror`` of ``source_node``, if there is one."""
    records, _problems = all_roles(store_path)
    for rec in records:
        p = rec.promoted_from
        if p is not None and p["source_node"] == source_node and p["mirror"] == mirror:
            return rec
    return None


# -- consistency groups ---------------------------------------------------------------------
#
# A group freezes its members at one instant, so its cycles are one history: the members
# of a group share one epoch (and, once promoted, one parent), and the generation of the
# group's cycle k is <epoch>:k for every member.  ``group_records`` makes that so.

def group_name_of(mirror: str) -> str:
    """A group's name from its mirror name on a target (``NAME-<8 hex digits>``,
    ``daemon.mirrors.group_mirror_name``); a name of another shape is kept whole."""
    head, sep, digest = mirror.rpartition("-")
    if sep and head and len(digest) == 8 and all(c in "0123456789abcdef" for c in digest):
        return head
    return mirror


def group_records(store_path: str, members, now: float) -> list[RoleRecord]:
    """The role records of a group's ``members`` (in the order given), all of one epoch.

    Members without a record get the group's epoch.  Members whose epochs differ (a
    volume with a history of its own joined the group) take the group's: that of the
    promoted members (records with a parent) if they share one, else the epoch most
    members hold (ties: the member first in name order); such a member's record is
    re-labelled (epoch and parent), keeping its role, kept files and promotion record.
    Members promoted from different branches cannot be one group's history:
    IntegrityError, naming them (nothing is changed)."""
    recs = {name: load_role(store_path, name) for name in members}
    held = [r for r in recs.values() if r is not None]
    parented = {(r.epoch, r.parent) for r in held if r.parent is not None}
    if len(parented) > 1:
        raise IntegrityError(
            "group members " + ", ".join(f"{r.volume} ({r.epoch}, from {r.parent})"
                                         for r in held if r.parent is not None)
            + " were promoted from different branches: they are not one history; mirror "
            "them as separate groups, or remove and re-create the group's members")
    if parented:
        epoch, parent = next(iter(parented))
    elif held:
        counts: dict[str, int] = {}
        for r in sorted(held, key=lambda r: r.volume):
            counts[r.epoch] = counts.get(r.epoch, 0) + 1
        epoch = max(counts, key=lambda e: counts[e])  # first of the most held (dict order)
        parent = None
    else:
        epoch, parent = new_epoch(), None
    out = []
    for name in members:
        rec = recs[name]
        if rec is None:
            rec = RoleRecord(volume=name, role=PRIMARY, epoch=epoch, parent=parent,
                             changed=now)
            save_role(store_path, rec)
        elif rec.epoch != epoch or rec.parent != parent:
            rec.epoch, rec.parent, rec.changed = epoch, parent, now
            save_role(store_path, rec)
        out.append(rec)
    return out


def promoted_together(store_path: str, rec: RoleRecord) -> list[RoleRecord]:
    """The primary records promoted in one promotion with ``rec`` (itself included): the
    members of a group's promotion share its epoch and ``promoted_from``."""
    if rec.promoted_from is None:
        return [rec]
    p = rec.promoted_from
    records, _problems = all_roles(store_path)
    return [r for r in records if r.epoch == rec.epoch and r.promoted_from is not None
            and r.role == rec.role
            and (r.promoted_from["source_node"], r.promoted_from["mirror"],
                 r.promoted_from["cycle"]) == (p["source_node"], p["mirror"], p["cycle"])]
