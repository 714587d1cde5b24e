"""Fuzz findings in the sender's state file (STORE/outgoing/<volume>/state.json), pinned.

Each escaped the format-1 reader of sender/persist.py; format 2 checks every
field, and format-1 files go through the same checks.  Each input must end as a CycleMirrorError or as state the driver can use
(a damaged file moved aside and every target compared by hashes), never as
one of these exceptions, which stop the daemon's start for that volume or
the driver's thread.
"""

import json
import os

from cyclemirror.errors import CycleMirrorError
from cyclemirror.sender.persist import DriverState


def _load(tmp_path, text: str) -> DriverState:
    directory = tmp_path / "outgoing" / "v"
    os.makedirs(directory)
    (directory / "state.json").write_text(text)
    return DriverState(str(directory), 64)


def _started(tmp_path, text: str) -> None:
    """The input ends as usable state or a clean refusal; the damaged file is set aside."""
    state = _start(tmp_path, text)
    assert state is None or not state.trusted  # every input here is damaged


def _start(tmp_path, text: str):
    """What a driver's start does with the file: load, then each target's owed set."""
    try:
        state = _load(tmp_path, text)
        for label in list(state.targets):
            state.load_owed(label)
            e = state.entry(label)
            int(e.held_cycle), float(e.freeze_time)
    except CycleMirrorError:
        return None
    return state


def test_a_target_entry_without_full_is_not_a_key_error(tmp_path):
    _started(tmp_path, json.dumps({"last_freeze": 1, "targets": {"t:1": {"applied_cycle": 1}}}))


def test_a_target_entry_that_is_not_an_object_is_not_a_type_error(tmp_path):
    _started(tmp_path, json.dumps({"last_freeze": 1, "targets": {"t:1": 5}}))


def test_an_infinite_last_freeze_is_not_an_overflow_error(tmp_path):
    _started(tmp_path, '{"last_freeze": Infinity, "targets": {}}')


def test_deep_nesting_is_not_a_recursion_error(tmp_path):
    _started(tmp_path, "[" * 100_000)


def test_wrong_types_in_an_entry_do_not_escape(tmp_path):
    _started(tmp_path, json.dumps({"last_freeze": 1, "targets": {"t:1": {
        "applied_cycle": [], "freeze_time": 0.0, "target_node": None, "in_flight": 0,
        "in_flight_full": False, "full": True}}}))
