"""A frame link: frames in and out of one connected (possibly TLS) socket.

Reading is strictly "header first, checked, then payload": ``decode_header``
validates every field against the link's ``FrameLimits`` (payload and chunk
caps, volume size, alignment) before we read or allocate a single payload
byte, and ``verify_payload`` verifies the checksum of the raw bytes.  A CONTROL
payload is then parsed by ``messages`` against the types the caller expects.

Copies: an uncompressed payload is received into a fresh, unzeroed buffer
that is verified in place and handed to the caller (no second copy); a
compressed one is received into a scratch buffer the link reuses, and
decompressed into a new object.  Reads go through a 256 KiB receive buffer
(``sockio.BufferedReceiver``): small frames cost no system call each, and a
big payload is read straight into its own buffer with one MSG_WAITALL
receive.

Locking: ``send*`` may be called from several threads (a sender and an ack
writer); a lock keeps whole frames from interleaving.  ``recv*`` belongs to
one reader thread.
"""

from __future__ import annotations

import socket
import threading

from cyclemirror._cext import frames
from cyclemirror.errors import PeerError, ProtocolError, is_temporary
from cyclemirror.wire import messages
from cyclemirror.wire.sockio import BufferedReceiver, peer_name, send_all, send_all_parts

MAX_CHUNK = 4 << 20  # the largest raw DATA chunk either side accepts
MAX_CONTROL = 1 << 20


def control_limits() -> frames.FrameLimits:
    """Limits before a mirror is opened: CONTROL frames only (no volume yet)."""
    return frames.FrameLimits(MAX_CONTROL, 0, MAX_CONTROL, 0, 1)


def volume_limits(volume_size: int, alignment: int) -> frames.FrameLimits:
    return frames.FrameLimits(max(MAX_CHUNK, MAX_CONTROL), MAX_CHUNK, MAX_CONTROL,
                              volume_size, alignment)


class RemoteError(PeerError):
    """The peer sent an error message; ``temporary`` (its ``is_temporary`` answer) and
    ``code`` are the peer's."""

    def __init__(self, message: str, code: str, temporary: bool):
        super().__init__(message)
        self.code = code
        self.temporary = temporary


class FrameLink:
    def __init__(self, sock: socket.socket, limits: frames.FrameLimits | None = None):
        self.sock = sock
        self.peer = peer_name(sock)
        self.limits = limits or control_limits()
        self._send_lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0
        # Receive buffers owned by the reader thread: the header, and compressed
        # payloads (grown to the largest seen, at most the payload cap).
        self._header_buf = bytearray(frames.HEADER_SIZE)
        self._scratch = bytearray(0)
        self._rx = BufferedReceiver(sock)

    # -- sending ---------------------------------------------------------
    def send_frame(self, frame: bytes | memoryview, what: str = "a frame") -> None:
        with self._send_lock:
            send_all(self.sock, frame, what)
            self.bytes_sent += len(frame)

    def send_frames(self, frames_: list, what: str = "frames") -> None:
        """Send several whole frames back to back, gathered by the kernel (no joined copy)."""
        with self._send_lock:
            send_all_parts(self.sock, frames_, what)
            self.bytes_sent += sum(len(f) for f in frames_)

    def send_message(self, mtype: str, **fields) -> None:
        """Send a control message; its frame carries the message's cycle (or 0)."""
        payload = messages.encode_message(mtype, **fields)
        self.send_frame(frames.encode_control(fields.get("cycle", 0), payload),
                        f"a {mtype!r} message")

    def send_error(self, exc: BaseException, code: str = "error") -> None:
        """Best effort: tell the peer why we are closing (it may be gone already).

        The message carries our ``is_temporary`` answer, so the peer retries
        exactly what we would retry (a damaged frame: yes; a bad key: no).
        """
        try:
            self.send_message("error", code=code, message=str(exc)[: messages.MAX_TEXT],
                              temporary=is_temporary(exc))
        except Exception:  # noqa: BLE001 - the connection is being dropped anyway
            pass

    # -- receiving -------------------------------------------------------
    def recv_frame(self) -> tuple[frames.FrameHeader, bytes | bytearray]:
        """Return (header, raw payload) of the next frame, fully verified.

        The raw payload is bytes, a bytearray, or (DATA) a memoryview of a
        page-aligned buffer, which now belongs to the caller (an uncompressed
        payload is returned in its receive buffer).
        """
        self._rx.read_into(self._header_buf, "a frame header")
        # Every field is checked against the caps before a payload byte is read.
        header = frames.decode_header(self._header_buf, self.limits)
        n = header.length
        if n == 0:
            payload = b""
        elif header.codec == frames.CODEC_NONE:
            # Handed to the caller as is, so a fresh (unzeroed) buffer per frame; DATA
            # aligned, as the target's image writer sends it to disk with O_DIRECT.
            if header.type == frames.FT_DATA:
                payload = frames.new_aligned_buffer(n)
            else:
                payload = frames.new_payload_buffer(n)
            self._rx.read_into(payload, "a frame payload")
        else:
            # Decompression writes a new object, so the input buffer is reused.
            if len(self._scratch) < n:
                self._scratch = frames.new_payload_buffer(n)
            payload = memoryview(self._scratch)[:n]
            self._rx.read_into(payload, "a frame payload")
        self.bytes_received += frames.HEADER_SIZE + n
        return header, frames.verify_payload(header, payload)

    def message_from(self, header: frames.FrameHeader, payload: bytes, expected: set[str]):
        if header.type != frames.FT_CONTROL:
            raise ProtocolError(
                f"{self.peer}: expected a control message ({sorted(expected)}), got a data frame"
            )
        msg = messages.parse_message(payload, expected)
        if msg["type"] == "error":
            raise RemoteError(f"peer {self.peer} reported: {msg['message']}", msg["code"],
                              msg["temporary"])
        return msg

    def recv_message(self, expected: set[str]) -> dict:
        header, payload = self.recv_frame()
        return self.message_from(header, payload, expected)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
