"""The replication decision (sender/plan.py) as a table, and the driver's state file format.

Proves, case by case: a full copy only when the target has no image; a skip
when it already holds the cycle (with a hash comparison next time when our
tracking of it cannot be trusted); a hash comparison instead of a full copy
whenever tracking is lost, another store answers, or the target went back in
time; a resume only for the very cycle, kind and a frozen image that was
durable before the first chunk left.  And state.json: the bytes of format 2
are pinned (golden), format 1 is still read, and every damaged or forged file
is refused with IntegrityError (the daemon then compares hashes, never
crashes).
"""

import json

import pytest

from cyclemirror.errors import IntegrityError
from cyclemirror.sender import plan
from cyclemirror.sender.persist import DriverState, TargetRecord, decode_state, encode_state
from cyclemirror.sender.plan import COMPARE, DELTA, FULL, SKIP, Decision, TargetView

NODE = "node-b"


def rec(**kw):
    base = dict(held_cycle=4, freeze_time=4.0, target_node=NODE, in_flight=5,
                in_flight_full=False, in_flight_synced=True, full=False, untrusted=False)
    return TargetRecord(**{**base, **kw})


def view(**kw):
    base = dict(node_id=NODE, held_cycle=4, has_image=True, pending_cycle=5)
    return TargetView(**{**base, **kw})


# (record, known_held, owed_known, cycle, target view) -> decision
CASES = [
    # a live link: only our own knowledge counts
    ("live link, owed known", rec(), 4, True, 5, None, Decision(DELTA)),
    ("live link, owes everything", rec(), 0, False, 5, None, Decision(FULL)),
    # a new connection
    ("resume the very cycle", rec(), 4, True, 5, view(), Decision(DELTA, resume=True)),
    ("nothing pending there", rec(), 4, True, 5, view(pending_cycle=0), Decision(DELTA)),
    ("it holds part of another cycle", rec(), 4, True, 5, view(pending_cycle=3),
     Decision(DELTA)),
    ("we were shipping another cycle", rec(in_flight=4), 4, True, 5, view(), Decision(DELTA)),
    ("a full copy was in flight, now a delta", rec(in_flight_full=True), 4, True, 5, view(),
     Decision(DELTA)),
    ("overlay not durable before shipping", rec(in_flight_synced=False), 4, True, 5, view(),
     Decision(DELTA)),
    ("no image: full copy", rec(), 4, True, 5, view(has_image=False, pending_cycle=0),
     Decision(FULL)),
    ("no image, full copy resumes", rec(in_flight_full=True, held_cycle=0), 0, False, 5,
     view(has_image=False, held_cycle=0), Decision(FULL, resume=True)),
    ("it already holds the cycle", rec(), 4, True, 5, view(held_cycle=5), Decision(SKIP)),
    ("it holds a newer one", rec(), 4, True, 5, view(held_cycle=9), Decision(SKIP)),
    ("holds it, but tracking was lost", rec(untrusted=True), 4, True, 5, view(held_cycle=5),
     Decision(SKIP, distrust=True)),
    ("tracking lost: compare", rec(untrusted=True), 4, True, 5, view(), Decision(COMPARE)),
    ("another store answers", rec(), 4, True, 5, view(node_id="node-x"), Decision(COMPARE)),
    ("the target went back in time", rec(), 4, True, 5, view(held_cycle=2), Decision(COMPARE)),
    ("never knew it, it has an image", rec(target_node=None, held_cycle=0), 0, False, 5,
     view(held_cycle=3), Decision(COMPARE)),
    ("never knew it, empty", rec(target_node=None, held_cycle=0), 0, False, 5,
     view(held_cycle=0, has_image=False, pending_cycle=0), Decision(FULL)),
]


@pytest.mark.parametrize("what, record, known, owed_known, cycle, target, expected", CASES,
                         ids=[c[0] for c in CASES])
def test_decide(what, record, known, owed_known, cycle, target, expected):
    got = plan.decide(record, known, owed_known, cycle, target)
    assert got == expected
    assert got.ships == (expected.action != SKIP)


GOLDEN = b"""{
 "body": {
  "last_freeze": 7,
  "targets": {
   "10.0.0.2:7000": {
    "freeze_time": 1700000000.5,
    "full": false,
    "held_cycle": 6,
    "in_flight": 7,
    "in_flight_full": false,
    "in_flight_synced": true,
    "target_node": "0123abcd",
    "untrusted": false
   }
  }
 },
 "format": 2,
 "xxh64": "9cc450fe7e8bc172"
}
"""


def golden_records():
    return {"10.0.0.2:7000": TargetRecord(held_cycle=6, freeze_time=1700000000.5,
                                          target_node="0123abcd", in_flight=7,
                                          in_flight_full=False, in_flight_synced=True,
                                          full=False, untrusted=False)}


def test_state_json_bytes_are_pinned():
    data = encode_state(7, golden_records())
    assert data == GOLDEN  # the digest too: xxh64 of the canonical (compact, sorted) body
    assert decode_state(GOLDEN, "golden") == (7, golden_records())


def test_format_1_is_still_read():
    old = {"last_freeze": 3, "targets": {"h:1": {
        "applied_cycle": 2, "freeze_time": 2.0, "target_node": None, "in_flight": 0,
        "in_flight_full": False, "full": True}}}
    last, targets = decode_state(json.dumps(old).encode(), "old")
    assert last == 3 and targets["h:1"].held_cycle == 2 and targets["h:1"].full
    assert not targets["h:1"].in_flight_synced  # unknown then: no resume of its in-flight cycle


def _with(path, value):
    doc = json.loads(encode_state(7, golden_records()))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(doc).encode()


ENTRY = ("body", "targets", "10.0.0.2:7000")
DAMAGED = [
    ("not json", b"{"),
    ("deep nesting", b"[" * 100000),
    ("a list", b"[]"),
    ("an edited value", _with(ENTRY + ("held_cycle",), 5)),
    ("an unknown format", json.dumps({"format": 9, "body": {}, "xxh64": "0"}).encode()),
    ("infinity in format 1", b'{"last_freeze": 1, "targets": {"a": {"freeze_time": Infinity}}}'),
    ("entry not an object (format 1)", b'{"last_freeze": 1, "targets": {"a": []}}'),
    ("a string cycle (format 1)", b'{"last_freeze": 1, "targets": {"a": {"held_cycle": "9"}}}'),
    ("a huge cycle (format 1)", b'{"last_freeze": 1, "targets": {"a": {"held_cycle": %d}}}'
     % (2**70)),
    ("a bool cycle (format 1)", b'{"last_freeze": true, "targets": {}}'),
    ("an unknown field (format 1)", b'{"last_freeze": 1, "targets": {"a": {"x": 1}}}'),
    ("a forged node id (format 1)",
     b'{"last_freeze": 1, "targets": {"a": {"target_node": "../x"}}}'),
    ("missing targets (format 1)", b'{"last_freeze": 1}'),
]


@pytest.mark.parametrize("what, data", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_damaged_state_files_are_refused_by_name(what, data):
    with pytest.raises(IntegrityError):
        decode_state(data, "state.json")


def test_a_damaged_state_file_is_moved_aside_and_tracking_distrusted(tmp_path):
    (tmp_path / "state.json").write_bytes(b'{"last_freeze": 1, "targets": {"a": []}}')
    st = DriverState(str(tmp_path), 64)
    assert not st.trusted and "unreadable" in st.load_error
    assert (tmp_path / "state.json.damaged").exists()
    st.entry("a").held_cycle = 3
    st.save()
    assert DriverState(str(tmp_path), 64).entry("a").held_cycle == 3
