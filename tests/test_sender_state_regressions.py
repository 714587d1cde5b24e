"""Fuzz findings in the sender's state file (STORE/outgoing/<volume>/state.json), pinned.

These escape sender/persist.py, which is being reworked (versioned and
checksummed) by its owner; until then each test is an expected failure
(strict: it turns red the day the fix lands, so the marker gets removed).
Each input must end as a CycleMirrorError or as state the driver can use
(a damaged file moved aside and every target compared by hashes), never as
one of these exceptions, which stop the daemon's start for that volume or
the driver's thread.
"""

import json
import os

import pytest

from cyclemirror.errors import CycleMirrorError
from cyclemirror.sender.persist import DriverState

OWNER = "sender/persist.py rework (state.json versioned and checksummed): not fixed here"


def _load(tmp_path, text: str) -> DriverState:
    directory = tmp_path / "outgoing" / "v"
    os.makedirs(directory)
    (directory / "state.json").write_text(text)
    return DriverState(str(directory), 64)


def _start(tmp_path, text: str):
    """What a driver's start does with the file: load, then each target's owed set."""
    try:
        state = _load(tmp_path, text)
        for label in list(state.targets):
            state.load_owed(label)
            e = state.entry(label)
            int(e["applied_cycle"]), float(e["freeze_time"])
    except CycleMirrorError:
        return None
    return state


@pytest.mark.xfail(strict=True, raises=KeyError, reason=OWNER)
def test_a_target_entry_without_full_is_not_a_key_error(tmp_path):
    _start(tmp_path, json.dumps({"last_freeze": 1, "targets": {"t:1": {"applied_cycle": 1}}}))


@pytest.mark.xfail(strict=True, raises=TypeError, reason=OWNER)
def test_a_target_entry_that_is_not_an_object_is_not_a_type_error(tmp_path):
    _start(tmp_path, json.dumps({"last_freeze": 1, "targets": {"t:1": 5}}))


@pytest.mark.xfail(strict=True, raises=OverflowError, reason=OWNER)
def test_an_infinite_last_freeze_is_not_an_overflow_error(tmp_path):
    _start(tmp_path, '{"last_freeze": Infinity, "targets": {}}')


@pytest.mark.xfail(strict=True, raises=RecursionError, reason=OWNER)
def test_deep_nesting_is_not_a_recursion_error(tmp_path):
    _start(tmp_path, "[" * 100_000)


@pytest.mark.xfail(strict=True, raises=(KeyError, TypeError), reason=OWNER)
def test_wrong_types_in_an_entry_do_not_escape(tmp_path):
    _start(tmp_path, json.dumps({"last_freeze": 1, "targets": {"t:1": {
        "applied_cycle": [], "freeze_time": 0.0, "target_node": None, "in_flight": 0,
        "in_flight_full": False, "full": True}}}))
