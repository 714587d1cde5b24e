"""The wire form of a tree delta: what a hostile or broken peer sends is refused.

The decoder (``wire.treeframes.TreeFrameReader``) is fed hand-made frames:
paths that climb out of the tree, absolute paths, empty and '.' components,
NUL bytes, over-long names, refs where none belongs or missing where one
must be, modes past the permission bits, data outside any file or past a
file's end, frames of another cycle, a wrong 'end' count, a cut stream;
extended attributes of unknown namespaces, over-long names, values past 64
KiB or not base64, too many of them, on ops that take none; nodes of an
unknown kind, FIFOs with a device number, device numbers Linux cannot hold;
and (hypothesis) any attribute set either decodes to exactly what was sent or
is refused whole.
Each is a ProtocolError before anything is applied; a well-formed stream
decodes to exactly what was encoded.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror._cext import frames
from cyclemirror.errors import ProtocolError
from cyclemirror.wire import treeframes
from cyclemirror.wire.messages import check_relpath
from tests.support.trees import begin, control, end, tree_op


def op(cycle=2, **kw) -> bytes:
    return tree_op(cycle, **kw)


def data(cycle, offset, payload: bytes) -> bytes:
    """The DATA frames FramePacker makes of ``payload`` at ``offset`` of a file."""
    with tempfile.TemporaryFile() as fh:
        fh.write(b"\0" * offset + payload)
        fh.flush()
        return b"".join(frames.FramePacker(frames.CODEC_NONE).pack_extents(
            fh.fileno(), [(offset, len(payload))], cycle))


def decode(stream: bytes) -> list:
    reader = treeframes.TreeFrameReader(treeframes.read_exact_from(io.BytesIO(stream)))
    return list(reader.events())


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "a//b", "", "a/./b",
                                  "a/", "..", "a\0b", "x" * 256, "a/" * 2100 + "b"])
def test_a_path_that_could_leave_the_tree_is_refused(path):
    with pytest.raises(ProtocolError):
        decode(begin() + op(path=path) + end())
    with pytest.raises(ProtocolError):
        check_relpath(path, "path")


@pytest.mark.parametrize("fields, why", [
    ({"op": "patch", "ref": "../outside"}, "component"),
    ({"op": "patch", "ref": "/etc/shadow"}, "absolute"),
    ({"op": "link", "ref": ""}, "path"),
    ({"op": "link", "ref": "."}, "root"),
    ({"op": "symlink", "ref": ""}, "needs a target"),
    ({"op": "symlink", "ref": "a\0b"}, "NUL"),
    ({"op": "rm", "ref": "x"}, "takes no ref"),
    ({"op": "file", "mode": 0o100644}, "permission bits"),
    ({"op": "meta", "size": 5}, "only 'file' and 'patch'"),
    ({"op": "rm", "path": "."}, "root"),
    ({"op": "chmod"}, "must be one of"),
    ({"op": "dir", "uid": 1 << 40}, "uid"),
    ({"op": "dir", "mtime_ns": 1.5}, "integer"),
    ({"op": "dir", "extra": 1}, "unknown fields"),
    ({"op": "dir", "xattrs": [["system.nfs4_acl", ""]]}, "not in a mirrored namespace"),
    ({"op": "dir", "xattrs": [["btrfs.compression", "emxpYg=="]]}, "mirrored namespace"),
    ({"op": "dir", "xattrs": [["user.", ""]]}, "mirrored namespace"),
    ({"op": "dir", "xattrs": [["user.a\u0000b", ""]]}, "mirrored namespace"),
    ({"op": "dir", "xattrs": [["user." + "n" * 251, ""]]}, "at most 255 bytes"),
    ({"op": "dir", "xattrs": [["user." + "é" * 126, ""]]}, "over 255 bytes"),
    ({"op": "dir", "xattrs": [["user.a", "A" * 87388]]}, "pairs"),  # too long to decode
    ({"op": "dir", "xattrs": [["user.a", "A" * 87384]]}, "65538 bytes, more than 65536"),
    ({"op": "dir", "xattrs": [["user.a", "not base64!"]]}, "not base64"),
    ({"op": "dir", "xattrs": [["user.a", ""], ["user.a", ""]]}, "twice"),
    ({"op": "dir", "xattrs": [[f"user.{i}", ""] for i in range(129)]}, "at most 128"),
    ({"op": "dir", "xattrs": [[f"user.{i}", "A" * 87380] for i in range(9)]},
     "more than 524288"),
    ({"op": "dir", "xattrs": [["user.a"]]}, "pairs"),
    ({"op": "dir", "xattrs": {"user.a": ""}}, "pairs"),
    ({"op": "rm", "xattrs": [["user.a", ""]]}, "takes no extended attributes"),
    ({"op": "link", "ref": "b", "xattrs": [["user.a", ""]]}, "no extended attributes"),
    ({"op": "node", "ref": "sock"}, "a node is one of"),
    ({"op": "node", "ref": ""}, "a node is one of"),
    ({"op": "node", "ref": "fifo", "rdev": 5}, "a FIFO has no device number"),
    ({"op": "node", "ref": "chr", "rdev": 1 << 40}, "not a Linux one"),
    ({"op": "node", "ref": "blk", "rdev": os.makedev(4096, 0)}, "not a Linux one"),
    ({"op": "file", "rdev": os.makedev(8, 0)}, "only a 'node'"),
    ({"op": "node", "path": ".", "ref": "fifo"}, "root"),
])
def test_a_malformed_op_is_refused_naming_why(fields, why):
    with pytest.raises(ProtocolError, match=why):
        decode(begin() + op(**fields) + end())


def test_data_outside_a_file_or_past_its_end_is_refused():
    with pytest.raises(ProtocolError):  # no file open
        decode(begin() + op(op="dir", path="d") + data(2, 0, b"x") + end(chunks=2))
    with pytest.raises(ProtocolError):  # past the file's 4 bytes
        decode(begin() + op(size=4) + data(2, 2, b"xyz") + end(chunks=2))
    zero = frames.encode_zero(frames.FT_ZERO, 2, 0, 4096)
    with pytest.raises(ProtocolError):
        decode(begin() + op(size=100) + zero + end(chunks=2))


def test_other_cycles_wrong_counts_and_cut_streams_are_refused():
    with pytest.raises(ProtocolError, match="cycle 3 inside cycle 2"):
        decode(begin() + op(cycle=3) + end())
    with pytest.raises(ProtocolError, match="frames of cycle 2 came"):
        decode(begin() + op() + end(chunks=5))
    with pytest.raises(ProtocolError, match="ends inside"):
        decode((begin() + op() + end())[:-3])
    with pytest.raises(ProtocolError, match="begin"):
        decode(op() + end())
    with pytest.raises(ProtocolError, match="resume"):
        decode(control(2, {"type": "begin", "cycle": 2, "freeze_time": 1.0, "full": False,
                           "resume_from": 4}))


def test_a_good_stream_decodes_to_what_was_encoded():
    stream = (begin() + op(op="dir", path=".", mode=0o755, mtime_ns=-5)
              + op(path="d/f", size=10, mtime_ns=7) + data(2, 3, b"abc")
              + frames.encode_zero(frames.FT_ZERO, 2, 6, 4)
              + op(op="symlink", path="d/s", ref="../../anywhere/at/all")
              + op(op="link", path="d/g", ref="d/f")
              + op(op="node", path="d/null", ref="chr", rdev=os.makedev(1, 3),
                   xattrs=[["security.selinux", "c3lzdGVtX3U6b2JqZWN0X3I6bnVsbF9kZXZpY2VfdDpzMAA="],
                           ["user.x", ""]])
              + op(op="node", path="d/fifo", ref="fifo", mode=0o640)
              + end(chunks=8))
    ev = decode(stream)
    assert [e[0] for e in ev] == ["begin", "op", "op", "data", "zero", "op", "op", "op", "op",
                                  "end"]
    assert ev[1][1]["mtime_ns"] == -5
    assert ev[3][1:] == (3, b"abc") and ev[4][1:] == (6, 4)
    assert ev[5][1]["ref"] == "../../anywhere/at/all"
    assert ev[7][1]["rdev"] == os.makedev(1, 3)
    assert ev[7][1]["xattrs"] == (("security.selinux", b"system_u:object_r:null_device_t:s0\0"),
                                  ("user.x", b""))
    assert ev[8][1]["xattrs"] == () and ev[8][1]["ref"] == "fifo"


def test_an_op_with_attributes_encodes_and_decodes_to_itself():
    """What the source sends (``op_message`` of a TreeOp) is what the target reads."""
    from cyclemirror.store.treediff import TreeOp

    xa = (("system.posix_acl_access", bytes(range(44))), ("trusted.t", b"\xff" * 65536),
          ("user.empty", b""))
    ops = [TreeOp("dir", ".", mode=0o755, xattrs=xa),
           TreeOp("node", "b", "blk", 0o660, 0, 6, 9, rdev=os.makedev(259, 1 << 19))]
    stream = b"".join(treeframes.encode_tree_delta(ops, None, 2, 1.0, False))
    ev = decode(stream)
    assert ev[1][1]["xattrs"] == xa
    assert ev[2][1]["rdev"] == os.makedev(259, 1 << 19) and ev[2][1]["ref"] == "blk"


_pieces = st.lists(st.sampled_from(["..", ".", "", "a", "b", "é", "/", "\0", "x" * 255,
                                    "x" * 256]), max_size=8)


@given(st.one_of(st.text(max_size=60), _pieces.map("/".join), _pieces.map("".join)))
def test_a_path_the_check_accepts_never_leaves_the_tree(path):
    try:
        check_relpath(path, "path")
    except ProtocolError:
        return
    joined = os.path.normpath(os.path.join("/root", path))
    assert joined == "/root" or joined.startswith("/root/")
    assert ".." not in path.split("/") and "\0" not in path and not path.startswith("/")
    assert os.path.join("/root", path) == joined or path == "."  # nothing to normalise


@settings(max_examples=300)
@given(st.binary(max_size=400), st.integers(0, 6))
def test_arbitrary_bytes_after_a_good_start_are_a_protocol_error(junk, cut):
    good = begin() + op(path="d/f", size=10) + data(2, 0, b"0123456789") + end(chunks=2)
    with contextlib.suppress(ProtocolError):
        decode(good[: len(good) - cut * 7] + junk)


_xattr_names = st.one_of(
    st.sampled_from(["user.a", "trusted.t", "security.capability", "system.posix_acl_access",
                     "system.posix_acl_default", "system.nfs4_acl", "btrfs.compression",
                     "user.", "user." + "n" * 250, "user." + "é" * 126, "other.x"]),
    st.text(max_size=12).map(lambda t: "user." + t))
_xattr_sets = st.lists(st.tuples(_xattr_names, st.binary(max_size=300)), max_size=6)


@settings(max_examples=200, deadline=None)
@given(_xattr_sets, st.sampled_from(["dir", "file", "meta", "symlink", "node", "rm", "link"]))
def test_attributes_round_trip_exactly_or_are_refused_whole(pairs, kind):
    """Whatever a peer sends: a set the shared rule (``xattrs.check_xattrs``) accepts, on
    an op that takes attributes, decodes to exactly the pairs sent; anything else is a
    ProtocolError, never a partial set."""
    from cyclemirror import xattrs

    ref = {"symlink": "t", "node": "fifo", "link": "b"}.get(kind, "")
    msg = op(op=kind, path="a", ref=ref, size=0,
             xattrs=[[n, base64.b64encode(v).decode()] for n, v in pairs])
    ok = xattrs.check_xattrs(pairs, "x") is None and (kind not in ("rm", "link") or not pairs)
    try:
        ev = decode(begin() + msg + end())
    except ProtocolError:
        assert not ok
        return
    assert ok
    assert ev[1][1]["xattrs"] == tuple(pairs)
