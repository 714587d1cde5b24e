"""The driver's durable state in the source store: ``STORE/outgoing/<volume>/``.

``state.json`` (atomically replaced) records, per target label, a
``TargetRecord``: the newest cycle the target holds durably (committed or
applied) and its freeze time, the target's node id, the cycle in flight to it
(and whether it is a full copy, and whether its frozen overlay was on disk
before the first chunk left: only such a cycle may resume after a restart),
and whether change tracking with it can be trusted; and the newest freeze the
driver has accounted for.  Beside it, ``owed-<n>.bitmap`` holds, per target,
the blocks changed since that target's held freeze (ExtentBitmap.save,
atomic): what a lagging target needs for catch-up.  No bitmap file and
``full`` means the target needs a full copy (it never held a cycle).
``repair-<n>.bitmap``: blocks a verify found differing on that target, until a
freeze folds them into its owed set (docs/verify.md).

Format 2 is ``{"format": 2, "body": {...}, "xxh64": <of the canonical body>}``
like the target's journal: a torn or edited file is detected, never trusted.
Format 1 (a bare body, written before) is still read.  Anything unreadable
(bad JSON, a wrong type, a checksum mismatch) is moved aside to
``state.json.damaged`` and every target is then compared by block hashes:
never a crash of the daemon, never a silent full copy.

Write order: at a freeze, the owed bitmaps are saved before ``last_freeze``
advances, so a crash in between only makes the next start fold that freeze's
dirty set in again (a union: harmless).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, fields

import xxhash

from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.errors import CycleMirrorError, IntegrityError
from cyclemirror.fileio import atomic_write
from cyclemirror.store.fileobject import resized_bitmap

FORMAT = 2
MAX_INT = 2**63 - 1
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_NODE = re.compile(r"[A-Za-z0-9_-]{1,64}")
log = logging.getLogger(__name__)


@dataclass
class TargetRecord:
    """What the source knows durably about one target."""

    held_cycle: int = 0  # newest cycle the target committed or applied
    freeze_time: float = 0.0  # that cycle's freeze time
    target_node: str | None = None  # the store that answered at the address
    in_flight: int = 0  # cycle being shipped to it (0: none)
    in_flight_full: bool = False
    in_flight_synced: bool = False  # its frozen overlay was durable before shipping began
    full: bool = True  # no owed bitmap: the target needs a full copy
    untrusted: bool = False  # our tracking of it is lost: compare block hashes next time

    @classmethod
    def from_json(cls, value: object, where: str) -> TargetRecord:
        if not isinstance(value, dict):
            raise IntegrityError(f"{where}: a target entry is {type(value).__name__}, not an object")
        known = {f.name for f in fields(cls)}
        if "applied_cycle" in value and "held_cycle" not in value:  # format 1
            value = dict(value, held_cycle=value["applied_cycle"])
            value.pop("applied_cycle")
            value.setdefault("untrusted", False)  # written only when set
            value.setdefault("in_flight_synced", False)  # unknown then: no resume
        if set(value) != known:
            raise IntegrityError(f"{where}: target fields {sorted(value)} are not "
                                 f"{sorted(known)}")
        rec = cls(**{k: v for k, v in value.items()})
        for name in ("held_cycle", "in_flight"):
            v = getattr(rec, name)
            if type(v) is not int or not 0 <= v <= MAX_INT:
                raise IntegrityError(f"{where}: {name} is {v!r}, not an integer in 0..2**63-1")
        if (isinstance(rec.freeze_time, bool) or not isinstance(rec.freeze_time, int | float)
                or not math.isfinite(rec.freeze_time) or rec.freeze_time < 0):
            raise IntegrityError(f"{where}: freeze_time is {rec.freeze_time!r}")
        for name in ("in_flight_full", "in_flight_synced", "full", "untrusted"):
            if type(getattr(rec, name)) is not bool:
                raise IntegrityError(f"{where}: {name} is {getattr(rec, name)!r}, not a bool")
        if rec.target_node is not None and (
                not isinstance(rec.target_node, str) or not _NODE.fullmatch(rec.target_node)):
            raise IntegrityError(f"{where}: target_node {rec.target_node!r} is not a node id")
        return rec


def encode_state(last_freeze: int, targets: dict[str, TargetRecord]) -> bytes:
    """The bytes of state.json (format 2); pinned by a golden test."""
    body = {"last_freeze": last_freeze,
            "targets": {label: asdict(rec) for label, rec in sorted(targets.items())}}
    digest = xxhash.xxh64_hexdigest(_canonical(body))
    return (json.dumps({"format": FORMAT, "body": body, "xxh64": digest}, indent=1,
                       sort_keys=True) + "\n").encode()


def decode_state(data: bytes, where: str) -> tuple[int, dict[str, TargetRecord]]:
    """(last_freeze, records) from state.json bytes of format 1 or 2; IntegrityError if bad."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"{where}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"{where}: not a JSON object")
    if "format" in doc:
        if doc.get("format") != FORMAT or set(doc) != {"format", "body", "xxh64"}:
            raise IntegrityError(f"{where}: format {doc.get('format')!r}; this version reads "
                                 f"1 and {FORMAT}")
        body = doc["body"]
        if not isinstance(body, dict) or not isinstance(doc["xxh64"], str):
            raise IntegrityError(f"{where}: body or checksum of the wrong type")
        if xxhash.xxh64_hexdigest(_canonical(body)) != doc["xxh64"]:
            raise IntegrityError(f"{where}: checksum mismatch (a torn or edited file)")
    else:
        body = doc  # format 1: the body alone, no checksum
    last = body.get("last_freeze")
    targets = body.get("targets")
    if set(body) != {"last_freeze", "targets"} or type(last) is not int or not (
            0 <= last <= MAX_INT) or not isinstance(targets, dict):
        raise IntegrityError(f"{where}: needs last_freeze (an integer) and targets (an object)")
    return last, {str(label): TargetRecord.from_json(value, f"{where} target {label!r}")
                  for label, value in targets.items()}


def _canonical(body: dict) -> bytes:
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise IntegrityError(f"state body cannot be encoded ({exc})") from None


class DriverState:
    def __init__(self, directory: str, nblocks: int, resizable: bool = False):
        self.directory = directory
        self.nblocks = nblocks
        # A file object's owed sets were saved at the size of the freeze last accounted
        # for: laid onto the present size on load (the cycles folded in next carry any
        # tail that grew; sender/driver.py).
        self.resizable = resizable
        self.last_freeze = 0
        self.targets: dict[str, TargetRecord] = {}
        os.makedirs(directory, exist_ok=True)
        self.trusted = True
        self.load_error: str | None = None
        self._load()

    @property
    def path(self) -> str:
        return os.path.join(self.directory, "state.json")

    def _bitmap_path(self, label: str) -> str:
        return os.path.join(self.directory, "owed-" + _SAFE.sub("_", label) + ".bitmap")

    def _load(self) -> None:
        if not os.path.exists(self.path):
            return
        try:
            with open(self.path, "rb") as f:
                self.last_freeze, self.targets = decode_state(f.read(), self.path)
        except (OSError, IntegrityError) as exc:
            # Change tracking is lost: keep the damaged file for a person to look
            # at, and give every target a hash comparison instead of trusting it.
            self.trusted = False
            self.targets, self.last_freeze = {}, 0
            aside = self.path + ".damaged"
            try:
                os.replace(self.path, aside)
            except OSError:
                aside = "(could not be moved aside)"
            self.load_error = f"mirror state {self.path} unreadable ({exc}); moved to {aside}"
            log.warning("%s; every target will be compared by block hashes", self.load_error)

    def save(self) -> None:
        atomic_write(self.path, encode_state(self.last_freeze, self.targets))

    def entry(self, label: str) -> TargetRecord:
        return self.targets.setdefault(label, TargetRecord())

    def load_owed(self, label: str) -> ExtentBitmap | None:
        """The blocks owed to ``label``; None means it needs everything."""
        e = self.entry(label)
        if e.full:
            return None
        try:
            owed = ExtentBitmap.load(self._bitmap_path(label))
            if owed.nbits != self.nblocks and self.resizable:
                return resized_bitmap(owed, self.nblocks)
            if owed.nbits != self.nblocks:
                raise IntegrityError(f"owed bitmap of {label} has {owed.nbits} bits, "
                                     f"the volume {self.nblocks} blocks")
            return owed
        except (CycleMirrorError, OSError):
            # A lost bitmap must not become "nothing owed": fall back to compare.
            e.untrusted = True
            return ExtentBitmap(self.nblocks)

    # Repairs (docs/verify.md): blocks a verify found differing on a target, waiting
    # for the next freeze to fold them into its owed set.  A file per target; none
    # when nothing waits.
    def _repair_path(self, label: str) -> str:
        return os.path.join(self.directory, "repair-" + _SAFE.sub("_", label) + ".bitmap")

    def load_repair(self, label: str) -> ExtentBitmap | None:
        path = self._repair_path(label)
        if not os.path.exists(path):
            return None
        try:
            return ExtentBitmap.load(path)
        except (CycleMirrorError, OSError) as exc:
            # Lost blocks to repair must not pass silently: compare hashes instead.
            log.warning("repair set %s unreadable (%s); the target will be compared by "
                        "block hashes", path, exc)
            self.entry(label).untrusted = True
            return None

    def save_repair(self, label: str, blocks: ExtentBitmap | None) -> None:
        path = self._repair_path(label)
        if blocks is None or blocks.is_empty():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        blocks.save(path)

    def save_owed(self, label: str, owed: ExtentBitmap | None) -> None:
        e = self.entry(label)
        if owed is None:
            e.full = True
            return
        owed.save(self._bitmap_path(label))
        e.full = False
