"""A mirror's state file on the target: what is applied, what is in flight.

The state file is the apply journal.  It is replaced atomically (temp, fsync,
rename, fsync dir) and carries an xxh64 of its body, so it is always either
the old or the new version and a damaged one is detected, never trusted.

    applied_cycle, freeze_time   the image equals the source at that freeze
    pending                      a delta being received: cycle, full, chunks
                                 acknowledged, staged bytes (resumable)
    committed                    a cycle completely received and verified:
                                 recovery must finish applying it (redo)

Both may be set: the next cycle is received while the committed one is
applied (protocol 2).  A cycle whose members' sizes differ from the images'
(a file object that grew or shrank) lists its sizes (``sizes``, one per member,
absent otherwise): the apply resizes the images and then the state's
``volumes`` take those sizes, in the same save that names the cycle applied.
Each delta names its own staging log (``staging``;
absent in files written before pipelining, which used ``<mirror>.staging``).  Single-volume mirrors keep
``<volume>.state.json`` beside ``<volume>.img``; a consistency group keeps
``<group>.group.json`` beside its members' images.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import xxhash

from cyclemirror.errors import IntegrityError
from cyclemirror.fileio import atomic_write
from cyclemirror.jsontext import loads_strict
from cyclemirror.wire.messages import MAX_MEMBERS, NAME_RE, NODE_RE

# 2: each in-flight delta names its staging log (pipelined cycles); 1 is still read.
STATE_VERSION = 2
READS_VERSIONS = (1, 2)
_MAX_COUNT = 2**63 - 1


def _damaged(where: str, why: str) -> IntegrityError:
    return IntegrityError(f"mirror state {where}: {why}; the file is damaged: move it away "
                          "to re-seed the mirror")


def _check_kind(value, kind: str) -> bool:
    if kind == "count":
        return type(value) is int and 0 <= value <= _MAX_COUNT
    if kind == "time":
        return type(value) in (int, float) and math.isfinite(value) and value >= 0
    if kind == "bool":
        return type(value) is bool
    if kind == "name":
        return type(value) is str and NAME_RE.fullmatch(value) is not None
    if kind == "node":
        return type(value) is str and NODE_RE.fullmatch(value) is not None
    if kind == "opt_text":
        return value is None or (type(value) is str and len(value) <= 1024)
    if kind == "opt_object":
        return value is None or type(value) is dict
    if kind == "object":
        return type(value) is dict
    if kind == "list":
        return type(value) is list
    if kind == "opt_file":  # a file name in the mirror's directory, never a path
        return value is None or (type(value) is str and NAME_RE.fullmatch(value) is not None
                                 and value not in (".", ".."))
    raise AssertionError(kind)  # pragma: no cover - a table typo


def _fields(obj, where: str, what: str, table: dict[str, str]) -> None:
    """``obj`` must be an object with exactly ``table``'s keys, each value of its kind."""
    if type(obj) is not dict:
        raise _damaged(where, f"{what} is not an object")
    if set(obj) != set(table):
        missing = sorted(set(table) - set(obj))
        extra = sorted(set(obj) - set(table))
        raise _damaged(where, f"{what}: missing {missing}, unknown {extra}"[:300])
    for key, kind in table.items():
        if not _check_kind(obj[key], kind):
            raise _damaged(where, f"{what}.{key} is {obj[key]!r:.40}, not a valid {kind}")


_STATE_FIELDS = {"version": "count", "mirror": "name", "group": "bool", "source_node": "node",
                 "source_name": "opt_text", "volumes": "list", "applied_cycle": "count",
                 "freeze_time": "time", "pending": "opt_object", "committed": "opt_object",
                 "extra": "object"}
_VOLUME_FIELDS = {"name": "name", "size": "count", "block_size": "count"}
_INFLIGHT_FIELDS_V1 = {"cycle": "count", "freeze_time": "time", "full": "bool",
                       "chunks": "count", "staged_bytes": "count"}
_INFLIGHT_FIELDS = {**_INFLIGHT_FIELDS_V1, "staging": "opt_file"}


@dataclass
class VolumeSpec:
    name: str
    size: int
    block_size: int


@dataclass
class InFlight:
    cycle: int
    freeze_time: float
    full: bool
    chunks: int = 0
    staged_bytes: int = 0
    staging: str | None = None  # the delta's staging log (a file name in the mirror's dir)
    sizes: list[int] | None = None  # each member's size in this cycle (None: unchanged)


@dataclass
class MirrorState:
    mirror: str
    group: bool
    source_node: str
    source_name: str | None
    volumes: list[VolumeSpec]
    applied_cycle: int = 0
    freeze_time: float = 0.0
    pending: InFlight | None = None
    committed: InFlight | None = None
    extra: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        body = asdict(self)
        for key in ("pending", "committed"):  # 'sizes' only where a cycle resizes
            if body[key] is not None and body[key]["sizes"] is None:
                del body[key]["sizes"]
        body["version"] = STATE_VERSION
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        digest = xxhash.xxh64_hexdigest(text.encode())
        return (json.dumps({"body": body, "xxh64": digest}, sort_keys=True, indent=1)
                + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> MirrorState:
        """Parse and check a state file: every field of the right type and in range.

        A damaged file (bad checksum, torn, or a body that is not what we
        write) is an IntegrityError naming the file and what to do, so one
        bad mirror shows up as an error row and never stops the daemon.
        """
        outer = loads_strict(data, f"mirror state {where}", IntegrityError)
        if not isinstance(outer, dict) or set(outer) != {"body", "xxh64"}:
            raise _damaged(where, "not a state file (expected body and xxh64)")
        body = outer["body"]
        try:
            text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        except (ValueError, TypeError, RecursionError):
            raise _damaged(where, "its body cannot be checked") from None
        if xxhash.xxh64_hexdigest(text.encode()) != outer["xxh64"]:
            raise IntegrityError(f"mirror state {where}: checksum mismatch (damaged file)")
        if not isinstance(body, dict):
            raise _damaged(where, "its body is not an object")
        version = body.get("version")
        if type(version) is not int or version not in READS_VERSIONS:
            raise IntegrityError(f"mirror state {where}: unknown version {version!r:.20}")
        _fields(body, where, "state", _STATE_FIELDS)
        volumes = body["volumes"]
        if not isinstance(volumes, list) or not 1 <= len(volumes) <= MAX_MEMBERS:
            raise _damaged(where, f"volumes must list 1..{MAX_MEMBERS} volumes")
        specs = []
        for i, vol in enumerate(volumes):
            _fields(vol, where, f"volumes[{i}]", _VOLUME_FIELDS)
            if vol["size"] == 0 or vol["block_size"] == 0 or vol["size"] % vol["block_size"]:
                raise _damaged(where, f"volumes[{i}]: size {vol['size']} is not a positive "
                                      f"multiple of block_size {vol['block_size']}")
            specs.append(VolumeSpec(vol["name"], vol["size"], vol["block_size"]))
        flights = {}
        for key in ("pending", "committed"):
            flights[key] = None
            if body[key] is not None:
                flight = dict(body[key]) if type(body[key]) is dict else body[key]
                sizes = flight.pop("sizes", None) if type(flight) is dict else None
                _fields(flight, where, key,
                        _INFLIGHT_FIELDS if version >= 2 else _INFLIGHT_FIELDS_V1)
                if sizes is not None and not (
                        type(sizes) is list and len(sizes) == len(specs) and all(
                            _check_kind(n, "count") and n > 0 and n % v.block_size == 0
                            for n, v in zip(sizes, specs, strict=False))):
                    raise _damaged(where, f"{key}.sizes must list a positive multiple of "
                                          "each member's block size")
                flights[key] = InFlight(**flight, sizes=sizes)
        # Both may be set (the next cycle arrives while the committed one applies), the
        # pending one newer; version 1 wrote at most one.
        if flights["pending"] is not None and flights["committed"] is not None and (
                version < 2 or flights["pending"].cycle <= flights["committed"].cycle):
            raise _damaged(where, "pending and committed cycles are both set out of order")
        return cls(mirror=body["mirror"], group=body["group"], source_node=body["source_node"],
                   source_name=body["source_name"], volumes=specs,
                   applied_cycle=body["applied_cycle"], freeze_time=body["freeze_time"],
                   pending=flights["pending"], committed=flights["committed"],
                   extra=body["extra"])

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> MirrorState:
        with open(path, "rb") as f:
            return cls.from_bytes(f.read(), os.fspath(path))
