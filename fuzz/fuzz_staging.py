"""The staging log reader (receiver/staging.py ``read_records``) over a damaged log.

Byte 0 picks how much of the file the state claims is acknowledged (all of
it, or a little less or more); the rest is the log.  Reading must yield
records within the caps or raise IntegrityError; a record's length must
never make it allocate beyond the chunk cap.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from cyclemirror.receiver import staging
from fuzz.harness import clean, fast_tmp

MAX_LEN = 1 << 16
CAP = 8192
_dir = tempfile.mkdtemp(prefix="cm-fuzz-staging-", dir=fast_tmp())
atexit.register(shutil.rmtree, _dir, True)
_path = os.path.join(_dir, "m.staging")


def _log(records) -> bytes:
    path = os.path.join(_dir, "seed.staging")
    w = staging.StagingWriter(path, 0)
    for kind, member, offset, length, data in records:
        w.append(kind, member, offset, length, data)
    w.close()
    with open(path, "rb") as fh:
        return fh.read()


def seeds() -> list[bytes]:
    return [b"\x00" + _log([(staging.REC_DATA, 0, 0, 16, b"0123456789abcdef"),
                            (staging.REC_ZERO, 1, 4096, 8192, None),
                            (staging.REC_TRIM, 0, 0, 4096, None)]),
            b"\x01" + _log([(staging.REC_DATA, 2, 1 << 40, 4096, bytes(4096))]),
            # a SCATTER record (protocol 2): its payload is the frame's table and data,
            # parsed at apply time (frames.scatter_check), not by the log reader
            b"\x00" + _log([(staging.REC_SCATTER, 0, 0, 64, bytes(range(64)))])]


def _read_all(total: int) -> list:
    return [(k, m, o, n, None if d is None else len(d))
            for k, m, o, n, d in staging.read_records(_path, total, CAP)]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    body = data[1:]
    with open(_path, "wb") as fh:
        fh.write(body)
    total = len(body) + (data[0] % 5) * 7 - 14
    if total < 0:
        total = 0
    result = clean(_read_all, total)
    if isinstance(result, list):
        for kind, _member, _offset, length, got in result:
            assert kind in (staging.REC_DATA, staging.REC_ZERO, staging.REC_TRIM,
                            staging.REC_SCATTER)
            assert got is None or got == length <= CAP
