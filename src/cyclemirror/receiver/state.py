"""A mirror's state file on the target: what is applied, what is in flight.

The state file is the apply journal.  It is replaced atomically (temp, fsync,
rename, fsync dir) and carries an xxh64 of its body, so it is always either
the old or the new version and a damaged one is detected, never trusted.

    applied_cycle, freeze_time   the image equals the source at that freeze
    pending                      a delta being received: cycle, full, chunks
                                 acknowledged, staged bytes (resumable)
    committed                    a delta completely received and verified:
                                 recovery must finish applying it (redo)

At most one of pending/committed is set.  Single-volume mirrors keep
``<volume>.state.json`` beside ``<volume>.img``; a consistency group keeps
``<group>.group.json`` beside its members' images.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import xxhash

from cyclemirror.errors import IntegrityError
from cyclemirror.fileio import atomic_write

STATE_VERSION = 1


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
        body["version"] = STATE_VERSION
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        digest = xxhash.xxh64_hexdigest(text.encode())
        return (json.dumps({"body": body, "xxh64": digest}, sort_keys=True, indent=1)
                + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> MirrorState:
        try:
            outer = json.loads(data)
            body = outer["body"]
            text = json.dumps(body, sort_keys=True, separators=(",", ":"))
            if xxhash.xxh64_hexdigest(text.encode()) != outer["xxh64"]:
                raise IntegrityError(f"mirror state {where}: checksum mismatch (damaged file)")
            if body.pop("version") != STATE_VERSION:
                raise IntegrityError(f"mirror state {where}: unknown version")
            body["volumes"] = [VolumeSpec(**v) for v in body["volumes"]]
            for key in ("pending", "committed"):
                if body[key] is not None:
                    body[key] = InFlight(**body[key])
            return cls(**body)
        except IntegrityError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(
                f"mirror state {where}: unreadable ({exc}); move it away to re-seed the mirror"
            ) from None

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> MirrorState:
        with open(path, "rb") as f:
            return cls.from_bytes(f.read(), os.fspath(path))
