"""Control messages: small JSON objects carried in CONTROL frames, checked strictly.

Each message type has a schema (field -> kind); ``parse_message`` accepts a
payload only if it is a JSON object whose ``type`` is one the caller expects,
whose fields are exactly the schema's, and whose values have the right kind
and lie within caps.  Anything else is a ProtocolError naming the field, so a
peer can never smuggle an unchecked value past this module.  JSON keeps the
control plane readable in packet dumps; data never travels as JSON.
"""

from __future__ import annotations

import json
import math
import re

from cyclemirror import xattrs
from cyclemirror.errors import ProtocolError
from cyclemirror.jsontext import loads_strict

MAX_INT = 2**63 - 1
MAX_TEXT = 1024
MAX_MEMBERS = 64
MAX_HASH_BLOCKS = 16384  # per hashes message: 128 KiB of digests, hex-encoded
# Matched with fullmatch: "$" would also accept a name that ends in a newline.
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
NODE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 1 << 20
MAX_VOLUME_SIZE = 1 << 56
MAX_PATH_BYTES = 4096  # a tree path or symlink target, in UTF-8 bytes (PATH_MAX)
MAX_NAME_BYTES = 255  # one component of a tree path (NAME_MAX)
TREE_OPS = frozenset({"rm", "dir", "file", "patch", "symlink", "link", "meta", "node"})

# kinds: int, sint, float, bool, name, node, text, hex, volumes, opt_text, relpath,
# linktext, tree_op, xattrs
SCHEMAS: dict[str, dict[str, str]] = {
    # source -> target
    # protocol 3: sent before 'open', the generation of the source's volume
    # (docs/failover.md); the target checks it against its image and its roles
    "lineage": {"epoch": "text", "parent": "text", "parent_freeze_time": "float",
                "written_blocks": "int", "discard_on": "text"},
    # protocol 3, between cycles: the source asks the target to promote its image after
    # the final cycle (a planned switchover), the target answers with its generation
    "switchover": {"cycle": "int", "back_to": "text"},
    # a tree's planned switchover, after 'tree_open' (docs/trees.md, "Switchover"): promote
    # the mirror at 'path' here and mirror it back to 'back_to'
    "tree_switchover": {"cycle": "int", "back_to": "text", "path": "text"},
    "switched": {"volume": "name", "generation": "text", "epoch": "text"},
    "open": {"node_id": "node", "node_name": "opt_text", "mirror": "name", "group": "bool",
             "volumes": "volumes"},
    "begin": {"cycle": "int", "freeze_time": "float", "full": "bool", "resume_from": "int"},
    # a file object whose size changed (docs/files.md): 'resizable' before 'open' lets the
    # sizes there differ from the images the target holds; 'size' before a cycle's
    # 'begin' gives member 'index''s size in that cycle where it differs from 'open''s
    "resizable": {},
    "size": {"cycle": "int", "index": "int", "size": "int"},
    "member": {"index": "int"},
    "end": {"cycle": "int", "chunks": "int"},
    "hash_request": {"index": "int", "start_block": "int", "count": "int"},
    # target -> source
    "opened": {"node_id": "node", "applied_cycle": "int", "freeze_time": "float",
               "has_image": "bool", "pending_cycle": "int", "pending_chunks": "int"},
    "ack": {"cycle": "int", "chunks": "int"},
    "committed": {"cycle": "int"},  # protocol 2: durably received, will be applied
    "applied": {"cycle": "int", "freeze_time": "float"},
    "hashes": {"index": "int", "start_block": "int", "count": "int", "digests": "hex"},
    # both ways
    "error": {"code": "name", "message": "text", "temporary": "bool"},
    # verify (docs/verify.md): a connection of its own, opened with verify_open
    "verify_open": {"node_id": "node", "node_name": "opt_text", "mirror": "name",
                    "group": "bool", "volumes": "volumes", "read_rate": "int"},
    "verify_opened": {"node_id": "node", "applied_cycle": "int", "freeze_time": "float"},
    "verify_request": {"index": "int", "offset": "int", "length": "int", "unit": "int"},
    "verify_hashes": {"index": "int", "offset": "int", "unit": "int", "count": "int",
                      "cycle": "int", "digests": "hex"},
    "verify_result": {"index": "int", "offset": "int", "length": "int", "cycle": "int",
                      "mismatched_blocks": "int"},
    # a tree object's delta (docs/trees.md, wire/treeframes.py): one per operation, DATA
    # and ZERO frames of a 'file' or 'patch' op follow it; 'ref' is checked per op there
    "tree_op": {"op": "tree_op", "path": "relpath", "ref": "linktext", "mode": "int",
                "uid": "int", "gid": "int", "mtime_ns": "sint", "size": "int", "rdev": "int",
                "xattrs": "xattrs"},
    # a tree mirror's connection (docs/protocol.md, "Tree mirrors"): 'tree_open' instead
    # of 'open', answered by 'tree_opened'; before each cycle's 'begin', 'tree_base' says
    # which applied cycle the delta starts from (0: a full cycle)
    "tree_open": {"node_id": "node", "node_name": "opt_text", "mirror": "name"},
    # before 'tree_open', from a promoted tree only (docs/trees.md, "Failback"): the
    # node and mirror it was promoted from, at which cycle (frozen when), how many ops
    # it wrote since, and the node a user named to lose a split brain ('' for none)
    "tree_branch": {"source_node": "node", "mirror": "name", "cycle": "int",
                    "freeze_time": "float", "written_ops": "int", "discard_on": "text"},
    "tree_opened": {"node_id": "node", "applied_cycle": "int", "freeze_time": "float"},
    "tree_base": {"cycle": "int", "base": "int", "base_freeze_time": "float"},
}


def _bad(mtype: str, field: str, why: str) -> ProtocolError:
    return ProtocolError(f"control message {mtype!r}: field {field!r} {why}")


def _check_value(mtype: str, field: str, kind: str, value):
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
            raise _bad(mtype, field, f"must be an integer in 0..2**63-1, got {value!r:.40}")
    elif kind == "sint":
        if isinstance(value, bool) or not isinstance(value, int) or not (
                -MAX_INT - 1 <= value <= MAX_INT):
            raise _bad(mtype, field, f"must be an integer in -2**63..2**63-1, got {value!r:.40}")
    elif kind == "relpath":
        check_relpath(value, f"control message {mtype!r}: field {field!r}")
    elif kind == "linktext":
        if not isinstance(value, str) or "\0" in value or len(value) > MAX_PATH_BYTES or len(
                value.encode("utf-8", "surrogatepass")) >= MAX_PATH_BYTES:
            raise _bad(mtype, field, f"must be a string of under {MAX_PATH_BYTES} UTF-8 bytes "
                                     "without NUL")
    elif kind == "tree_op":
        if not isinstance(value, str) or value not in TREE_OPS:
            raise _bad(mtype, field, f"must be one of {sorted(TREE_OPS)}, got {value!r:.40}")
    elif kind == "xattrs":
        # [[name, base64 value], ...]: names and sizes checked by xattrs.check_xattrs
        # once decoded (treeframes.check_tree_op); here only the shape and the cap on
        # the count, before anything is decoded
        if not isinstance(value, list) or len(value) > xattrs.MAX_COUNT:
            raise _bad(mtype, field, f"must be a list of at most {xattrs.MAX_COUNT} "
                                     "[name, base64 value] pairs")
        for pair in value:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                    and isinstance(pair[1], str)
                    and len(pair[0]) <= xattrs.MAX_NAME
                    and len(pair[1]) <= (xattrs.MAX_VALUE + 2) // 3 * 4):
                raise _bad(mtype, field, "must hold [name, base64 value] pairs of strings "
                                         f"(a name of at most {xattrs.MAX_NAME} bytes, a "
                                         f"value of at most {xattrs.MAX_VALUE} bytes)")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(mtype, field, "must be a number")
        if isinstance(value, int) and not 0 <= value <= MAX_INT:
            # math.isfinite of a 310-digit integer raises OverflowError: check ints apart.
            raise _bad(mtype, field, f"must be finite and >= 0, got {value!r:.40}")
        if not math.isfinite(value) or value < 0:
            raise _bad(mtype, field, f"must be finite and >= 0, got {value!r}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise _bad(mtype, field, "must be true or false")
    elif kind in ("name", "node"):
        pattern = NAME_RE if kind == "name" else NODE_RE
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise _bad(mtype, field, f"is not a valid {kind} ({pattern.pattern})")
    elif kind in ("text", "opt_text"):
        if value is None and kind == "opt_text":
            return
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise _bad(mtype, field, f"must be a string of at most {MAX_TEXT} characters")
    elif kind == "hex":
        if not isinstance(value, str) or len(value) > MAX_HASH_BLOCKS * 16 or len(value) % 16:
            raise _bad(mtype, field, "must be hex of whole 8-byte digests, within the cap")
        try:
            bytes.fromhex(value)
        except ValueError:
            raise _bad(mtype, field, "is not hex") from None
    elif kind == "volumes":
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_MEMBERS:
            raise _bad(mtype, field, f"must list 1..{MAX_MEMBERS} volumes")
        seen = set()
        for i, vol in enumerate(value):
            where = f"{field}[{i}]"
            if not isinstance(vol, dict) or set(vol) != {"name", "size", "block_size"}:
                raise _bad(mtype, where, "must be {name, size, block_size}")
            _check_value(mtype, where + ".name", "name", vol["name"])
            _check_value(mtype, where + ".size", "int", vol["size"])
            _check_value(mtype, where + ".block_size", "int", vol["block_size"])
            bs = vol["block_size"]
            if not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE or bs & (bs - 1):
                raise _bad(mtype, where + ".block_size", f"must be a power of two in "
                           f"{MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}, got {bs}")
            if vol["size"] > MAX_VOLUME_SIZE or vol["size"] % bs:
                raise _bad(mtype, where + ".size", "must be a multiple of block_size "
                           "within 2**56")
            if vol["name"] in seen:
                raise _bad(mtype, where + ".name", "is listed twice")
            seen.add(vol["name"])
    else:  # pragma: no cover - a schema typo
        raise AssertionError(kind)


def check_relpath(value, what: str) -> str:
    """A path inside a tree: "." (the root) or "/"-separated components, none empty,
    "." or "..", none over 255 UTF-8 bytes, no NUL, under 4096 bytes in all; so it can
    never name anything outside the tree (symlinks aside, which the target never
    follows)."""
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{what} must be a non-empty path string")
    if value == ".":
        return value
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"{what} is not valid UTF-8") from None
    if len(raw) >= MAX_PATH_BYTES or "\0" in value:
        raise ProtocolError(f"{what} is over {MAX_PATH_BYTES} bytes or holds a NUL")
    if value.startswith("/"):
        raise ProtocolError(f"{what} {value[:80]!r} is absolute; tree paths are relative")
    for comp in value.split("/"):
        if comp in ("", ".", ".."):
            raise ProtocolError(f"{what} {value[:80]!r} has an empty, '.' or '..' component")
        if len(comp.encode("utf-8")) > MAX_NAME_BYTES:
            raise ProtocolError(f"{what} has a component over {MAX_NAME_BYTES} bytes")
    return value


def encode_message(mtype: str, **fields) -> bytes:
    """JSON bytes of a message; checks our own output with the same schema."""
    msg = {"type": mtype, **fields}
    validate_message(msg, {mtype})
    return json.dumps(msg, separators=(",", ":"), sort_keys=True).encode()


def validate_message(msg, expected: set[str]) -> dict:
    if not isinstance(msg, dict):
        raise ProtocolError("control message is not a JSON object")
    mtype = msg.get("type")
    if not isinstance(mtype, str) or mtype not in SCHEMAS:
        raise ProtocolError(f"unknown control message type {mtype!r:.40}")
    if mtype not in expected and mtype != "error":
        raise ProtocolError(
            f"unexpected control message {mtype!r} (expected one of {sorted(expected)})"
        )
    schema = SCHEMAS[mtype]
    fields = set(msg) - {"type"}
    if fields != set(schema):
        missing = sorted(set(schema) - fields)
        extra = sorted(fields - set(schema))
        raise ProtocolError(
            f"control message {mtype!r}: missing fields {missing}, unknown fields {extra}"
        )
    for field, kind in schema.items():
        _check_value(mtype, field, kind, msg[field])
    return msg


def parse_message(payload: bytes, expected: set[str]) -> dict:
    """Decode and validate one control payload; ``error`` messages always pass."""
    msg = loads_strict(bytes(payload), "control message", ProtocolError)
    return validate_message(msg, expected)
