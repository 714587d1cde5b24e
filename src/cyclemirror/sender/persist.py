"""The driver's durable state in the source store: ``STORE/outgoing/<volume>/``.

``state.json`` (atomically replaced) records, per target label: the cycle it
last applied (and its freeze time), the target's node id, the cycle in
flight to it; and the newest freeze the driver has accounted for.  Beside it,
``owed-<n>.bitmap`` holds, per target, the blocks changed since that target's
applied freeze (ExtentBitmap.save, atomic): what a lagging target needs for
catch-up.  No bitmap file and ``full: true`` means the target needs a full
copy (it has never applied a cycle).

Write order: at a freeze, the owed bitmaps are saved before ``last_freeze``
advances, so a crash in between only makes the next start fold that freeze's
dirty set in again (a union: harmless).
"""

from __future__ import annotations

import json
import logging
import os
import re

from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.errors import CycleMirrorError
from cyclemirror.fileio import atomic_write

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
log = logging.getLogger(__name__)


class DriverState:
    def __init__(self, directory: str, nblocks: int):
        self.directory = directory
        self.nblocks = nblocks
        self.last_freeze = 0
        self.targets: dict[str, dict] = {}
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
                data = json.load(f)
            self.last_freeze = int(data["last_freeze"])
            self.targets = dict(data["targets"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Change tracking is lost: keep the damaged file for a person to look
            # at, and give every target a hash comparison instead of trusting it.
            self.trusted = False
            self.targets, self.last_freeze = {}, 0
            aside = self.path + ".damaged"
            os.replace(self.path, aside)
            self.load_error = f"mirror state {self.path} unreadable ({exc}); moved to {aside}"
            log.warning("%s; every target will be compared by block hashes", self.load_error)

    def save(self) -> None:
        body = {"last_freeze": self.last_freeze, "targets": self.targets}
        atomic_write(self.path, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())

    def entry(self, label: str) -> dict:
        return self.targets.setdefault(label, {
            "applied_cycle": 0, "freeze_time": 0.0, "target_node": None,
            "in_flight": 0, "in_flight_full": False, "full": True,
        })

    def load_owed(self, label: str) -> ExtentBitmap | None:
        """The blocks owed to ``label``; None means it needs everything."""
        e = self.entry(label)
        if e["full"]:
            return None
        try:
            return ExtentBitmap.load(self._bitmap_path(label))
        except (CycleMirrorError, OSError):
            # A lost bitmap must not become "nothing owed": fall back to compare.
            e["untrusted"] = True
            return ExtentBitmap(self.nblocks)

    def save_owed(self, label: str, owed: ExtentBitmap | None) -> None:
        e = self.entry(label)
        if owed is None:
            e["full"] = True
            return
        owed.save(self._bitmap_path(label))
        e["full"] = False
