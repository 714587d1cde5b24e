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
applied (protocol 2).  Each delta names its own staging log (``staging``;
absent in files written before pipelining, which used ``<mirror>.staging``).  Single-volume mirrors keep
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

# 2: each in-flight delta names its staging log (pipelined cycles); 1 is still read.
STATE_VERSION = 2
READS_VERSIONS = (1, 2)


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
            if body.pop("version") not in READS_VERSIONS:
                raise IntegrityError(f"mirror state {where}: unknown version")
            body["volumes"] = [VolumeSpec(**v) for v in body["volumes"]]
            for key in ("pending", "committed"):
                if body[key] is not None:
                    body[key] = InFlight(**body[key])
                    name = body[key].staging
                    if name is not None and (not isinstance(name, str) or "/" in name
                                             or name in ("", ".", "..")):
                        raise IntegrityError(
                            f"mirror state {where}: staging log name {name!r} is not a "
                            "file name; the state file was damaged or forged")
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
