"""The wire form of a tree object's delta: the volumes' frames, one more message.

A tree cycle is the frames a volume cycle uses (docs/protocol.md), nothing
new but one CONTROL message type, ``tree_op`` (``wire/messages.py``)::

    CONTROL begin {cycle, freeze_time, full, resume_from: 0}
    CONTROL tree_op {op, path, ref, mode, uid, gid, mtime_ns, size, rdev, xattrs}
      DATA / ZERO frames        -- only after a 'file' or 'patch' op: byte ranges
                                   of that file, offset + length <= its size
    CONTROL tree_op ...
    CONTROL end {cycle, chunks}  -- chunks: the frames between begin and end

DATA frames are ``FramePacker``'s (xxh3 of the raw bytes, lz4/zstd when it
helps); ZERO frames carry no payload.  Every frame is checked by
``decode_header`` against limits sized to the file the frames belong to, so
a range outside the file is refused before a payload byte is read; every
message by its schema: ``path`` is a relative path that cannot leave the
tree (``messages.check_relpath``: no ``..``, no absolute path, no empty or
``.`` component), ``ref`` is a relative path for ``patch`` and ``link``, any
text without NUL for ``symlink`` (a symlink's target is stored, never
followed), ``fifo``, ``chr`` or ``blk`` for ``node``, empty for the rest;
``mode`` only permission bits; ``rdev`` a device number (major under 2^12,
minor under 2^20) for a ``node`` of ``chr`` or ``blk``, else 0; ``xattrs``
[[name, base64 value], ...] (``cyclemirror.xattrs``: known namespaces only,
a name of at most 255 bytes, a value of at most 64 KiB, a bounded count and
total), empty for ``rm`` and ``link``.  A frame of
another cycle, a DATA frame where no file is open, a missing or wrong
``end`` count: a ProtocolError each, and the cycle is not applied.

This module does not know the store: ``encode_tree_delta`` takes any ops
with the attributes of ``store.treediff.TreeOp``.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Iterator

from cyclemirror import xattrs
from cyclemirror._cext import frames
from cyclemirror.errors import ProtocolError
from cyclemirror.wire import messages
from cyclemirror.wire.link import MAX_CONTROL, control_limits, volume_limits

ZERO_MAX = (1 << 32) - 1 - 4095  # a ZERO record's length fits 32 bits
DEFAULT_CHUNK = 1 << 20
OPS_WITH_DATA = ("file", "patch")
OPS_WITH_PATH_REF = ("patch", "link")
OPS_WITHOUT_XATTRS = ("rm", "link")
NODE_KINDS = ("fifo", "chr", "blk")
MAX_MAJOR = 1 << 12  # Linux's dev_t: 12 bits of major, 20 of minor
MAX_MINOR = 1 << 20


def op_message(op) -> dict:
    return {"op": op.op, "path": op.path, "ref": op.ref, "mode": op.mode, "uid": op.uid,
            "gid": op.gid, "mtime_ns": op.mtime_ns, "size": op.size, "rdev": op.rdev,
            "xattrs": [[n, base64.b64encode(v).decode("ascii")] for n, v in op.xattrs]}


def check_tree_op(msg: dict) -> dict:
    """What the schema cannot say: which ops take a ``ref`` and of which kind, modes,
    device numbers, extended attributes.  Returns the message with ``xattrs`` decoded
    to ((name, bytes), ...), the form ``receiver.treeops`` applies."""
    op, ref = msg["op"], msg["ref"]
    what = f"tree_op {op!r} at {msg['path'][:80]!r}"
    if op == "node":
        if ref not in NODE_KINDS:
            raise ProtocolError(f"{what}: a node is one of {', '.join(NODE_KINDS)}, "
                                f"not {ref[:40]!r}")
        rdev = msg["rdev"]
        if ref == "fifo" and rdev:
            raise ProtocolError(f"{what}: a FIFO has no device number")
        if ref != "fifo" and (rdev >= 1 << 32 or os.major(rdev) >= MAX_MAJOR
                              or os.minor(rdev) >= MAX_MINOR):
            raise ProtocolError(f"{what}: device number {rdev:#x} is not a Linux one "
                                f"(major under {MAX_MAJOR}, minor under {MAX_MINOR})")
    elif msg["rdev"]:
        raise ProtocolError(f"{what}: only a 'node' has a device number")
    if op in OPS_WITH_PATH_REF:
        messages.check_relpath(ref, f"{what}: ref")
        if ref == ".":
            raise ProtocolError(f"{what}: ref names the tree's root, not a file")
    elif op == "symlink":
        if not ref:
            raise ProtocolError(f"{what}: a symlink needs a target")
    elif ref and op != "node":
        raise ProtocolError(f"{what}: takes no ref")
    if msg["path"] == "." and op not in ("dir",):
        raise ProtocolError(f"{what}: the tree's root can only be a 'dir'")
    if msg["mode"] > 0o7777:
        raise ProtocolError(f"{what}: mode {msg['mode']:o} is more than permission bits")
    if msg["uid"] >= 1 << 32 or msg["gid"] >= 1 << 32:
        raise ProtocolError(f"{what}: uid or gid past 2**32")
    if msg["size"] > messages.MAX_VOLUME_SIZE:
        raise ProtocolError(f"{what}: size {msg['size']} is past 2**56")
    if op not in OPS_WITH_DATA and msg["size"]:
        raise ProtocolError(f"{what}: only 'file' and 'patch' have a size")
    if op in OPS_WITHOUT_XATTRS and msg["xattrs"]:
        raise ProtocolError(f"{what}: takes no extended attributes")
    pairs = []
    for name, b64 in msg["xattrs"]:
        try:
            value = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(f"{what}: extended attribute {name[:80]!r}: the value is "
                                "not base64") from None
        pairs.append((name, value))
    why = xattrs.check_xattrs(pairs, what)
    if why:
        raise ProtocolError(why)
    return {**msg, "xattrs": tuple(pairs)}


def _control(frame_cycle: int, mtype: str, fields: dict) -> bytes:
    return frames.encode_control(frame_cycle, messages.encode_message(mtype, **fields))


def encode_tree_delta(ops, open_new: Callable[[str], int], cycle: int, freeze_time: float,
                      full: bool, packer=None) -> Iterator[bytes]:
    """The frames of a tree cycle.  ``open_new(path)`` opens a file of the new snapshot
    for reading (the caller's O_NOFOLLOW); the descriptor is closed here."""
    packer = packer or frames.FramePacker(frames.CODEC_NONE, 0, DEFAULT_CHUNK)
    yield _control(cycle, "begin", {"cycle": cycle, "freeze_time": freeze_time, "full": full,
                                     "resume_from": 0})
    chunks = 0
    for op in ops:
        msg = op_message(op)
        messages.validate_message({"type": "tree_op", **msg}, {"tree_op"})
        check_tree_op(msg)
        yield _control(cycle, "tree_op", msg)
        chunks += 1
        if op.op not in OPS_WITH_DATA:
            continue
        if op.data:
            fd = open_new(op.path)
            try:
                data_frames = packer.pack_extents(fd, list(op.data), cycle)
            finally:
                os.close(fd)
        else:
            data_frames = []
        zero_frames = []
        for off, ln in op.zero:
            while ln > 0:
                n = min(ln, ZERO_MAX)
                zero_frames.append(frames.encode_zero(frames.FT_ZERO, cycle, off, n))
                off += n
                ln -= n
        for f in data_frames + zero_frames:
            yield f
            chunks += 1
    yield _control(cycle, "end", {"cycle": cycle, "chunks": chunks})


class TreeFrameReader:
    """Reads one tree cycle's frames from ``read_exact(n) -> bytes`` and yields, checked:

    ("begin", msg), ("op", msg), ("data", offset, bytes), ("zero", offset, length),
    ("end", msg).  A data or zero event belongs to the latest 'file'/'patch' op."""

    def __init__(self, read_exact: Callable[[int], bytes], where: str = "tree delta"):
        self._read = read_exact
        self.where = where

    def _frame(self, limits):
        head = self._read(frames.HEADER_SIZE)
        if len(head) != frames.HEADER_SIZE:
            raise ProtocolError(f"{self.where}: the stream ends inside a frame header")
        h = frames.decode_header(head, limits)
        payload = self._read(h.length) if h.length else b""
        if len(payload) != h.length:
            raise ProtocolError(f"{self.where}: the stream ends inside a frame payload")
        return h, frames.decode_payload(h, payload)

    def events(self):
        h, raw = self._frame(control_limits())
        if h.type != frames.FT_CONTROL:
            raise ProtocolError(f"{self.where}: the first frame is not 'begin'")
        begin = messages.parse_message(raw, {"begin"})
        cycle = begin["cycle"]
        if begin["resume_from"]:
            raise ProtocolError(f"{self.where}: a tree cycle cannot resume (resume_from "
                                f"{begin['resume_from']})")
        yield ("begin", begin)
        limits = control_limits()
        chunks = 0
        while True:
            h, raw = self._frame(limits)
            if h.cycle != cycle:
                raise ProtocolError(f"{self.where}: a frame of cycle {h.cycle} inside cycle "
                                    f"{cycle}")
            if h.type == frames.FT_CONTROL:
                msg = messages.parse_message(raw, {"tree_op", "end"})
                if msg["type"] == "end":
                    if msg["cycle"] != cycle or msg["chunks"] != chunks:
                        raise ProtocolError(
                            f"{self.where}: 'end' says cycle {msg['cycle']} with "
                            f"{msg['chunks']} frames, {chunks} frames of cycle {cycle} came")
                    yield ("end", msg)
                    return
                if msg["type"] == "error":
                    raise ProtocolError(f"{self.where}: the source gave up: "
                                        f"{msg['message'][:200]}")
                msg = check_tree_op(msg)
                chunks += 1
                size = msg["size"] if msg["op"] in OPS_WITH_DATA else 0
                limits = volume_limits(size, 1) if size else control_limits()
                yield ("op", msg)
            elif h.type == frames.FT_DATA:
                chunks += 1
                yield ("data", h.offset, raw)
            elif h.type == frames.FT_ZERO:
                chunks += 1
                yield ("zero", h.offset, h.raw_length)
            else:
                raise ProtocolError(f"{self.where}: frame type {h.type} has no place in a "
                                    "tree delta")


def read_exact_from(fh) -> Callable[[int], bytes]:
    """A ``read_exact`` over a binary file object (a pipe, a socket's makefile, a file)."""
    def read(n: int) -> bytes:
        if n > MAX_CONTROL + volume_limits(1, 1).max_payload:
            raise ProtocolError(f"frame of {n} bytes is past every cap")
        buf = bytearray()
        while len(buf) < n:
            got = fh.read(n - len(buf))
            if not got:
                break
            buf += got
        return bytes(buf)
    return read
