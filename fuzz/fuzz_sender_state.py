"""The sender's state file (``STORE/outgoing/<volume>/state.json``, sender/persist.py).

The input is the file; the harness then does what a driver's start does with
it: ``DriverState(directory, nblocks)`` (its public load), and per target in
it ``entry`` and ``load_owed`` plus the fields ``_recover`` reads.  Loading
must end in usable state or a CycleMirrorError (a damaged file is moved aside
and every target compared by hashes).

Known escapes, owned by the driver's state-file rework (persist.py is
versioned and checksummed there), are counted apart in ``KNOWN`` instead of
stopping the run: see tests/test_sender_state_regressions.py.  Remove an entry
when its fix lands and the harness holds the line again.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections import Counter

from cyclemirror.sender.persist import DriverState
from fuzz.harness import clean, fast_tmp

MAX_LEN = 4096
NBLOCKS = 256
_dir = tempfile.mkdtemp(prefix="cm-fuzz-sender-", dir=fast_tmp())
atexit.register(shutil.rmtree, _dir, True)
_state_dir = os.path.join(_dir, "outgoing", "v")

# (exception type, function it escaped from) -> count, for escapes not ours to fix here.
# Escapes found before state.json got format 2 (checked field by field); all fixed.
KNOWN_ESCAPES: set[tuple[str, str]] = set()
KNOWN = Counter()


def seeds() -> list[bytes]:
    good = {"last_freeze": 3, "targets": {
        "10.0.0.2:7000": {"applied_cycle": 2, "freeze_time": 1.5e9, "target_node": "n2",
                          "in_flight": 3, "in_flight_full": False, "full": False},
        "10.0.0.3:7000": {"applied_cycle": 0, "freeze_time": 0.0, "target_node": None,
                          "in_flight": 0, "in_flight_full": False, "full": True}}}
    return [json.dumps(good).encode(),
            json.dumps({"last_freeze": 1, "targets": {"t": {"applied_cycle": 1}}}).encode(),
            json.dumps({"last_freeze": 1, "targets": {"t": 5}}).encode(),
            b'{"last_freeze": Infinity, "targets": {}}', b"[" * 3000]


def _recover_fields(state: DriverState, label: str) -> None:
    e = state.entry(label)
    int(e.held_cycle), float(e.freeze_time)


def _start(data: bytes) -> None:
    shutil.rmtree(_state_dir, ignore_errors=True)
    os.makedirs(_state_dir)
    with open(os.path.join(_state_dir, "state.json"), "wb") as fh:
        fh.write(data)
    state = DriverState(_state_dir, NBLOCKS)
    for label in list(state.targets)[:8]:
        state.load_owed(label)
        _recover_fields(state, label)


def test_one_input(data: bytes) -> None:
    try:
        clean(_start, data)
    except (KeyError, TypeError, AttributeError, RecursionError, OverflowError) as exc:
        tb = exc.__traceback__
        while tb.tb_next is not None and not tb.tb_frame.f_code.co_filename.endswith(
                ("persist.py", "fuzz_sender_state.py")):
            tb = tb.tb_next
        # The innermost frame of persist.py or this harness names where it escaped.
        frames = []
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.endswith(("persist.py", "fuzz_sender_state.py")):
                frames.append(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
        where = frames[-1] if frames else "?"
        key = (type(exc).__name__, where)
        if key not in KNOWN_ESCAPES:
            raise
        KNOWN[key] += 1
        if KNOWN[key] & (KNOWN[key] - 1) == 0:  # 1, 2, 4, 8, ...: a record for the report
            _record_known()


def _record_known() -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus",
                        "sender_state.known.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({f"{t} in {w}": n for (t, w), n in sorted(KNOWN.items())}, fh, indent=1)
