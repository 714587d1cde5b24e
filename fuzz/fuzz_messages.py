"""Control messages (wire/messages.py): any payload is a message we expect, or ProtocolError.

The first byte picks the set of types the receiver expects at that moment
(as the sender's reader and the target's session do), the rest is the JSON
payload of a CONTROL frame (capped at 1 MiB on the wire; ``MAX_LEN`` here).
"""

from __future__ import annotations

import json

from cyclemirror.wire import messages
from fuzz.harness import clean

MAX_LEN = 1 << 17
_EXPECT = [set(messages.SCHEMAS), {"open"}, {"begin", "member", "end", "hash_request"},
           {"opened"}, {"ack", "applied", "hashes"}, {"error"}, {"begin"}, {"hashes"}]


def seeds() -> list[bytes]:
    examples = [
        messages.encode_message("open", node_id="n1", node_name="host", mirror="db",
                                group=False,
                                volumes=[{"name": "db", "size": 1 << 20, "block_size": 4096}]),
        messages.encode_message("begin", cycle=3, freeze_time=1.5e9, full=False, resume_from=0),
        messages.encode_message("member", index=0),
        messages.encode_message("end", cycle=3, chunks=17),
        messages.encode_message("hash_request", index=0, start_block=0, count=2),
        messages.encode_message("opened", node_id="t", applied_cycle=2, freeze_time=1.0,
                                has_image=True, pending_cycle=0, pending_chunks=0),
        messages.encode_message("ack", cycle=3, chunks=5),
        messages.encode_message("applied", cycle=3, freeze_time=2.0),
        messages.encode_message("hashes", index=0, start_block=0, count=2, digests="00" * 16),
        messages.encode_message("error", code="busy", message="try later", temporary=True),
        b'{"type":[]}', b'{"type":"begin","cycle":1,"freeze_time":' + b"9" * 310
        + b',"full":true,"resume_from":0}', b"[" * 3000, b'{"type":"open","mirror":"a\\n"}',
        json.dumps({"type": "member", "index": 1e400}).encode(),
    ]
    return [bytes([i % len(_EXPECT)]) + e for i, e in enumerate(examples)]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    expected = _EXPECT[data[0] % len(_EXPECT)]
    msg = clean(messages.parse_message, data[1:], expected)
    if isinstance(msg, dict):
        # What passed must be exactly a schema's fields with values that re-encode.
        mtype = msg["type"]
        assert mtype in expected or mtype == "error", mtype
        fields = {k: v for k, v in msg.items() if k != "type"}
        messages.encode_message(mtype, **fields)
