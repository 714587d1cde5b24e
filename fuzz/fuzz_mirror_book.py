"""The daemon's mirror definitions (``STORE/daemon/mirrors.json``, daemon/mirrors.py MirrorBook).

The input is the file; loading must give valid MirrorSpecs or raise a
CycleMirrorError (StoreError or UsageError naming the entry).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile

from cyclemirror.daemon.config import HostPort, MirrorSpec
from cyclemirror.daemon.mirrors import MirrorBook
from fuzz.harness import clean, fast_tmp

MAX_LEN = 4096
_dir = tempfile.mkdtemp(prefix="cm-fuzz-book-", dir=fast_tmp())
atexit.register(shutil.rmtree, _dir, True)


def seeds() -> list[bytes]:
    spec = {"volume": "db", "to": "10.0.0.2:7000", "as": "db2", "interval": 5.0,
            "compress": "zstd:3", "bwlimit": 1000, "key_file": "/etc/k", "group": None}
    return [json.dumps({"format": 1, "mirrors": [{"spec": spec, "broken": False},
                                                 {"spec": dict(spec, to="[::1]:9"),
                                                  "broken": True}]}).encode(),
            json.dumps({"format": 1, "mirrors": [{"spec": dict(spec, group="g", volume="a\n"),
                                                  "broken": False}]}).encode(),
            b'{"format":1,"mirrors":[' + b"[" * 3000]


def test_one_input(data: bytes) -> None:
    with open(os.path.join(_dir, "mirrors.json"), "wb") as fh:
        fh.write(data)
    book = clean(MirrorBook, _dir)
    if isinstance(book, MirrorBook):
        for (volume, target), entry in book.entries.items():
            spec = entry["spec"]
            assert type(spec) is MirrorSpec and type(entry["broken"]) is bool
            assert volume == spec.volume and "\n" not in volume and type(spec.to) is HostPort
            assert math.isfinite(spec.interval) and spec.interval >= 0
            assert "\n" not in spec.remote_name and target == str(spec.to)
