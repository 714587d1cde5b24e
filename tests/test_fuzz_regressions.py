"""Every escape the fuzz harnesses (fuzz/) found, pinned: each input now gets a named error.

One test per finding, with the input that escaped.  The sender's state.json
findings are in test_sender_state_regressions.py (their fix belongs to that
file's rework).
"""

import json
import os

import pytest
import xxhash

from cyclemirror.daemon.config import check_name
from cyclemirror.errors import IntegrityError, ProtocolError, StoreError, UsageError
from cyclemirror.jsontext import loads_strict
from cyclemirror.receiver.state import InFlight, MirrorState, VolumeSpec
from cyclemirror.store import Store
from cyclemirror.store.volume import Volume
from cyclemirror.wire import messages

BEGIN = {"type": "begin", "cycle": 1, "freeze_time": 1.0, "full": True, "resume_from": 0}


def test_a_message_type_that_is_a_list_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="unknown control message type"):
        messages.parse_message(b'{"type":[]}', {"begin"})


def test_a_freeze_time_of_310_nines_is_a_protocol_error_not_an_overflow():
    payload = json.dumps(BEGIN).replace('"freeze_time": 1.0', '"freeze_time": ' + "9" * 310)
    with pytest.raises(ProtocolError, match="freeze_time"):
        messages.parse_message(payload.encode(), {"begin"})


@pytest.mark.parametrize("number", ["1e999", "NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_by_the_decoder(number):
    payload = json.dumps(BEGIN).replace('"freeze_time": 1.0', '"freeze_time": ' + number)
    with pytest.raises(ProtocolError, match="not valid JSON"):
        messages.parse_message(payload.encode(), {"begin"})


def test_100000_open_brackets_under_the_1_mib_cap_are_a_protocol_error():
    payload = b"[" * 100_000
    assert len(payload) < 1 << 20
    with pytest.raises(ProtocolError, match="nested too deeply"):
        messages.parse_message(payload, {"begin"})


@pytest.mark.parametrize("field,value", [("mirror", "db\n"), ("node_id", "n1\n")])
def test_names_ending_in_a_newline_are_refused(field, value):
    msg = {"type": "open", "node_id": "n1", "node_name": None, "mirror": "db", "group": False,
           "volumes": [{"name": "db", "size": 4096, "block_size": 4096}]}
    msg[field] = value
    with pytest.raises(ProtocolError, match=field):
        messages.parse_message(json.dumps(msg).encode(), {"open"})


def test_a_volume_name_ending_in_a_newline_is_refused_in_a_volume_list():
    msg = {"type": "open", "node_id": "n1", "node_name": None, "mirror": "db", "group": False,
           "volumes": [{"name": "db\n", "size": 4096, "block_size": 4096}]}
    with pytest.raises(ProtocolError, match=r"volumes\[0\].name"):
        messages.parse_message(json.dumps(msg).encode(), {"open"})


def test_config_names_ending_in_a_newline_are_refused():
    with pytest.raises(UsageError):
        check_name("db\n", "volume")


def test_loads_strict_names_the_text_and_uses_the_callers_class():
    with pytest.raises(StoreError, match="the thing is not valid JSON"):
        loads_strict(b"\xff", "the thing", StoreError)
    assert loads_strict('{"a": [1, 2.5]}', "x", StoreError) == {"a": [1, 2.5]}


# -- volume.json ---------------------------------------------------------------------------

@pytest.fixture
def volume_dir(tmp_path):
    store = Store.create(str(tmp_path / "store"))
    vol = store.create_volume("v", 65536, 4096)
    vol.write(0, b"a" * 4096)
    vol.freeze()
    store.close()
    return str(tmp_path / "store" / "volumes" / "v")


def _rewrite_state(volume_dir, change):
    path = os.path.join(volume_dir, "volume.json")
    with open(path) as fh:
        state = json.load(fh)
    change(state)
    with open(path, "w") as fh:
        json.dump(state, fh)


@pytest.mark.parametrize("change,why", [
    (lambda s: s["overlays"][0].pop("closed_at"), "closed_at"),
    (lambda s: s["overlays"][-1].pop("closed_at"), "closed_at"),
    (lambda s: s.pop("merging"), "merging"),
    (lambda s: s.update(size="big"), "size"),
    (lambda s: s.update(merged_through="x"), "merged_through"),
    (lambda s: s.update(created=[]), "created"),
    (lambda s: s.update(merging=True), "merging"),
])
def test_a_damaged_volume_state_is_a_store_error_not_a_key_error(volume_dir, change, why):
    _rewrite_state(volume_dir, change)
    with pytest.raises(StoreError, match=why):
        Volume.open("v", volume_dir)


def test_a_deeply_nested_volume_state_is_a_store_error(volume_dir):
    with open(os.path.join(volume_dir, "volume.json"), "w") as fh:
        fh.write("[" * 100_000)
    with pytest.raises(StoreError, match="damaged"):
        Volume.open("v", volume_dir)


# -- the target's mirror state -------------------------------------------------------------

def _state_file(body) -> bytes:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return json.dumps({"body": body, "xxh64": xxhash.xxh64_hexdigest(text.encode())}).encode()


def _good_body() -> dict:
    st = MirrorState(mirror="db", group=False, source_node="n1", source_name="a",
                     volumes=[VolumeSpec("db", 8192, 4096)], applied_cycle=2, freeze_time=1.0,
                     pending=InFlight(3, 2.0, False, 1, 4096))
    return json.loads(st.to_bytes())["body"]


@pytest.mark.parametrize("body", [[], "text", 7, None])
def test_a_state_body_that_is_not_an_object_is_an_integrity_error(body):
    with pytest.raises(IntegrityError, match="not an object"):
        MirrorState.from_bytes(_state_file(body), "x.state.json")


@pytest.mark.parametrize("path,value", [
    (("volumes", 0, "size"), "big"), (("volumes", 0, "size"), 4097),
    (("volumes", 0, "name"), "../../etc/passwd"), (("volumes", 0, "name"), "db\n"),
    (("applied_cycle",), "big"), (("applied_cycle",), -1), (("freeze_time",), "now"),
    (("group",), 1), (("source_node",), "n/1"), (("pending", "chunks"), 1.5),
    (("pending",), []), (("volumes",), []), (("extra",), None), (("mirror",), ""),
])
def test_a_state_field_of_the_wrong_type_is_an_integrity_error(path, value):
    body = _good_body()
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(IntegrityError, match="damaged"):
        MirrorState.from_bytes(_state_file(body), "x.state.json")


def test_a_state_with_pending_not_newer_than_committed_is_an_integrity_error():
    body = _good_body()
    body["committed"] = dict(body["pending"])  # the same cycle in both: never written so
    with pytest.raises(IntegrityError, match="both set out of order"):
        MirrorState.from_bytes(_state_file(body), "x.state.json")


def test_a_good_state_still_round_trips():
    raw = _state_file(_good_body())
    st = MirrorState.from_bytes(raw, "x")
    assert st.volumes == [VolumeSpec("db", 8192, 4096)] and st.pending.chunks == 1
    assert MirrorState.from_bytes(st.to_bytes(), "y") == st
