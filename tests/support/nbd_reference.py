"""A tiny pure-Python model of the NBD transmission phase, to check the Cython loop against.

It answers a stream of requests on an in-memory image with the replies the
protocol (and our documented choices of error values) prescribes, in order.
It covers READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, DISC, unknown commands, bad
flags, zero and oversized lengths and ranges; BLOCK_STATUS depends on the file
system's allocation and is tested separately.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tests.support import nbd_rawclient as C

TF_READ_ONLY, TF_FLUSH, TF_FUA, TF_TRIM, TF_ZEROES, TF_DF, TF_FAST_ZERO = 2, 4, 8, 32, 64, 128, 2048


@dataclass
class ModelReply:
    handle: int
    error: int
    data: bytes | None = None


@dataclass
class ReferenceSession:
    image: bytearray
    tflags: int
    structured: bool
    max_payload: int
    replies: list[ModelReply] = field(default_factory=list)
    end: str = "eof"

    def allowed(self, cmd: int) -> int:
        fua = C.FUA if self.tflags & TF_FUA else 0
        return {
            C.CMD_READ: fua | (C.DF if self.tflags & TF_DF else 0),
            C.CMD_WRITE: fua,
            C.CMD_FLUSH: fua,
            C.CMD_TRIM: fua,
            C.CMD_WRITE_ZEROES: fua | C.NO_HOLE | (C.FAST_ZERO if self.tflags & TF_FAST_ZERO else 0),
        }.get(cmd, 0)

    def range_error(self, offset: int, length: int, past_end: int) -> int:
        if length == 0:
            return C.EINVAL
        if offset + length > len(self.image):
            return past_end
        return 0

    def run(self, stream: bytes) -> None:
        pos = 0
        ro = bool(self.tflags & TF_READ_ONLY)
        while True:
            if len(stream) - pos < 28:
                self.end = "eof" if pos == len(stream) else "truncated"
                return
            magic, flags, cmd, handle, offset, length = struct.unpack_from(">IHHQQI", stream, pos)
            pos += 28
            if magic != C.REQUEST_MAGIC:
                self.end = "magic"
                return
            bad_flags = flags & ~self.allowed(cmd)
            if cmd == C.CMD_WRITE:
                if length > self.max_payload:
                    self.end = "oversized"
                    return
                if len(stream) - pos < length:
                    self.end = "truncated"
                    return
                payload = stream[pos:pos + length]
                pos += length
                err = C.EPERM if ro else (C.EINVAL if bad_flags else
                                          self.range_error(offset, length, C.ENOSPC))
                if not err:
                    self.image[offset:offset + length] = payload
                self.replies.append(ModelReply(handle, err))
            elif cmd == C.CMD_READ:
                if bad_flags:
                    err = C.EINVAL
                elif length > self.max_payload:
                    err = C.EOVERFLOW if flags & C.DF else C.EINVAL
                else:
                    err = self.range_error(offset, length, C.EINVAL)
                data = None if err else bytes(self.image[offset:offset + length])
                self.replies.append(ModelReply(handle, err, data))
            elif cmd == C.CMD_DISC:
                self.end = "disc"
                return
            elif cmd == C.CMD_FLUSH:
                if not self.tflags & TF_FLUSH or bad_flags or offset or length:
                    err = C.EINVAL
                else:
                    err = 0
                self.replies.append(ModelReply(handle, err))
            elif cmd in (C.CMD_TRIM, C.CMD_WRITE_ZEROES):
                advertised = self.tflags & (TF_TRIM if cmd == C.CMD_TRIM else TF_ZEROES)
                if not advertised:
                    err = C.EPERM if ro else C.EINVAL
                elif bad_flags:
                    err = C.EINVAL
                else:
                    err = self.range_error(offset, length, C.ENOSPC)
                if not err:
                    self.image[offset:offset + length] = bytes(length)
                self.replies.append(ModelReply(handle, err))
            else:  # unknown, and BLOCK_STATUS without a context
                self.replies.append(ModelReply(handle, C.EINVAL))
