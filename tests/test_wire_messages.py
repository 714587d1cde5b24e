"""Control messages from a peer: anything that is not exactly a schema is refused.

Proves with hypothesis that arbitrary JSON (and arbitrary bytes) either
parses into a message whose every field has its schema's kind, or raises
ProtocolError -- never another exception; and pins the encoding of a message
and the fixed sizes of the handshake messages (golden).
"""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cyclemirror.errors import ProtocolError
from cyclemirror.wire import handshake, messages

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


def message_like():
    """Dicts that often have a real type and real field names, with random values."""
    return st.sampled_from(sorted(messages.SCHEMAS)).flatmap(
        lambda t: st.fixed_dictionaries(
            {"type": st.just(t)},
            optional={f: json_values for f in messages.SCHEMAS[t]},
        )
    )


@given(st.one_of(json_values, message_like()))
def test_arbitrary_json_is_a_valid_message_or_a_protocol_error(value):
    payload = json.dumps(value).encode()
    try:
        msg = messages.parse_message(payload, set(messages.SCHEMAS))
    except ProtocolError:
        return
    schema = messages.SCHEMAS[msg["type"]]
    assert set(msg) - {"type"} == set(schema)
    for field, kind in schema.items():
        if kind == "int":
            assert type(msg[field]) is int and 0 <= msg[field] < 2**63


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(data):
    try:
        messages.parse_message(data, {"open"})
    except ProtocolError:
        pass


@pytest.mark.parametrize("bad, why", [
    ({"type": "begin", "cycle": -1, "freeze_time": 1.0, "full": True, "resume_from": 0},
     "cycle"),
    ({"type": "begin", "cycle": True, "freeze_time": 1.0, "full": True, "resume_from": 0},
     "cycle"),
    ({"type": "open", "node_id": "../x", "node_name": None, "mirror": "v", "group": False,
      "volumes": [{"name": "v", "size": 4096, "block_size": 4096}]}, "node_id"),
    ({"type": "open", "node_id": "n", "node_name": None, "mirror": "v", "group": False,
      "volumes": [{"name": "v", "size": 4097, "block_size": 4096}]}, "size"),
    ({"type": "open", "node_id": "n", "node_name": None, "mirror": "v", "group": False,
      "volumes": [{"name": "v", "size": 4096, "block_size": 3000}]}, "block_size"),
    ({"type": "ack", "cycle": 1, "chunks": 2, "extra": 1}, "unknown fields"),
])
def test_specific_bad_fields_are_named(bad, why):
    with pytest.raises(ProtocolError, match=why):
        messages.parse_message(json.dumps(bad).encode(), set(messages.SCHEMAS))


def test_unexpected_type_is_refused_even_if_valid():
    payload = messages.encode_message("ack", cycle=1, chunks=2)
    with pytest.raises(ProtocolError, match="unexpected control message 'ack'"):
        messages.parse_message(payload, {"open"})


def test_message_encoding_is_pinned():
    assert messages.encode_message("ack", cycle=3, chunks=7) == \
        b'{"chunks":7,"cycle":3,"type":"ack"}'


def test_handshake_message_sizes_are_pinned():
    assert handshake._HELLO.size == 48
    assert handshake._CHALLENGE.size == 80
    assert handshake._VERDICT.size == 3
    assert handshake.MAGIC_SOURCE == b"CYMIRSRC" and handshake.MAGIC_TARGET == b"CYMIRTGT"
