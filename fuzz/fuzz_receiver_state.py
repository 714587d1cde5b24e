"""A target's mirror state file (receiver/state.py ``MirrorState.from_bytes``).

Byte 0, bit 0: rewrite the file's xxh64 to match its body (when the input
is JSON with a ``body``), so the fuzzer gets past the checksum and reaches
the checks of every field.  What loads must be usable as is: every field of
the right type and within range (the daemon's recovery and status use them
without further checks); anything else must be an IntegrityError.
"""

from __future__ import annotations

import json
import math

import xxhash

from cyclemirror.receiver.state import InFlight, MirrorState, VolumeSpec
from cyclemirror.wire.messages import NAME_RE, NODE_RE
from fuzz.harness import clean

MAX_LEN = 4096


def seeds() -> list[bytes]:
    st = MirrorState(mirror="db", group=False, source_node="n1", source_name="host",
                     volumes=[VolumeSpec("db", 1 << 20, 4096)], applied_cycle=3,
                     freeze_time=1.5e9, pending=InFlight(4, 1.6e9, False, 2, 8192))
    grp = MirrorState(mirror="g-1234", group=True, source_node="n2", source_name=None,
                      volumes=[VolumeSpec("a", 4096, 4096), VolumeSpec("b", 8192, 512)],
                      committed=InFlight(1, 2.0, True, 3, 100))
    body_list = json.dumps({"body": [1, 2], "xxh64": "0"}).encode()
    return [b"\x00" + st.to_bytes(), b"\x01" + grp.to_bytes(), b"\x01" + body_list,
            b"\x01" + json.dumps({"body": dict(json.loads(st.to_bytes())["body"],
                                               applied_cycle="big")}).encode()]


def _with_checksum(raw: bytes) -> bytes:
    try:
        outer = json.loads(raw)
    except (ValueError, RecursionError):
        return raw
    if not isinstance(outer, dict) or "body" not in outer:
        return raw
    try:
        text = json.dumps(outer["body"], sort_keys=True, separators=(",", ":"))
    except (ValueError, TypeError, RecursionError):
        return raw
    outer["xxh64"] = xxhash.xxh64_hexdigest(text.encode())
    return json.dumps(outer).encode()


def _check_usable(st: MirrorState) -> None:
    def count(v):
        return type(v) is int and 0 <= v < 2**63

    assert type(st.mirror) is str and NAME_RE.fullmatch(st.mirror), st.mirror
    assert type(st.group) is bool
    assert type(st.source_node) is str and NODE_RE.fullmatch(st.source_node)
    assert st.source_name is None or type(st.source_name) is str
    assert type(st.volumes) is list and st.volumes
    for v in st.volumes:
        assert type(v) is VolumeSpec and type(v.name) is str and NAME_RE.fullmatch(v.name)
        assert count(v.size) and v.size > 0 and count(v.block_size) and v.block_size > 0
        assert v.size % v.block_size == 0
    assert count(st.applied_cycle)
    assert type(st.freeze_time) in (int, float) and math.isfinite(st.freeze_time)
    assert st.pending is None or st.committed is None
    for f in (st.pending, st.committed):
        if f is not None:
            assert type(f) is InFlight and count(f.cycle) and type(f.full) is bool
            assert count(f.chunks) and count(f.staged_bytes)
            assert type(f.freeze_time) in (int, float) and math.isfinite(f.freeze_time)
    assert type(st.extra) is dict


def test_one_input(data: bytes) -> None:
    if not data:
        return
    raw = _with_checksum(data[1:]) if data[0] & 1 else data[1:]
    st = clean(MirrorState.from_bytes, raw, "fuzz.state.json")
    if isinstance(st, MirrorState):
        _check_usable(st)
        MirrorState.from_bytes(st.to_bytes(), "round trip")
